"""Both batched multi-LoRA kernels equal the row-by-row reference over a grid of shapes."""

import pytest
import torch

from dmoe.engine.lora_ops import (
    dense_weights,
    lora_add_dense_,
    lora_delta_dense,
    lora_delta_gather,
    lora_delta_loop,
    use_dense,
)

SHAPES = [(1, 1, 8, 8, 2, 1, 1), (4, 3, 16, 24, 4, 3, 2), (8, 1, 32, 8, 8, 5, 3), (3, 7, 12, 12, 1, 2, 1)]


def _case(n, t, d_in, d_out, r, s, k):
    g = torch.Generator().manual_seed(n * 100 + t)
    x = torch.randn(n, t, d_in, generator=g)
    A, B = torch.randn(s, r, d_in, generator=g), torch.randn(s, r, d_out, generator=g)
    idx = torch.randint(-1, s, (n, k), generator=g)
    scale = torch.rand(n, k, generator=g)
    return x, A, B, idx, scale


@pytest.mark.parametrize("n,t,d_in,d_out,r,s,k", SHAPES)
def test_gather_kernel_equals_reference(n, t, d_in, d_out, r, s, k):
    x, A, B, idx, scale = _case(n, t, d_in, d_out, r, s, k)
    torch.testing.assert_close(lora_delta_gather(x, A, B, idx, scale), lora_delta_loop(x, A, B, idx, scale), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,t,d_in,d_out,r,s,k", SHAPES)
def test_dense_kernel_over_the_used_slot_range_equals_reference(n, t, d_in, d_out, r, s, k):
    x, A, B, idx, scale = _case(n, t, d_in, d_out, r, s, k)
    used = idx[idx >= 0]
    if used.numel() == 0:
        idx[0, 0] = 0
        used = idx[idx >= 0]
    lo, hi = int(used.min()), int(used.max()) + 1
    got = lora_delta_dense(x, A[lo:hi], B[lo:hi], dense_weights(idx, scale, lo, hi))
    torch.testing.assert_close(got, lora_delta_loop(x, A, B, idx, scale), rtol=1e-4, atol=1e-5)
    y = torch.randn(n, t, d_out)  # the in-place form adds the same delta into y
    want = y + lora_delta_loop(x, A, B, idx, scale)
    assert lora_add_dense_(y, x, A[lo:hi], B[lo:hi], dense_weights(idx, scale, lo, hi)) is y
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,t,d_in,d_out,r,s,k", SHAPES)
def test_fp32_slots_over_a_bf16_model_compute_in_fp32_and_round_once(n, t, d_in, d_out, r, s, k):
    """AdapterSlots.use_dtype(fp32) under packed int4: x (bf16) is cast up, the delta made in
    fp32 and added into the bf16 output: every kernel then equals the fp32 reference on the
    same bf16 inputs to one bf16 rounding of the sum."""
    x, A, B, idx, scale = _case(n, t, d_in, d_out, r, s, k)
    xb = x.bfloat16()
    want = lora_delta_loop(xb.float(), A, B, idx, scale)
    used = idx[idx >= 0]
    lo, hi = (int(used.min()), int(used.max()) + 1) if used.numel() else (0, 1)
    w = dense_weights(idx, scale, lo, hi)
    torch.testing.assert_close(lora_delta_dense(xb, A[lo:hi], B[lo:hi], w), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lora_delta_gather(xb, A, B, idx, scale), want, rtol=1e-4, atol=1e-4)
    y = torch.randn(n, t, d_out).bfloat16()
    expect = (y.float() + want).bfloat16()
    assert lora_add_dense_(y, xb, A[lo:hi], B[lo:hi], w) is y and y.dtype == torch.bfloat16
    assert (y.float() - expect.float()).abs().max() <= 2 * 2 ** -8 * expect.float().abs().max() + 1e-6


def test_a_row_naming_one_slot_twice_gets_both_weights():
    idx, scale = torch.tensor([[2, 2]]), torch.tensor([[0.25, 0.5]])
    assert dense_weights(idx, scale, 1, 3).tolist() == [[0.0, 0.75]]


def test_no_adapter_rows_get_exactly_zero():
    x = torch.randn(2, 3, 8)
    A, B = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    idx = torch.tensor([[-1, -1], [1, -1]])
    for out in (lora_delta_gather(x, A, B, idx, torch.ones(2, 2)), lora_delta_dense(x, A, B, dense_weights(idx, torch.ones(2, 2), 0, 2))):
        assert torch.equal(out[0], torch.zeros(3, 8))
        assert not torch.equal(out[1], torch.zeros(3, 8))


def test_dense_is_chosen_only_for_narrow_slot_ranges():
    assert use_dense(4, 1) and use_dense(1, 1) and not use_dense(9, 2)


# ---------------------------------------------------------------- the grid (vLLM's test_punica_ops.py)
GRID_D, GRID_R, GRID_SLOTS, GRID_K = (32, 576, 1536), (1, 8, 16, 64), (1, 4, 8), (1, 2, 3)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _grid_case(d, r, slots, k, dtype, n=5, t=2):
    """Inputs made in fp32 and rounded to ``dtype`` once, so the fp32 reference sees exactly
    the values the kernel sees; every row but one picks k slots (one row has no adapter)."""
    g = torch.Generator().manual_seed(d * 7919 + r * 131 + slots * 17 + k)
    x = torch.randn(n, t, d, generator=g).to(dtype)
    A = (torch.randn(slots, r, d, generator=g) / d ** 0.5).to(dtype)
    B = (torch.randn(slots, r, d, generator=g) / r ** 0.5).to(dtype)
    idx = torch.randint(0, slots, (n, k), generator=g)
    idx[0] = -1
    scale = torch.rand(n, k, generator=g) + 0.25
    want = lora_delta_loop(x.float(), A.float(), B.float(), idx, scale)
    return x, A, B, idx, scale, want


def _close(got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:  # bf16: 8 mantissa bits on the inputs, the (N, T, S*r) intermediate and the output
        tol = 3e-2 * float(want.abs().max()) + 1e-3
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=tol)
    assert torch.equal(got[0], torch.zeros_like(got[0]))  # the no-adapter row adds exactly nothing


@pytest.mark.parametrize("kernel", ["dense", "gather"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", GRID_K)
@pytest.mark.parametrize("slots", GRID_SLOTS)
@pytest.mark.parametrize("r", GRID_R)
@pytest.mark.parametrize("d", GRID_D)
def test_grid_kernel_equals_reference(d, r, slots, k, dtype, kernel):
    dt = DTYPES[dtype]
    x, A, B, idx, scale, want = _grid_case(d, r, slots, k, dt)
    if kernel == "dense":  # over the slot range the step uses, as the engine calls it
        used = idx[idx >= 0]
        lo, hi = int(used.min()), int(used.max()) + 1
        got = lora_delta_dense(x, A[lo:hi], B[lo:hi], dense_weights(idx, scale, lo, hi).to(dt))
    else:
        got = lora_delta_gather(x, A, B, idx, scale.to(dt))
    _close(got, want, dt)


@pytest.mark.parametrize("nh, nkv", [(9, 3), (4, 4), (4, 1)])
def test_decode_attention_equals_sdpa(nh, nkv):
    """The decode step's attention (two batched matmuls, fp32 softmax) against torch's SDPA:
    rows at different lengths, grouped-query heads, a sliding-window style mask."""
    import torch.nn.functional as F

    from dmoe.engine.model import decode_attention, mask_bias

    torch.manual_seed(0)
    B, S, hd = 5, 37, 16
    q, k, v = torch.randn(B, nh, 1, hd), torch.randn(B, nkv, S, hd), torch.randn(B, nkv, S, hd)
    pos = torch.tensor([36, 0, 10, 20, 36])
    mask = (torch.arange(S)[None, :] <= pos[:, None]) & (torch.arange(S)[None, :] > pos[:, None] - 8 * (1 + torch.arange(B)[:, None] % 2))
    mask = mask[:, None, None, :]  # (B, 1, 1, S)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nh != nkv, scale=0.3)
    got = decode_attention(q, k, v, mask_bias(mask), 0.3)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
