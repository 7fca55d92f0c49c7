"""The replica choice, as a Ray Serve custom request router (not a second scheduler beside Ray's).

Ray Serve calls :meth:`DmoeRequestRouter.choose_replicas` for each call the gateway makes
to the replica deployment; the call's keyword arguments say how to choose:

* ``exclude``: replicas that already failed this request (a retry goes elsewhere), unless
  no other is left;
* ``routing="latency"``: replicas ranked by the EWMA of their per-token latency, which each
  replica reports in ``record_routing_stats``; a replica that has not reported yet ranks
  with the best (so it gets traffic and a measurement); Ray's queue-length probe breaks ties
  within a rank, and a full replica passes the request to the next rank;
* otherwise (``load`` and the router's own strategies): Ray's multiplex preference (replicas
  that hold the expert), then every candidate in one rank, so Ray's probe takes the least
  queued of them (rather than power-of-two sampling).
"""

from __future__ import annotations

import math

from ray.serve.request_router import FIFOMixin, LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

LATENCY_BAND = 1.25  # replicas within 25% of the fastest share its rank


def latency_ranks(replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
    """Replicas in ranks by reported per-token latency (unmeasured ones with the fastest)."""
    def ewma(r: RunningReplica) -> float | None:
        v = (r.routing_stats or {}).get("ewma_token_s")
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    values = [ewma(r) for r in replicas]
    measured = sorted((v, i) for i, v in enumerate(values) if v is not None)
    fresh = [r for r, v in zip(replicas, values) if v is None]
    if not measured:
        return [fresh] if fresh else []
    best = measured[0][0]
    ranks: list[list[RunningReplica]] = [fresh + [replicas[i] for v, i in measured if v <= best * LATENCY_BAND]]
    ranks += [[replicas[i]] for v, i in measured if v > best * LATENCY_BAND]
    return ranks


class DmoeRequestRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        exclude = set(kwargs.get("exclude") or ())
        pool = [r for r in candidate_replicas if r.replica_id.unique_id not in exclude] or list(candidate_replicas)
        if kwargs.get("routing") == "latency":
            return latency_ranks(pool)
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            holding = self.apply_multiplex_routing(pending_request=pending_request)
            preferred = [r for r in pool if r.replica_id in holding]
            rest = [r for r in pool if r.replica_id not in holding]
            if preferred:
                return [preferred, rest] if rest else [preferred]
        return [pool]
