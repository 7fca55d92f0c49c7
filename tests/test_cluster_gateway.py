"""The gateway's failover and aggregation logic against a scripted stand-in for the replica
deployment handle (no Ray): retries, exclusions, fallbacks, timeouts, lost objects, metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dmoe.base import BaseIdentity
from dmoe.cluster.aggregate import Candidate, normalise, vote, weighted
from dmoe.cluster.config import ClusterConfig
from dmoe.cluster.gateway import ClusterBackend, Registered
from dmoe.errors import ClusterError, RequestError
from dmoe.route import RouteDecision
from dmoe.runtime import ApiState, Job
from dmoe.serve.schemas import ChatRequest


def ok(replica: str, text: str = "fine", lp: float | None = None) -> dict:
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, "dmoe": {"experts": []}}
    if lp is not None:
        body["dmoe"]["mean_logprob"] = [lp]
    return {"body": body, "headers": {}, "replica": replica, "node": "n1"}


class Call:
    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def cancel(self):
        self.cancelled = True

    def __await__(self):
        return self._run().__await__()

    async def _run(self):
        if self.outcome == "hang":
            await asyncio.Event().wait()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class FakeHandle:
    """``handle.options(...).generate.remote(...)``: each call takes the next scripted outcome for its expert."""

    def __init__(self, script: dict[str, list]):
        self.script, self.calls = script, []
        self.model = ""

    def options(self, **kw):
        h = FakeHandle.__new__(FakeHandle)
        h.script, h.calls, h.model = self.script, self.calls, kw.get("multiplexed_model_id", "")
        return h

    @property
    def generate(self):
        return self

    def remote(self, payload, refs, known, routing=None, exclude=None):
        self.calls.append({"model": self.model, "exclude": list(exclude or []), "routing": routing})
        return Call(self.script[self.model or "base"].pop(0))


def backend(script, retries=1, timeout=5.0, **kw) -> tuple[ClusterBackend, FakeHandle, ApiState]:
    st = ApiState(base=BaseIdentity("tiny", "0" * 64), roots=[])
    handle = FakeHandle(script)
    b = ClusterBackend(st, handle, ClusterConfig.make(retries=retries, timeout_s=timeout, **kw))
    for name in ("alpha", "beta"):
        b.registry[name] = Registered(expert=None, ref=f"ref-{name}", fingerprint=f"fp-{name}", rank=4, size=1)  # type: ignore[arg-type]
    st.backend = b
    return b, handle, st


def job(model="alpha", decision=None, **dmoe) -> Job:
    body = ChatRequest.model_validate({"model": model, "messages": [{"role": "user", "content": "hi"}],
                                       **({"dmoe": dmoe} if dmoe else {})})
    adapters = decision.experts if decision is not None else ([(model, 1.0)] if model not in ("base", "auto") else [])
    return Job("chat", body, adapters, decision)


ROUTED = RouteDecision([("alpha", 1.0)], [("alpha", 0.6), ("beta", 0.3), ("none", 0.1)], 0.6, "alpha ranks first")


def run(coro):
    return asyncio.run(coro)


def test_a_dead_replica_is_retried_and_counted():
    b, h, st = backend({"alpha": [RuntimeError("actor died"), ok("r2")]})
    r = run(b.complete(job()))
    info = r.body["dmoe"]["cluster"]
    assert info["replica"] == "r2" and info["retries"] == 1 and info["fallbacks"] == []
    assert [c["model"] for c in h.calls] == ["alpha", "alpha"]
    assert st.metrics.retries.labels("alpha", "replica_error")._value.get() == 1


def test_a_full_replica_is_excluded_on_the_retry():
    full = {"error": {"type": "QueueFull", "message": "queue full"}, "replica": "r1", "node": "n"}
    b, h, _ = backend({"alpha": [full, ok("r2")]})
    r = run(b.complete(job()))
    assert r.body["dmoe"]["cluster"]["replica"] == "r2"
    assert h.calls[1]["exclude"] == ["r1"]


def test_a_hung_replica_times_out_and_is_cancelled():
    b, h, _ = backend({"alpha": ["hang", ok("r2")]}, timeout=0.05)
    r = run(b.complete(job()))
    assert r.body["dmoe"]["cluster"]["attempts"][0]["error"].startswith("timeout")


def test_a_routed_request_falls_back_to_the_next_ranked_expert_then_the_base():
    dead = RuntimeError("gone")
    b, h, st = backend({"alpha": [dead, dead], "beta": [dead, dead], "base": [ok("r3")]})
    r = run(b.complete(job("auto", ROUTED)))
    falls = r.body["dmoe"]["cluster"]["fallbacks"]
    assert [(f["from"], f["to"]) for f in falls] == [("alpha", "beta"), ("beta", "base")]
    assert [c["model"] for c in h.calls] == ["alpha", "alpha", "beta", "beta", ""]
    assert st.metrics.fallbacks.labels("alpha", "beta")._value.get() == 1


def test_a_request_that_named_its_expert_is_never_answered_by_another():
    dead = RuntimeError("gone")
    b, h, _ = backend({"alpha": [dead, dead], "beta": [ok("r9")]})
    with pytest.raises(ClusterError, match="no replica could serve alpha"):
        run(b.complete(job("alpha")))
    assert all(c["model"] == "alpha" for c in h.calls)


def test_a_client_error_from_a_replica_is_not_retried():
    bad = {"error": {"type": "RequestError", "message": "the prompt has 999 tokens"}, "replica": "r1", "node": "n"}
    b, h, _ = backend({"alpha": [bad, ok("r2")]})
    with pytest.raises(RequestError, match="999 tokens"):
        run(b.complete(job()))
    assert len(h.calls) == 1


def test_a_lost_object_is_put_again_from_the_folder(monkeypatch):
    lost = {"error": {"type": "ExpertFetchError", "message": "expert 'alpha': its files could not be fetched"},
            "replica": "r1", "node": "n"}
    b, h, _ = backend({"alpha": [lost, ok("r1")]})
    reputs = []
    monkeypatch.setattr(b, "_put", lambda e: reputs.append(e) or Registered(e, "ref-new", "fp-alpha", 4, 1))
    r = run(b.complete(job()))
    assert r.body["dmoe"]["cluster"]["replica"] == "r1" and len(reputs) == 1
    assert b.registry["alpha"].ref == "ref-new"


def test_fan_out_drops_a_failed_candidate_and_aggregates_the_rest():
    topk = RouteDecision([("alpha", 0.5), ("beta", 0.5)], [("alpha", 0.5), ("beta", 0.5)], 1.0, "top-2")
    b, _, _ = backend({"alpha": [RuntimeError("x"), RuntimeError("x")], "beta": [ok("r2", "42", -0.5)]}, routing="topk")
    r = run(b.complete(job("auto", topk, routing="topk", aggregate="weighted")))
    info = r.body["dmoe"]["cluster"]
    assert info["chosen"] == "beta" and [f["from"] for f in info["fallbacks"]] == ["alpha"]


# ------------------------------------------------------------------ the aggregators alone
def test_weighted_prefers_a_sure_expert_over_a_likelier_unsure_one():
    a = Candidate("alpha", 0.6, "x", -3.0)
    b = Candidate("beta", 0.4, "y", -0.5)
    assert weighted([a, b])[0] is b  # log .4 - .5 > log .6 - 3
    assert weighted([Candidate("alpha", 0.6, "x", -0.5), b])[0].expert == "alpha"


def test_vote_takes_the_majority_answer_and_breaks_ties_by_weight():
    c = [Candidate("a", 0.5, "The answer is 1,234.", -1), Candidate("b", 0.3, "so 1234", -1), Candidate("c", 0.2, "12", -1)]
    best, why = vote(c)
    assert best.expert == "a" and "2 of 3" in why
    c = [Candidate("a", 0.5, "7", -1), Candidate("b", 0.25, "8", -1), Candidate("c", 0.25, "8", -1)]
    assert vote(c)[0].expert == "b"  # two say 8, outvoting the likeliest expert
    c = [Candidate("a", 0.4, "7", -1), Candidate("b", 0.6, "8", -1)]
    best, why = vote(c)
    assert best.expert == "b" and "tie" in why


def test_normalise_compares_final_answers():
    assert normalise("So the total is 1,200.0") == normalise("1200") == "1200"
    assert normalise("  Paris!") == normalise("paris") == "paris"


def test_cluster_options_are_refused_by_a_single_server(make_state, tiny_experts, live_server):
    import httpx

    st = make_state(tiny_experts)
    with live_server(st) as srv:
        body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for opts, word in (({"routing": "latency"}, "cluster"), ({"routing": "topk", "aggregate": "vote"}, "cluster"),
                           ({"timeout_s": 3}, "failover")):
            r = httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "dmoe": opts}, timeout=30)
            assert r.status_code == 400 and word in r.json()["error"]["message"], r.text
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "dmoe": {"routing": "topk", "k": 2}}, timeout=30)
        assert r.status_code == 200


def test_the_serve_deploy_config_is_valid_for_ray(tmp_path: Path):
    pytest.importorskip("ray")
    from ray.serve.schema import ServeDeploySchema

    from dmoe.cluster.deploy import serve_config

    for ingress, proxy, prefix in (("gateway", "Disabled", None), ("ray", "HeadOnly", "/")):
        cfg = serve_config(ClusterConfig.make(experts_dir="examples/experts", min_replicas=1, max_replicas=3, port=8099,
                                              ingress=ingress))
        schema = ServeDeploySchema.model_validate(cfg)
        app = schema.applications[0]
        assert app.import_path == "dmoe.cluster.deploy:app_builder"
        assert app.deployments[0].autoscaling_config["max_replicas"] == 3
        assert str(schema.proxy_location.value if hasattr(schema.proxy_location, "value") else schema.proxy_location) == proxy
        assert app.route_prefix == prefix  # the gateway's own server takes HTTP: no route through Ray's proxy
        args = ClusterConfig.make(**app.args)  # the args are a valid ClusterConfig
        assert (args.ingress, args.port) == (ingress, 8099)


# ------------------------------------------------------------------ streams: failover only before the first token
def sse(content: str | None = None, finish: str | None = None) -> str:
    import json

    delta = {"content": content} if content is not None else {"role": "assistant", "content": ""}
    return f"data: {json.dumps({'id': 'x', 'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]})}\n\n"


class Gen:
    """A replica's streamed answer: scripted items, an exception raised where the script says."""

    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def cancel(self):
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


