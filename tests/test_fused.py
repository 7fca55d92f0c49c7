"""The fused training ops compute what PEFT and F.cross_entropy compute, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dmoe.config import load_train_config
from dmoe.train import fused
from dmoe.train.fused import LoraLinearFunction, fused_lora, linear_cross_entropy_sum
from dmoe.train.trainer import training_attention


class TwoLinears(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.up = torch.nn.Linear(24, 40, bias=bias)
        self.down = torch.nn.Linear(40, 24, bias=bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _lora_model(bias=False, dtype=torch.float32, **lora_kwargs):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = TwoLinears(bias).to(dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], **lora_kwargs))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would hide half the maths
            torch.nn.init.normal_(p, std=0.1)
    return model


def _run(model, x, fuse: bool, autocast_dtype=None):
    """Output, and grads of x and of every trainable parameter, for sum(out**2)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with fused_lora(model, enabled=fuse), torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(x)
    out.float().pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_matches_peft_in_fp32(bias):
    model = _lora_model(bias)
    x = torch.randn(3, 5, 24)
    out_ref, gx_ref, g_ref = _run(model, x, fuse=False)
    out, gx, g = _run(model, x, fuse=True)
    assert torch.allclose(out, out_ref, atol=1e-5)
    assert torch.allclose(gx, gx_ref, atol=1e-5)
    assert g.keys() == g_ref.keys() and len(g) == 4
    for name in g:
        assert torch.allclose(g[name], g_ref[name], atol=1e-5), name


def test_fused_lora_matches_peft_under_bf16_autocast():
    model = _lora_model(dtype=torch.bfloat16)
    for _name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # mixed precision: bf16 base, fp32 LoRA master weights
    x = torch.randn(4, 6, 24, dtype=torch.bfloat16)
    out_ref, gx_ref, g_ref = _run(model, x, fuse=False, autocast_dtype=torch.bfloat16)
    out, gx, g = _run(model, x, fuse=True, autocast_dtype=torch.bfloat16)
    assert out.dtype == out_ref.dtype == torch.bfloat16
    assert torch.allclose(out.float(), out_ref.float(), rtol=2e-2, atol=2e-2)
    assert torch.allclose(gx.float(), gx_ref.float(), rtol=5e-2, atol=5e-2)
    for name in g:
        assert g[name].dtype == torch.float32
        rel = (g[name] - g_ref[name]).norm() / g_ref[name].norm()
        assert rel < 2e-2, (name, float(rel))


def test_fused_lora_falls_back_to_peft_where_it_does_not_apply():
    x = torch.randn(2, 3, 24)
    with_dropout = _lora_model(lora_dropout=0.5)
    torch.manual_seed(1)
    ref, _, _ = _run(with_dropout, x, fuse=False)
    torch.manual_seed(1)
    out, _, _ = _run(with_dropout, x, fuse=True)
    assert torch.equal(out, ref)  # the same dropout masks: PEFT's own forward ran
    dora = _lora_model(use_dora=True)
    ref, _, g_ref = _run(dora, x, fuse=False)
    out, _, g = _run(dora, x, fuse=True)
    assert torch.allclose(out, ref, atol=1e-6) and g.keys() == g_ref.keys()


def test_fused_lora_is_undone_after_the_block():
    model = _lora_model()
    layers = [m for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
    with fused_lora(model) as n:
        assert n == len(layers) == 2
        assert all("forward" in m.__dict__ for m in layers)
    assert not any("forward" in m.__dict__ for m in layers)


def test_lora_function_skips_the_input_grad_nobody_needs():
    x = torch.randn(5, 8)
    w, a, b = torch.randn(6, 8), torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    y = LoraLinearFunction.apply(x, w, None, a, b, 2.0)
    y.sum().backward()
    ref_a, ref_b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (x @ w.t() + 2.0 * (x @ ref_a.t()) @ ref_b.t()).sum().backward()
    assert torch.allclose(a.grad, ref_a.grad, atol=1e-5) and torch.allclose(b.grad, ref_b.grad, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_linear_cross_entropy_matches_full_logits(monkeypatch, softcap):
    monkeypatch.setattr(fused, "_CE_CHUNK_ELEMENTS", 7 * 50)  # 7-row chunks: 23 rows = 3 full + 1 partial
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    h = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))

    loss = linear_cross_entropy_sum(h, head, targets, softcap)
    (3.0 * loss).backward()
    h_ref = h.detach().clone().requires_grad_(True)
    logits = head(h_ref)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = F.cross_entropy(logits, targets, reduction="sum")
    (3.0 * ref).backward()
    assert torch.allclose(loss, ref, atol=1e-4)
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-5)
    with torch.no_grad():  # evaluation: the loss alone, chunked
        assert torch.allclose(linear_cross_entropy_sum(h, head, targets, softcap), ref, atol=1e-4)


def test_linear_cross_entropy_with_a_trainable_head_trains_the_head():
    head = torch.nn.Linear(8, 30, bias=False)
    h = torch.randn(5, 8, requires_grad=True)
    linear_cross_entropy_sum(h, head, torch.randint(0, 30, (5,))).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_training_attention_is_eager_only_where_measured_faster(tiny_base):
    from dmoe.base import load_base

    model, _, _ = load_base(tiny_base)
    model.config._attn_implementation = "sdpa"
    with training_attention(model, "cpu", torch.bfloat16, 256) as impl:
        assert impl == "eager" == model.config._attn_implementation
    assert model.config._attn_implementation == "sdpa"
    for args in (("cpu", None, 256), ("cpu", torch.bfloat16, 1024), ("cuda", torch.bfloat16, 256)):
        with training_attention(model, *args) as impl:
            assert impl == "sdpa"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_and_plain_training_give_the_same_losses(tiny_train_cfg, tmp_path, checkpointing):
    from dmoe.train import train

    losses = {}
    for flag in (True, False):
        out = tmp_path / f"fused-{flag}"
        cfg = load_train_config(None, tiny_train_cfg(out, max_steps=4, logging_steps=1, val_size=0.2,
                                                     gradient_checkpointing=checkpointing))
        result = train(cfg, show_progress=False, fused=flag)
        rows = [r for r in map(__import__("json").loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
        losses[flag] = [r["loss"] for r in rows] + [result.eval_loss]
    assert len(losses[True]) == 5
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
