"""The engine on the real embedded model with a bundled expert: greedy token ids equal
PEFT's ``PeftModel.generate`` for the first 32 tokens.

Tie rule: fp32 on CPU. The engine and PEFT compute the same sums in a different
order, so logits differ by ~1e-5; the test accepts a divergence only at a step where
PEFT's top-2 logits are within 1e-3 of each other (a tie), and stops comparing there."""

from pathlib import Path

import pytest
import torch

from dmoe.base import load_base
from dmoe.engine.request import SamplingParams
from dmoe.engine.torch_engine import TorchEngine
from dmoe.experts import apply_expert, load_expert

REPO = Path(__file__).resolve().parents[1]
EXPERT = REPO / "examples" / "experts" / "cooking"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (EXPERT / "expert.yaml").is_file(), reason="bundled experts not trained")]

QUESTIONS = ["How do I make crispy roast potatoes?", "Why do cats purr?", "What's a good way to cook a pork loin?"]


def test_engine_equals_peft_greedy_for_32_tokens():
    model, tok, _ = load_base(None)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False) for q in QUESTIONS]
    prompt_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    engine = TorchEngine.from_base(model, tok, max_batch=4, max_seq=256, max_loras=2, max_rank=16)
    engine.load_expert(load_expert(EXPERT))
    got = engine.generate(prompt_ids, [[("cooking", 1.0)]] * len(QUESTIONS), SamplingParams(max_tokens=32))
    peft_model = apply_expert(model, load_expert(EXPERT))
    for ids, out in zip(prompt_ids, got):
        ref = peft_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        ref_ids = ref.sequences[0, len(ids):].tolist()
        for step, (a, b) in enumerate(zip(out, ref_ids)):
            if a != b:
                top2 = torch.topk(ref.scores[step][0], 2).values
                assert float(top2[0] - top2[1]) < 1e-3, f"diverged at token {step} without a tie"
                break
        else:
            assert out == ref_ids[:len(out)] and len(out) == len(ref_ids)
