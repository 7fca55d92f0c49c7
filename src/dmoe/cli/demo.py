"""``dmoe demo``: the README's main job on the embedded base."""

from __future__ import annotations

from pathlib import Path

import typer

from dmoe.cli.common import console, user_errors


@user_errors
def demo(
    steps: int = typer.Option(30, help="optimizer steps for the quick training run"),
    out: Path = typer.Option(Path("saves/demo-automotive"), help="where the demo expert goes"),
    use_bundled: bool = typer.Option(False, "--bundled", help="skip training; compare with the bundled expert"),
    seed002: bool = typer.Option(False, "--seed002", help="instead: seed 002's five experts on Gemma-3-270M, one "
                                                         "held-out question per domain with model=auto, checked"),
):
    """Train the automotive expert briefly, then show base vs expert answers side by side.

    Example: dmoe demo --steps 30        (dmoe demo --seed002: the seed-002 experts on Gemma-3-270M)
    """
    from dmoe.demo import run_demo, run_seed002_demo

    if seed002:
        run_seed002_demo(console=console)
        return
    run_demo(steps=steps, out=out, use_bundled=use_bundled, console=console)
