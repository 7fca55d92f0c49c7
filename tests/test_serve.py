"""The HTTP server on the tiny model: OpenAI + llama-server APIs, admin, bad input.

A live uvicorn server on 127.0.0.1 (a free port) serves the tiny random Llama with
three small experts; the official ``openai`` client and curl talk to it. The
module-scoped server is only read; tests that load, unload or change defaults get
their own server. Mid-flight events fire from a hook after N engine steps."""

import asyncio
import json
import shutil
import subprocess
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import StepHook, hand_copy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def roots(tmp_path_factory, tiny_experts):
    """experts/ (loaded at start: alpha, beta) and spare/ (another allowed root)."""
    top = tmp_path_factory.mktemp("serve")
    (top / "experts").mkdir()
    (top / "spare").mkdir()
    for name in ("alpha", "beta"):
        shutil.copytree(tiny_experts / name, top / "experts" / name)
    shutil.copytree(tiny_experts / "gamma", top / "spare" / "gamma")
    return top


@pytest.fixture(scope="module")
def server(tiny_base, roots):
    """Read-only: no test changes its experts, defaults or router."""
    from dmoe.runtime import ServeConfig, build_state
    from dmoe.serve.http import ThreadedServer

    st = build_state(ServeConfig.make(base=str(tiny_base), experts_dir=roots / "experts", roots=[roots / "spare"],
                                      max_batch=4, max_seq=96, max_loras=4, max_rank=8, max_queue=64))
    with ThreadedServer(st) as srv:
        yield srv


@pytest.fixture
def own_server(make_state, live_server, roots):
    """A fresh server a test may change (load, unload, defaults, router)."""
    servers = []

    def make(after_step=None, extra_roots=(), **kw):
        st = make_state(roots / "experts", roots=[roots / "spare", *extra_roots], max_seq=96, **kw)
        srv = live_server(st, after_step=after_step)
        servers.append(srv)
        return srv.__enter__()

    yield make
    for srv in servers:
        srv.__exit__(None, None, None)


