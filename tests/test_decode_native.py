"""The C work between a decode step's matmuls (engine/decode_cpu.c: norms, RoPE, cache writes,
attention, SwiGLU) against the torch path it replaces, which stays the reference; and its place in
the engine: decode steps of Llama-family models on CPU only."""

import pytest
import torch
import torch.nn.functional as F

from dmoe.engine import native as native_mod
from dmoe.engine.model import ModelArgs, RMSNorm, StepInput, Transformer, apply_rope, decode_attention, mask_bias
from dmoe.engine.native import native_decode

pytestmark = pytest.mark.skipif(native_decode() is None, reason="no C compiler: the native kernels cannot be built")

DTYPES = [torch.float32, torch.bfloat16]


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: to fp32 rounding. bf16: the two round at the same op boundaries, but sum in different
    orders, so an element may differ by a unit in its last place (bf16's relative step is 2^-8)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5)
    else:
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=2 ** -7)
        assert (got != ref).float().mean() < 0.05, "most elements round exactly as the torch path does"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 40])  # 40: a tail past the 16 lanes
def test_add_rmsnorm_equals_the_residual_add_and_the_models_norm(dtype, dim):
    g = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=g) + 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(5, dim, generator=g) * 3).to(dtype)
    d = torch.randn(5, dim, generator=g).to(dtype)
    glue = native_decode()
    ref_x = x + d
    ref_h = norm(ref_x)
    got_x, got_h = x.clone(), torch.empty_like(x)
    glue.add_rmsnorm_(got_x, d, norm.weight.detach(), got_h, 1e-5)
    assert torch.equal(got_x, ref_x), "the residual add rounds exactly as torch's add"
    _close(got_h, ref_h, dtype)
    got_h2 = torch.empty_like(x)
    glue.add_rmsnorm_(got_x, None, norm.weight.detach(), got_h2, 1e-5)  # no residual: x is left alone
    assert torch.equal(got_x, ref_x)
    _close(got_h2, ref_h, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_swiglus_torch_ops(dtype):
    g = torch.Generator().manual_seed(3)
    gu = (torch.randn(4, 2 * 72, generator=g) * 4).to(dtype)  # values past the exp's clamp too
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    gate, up = gu.chunk(2, dim=-1)
    out = torch.empty(4, 72, dtype=dtype)
    native_decode().silu_mul(gu, out)
    _close(out, F.silu(gate) * up, dtype)


def _attention_case(dtype, nh, nkv, hd, pos, slots, window, g):
    """A layer's cache with earlier keys, this step's q|k|v rows, and the torch path's result: RoPE
    (apply_rope), the cache writes, then decode_attention over each row's slot with the mask."""
    n_slots, max_seq, B = 6, 48, len(pos)
    k_cache = torch.randn(n_slots, max_seq, nkv, hd, generator=g).to(dtype)
    v_cache = torch.randn(n_slots, max_seq, nkv, hd, generator=g).to(dtype)
    qkv = torch.randn(B, (nh + 2 * nkv) * hd, generator=g).to(dtype)
    pos_t, slots_t = torch.tensor(pos), torch.tensor(slots)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    f = pos_t.float()[:, None] * inv
    emb = torch.cat((f, f), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)  # (B, hd): as rope_cos_sin makes them
    # the torch path, as Block.forward runs it
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q = apply_rope(q.view(B, nh, 1, hd), cos[:, None, None], sin[:, None, None])
    k = apply_rope(k.view(B, nkv, 1, hd), cos[:, None, None], sin[:, None, None])
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_k[slots_t, pos_t] = k[:, :, 0]
    ref_v[slots_t, pos_t] = v.view(B, nkv, hd)
    span = max(pos) + 1
    cols = torch.arange(span)
    mask = cols[None, :] <= pos_t[:, None]
    if window:
        mask &= cols[None, :] > pos_t[:, None] - window
    keys, vals = ref_k[slots_t, :span].transpose(1, 2), ref_v[slots_t, :span].transpose(1, 2)
    ref = decode_attention(q, keys, vals, mask_bias(mask[:, None, None, :]), hd ** -0.5).reshape(B, nh * hd)
    return (k_cache, v_cache, qkv, cos, sin, slots_t, pos_t, max_seq), (ref, ref_k, ref_v)


def _run_attend(case, nh, nkv, hd, window):
    k_cache, v_cache, qkv, cos, sin, slots, pos, max_seq = case
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    out = torch.empty(len(pos), nh * hd, dtype=qkv.dtype)
    native_decode().rope_attend(qkv, (nh, nkv, hd), cos, sin, slots, pos, k_cache.data_ptr(), v_cache.data_ptr(),
                                max_seq, window, hd ** -0.5, out)
    return out, k_cache, v_cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,hd", [(6, 2, 16), (4, 4, 32), (3, 1, 20)])  # GQA, MHA, a head size past the lanes
@pytest.mark.parametrize("window", [0, 5])
def test_rope_attend_equals_the_torch_decode_path(dtype, nh, nkv, hd, window):
    """Rows at different positions in slots out of order, one of them at position 0."""
    g = torch.Generator().manual_seed(nh * 100 + hd + window)
    case, (ref, ref_k, ref_v) = _attention_case(dtype, nh, nkv, hd, [7, 0, 33, 12], [3, 0, 5, 1], window, g)
    out, k_cache, v_cache = _run_attend(case, nh, nkv, hd, window)
    assert torch.equal(v_cache, ref_v), "values go into the cache as they are"
    _close(k_cache, ref_k, dtype)  # the roped keys
    _close(out, ref, dtype)


def test_a_rows_attention_never_depends_on_its_batch_mates():
    """Bit for bit, in bf16: the same row alone and beside others (rows are independent tasks)."""
    nh, nkv, hd = 6, 2, 16
    g = torch.Generator().manual_seed(5)
    case, _ = _attention_case(torch.bfloat16, nh, nkv, hd, [20, 9, 30], [2, 4, 0], 0, g)
    batch, _, _ = _run_attend(case, nh, nkv, hd, 0)
    k_cache, v_cache, qkv, cos, sin, slots, pos, max_seq = case
    for i in range(3):
        alone = (k_cache, v_cache, qkv[i:i + 1].clone(), cos[i:i + 1].clone(), sin[i:i + 1].clone(),
                 slots[i:i + 1].clone(), pos[i:i + 1].clone(), max_seq)
        out, _, _ = _run_attend(alone, nh, nkv, hd, 0)
        assert torch.equal(out[0], batch[i]), f"row {i} differs alone"


# ---------------------------------------------------------------- in the model
def _tiny(gemma=False, dtype=torch.float32) -> Transformer:
    a = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, norm_eps=1e-5,
                  rope_theta=10000.0, attn_bias=False, tie_embeddings=False, gemma=gemma)
    torch.manual_seed(0)
    m = Transformer(a)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    m = m.to(dtype).eval()
    m.allocate_cache(4, 32, dtype, torch.device("cpu"))
    return m