class StreamHandle(FakeHandle):
    def options(self, **kw):
        h = StreamHandle.__new__(StreamHandle)
        h.script, h.calls, h.model = self.script, self.calls, kw.get("multiplexed_model_id", "")
        return h

    @property
    def generate_stream(self):
        return self

    def remote(self, payload, refs, known, routing=None, exclude=None):
        self.calls.append({"model": self.model, "exclude": list(exclude or [])})
        return Gen(self.script[self.model or "base"].pop(0))


async def drain(reply) -> list[str]:
    return [line async for line in reply.stream]


def stream_backend(script):
    b, _, st = backend({})
    b.handle = StreamHandle(script)
    return b, b.handle, st


def test_a_stream_fails_over_before_its_first_token():
    head = {"replica": "r1", "node": "n", "headers": {}}
    died = [dict(head), sse(), RuntimeError("replica died")]  # role chunk sent, no token yet
    good = [dict(head, replica="r2"), sse(), sse("Hello"), sse(None, "stop"), "data: [DONE]\n\n"]
    b, h, _ = stream_backend({"alpha": [died, good]})
    body = ChatRequest.model_validate({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    reply = run(b.complete(Job("chat", body, [("alpha", 1.0)])))
    lines = run(drain(reply))
    assert reply.headers["X-DMoE-Replica"] == "r2" and len(h.calls) == 2
    assert any("Hello" in line for line in lines) and lines[-1] == "data: [DONE]\n\n"
    assert '"retries": 1' in lines[0]  # the first chunk says what happened


def test_a_stream_that_dies_after_its_first_token_ends_with_an_sse_error():
    head = {"replica": "r1", "node": "n", "headers": {}}
    b, h, _ = stream_backend({"alpha": [[head, sse(), sse("Hel"), RuntimeError("replica died")]]})
    body = ChatRequest.model_validate({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    lines = run(drain(run(b.complete(Job("chat", body, [("alpha", 1.0)])))))
    assert "Hel" in "".join(lines) and '"error"' in lines[-2] and lines[-1] == "data: [DONE]\n\n"
    assert len(h.calls) == 1  # no second replica: the client already has tokens
