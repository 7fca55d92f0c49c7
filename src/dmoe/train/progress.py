"""Training telemetry: the JSONL log, the rich progress bar, the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dmoe.io import read_jsonl

LOG_FILE = "train_log.jsonl"


def read_log(output_dir: Path) -> list[dict]:
    path = output_dir / LOG_FILE
    if not path.is_file():
        return []
    # a line cut by a kill: everything after it is gone too
    return [row for _, row in read_jsonl(path, torn_tail_ok=True)]


def truncate_log(output_dir: Path, upto_step: int) -> None:
    """Keep the log rows of steps <= ``upto_step`` (a resume replays the rest)."""
    rows = [r for r in read_log(output_dir) if r.get("step", 0) <= upto_step]
    from dmoe.io import atomic_write_text

    atomic_write_text(output_dir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in rows))


class TrainLog:
    """Appends one JSON object per line; each line is flushed when written."""

    def __init__(self, output_dir: Path):
        self._fh = open(output_dir / LOG_FILE, "a")

    def write(self, row: dict) -> None:
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def progress_bar(enabled: bool) -> Progress:
    """Step, loss, tokens/s and ETA."""
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def plot_loss(output_dir: Path, out_name: str = "loss.png") -> Path | None:
    """Training (and eval) loss against step, as a PNG."""
    rows = read_log(output_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(output_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = output_dir / out_name
    tmp = output_dir / f".{out_name}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
