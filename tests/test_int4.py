"""``dmoe serve --int4``: a 4-bit GGUF's own weights, packed, in the torch engine.

The decoder is checked against gguf-py's dequantizer (the reference), the packed matmul
against the dense one, attaching against the weights the model was loaded with (a wrong
row order or another file is refused, and nothing is attached), and the served replies
of the embedded Q4_1 base against its dense bf16 replies."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from dmoe.engine import int4
from dmoe.engine.int4 import Int4Error, PackedInt4, attach_int4, decode, iter_int4_linears

BLOCK_BYTES = {"Q4_0": (32, 18, (0,)), "Q4_1": (32, 20, (0, 2)), "Q4_K": (256, 144, (0, 2))}


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_decode_equals_gguf_dequantize(qtype):
    """Random blocks (every byte pattern is a valid block once its f16 scales are finite)."""
    rng = np.random.default_rng(0)
    per, size, halves = BLOCK_BYTES[qtype]
    n, k = 6, 512
    raw = rng.integers(0, 256, (n * k // per, size), dtype=np.uint8)
    for h in halves:  # finite scales of either sign
        raw[:, h:h + 2] = rng.normal(0, 0.05, (len(raw), 1)).astype(np.float16).view(np.uint8)
    w = decode(raw, qtype, n, k)
    assert w.codes.shape == (n, k) and w.codes.max() <= 15 and w.scale.shape == (n, k // 32)
    ref = dequantize(raw.reshape(n, -1), GGMLQuantizationType[qtype]).reshape(n, k)
    np.testing.assert_array_equal(w.dequantize(), ref)


def test_another_type_is_refused_by_name():
    with pytest.raises(Int4Error, match="Q8_0 is not a 4-bit type"):
        decode(np.zeros((1, 34), np.uint8), "Q8_0", 1, 32)


def _codes_weight(n, k, seed=0):
    rng = np.random.default_rng(seed)
    return int4.Int4Weight(rng.integers(0, 16, (n, k)).astype(np.uint8), rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float32),
                           rng.uniform(-0.1, 0.0, (n, k // 32)).astype(np.float32))


def test_packed_matmul_equals_the_dense_weight():
    w = _codes_weight(96, 64)
    packed = PackedInt4(w, torch.bfloat16)
    x = torch.randn(3, 2, 64).bfloat16()
    dense = torch.from_numpy(w.dequantize()).bfloat16()
    got = packed(x).float()
    want = (x.float() @ dense.float().T)
    assert got.shape == (3, 2, 96)
    assert torch.allclose(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())
    bias = torch.randn(96).bfloat16()
    assert torch.allclose(packed(x, bias).float(), got + bias.float(), atol=0.05)


def _engine(spec, dtype=torch.bfloat16):
    from dmoe.base import load_base
    from dmoe.engine.torch_engine import TorchEngine

    model, tok, _ = load_base(spec, dtype=dtype)
    return TorchEngine.from_base(model, tok, max_batch=4, max_seq=64, max_loras=2, max_rank=8)


def test_attach_packs_every_4bit_linear_and_checks_it(tiny_q4_base):
    eng = _engine(tiny_q4_base)
    packs = dict(iter_int4_linears(tiny_q4_base.path, eng.model.args.n_layers))
    assert sorted(packs) == sorted(f"layers.{i}.{g}" for i in range(2) for g in ("qkv", "o", "gate_up", "down"))
    assert attach_int4(eng.model, packs.items()) == 8  # q/k found in transformers' row order, not the file's
    lin = eng.model.layers[0].qkv
    x = torch.randn(1, 1, 32).bfloat16()
    assert torch.allclose(lin.int4(x).float(), lin.base(x).float(), rtol=0.02, atol=0.02)


def test_weights_that_differ_are_refused_and_nothing_is_attached(tiny_q4_base):
    eng = _engine(tiny_q4_base)
    packs = dict(iter_int4_linears(tiny_q4_base.path, eng.model.args.n_layers))
    with torch.no_grad():
        eng.model.layers[1].down.base.weight[3, 5] += 0.5  # another file's weights, in effect
    with pytest.raises(Int4Error, match=r"layers\.1\.down: the GGUF's 4-bit codes do not give the weights"):
        attach_int4(eng.model, packs.items())
    assert all(getattr(layer, g).int4 is None for layer in eng.model.layers for g in ("qkv", "o", "gate_up", "down"))


def test_fp32_is_refused(tiny_q4_base):
    eng = _engine(tiny_q4_base, torch.float32)
    with pytest.raises(Int4Error, match="bfloat16 or float16"):
        attach_int4(eng.model, iter_int4_linears(tiny_q4_base.path, eng.model.args.n_layers))


def test_steps_larger_than_max_rows_run_the_dense_weights(tiny_q4_base, monkeypatch):
    from dmoe.engine.request import SamplingParams

    dense = _engine(tiny_q4_base)
    packed = _engine(tiny_q4_base)
    attach_int4(packed.model, iter_int4_linears(tiny_q4_base.path, packed.model.args.n_layers))
    prompts, params = [[1, 4093, 198, 1780], [1, 520, 9531, 198]], SamplingParams(max_tokens=6)
    monkeypatch.setattr(PackedInt4, "max_rows", 0)  # every step is "large": the packed weights never run
    assert packed.generate(prompts, [[]] * 2, params) == dense.generate(prompts, [[]] * 2, params)
    calls = []
    monkeypatch.setattr(PackedInt4, "max_rows", 2)  # decode steps (2 rows) packed, prefills (8 rows) dense
    monkeypatch.setattr(PackedInt4, "forward", lambda self, x, bias=None, f=PackedInt4.forward: calls.append(x.shape) or f(self, x, bias))
    packed.generate(prompts, [[]] * 2, params)
    assert calls and all(s[0] * s[1] <= 2 for s in calls)


def test_serve_int4_over_a_q4_base_answers_and_bad_combinations_are_refused(tiny_q4_base, tiny_base, dmoe_home, live_server):
    import httpx

    from dmoe.config import ConfigError
    from dmoe.runtime import ServeConfig, build_engine, build_state

    st = build_state(ServeConfig.make(base=str(tiny_q4_base.path), int4=True, dtype="bfloat16", max_batch=2, max_seq=64,
                                      max_loras=2, max_rank=8))
    assert st.engine.model.layers[0].gate_up.int4 is not None
    with live_server(st) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": "hello", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    bad = [(dict(base=str(tiny_base)), "is not a .gguf file"),
           (dict(base=str(tiny_q4_base.path), dtype="float32"), "needs --dtype bfloat16 or float16"),
           (dict(base=str(tiny_q4_base.path), engine="llamacpp"), "--int4 applies to the torch engine"),
           (dict(base=str(tiny_q4_base.path), dtype="bfloat16", compile=True), "--int4 and --compile together")]
    for kw, words in bad:
        with pytest.raises(ConfigError, match=words):
            build_engine(ServeConfig.make(int4=True, **kw))


def test_a_base_without_4bit_weights_is_refused(tiny_gguf_base, dmoe_home):
    from dmoe.config import ConfigError
    from dmoe.runtime import ServeConfig, build_engine

    with pytest.raises(ConfigError, match="has no 4-bit"):
        build_engine(ServeConfig.make(base=str(tiny_gguf_base.path), int4=True, dtype="bfloat16", max_batch=2, max_seq=64))


@pytest.mark.slow
def test_the_embedded_q4_base_packed_gives_the_dense_replies():
    """The real model: every layer linear of the embedded Q4_1 GGUF packs (q/k unpermuted), and
    greedy replies read from the packed weights agree with the dense bf16 ones."""
    from dmoe.base import embedded_gguf_path, load_base
    from dmoe.engine.request import SamplingParams
    from dmoe.engine.torch_engine import TorchEngine

    model, tok, _ = load_base(None, dtype=torch.bfloat16)
    dense = TorchEngine.from_base(model, tok, max_batch=4, max_seq=128)
    packed = TorchEngine.from_base(model, tok, max_batch=4, max_seq=128)
    assert attach_int4(packed.model, iter_int4_linears(embedded_gguf_path(), 30)) == 120
    prompts = [tok.encode(p) for p in ("The capital of France is", "To boil an egg, first", "def add(a, b):", "Brakes squeal when")]
    params = SamplingParams(max_tokens=8)
    got, want = packed.generate(prompts, [[]] * 4, params), dense.generate(prompts, [[]] * 4, params)
    first = sum(g[0] == w[0] for g, w in zip(got, want))
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert first == 4 and same >= 24, (got, want)  # bf16 rounding differs; a wrong weight would not agree at all


def test_int4_is_the_default_where_it_applies_and_off_elsewhere(tiny_q4_base, tiny_base, dmoe_home):
    """ServeConfig.int4 None (the default, `dmoe serve` without --int4/--no-int4): a 4-bit GGUF
    base in bf16 on CPU decodes from its packed weights; fp32, an HF base or --no-int4 stay
    dense, without an error."""
    from dmoe.runtime import ServeConfig, build_engine

    said = []

    def packed(**kw) -> bool:
        engine = build_engine(ServeConfig.make(max_batch=2, max_seq=64, max_loras=2, max_rank=8, **kw))[0]
        said.append(engine.describe())  # the start-up banner's line
        return all(getattr(layer, g).int4 is not None for layer in engine.model.layers for g in ("qkv", "o", "gate_up", "down"))

    q4 = str(tiny_q4_base.path)
    assert packed(base=q4, dtype="bfloat16")
    assert not packed(base=q4, dtype="bfloat16", int4=False)
    assert not packed(base=q4, dtype="float32")
    assert not packed(base=str(tiny_base), dtype="bfloat16")
    kernel = ", LoRA of decode steps in dmoe's C kernel, decode steps' norms and attention in C"
    assert said[0] == "torch engine on cpu in bfloat16, packed int4 weights in decode steps (8 of 8 linears)" + kernel
    assert said[1] == "torch engine on cpu in bfloat16, dense weights" + kernel  # --no-int4: the user's own choice
    assert said[2].startswith("torch engine on cpu in float32, dense weights (int4 off: --int4 needs --dtype bfloat16")
    assert "dense weights (int4 off: --int4 reads a GGUF base's own 4-bit weights" in said[3]
    assert packed(base=q4, dtype="bfloat16", lora_dtype="float32")
    assert said[4].endswith("(8 of 8 linears), float32 LoRA ops" + kernel)


def test_auto_int4_on_weights_that_differ_stays_dense(tiny_q4_base, caplog):
    """Auto: the exactness check failing leaves the engine dense and says why in the log;
    --int4 (required) makes the same failure an error."""
    from dmoe.runtime import attach_packed_int4

    eng = _engine(tiny_q4_base)
    with torch.no_grad():
        eng.model.layers[0].o.base.weight[0, 0] += 0.5
    with caplog.at_level("WARNING", logger="dmoe.runtime"):
        assert attach_packed_int4(eng, tiny_q4_base.path, required=False) == 0
    assert "int4 off" in caplog.text and "layers.0.o" in caplog.text
    assert "dense weights (int4 off: layers.0.o" in eng.describe()
    assert all(getattr(layer, g).int4 is None for layer in eng.model.layers for g in ("qkv", "o", "gate_up", "down"))
    with pytest.raises(Int4Error, match=r"layers\.0\.o"):
        attach_packed_int4(eng, tiny_q4_base.path, required=True)


def test_a_damaged_gguf_is_an_int4_error(tiny_q4_base, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_q4_base.path.read_bytes()[:300])
    with pytest.raises(Int4Error, match="damaged or cut short.*without --int4"):
        next(iter_int4_linears(cut, 2))


def test_fp32_adapter_slots_keep_loaded_adapters_and_serve_them(tiny_q4_base, tiny_experts):
    """Under packed int4 the adapter slots are fp32 (AdapterSlots.use_dtype): converting slots
    that hold adapters keeps them (the same replies as slots that were fp32 before the load),
    a later load lands in fp32, and the replies differ from the bare base's."""
    from dmoe.engine.request import SamplingParams
    from dmoe.experts import load_expert

    params = SamplingParams(max_tokens=6)
    converted, fresh = _engine(tiny_q4_base), _engine(tiny_q4_base)
    for eng in (converted, fresh):
        attach_int4(eng.model, iter_int4_linears(tiny_q4_base.path, eng.model.args.n_layers))
    fresh.slots.use_dtype(torch.float32)
    for eng in (converted, fresh):
        eng.load_expert(load_expert(tiny_experts / "alpha"))
    before = converted.slots.linears[0].A.clone()
    converted.slots.use_dtype(torch.float32)
    assert converted.slots.linears[0].A.dtype == torch.float32 and torch.equal(converted.slots.linears[0].A, before.float())
    converted.load_expert(load_expert(tiny_experts / "beta"))
    fresh.load_expert(load_expert(tiny_experts / "beta"))
    prompts = [[1, 5, 9, 14], [1, 7, 3]]
    for sets in ([[("alpha", 1.0)]] * 2, [[("alpha", 1.0)], [("beta", 0.5)]]):
        assert converted.generate(prompts, sets, params) == fresh.generate(prompts, sets, params)
    assert fresh.generate(prompts, [[("alpha", 1.0)]] * 2, params) != fresh.generate(prompts, [[]] * 2, params)
    assert all(lin.A.dtype == lin.B.dtype == torch.float32 for lin in fresh.slots.linears)
