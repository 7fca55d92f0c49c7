"""The gateway of a dmoe cluster: the same HTTP app as ``dmoe serve``, over replicas on Ray.

The gateway is a Ray Serve ingress deployment whose ASGI app is ``dmoe.serve.app.create_app``
over an :class:`ApiState` whose back-end is a :class:`ClusterBackend`. So the OpenAI and
llama-server routes, the field checks, the error table and the router are the single
server's; only where a :class:`Job` runs differs.

``ClusterBackend.complete`` does, per request:

* **strategy** (``dmoe.routing`` or the cluster's default): ``threshold``/``top1`` route as
  one server does; ``load`` takes, among the experts the router qualifies (top-k), the one
  with the fewest requests in flight, and Ray's router the least-queued replica; ``latency``
  hands the replica choice to :class:`dmoe.cluster.request_router.DmoeRequestRouter`,
  which ranks replicas by their reported per-token latency (EWMA), queue length breaking ties;
* **top-k fan-out** (``topk``): the k experts run in parallel and ``aggregate`` picks one
  reply (``weighted``, ``vote``), or one blended pass runs (``ensemble``);
* **failover**: each expert call has a timeout; a timeout or a replica failure is retried on
  another replica (the failed one excluded), up to ``retries`` times; then a routed request
  falls back to the next-ranked expert, then to the base. A request that named its expert
  is not answered by another expert: it gets a 503 once every replica failed. A stream
  fails over only before its first token; after that it ends with an SSE error event.

Every retry and fallback is counted in ``/metrics`` and written in the reply's ``dmoe.cluster``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NoReturn

from dmoe import errors as dmoe_errors
from dmoe.cluster.aggregate import AGGREGATORS, Candidate
from dmoe.cluster.config import ClusterConfig
from dmoe.cluster.store import pack_expert
from dmoe.config import ConfigError
from dmoe.errors import ClusterError, DmoeError, ExpertNotLoadedError
from dmoe.experts import Expert
from dmoe.metrics import Metrics
from dmoe.route import NONE, RouteDecision
from dmoe.runtime import ApiState, Job, Reply
from dmoe.serve.errors import error_body, status_of
from dmoe.serve.schemas import AGGREGATES, ROUTINGS

log = logging.getLogger("dmoe.cluster.gateway")
# another replica may serve it. AdapterInUseError: that replica is reloading the expert while its own
# requests use it (seen once in CI under a replica kill and a node removal); the client asked for no reload
RETRYABLE = ("QueueFull", "ShuttingDown", "EngineError", "ClusterError", "AdapterInUseError")


def raise_remote(err: dict) -> NoReturn:
    """Raise again a typed error a replica returned as data (an unknown type: ClusterError)."""
    cls = getattr(dmoe_errors, err.get("type", ""), None)
    if err.get("type") == "ConfigError":
        cls = ConfigError
    if not (isinstance(cls, type) and issubclass(cls, DmoeError)):
        cls = ClusterError
    raise cls(err.get("message", "a replica failed"))


@dataclass
class Registered:
    """An expert the cluster serves: its card (read on the gateway's node) and its files in the object store."""

    expert: Expert
    ref: Any  # ray.ObjectRef of its ExpertBlob
    fingerprint: str
    rank: int
    size: int


class _Failed(Exception):
    """One replica call failed in a way another replica (or expert) may not."""

    def __init__(self, reason: str, replica: str | None = None):
        super().__init__(reason)
        self.reason, self.replica = reason, replica


class ClusterBackend:
    """:class:`dmoe.runtime.Backend` over a Ray Serve deployment of :class:`ExpertReplica` s."""

    routings = ROUTINGS
    aggregates = AGGREGATES
    timeouts = True

    def __init__(self, st: ApiState, handle: Any, cfg: ClusterConfig):
        self.st, self.handle, self.cfg = st, handle, cfg
        self.registry: dict[str, Registered] = {}
        self.inflight: Counter[str] = Counter()  # requests in flight at the gateway, per expert ("" = base)
        self.replicas: dict[str, dict] = {}  # replica -> what the gateway has seen of it

    # ---------------------------------------------------------------- the registry
    def names(self) -> dict[str, str]:
        return {n: str(r.expert.path) for n, r in self.registry.items()}

    def expert_info(self) -> dict[str, dict]:
        return {n: {"path": str(r.expert.path), "slot": None, "rank": r.rank} for n, r in self.registry.items()}

    def _put(self, expert: Expert) -> Registered:
        import ray

        blob = pack_expert(expert)
        rank = int(expert.adapter_config().get("r", 0))
        return Registered(expert, ray.put(blob), blob.fingerprint, rank, blob.size)

    async def load_expert(self, expert: Expert) -> dict:
        """Register (or replace) an expert cluster-wide: its files go to the object store once;
        replicas load it on their first request for it."""
        reg = await asyncio.to_thread(self._put, expert)
        self.registry[expert.name] = reg
        log.info("registered expert %s (%d bytes, %s)", expert.name, reg.size, reg.fingerprint[:12])
        return {"name": expert.name, "slot": None, "rank": reg.rank, "path": str(expert.path)}

    async def unload_expert(self, name: str) -> None:
        if name not in self.registry:
            raise ExpertNotLoadedError(f"expert '{name}' is not registered; registered: {', '.join(sorted(self.registry)) or 'none'}")
        del self.registry[name]  # replicas drop it on their next call (the registry travels with every call)

    def health(self) -> dict:
        return {"ok": True, "status": "ok", "running": sum(self.inflight.values()), "waiting": 0}

    def update_gauges(self, m: Metrics) -> None:
        m.loaded_experts.set(len(self.registry))
        m.batch_size.set(sum(self.inflight.values()))

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    # ---------------------------------------------------------------- one call to one replica
    def _job(self, job: Job, adapters: list[tuple[str, float]], score: bool, stream: bool = False) -> dict:
        body = job.body.model_dump(exclude={"dmoe", "stream", "stream_options"} if not stream else {"dmoe"}, exclude_unset=True)
        return {"kind": job.kind, "body": body, "adapters": adapters, "score": score}

    def _handle(self, adapters: list[tuple[str, float]], stream: bool = False):
        opts: dict[str, Any] = {"stream": stream}
        if adapters:
            opts["multiplexed_model_id"] = adapters[0][0]
        return self.handle.options(**opts)

    def _refs(self, adapters: list[tuple[str, float]]) -> dict:
        out = {}
        for name, _ in adapters:
            reg = self.registry.get(name)
            if reg is None:
                raise dmoe_errors.UnknownExpertError(f"expert '{name}' is no longer registered")
            out[name] = (reg.ref, reg.fingerprint)
        return out

    def _known(self) -> dict[str, str]:
        return {n: r.fingerprint for n, r in self.registry.items()}

    def _seen(self, meta: dict, outcome: str) -> None:
        rid = meta.get("replica")
        if rid:
            r = self.replicas.setdefault(rid, {"replica": rid, "calls": 0, "failures": 0})
            r.update(node=meta.get("node"), last_seen=time.time())
            r["calls" if outcome == "ok" else "failures"] += 1
            self.st.metrics.replica_calls.labels(rid, outcome).inc()

    async def _refresh(self, name: str) -> None:
        """The object store lost an expert's files: put them again from its folder (nothing is lost)."""
        reg = self.registry.get(name)
        if reg is not None:
            self.registry[name] = await asyncio.to_thread(self._put, reg.expert)
            log.warning("expert %s: its files were lost from the object store; registered again", name)

    async def _replica_refused(self, out: dict, adapters: list[tuple[str, float]], exclude: list[str]) -> str:
        """A replica answered with an error: put a lost expert again, or exclude that replica for a
        retry, and say why; an error that is the request's own is raised (no retry)."""
        err = out["error"]
        self._seen(out, "error")
        if err["type"] == "ExpertFetchError":
            await self._refresh(self._failed_expert(adapters, err["message"]))
            return "fetch_error: " + err["message"]
        if err["type"] in RETRYABLE:
            exclude.append(out["replica"])
            return f"{err['type']}: {err['message']}"
        raise_remote(err)

    def _failed_expert(self, adapters: list[tuple[str, float]], message: str) -> str:
        for name, _ in adapters:
            if f"'{name}'" in message:
                return name
        return adapters[0][0] if adapters else ""

    async def call(self, job: Job, adapters: list[tuple[str, float]], routing: str, timeout: float, trail: list,
                   score: bool = False) -> dict:
        """One expert (or blend) on one replica, retried on others: the replica's result."""
        payload = self._job(job, adapters, score)
        exclude: list[str] = []
        label = "+".join(n for n, _ in adapters) or "base"
        last = "no attempt"
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                self.st.metrics.retries.labels(label, last.split(":")[0]).inc()
            t0 = time.perf_counter()
            resp = self._handle(adapters).generate.remote(payload, self._refs(adapters), self._known(),
                                                          routing=routing, exclude=exclude)
            try:
                out = await asyncio.wait_for(resp, timeout)
            except asyncio.TimeoutError:
                resp.cancel()
                last = f"timeout: no reply within {timeout:g} s"
                trail.append({"expert": label, "attempt": attempt, "error": last})
                continue
            except asyncio.CancelledError:
                resp.cancel()
                raise
            except Exception as exc:  # the replica died or Ray could not reach it
                last = f"replica_error: {type(exc).__name__}"
                trail.append({"expert": label, "attempt": attempt, "error": last})
                continue
            if "error" in out:
                last = await self._replica_refused(out, adapters, exclude)
                trail.append({"expert": label, "attempt": attempt, "replica": out.get("replica"), "error": last})
                continue
            self._seen(out, "ok")
            trail.append({"expert": label, "attempt": attempt, "replica": out["replica"], "node": out["node"],
                          "ms": round((time.perf_counter() - t0) * 1e3, 1)})
            return out
        raise _Failed(last)

    # ---------------------------------------------------------------- a whole request
    def _options(self, job: Job) -> tuple[str, str, float, int]:
        o = job.body.dmoe
        routing = (o.routing if o and o.routing else self.cfg.routing)
        aggregate = (o.aggregate if o and o.aggregate else self.cfg.aggregate)
        timeout = (o.timeout_s if o and o.timeout_s else self.cfg.timeout_s)
        k = (o.k if o and o.k else self.cfg.k)
        return routing, aggregate, timeout, k

    def _chain(self, job: Job, first: list[tuple[str, float]]) -> list[list[tuple[str, float]]]:
        """What a request may run with, in order: its adapters; for a routed request, then each
        next-ranked expert and the base."""
        chain = [first]
        d: RouteDecision | None = job.decision
        if d is None:
            return chain
        tried = {n for n, _ in first}
        for name, _p in d.scores:
            if name != NONE and name not in tried and name in self.registry:
                chain.append([(name, 1.0)])
                tried.add(name)
        if first:
            chain.append([])
        return chain

    def _pick(self, job: Job, routing: str) -> list[tuple[str, float]]:
        """The adapters a request runs with first, under ``routing``."""
        d: RouteDecision | None = job.decision
        if d is None or not d.experts:
            return job.adapters
        if routing == "load":  # the qualifying expert with the fewest requests in flight; ties: the likelier
            p = dict(d.scores)
            name = min((n for n, _ in d.experts), key=lambda n: (self.inflight[n], -p.get(n, 0.0)))
            return [(name, 1.0)]
        if routing in ("latency",):
            return [d.experts[0]]
        return job.adapters

    async def complete(self, job: Job) -> Reply:
        routing, aggregate, timeout, k = self._options(job)
        d: RouteDecision | None = job.decision
        fan_out = d is not None and routing == "topk" and len(d.experts) > 1 and aggregate != "ensemble"
        first = self._pick(job, routing)
        if job.body.stream and not fan_out:
            return await self._stream(job, first, routing, timeout)
        trail: list = []
        fallbacks: list = []
        names = [n for n, _ in (d.experts if fan_out and d else first)] or [""]
        self.inflight.update(names)
        try:
            if fan_out:
                assert d is not None
                out, info = await self._fan_out(job, d, aggregate, routing, timeout, trail, fallbacks)
            else:
                out, info = await self._with_fallback(job, first, routing, timeout, trail, fallbacks), {}
        finally:
            self.inflight.subtract(names)
        body = out["body"]
        body["dmoe"] = self._info(job, body.get("dmoe", {}), out, routing, trail, fallbacks, info)
        if job.body.stream:  # a fan-out streamed: the chosen reply, as chunks
            return Reply(stream=_as_sse(body, job.kind), headers=self._headers(job, body))
        return Reply(body=body, headers=self._headers(job, body))

    async def _with_fallback(self, job: Job, first, routing: str, timeout: float, trail: list, fallbacks: list,
                             score: bool = False) -> dict:
        chain = self._chain(job, first)
        for i, adapters in enumerate(chain):
            try:
                return await self.call(job, adapters, routing, timeout, trail, score=score)
            except _Failed as exc:
                if i + 1 < len(chain):
                    frm = "+".join(n for n, _ in adapters) or "base"
                    to = "+".join(n for n, _ in chain[i + 1]) or "base"
                    self.st.metrics.fallbacks.labels(frm, to).inc()
                    fallbacks.append({"from": frm, "to": to, "reason": exc.reason})
                    continue
                raise ClusterError(f"no replica could serve {'+'.join(n for n, _ in adapters) or 'the base'} "
                                   f"({exc.reason}); {len(trail)} attempts, see dmoe cluster status") from None
        raise ClusterError("nothing to run")  # (a chain always has its first entry)

    async def _fan_out(self, job: Job, d: RouteDecision, aggregate: str, routing: str, timeout: float, trail: list,
                       fallbacks: list) -> tuple[dict, dict]:
        """The k experts in parallel, then one reply chosen by ``aggregate``."""
        p = dict(d.scores)
        names = [n for n, _ in d.experts]
        outs = await asyncio.gather(*(self.call(job, [(n, 1.0)], routing, timeout, trail, score=True) for n in names),
                                    return_exceptions=True)
        cands = []
        for name, out in zip(names, outs):
            if isinstance(out, BaseException):
                if not isinstance(out, _Failed):
                    raise out
                fallbacks.append({"from": name, "to": "(dropped from the vote)", "reason": out.reason})
                continue
            body = out["body"]
            choice = body["choices"][0]
            text = choice["message"]["content"] if job.kind == "chat" else choice["text"]
            lp = (body.get("dmoe", {}).get("mean_logprob") or [None])[0]
            cands.append(Candidate(name, p.get(name, 0.0), text, lp, out))
        if not cands:  # every candidate failed: the base answers
            self.st.metrics.fallbacks.labels("+".join(names), "base").inc()
            fallbacks.append({"from": "+".join(names), "to": "base", "reason": "every top-k expert failed"})
            out = await self._with_fallback(job, [], routing, timeout, trail, fallbacks)
            return out, {"aggregate": aggregate, "candidates": [], "why": "every top-k expert failed: the base answered"}
        chosen, why = AGGREGATORS[aggregate](cands)
        info = {"aggregate": aggregate, "chosen": chosen.expert, "why": why, "candidates": [
            {"expert": c.expert, "p": round(c.p, 4), "mean_logprob": None if c.mean_logprob is None else round(c.mean_logprob, 4),
             "text": c.text, "replica": c.result.get("replica")} for c in cands],
            "total_completion_tokens": sum(c.result["body"]["usage"]["completion_tokens"] for c in cands)}
        body = chosen.result["body"]
        body["dmoe"].pop("mean_logprob", None)
        body["dmoe"]["experts"] = [{"name": chosen.expert, "scale": 1.0}]
        return chosen.result, info

    def _info(self, job: Job, info: dict, out: dict, routing: str, trail: list, fallbacks: list, extra: dict) -> dict:
        info = dict(info)
        info.pop("mean_logprob", None)
        if job.decision is not None:
            info["route"] = job.decision.to_dict()
        info["cluster"] = {"routing": routing, "replica": out.get("replica"), "node": out.get("node"),
                           "retries": sum(1 for t in trail if "error" in t), "fallbacks": fallbacks, "attempts": trail, **extra}
        return info

    def _headers(self, job: Job, body: dict) -> dict[str, str]:
        h = {"X-DMoE-Experts": "+".join(e["name"] for e in body.get("dmoe", {}).get("experts", [])) or "base",
             "X-DMoE-Replica": str(body.get("dmoe", {}).get("cluster", {}).get("replica"))}
        if job.decision is not None:
            h["X-DMoE-Route"] = job.decision.header()
        return h

    # ---------------------------------------------------------------- streaming
    async def _stream(self, job: Job, first, routing: str, timeout: float) -> Reply:
        """Fail over until a replica has produced its first token; the stream is then relayed."""
        trail: list = []
        fallbacks: list = []
        chain = self._chain(job, first)
        for i, adapters in enumerate(chain):
            payload = self._job(job, adapters, False, stream=True)
            exclude: list[str] = []
            label = "+".join(n for n, _ in adapters) or "base"
            for attempt in range(self.cfg.retries + 1):
                gen = self._handle(adapters, stream=True).generate_stream.remote(
                    payload, self._refs(adapters), self._known(), routing=routing, exclude=exclude)
                try:
                    head, buffered, done = await asyncio.wait_for(_until_first_token(gen), timeout)
                except asyncio.CancelledError:
                    gen.cancel()
                    raise
                except Exception as exc:  # a timeout, or the replica died before its first token
                    gen.cancel()
                    why = "timeout" if isinstance(exc, asyncio.TimeoutError) else f"replica_error: {type(exc).__name__}"
                    trail.append({"expert": label, "attempt": attempt, "error": why})
                    self.st.metrics.retries.labels(label, why.split(":")[0]).inc()
                    continue
                if "error" in head:
                    why = await self._replica_refused(head, adapters, exclude)
                    trail.append({"expert": label, "attempt": attempt, "replica": head.get("replica"), "error": why})
                    self.st.metrics.retries.labels(label, head["error"]["type"]).inc()
                    continue
                self._seen(head, "ok")
                trail.append({"expert": label, "attempt": attempt, "replica": head["replica"], "node": head["node"]})
                cluster = {"routing": routing, "replica": head["replica"], "node": head["node"],
                           "retries": sum(1 for t in trail if "error" in t), "fallbacks": fallbacks, "attempts": trail}
                headers = {**head.get("headers", {}), "X-DMoE-Replica": head["replica"]}
                if job.decision is not None:
                    headers["X-DMoE-Route"] = job.decision.header()
                return Reply(stream=self._relay(gen, buffered, done, cluster, job), headers=headers)
            if i + 1 < len(chain):
                to = "+".join(n for n, _ in chain[i + 1]) or "base"
                self.st.metrics.fallbacks.labels(label, to).inc()
                fallbacks.append({"from": label, "to": to, "reason": trail[-1].get("error") if trail else ""})
        raise ClusterError(f"no replica could stream {'+'.join(n for n, _ in first) or 'the base'}; "
                           f"{len(trail)} attempts, see dmoe cluster status")

    async def _relay(self, gen, buffered: list[str], done: bool, cluster: dict, job: Job) -> AsyncIterator[str]:
        first = True
        for line in buffered:
            if first:
                line, first = _with_info(line, cluster, job), False
            yield line
        if done:
            return
        try:
            async for line in gen:
                yield line
        except asyncio.CancelledError:
            gen.cancel()
            raise
        except Exception as exc:  # the replica died mid-stream: a clean SSE error, never a cut connection
            err = ClusterError(f"the replica serving this stream failed after its first token ({type(exc).__name__}); "
                               "retry the request")
            status, code = status_of(err)
            self.st.metrics.replica_calls.labels(cluster["replica"], "died_streaming").inc()
            yield f"data: {json.dumps(error_body(str(err), status, code))}\n\n"
            yield "data: [DONE]\n\n"


async def _until_first_token(gen) -> tuple[dict, list[str], bool]:
    """(the replica's head, the SSE lines up to and including the first with content, whether the stream ended)."""
    head = await gen.__anext__()
    if "error" in head:
        return head, [], True
    lines: list[str] = []
    async for line in gen:
        lines.append(line)
        if line.startswith("data: [DONE]"):
            return head, lines, True
        try:
            obj = json.loads(line[6:])
        except ValueError:
            continue
        if "error" in obj:
            return head, lines, False
        for c in obj.get("choices", []):
            if (c.get("delta") or {}).get("content") or c.get("text") or c.get("finish_reason"):
                return head, lines, False
    return head, lines, True


def _with_info(line: str, cluster: dict, job: Job) -> str:
    """The first chunk carries the gateway's ``dmoe`` info (route, replica, failover)."""
    try:
        obj = json.loads(line[6:])
    except ValueError:
        return line
    info = obj.setdefault("dmoe", {})
    if job.decision is not None:
        info["route"] = job.decision.to_dict()
    info["cluster"] = cluster
    return f"data: {json.dumps(obj)}\n\n"


async def _as_sse(body: dict, kind: str) -> AsyncIterator[str]:
    """A finished reply as SSE chunks (a streamed top-k fan-out: the replies must be complete
    before one is chosen): the role chunk with the ``dmoe`` info, the text, the finish."""
    head = {k: body[k] for k in ("id", "created", "model")}
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    for choice in body["choices"]:
        i = choice["index"]
        if kind == "chat":
            text = choice["message"]["content"]
            yield f"data: {json.dumps({**head, 'object': obj, 'choices': [{'index': i, 'delta': {'role': 'assistant', 'content': ''}, 'logprobs': None, 'finish_reason': None}], 'dmoe': body['dmoe']})}\n\n"
            yield f"data: {json.dumps({**head, 'object': obj, 'choices': [{'index': i, 'delta': {'content': text}, 'logprobs': None, 'finish_reason': None}]})}\n\n"
            yield f"data: {json.dumps({**head, 'object': obj, 'choices': [{'index': i, 'delta': {}, 'logprobs': None, 'finish_reason': choice['finish_reason']}], 'usage': body['usage']})}\n\n"
        else:
            yield f"data: {json.dumps({**head, 'object': obj, 'choices': [{'index': i, 'text': choice['text'], 'logprobs': None, 'finish_reason': choice['finish_reason']}], 'usage': body['usage'], 'dmoe': body['dmoe']})}\n\n"
    yield "data: [DONE]\n\n"
