"""Prometheus metrics of a running server (one registry per server, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        # every choice submitted to the engine is counted once here, then once in requests by its outcome
        # (stop, length, cancelled, rejected, failed, stopped): started == the sum of requests
        self.started = Counter("dmoe_requests_started_total", "Choices submitted to the engine", ["expert"], registry=self.registry)
        self.requests = Counter("dmoe_requests_total", "Requests by adapter set and outcome", ["expert", "status"], registry=self.registry)
        self.tokens = Counter("dmoe_generated_tokens_total", "Generated tokens by adapter set", ["expert"], registry=self.registry)
        self.prompt_tokens = Counter("dmoe_prompt_tokens_total", "Prompt tokens by adapter set", ["expert"], registry=self.registry)
        self.ttft = Histogram("dmoe_time_to_first_token_seconds", "Time from submit to first token", ["expert"],
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.token_latency = Histogram("dmoe_token_latency_seconds", "Time per generated token after the first", ["expert"],
                                       buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2), registry=self.registry)
        self.batch_size = Gauge("dmoe_batch_size", "Rows in the running batch", registry=self.registry)
        self.waiting = Gauge("dmoe_waiting_requests", "Requests queued for a KV slot", registry=self.registry)
        self.kv_bytes = Gauge("dmoe_kv_cache_bytes_in_use", "KV-cache bytes held by running requests", registry=self.registry)
        self.kv_bytes_total = Gauge("dmoe_kv_cache_bytes_total", "KV-cache bytes allocated", registry=self.registry)
        self.routes = Counter("dmoe_route_decisions_total", "model=auto decisions by chosen adapter set", ["route"], registry=self.registry)
        self.route_latency = Histogram("dmoe_route_seconds", "Time to route one request", buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
                                       registry=self.registry)
        self.adapter_switches = Gauge("dmoe_adapter_switches", "Adapter-set changes on the llama.cpp context since start (0: torch)",
                                      registry=self.registry)
        self.loaded_experts = Gauge("dmoe_loaded_experts", "Experts resident in adapter slots", registry=self.registry)
        # dmoe cluster (the gateway): every retry and fallback, and where requests ran
        self.retries = Counter("dmoe_cluster_retries_total", "Calls retried on another replica, by expert and reason",
                               ["expert", "reason"], registry=self.registry)
        self.fallbacks = Counter("dmoe_cluster_fallbacks_total", "Requests that fell back to the next-ranked expert or the base",
                                 ["expert", "to"], registry=self.registry)
        self.replica_calls = Counter("dmoe_cluster_replica_calls_total", "Replica calls by replica and outcome",
                                     ["replica", "outcome"], registry=self.registry)
