"""A Llama-family decoder for serving, in the style of gpt-fast: forward only.

Differences from the HF module it loads its weights from:
  * a preallocated KV cache with one slot per running sequence; every row of a
    batch has its own positions, so rows at different lengths decode together;
  * every projection is a :class:`LoRALinear`, which adds each row's own adapter
    deltas (``lora_ops``) to the shared base matmul.
Loading, sampling and scheduling live elsewhere (``engine.py``).

Supported: Llama / SmolLM / Mistral-style configs (RMSNorm, RoPE without scaling,
SwiGLU MLP, grouped-query attention) and Qwen2 (q/k/v biases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dmoe.engine.lora_ops import dense_weights, lora_delta_dense, lora_delta_gather, use_dense

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

    @classmethod
    def from_hf(cls, cfg) -> "ModelArgs":
        """Read an HF config; refuse what this forward does not implement."""
        if cfg.model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"the torch engine supports llama, mistral and qwen2 models, not {cfg.model_type!r}")
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"RoPE scaling {rope.get('rope_type')!r} is not supported by the torch engine yet")
        theta = rope.get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            vocab_size=cfg.vocab_size, dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
            head_dim=head_dim, hidden_dim=cfg.intermediate_size, norm_eps=cfg.rms_norm_eps, rope_theta=float(theta),
            attn_bias=cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        )


class LoRABatch:
    """Per-step adapter metadata shared by every LoRALinear: set once per forward.

    ``active`` is False when no row of the step has an adapter. Otherwise the step's
    rows use slots in [lo, hi); ``w`` (N, hi - lo) is the dense form and ``idx``,
    ``scale`` (N, K) the sparse form of their choice (see ``lora_ops``); ``dense``
    says which kernel runs.
    """

    def __init__(self):
        self.active = False
        self.dense = True
        self.lo = self.hi = 0
        self.w: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    def set(self, idx: torch.Tensor, scale: torch.Tensor, dtype) -> None:
        """Rows' (slot, weight) pairs, idx/scale (N, K) with slot -1 = none."""
        used = idx[idx >= 0]
        self.active = used.numel() > 0
        if not self.active:
            return
        self.lo, self.hi = int(used.min()), int(used.max()) + 1
        self.dense = use_dense(self.hi - self.lo, idx.shape[1])
        self.idx, self.scale = idx, scale.to(dtype)
        self.w = dense_weights(idx, scale, self.lo, self.hi).to(dtype) if self.dense else None

    def clear(self) -> None:
        self.active = False


class LoRALinear(nn.Module):
    """y = x W^T (+ b) + each row's LoRA deltas from stacked slots A (S, r, in), B (S, r, out)."""

    def __init__(self, base: nn.Linear, batch: LoRABatch):
        super().__init__()
        self.base = base
        self.batch = batch
        self.A: torch.Tensor | None = None  # set by AdapterSlots once an adapter is loaded
        self.B: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        b = self.batch
        if self.A is None or not b.active:
            return y
        if b.dense:
            return y.add_(lora_delta_dense(x, self.A[b.lo:b.hi], self.B[b.lo:b.hi], b.w))
        return y.add_(lora_delta_gather(x, self.A, self.B, b.idx, b.scale))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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
        lin = lambda i, o, bias=False: LoRALinear(nn.Linear(i, o, bias=bias), batch)  # noqa: E731
        self.a = a
        self.q_proj = lin(a.dim, a.n_heads * a.head_dim, a.attn_bias)
        self.k_proj = lin(a.dim, a.n_kv_heads * a.head_dim, a.attn_bias)
        self.v_proj = lin(a.dim, a.n_kv_heads * a.head_dim, a.attn_bias)
        self.o_proj = lin(a.n_heads * a.head_dim, a.dim)
        self.gate_proj = lin(a.dim, a.hidden_dim)
        self.up_proj = lin(a.dim, a.hidden_dim)
        self.down_proj = lin(a.hidden_dim, a.dim)
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, slots, pos, mask, slot_range):
        a = self.a
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(h).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(h).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # write this step's keys/values into each row's own cache slot at its own positions
        rows = slots[:, None].expand(B, T)
        k_cache[rows, pos] = k.transpose(1, 2)  # cache: (slots, seq, nkv, hd)
        v_cache[rows, pos] = v.transpose(1, 2)
        span = mask.shape[-1]
        if slot_range is not None:  # rows sit in consecutive slots: read the cache in place
            lo, hi = slot_range
            keys, vals = k_cache[lo:hi, :span].transpose(1, 2), v_cache[lo:hi, :span].transpose(1, 2)  # (B, nkv, S, hd)
        else:
            keys, vals = k_cache[slots, :span].transpose(1, 2), v_cache[slots, :span].transpose(1, 2)
        # grouped-query attention without copying K/V per head
        att = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, enable_gqa=a.n_heads != a.n_kv_heads)  # (B, nh, T, hd)
        x = x + self.o_proj(att.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Transformer(nn.Module):
    """Forward only: tokens + positions + cache slots -> logits."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.lora = LoRABatch()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a, self.lora) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def allocate_cache(self, max_slots: int, max_seq: int, dtype, device) -> None:
        """The KV cache: (layers, slots, max_seq, n_kv, head_dim), preallocated once."""
        a = self.args
        shape = (a.n_layers, max_slots, max_seq, a.n_kv_heads, a.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, pos: (B, T); slots: (B,). Row b attends to its slot's positions <= pos[b, t].

        Returns (B, V) float logits at position ``logits_at[b]`` of each row (default: the last).
        """
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(pos, self.args.head_dim, self.args.rope_theta, x.dtype)
        span = int(pos.max()) + 1
        mask = torch.arange(span, device=tokens.device)[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, T, S)
        lo = int(slots[0])
        slot_range = (lo, lo + B) if torch.equal(slots.cpu(), torch.arange(lo, lo + B)) else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, self.k_cache[i], self.v_cache[i], slots, pos, mask, slot_range)
        x = x[:, -1] if logits_at is None else x[torch.arange(B, device=x.device), logits_at]  # (B, H)
        return self.lm_head(self.norm(x)).float()


def from_hf(hf_model, dtype=None) -> Transformer:
    """Build a Transformer sharing the weights of a loaded HF causal LM."""
    a = ModelArgs.from_hf(hf_model.config)
    with torch.device("meta"):
        model = Transformer(a)
    sd = hf_model.state_dict()
    tensors = {}
    for name, _ in model.named_parameters():
        hf_name = name.replace(".base.", ".")
        if name.startswith("layers."):
            i, rest = name.split(".", 2)[1:]
            group = "self_attn" if rest.split(".")[0] in ATTN else "mlp" if rest.split(".")[0] in MLP else None
            key = f"model.layers.{i}.{group + '.' if group else ''}{rest.replace('.base.', '.')}"
        elif name == "lm_head.weight":
            key = "lm_head.weight" if "lm_head.weight" in sd and not a.tie_embeddings else "model.embed_tokens.weight"
        else:
            key = f"model.{hf_name}"
        tensors[name] = sd[key]
    model.load_state_dict(tensors, assign=True, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
