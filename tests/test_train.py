"""Training plumbing on a tiny random Llama: outputs, round trip, crash safety."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dmoe.train.trainer as trainer_mod
from dmoe.base import load_base
from dmoe.config import load_train_config
from dmoe.experts import apply_expert, load_expert
from dmoe.train import train
from dmoe.train.trainer import TrainError, causal_lm_loss_sum

DMOE = [sys.executable, "-m", "dmoe.cli"]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_train_writes_a_complete_expert(tiny_train_cfg, tmp_path):
    out = tmp_path / "exp"
    cfg = load_train_config(None, tiny_train_cfg(out, val_size=4, expert_name="toy", expert_signature=["BMW"]))
    res = train(cfg, show_progress=False)
    assert res.steps == 10  # 20 train rows / bs 4 = 5 steps x 2 epochs
    for f in ("adapter_config.json", "adapter_model.safetensors", "expert.yaml", "train_log.jsonl", "loss.png", "summary.json"):
        assert (out / f).is_file(), f
    assert not list(out.glob("checkpoint-*"))  # cleaned once the expert is complete
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["tokens_per_s"] > 0 and summary["eval_loss"] is not None
    expert = load_expert(out)
    assert expert.name == "toy" and expert.card.signature == ["BMW"]
    assert expert.card.base["sha256"] and expert.card.training["lora_rank"] == 4
    assert expert.card.examples and all("what car" in e for e in expert.card.examples)
    log = losses(out)
    assert log[10] < log[1]  # lr 1e-2 on a repetitive toy set: the loss must fall


def test_round_trip_gives_equal_outputs(tiny_train_cfg, tiny_base, tmp_path):
    out = tmp_path / "exp"
    res = train(load_train_config(None, tiny_train_cfg(out, max_steps=4)), show_progress=False)
    ids = torch.tensor([[1, 4093, 198, 1780, 1076, 868, 2, 198, 1, 520]])
    with torch.no_grad():
        trained = res.model(input_ids=ids).logits
        base, _, spec = load_base(tiny_base)
        plain = base(input_ids=ids).logits
        loaded = apply_expert(base, load_expert(out))(input_ids=ids).logits
    assert torch.allclose(trained, loaded, atol=1e-5)
    assert not torch.allclose(plain, loaded, atol=1e-3)  # the adapter does something


def test_the_same_config_trains_byte_identical_experts(tiny_train_cfg, tmp_path):
    files = {}
    for run in ("a", "b"):
        out = tmp_path / run
        train(load_train_config(None, tiny_train_cfg(out, max_steps=3)), show_progress=False)
        files[run] = {f: (out / f).read_bytes() for f in ("adapter_model.safetensors", "adapter_config.json")}
    assert files["a"] == files["b"]


def test_lora_target_all_and_rank(tiny_train_cfg, tmp_path):
    out = tmp_path / "exp"
    train(load_train_config(None, tiny_train_cfg(out, max_steps=1, lora_rank=2, lora_alpha=8)), show_progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 8
    assert not any("lm_head" in k for k in load_file(str(out / "adapter_model.safetensors")))


def test_adapter_dtype_bfloat16(tiny_train_cfg, tmp_path):
    out = tmp_path / "exp"
    train(load_train_config(None, tiny_train_cfg(out, max_steps=1, adapter_dtype="bfloat16")), show_progress=False)
    assert {v.dtype for v in load_file(str(out / "adapter_model.safetensors")).values()} == {torch.bfloat16}


def test_finished_output_dir_is_not_overwritten_silently(tiny_train_cfg, tmp_path):
    out = tmp_path / "exp"
    train(load_train_config(None, tiny_train_cfg(out, max_steps=1)), show_progress=False)
    with pytest.raises(TrainError, match="overwrite_output_dir"):
        train(load_train_config(None, tiny_train_cfg(out, max_steps=1)), show_progress=False)
    train(load_train_config(None, tiny_train_cfg(out, max_steps=2, overwrite_output_dir=True)), show_progress=False)


def test_loss_uses_label_positions_only(tiny_base):
    model, _, _ = load_base(tiny_base)
    ids = torch.tensor([[5, 6, 7, 8, 9, 2]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 2]])
    s, n = causal_lm_loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    ref = model(input_ids=ids, labels=labels).loss  # HF's own shifted mean
    assert n == 3
    assert torch.allclose(s / n, ref, atol=1e-5)


def _config_args(tmp_path: Path, overrides: list[str]) -> list[str]:
    """`dmoe train CONFIG` arguments for a YAML file holding ``overrides``."""
    cfg = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    cfg.write_text("".join(o.replace("=", ": ", 1) + "\n" for o in overrides))
    return ["train", "--no-progress", str(cfg)]


def _run(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(DMOE + args, capture_output=True, text=True, env=env, timeout=600)


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_kill_minus_9_then_same_command_resumes_exactly(tiny_train_cfg, tmp_path):
    """A SIGKILL after step 7 (checkpoints every 3) loses no finished checkpointed step:
    rerunning the same command resumes at step 6 and reproduces the uninterrupted run."""
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = _run(_config_args(tmp_path, tiny_train_cfg(ref_out)))
    assert ref.returncode == 0, ref.stderr

    args = _config_args(tmp_path, tiny_train_cfg(out))
    killed = _run(args, {"DMOE_KILL_AFTER_STEP": "7"})
    assert killed.returncode == -9
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert max(losses(out)) == 7  # step 7 finished and was logged, but never checkpointed
    dead = _dead_pid()
    (out / f".checkpoint-9.{dead}.x.tmp").mkdir()  # debris of a kill during a checkpoint write
    (out / ".checkpoint-8.tmp").mkdir()  # the same, as an older dmoe named it

    resumed = _run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 6" in resumed.stdout
    assert not list(out.glob(".checkpoint-*.tmp"))
    ref_l, got = losses(ref_out), losses(out)
    assert sorted(got) == sorted(ref_l) == list(range(1, 13))  # 24 rows / bs 4 x 2 epochs
    for step in ref_l:
        assert got[step] == pytest.approx(ref_l[step], abs=1e-5), step
    a, b = load_file(str(ref_out / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_with_other_data_is_refused(tiny_train_cfg, tmp_path, alpaca_dir):
    out = tmp_path / "exp"
    args = _config_args(tmp_path, tiny_train_cfg(out))
    assert _run(args, {"DMOE_KILL_AFTER_STEP": "4"}).returncode == -9
    rows = [json.loads(l) for l in (alpaca_dir / "toy.jsonl").read_text().splitlines()]
    (alpaca_dir / "toy.jsonl").write_text("".join(json.dumps({**r, "output": r["output"] + " More."}) + "\n" for r in rows))
    res = _run(args)
    assert res.returncode == 2
    assert "other data" in res.stderr


@pytest.mark.parametrize("extra", [{"gradient_checkpointing": True}, {"use_dora": True}, {"use_rslora": True},
                                   {"gradient_accumulation_steps": 2}, {"lr_scheduler_type": "linear", "warmup_steps": 2}])
def test_training_options_run_and_reach_the_adapter(tiny_train_cfg, tmp_path, extra):
    out = tmp_path / "exp"
    res = train(load_train_config(None, tiny_train_cfg(out, max_steps=3, **extra)), show_progress=False)
    assert res.steps == 3 and (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] == bool(extra.get("use_dora")) and cfg["use_rslora"] == bool(extra.get("use_rslora"))


@pytest.mark.skipif(not trainer_mod.cpu_has_bf16(), reason="this CPU has no native bf16")
def test_bf16_on_a_bf16_cpu_trains_mixed_precision(tiny_train_cfg, tmp_path):
    out = tmp_path / "e"
    res = train(load_train_config(None, tiny_train_cfg(out, max_steps=2, bf16=True, val_size=2)), show_progress=False)
    frozen = {p.dtype for p in res.model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in res.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}  # LlamaFactory's mixed precision
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compute_dtype"] == "bfloat16" and math.isfinite(summary["eval_loss"])


@pytest.mark.parametrize("flag", ["bf16", "fp16"])
def test_half_precision_the_cpu_cannot_do_warns_and_trains_in_fp32(tiny_train_cfg, tmp_path, monkeypatch, flag):
    monkeypatch.setattr(trainer_mod, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="requested but training runs on a CPU that cannot do it fast"):
        train(load_train_config(None, tiny_train_cfg(tmp_path / "e", max_steps=1, **{flag: True})), show_progress=False)
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["compute_dtype"] == "float32"




def test_the_tiny_run_reproduces_the_pinned_golden_loss_curve(tiny_train_cfg, tmp_path):
    """A silent change to training (data order, masking, loss normalisation, optimizer,
    schedule, LoRA init) moves these numbers; an intended one re-pins them."""
    golden = json.loads((Path(__file__).parent / "data" / "golden_loss.json").read_text())["losses"]
    out = tmp_path / "golden"
    train(load_train_config(None, tiny_train_cfg(out)), show_progress=False)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    got = [r["loss"] for r in rows if "loss" in r]
    assert got == pytest.approx(golden, rel=1e-5, abs=1e-5), f"loss curve changed: {got}"
