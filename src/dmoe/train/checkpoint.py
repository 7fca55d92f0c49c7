"""Atomic training checkpoints.

A checkpoint is a directory ``checkpoint-<step>/`` holding the trainable weights
(safetensors), the optimizer and scheduler state and RNG state (``torch.save`` of
tensors and numbers only, read back with ``weights_only=True``), and
``trainer_state.json``. It is written as ``.checkpoint-<step>.tmp`` and renamed into
place, so a kill at any moment leaves either the previous checkpoint set or the new
one, never a half-written directory that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    total_steps: int
    tokens_seen: int
    elapsed_s: float  # training wall time before this checkpoint (across resumes)
    config_digest: str  # of the data-relevant config; a resume with other data is refused


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _CKPT.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(output_dir: Path, state: TrainerState, trainable: Mapping[str, torch.Tensor], optimizer, scheduler, keep: int | None) -> Path:
    """Write checkpoint-<step> atomically, then drop the oldest beyond ``keep``."""
    final = output_dir / f"checkpoint-{state.step}"
    tmp = output_dir / f".checkpoint-{state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        tmp / "optimizer.pt",
    )
    # The state file is written last: its presence marks the checkpoint complete.
    with open(tmp / STATE_FILE, "w") as fh:
        json.dump(asdict(state), fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(output_dir)
    if keep is not None:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, trainable: dict[str, torch.nn.Parameter], optimizer, scheduler) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG from ``path``; return its state."""
    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(trainable) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for {sorted(missing)[:3]}...: was it made with another LoRA config?")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name])
    blob = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if blob.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def clean_stale_tmp(output_dir: Path) -> None:
    """Remove half-written checkpoints left by a killed run."""
    if output_dir.is_dir():
        for p in output_dir.glob(".checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
