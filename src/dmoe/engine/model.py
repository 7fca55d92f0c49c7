"""A Llama-family decoder for serving, in the style of gpt-fast: forward only.

Differences from the HF module it loads its weights from:
  * a preallocated KV cache with one slot per running sequence; every row of a
    batch has its own positions, so rows at different lengths decode together;
  * projections that read the same input share one base matmul (q|k|v, gate|up: 4 per
    layer instead of 7, fewer kernel launches per decode step); each HF projection
    stays a :class:`LoRASlice` under its own name, and :class:`LoRALinear` adds each
    row's own adapter deltas (``lora_ops``) into that projection's slice of the output.
Loading, sampling and scheduling live elsewhere (``engine.py``).

Supported: Llama / SmolLM / Mistral-style configs (RMSNorm, RoPE without scaling,
SwiGLU MLP, grouped-query attention), Qwen2 (q/k/v biases) and Gemma-3 text models
(GeGLU, ``(1 + w)`` RMSNorm in fp32 with pre/post norms around attention and MLP, q/k
norms, ``query_pre_attn_scalar``, embeddings scaled by sqrt(dim) and tied to the head,
sliding-window layers with their own RoPE base). Anything else is refused by name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dmoe.engine.lora_ops import dense_weights, lora_add_dense_, lora_delta_dense, lora_delta_gather, use_dense
from dmoe.engine.native import NativeDecode, NativeLoRA, Site
from dmoe.errors import DmoeError

if TYPE_CHECKING:
    from dmoe.engine.int4 import PackedInt4


class UnsupportedModelError(DmoeError):
    """The base's architecture (or a feature of it) is not implemented by this forward."""


SUPPORTED = ("llama", "mistral", "qwen2", "gemma3_text")
GEMMA3 = ("gemma3_text",)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    rope_theta: float
    attn_bias: bool
    tie_embeddings: bool
    # Gemma-3 (defaults: Llama)
    gemma: bool = False                 # (1 + w) norms in fp32, q/k norms, sandwich norms, GeGLU, scaled embeddings
    attn_scale: float | None = None     # None: head_dim ** -0.5
    sliding_window: int | None = None   # local layers attend to the last ``sliding_window`` positions
    local_layers: tuple[int, ...] = ()  # the layers with a sliding window
    rope_local_theta: float = 10000.0

    @classmethod
    def from_hf(cls, cfg) -> "ModelArgs":
        """Read an HF config; refuse what this forward does not implement."""
        if cfg.model_type not in SUPPORTED:
            raise UnsupportedModelError(f"the torch engine supports {', '.join(SUPPORTED)} models, not {cfg.model_type!r}; "
                                        "serve this base with --engine llamacpp (a GGUF base) or use dmoe generate")
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        gemma = cfg.model_type in GEMMA3
        local_rope: dict = {}
        if gemma:
            for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
                if getattr(cfg, cap, None) is not None:
                    raise UnsupportedModelError(f"{cap} is not supported by the torch engine")
            if getattr(cfg, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
                raise UnsupportedModelError(f"activation {cfg.hidden_activation!r} is not supported by the torch engine")
            local_rope = rope.get("sliding_attention") or {}
            rope = rope.get("full_attention") or {}
        for r in (rope, local_rope):
            if r.get("rope_type", "default") not in ("default", None):
                raise UnsupportedModelError(f"RoPE scaling {r.get('rope_type')!r} is not supported by the torch engine yet")
        if not gemma and getattr(cfg, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"activation {cfg.hidden_act!r} is not supported by the torch engine")
        theta = rope.get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        layer_types = list(getattr(cfg, "layer_types", None) or [])
        if not gemma and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) \
                and "sliding_attention" in layer_types:
            raise UnsupportedModelError("sliding-window attention is supported for Gemma-3 only in the torch engine")
        gemma_kw: dict[str, Any] = {}
        if gemma:
            gemma_kw = dict(gemma=True, attn_scale=float(cfg.query_pre_attn_scalar) ** -0.5, sliding_window=cfg.sliding_window,
                            local_layers=tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention"),
                            rope_local_theta=float(local_rope.get("rope_theta", 10000.0)))
        return cls(
            vocab_size=cfg.vocab_size, dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
            head_dim=head_dim, hidden_dim=cfg.intermediate_size, norm_eps=cfg.rms_norm_eps, rope_theta=float(theta),
            attn_bias=cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), **gemma_kw,
        )


