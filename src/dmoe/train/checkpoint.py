"""Atomic training checkpoints.

A checkpoint is a directory ``checkpoint-<step>/`` holding the trainable weights
(safetensors), the optimizer and scheduler state and RNG state (``torch.save`` of
tensors and numbers only, read back with ``weights_only=True``), and
``trainer_state.json``, with a manifest of their sizes and digests. It is built in a
hidden temp folder and moved into place (``io.atomic_dir``), so a kill at any moment leaves
either the previous checkpoint set or the new one, never a half-written directory that
looks complete; a checkpoint damaged afterwards fails its manifest and is skipped.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dmoe.errors import TrainError
from dmoe.io import atomic_dir, clean_stale, remove_tree, verify_manifest

log = logging.getLogger(__name__)

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
    """The newest checkpoint whose files match their manifest; damaged ones are skipped, with a warning."""
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except TrainError as exc:
            log.warning("skipping a damaged checkpoint: %s", exc)
            continue
        return path
    return None


def save_checkpoint(output_dir: Path, state: TrainerState, trainable: Mapping[str, torch.Tensor], optimizer, scheduler, keep: int | None) -> Path:
    """Write checkpoint-<step> atomically (with a manifest), then drop the oldest beyond ``keep``."""
    final = output_dir / f"checkpoint-{state.step}"
    clean_stale_tmp(output_dir)  # any checkpoint a killed writer left half written or half removed
    with atomic_dir(final, replace=True, manifest=True) as tmp:
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
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))  # its presence marks a checkpoint
    if keep is not None:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            remove_tree(old)
    return final


def verify_checkpoint(path: Path) -> None:
    """TrainError if a file of the checkpoint was cut or changed after it was written."""
    verify_manifest(path, TrainError, fix="Delete that checkpoint folder to resume from the one before it.")


def load_checkpoint(path: Path, trainable: dict[str, torch.nn.Parameter], optimizer, scheduler) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG from ``path``; return its state."""
    verify_checkpoint(path)
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
    """Remove half-written checkpoints left by a killed run (only a dead writer's: the temp
    folders are named by process id)."""
    if output_dir.is_dir():
        for p in output_dir.glob(".checkpoint-*.tmp"):
            if re.fullmatch(r"\.checkpoint-\d+\.tmp", p.name):  # an older dmoe's name, without a process id
                shutil.rmtree(p, ignore_errors=True)
            else:
                clean_stale(output_dir / p.name[1:].split(".", 1)[0])
