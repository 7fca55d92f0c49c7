"""Deterministic, length-grouped batches.

The order of epoch ``e`` is a pure function of (seed, e), so a resumed run can skip
to any step without saving data-loader state. Grouping similar lengths into a
batch keeps padding (wasted compute) low: rows are shuffled, cut into windows of
``window`` batches, sorted by length inside each window, and the batches shuffled.
"""

from __future__ import annotations

import random

import torch

from dmoe.data.tokenize import IGNORE_INDEX, Encoded


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, window: int = 32) -> list[list[int]]:
    """Index batches for one epoch (the last batch may be smaller)."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * window
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Shapes: (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
