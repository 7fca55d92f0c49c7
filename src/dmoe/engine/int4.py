"""A GGUF's own 4-bit weights, served packed by the torch engine (``dmoe serve --int4``).

A 4-bit GGUF (Q4_0, Q4_1 or Q4_K tensors) stores each row in groups of 32 weights as
4-bit codes ``q`` with one scale and one offset per group: ``w = scale * q + low``. torch's
CPU int4 matmul (``_weight_int4pack_mm_for_cpu``) computes ``x @ W.T`` from exactly that
form, ``w = (q - 8) * S + Z`` per group of 32, reading a quarter of bf16's bytes: the
weights the engine otherwise dequantises are kept as the file has them.

    packs = iter_int4_linears(gguf_path, n_layers)    # codes, scales and offsets, a linear at a time
    attach_int4(model, packs)                          # each checked against the dense weights first

Where it pays (2-core CPU, bf16, docs/benchmarks.md): a decode step's 30 layers of
matmuls at 8 rows take about half the time, at 1 row a quarter; at 32 rows and more the
int4 kernel is slower than bf16's GEMM, so a step with more than ``max_rows`` rows (a
prefill) runs the dense weights, which stay loaded. CPU and bf16/fp16 only: torch's kernel
is a slow reference path for fp32 inputs, and CUDA packs int4 differently.

Validate, then commit: every packed linear, dequantised, must equal the dense weight the
model was built from (the same GGUF, dequantised by transformers) to bf16 rounding, or
nothing is attached and the error says which tensor differs. ``dequantize`` here is
checked against gguf-py's own ``dequantize`` (the slow reference) in the tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmoe.errors import DmoeError
from dmoe.gguf_file import GGUFFormatError, read_tensor, tensor_index

log = logging.getLogger("dmoe.engine.int4")

GROUP = 32  # weights per scale: Q4_0/Q4_1 blocks, Q4_K sub-blocks
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # HF part -> GGUF tensor
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


class Int4Error(DmoeError):
    """The base cannot be served with packed 4-bit weights (say why, and that dense serving works)."""


@dataclass
class Int4Weight:
    """One (out, in) linear as 4-bit codes: ``w[n, k] = scale[n, k // 32] * codes[n, k] + low[n, k // 32]``."""

    codes: np.ndarray  # (N, K) uint8, 0..15
    scale: np.ndarray  # (N, K / 32) float32
    low: np.ndarray    # (N, K / 32) float32

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        q = self.codes.reshape(n, k // GROUP, GROUP).astype(np.float32)
        return (q * self.scale[..., None] + self.low[..., None]).reshape(n, k)

    def rows(self, index: np.ndarray) -> "Int4Weight":
        return Int4Weight(self.codes[index], self.scale[index], self.low[index])

    @staticmethod
    def cat(parts: list["Int4Weight"]) -> "Int4Weight":
        return Int4Weight(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("codes", "scale", "low")))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(blocks, ..., half) bytes -> (blocks, ..., 2 * half) codes: the low nibbles first, then the high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode(raw: np.ndarray, qtype: str, n: int, k: int) -> Int4Weight:
    """A GGUF tensor's raw bytes (N rows of K weights) -> codes, scales and offsets.

    Q4_0: 18-byte blocks (d f16, 16 code bytes), w = d * (q - 8).
    Q4_1: 20-byte blocks (d f16, m f16, 16 code bytes), w = d * q + m.
    Q4_K: 144-byte super-blocks of 256 (d, dmin f16, 12 bytes of 6-bit scales and mins,
          128 code bytes); sub-block j of 32: w = d * sc[j] * q - dmin * mn[j].
    """
    raw = np.ascontiguousarray(raw).reshape(n, -1)
    if qtype in ("Q4_0", "Q4_1"):
        head = 2 if qtype == "Q4_0" else 4
        blocks = raw.reshape(n, k // GROUP, head + 16)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if qtype == "Q4_0":
            low = -8.0 * d
        else:
            low = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        codes = _nibbles(blocks[..., head:])  # (N, K/32, 32)
        return Int4Weight(codes.reshape(n, k), d, low)
    if qtype == "Q4_K":
        from gguf.quants import Q4_K

        blocks = raw.reshape(n * (k // 256), 144)
        d = blocks[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32)
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16].copy())  # (blocks, 8) each
        qs = blocks[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 32 bytes: sub-blocks 2j (low) and 2j+1 (high)
        codes = _nibbles(qs).reshape(-1, 8, 32)
        scale = (d[:, None] * sc.astype(np.float32)).reshape(n, k // GROUP)
        low = (-dmin[:, None] * mn.astype(np.float32)).reshape(n, k // GROUP)
        return Int4Weight(codes.reshape(n, k), scale, low)
    raise Int4Error(f"tensor type {qtype} is not a 4-bit type this reader packs (Q4_0, Q4_1, Q4_K)")


def _unpermute_rows(n: int, heads: int) -> np.ndarray:
    """The row order transformers restores for a llama-arch GGUF's q/k (llama.cpp's convert
    permutes them for its RoPE layout): row i of the HF weight is row index[i] of the GGUF's."""
    return np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(n)


def iter_int4_linears(gguf_path: Path, n_layers: int) -> Iterator[tuple[str, Int4Weight]]:
    """``("layers.{i}.{qkv|o|gate_up|down}", packed form)``, one fused linear at a time, for
    every one whose parts are all 4-bit in the file (others stay dense). One at a time, each
    tensor read into memory on its own (not mapped), so that loading holds one decoded linear
    and not the whole file. q/k rows come in the GGUF's order (llama-arch files permute them);
    ``attach_int4`` tries both orders against the dense weights."""
    try:
        tensors = tensor_index(gguf_path)
    except GGUFFormatError as exc:
        raise Int4Error(f"{exc}; serve it without --int4") from None
    for i in range(n_layers):
        for group, names in FUSED.items():
            parts = []
            for hf in names:
                t = tensors.get(f"blk.{i}.{GGUF_NAMES[hf]}.weight")
                if t is None or t.type_name not in ("Q4_0", "Q4_1", "Q4_K"):
                    break
                k, n = t.shape[:2]  # GGUF shapes are (in, out)
                parts.append(decode(read_tensor(gguf_path, t), t.type_name, n, k))
            else:
                yield f"layers.{i}.{group}", Int4Weight.cat(parts)


class PackedInt4(nn.Module):
    """``x @ W.T`` from packed 4-bit codes (torch's CPU int4 kernel), for steps of at most
    ``max_rows`` rows; the owner runs its dense weight for larger ones."""

    max_rows = int(os.environ.get("DMOE_INT4_MAX_ROWS", "16"))  # measured crossover with bf16 GEMM: about 20 rows

    def __init__(self, w: Int4Weight, dtype: torch.dtype):
        super().__init__()
        n, k = w.codes.shape
        self.out_features = n
        codes = torch.from_numpy(w.codes.astype(np.int32))
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), persistent=False)
        scale, low = torch.from_numpy(w.scale), torch.from_numpy(w.low)
        sz = torch.stack([scale.T, (low + 8.0 * scale).T], dim=-1)  # (K/32, N, 2): S and Z of (q - 8) * S + Z
        self.register_buffer("scales_zeros", sz.to(dtype).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), self.packed, GROUP, self.scales_zeros)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias


def attach_int4(model, packs: Iterable[tuple[str, Int4Weight]]) -> int:
    """Give each fused linear of ``model`` its packed form, after checking that it equals the
    dense weight to bf16 rounding (llama-arch q/k: in the GGUF's row order or transformers'
    restored one, whichever matches). Returns how many linears were packed. Raises Int4Error,
    attaching nothing, when a tensor does not match or the model is not on CPU in bf16/fp16."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype not in (torch.bfloat16, torch.float16):
        raise Int4Error(f"--int4 runs on CPU in bfloat16 or float16 (torch's int4 kernel), not {p.device.type} "
                        f"{str(p.dtype).removeprefix('torch.')}; use --dtype bfloat16, or serve without --int4")
    a = model.args
    ready: list[tuple[nn.Module, PackedInt4]] = []
    for name, w in packs:  # iter_int4_linears: one decoded linear held at a time
        i, group = name.split(".")[1:]
        lin = getattr(model.layers[int(i)], group)
        dense = lin.base.weight.detach().float().numpy()
        if w.codes.shape != dense.shape:
            raise Int4Error(f"{name}: the GGUF's 4-bit weight is {w.codes.shape}, the model's {dense.shape}; serve without --int4")
        if not _close(w, dense):
            w = _unpermuted_qk(w, a) if group == "qkv" else w
            if not _close(w, dense):
                raise Int4Error(f"{name}: the GGUF's 4-bit codes do not give the weights the model was loaded with "
                                f"(is --base the same file?); serve without --int4")
        ready.append((lin, PackedInt4(w, p.dtype)))
    for lin, packed in ready:  # commit only once every linear has passed
        lin.int4 = packed
    return len(ready)


def _close(w: Int4Weight, dense: np.ndarray) -> bool:
    return bool(np.all(np.abs(w.dequantize() - dense) <= np.abs(dense) * 2.0 ** -7 + 1e-6))


def _unpermuted_qk(w: Int4Weight, a) -> Int4Weight:
    """The fused q|k|v with q's and k's rows in transformers' restored llama order."""
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    index = np.concatenate([_unpermute_rows(q, a.n_heads), q + _unpermute_rows(kv, a.n_kv_heads), np.arange(q + kv, q + 2 * kv)])
    return w.rows(index)
