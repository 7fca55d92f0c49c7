"""The batched multi-LoRA op equals its row-by-row reference over a grid of shapes."""

import pytest
import torch

from dmoe.engine.lora_ops import lora_delta, lora_delta_loop


@pytest.mark.parametrize("n,t,d_in,d_out,r,s,k", [(1, 1, 8, 8, 2, 1, 1), (4, 3, 16, 24, 4, 3, 2), (8, 1, 32, 8, 8, 5, 3), (3, 7, 12, 12, 1, 2, 1)])
def test_batched_equals_reference(n, t, d_in, d_out, r, s, k):
    g = torch.Generator().manual_seed(n * 100 + t)
    x = torch.randn(n, t, d_in, generator=g)
    A, B = torch.randn(s, r, d_in, generator=g), torch.randn(s, d_out, r, generator=g)
    idx = torch.randint(-1, s, (n, k), generator=g)
    scale = torch.rand(n, k, generator=g)
    torch.testing.assert_close(lora_delta(x, A, B, idx, scale), lora_delta_loop(x, A, B, idx, scale), rtol=1e-4, atol=1e-5)


def test_no_adapter_rows_get_exactly_zero():
    x = torch.randn(2, 3, 8)
    A, B = torch.randn(2, 4, 8), torch.randn(2, 8, 4)
    idx = torch.tensor([[-1, -1], [1, -1]])
    out = lora_delta(x, A, B, idx, torch.ones(2, 2))
    assert torch.equal(out[0], torch.zeros(3, 8))
    assert not torch.equal(out[1], torch.zeros(3, 8))
