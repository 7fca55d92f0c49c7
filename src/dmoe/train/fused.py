"""Fused training ops: the LoRA linear layer and the LM head's cross-entropy.

Each is one ``torch.autograd.Function`` with a hand-written backward, kept apart
from model code (as vLLM keeps its LoRA kernels apart from its models):

* ``LoraLinearFunction``: ``y = x W^T + s (x A^T) B^T`` in the compute dtype, with
  the minimum of matmuls and no activation casts. Under bf16 autocast PEFT's
  forward casts the input to the fp32 LoRA dtype and autocast casts it back, per
  layer, forward and backward; on a CPU those copies cost more than the LoRA
  matmuls themselves. ``fused_lora(model)`` routes PEFT's own ``lora.Linear``
  modules through it while training; the parameters stay PEFT's, so saving,
  loading and the adapter format do not change.
* ``linear_cross_entropy_sum``: the LM head and the cross-entropy in row chunks,
  with the gradient of the hidden states computed in the forward pass (as Liger's
  fused linear cross-entropy does). The full (rows, vocab) logits are never held,
  and the softmax is read once instead of four times.

Both fall back to the plain path wherever they do not apply (DoRA, dropout > 0,
several active adapters, a trainable base or head): the result is the same.
docs/benchmarks.md has the measured effect of each.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

# Logits held at once by the fused cross-entropy: 8M floats (32 MB).
_CE_CHUNK_ELEMENTS = 1 << 23


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in: autocast's where it is on, else the weight's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class LoraLinearFunction(torch.autograd.Function):
    """``x W^T + b + scaling * (x A^T) B^T`` with W and b frozen, A and B trainable.

    Shapes: x (..., in), W (out, in), A (r, in), B (out, r). Everything is computed
    in x's dtype; the gradients of A and B come back in their own dtype (fp32 master
    weights under mixed precision).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(x2.dtype), lora_b.to(x2.dtype)
        xa = x2 @ a.t()  # (N, r)
        y = F.linear(x2, weight, bias)
        y.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scaling = scaling
        ctx.lead = lead
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, xa, weight, a, b = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(x2.dtype)
        dy_b = (dy @ b).mul_(ctx.scaling)  # (N, r): the gradient at x A^T
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (dy @ weight).addmm_(dy_b, a).view(*ctx.lead, x2.shape[-1])
        if ctx.needs_input_grad[3]:
            grad_a = (dy_b.t() @ x2).to(ctx.lora_dtypes[0])
        if ctx.needs_input_grad[4]:
            grad_b = (dy.t() @ xa).mul_(ctx.scaling).to(ctx.lora_dtypes[1])
        return grad_x, None, None, grad_a, grad_b, None


def _fused_lora_applies(layer, kwargs: dict) -> bool:
    if kwargs or layer.merged or layer.disable_adapters or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return False  # not this layer's adapter, or DoRA and the like
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training:
        return False
    base = layer.base_layer
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return False
    return base.bias is None or not base.bias.requires_grad


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Replacement ``forward`` for a PEFT ``lora.Linear`` (bound by ``fused_lora``)."""
    if args or not _fused_lora_applies(self, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    dtype = compute_dtype(x, base.weight)
    bias = None if base.bias is None else base.bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return LoraLinearFunction.apply(
            x.to(dtype), base.weight.to(dtype), bias,
            self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]),
        )


@contextlib.contextmanager
def fused_lora(model, enabled: bool = True):
    """Inside the block, PEFT LoRA linear layers of ``model`` run ``LoraLinearFunction``."""
    if not enabled:
        yield 0
        return
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for m in layers:
        m.forward = types.MethodType(_fused_lora_forward, m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            del m.forward  # the instance attribute; the class method shows again


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Sum over rows of ``cross_entropy(softcap(h W^T), target)``; grad of h made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap: float | None, chunk_rows: int):
        grad_h = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            rows = torch.arange(h.shape[0], device=h.device)
            logits, tanh = _capped_logits(h, weight, softcap)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits[rows, t]).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            grad[rows, t] -= 1.0
            if tanh is not None:
                grad.mul_(1.0 - tanh * tanh)
            torch.mm(grad.to(hidden.dtype), weight, out=grad_h[start:start + chunk_rows])
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), None, None, None, None


def _capped_logits(h, weight, softcap):
    """fp32 logits of one chunk, soft-capped where the model does; and tanh for the gradient."""
    logits = (h @ weight.t()).float()
    if not softcap:
        return logits, None
    tanh = torch.tanh(logits / softcap)
    return tanh * softcap, tanh


def linear_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                             softcap: float | None = None, fused: bool = True) -> torch.Tensor:
    """Sum of token cross-entropies of ``head(hidden)`` against ``targets``.

    hidden (N, H), targets (N,). Fused and chunked when the head is a frozen
    bias-free linear layer (and ``fused``); otherwise ``F.cross_entropy`` on full logits.
    """
    weight = getattr(head, "weight", None)
    fusable = (fused and type(head) is torch.nn.Linear and head.bias is None and weight is not None
               and not weight.requires_grad)
    if not fusable:
        logits = head(hidden).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets, reduction="sum")
    assert weight is not None
    dtype = compute_dtype(hidden, weight)
    h, w = hidden.to(dtype), weight.to(dtype)
    chunk_rows = max(1, _CE_CHUNK_ELEMENTS // w.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and hidden.requires_grad:
            return LinearCrossEntropyFunction.apply(h, w, targets, softcap, chunk_rows)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, h.shape[0], chunk_rows):
            logits, _ = _capped_logits(h[start:start + chunk_rows], w, softcap)
            total += F.cross_entropy(logits, targets[start:start + chunk_rows], reduction="sum")
        return total
