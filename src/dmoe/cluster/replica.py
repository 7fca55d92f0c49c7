"""One replica of a dmoe cluster: a base model, one engine, and the experts it is asked for.

A replica is a Ray Serve deployment. It builds the same :class:`ServeState` and
:class:`LocalBackend` as ``dmoe serve`` (so a replica batches different experts together,
as the single server does) and runs the gateway's :class:`Job` s on it. Experts are
multiplexed (``@serve.multiplexed``, keyed by Ray's ``multiplexed_model_id``): the first
request for an expert fetches its files from the object store, checks them against the
fingerprint the gateway registered, and loads them into an adapter slot; Ray then prefers
this replica for that expert. Every call also carries the gateway's registry (name ->
fingerprint), so an expert unregistered or replaced at the gateway is unloaded or reloaded
here lazily, without a broadcast.

A replica reports ``record_routing_stats`` (an EWMA of its per-token latency, its queue)
for the ``latency`` request router, and ``check_health`` probes the engine's step loop.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from dmoe.cluster.config import ClusterConfig
from dmoe.cluster.store import unpack_expert
from dmoe.errors import DmoeError, ExpertFetchError
from dmoe.experts import check_base
from dmoe.runtime import Job, ServeConfig, build_state
from dmoe.serve.local import LocalBackend

log = logging.getLogger("dmoe.cluster.replica")
EWMA_ALPHA = 0.3


def remote_error(exc: DmoeError) -> dict:
    """A typed error as data, for the gateway to raise again (:func:`dmoe.cluster.gateway.raise_remote`)."""
    return {"type": type(exc).__name__, "message": str(exc)}


class _Held:
    """What the multiplex cache holds for one expert. Evicting it unloads the adapter, once, and
    only the load it stands for (a later reload of the same name has another token)."""

    def __init__(self, replica: ExpertReplica, name: str, token: int):
        self.replica, self.name, self.token = replica, name, token

    def __del__(self) -> None:
        if self.replica.tokens.get(self.name) == self.token:
            self.replica.drop(self.name)


class ExpertReplica:
    """The replica deployment's class (``dmoe.cluster.deploy`` wraps it in ``serve.deployment``)."""

    async def __init__(self, config: dict):
        import ray
        from ray import serve

        self.cfg = ClusterConfig.model_validate(config)
        c = self.cfg
        self.st = build_state(ServeConfig(base=c.base, engine=c.engine, device=c.device, dtype=c.dtype, max_batch=c.max_batch,
                                          max_seq=c.max_seq, max_loras=c.max_loras, max_rank=c.max_rank,
                                          max_queue=c.max_queue, use_router=False))
        delay = c.step_delay_s
        self.backend = LocalBackend(self.st, after_step=(lambda _n: time.sleep(delay)) if delay else None)
        self.dir = Path(tempfile.mkdtemp(prefix="dmoe-replica-"))
        self.held: dict[str, str] = {}  # expert -> fingerprint of the files loaded
        self.tokens: dict[str, int] = {}  # expert -> which load is resident (see _Held)
        self._loads = 0
        self.refs: dict[str, tuple[Any, str]] = {}  # expert -> (object ref, fingerprint), from the latest calls
        self.ewma: float | None = None  # seconds per generated token
        self.served = 0
        self.started = False
        ctx = serve.get_replica_context()
        self.id = ctx.replica_id.unique_id if ctx is not None else "local"
        self.node = ray.get_runtime_context().get_node_id()
        self.pid = __import__("os").getpid()

        async def load(name: str) -> _Held:  # a plain function: Ray's multiplexer keeps its cache on it
            if name not in self.held:
                await self._load(name)
            return _Held(self, name, self.tokens[name])

        self.get_model: Any = serve.multiplexed(max_num_models_per_replica=c.max_models_per_replica)(load)
        await self._start()
        await self._warm_up()
        log.info("replica %s on node %s: base %s", self.id, self.node[:8], self.st.base.short())

    async def _start(self) -> None:
        if not self.started:
            self.started = True
            await self.backend.start()

    async def _warm_up(self) -> None:
        """One token on the base before the replica takes traffic: the first request should not
        pay for the first forward pass (allocations, kernel selection)."""
        from dmoe.serve.schemas import CompletionRequest

        body = CompletionRequest.model_validate({"prompt": "Hello", "max_tokens": 1})
        await self.backend.complete(Job("text", body, []))

    # ---------------------------------------------------------------- experts
    async def _load(self, name: str) -> None:
        ref, want = self.refs.get(name, (None, ""))
        if ref is None:
            raise ExpertFetchError(f"expert '{name}': the gateway sent no object reference for it; register it again")
        try:
            blob = await ref
        except Exception as exc:  # ObjectLostError, OwnerDiedError, ObjectFreedError...: the store lost it
            raise ExpertFetchError(f"expert '{name}': its files could not be fetched from Ray's object store "
                                   f"({type(exc).__name__}); the gateway registers it again from its folder") from None
        expert = unpack_expert(blob, name, want, self.dir)
        check_base(expert, self.st.base)
        await self.backend.load_expert(expert)
        self.held[name] = want
        self._loads += 1
        self.tokens[name] = self._loads
        log.info("replica %s loaded expert %s (%s)", self.id, name, want[:12])

    def drop(self, name: str) -> None:
        """Unload an expert (evicted, or no longer registered); one in use stays until a later call."""
        if name in self.held:
            try:
                self.st.engine.unload_expert(name)
                del self.held[name]
                self.tokens.pop(name, None)
            except DmoeError as exc:
                log.info("replica %s keeps %s for now: %s", self.id, name, exc)

    async def _prepare(self, adapters: list[tuple[str, float]], refs: dict, known: dict[str, str]) -> None:
        """Follow the gateway's registry, then have every adapter of the job loaded."""
        for name in [n for n in self.held if n not in known]:
            self.drop(name)
        self.refs.update({n: (r, fp) for n, (r, fp) in refs.items()})
        for name, _ in adapters:
            want = self.refs.get(name, (None, ""))[1]
            if name in self.held and self.held[name] != want:  # replaced at the gateway: reload
                self.held.pop(name)
                await self._load(name)
            await self.get_model(name)
            if name not in self.held:  # the multiplexer had it cached, but it was dropped since
                await self._load(name)

    def _observe(self, seconds: float, tokens: int) -> None:
        per = seconds / max(tokens, 1)
        self.ewma = per if self.ewma is None else EWMA_ALPHA * per + (1 - EWMA_ALPHA) * self.ewma
        self.served += 1

    def _meta(self) -> dict:
        return {"replica": self.id, "node": self.node}

    # ---------------------------------------------------------------- requests
    async def generate(self, job: dict, refs: dict, known: dict[str, str], routing: str | None = None,
                       exclude: list[str] | None = None) -> dict:
        """Run one job to the end: {"body", "headers", "replica", "node"} or {"error", ...}.
        ``routing`` and ``exclude`` are read by the request router, not here."""
        await self._start()
        t0 = time.perf_counter()
        adapters = [(n, float(s)) for n, s in job["adapters"]]
        try:
            await self._prepare(adapters, refs, known)
            reply = await self.backend.complete(Job(job["kind"], job["body"], adapters), score=job.get("score", False))
        except DmoeError as exc:
            return {"error": remote_error(exc), **self._meta()}
        assert reply.body is not None
        self._observe(time.perf_counter() - t0, reply.body["usage"]["completion_tokens"])
        return {"body": reply.body, "headers": reply.headers, **self._meta()}

    async def generate_stream(self, job: dict, refs: dict, known: dict[str, str], routing: str | None = None,
                              exclude: list[str] | None = None) -> AsyncIterator[Any]:
        """The same job streamed: first {"replica", "node", "headers"} (or {"error"}), then SSE lines."""
        await self._start()
        t0 = time.perf_counter()
        adapters = [(n, float(s)) for n, s in job["adapters"]]
        try:
            await self._prepare(adapters, refs, known)
            reply = await self.backend.complete(Job(job["kind"], job["body"], adapters))
        except DmoeError as exc:
            yield {"error": remote_error(exc), **self._meta()}
            return
        assert reply.stream is not None
        yield {"headers": reply.headers, **self._meta()}
        chunks = 0
        async for line in reply.stream:
            chunks += 1
            yield line
        self._observe(time.perf_counter() - t0, max(chunks - 2, 1))

    async def inject(self, step_delay_s: float = 0.0, routing: str | None = None, exclude: list[str] | None = None) -> dict:
        """Fault injection (tests, ``bench/cluster.py``): pause this replica's engine after every step."""
        delay = float(step_delay_s)
        self.backend.after_step = (lambda _n: time.sleep(delay)) if delay > 0 else None
        if self.st.runner is not None:
            self.st.runner.after_step = self.backend.after_step
        return {**self._meta(), "step_delay_s": delay}

    # ---------------------------------------------------------------- Ray Serve hooks
    def record_routing_stats(self) -> dict:
        s = self.st.engine.stats()
        return {"ewma_token_s": self.ewma, "running": s.running, "waiting": s.waiting}

    async def check_health(self) -> None:
        runner = self.st.runner
        if self.started and (runner is None or not runner.alive):
            raise RuntimeError(f"replica {self.id}: the engine's step loop is not running ({runner and runner.error!r})")

    async def stats(self, routing: str | None = None, exclude: list[str] | None = None) -> dict:
        """What ``dmoe cluster status`` shows for this replica."""
        s = self.st.engine.stats()
        return {**self._meta(), "pid": self.pid, "experts": sorted(self.held), "running": s.running, "waiting": s.waiting,
                "ewma_token_ms": None if self.ewma is None else round(self.ewma * 1e3, 3), "served": self.served}

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "dir", "/nonexistent"), ignore_errors=True)
