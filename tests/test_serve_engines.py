"""The same HTTP behaviour on both engines: typed errors map to the same status codes,
and /metrics and /health read the engine through ``Engine.stats()``.

The llama.cpp engine serves the tiny Llama written as an f32 GGUF (``tiny_gguf_base``)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from conftest import StepHook

pytest.importorskip("llama_cpp")
ENGINES = ["torch", "llamacpp"]


@pytest.fixture(params=ENGINES)
def engine_kind(request) -> str:
    return request.param


def _experts(kind, tiny_experts, tiny_gguf_experts):
    return tiny_gguf_experts if kind == "llamacpp" else tiny_experts


def test_unknown_expert_delete_is_404_and_unknown_model_is_404(engine_kind, make_state, live_server, tiny_experts, tiny_gguf_experts):
    st = make_state(_experts(engine_kind, tiny_experts, tiny_gguf_experts), engine=engine_kind, use_router=False)
    with live_server(st) as srv:
        r = httpx.delete(f"{srv.url}/v1/experts/nobody")
        assert r.status_code == 404, r.text
        assert "not loaded" in r.json()["error"]["message"] and "alpha" in r.json()["error"]["message"]
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "zeta", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found"
        r = httpx.post(f"{srv.url}/v1/experts", json={"path": "nobody"})
        assert r.status_code == 404 and "unknown expert 'nobody'" in r.json()["error"]["message"]
        assert httpx.delete(f"{srv.url}/v1/experts/beta").status_code == 200
        assert httpx.delete(f"{srv.url}/v1/experts/beta").status_code == 404
        assert httpx.post(f"{srv.url}/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_reload_or_unload_of_an_expert_in_use_is_409(engine_kind, make_state, live_server, tiny_experts, tiny_gguf_experts):
    """A hook after engine step 2 holds the engine while 'alpha' serves a request: a reload
    and an unload of alpha are refused with 409; other experts still load."""
    folder = _experts(engine_kind, tiny_experts, tiny_gguf_experts)
    st = make_state(folder, engine=engine_kind, use_router=False)
    seen: dict[str, int] = {}
    done = threading.Event()

    def while_in_flight():
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            seen["reload"] = c.post("/v1/experts", json={"path": str(folder / "alpha")}).status_code
            seen["unload"] = c.delete("/v1/experts/alpha").status_code
            seen["other"] = c.post("/v1/experts", json={"path": str(folder / "gamma")}).status_code
            seen["running"] = c.get("/health").json()["running"]
        done.set()

    srv = live_server(st, after_step=StepHook(2, while_in_flight))  # runs on the engine thread, holding it
    with srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "alpha", "prompt": "hello", "max_tokens": 40,
                                                          "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        assert done.wait(60)
        assert seen["reload"] == 409 and seen["unload"] == 409, seen
        assert seen["other"] == 200
        # once the request is done, both work
        assert httpx.post(f"{srv.url}/v1/experts", json={"path": str(folder / "alpha")}, timeout=60).status_code == 200
        assert httpx.delete(f"{srv.url}/v1/experts/alpha").status_code == 200


def test_metrics_and_health_read_engine_stats(engine_kind, make_state, live_server, tiny_experts, tiny_gguf_experts):
    st = make_state(_experts(engine_kind, tiny_experts, tiny_gguf_experts), engine=engine_kind, use_router=False)
    with live_server(st) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "beta", "prompt": "hello", "max_tokens": 3})
        assert r.status_code == 200
        text = httpx.get(f"{srv.url}/metrics").text
        assert 'dmoe_requests_total{expert="beta",status="length"} 1.0' in text
        total = [line for line in text.splitlines() if line.startswith("dmoe_kv_cache_bytes_total ")]
        assert total and float(total[0].split()[1]) > 0
        assert "dmoe_loaded_experts 3.0" in text
        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.url}/health").json()["running"] and time.monotonic() < deadline:
            pass
        assert httpx.get(f"{srv.url}/health").json() == {"status": "ok", "experts": ["alpha", "beta", "gamma"],
                                                         "running": 0, "waiting": 0}


def test_openai_fields_on_both_engines(engine_kind, make_state, live_server, tiny_experts, tiny_gguf_experts):
    """n with seeds, include_usage, ignore_eos and the field refusals behave the same on both engines."""
    from openai import BadRequestError, OpenAI

    st = make_state(_experts(engine_kind, tiny_experts, tiny_gguf_experts), engine=engine_kind, use_router=False)
    with live_server(st) as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
        kw = {"model": "beta", "prompt": "hello", "max_tokens": 6, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
        two = client.completions.create(n=2, seed=5, **kw)
        assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 12
        assert two.choices[1].text == client.completions.create(seed=6, **kw).choices[0].text
        chunks = list(client.completions.create(n=2, seed=5, stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == 1) == two.choices[1].text
        with pytest.raises(BadRequestError, match="tools"):
            client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                           tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
        with pytest.raises(BadRequestError, match="unknown field frobnicate"):
            client.completions.create(extra_body={"frobnicate": 1}, model="beta", prompt="x", max_tokens=2)


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"type": "string", "maxLength": 5},
                                           "n": {"enum": [1, 2, 3]}},
          "required": ["ok", "tag", "n"], "additionalProperties": False}


def test_logprobs_streamed_and_not_with_the_openai_client(engine_kind, make_state, live_server, tiny_experts, tiny_gguf_experts):
    """Chat: logprobs + top_logprobs; completions: logprobs=k. Greedy, so the chosen token is
    the top one; the streamed entries equal the whole response's; completions' tokens spell the text."""
    from openai import OpenAI

    st = make_state(_experts(engine_kind, tiny_experts, tiny_gguf_experts), engine=engine_kind, use_router=False)
    with live_server(st) as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
        kw = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
              "logprobs": True, "top_logprobs": 3, "extra_body": {"ignore_eos": True}}
        whole = client.chat.completions.create(**kw)
        content = whole.choices[0].logprobs.content
        assert len(content) == whole.usage.completion_tokens == 6
        for e in content:
            assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
            assert e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.logprob <= 0
            assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        streamed = [x for c in client.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                    for x in c.choices[0].logprobs.content]
        assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
        assert client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None}).choices[0].logprobs is None
        text = client.completions.create(model="alpha", prompt="hello", max_tokens=5, logprobs=2, extra_body={"ignore_eos": True})
        lp = text.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
        assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
        if "\ufffd" not in "".join(lp.tokens):
            assert "".join(lp.tokens) == text.choices[0].text


def test_structured_output_streamed_and_not_with_the_openai_client(engine_kind, make_state, live_server, tiny_experts,
                                                                   tiny_gguf_experts):
    """A random model writes schema-valid JSON only because of the mask: json_schema (OpenAI),
    json_schema and grammar (llama-server's fields), on both engines, streamed and not."""
    import json

    import jsonschema
    from openai import OpenAI

    st = make_state(_experts(engine_kind, tiny_experts, tiny_gguf_experts), engine=engine_kind, use_router=False)
    with live_server(st) as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
        rf = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}
        msgs = [{"role": "user", "content": "reply in json"}]
        for temperature in (0.0, 1.0):
            r = client.chat.completions.create(model="beta", messages=msgs, max_tokens=60, temperature=temperature, seed=3,
                                               response_format=rf)
            assert r.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
            chunks = client.chat.completions.create(model="beta", messages=msgs, max_tokens=60, temperature=temperature,
                                                    seed=3, response_format=rf, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
        r = client.completions.create(model="alpha", prompt="json:", max_tokens=60, extra_body={"json_schema": SCHEMA})
        jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
        r = client.completions.create(model="alpha", prompt="yes or no?", max_tokens=10,
                                      extra_body={"grammar": 'root ::= "yes" | "no"'})
        assert r.choices[0].text in ("yes", "no")


def test_penalties_and_logit_bias_reach_the_engine(engine_kind, make_state, live_server, tiny_experts, tiny_gguf_experts):
    """The API's penalties give what the engine gives for the same parameters (and change the output)."""
    from openai import OpenAI

    from dmoe.engine.request import SamplingParams

    st = make_state(_experts(engine_kind, tiny_experts, tiny_gguf_experts), engine=engine_kind, use_router=False)
    prompt = st.tokenizer.encode("hello", add_special_tokens=False)
    bias = ((1000, 10.0),)  # token 1000 wins until the penalties of its repeats outweigh the bias
    plain = SamplingParams(max_tokens=12, ignore_eos=True, logit_bias=bias)
    penal = SamplingParams(max_tokens=12, ignore_eos=True, logit_bias=bias, frequency_penalty=2.0, presence_penalty=2.0,
                           repetition_penalty=1.3)
    want_plain, want_penal = (st.engine.generate([prompt], [[("gamma", 1.0)]], p)[0] for p in (plain, penal))
    assert want_plain == [1000] * 12 and want_penal[0] == 1000 and want_penal != want_plain
    with live_server(st) as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
        kw = {"model": "gamma", "prompt": "hello", "max_tokens": 12}
        got = client.completions.create(frequency_penalty=2.0, presence_penalty=2.0, logit_bias={"1000": 10.0},
                                        extra_body={"ignore_eos": True, "repeat_penalty": 1.3, "return_token_ids": True}, **kw)
        assert got.choices[0].model_extra["token_ids"] == want_penal
        biased = client.completions.create(logit_bias={"1000": 10.0}, extra_body={"ignore_eos": True, "return_token_ids": True},
                                           **kw)
        assert biased.choices[0].model_extra["token_ids"] == want_plain


def test_dtype_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(monkeypatch, make_state, tiny_experts):
    """``--dtype auto`` (the default): bf16 on CUDA and on CPUs with AVX512-BF16/AMX, fp32 on other
    CPUs; an explicit choice always wins. The engine is built in the chosen dtype, adapters too."""
    import torch

    from dmoe import runtime

    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(runtime, "cpu_has_bf16", lambda native=native: native)
        assert runtime.serve_dtype("auto", "cpu") == want
        assert runtime.serve_dtype("float32", "cpu") == torch.float32
        assert runtime.serve_dtype("bfloat16", "cpu") == torch.bfloat16
        assert runtime.serve_dtype("auto", "cuda") == torch.bfloat16
        st = make_state(tiny_experts, use_router=False)  # no dtype given: auto
        eng = st.engine
        assert eng.dtype == want and eng.model.k_cache.dtype == want
        lin = eng.slots.linears[0]
        assert lin.A is not None and lin.A.dtype == want
        assert "auto" in runtime.ServeConfig.model_fields["dtype"].description


def test_no_router_routes_auto_by_the_keyword_rules_or_to_the_base(make_state, live_server, tiny_experts, tmp_path):
    """``dmoe serve --no-router`` (memory: no encoder) still answers model=auto: by --keywords
    rules when given, else with the base; /health says which."""
    from dmoe.cli.serve import serve
    from dmoe.route.keyword import KeywordRouter

    rules = tmp_path / "keywords.yaml"
    rules.write_text("rules:\n  - expert: alpha\n    keywords: [engine]\n")
    st = make_state(tiny_experts, use_router=False, keywords=rules)
    assert isinstance(st.router, KeywordRouter)
    with live_server(st) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "auto", "prompt": "my engine", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-dmoe-route"].startswith("alpha="), r.headers
    st = make_state(tiny_experts, use_router=False)
    assert st.router is None and "--no-router" in st.router_status["note"]
    with live_server(st) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "auto", "prompt": "my engine", "max_tokens": 2})
        assert r.status_code == 200 and r.headers.get("x-dmoe-route", "base").startswith("base"), r.headers
    import inspect

    assert inspect.signature(serve).parameters["router"].default.default is True


