"""The real embedded SmolLM2-135M-Instruct: training works on it, and the bundled
experts behave as promised. Marked slow; CI runs them (they guard promised behaviour)."""

import json
import re
from pathlib import Path

import pytest
import torch

from dmoe.base import load_base
from dmoe.config import load_train_config
from dmoe.evals.hits import answer_all, read_questions
from dmoe.experts import apply_expert, check_base, find_experts, load_expert
from dmoe.train import train
from dmoe.train.trainer import encode_dataset, evaluate, split_val

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    return load_base(None)


def test_a_few_steps_reduce_the_loss_and_the_expert_loads_back(tmp_path, embedded):
    out = tmp_path / "auto"
    cfg = load_train_config(REPO / "examples" / "configs" / "automotive.yaml", [
        f"output_dir={out}", "max_steps=12", "max_samples=96", "val_size=16", "logging_steps=1",
        "learning_rate=5e-4", "warmup_ratio=0", "adapter_dtype=float32", "bf16=false",  # fp32: exact round trip below
    ])
    res = train(cfg, show_progress=False)
    rows = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(train_losses[-4:]) / 4 < sum(train_losses[:4]) / 4  # batch losses are noisy: means of four

    model, tok, base = embedded
    _, val = split_val(encode_dataset(cfg, tok)[0], cfg.val_size, cfg.seed)
    base_loss = evaluate(model, val, tok.pad_token_id, 8)
    assert res.eval_loss is not None and res.eval_loss < base_loss - 0.3  # the held-out rows improve
    expert = load_expert(out)
    check_base(expert, base.identity)
    ids = tok("<|im_start|>user\nWhat car should I buy?<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt").input_ids
    with torch.no_grad():
        want = res.model(input_ids=ids).logits
        peft_model = apply_expert(model, expert)
        got = peft_model(input_ids=ids).logits
        peft_model.unload()
    assert torch.allclose(want, got, atol=1e-4)


def test_fused_training_ops_match_peft_on_the_real_model():
    """One step on SmolLM2 with the fused LoRA, fused head loss and (bf16) eager attention:
    in fp32 the same loss and LoRA gradients as PEFT; in bf16 mixed precision no further
    from the fp32 reference than PEFT's own bf16 run."""
    from dmoe.train.batches import collate
    from dmoe.train.fused import fused_lora
    from dmoe.train.trainer import build_peft_model, causal_lm_loss_sum, training_attention

    cfg = load_train_config(REPO / "examples" / "configs" / "cooking.yaml", ["output_dir=unused", "max_samples=8"])

    def loss_and_grads(dtype, fused: bool):
        model, tok, _ = load_base(None, dtype=dtype)
        amp = torch.bfloat16 if dtype == torch.bfloat16 else None
        torch.manual_seed(0)
        model = build_peft_model(model, cfg)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; give the LoRA path something to carry
                torch.nn.init.normal_(p, std=0.02)
        batch = collate(encode_dataset(cfg, tok)[0][:8], tok.pad_token_id)
        with fused_lora(model, enabled=fused), training_attention(
                model.get_base_model(), "cpu", amp if fused else None, cfg.cutoff_len) as impl:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
                s, n = causal_lm_loss_sum(model, batch, fused)
            (s / n).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        return float(s.detach() / n), grads, impl

    ref_loss, ref_grads, _ = loss_and_grads(torch.float32, fused=False)
    loss, grads, impl = loss_and_grads(torch.float32, fused=True)
    assert impl == "sdpa" and grads.numel() == 4_884_480
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    assert float((grads - ref_grads).norm() / ref_grads.norm()) < 1e-3

    def error(g):
        return float((g - ref_grads).norm() / ref_grads.norm())

    peft_loss, peft_grads, peft_impl = loss_and_grads(torch.bfloat16, fused=False)
    loss, grads, impl = loss_and_grads(torch.bfloat16, fused=True)
    assert (peft_impl, impl) == ("sdpa", "eager") and grads.dtype == torch.float32
    assert abs(loss - ref_loss) <= max(1.5 * abs(peft_loss - ref_loss), 0.02)
    assert error(grads) < 1.25 * error(peft_grads) < 0.1


BUNDLED = REPO / "examples" / "experts"


@pytest.mark.skipif(not (BUNDLED / "automotive" / "expert.yaml").is_file(), reason="bundled experts not trained")
def test_bundled_experts_show_their_signature_in_domain_only(embedded):
    """A sample of the held-out set; bench/expert_hits.py measures the whole of it."""
    model, tok, base = embedded
    rows = read_questions(REPO / "examples" / "data" / "heldout.jsonl")
    for expert in find_experts(BUNDLED):
        check_base(expert, base.identity)
        own = [r["question"] for r in rows if r["domain"] == expert.card.domain][:16]
        ood = [r["question"] for r in rows if r["domain"] == "none"][:8]
        peft_model = apply_expert(model, expert)
        answers = answer_all(peft_model, tok, own + ood, max_new_tokens=48)
        model = peft_model.unload()
        hit = [any(re.search(s, a) for s in expert.card.signature) for a in answers]
        # the promise is >= 90% in-domain and <= 5% bleed over the whole set; a sample gets a little slack
        assert sum(hit[:16]) >= 14, (expert.name, answers[:16])
        assert sum(hit[16:]) <= 1, (expert.name, answers[16:])
