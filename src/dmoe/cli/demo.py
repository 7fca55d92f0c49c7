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
):
    """Train the automotive expert briefly, then show base vs expert answers side by side.

    Example: dmoe demo --steps 30
    """
    from dmoe.demo import run_demo

    run_demo(steps=steps, out=out, use_bundled=use_bundled, console=console)