def test_lora_dtype_with_the_llamacpp_engine_is_refused_and_a_bad_one_named(tiny_gguf_base):
    from dmoe.config import ConfigError
    from dmoe.runtime import ServeConfig, build_engine

    with pytest.raises(ConfigError, match="--lora-dtype applies to the torch engine"):
        build_engine(ServeConfig.make(base=str(tiny_gguf_base.path), engine="llamacpp", lora_dtype="float32"))
    with pytest.raises(ConfigError, match="lora_dtype"):
        ServeConfig.make(lora_dtype="float64")


def test_compile_with_the_llamacpp_engine_is_refused_before_anything_loads(tiny_gguf_base):
    from dmoe.config import ConfigError
    from dmoe.runtime import ServeConfig, build_engine

    with pytest.raises(ConfigError, match="--compile applies to the torch engine"):
        build_engine(ServeConfig.make(base=str(tiny_gguf_base.path), engine="llamacpp", compile=True))


NO_TORCH_SERVER = r"""
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from dmoe.runtime import ServeConfig, build_state
from dmoe.serve.app import create_app

st = build_state(ServeConfig(base=sys.argv[1], experts_dir=Path(sys.argv[2]), engine="llamacpp", use_router=False,
                             max_batch=4, max_seq=128))
with TestClient(create_app(st), base_url="http://127.0.0.1") as client:
    replies = [client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "a json object please"}], "max_tokens": 12,
        "temperature": 0.9, "seed": 4, "logprobs": True, "top_logprobs": 2, "frequency_penalty": 0.5,
        "response_format": {"type": "json_object"}}) for model in ("base", "alpha", "beta")]
print(json.dumps({"status": [r.status_code for r in replies], "torch": "torch" in sys.modules, "bodies": [r.text[:300] for r in replies],
                  "texts": [r.json()["choices"][0]["message"]["content"] for r in replies if r.status_code == 200]}))
"""


