"""The MoE layer that replaces a dense MLP: an fp32 linear router, top-k gates, capacity,
and grouped dispatch (tokens sorted by expert, one contiguous slice per expert).

    y = sum over the token's top-k experts e of  gate_e * expert_e(x)

Experts are copies of the dense MLP module, so any MLP layout works (Llama's gated
gate/up/down, GPT-2's c_fc/c_proj, ...). An assignment over an expert's capacity is
dropped: that expert adds nothing for the token, which keeps its residual stream
(Switch Transformer). Top-1 choices are served before top-2 choices, earlier tokens
before later ones (GShard's priority).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dmoe.config import MoEConfig


@dataclass
class RouterStats:
    """What one forward pass of one MoE layer measured (losses keep their graph)."""

    aux_loss: torch.Tensor  # Switch load balancing N * sum_i f_i * P_i
    z_loss: torch.Tensor  # ST-MoE: mean(logsumexp(logits)^2)
    counts: torch.Tensor  # (E,) assignments per expert before capacity
    assignments: int  # top-k assignments of non-padding tokens
    dropped: int  # assignments over capacity
    router_logits: torch.Tensor | None = None  # (N_valid, E) fp32, only when the layer keeps them


def capacity_for(cfg: MoEConfig, n_tokens: int) -> int | None:
    """Tokens each expert takes in this batch (None = unlimited)."""
    if cfg.expert_capacity is not None:
        return cfg.expert_capacity
    if cfg.capacity_factor is not None:
        return max(1, math.ceil(cfg.capacity_factor * n_tokens * cfg.top_k / cfg.num_experts))
    return None


class MoEMLP(nn.Module):
    """``num_experts`` copies of ``mlp`` behind a top-k router."""

    def __init__(self, mlp: nn.Module, hidden_size: int, cfg: MoEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        p = next(mlp.parameters())
        self.router = nn.Linear(hidden_size, cfg.num_experts, bias=False, device=p.device, dtype=torch.float32)
        with torch.no_grad():
            self.router.weight.normal_(0.0, 0.02, generator=generator)
        self.experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(cfg.num_experts))
        if cfg.expert_init_noise > 0:
            with torch.no_grad():
                for expert in self.experts:
                    for w in expert.parameters():
                        if w.ndim >= 2:
                            w.add_(torch.randn(w.shape, generator=generator).to(w) * cfg.expert_init_noise * w.std())
        self.train(mlp.training)  # an upcycled eval-mode model stays in eval mode (no jitter)
        self.token_mask: torch.Tensor | None = None  # (B, T) 1 = real token; set by the model's pre-hook
        self.keep_logits = False
        self.last: RouterStats | None = None

    def _valid(self, shape: torch.Size, device) -> torch.Tensor | None:
        mask = self.token_mask
        if mask is None or not self.cfg.router_ignore_padding_tokens or len(shape) != 3:
            return None
        b, t = shape[0], shape[1]
        if mask.shape[0] != b or mask.shape[1] < t:
            return None
        return mask[:, -t:].reshape(-1).to(device=device, dtype=torch.bool)  # decode steps see the newest columns

    def route(self, h: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 router: (logits (N, E), gates (N, k), expert ids (N, k))."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.float()
            if self.training and self.cfg.router_jitter_noise > 0:
                eps = self.cfg.router_jitter_noise
                x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
            logits = F.linear(x, self.router.weight.float())
            probs = logits.softmax(dim=-1)
            gates, ids = probs.topk(self.top_k, dim=-1)
            if self.cfg.normalize_top_k:
                gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, gates, ids

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        h = hidden.reshape(-1, shape[-1])
        n, k, e = h.shape[0], self.top_k, self.num_experts
        valid = self._valid(shape, h.device)
        logits, gates, ids = self.route(h, valid)

        # Assignments in priority order: all first choices (token order), then all second choices, ...
        flat_expert = ids.t().reshape(-1)  # (k*N,)
        flat_token = torch.arange(n, device=h.device).repeat(k)
        flat_gate = gates.t().reshape(-1)
        if valid is not None:
            keep = valid.repeat(k)
            flat_expert, flat_token, flat_gate = flat_expert[keep], flat_token[keep], flat_gate[keep]
        order = torch.sort(flat_expert, stable=True).indices  # grouped by expert, priority kept within
        sorted_expert = flat_expert[order]
        counts = torch.bincount(sorted_expert, minlength=e)
        cap = capacity_for(self.cfg, int(valid.sum()) if valid is not None else n)
        if cap is not None:
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(sorted_expert.numel(), device=h.device) - starts[sorted_expert]
            fits = rank < cap
            order, sorted_expert = order[fits], sorted_expert[fits]
            kept_counts = torch.bincount(sorted_expert, minlength=e)
        else:
            kept_counts = counts
        tokens = flat_token[order]
        x = h[tokens]  # (M, H): every kept assignment, contiguous per expert
        outs = [self.experts[i](chunk) for i, chunk in enumerate(torch.split(x, kept_counts.tolist())) if chunk.shape[0]]
        y = torch.zeros_like(h)
        if outs:
            weighted = torch.cat(outs) * flat_gate[order].unsqueeze(-1).to(h.dtype)
            y.index_add_(0, tokens, weighted)
        self.last = self._stats(logits, ids, valid, counts, int(flat_expert.numel()), int(flat_expert.numel() - order.numel()))
        return y.reshape(shape)

    def _stats(self, logits, ids, valid, counts, assignments: int, dropped: int) -> RouterStats:
        if valid is not None:
            logits, ids = logits[valid], ids[valid]
        e = self.num_experts
        if logits.shape[0] == 0:
            zero = logits.sum() * 0.0
            return RouterStats(zero, zero, counts.detach(), 0, 0, logits.detach() if self.keep_logits else None)
        probs = logits.softmax(dim=-1)
        f = torch.bincount(ids.reshape(-1), minlength=e).float() / ids.numel()  # share of assignments
        p = probs.mean(dim=0)  # mean router probability
        aux = e * torch.sum(f * p)
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return RouterStats(aux, z, counts.detach(), assignments, dropped, logits.detach() if self.keep_logits else None)


class NaiveMoEMLP(MoEMLP):
    """Reference dispatch for benchmarks and tests: every expert runs on every token, masked."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        h = hidden.reshape(-1, shape[-1])
        logits, gates, ids = self.route(h, None)
        y = torch.zeros_like(h)
        for i, expert in enumerate(self.experts):
            weight = (gates * (ids == i)).sum(dim=-1, keepdim=True).to(h.dtype)  # 0 where not chosen
            y = y + weight * expert(h)
        return y.reshape(shape)