def chat(url, content="hello there", **kw):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "return_token_ids": True, **kw}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def ids(url, content="hello there", **kw) -> list[int]:
    """Greedy completion token ids: the random tiny model's text is often special tokens and blanks."""
    r = chat(url, content, **kw)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_models_and_lora_adapters_listing(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["base", "alpha", "beta", "auto"]
    adapters = httpx.get(f"{server.url}/lora-adapters").json()
    assert [(a["id"], a["scale"]) for a in adapters] == [(0, 0.0), (1, 0.0)]
    assert adapters[0]["path"].endswith("alpha")


def test_openai_client_streaming_and_not(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    full = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=0)
    assert full.usage.completion_tokens == 10 and full.choices[0].finish_reason == "length"
    pieces = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=10,
                                            temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert streamed == full.choices[0].message.content
    comp = client.completions.create(model="base", prompt="The capital of", max_tokens=5, temperature=0)
    assert comp.usage.completion_tokens == 5 and comp.usage.prompt_tokens > 0


def test_model_field_per_request_lora_and_blend_differ_and_match(server):
    base = ids(server.url, model="base")
    alpha = ids(server.url, model="alpha")
    by_id = ids(server.url, lora=[{"id": 0, "scale": 1.0}])
    blend = chat(server.url, experts=[{"name": "alpha", "scale": 0.5}, {"name": "beta", "scale": 0.5}])
    assert alpha == by_id and alpha != base
    assert blend.headers["X-DMoE-Experts"] == "alpha*0.5+beta*0.5"
    assert blend.json()["dmoe"]["experts"] == [{"name": "alpha", "scale": 0.5}, {"name": "beta", "scale": 0.5}]


def test_seed_curl_commands_work_verbatim(own_server):
    server = own_server()
    port = server.port
    base = ids(server.url)
    # the seed README's llama-server commands, with the port of this test server
    for scale in ("1.0", "0.5", "0.0"):
        out = subprocess.run(["curl", "-s", "-X", "POST", f"localhost:{port}/lora-adapters", "-d", f'[{{"id": 0, "scale": {scale}}}]'],
                             capture_output=True, text=True, timeout=30)
        assert json.loads(out.stdout) == {"success": True}  # llama-server's answer
        assert httpx.get(f"{server.url}/lora-adapters").json()[0]["scale"] == float(scale)
        if scale == "1.0":
            on = chat(server.url).json()
            assert on["dmoe"]["experts"] == [{"name": "alpha", "scale": 1.0}]
            assert on["choices"][0]["token_ids"] == ids(server.url, model="alpha")
    assert ids(server.url) == base
    # and the README's plain `curl -d` chat request (no JSON content type) works too
    out = subprocess.run(["curl", "-s", f"localhost:{port}/v1/chat/completions", "-d",
                          '{"model": "beta", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}'],
                         capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout)["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("payload, status, words", [
    ('{"messages": [', 400, "malformed JSON"),
    ('{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "available: base, alpha, beta"),
    ('{"messages": [{"role": "user", "content": "x"}], "experts": [{"name": "alpha", "scale": NaN}]}', 400, "finite"),
    ('{"messages": [{"role": "user", "content": "x"}], "lora": [{"id": 0, "scale": Infinity}]}', 400, "finite"),
    ('{"messages": [{"role": "user", "content": "x"}], "lora": [{"id": 9, "scale": 1}]}', 404, "unknown lora id 9"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}', 400, "exceeds the context"),
    ('{"messages": [{"role": "user", "content": "' + "word " * 200 + '"}]}', 400, "context"),
    ('{"messages": []}', 400, "messages is empty"),
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', 400, "temperature"),
    ('{"prompt": ""}', 400, "prompt"),
])
def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(server, payload, status, words):
    path = "/v1/completions" if '"prompt"' in payload else "/v1/chat/completions"
    r = httpx.post(server.url + path, content=payload, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert chat(server.url).status_code == 200


def test_admin_load_unload_and_refusals(own_server, roots, tmp_path):
    bad = tmp_path / "bad"  # this test's own root for broken experts; the shared roots stay as they are
    bad.mkdir()
    server = own_server(extra_roots=[bad])
    url = server.url
    r = httpx.post(f"{url}/v1/experts", json={"path": str(roots / "spare" / "gamma")}, timeout=60)
    assert r.status_code == 200, r.text
    assert "gamma" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert chat(url, model="gamma").status_code == 200
    # outside the roots, through .. as well
    outside = tmp_path / "evil"
    shutil.copytree(roots / "spare" / "gamma", outside)
    for p in (str(outside), str(roots / "spare" / ".." / ".." / outside.parent.name / "evil")):
        r = httpx.post(f"{url}/v1/experts", json={"path": p})
        assert r.status_code == 403 and "outside the expert roots" in r.json()["error"]["message"]
    before = ids(url, model="beta")
    # corrupt, pickled, wrong-shape and wrong-base adapters under an allowed root: refused, nothing changes
    cases = {}
    for name in ("corrupt", "pickled", "wide", "otherbase"):
        d = bad / name
        hand_copy(roots / "spare" / "gamma", d)
        (d / "expert.yaml").write_text((d / "expert.yaml").read_text().replace("name: gamma", f"name: {name}"))
        cases[name] = d
    (cases["corrupt"] / "adapter_model.safetensors").write_bytes(b"\x00not safetensors")
    (cases["pickled"] / "adapter_model.safetensors").unlink()
    (cases["pickled"] / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    w = load_file(str(cases["wide"] / "adapter_model.safetensors"))
    save_file({k: torch.cat([v, v], -1) if "lora_A" in k else v for k, v in w.items()}, str(cases["wide"] / "adapter_model.safetensors"))
    card = cases["otherbase"] / "expert.yaml"
    card.write_text(card.read_text().replace("sha256: ", "sha256: 00"))
    for name, words in (("corrupt", "not a valid safetensors"), ("pickled", "safetensors only"),
                        ("wide", "built for another base"), ("otherbase", "trained on base")):
        r = httpx.post(f"{url}/v1/experts", json={"path": str(cases[name])})
        assert r.status_code == 400 and words in r.json()["error"]["message"], (name, r.text)
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["base", "alpha", "beta", "gamma", "auto"]
    assert ids(url, model="beta") == before
    r = httpx.delete(f"{url}/v1/experts/gamma")
    assert r.status_code == 200
    r = chat(url, model="gamma")
    assert r.status_code == 404 and "unknown model 'gamma'" in r.json()["error"]["message"]
    assert httpx.delete(f"{url}/v1/experts/gamma").status_code == 404


def test_api_key_guards_admin_only(make_state, live_server, roots):
    st = make_state(roots / "experts", api_key="s3cret", max_batch=2, max_seq=64, max_loras=2)
    with live_server(st) as srv:
        assert httpx.delete(f"{srv.url}/v1/experts/alpha").status_code == 401
        assert httpx.post(f"{srv.url}/lora-adapters", json=[{"id": 0, "scale": 1}]).status_code == 401
        assert chat(srv.url, model="alpha").status_code == 200  # generation needs no key
        ok = httpx.post(f"{srv.url}/lora-adapters", json=[{"id": 0, "scale": 1}], headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_disconnect_mid_stream_frees_the_slot(server):
    body = {"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 80, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                break
    deadline = time.monotonic() + 30  # the disconnect reaches the engine within a few steps
    while httpx.get(f"{server.url}/health").json()["running"] and time.monotonic() < deadline:
        pass
    assert httpx.get(f"{server.url}/health").json()["running"] == 0
    assert chat(server.url).status_code == 200


def test_over_budget_requests_queue_then_429(make_state, live_server, roots):
    st = make_state(roots / "experts", max_batch=1, max_seq=96, max_loras=2, max_queue=2)
    with live_server(st) as srv:
        async def burst():
            async with httpx.AsyncClient(timeout=120) as c:
                body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 60}
                return await asyncio.gather(*[c.post(f"{srv.url}/v1/chat/completions", json=body) for _ in range(8)])

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        # 1 running + at most 2 queued are served; the rest are refused at once
        assert 200 in codes and codes.count(429) >= 8 - 3 - 1, codes
        assert set(codes) <= {200, 429}
        assert "limit 2" in next(r for r in responses if r.status_code == 429).json()["error"]["message"]


def test_concurrent_mixed_load_equals_each_request_alone(make_state, live_server, roots):
    """32 concurrent greedy requests over base, 3 experts and a blend, while a global
    /lora-adapters change and an expert reload happen mid-way (after 3 engine steps)."""
    events: list[int] = []
    mid = threading.Event()
    st = make_state(roots / "experts", roots=[roots / "spare"], max_seq=96)
    hook = StepHook(10**9, mid.set)  # armed below, once the reference runs are done
    with live_server(st, after_step=hook) as srv:
        url = srv.url
        httpx.post(f"{url}/v1/experts", json={"path": str(roots / "spare" / "gamma")}, timeout=60).raise_for_status()
        sets = [{"model": "base"}, {"model": "alpha"}, {"model": "beta"}, {"model": "gamma"},
                {"experts": [{"name": "alpha", "scale": 0.5}, {"name": "gamma", "scale": 0.5}]}, {"lora": [{"id": 1, "scale": 1.0}]}]
        jobs = [(f"question {i} about things", sets[i % len(sets)]) for i in range(32)]

        def body(q, s):
            return {"messages": [{"role": "user", "content": q}], "max_tokens": 12, "return_token_ids": True, **s}

        alone = [ids(url, q, max_tokens=12, **s) for q, s in jobs]
        hook.n = st.runner.steps + 3  # 3 steps into the concurrent load

        async def together():
            async with httpx.AsyncClient(timeout=300) as c:
                tasks = [asyncio.create_task(c.post(f"{url}/v1/chat/completions", json=body(q, s))) for q, s in jobs]
                assert await asyncio.to_thread(mid.wait, 60), "the engine never reached step 3"
                events.append(st.engine.stats().running)
                await c.post(f"{url}/lora-adapters", json=[{"id": 0, "scale": 1.0}])  # global change mid-flight
                reload = await c.post(f"{url}/v1/experts", json={"path": str(roots / "spare" / "gamma")})
                events.append(reload.status_code)  # 409 while gamma serves requests, else 200
                await c.post(f"{url}/lora-adapters", json=[{"id": 0, "scale": 0.0}])
                return await asyncio.gather(*tasks)

        got = [r.json()["choices"][0]["token_ids"] for r in asyncio.run(together())]
    assert events[0] > 0  # the changes really happened with requests in flight
    assert events[1] in (200, 409)
    assert got == alone
    assert len({tuple(a) for a in alone}) >= len(sets)  # adapter sets and prompts really differ


def test_metrics_exposes_per_expert_counts(server):
    chat(server.url, model="beta")
    text = httpx.get(f"{server.url}/metrics").text
    assert 'dmoe_requests_total{expert="beta",status="length"}' in text
    assert "dmoe_time_to_first_token_seconds_bucket" in text and "dmoe_kv_cache_bytes_total" in text


def _in_flight(st) -> int:
    s = st.engine.stats()
    return s.running + s.waiting


@pytest.mark.parametrize("drain_s", [30.0, 0.3])
def test_graceful_shutdown_finishes_or_cleanly_ends_requests_in_flight(make_state, live_server, roots, drain_s):
    """A stop signal: new requests get 503 at once; requests in flight finish within the
    drain time, or end with a clean 503 / SSE error event, never a hang or a cut stream.
    The signal comes from an engine-step hook once both requests are running; it holds
    the engine (so both stay in flight) until the test has probed the server, and with
    the short drain until the drain is over."""
    st = make_state(roots / "experts", max_seq=96, max_loras=2)
    results: dict[str, object] = {}
    signalled, probed = threading.Event(), threading.Event()
    holder: dict[str, object] = {}

    def stop_signal():
        results["running"] = st.engine.stats().running
        threading.Thread(target=holder["srv"].server.handle_exit, args=(15, None)).start()  # SIGTERM
        deadline = time.monotonic() + 30
        while not st.runner.draining and time.monotonic() < deadline:
            pass
        signalled.set()
        assert probed.wait(60)
        while drain_s < 1 and not st.runner.stopping and time.monotonic() < deadline:
            pass

    fired = []

    def after_step(steps: int) -> None:
        # hold the engine until both requests are queued, then signal once both are running
        if fired:
            return
        deadline = time.monotonic() + 30
        while _in_flight(st) < 2 and time.monotonic() < deadline:
            pass
        if st.engine.stats().running == 2:
            fired.append(steps)
            stop_signal()

    srv = live_server(st, drain_s=drain_s, after_step=after_step)
    holder["srv"] = srv

    def full():
        results["full"] = chat(srv.url, max_tokens=60, model="alpha")

    def streamed():
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=60) as r:
            results["events"] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

    with srv:
        workers = [threading.Thread(target=full), threading.Thread(target=streamed)]
        for w in workers:
            w.start()
        assert signalled.wait(60)
        late = chat(srv.url, max_tokens=4)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        assert httpx.get(f"{srv.url}/health").json()["status"] == "draining"
        probed.set()
        for w in workers:
            w.join(timeout=30)
        srv.thread.join(timeout=30)
        assert not srv.thread.is_alive()  # the server exits by itself after the drain
    assert results["running"] == 2
    events = results["events"]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    if drain_s > 1:
        assert results["full"].status_code == 200
        assert results["full"].json()["choices"][0]["finish_reason"] == "length"
        assert results["full"].json()["usage"]["completion_tokens"] == 60
        assert last["choices"][0]["finish_reason"] == "length"
    else:
        assert results["full"].status_code == 503
        assert "shut down before this request finished" in results["full"].json()["error"]["message"]
        assert last["error"]["code"] == 503


def test_model_auto_routes_per_request_and_reports_the_decision(own_server):
    from dmoe.route.keyword import KeywordRouter, KeywordRules

    server = own_server()

    r = chat(server.url, "anything at all", model="auto")  # the fixture's experts have no trained router
    assert r.status_code == 200
    assert r.json()["dmoe"]["route"]["experts"] == [] and "no router" in r.json()["dmoe"]["route"]["reason"]
    assert r.headers["x-dmoe-route"].startswith("base;")
    rules = {"rules": [{"expert": "alpha", "keywords": ["apples"]}, {"expert": "beta", "keywords": ["bananas"]}]}
    server.state.router = KeywordRouter(KeywordRules.model_validate(rules))
    routed = chat(server.url, "I like apples", model="auto")
    assert routed.headers["x-dmoe-route"] == "alpha=1.000;p=1.000"
    assert routed.json()["dmoe"]["route"]["label"] == "alpha"
    assert routed.json()["choices"][0]["token_ids"] == ids(server.url, "I like apples", model="alpha")
    body = {"messages": [{"role": "user", "content": "bananas please"}], "max_tokens": 4, "stream": True, "model": "auto"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as s:
        first = json.loads(next(line for line in s.iter_lines() if line.startswith("data: "))[6:])
        assert s.headers["x-dmoe-route"].startswith("beta=")
    assert first["dmoe"]["route"]["label"] == "beta"
    explicit = chat(server.url, "I like apples", model="auto", experts=[{"name": "beta", "scale": 1.0}])
    assert "route" not in explicit.json()["dmoe"]  # an explicit choice wins over auto
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'dmoe_route_decisions_total{route="alpha"} 1.0' in metrics


def test_each_request_is_logged_in_one_line_without_its_prompt(own_server, caplog):
    server = own_server()
    with caplog.at_level("INFO", logger="dmoe.serve.requests"):
        assert chat(server.url, "TOPSECRET words", model="alpha", max_tokens=3).status_code == 200
        assert chat(server.url, "TOPSECRET again", model="nope").status_code == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "dmoe.serve.requests"]
    ok = [m for m in lines if "model=alpha" in m]
    assert len(ok) == 1 and "status=200" in ok[0] and "completion_tokens=3" in ok[0] and "ms=" in ok[0]
    assert any("status=404" in m and "/v1/chat/completions" in m for m in lines)
    assert not any("TOPSECRET" in r.getMessage() for r in caplog.records)


def test_a_failing_engine_step_is_logged_fails_its_requests_and_the_server_keeps_serving(make_state, live_server, roots, caplog):
    st = make_state(roots / "experts", max_seq=96)
    real_step, calls = st.engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected engine fault")
        return real_step()

    st.engine.step = step
    with live_server(st) as srv, caplog.at_level("ERROR", logger="dmoe.engine.runner"):
        failed = chat(srv.url, max_tokens=20)
        assert failed.status_code == 500 and "injected engine fault" in failed.json()["error"]["message"]
        assert chat(srv.url, max_tokens=4).status_code == 200  # still serving
        assert httpx.get(f"{srv.url}/health").json()["running"] == 0
    faults = [r for r in caplog.records if r.name == "dmoe.engine.runner"]
    assert faults and faults[0].exc_info and "injected engine fault" in str(faults[0].exc_info[1])


# ---------------------------------------------------------------- OpenAI fields: honoured or refused by name
@pytest.mark.parametrize("extra, words", [
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2]"),
    ({"repeat_penalty": 0}, "repetition_penalty must be > 0"),
    ({"logprobs": 3}, "logprobs: in chat completions it is true or false"),
    ({"top_logprobs": 3}, "top_logprobs needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "in [0, 20]"),
    ({"logit_bias": {"the": 5}}, "logit_bias: keys are token ids"),
    ({"logit_bias": {"42": 500}}, "logit_bias for token 42 must be in [-100, 100]"),
    ({"logit_bias": {"99999999": 1}}, "outside the vocabulary"),
    ({"response_format": {"type": "xml"}}, "response_format: type 'xml' is not supported"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "give one output format"),
    ({"json_schema": {"type": "nope"}}, "json_schema"),
    ({"grammar": "root ::= undefined_rule"}, "grammar"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools: function calling is not supported"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"n": 17}, "n:"),
    ({"stop": [str(i) for i in range(9)]}, "at most 8 stop strings"),
    ({"frobnicate": 1, "best_of": 2}, "unknown fields best_of, frobnicate"),
    ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options"),
])
def test_fields_dmoe_cannot_honour_are_refused_by_name(server, extra, words):
    r = chat(server.url, **extra)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_no_op_values_of_fields_are_accepted(server):
    r = chat(server.url, presence_penalty=0, frequency_penalty=0.0, logprobs=False, top_logprobs=None, logit_bias={},
             response_format={"type": "text"}, tools=[], tool_choice="none", user="someone", n=1)
    assert r.status_code == 200, r.text


def test_lenient_server_ignores_unknown_fields_but_still_refuses_known_unsupported_ones(own_server):
    srv = own_server(lenient=True)
    assert chat(srv.url, frobnicate=1).status_code == 200
    assert chat(srv.url, tools=[{"type": "function", "function": {"name": "f"}}]).status_code == 400


def test_n_choices_seeded_streamed_and_not_with_the_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    msgs = [{"role": "user", "content": "tell me something"}]
    kw = {"model": "alpha", "messages": msgs, "max_tokens": 8, "temperature": 1.0, "top_p": 0.95}
    three = client.chat.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.message.content for c in three.choices]
    assert texts[0] == client.chat.completions.create(seed=11, **kw).choices[0].message.content  # choice i uses seed + i
    assert texts[1] == client.chat.completions.create(seed=12, **kw).choices[0].message.content
    assert texts == [c.message.content for c in client.chat.completions.create(n=3, seed=11, **kw).choices]  # reproducible
    assert three.usage.completion_tokens == 24 and three.usage.prompt_tokens > 0
    stream = client.chat.completions.create(n=3, seed=11, stream=True, stream_options={"include_usage": True}, **kw)
    got, usage_chunks, finishes = ["", "", ""], [], {}
    for chunk in stream:
        if not chunk.choices:
            usage_chunks.append(chunk.usage)
            continue
        for ch in chunk.choices:
            got[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert got == texts and finishes == {0: "length", 1: "length", 2: "length"}
    assert len(usage_chunks) == 1 and usage_chunks[0].completion_tokens == 24
    greedy = client.completions.create(model="base", prompt="The capital of", max_tokens=5, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text and greedy.usage.completion_tokens == 10


def test_ignore_eos_and_chat_template_kwargs(server):
    r = chat(server.url, max_tokens=7, ignore_eos=True, chat_template_kwargs={"enable_thinking": False})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7
    assert chat(server.url, chat_template_kwargs=["not", "a", "dict"]).status_code == 400


def test_posting_lora_adapters_switches_like_llama_server(own_server):
    """Unlisted adapters go to 0: posting id 1 after id 0 switches experts, it does not blend them."""
    srv = own_server()
    post = lambda body: httpx.post(f"{srv.url}/lora-adapters", json=body)  # noqa: E731
    assert post([{"id": 0, "scale": 1.0}]).json() == {"success": True}
    assert post([{"id": 1, "scale": 1.0}]).status_code == 200
    scales = {a["id"]: a["scale"] for a in httpx.get(f"{srv.url}/lora-adapters").json()}
    assert scales == {0: 0.0, 1: 1.0}
    assert chat(srv.url).json()["dmoe"]["experts"] == [{"name": "beta", "scale": 1.0}]
    assert ids(srv.url) == ids(srv.url, model="beta")
    assert post([]).status_code == 200 and chat(srv.url).json()["dmoe"]["experts"] == []  # [] = every adapter off
    for body in ({"id": 0, "scale": 1}, "x", None):
        r = httpx.post(f"{srv.url}/lora-adapters", content=json.dumps(body))
        assert r.status_code == 400 and "must be an array" in r.json()["error"]["message"]
    r = post([{"id": 7, "scale": 1}])
    assert r.status_code == 404 and "unknown lora id 7" in r.json()["error"]["message"]
    assert {a["id"]: a["scale"] for a in httpx.get(f"{srv.url}/lora-adapters").json()} == {0: 0.0, 1: 0.0}  # unchanged


@pytest.mark.parametrize("messages, words", [
    ([{"role": "user", "content": "hi", "name": "bob"}], "messages[0]: unknown field name"),
    ([{"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[1]: part type 'image_url' is not supported"),
])
def test_message_fields_and_parts_dmoe_would_drop_are_refused(server, messages, words):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    ok = httpx.post(f"{server.url}/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2})
    assert ok.status_code == 200