class LoRABatch:
    """Per-step adapter metadata shared by every LoRALinear: set once per forward.

    ``active`` is False when no row of the step has an adapter. Otherwise the step's
    rows use slots in [lo, hi); ``w`` (N, hi - lo) is the dense form and ``idx``,
    ``scale`` (N, K) the sparse form of their choice (see ``lora_ops``); ``dense``
    says which torch kernel runs. With the C kernel (``use_native``, CPU), ``w32`` is the
    dense form in fp32 on the host, and decode steps (one token per row) run it.
    Built on the host from the rows' Python (slot, scale) lists and copied to the device
    once: nothing here reads a device tensor back.
    """

    def __init__(self):
        self.from_zero = False  # slot ranges start at slot 0 (compiled blocks: the range is a tensor size, not a constant)
        self.native: NativeLoRA | None = None  # the C kernel for decode steps (``use_native``); None: torch ops only
        self.w32: torch.Tensor | None = None  # (N, hi - lo) fp32 contiguous: the native kernel's form of ``w``
        self.active = False
        self.dense = True
        self.lo = self.hi = 0
        self.w: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    def set(self, rows: Sequence[Sequence[tuple[int, float]]], dtype: torch.dtype, device: torch.device) -> None:
        """Each row's (slot, scale) pairs; an empty row is the bare base."""
        used = [s for row in rows for s, _ in row]
        self.active = bool(used)
        if not self.active:
            return
        k = max(len(row) for row in rows)
        idx = torch.full((len(rows), k), -1, dtype=torch.long)  # (N, K), -1 = no adapter
        scale = torch.zeros((len(rows), k))
        for i, row in enumerate(rows):
            for j, (s, w) in enumerate(row):
                idx[i, j], scale[i, j] = s, w
        self.lo, self.hi = 0 if self.from_zero else min(used), max(used) + 1
        self.dense = use_dense(self.hi - self.lo, k)
        self.idx, self.scale = idx.to(device), scale.to(device=device, dtype=dtype)
        w32 = dense_weights(idx, scale, self.lo, self.hi) if self.dense or self.native is not None else None
        self.w = w32.to(device=device, dtype=dtype) if self.dense and w32 is not None else None
        self.w32 = w32 if self.native is not None else None

    def use_native(self, kernel: "NativeLoRA | None") -> None:
        """Run the LoRA of decode steps on ``kernel`` (CPU models only;
        the torch ops stay for wider steps, and are the reference the kernel is tested against)."""
        self.native = kernel

    def clear(self) -> None:
        self.active = False


@dataclass
class StepInput:
    """One forward pass's inputs. The tensors are on the model's device; ``span`` and
    ``slot_range`` are Python ints the engine already knows, so the forward never
    reads a device tensor back (no host syncs: ready for CUDA graphs)."""

    tokens: torch.Tensor                # (B, T) token ids
    pos: torch.Tensor                   # (B, T) each token's position in its own sequence
    slots: torch.Tensor                 # (B,) each row's KV-cache slot
    span: int                           # max position + 1: the cache columns attention reads
    slot_range: tuple[int, int] | None  # (lo, hi) when the rows sit in KV slots lo..hi-1 in order
    logits_at: torch.Tensor | None = None  # (B,) position whose logits each row returns; None = last

    @classmethod
    def build(cls, tokens: list[list[int]], positions: list[list[int]], slots: list[int], device,
              logits_at: list[int] | None = None) -> "StepInput":
        """From host lists (rows right-padded to one length by the caller)."""
        lo = slots[0]
        consecutive = slots == list(range(lo, lo + len(slots)))
        return cls(
            tokens=torch.tensor(tokens, dtype=torch.long).to(device),
            pos=torch.tensor(positions, dtype=torch.long).to(device),
            slots=torch.tensor(slots, dtype=torch.long).to(device),
            span=max(max(p) for p in positions) + 1,
            slot_range=(lo, lo + len(slots)) if consecutive else None,
            logits_at=None if logits_at is None else torch.tensor(logits_at, dtype=torch.long).to(device),
        )


@dataclass
class LayerInput:
    """What every Block of one forward shares: the step plus RoPE and the attention mask
    (Gemma-3's local layers: their own RoPE and a sliding-window mask)."""

    step: StepInput
    cos: torch.Tensor   # (B, 1, T, hd)
    sin: torch.Tensor   # (B, 1, T, hd)
    mask: torch.Tensor  # (B, 1, T, span) True = may attend
    local: "LayerInput | None" = None
    bias: torch.Tensor | None = None  # decode steps: the mask as an fp32 additive bias (0 or -inf)


def mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask (True = may attend) as an fp32 additive bias."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention for one new token per row, as two batched matmuls and an fp32 softmax.

    q (B, nh, 1, hd); k, v (B, nkv, S, hd), head h reading kv head h // (nh // nkv) (HF's
    ``repeat_kv``); bias (B, 1, 1, S) fp32, 0 or -inf. Returns (B, nh, 1, hd). The scores
    are rounded to the input dtype before the fp32 scale, mask and softmax (HF's eager
    attention does the same). On CPU this is 3-4x faster than ``scaled_dot_product_attention``
    at one query token (torch 2.13: its flash kernel has nothing to split a single query
    over), and the gap grows with the span read; prefill keeps SDPA.
    """
    B, nh, _, hd = q.shape
    nkv = k.shape[1]
    qg = q.reshape(B, nkv, nh // nkv, hd)  # the heads that share kv head i, side by side
    scores = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scale).add_(bias)  # (B, nkv, g, S)
    return torch.matmul(scores.softmax(-1).to(q.dtype), v).reshape(B, nh, 1, hd)


class LoRASlice(nn.Module):
    """One projection of the HF model (``q_proj``, ``up_proj``, ...): its place in a fused
    linear's output, and its adapter slots A (S, r, in), B (S, r, out) (set by AdapterSlots)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None


