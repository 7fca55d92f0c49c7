"""dmoe across machines on Ray Serve: a gateway with dmoe's HTTP API over replicas that each
hold the base model and multiplex the experts (``dmoe cluster up``; docs/architecture.md)."""
