"""The architecture support table (README): each architecture the torch engine claims runs a
tiny random model whose greedy tokens equal HF transformers' (base) and PEFT's (an expert
trained with `dmoe train`), in one mixed batch, and `dmoe merge` equals the adapter; an
unsupported one is refused by name."""

from __future__ import annotations

import pytest
import torch

from conftest import write_jsonl
from dmoe.base import load_base
from dmoe.engine.model import SUPPORTED, UnsupportedModelError, from_hf
from dmoe.engine.protocol import run_until_done
from dmoe.engine.request import SamplingParams
from dmoe.engine.torch_engine import TorchEngine
from dmoe.experts import apply_expert, load_expert


def _config(kind: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    if kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # a window of 6 with 3 layers (2 local, 1 global) and prompts longer than it: the window matters
    cfg = Gemma3TextConfig(**common, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "sliding_attention",
                                                                                  "full_attention"])
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # Gemma's norms start at 0 (= scale 1): give them values so (1 + w) is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


ARCHS = ["llama", "qwen2", "gemma3_text"]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, real_tokenizer, tmp_path_factory):
    """(kind, base dir, expert dir): a tiny random model of the architecture and an expert trained on it."""
    from dmoe.config import load_train_config
    from dmoe.train import train

    torch.manual_seed(0)
    model = _config(request.param, len(real_tokenizer))
    base = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(base, safe_serialization=True)
    real_tokenizer.save_pretrained(base)
    data = tmp_path_factory.mktemp("data")
    write_jsonl(data / "d.jsonl", [{"instruction": f"question {i} about things", "output": f"answer {i} in words"} for i in range(12)])
    out = tmp_path_factory.mktemp("expert") / "e"
    cfg = load_train_config(None, [f"model_name_or_path={base}", "dataset=d.jsonl", f"dataset_dir={data}", f"output_dir={out}",
                                   "lora_rank=4", "learning_rate=5e-2", "max_steps=3", "per_device_train_batch_size=4"])
    train(cfg, show_progress=False)
    return request.param, base, out


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_equals_hf_and_peft_in_one_mixed_batch(arch):
    kind, base, expert_dir = arch
    model, tok, _ = load_base(base)
    assert model.config.model_type == kind and kind in SUPPORTED
    engine = TorchEngine.from_base(model, tok, max_batch=4, max_seq=64, max_loras=2, max_rank=8)
    expert = load_expert(expert_dir)
    engine.load_expert(expert)
    prompts = [[1, 4093, 198, 1780, 1076, 88, 99, 1000, 2000, 3000], [1, 520, 9531], [5, 6, 7, 8, 9, 10, 11, 12]]
    n = 10  # prompt + output spans more than the window of 6
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    jobs = [(p, s) for p in prompts for s in ([], [(expert.name, 1.0)])]
    reqs = [engine.submit(p, s, params) for p, s in jobs]
    run_until_done(engine, reqs)
    ref_base, _, _ = load_base(base)
    ref_peft = apply_expert(load_base(base)[0], expert)
    for (p, s), r in zip(jobs, reqs):
        want = _hf_greedy(ref_peft if s else ref_base, p, n)
        assert r.output_ids == want, (kind, p, s)
    assert any(a.output_ids != b.output_ids for a, b in zip(reqs[::2], reqs[1::2]))  # the expert changes answers


def test_merge_equals_the_adapter_on_every_architecture(arch, tmp_path):
    """`dmoe merge` (W + (alpha/r) B A) gives the logits PEFT gives with the adapter applied."""
    from dmoe.export.merge import merge_expert

    kind, base, expert_dir = arch
    merged_dir = merge_expert(load_expert(expert_dir), tmp_path / "merged", str(base))
    merged, _, _ = load_base(merged_dir)
    peft = apply_expert(load_base(base)[0], load_expert(expert_dir))
    plain = load_base(base)[0]
    ids = torch.tensor([[1, 4093, 198, 1780, 1076, 88, 99, 1000, 2000, 3000]])
    with torch.no_grad():
        want, got, before = peft(ids).logits, merged(ids).logits, plain(ids).logits
    assert merged.config.model_type == kind
    assert torch.allclose(got, want, atol=1e-4), (kind, (got - want).abs().max())
    assert not torch.allclose(before, want, atol=1e-4)  # the adapter changes the logits: the check can fail


def test_an_unsupported_architecture_is_refused_by_name(real_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match="supports llama, mistral, qwen2, gemma3_text.*not 'gpt2'"):
        from_hf(model)
