"""``dmoe train`` and ``dmoe data generate``: experts from YAML configs and datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from dmoe.cli.common import console, err_console, user_errors
from dmoe.config import load_train_config
from dmoe.paths import default_data_dir

data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the bundled examples.")


@user_errors
def train(
    config: Path = typer.Argument(..., help="training YAML (LlamaFactory LoRA-SFT keys)"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set num_train_epochs=1"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
    status_file: Path = typer.Option(None, "--status-file", help="write the step, total steps and speed to this JSON "
                                     "file as training goes (for a watcher such as dmoe webui)"),
):
    """Train a LoRA expert from a YAML config; rerun the same command to resume after a crash.

    Example: dmoe train examples/configs/cooking.yaml --set num_train_epochs=1
    """
    from dmoe.train import train as run_train  # torch + transformers: only when training

    cfg = load_train_config(config, set_)
    for key in getattr(cfg, "_ignored_keys", []):
        err_console.print(f"[yellow]note:[/] key '{key}' is accepted for LlamaFactory compatibility and ignored")
    res = run_train(cfg, show_progress=not no_progress, status_file=status_file)
    if res.resumed_from:
        console.print(f"resumed from step {res.resumed_from}")
    console.print(
        f"[green]expert written to {res.output_dir}[/]: {res.steps} steps, loss {res.train_loss:.4f}"
        + (f", eval loss {res.eval_loss:.4f}" if res.eval_loss is not None else "")
        + f", {res.tokens_per_s:.0f} tokens/s, {res.elapsed_s:.0f} s"
    )


@data_app.command("generate")
@user_errors
def data_generate(
    out: Path = typer.Option(None, "--out", help="output directory (default: ./examples/data)"),
    seed: int = typer.Option(0, help="generator seed"),
    samples: int = typer.Option(500, help="in-domain training samples per domain (max about 540)"),
    general: int = typer.Option(150, help="general (off-domain) samples mixed into each expert's data"),
    negative: int = typer.Option(180, help="general samples in the experts' question shapes (against bleed)"),
):
    """Write the bundled example datasets, dataset_info.json and held-out questions.

    Example: dmoe data generate --out examples/data --seed 0
    """
    from dmoe.data.generate import generate

    out = out or default_data_dir()
    counts = generate(out, seed=seed, n_domain=samples, n_general=general, n_negative=negative)
    for name, n in counts.items():
        console.print(f"{name:12s} {n:5d} rows")
    console.print(f"written to {out}")


@data_app.command("seed002")
@user_errors
def data_seed002(
    out: Path = typer.Option(Path("examples/seed002/data"), "--out", help="output directory"),
    seed: int = typer.Option(0, help="generator seed"),
    rows: int = typer.Option(600, min=100, help="training rows per domain (knowledge: every row of its table split)"),
    heldout: int = typer.Option(40, min=4, help="held-out questions per generated domain"),
):
    """Write seed 002's five capability datasets (math, reasoning, code, knowledge, conversation) and
    held-out questions that carry correctness checks for `dmoe bench --check`.

    Example: dmoe data seed002 --out examples/seed002/data --seed 0
    """
    from dmoe.data.seed002 import generate

    counts = generate(out, seed=seed, n_train=rows, n_held=heldout)
    for name, n in counts.items():
        console.print(f"{name:12s} {n:5d} rows")
    console.print(f"written to {out}")
