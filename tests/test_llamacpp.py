"""llama.cpp: exported GGUF adapters behave like the torch expert, and the llama.cpp engine
serves them behind the same API.

Fast tests: the tiny random Llama, exported to an f32 GGUF base with f32 adapters, so
llama.cpp and the torch engine compute the same function: greedy tokens must be equal
(a missing RoPE permutation of q/k lora_b changes them at once on random weights).
Slow tests: the real embedded model with the bundled experts (see the parity rules there)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from conftest import GREEDY, PROMPTS, REPO, step_wrapper  # noqa: E402
from dmoe.base import load_base, resolve_base  # noqa: E402
from dmoe.engine.llamacpp import LlamaCppEngine, LlamaCppError  # noqa: E402
from dmoe.engine.protocol import run_until_done  # noqa: E402
from dmoe.engine.request import SamplingParams  # noqa: E402
from dmoe.engine.torch_engine import TorchEngine  # noqa: E402
from dmoe.errors import AdapterError, AdapterInUseError, ExpertNotLoadedError, RequestError, UnknownExpertError  # noqa: E402
from dmoe.experts import load_expert  # noqa: E402
from dmoe.export.gguf import write_base_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_torch_engine(tiny_base, tiny_experts):
    model, tok, _ = load_base(str(tiny_base))
    eng = TorchEngine.from_base(model, tok, max_batch=8, max_seq=128, max_loras=4, max_rank=8)
    for name in ("alpha", "beta", "gamma"):
        eng.load_expert(load_expert(tiny_experts / name))
    return eng


def _llama_engine(base, tokenizer, experts):
    eng = LlamaCppEngine(base, tokenizer, max_batch=8, max_seq=128)
    for name in ("alpha", "beta", "gamma"):
        eng.load_expert(load_expert(experts / name))
    return eng


@pytest.fixture(scope="module")
def tiny_llama_engine(tiny_gguf_base, tiny_experts, real_tokenizer, dmoe_home):
    """Shared and read-only: tests that load or unload experts use ``own_llama_engine``."""
    eng = _llama_engine(tiny_gguf_base, real_tokenizer, tiny_experts)
    yield eng
    eng.close()


@pytest.fixture
def own_llama_engine(tiny_gguf_base, tiny_experts, real_tokenizer, dmoe_home):
    eng = _llama_engine(tiny_gguf_base, real_tokenizer, tiny_experts)
    yield eng
    eng.close()


@pytest.mark.parametrize("adapters", [[], [("alpha", 1.0)], [("beta", 1.0)], [("gamma", 0.5), ("alpha", 1.0)]])
def test_greedy_equals_the_torch_engine(tiny_torch_engine, tiny_llama_engine, adapters):
    want = tiny_torch_engine.generate(PROMPTS, [adapters] * len(PROMPTS), GREEDY)
    got = tiny_llama_engine.generate(PROMPTS, [adapters] * len(PROMPTS), GREEDY)
    assert got == want


def test_adapters_change_the_output(tiny_llama_engine):
    assert tiny_llama_engine.describe() == f"llama.cpp engine on cpu, {tiny_llama_engine.n_threads} threads, the GGUF's own weights (tiny-f32.gguf)"
    base = tiny_llama_engine.generate(PROMPTS[:1], [[]], GREEDY)
    alpha = tiny_llama_engine.generate(PROMPTS[:1], [[("alpha", 1.0)]], GREEDY)
    assert base != alpha


def _renamed(src: Path, dst: Path, name: str) -> Path:
    import yaml

    shutil.copytree(src, dst)
    card = yaml.safe_load((dst / "expert.yaml").read_text())
    card["name"] = name
    (dst / "expert.yaml").write_text(yaml.safe_dump(card))
    return dst


def test_mixed_concurrent_load_equals_alone(own_llama_engine, tiny_experts, tmp_path):
    eng = own_llama_engine
    sets = [[], [("alpha", 1.0)], [("beta", 1.0)], [("gamma", 1.0)], [("alpha", 0.5)], [("beta", 1.0)], [], [("gamma", 1.0)]]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(sets))]
    alone = [eng.generate([p], [s], GREEDY)[0] for p, s in zip(prompts, sets)]
    reqs = [eng.submit(p, s, GREEDY) for p, s in zip(prompts, sets)]
    refused = []

    def mid_way(steps: int) -> None:
        if steps == 5:  # load an expert mid-way; replacing one in use is refused, as in the torch engine
            eng.load_expert(load_expert(_renamed(tiny_experts / "beta", tmp_path / "delta", "delta")))
            with pytest.raises(AdapterInUseError, match="in use"):
                eng.load_expert(load_expert(tiny_experts / "beta"))
            refused.append(steps)

    eng.step = step_wrapper(eng, mid_way)
    run_until_done(eng, reqs)
    assert refused == [5]
    assert [r.output_ids for r in reqs] == alone
    assert len(eng.free_seqs) == 8  # every sequence released
    assert eng.stats().adapter_switches > 0


def test_bad_requests_are_errors(tiny_llama_engine):
    with pytest.raises(UnknownExpertError, match="unknown expert 'zeta'"):
        tiny_llama_engine.submit([1, 2], [("zeta", 1.0)], GREEDY)
    with pytest.raises(RequestError, match="finite"):
        tiny_llama_engine.submit([1, 2], [("alpha", float("nan"))], GREEDY)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        tiny_llama_engine.submit([10**7], [], GREEDY)
    with pytest.raises(RequestError, match="exceeds the context"):
        tiny_llama_engine.submit([1] * 100, [], SamplingParams(max_tokens=64))


def test_unload_in_use_refused_then_allowed(own_llama_engine):
    eng = own_llama_engine
    r = eng.submit(PROMPTS[0], [("gamma", 1.0)], GREEDY)
    with pytest.raises(AdapterInUseError, match="in use"):
        eng.unload_expert("gamma")
    run_until_done(eng, [r])
    eng.unload_expert("gamma")
    assert "gamma" not in eng.resident
    with pytest.raises(UnknownExpertError):
        eng.submit(PROMPTS[0], [("gamma", 1.0)], GREEDY)
    with pytest.raises(ExpertNotLoadedError, match="not loaded"):
        eng.unload_expert("gamma")


def test_refuses_an_hf_base_and_a_mismatched_adapter(tiny_base, real_tokenizer, tiny_experts, dmoe_home):
    with pytest.raises(LlamaCppError, match="needs a GGUF base.*dmoe export base --base"):
        LlamaCppEngine(resolve_base(tiny_base), real_tokenizer)
    eng = LlamaCppEngine(resolve_base(None), real_tokenizer, max_batch=2, max_seq=64)  # the embedded 576-wide base
    try:
        with pytest.raises(AdapterError, match="made for another base"):
            eng.load_expert(load_expert(tiny_experts / "alpha"))  # refused before llama.cpp sees it
        assert eng.generate([[1, 2, 3]], [[]], SamplingParams(max_tokens=2))  # still works
    finally:
        eng.close()


def test_server_with_the_llama_cpp_engine(make_state, tiny_gguf_experts):
    from fastapi.testclient import TestClient

    from dmoe.serve.app import create_app

    st = make_state(tiny_gguf_experts, engine="llamacpp", use_router=False)
    with TestClient(create_app(st), base_url="http://localhost") as client:
        r = client.post("/v1/completions", json={"model": "alpha", "prompt": "hello", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        assert client.post("/v1/completions", json={"model": "zeta", "prompt": "x", "max_tokens": 2}).status_code == 404
        assert client.get("/lora-adapters").json()[0]["id"] == 0
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} >= {"base", "alpha", "beta"}


# ------------------------------------------------------------------ the real model
BUNDLED = REPO / "examples" / "experts"


def _pick() -> list[str]:
    """12 held-out questions: 3 of each domain and 3 off-domain."""
    import json

    rows = [json.loads(l) for l in (REPO / "examples" / "data" / "heldout.jsonl").read_text().splitlines()]
    out = []
    for d in ("automotive", "cooking", "programming", "none"):
        out += [r["question"] for r in rows if r["domain"] == d][:3]
    return out


def _chat_ids(tok, qs):
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False) for q in qs]


@pytest.fixture(scope="module")
def real_torch_engine():
    model, tok, _ = load_base(None)
    eng = TorchEngine.from_base(model, tok, max_batch=8, max_seq=512, max_loras=3, max_rank=16)
    for name in ("automotive", "cooking", "programming"):
        eng.load_expert(load_expert(BUNDLED / name))
    return eng


@pytest.mark.slow
def test_exported_adapters_match_torch_exactly_over_an_f32_base(real_torch_engine, tmp_path_factory):
    """Rule 1 (unquantized base): the first 16 greedy tokens are equal, 12 prompts per expert.
    The base GGUF is dmoe's own f32 export of the dequantized embedded model, so both sides
    hold the same weights; a tie in fp32 sums is the only allowed difference (none seen)."""
    from dmoe.base import hf_dir

    tok = real_torch_engine.tokenizer
    base_gguf = tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf"
    write_base_gguf(hf_dir(resolve_base(None)), base_gguf, "f32")
    spec = resolve_base(base_gguf)
    eng = LlamaCppEngine(spec, tok, max_batch=8, max_seq=512)
    try:
        ids = _chat_ids(tok, _pick())
        for name in ("automotive", "cooking", "programming"):
            eng.load_expert(load_expert(BUNDLED / name))
            want = real_torch_engine.generate(ids, [[(name, 1.0)]] * len(ids), GREEDY)
            got = eng.generate(ids, [[(name, 1.0)]] * len(ids), GREEDY)
            same = sum(a == b for a, b in zip(got, want))
            assert same == len(ids), f"{name}: {same}/{len(ids)} prompts with equal 16-token greedy output"
    finally:
        eng.close()


@pytest.mark.slow
def test_embedded_quantized_base_keeps_hits_and_top1(real_torch_engine):
    """Rule 2 (Q4_1 embedded base): the same signature hit or miss per question, and top-1
    agreement >= 90% when llama.cpp is teacher-forced along the torch expert's greedy answer."""
    tok = real_torch_engine.tokenizer
    eng = LlamaCppEngine(resolve_base(None), tok, max_batch=8, max_seq=512)
    try:
        qs = _pick()
        ids = _chat_ids(tok, qs)
        params = SamplingParams(max_tokens=48)
        for name in ("automotive", "cooking", "programming"):
            expert = load_expert(BUNDLED / name)
            eng.load_expert(expert)
            sig = [re.compile(s) for s in expert.card.signature]
            want = real_torch_engine.generate(ids, [[(name, 1.0)]] * len(ids), params)
            got = eng.generate(ids, [[(name, 1.0)]] * len(ids), params)
            hit = lambda out, sig=sig: any(s.search(tok.decode(out)) for s in sig)  # noqa: E731
            agree = total = 0
            for p, w, g in zip(ids, want, got):
                assert hit(w) == hit(g), f"{name}: torch {'hit' if hit(w) else 'missed'}, llama.cpp did not: {tok.decode(g)!r}"
                logits = eng.logits(p + w[:-1], [(name, 1.0)])[len(p) - 1:]
                agree += int((logits.argmax(-1) == torch.tensor(w)).sum())
                total += len(w)
            assert agree / total >= 0.9, f"{name}: top-1 agreement {agree / total:.1%}"
    finally:
        eng.close()


def test_merged_gguf_equals_the_adapter(tiny_base, tiny_experts, tiny_torch_engine, real_tokenizer, tmp_path):
    """dmoe merge --format gguf: llama.cpp on the merged base == the torch engine with the adapter."""
    from typer.testing import CliRunner

    from dmoe.cli import app

    res = CliRunner().invoke(app, ["merge", "alpha", "-o", str(tmp_path / "merged"), "--format", "gguf", "--outtype", "f32",
                                   "--base", str(tiny_base), "--experts", str(tiny_experts)])
    assert res.exit_code == 0, res.output
    eng = LlamaCppEngine(resolve_base(tmp_path / "merged" / "model-f32.gguf"), real_tokenizer, max_batch=4, max_seq=128)
    try:
        got = eng.generate(PROMPTS, [[]] * len(PROMPTS), GREEDY)
    finally:
        eng.close()
    assert got == tiny_torch_engine.generate(PROMPTS, [[("alpha", 1.0)]] * len(PROMPTS), GREEDY)
