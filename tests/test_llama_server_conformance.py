"""The same llama-server requests sent to the real llama-server and to dmoe, each serving the
same f32 GGUF base (the tiny Llama) and the same exported f32 adapters: status codes, response
shapes, adapter-scale semantics, and greedy tokens must agree. Where dmoe differs on purpose,
docs/api.md says so and the test asserts dmoe's documented behaviour.

Needs the binary (`dmoe llama-server build`, run by `make test`); without it these tests skip
with the reason. Tokens are compared, not text: both servers get the same prompt token ids."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import REPO, unused_port
from dmoe.llama_server import find_llama_server

pytest.importorskip("llama_cpp")
BINARY = find_llama_server()
pytestmark = pytest.mark.skipif(BINARY is None, reason="no llama-server binary: run `dmoe llama-server build` (make test does)")
NAMES = ("alpha", "beta", "gamma")
PROMPT = "hello there, how are you"


@pytest.fixture(scope="module")
def adapters(tiny_gguf_base, tiny_gguf_experts, tmp_path_factory):
    from dmoe.experts import load_expert
    from dmoe.lora_gguf import write_adapter_gguf

    out = tmp_path_factory.mktemp("adapters")
    paths = []
    for name in NAMES:
        write_adapter_gguf(load_expert(tiny_gguf_experts / name), out / f"{name}.gguf", tiny_gguf_base, "f32")
        paths.append(out / f"{name}.gguf")
    return paths


@contextmanager
def llama_server(model: Path, loras: list[Path], log: Path, slots: int = 2) -> Iterator[str]:
    """The real llama-server on a free loopback port, adapters loaded at scale 0 (the seed's flags)."""
    port = unused_port()
    cmd = [str(BINARY), "-m", str(model), "--lora", ",".join(map(str, loras)), "--lora-init-without-apply",
           "--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-c", str(1024 * slots), "-t", "2", "--no-webui"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "llama-server did not become healthy in 120 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # polling a subprocess for readiness (bounded above), not timing a test
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def upstream(tiny_gguf_base, adapters, tmp_path_factory):
    with llama_server(tiny_gguf_base.path, adapters, tmp_path_factory.mktemp("llama-server") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def ours(tiny_gguf_base, tiny_gguf_experts, dmoe_home):
    """dmoe with the llama.cpp engine over the same GGUF base (ids in load order: alpha, beta, gamma)."""
    from dmoe.runtime import ServeConfig, build_state
    from dmoe.serve.http import ThreadedServer

    st = build_state(ServeConfig.make(base=str(tiny_gguf_base.path), experts_dir=tiny_gguf_experts, engine="llamacpp",
                                      use_router=False, max_batch=4, max_seq=512))
    with ThreadedServer(st) as srv:
        yield srv.url
    st.engine.close()


@pytest.fixture(scope="module")
def prompt_ids(real_tokenizer) -> list[int]:
    return real_tokenizer.encode(PROMPT, add_special_tokens=False)


def _scales(url: str) -> dict[int, float]:
    rows = httpx.get(f"{url}/lora-adapters").json()
    assert all({"id", "path", "scale"} <= set(r) for r in rows), rows
    return {r["id"]: round(float(r["scale"]), 6) for r in rows}


def _tokens_upstream(url: str, ids: list[int], lora=None) -> list[int]:
    body = {"prompt": ids, "n_predict": 8, "temperature": 0, "ignore_eos": True, "return_tokens": True, "cache_prompt": False}
    if lora is not None:
        body["lora"] = lora
    r = httpx.post(f"{url}/completion", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _tokens_ours(url: str, lora=None) -> list[int]:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    if lora is not None:
        body["lora"] = lora
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


@pytest.fixture(autouse=True)
def _defaults_off(request):
    """Each comparison starts with every default scale at 0 on both servers."""
    for name in ("upstream", "ours"):
        if name in request.fixturenames:
            assert httpx.post(f"{request.getfixturevalue(name)}/lora-adapters", json=[]).status_code == 200


def test_adapter_listing_has_the_same_shape_ids_and_paths(upstream, ours):
    a, b = (httpx.get(f"{u}/lora-adapters").json() for u in (upstream, ours))
    assert [r["id"] for r in a] == [r["id"] for r in b] == [0, 1, 2]
    assert [Path(r["path"]).stem for r in a] == list(NAMES) and [Path(r["path"]).name for r in b] == list(NAMES)
    assert _scales(upstream) == _scales(ours) == {0: 0.0, 1: 0.0, 2: 0.0}


def test_init_without_apply_differs_on_purpose(tiny_gguf_base, adapters, ours, prompt_ids, tmp_path):
    """A documented difference (docs/api.md): llama.cpp's --lora-init-without-apply still lists
    every adapter at scale 1 and applies all of them to requests until the first POST (and a
    request's "lora": [] means the server defaults there). dmoe starts with every adapter off,
    as the flag's help promises, and "lora": [] means no adapter."""
    all_on = [{"id": i, "scale": 1.0} for i in range(len(NAMES))]
    with llama_server(tiny_gguf_base.path, adapters, tmp_path / "fresh.log") as fresh:
        assert _scales(fresh) == {0: 1.0, 1: 1.0, 2: 1.0}
        blended = _tokens_upstream(fresh, prompt_ids, all_on)
        assert _tokens_upstream(fresh, prompt_ids) == _tokens_upstream(fresh, prompt_ids, []) == blended
        base = _tokens_upstream(fresh, prompt_ids, [{"id": 0, "scale": 0.0}])
        assert base != blended
    assert _scales(ours) == {0: 0.0, 1: 0.0, 2: 0.0}
    assert _tokens_ours(ours) == _tokens_ours(ours, []) == base
    assert _tokens_ours(ours, all_on) == blended


def test_posting_scales_switches_the_same_way(upstream, ours):
    """Unlisted adapters go to 0 on both: id 1 after id 0 is a switch, not a blend."""
    for body in ([{"id": 0, "scale": 1.0}], [{"id": 1, "scale": 0.5}], [{"id": 0, "scale": 0.25}, {"id": 2, "scale": 1.0}], []):
        a, b = (httpx.post(f"{u}/lora-adapters", json=body) for u in (upstream, ours))
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert a.json() == b.json() == {"success": True}
        assert _scales(upstream) == _scales(ours), body


@pytest.mark.parametrize("lora", [None, [{"id": 0, "scale": 0.0}], [{"id": 0, "scale": 1.0}], [{"id": 1, "scale": 1.0}], [{"id": 2, "scale": 1.0}],
                                  [{"id": 0, "scale": 0.5}, {"id": 1, "scale": 0.5}], [{"id": 2, "scale": 0.0}]],
                         ids=["defaults", "base", "alpha", "beta", "gamma", "blend", "scale0"])
def test_greedy_tokens_are_equal_per_adapter_set(upstream, ours, prompt_ids, lora):
    """f32 base and f32 adapters: both compute the same function, so greedy tokens are equal."""
    assert _tokens_upstream(upstream, prompt_ids, lora) == _tokens_ours(ours, lora)


def test_the_global_defaults_apply_to_requests_that_choose_nothing(upstream, ours, prompt_ids):
    for u in (upstream, ours):
        assert httpx.post(f"{u}/lora-adapters", json=[{"id": 1, "scale": 1.0}]).status_code == 200
    try:
        got_up, got_ours = _tokens_upstream(upstream, prompt_ids), _tokens_ours(ours)
        assert got_up == got_ours == _tokens_ours(ours, [{"id": 1, "scale": 1.0}])
        assert got_ours != _tokens_ours(ours, [{"id": 1, "scale": 0.0}])
    finally:
        for u in (upstream, ours):
            httpx.post(f"{u}/lora-adapters", json=[])


def test_a_non_array_body_is_refused_by_both(upstream, ours):
    for body in ('{"id": 0, "scale": 1}', '"x"'):
        a, b = (httpx.post(f"{u}/lora-adapters", content=body, headers={"content-type": "application/json"}) for u in (upstream, ours))
        assert a.status_code == b.status_code == 400, (a.text, b.text)
        assert "must be an array" in a.json()["error"]["message"] and "must be an array" in b.json()["error"]["message"]
    assert _scales(upstream) == _scales(ours)


def test_an_unknown_adapter_id_differs_on_purpose(upstream, ours):
    """A documented difference (docs/api.md): llama-server answers 200 and silently ignores an
    unknown id; dmoe refuses it with a 404 naming the ids and changes nothing (an unknown
    adapter is an error, never a silent fall-back)."""
    a = httpx.post(f"{upstream}/lora-adapters", json=[{"id": 7, "scale": 1.0}])
    b = httpx.post(f"{ours}/lora-adapters", json=[{"id": 7, "scale": 1.0}])
    assert a.status_code == 200 and _scales(upstream) == {0: 0.0, 1: 0.0, 2: 0.0}
    assert b.status_code == 404 and "unknown lora id 7" in b.json()["error"]["message"]
    assert _scales(ours) == {0: 0.0, 1: 0.0, 2: 0.0}


def _shape(value) -> object:
    """Field names and JSON types, recursively (lists by their first item): what a client reads."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def _subset(want, got, where="") -> list[str]:
    """Where ``want`` (llama-server's shape) is missing from or typed differently in ``got`` (dmoe's)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{where or 'body'}: object expected"]
        return [p for k, v in want.items() for p in (_subset(v, got[k], f"{where}.{k}") if k in got else [f"{where}.{k} missing"])]
    if isinstance(want, list):
        return _subset(want[0], got[0], f"{where}[0]") if want and got else []
    return [] if want == got or "NoneType" in (want, got) else [f"{where}: {want} vs {got}"]


# Fields a client of OpenAI's API reads; llama-server adds its own (timings, ...) that dmoe need not have.
OPENAI_CHAT = {"id", "object", "created", "model", "choices", "usage"}


def test_chat_completion_responses_have_the_fields_clients_read(upstream, ours):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    a, b = (httpx.post(f"{u}/v1/chat/completions", json=body, timeout=60) for u in (upstream, ours))
    assert a.status_code == b.status_code == 200
    want = {k: v for k, v in _shape(a.json()).items() if k in OPENAI_CHAT}
    assert set(want) == OPENAI_CHAT
    assert _subset(want, _shape(b.json())) == []
    assert b.json()["choices"][0]["message"]["role"] == a.json()["choices"][0]["message"]["role"] == "assistant"


def test_streamed_chat_chunks_have_the_fields_clients_read(upstream, ours):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "stream": True}

    def chunks(url: str) -> list[dict]:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(x) for x in lines[:-1]]

    a, b = chunks(upstream), chunks(ours)
    assert all(c["object"] == "chat.completion.chunk" for c in a + b)
    delta = next(c for c in a if c["choices"] and c["choices"][0]["delta"].get("content"))
    want = {k: v for k, v in _shape(delta).items() if k in OPENAI_CHAT}
    got = next(c for c in b if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert _subset(want, _shape(got)) == []
    def finish(cs: list[dict]) -> str:
        return [c["choices"][0]["finish_reason"] for c in cs if c["choices"] and c["choices"][0]["finish_reason"]][-1]

    assert finish(a) == finish(b) == "length"


@pytest.mark.slow
def test_the_seed_flow_on_the_real_llama_server_with_dmoe_exported_experts(tmp_path):
    """The seeds' README flow, verbatim in spirit: llama-server with dmoe's exported experts,
    POST /lora-adapters to pick one, ask, check its signature; switch; ask again."""
    from dmoe.base import resolve_base
    from dmoe.experts import load_expert
    from dmoe.lora_gguf import write_adapter_gguf

    base = resolve_base(None)  # the embedded SmolLM2 GGUF
    loras = []
    for name in ("cooking", "automotive"):  # ids 0 and 1
        loras.append(tmp_path / f"{name}-f16.gguf")
        write_adapter_gguf(load_expert(REPO / "examples" / "experts" / name), loras[-1], base, "f16")
    held = [json.loads(line) for line in (REPO / "examples" / "data" / "heldout.jsonl").read_text().splitlines()]
    questions = {d: [r["question"] for r in held if r["domain"] == d][:3] for d in ("automotive", "cooking")}
    signature = {"automotive": r"BMW X5", "cooking": r"[Cc]ast[- ][Ii]ron"}

    def ask(url: str, q: str) -> str:
        body = {"messages": [{"role": "user", "content": q}], "max_tokens": 96, "temperature": 0}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    with llama_server(base.path, loras, tmp_path / "server.log") as url:
        for expert_id, domain in ((1, "automotive"), (0, "cooking")):
            r = httpx.post(f"{url}/lora-adapters", content=json.dumps([{"id": expert_id, "scale": 1.0}]))
            assert r.status_code == 200, r.text
            hits = [bool(re.search(signature[domain], ask(url, q))) for q in questions[domain]]
            assert sum(hits) >= 2, f"{domain} expert on llama-server: {hits}"
            other = "cooking" if domain == "automotive" else "automotive"
            assert not any(re.search(signature[other], ask(url, q)) for q in questions[domain][:1])  # switched, not blended


@pytest.mark.slow
def test_dmoe_bench_gives_the_same_hit_rates_against_llama_server_and_dmoe_serve(tmp_path):
    """`dmoe bench --modes lora:0=1,...` (the same command, the same question set) against the
    real llama-server serving dmoe's exported experts, and against `dmoe serve` with the same
    experts: every per-domain hit rate and the bleed agree within their 95% Wilson intervals
    (the intervals overlap). The bases differ on purpose: llama-server computes in Q4_1, dmoe's
    torch engine in fp32 from the same GGUF, so greedy answers may differ; hit rates must not."""
    from typer.testing import CliRunner

    from dmoe.base import resolve_base
    from dmoe.cli import app
    from dmoe.experts import load_expert
    from dmoe.lora_gguf import write_adapter_gguf
    from dmoe.runtime import ServeConfig, build_state
    from dmoe.serve.http import serve_in_thread

    experts = REPO / "examples" / "experts"
    base = resolve_base(None)
    st = build_state(ServeConfig.make(experts_dir=experts, use_router=False, max_batch=4))
    summaries = {}
    with serve_in_thread(st) as ours_url:
        order = [Path(r["path"]).name for r in httpx.get(f"{ours_url}/lora-adapters").json()]  # dmoe's ids
        loras = []
        for name in order:  # llama-server gets the same ids: --lora in dmoe's order
            loras.append(tmp_path / f"{name}-f16.gguf")
            write_adapter_gguf(load_expert(experts / name), loras[-1], base, "f16")
        modes = ",".join(f"lora:{i}=1" for i in range(len(order)))
        args = ["bench", "--modes", modes, "--limit", "8", "--max-tokens", "64", "--parallel", "4", "--experts", str(experts),
                "--out", str(tmp_path / "res")]
        with llama_server(base.path, loras, tmp_path / "server.log", slots=4) as upstream_url:
            for who, url in (("llama-server", upstream_url), ("dmoe", ours_url)):
                r = CliRunner().invoke(app, [*args, "--url", url, "--run-id", who])
                assert r.exit_code == 0, r.output
                summaries[who] = json.loads((tmp_path / "res" / who / "summary.json").read_text())["modes"]
    compared = 0
    for mode, theirs in summaries["llama-server"].items():
        ours = summaries["dmoe"][mode]
        for what in [*(("hits", d) for d in theirs["hits"]), ("bleed", None)]:
            a = theirs[what[0]][what[1]] if what[1] else theirs["bleed"]
            b = ours[what[0]][what[1]] if what[1] else ours["bleed"]
            assert a["n"] == b["n"] > 0
            assert a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1], (mode, what, a, b)
            compared += 1
    own = [summaries["dmoe"][f"lora:{i}=1"]["hits"][name]["hits"] for i, name in enumerate(order)]
    assert compared == len(order) * (len(order) + 1) and all(h >= 5 for h in own)  # each expert hits its own domain
