"""Both batched multi-LoRA kernels equal the row-by-row reference over a grid of shapes."""

import pytest
import torch

from dmoe.engine.lora_ops import dense_weights, lora_delta_dense, lora_delta_gather, lora_delta_loop, use_dense

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
