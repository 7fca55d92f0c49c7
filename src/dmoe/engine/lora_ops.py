"""Batched multi-LoRA: one narrow op, with a pure-torch reference.

Every row of a batch carries its own adapter set: up to K (slot, scale) pairs, where
slot -1 means "nothing" (the bare base). Adapters live in stacked slots

    A: (S, r, d_in)     B: (S, d_out, r)       (ranks padded with zeros to r)

with each adapter's alpha/r already folded into B, so a row's scale is only the
user's blend weight.

Semantics:
    y = x @ W.T                                     # shared base matmul
    for b in rows, for k in range(K):
        if idx[b, k] >= 0:
            y[b] += scale[b, k] * (x[b] @ A[idx[b, k]].T) @ B[idx[b, k]].T

This gathers each row's (A, B) once per call (BGMV, as in Punica / S-LoRA) rather
than looping over adapters in Python (PEFT's ``_mixed_batch_forward``, which stays
the correctness oracle in the tests).
"""

from __future__ import annotations

import torch


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Sum over each row's adapters of scale * B(A x).

    x: (N, T, d_in)  A: (S, r, d_in)  B: (S, d_out, r)  idx: (N, K) long, -1 = none
    scale: (N, K).  Returns (N, T, d_out).
    """
    safe = idx.clamp(min=0)
    w = torch.where(idx >= 0, scale, torch.zeros_like(scale)).to(x.dtype)  # (N, K)
    a = A[safe]  # (N, K, r, d_in)
    b = B[safe]  # (N, K, d_out, r)
    xa = torch.einsum("ntd,nkrd->ntkr", x, a) * w[:, None, :, None]  # (N, T, K, r)
    return torch.einsum("ntkr,nkor->nto", xa, b)


def lora_delta_loop(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same as :func:`lora_delta`, row by row: the slow reference kept for tests."""
    out = torch.zeros(x.shape[0], x.shape[1], B.shape[1], dtype=x.dtype)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            s = int(idx[n, k])
            if s >= 0:
                out[n] += float(scale[n, k]) * (x[n] @ A[s].T) @ B[s].T
    return out