class LoRALinear(nn.Module):
    """One base matmul for several projections that read the same input (q|k|v, gate|up),
    plus each row's LoRA deltas added into each projection's slice of the output.

    The parts' adapter slots live in two buffers of this layer (set by ``AdapterSlots``):
    ``A`` (S, P, r, in) stacks every part's A, and ``B`` (S, P, r, out) holds part j's B in
    its own column block (zeros elsewhere); each part's ``A``/``B`` are views into them. So
    the fast path is one delta for the whole layer (two matmuls, whatever P is), and the
    per-part loop (``fused = False``, or the sparse kernel) is the reference it must equal.
    """

    fused = os.environ.get("DMOE_LORA_FUSED", "1") != "0"  # 0: the per-part reference path (benchmarks)

    def __init__(self, in_features: int, parts: list[LoRASlice], batch: LoRABatch, bias: bool = False):
        super().__init__()
        self.base = nn.Linear(in_features, sum(p.out_features for p in parts), bias=bias)
        self.parts = parts  # a plain list: the slices are registered on their Block, under the HF names
        self.batch = batch
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None
        self.int4: PackedInt4 | None = None  # the GGUF's packed 4-bit weight (``int4.attach_int4``), for small steps
        offs = [0]
        for p in parts:
            offs.append(offs[-1] + p.out_features)
        self.part_off = torch.tensor(offs[:-1], dtype=torch.int64, device="cpu")  # each part's first output column (the native kernel)
        self.part_len = torch.tensor([p.out_features for p in parts], dtype=torch.int64, device="cpu")
        self.sites: dict[tuple[int, int], Site] = {}  # (lo, width) -> the native kernel's checked view of A, B

    def set_slots(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """New slot buffers (AdapterSlots): the native kernel's cached addresses are dropped."""
        self.A, self.B = A, B
        self.sites.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4 is not None and x.shape[0] * x.shape[1] <= self.int4.max_rows:
            y = self.int4(x, self.base.bias)
        else:
            y = self.base(x)
        b = self.batch
        if not b.active:
            return y
        if (b.native is not None and b.w32 is not None and self.A is not None and self.B is not None
                and x.shape[1] == 1):  # a decode step: the C kernel
            # Decode steps only, whatever their rows, and prefills never: a request's path then
            # never depends on its batch-mates (a prefill's rows are its batch's tokens), so a
            # greedy reply is the same alone and under load.
            s = b.w32.shape[1]
            site = self.sites.get((b.lo, s))
            if site is None:  # once per slot range, until the buffers change (set_slots)
                site = self.sites[(b.lo, s)] = b.native.site(self.A[b.lo:b.lo + s], self.B[b.lo:b.lo + s],
                                                             self.part_off, self.part_len)
            return b.native.run_(site, y, x.contiguous(), b.w32)
        if b.dense and self.fused and self.A is not None and self.B is not None:
            assert b.w is not None
            s, n_parts, r = b.w.shape[1], self.A.shape[1], self.A.shape[2]  # s = hi - lo, read from a size (compile: symbolic)
            A = self.A[b.lo:b.lo + s].view(s, n_parts * r, -1)  # a slot range of a contiguous buffer: views, no copy
            B = self.B[b.lo:b.lo + s].view(s, n_parts * r, -1)
            return lora_add_dense_(y, x, A, B, b.w)
        start = 0
        for p in self.parts:
            if p.A is not None and p.B is not None:
                out = y[..., start:start + p.out_features]
                if b.dense:
                    assert b.w is not None
                    out.add_(lora_delta_dense(x, p.A[b.lo:b.hi], p.B[b.lo:b.hi], b.w))
                else:
                    assert b.idx is not None and b.scale is not None
                    out.add_(lora_delta_gather(x, p.A, p.B, b.idx, b.scale))
            start += p.out_features
        return y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemma:  # Gemma's order: normalise and scale by (1 + w) in fp32, then round
            return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1.0 + self.weight.float())).to(x.dtype)
        # Llama's order: normalise in fp32, round to the input dtype, then scale
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for positions ``pos`` (B, T) -> (B, 1, T, head_dim), HF's rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=pos.device) / head_dim))
    freqs = pos.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, a: ModelArgs, batch: LoRABatch):
        super().__init__()
        self.a = a
        q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        self.q_proj, self.k_proj, self.v_proj = LoRASlice(a.dim, q), LoRASlice(a.dim, kv), LoRASlice(a.dim, kv)
        self.o_proj = LoRASlice(q, a.dim)
        self.gate_proj, self.up_proj = LoRASlice(a.dim, a.hidden_dim), LoRASlice(a.dim, a.hidden_dim)
        self.down_proj = LoRASlice(a.hidden_dim, a.dim)
        # fused base matmuls: 4 per layer instead of 7
        self.qkv = LoRALinear(a.dim, [self.q_proj, self.k_proj, self.v_proj], batch, bias=a.attn_bias)
        self.o = LoRALinear(q, [self.o_proj], batch)
        self.gate_up = LoRALinear(a.dim, [self.gate_proj, self.up_proj], batch)
        self.down = LoRALinear(a.hidden_dim, [self.down_proj], batch)
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps, a.gemma)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps, a.gemma)
        if a.gemma:  # Gemma-3: q/k norms, and norms after attention and around the MLP
            self.q_norm, self.k_norm = RMSNorm(a.head_dim, a.norm_eps, True), RMSNorm(a.head_dim, a.norm_eps, True)
            self.pre_feedforward_layernorm = RMSNorm(a.dim, a.norm_eps, True)
            self.post_feedforward_layernorm = RMSNorm(a.dim, a.norm_eps, True)

    def forward(self, x: torch.Tensor, li: LayerInput, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim); this layer's cache (slots, max_seq, nkv, hd) is written in place."""
        a, step = self.a, li.step
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        q, k, v = self.qkv(h).split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)
        q = q.view(B, T, a.n_heads, a.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        if a.gemma:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, li.cos, li.sin), apply_rope(k, li.cos, li.sin)
        # write this step's keys/values into each row's own cache slot at its own positions
        rows = step.slots[:, None].expand(B, T)
        k_cache[rows, step.pos] = k.transpose(1, 2)  # cache: (slots, seq, nkv, hd)
        v_cache[rows, step.pos] = v.transpose(1, 2)
        if step.slot_range is not None:  # rows sit in consecutive slots: read the cache in place
            lo, hi = step.slot_range
            keys, vals = k_cache[lo:hi, :step.span].transpose(1, 2), v_cache[lo:hi, :step.span].transpose(1, 2)  # (B, nkv, S, hd)
        else:
            keys, vals = k_cache[step.slots, :step.span].transpose(1, 2), v_cache[step.slots, :step.span].transpose(1, 2)
        # grouped-query attention without copying K/V per head
        if li.bias is not None:  # one new token per row
            att = decode_attention(q, keys, vals, li.bias, a.attn_scale or a.head_dim ** -0.5)
        else:
            att = F.scaled_dot_product_attention(q, keys, vals, attn_mask=li.mask, enable_gqa=a.n_heads != a.n_kv_heads,
                                                 scale=a.attn_scale)  # (B, nh, T, hd)
        out = self.o(att.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))
        if a.gemma:
            x = x + self.post_attention_layernorm(out)
            gate, up = self.gate_up(self.pre_feedforward_layernorm(x)).chunk(2, dim=-1)
            return x + self.post_feedforward_layernorm(self.down(F.gelu(gate, approximate="tanh") * up))
        x = x + out
        gate, up = self.gate_up(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Transformer(nn.Module):
    """Forward only: tokens + positions + cache slots -> logits."""

    decode_sdpa = os.environ.get("DMOE_DECODE_SDPA", "0") == "1"  # 1: SDPA for decode steps too (the baseline)

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.lora = LoRABatch()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a, self.lora) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps, a.gemma)
        self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.glue: NativeDecode | None = None  # decode steps' norms, RoPE, attention and SwiGLU in C (``use_native_decode``)

    def use_native_decode(self, glue: NativeDecode | None) -> bool:
        """Run decode steps' work between the matmuls on ``glue`` (``decode_cpu.c``) where it applies:
        a Llama-family model (not Gemma-3: its norms and GeGLU stay on torch ops) on CPU in bf16 or
        fp32. Returns whether it does. The torch path stays for prefills and is the reference."""
        p = self.embed_tokens.weight
        ok = glue is not None and not self.args.gemma and p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float32)
        self.glue = glue if ok else None
        return self.glue is not None

    def allocate_cache(self, max_slots: int, max_seq: int, dtype, device) -> None:
        """The KV cache: (layers, slots, max_seq, n_kv, head_dim), preallocated once."""
        a = self.args
        shape = (a.n_layers, max_slots, max_seq, a.n_kv_heads, a.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    @torch.no_grad()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Row b attends to its slot's positions <= pos[b, t]. Returns (B, V) float logits at
        position ``step.logits_at[b]`` of each row (default: the last), on the model's device."""
        a, B = self.args, step.tokens.shape[0]
        if self.glue is not None and step.tokens.shape[1] == 1:
            return self._decode_native(step)
        x = self.embed_tokens(step.tokens)  # (B, T, dim)
        if a.gemma:
            x = x * torch.tensor(a.dim ** 0.5, dtype=x.dtype)  # HF rounds the scale to the weights' dtype first
        cos, sin = rope_cos_sin(step.pos, a.head_dim, a.rope_theta, x.dtype)
        cols = torch.arange(step.span, device=x.device)
        mask = cols[None, None, None, :] <= step.pos[:, None, :, None]  # (B, 1, T, span)
        li = LayerInput(step, cos, sin, mask)
        if a.local_layers:
            lcos, lsin = rope_cos_sin(step.pos, a.head_dim, a.rope_local_theta, x.dtype)
            assert a.sliding_window is not None
            window = cols[None, None, None, :] > step.pos[:, None, :, None] - a.sliding_window
            li.local = LayerInput(step, lcos, lsin, mask & window)
        if step.tokens.shape[1] == 1 and not self.decode_sdpa:  # decode: batched matmuls, not SDPA (decode_attention)
            li.bias = mask_bias(mask)
            if li.local is not None:
                li.local.bias = mask_bias(li.local.mask)
        assert self.k_cache is not None and self.v_cache is not None, "allocate_cache() first"
        for i, layer in enumerate(self.layers):
            x = layer(x, li.local if li.local is not None and i in a.local_layers else li, self.k_cache[i], self.v_cache[i])
        x = x[:, -1] if step.logits_at is None else x[torch.arange(B, device=x.device), step.logits_at]  # (B, dim)
        return self.lm_head(self.norm(x)).float()

    def _decode_native(self, step: StepInput) -> torch.Tensor:
        """A decode step with the work between the matmuls in C (``decode_cpu.c``): per layer the
        four fused linears (int4 or dense, each with its rows' LoRA) and three calls, where the
        torch path (``Block.forward``, the reference) runs about fifty ops. The residual stream
        ``x`` is updated in place; each norm is fused with the residual add before it."""
        a, glue, B = self.args, self.glue, step.tokens.shape[0]
        assert glue is not None and self.k_cache is not None and self.v_cache is not None, "allocate_cache() first"
        if step.span > self.k_cache.shape[2] or int(step.slots.max()) >= self.k_cache.shape[1] or int(step.pos.min()) < 0:
            raise IndexError(f"decode step outside the KV cache: span {step.span}, slots {step.slots.tolist()}")
        x = self.embed_tokens(step.tokens).view(B, a.dim)  # (B, dim), a new contiguous tensor
        h = torch.empty_like(x)
        q_dim = a.n_heads * a.head_dim
        att = torch.empty((B, q_dim), dtype=x.dtype)
        act = torch.empty((B, a.hidden_dim), dtype=x.dtype)
        cos, sin = rope_cos_sin(step.pos, a.head_dim, a.rope_theta, x.dtype)  # (B, 1, 1, hd), contiguous
        pos, slots = step.pos.view(B), step.slots
        shape, scale, max_seq = (a.n_heads, a.n_kv_heads, a.head_dim), a.attn_scale or a.head_dim ** -0.5, self.k_cache.shape[2]
        k0, v0 = self.k_cache.data_ptr(), self.v_cache.data_ptr()
        layer_bytes = self.k_cache[0].numel() * self.k_cache.element_size()
        layers = cast("list[Block]", list(self.layers))
        glue.add_rmsnorm_(x, None, layers[0].input_layernorm.weight, h, a.norm_eps)
        for i, layer in enumerate(layers):
            qkv = layer.qkv.forward(h.view(B, 1, a.dim))
            glue.rope_attend(qkv, shape, cos, sin, slots, pos, k0 + i * layer_bytes, v0 + i * layer_bytes, max_seq, 0, scale, att)
            glue.add_rmsnorm_(x, layer.o.forward(att.view(B, 1, q_dim)), layer.post_attention_layernorm.weight, h, a.norm_eps)
            glue.silu_mul(layer.gate_up.forward(h.view(B, 1, a.dim)), act)
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            glue.add_rmsnorm_(x, layer.down.forward(act.view(B, 1, a.hidden_dim)), norm.weight, h, a.norm_eps)
        return self.lm_head(h).float()


def compile_blocks(model: Transformer) -> None:
    """``torch.compile`` every decoder block (``dmoe serve --compile``): inductor fuses the
    norms, RoPE, the LoRA scaling and the residual adds around the matmuls, and the Python
    work of each block becomes one call. Shapes are dynamic (batch, length, the span of the
    cache read), so a block compiles a few graphs (one token or many, adapters on or off,
    dense or gathered LoRA), shared by every layer; compiled code is cached on disk under
    ``$DMOE_HOME/inductor`` (TORCHINDUCTOR_CACHE_DIR), so a restart reuses it. The first
    compile takes tens of seconds on 2 cores: the caller warms up before serving."""
    import torch._dynamo

    from dmoe.io import dmoe_home

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(dmoe_home() / "inductor"))
    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, 256)  # every layer shares one code object
    cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4096)
    # Slot ranges start at 0 and their width is read from a tensor's size, so a new set of
    # adapters is not a new constant to specialise on (a recompile stalls serving for seconds).
    model.lora.from_zero = True
    model.lora.use_native(None)  # a ctypes call would break the graphs: compiled blocks keep the torch ops
    model.use_native_decode(None)
    for layer in model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)


FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


def from_hf(hf_model, dtype=None) -> Transformer:
    """Build a Transformer from a loaded HF causal LM (q|k|v and gate|up weights concatenated)."""
    a = ModelArgs.from_hf(hf_model.config)
    with torch.device("meta"):
        model = Transformer(a)
    sd = hf_model.state_dict()
    tensors = {}
    for name, _ in model.named_parameters():
        if name.startswith("layers.") and name.split(".")[2] in FUSED:
            i, group, _, kind = name.split(".")[1:]  # layers.{i}.{group}.base.{weight|bias}
            parts = [sd[f"model.layers.{i}.{'self_attn' if p in ATTN else 'mlp'}.{p}.{kind}"] for p in FUSED[group]]
            tensors[name] = torch.cat(parts) if len(parts) > 1 else parts[0]
        elif name == "lm_head.weight":
            tensors[name] = sd["lm_head.weight" if "lm_head.weight" in sd and not a.tie_embeddings else "model.embed_tokens.weight"]
        elif name.startswith("layers.") and name.split(".")[2] in ("q_norm", "k_norm"):
            i, norm = name.split(".")[1:3]
            tensors[name] = sd[f"model.layers.{i}.self_attn.{norm}.weight"]
        else:
            tensors[name] = sd[f"model.{name}"]
    model.load_state_dict(tensors, assign=True, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