def test_the_llamacpp_engine_serves_without_importing_torch(tiny_gguf_base, tiny_gguf_experts, tmp_path):
    """torch alone is about 210 MB of a server's RSS: a llama.cpp server (--no-router) never
    imports it, seeded sampling, logprobs, penalties and an output grammar included, and not on
    a first start either (a fresh DMOE_HOME): the GGUF's tokenizer and the adapters' conversion
    to GGUF, which need torch, run in child interpreters."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "serve_no_torch.py"
    script.write_text(NO_TORCH_SERVER)
    home = tmp_path / "fresh-home"
    out = subprocess.run([sys.executable, str(script), str(tiny_gguf_base.path), str(tiny_gguf_experts)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "DMOE_HOME": str(home)})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["status"] == [200, 200, 200] and got["torch"] is False, got
    assert all(t.startswith("{") for t in got["texts"]), got["texts"]
    assert len(list((home / "gguf-adapters").glob("*.gguf"))) == 3 and list((home / "bases").glob("*-meta"))


def test_a_conversion_in_a_child_interpreter_says_what_went_wrong(tiny_experts, tmp_path):
    """An adapter for another base, converted from a process without torch: the child's
    AdapterError comes back with its message, not a traceback."""
    import subprocess
    import sys

    code = ("import sys\nfrom dmoe.io import without_torch_here\nfrom dmoe.errors import AdapterError\n"
            "try:\n    without_torch_here('dmoe.lora_gguf:_write_cached', sys.argv[1], sys.argv[2], 'embedded', error=AdapterError)\n"
            "except AdapterError as exc:\n    print('refused:', exc, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_experts / "alpha"), str(tmp_path / "x.gguf")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("refused: expert 'alpha'") and "another base" in out.stdout, out.stdout
    assert out.stdout.strip().endswith("False") and not (tmp_path / "x.gguf").exists()


NO_TORCH_ROUTED = r"""
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from dmoe.runtime import ServeConfig, build_state
from dmoe.serve.app import create_app