def test_only_llama_family_cpu_models_take_the_glue():
    glue = native_decode()
    assert _tiny().use_native_decode(glue) and _tiny(dtype=torch.bfloat16).use_native_decode(glue)
    assert not _tiny(gemma=True).use_native_decode(glue), "Gemma-3's norms and GeGLU stay on torch ops"
    assert not _tiny(dtype=torch.float16).use_native_decode(glue)
    assert not _tiny().use_native_decode(None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_steps_give_the_torch_paths_logits(dtype):
    """A prefill (torch path), then decode steps with and without the glue from the same cache:
    the logits and the cache agree, with rows at different positions in slots out of order."""
    m = _tiny(dtype=dtype)
    glue = native_decode()
    pre = StepInput.build([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], [[0, 1, 2, 3]] * 3, [2, 0, 3], torch.device("cpu"))
    m.use_native_decode(glue)
    m.forward(pre)
    for tokens, pos in [([[13], [14], [15]], [[4], [4], [4]]), ([[16], [17]], [[5], [2]])]:
        slots = [2, 0, 3][:len(tokens)]
        step = StepInput.build(tokens, pos, slots, torch.device("cpu"))
        saved = m.k_cache.clone(), m.v_cache.clone()
        m.use_native_decode(None)
        ref = m.forward(step)
        ref_cache = m.k_cache.clone(), m.v_cache.clone()
        m.k_cache.copy_(saved[0])
        m.v_cache.copy_(saved[1])
        m.use_native_decode(glue)
        got = m.forward(step)
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        else:  # bf16 rounding differences grow through the layers; the choice of token does not move
            torch.testing.assert_close(got, ref, rtol=0.05, atol=0.1)
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
        _close(m.k_cache[0], ref_cache[0][0], dtype)  # layer 0: one norm and one matmul from the same inputs
        _close(m.v_cache[0], ref_cache[1][0], dtype)
        torch.testing.assert_close(m.k_cache.float(), ref_cache[0].float(), rtol=0.05, atol=0.05)


def test_prefills_never_take_the_glue(monkeypatch):
    m = _tiny()
    glue = native_decode()
    m.use_native_decode(glue)
    calls = []
    monkeypatch.setattr(type(glue), "rope_attend", lambda self, *a: calls.append(a))
    for tokens in ([[1, 2]], [[1] * 6] * 3):
        n, t = len(tokens), len(tokens[0])
        m.forward(StepInput.build(tokens, [list(range(t))] * n, list(range(n)), torch.device("cpu")))
    assert not calls
    m.forward(StepInput.build([[1]], [[6]], [0], torch.device("cpu")))  # a decode step: every layer's attention
    assert len(calls) == m.args.n_layers


def test_a_decode_step_outside_the_cache_is_refused():
    """The C code writes where it is told: positions and slots are checked before it runs."""
    m = _tiny()
    m.use_native_decode(native_decode())
    with pytest.raises(IndexError, match="outside the KV cache"):
        m.forward(StepInput.build([[1]], [[32]], [0], torch.device("cpu")))  # max_seq is 32
    with pytest.raises(IndexError, match="outside the KV cache"):
        m.forward(StepInput.build([[1]], [[3]], [4], torch.device("cpu")))  # 4 slots


def test_the_engine_banner_and_the_off_switch(tiny_engine, monkeypatch):
    assert tiny_engine.model.glue is not None and "norms and attention in C" in tiny_engine.describe()
    monkeypatch.setenv("DMOE_NATIVE_DECODE", "0")
    assert native_decode() is None
    assert native_mod.native_kernel() is not None, "the switch is the glue's alone"
    tiny_engine.model.use_native_decode(None)
    assert "norms and attention in C" not in tiny_engine.describe()


def test_compiled_blocks_keep_the_torch_path():
    from dmoe.engine.model import compile_blocks

    m = _tiny()
    m.use_native_decode(native_decode())
    compile_blocks(m)
    assert m.glue is None
