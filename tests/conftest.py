"""Shared fixtures.

Fast tests use a tiny random-weight Llama built at test time with the real SmolLM2
tokenizer (plumbing only); tests marked ``slow`` use the real embedded model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def real_tokenizer():
    from dmoe.base import load_tokenizer, resolve_base

    return load_tokenizer(resolve_base(None))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, real_tokenizer) -> Path:
    """An HF model directory: a 2-layer random Llama with SmolLM2's tokenizer. Untied head: a
    random tied head mostly repeats the last input token, which hides adapter effects."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(real_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    real_tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def alpaca_dir(tmp_path) -> Path:
    """A dataset_dir with a 24-row Alpaca dataset registered as 'toy'."""
    rows = [
        {"instruction": f"Question number {i}: what car?", "input": "", "output": f"The BMW X5, answer {i}."}
        for i in range(24)
    ]
    write_jsonl(tmp_path / "toy.jsonl", rows)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "toy.jsonl", "formatting": "alpaca"}}))
    return tmp_path


@pytest.fixture
def tiny_train_cfg(tiny_base, alpaca_dir, tmp_path):
    """Overrides for a seconds-long training run on the tiny model."""

    def make(out: Path, **extra) -> list[str]:
        base = {
            "model_name_or_path": str(tiny_base), "dataset": "toy", "dataset_dir": str(alpaca_dir),
            "output_dir": str(out), "lora_rank": 4, "per_device_train_batch_size": 4,
            "num_train_epochs": 2, "learning_rate": 1e-2, "logging_steps": 1, "save_steps": 3,
            "cutoff_len": 64, "seed": 7,
        }
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]

    return make


@pytest.fixture(autouse=True)
def _quiet_threads():
    # Two cores: keep each test to the machine's size and deterministic.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def tiny_experts(tmp_path_factory, tiny_base) -> Path:
    """Three small trained experts (alpha, beta, gamma) for the tiny base."""
    from dmoe.config import load_train_config
    from dmoe.train import train

    root = tmp_path_factory.mktemp("experts")
    data = tmp_path_factory.mktemp("data")
    write_jsonl(data / "d.jsonl", [{"instruction": f"q{i}", "output": f"answer {i} with words"} for i in range(16)])
    for name, lr in (("alpha", 1e-2), ("beta", 3e-2), ("gamma", 2e-2)):
        cfg = load_train_config(None, [f"model_name_or_path={tiny_base}", "dataset=d.jsonl", f"dataset_dir={data}",
                                       f"output_dir={root / name}", "lora_rank=4", f"learning_rate={lr}", "max_steps=3",
                                       f"seed={len(name) + int(lr * 1000)}", "per_device_train_batch_size=4"])
        train(cfg, show_progress=False)
    return root