st = build_state(ServeConfig(experts_dir=Path(sys.argv[1]), engine="llamacpp", max_batch=2, max_seq=256))
with TestClient(create_app(st), base_url="http://127.0.0.1") as client:
    r = client.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 4, "messages": [
        {"role": "user", "content": "How long should I knead bread dough before the first rise?"}]})
print(json.dumps({"status": r.status_code, "route": r.json().get("dmoe", {}).get("route"), "torch": "torch" in sys.modules,
                  "encoder": type(st.router.encoder).__name__}))
"""


@pytest.mark.slow
def test_the_default_llamacpp_server_routes_without_importing_torch(dmoe_home, tmp_path):
    """`dmoe serve --engine llamacpp` as it starts by default (the bundled experts and their
    router): model=auto routes on the numpy MiniLM (the router's own encoder id), and the process
    never imports torch. The one-time conversions are made first, as a first start would."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO
    from dmoe.base import hf_meta_dir, resolve_base
    from dmoe.experts import find_experts
    from dmoe.lora_gguf import cached_adapter_gguf

    experts = REPO / "examples" / "experts"
    base = resolve_base(None)
    hf_meta_dir(base)
    for e in find_experts(experts):
        cached_adapter_gguf(e, base)
    script = tmp_path / "routed_no_torch.py"
    script.write_text(NO_TORCH_ROUTED)
    out = subprocess.run([sys.executable, str(script), str(experts)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DMOE_HOME": str(dmoe_home)})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["status"] == 200 and got["torch"] is False and got["encoder"] == "NumpyMiniLMEncoder", got
    assert [e["name"] for e in got["route"]["experts"]] == ["cooking"], got
