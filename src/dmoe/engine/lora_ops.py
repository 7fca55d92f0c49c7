"""Batched multi-LoRA: two narrow kernels and the pure-torch reference they must equal.

Adapters live in stacked slots, each adapter's alpha/r already folded into B:

    A: (S, r, d_in)     B: (S, r, d_out)       (ranks padded with zeros to r)

A step's adapter choice comes in two equivalent forms, both built once per step:
  * dense ``w: (N, S)``: the blend weight row n gives each slot (0 = not used);
  * sparse ``idx, scale: (N, K)``: each row's own (slot, weight) pairs, slot -1 = none.

Semantics:
    y = x @ W.T                                     # the shared base matmul
    for each row n and each slot s:
        y[n] += w[n, s] * (x[n] @ A[s].T) @ B[s]

Kernels:
  * :func:`lora_delta_dense`: every slot of a (contiguous) slot range for every row, as
    two plain matmuls over views of the stacked buffers. No copies; the cost grows with
    the number of slots in the range. Best when a step uses few adapters (the usual case).
  * :func:`lora_delta_gather`: each row gathers its own K slots (BGMV, as in Punica and
    S-LoRA). The cost grows with K, but every row copies its A and B first.
:func:`use_dense` picks one. PEFT's ``_mixed_batch_forward`` loops over adapters in
Python; it stays the end-to-end oracle in the tests, :func:`lora_delta_loop` the local one.
"""

from __future__ import annotations

import torch


def use_dense(n_slots: int, k: int) -> bool:
    """Dense over the slot range unless it is much wider than what a row uses."""
    return n_slots <= 4 * max(k, 1)


def lora_delta_dense(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x: (N, T, d_in), A: (S, r, d_in), B: (S, r, d_out), w: (N, S) -> (N, T, d_out).

    ``A`` and ``B`` must be contiguous (a slice of slots of the stacked buffers is). Slots in
    another dtype than ``x`` (fp32 slots over a bf16 model) compute in the slots' dtype.
    """
    x = x.to(A.dtype)
    n, t, _ = x.shape
    s, r, _ = A.shape
    xa = x @ A.reshape(s * r, -1).T  # (N, T, S*r)
    xa = (xa.view(n, t, s, r) * w[:, None, :, None]).view(n, t, s * r)
    return xa @ B.reshape(s * r, -1)


def lora_add_dense_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``y += lora_delta_dense(x, A, B, w)`` in place, the B product written straight into
    ``y`` (one ``addmm_``: no delta tensor, no separate add). ``y`` (N, T, d_out) contiguous.
    fp32 slots over a bf16 ``y`` (``AdapterSlots.use_dtype``): x is cast up, the delta made in
    fp32 and added into ``y`` (one rounding)."""
    n, t, _ = x.shape
    s, r, _ = A.shape
    xa = torch.nn.functional.linear(x.to(A.dtype), A.reshape(s * r, -1))  # (N, T, S*r)
    xa = (xa.view(n, t, s, r) * w[:, None, :, None]).view(n * t, s * r)
    if y.dtype == B.dtype:
        y.view(n * t, -1).addmm_(xa, B.reshape(s * r, -1))
    else:
        y.view(n * t, -1).add_(xa @ B.reshape(s * r, -1))
    return y


def lora_delta_gather(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (N, T, d_in), A: (S, r, d_in), B: (S, r, d_out), idx/scale: (N, K) -> (N, T, d_out)."""
    x = x.to(A.dtype)
    safe = idx.clamp(min=0)
    wk = torch.where(idx >= 0, scale, torch.zeros_like(scale)).to(x.dtype)  # (N, K)
    a = A[safe]  # (N, K, r, d_in)
    b = B[safe]  # (N, K, r, d_out)
    xa = torch.einsum("ntd,nkrd->ntkr", x, a) * wk[:, None, :, None]  # (N, T, K, r)
    return torch.einsum("ntkr,nkro->nto", xa, b)


def lora_delta_loop(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The semantics, row by row: the slow reference kept for tests."""
    out = torch.zeros(x.shape[0], x.shape[1], B.shape[2], dtype=x.dtype, device=x.device)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            s = int(idx[n, k])
            if s >= 0:
                out[n] += float(scale[n, k]) * (x[n] @ A[s].T) @ B[s]
    return out


def dense_weights(idx: torch.Tensor, scale: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The dense (N, hi - lo) form of (idx, scale) over the slot range [lo, hi)."""
    w = torch.zeros(idx.shape[0], hi - lo, dtype=scale.dtype, device=idx.device)
    used = idx >= 0
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
    w.index_put_((rows[used], idx[used] - lo), scale[used], accumulate=True)
    return w
