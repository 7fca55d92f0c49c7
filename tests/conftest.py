"""Shared fixtures.

Fast tests use a tiny random-weight Llama built at test time with the real SmolLM2
tokenizer (plumbing only); tests marked ``slow`` use the real embedded model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dmoe.engine.request import Request, SamplingParams

REPO = Path(__file__).resolve().parents[1]
# Token-id prompts for engine tests (plumbing on random weights: any ids in the vocabulary)
PROMPTS = [[1, 520, 33, 901, 12], [1, 77, 3001, 42], [1, 4000, 4001, 4002, 4003, 4004, 9], [1, 15, 16]]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


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


class HashEncoder:
    """Bag of words hashed into 64 dimensions: deterministic, instant, counts its calls."""

    id = "hash64"
    dim = 64

    def __init__(self):
        self.encoded: list[str] = []

    def encode(self, texts):
        self.encoded += texts
        x = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                x[i, sum(map(ord, w)) % self.dim] += 1.0
        x += 1e-3
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def hand_copy(src: Path, dst: Path) -> Path:
    """A copy of an expert to edit by hand, like an adapter made outside dmoe: without the
    manifest dmoe writes (which would rightly refuse the edited weights)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("dmoe_manifest.json"))
    return dst


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


@pytest.fixture
def tiny_engine(tiny_base, tiny_experts):
    """A torch engine over the tiny base with alpha and beta loaded (8 rows, 128 positions)."""
    from dmoe.base import load_base
    from dmoe.engine.torch_engine import TorchEngine
    from dmoe.experts import load_expert

    model, tok, _ = load_base(tiny_base)
    eng = TorchEngine.from_base(model, tok, max_batch=8, max_seq=128, max_loras=4, max_rank=8)
    for name in ("alpha", "beta"):
        eng.load_expert(load_expert(tiny_experts / name))
    return eng


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StepHook:
    """Runs ``fn`` once, right after the engine's ``n``-th step (a mid-flight event that
    depends on engine progress, not on a sleep). Pass ``hook`` as ``after_step``."""

    def __init__(self, n: int, fn: Callable[[], None]):
        self.n, self.fn, self.fired = n, fn, False

    def __call__(self, steps: int) -> None:
        if not self.fired and steps >= self.n:
            self.fired = True
            self.fn()


def step_wrapper(engine, after: Callable[[int], None]) -> Callable[[], list[Request]]:
    """``engine.step`` followed by ``after(steps so far)``: for engine-level mid-flight tests."""
    inner = engine.step
    count = 0

    def step():
        nonlocal count
        out = inner()
        count += 1
        after(count)
        return out

    return step


@pytest.fixture(scope="session")
def tiny_gguf_base(tiny_base, tmp_path_factory):
    """The tiny Llama written as an f32 GGUF base (llama.cpp computes the same function)."""
    from dmoe.base import resolve_base
    from dmoe.export.gguf import write_base_gguf

    out = tmp_path_factory.mktemp("llamacpp") / "tiny-f32.gguf"
    write_base_gguf(tiny_base, out, "f32")
    return resolve_base(out)


@pytest.fixture(scope="session")
def tiny_gguf_experts(tiny_experts, tiny_gguf_base, tmp_path_factory) -> Path:
    """alpha, beta, gamma with cards that name the GGUF base (it holds the same weights)."""
    root = tmp_path_factory.mktemp("gguf-experts")
    for name in ("alpha", "beta", "gamma"):
        shutil.copytree(tiny_experts / name, root / name)
        card = yaml.safe_load((root / name / "expert.yaml").read_text())
        card["base"] = tiny_gguf_base.identity.to_dict()
        (root / name / "expert.yaml").write_text(yaml.safe_dump(card))
    return root


@pytest.fixture(scope="session")
def tiny_q4_base(tiny_base, tmp_path_factory):
    """The tiny Llama written as a Q4_1 GGUF (its q/k rows permuted, as llama.cpp's converter does)."""
    from dmoe.base import resolve_base
    from dmoe.export.gguf import write_base_gguf

    out = tmp_path_factory.mktemp("int4") / "tiny-q4_1.gguf"
    write_base_gguf(tiny_base, out, "q4_1")
    return resolve_base(out)


@pytest.fixture(scope="session")
def dmoe_home(tmp_path_factory):
    """One $DMOE_HOME for the session's caches (GGUF adapters, hashes), off the user's."""
    home = tmp_path_factory.mktemp("dmoe-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("DMOE_HOME", str(home))
    yield home
    mp.undo()


@pytest.fixture
def make_state(tiny_base, tiny_gguf_base, dmoe_home):
    """A server state over the tiny model: ``make_state(experts_dir, engine="llamacpp", **ServeConfig fields)``."""
    from dmoe.runtime import ServeConfig, build_state

    built = []

    def make(experts_dir: Path, engine: str = "torch", **kw):
        base = str(tiny_gguf_base.path) if engine == "llamacpp" else str(tiny_base)
        kw.setdefault("max_batch", 4)
        kw.setdefault("max_seq", 128)
        kw.setdefault("refit_router", False)  # the tiny experts share their prompts: nothing to route on
        if engine == "torch":
            kw.setdefault("max_loras", 4)
            kw.setdefault("max_rank", 8)
        st = build_state(ServeConfig.make(base=base, experts_dir=experts_dir, engine=engine, **kw))
        built.append(st)
        return st

    yield make
    for st in built:
        st.engine.close()


@pytest.fixture
def live_server():
    """``with live_server(st, after_step=..., drain_s=...) as srv``: the app on a free loopback port."""
    from dmoe.serve.http import ThreadedServer

    return ThreadedServer
