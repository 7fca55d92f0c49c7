"""``dmoe experts list``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dmoe.cli.common import console, experts_dir, user_errors

experts_app = typer.Typer(no_args_is_help=True, help="Expert directories.")


@experts_app.command("list")
@user_errors
def experts_list(directory: Path = typer.Argument(None, help="experts folder (default: $DMOE_EXPERTS or ./examples/experts)")):
    """List the experts found in a folder.

    Example: dmoe experts list examples/experts
    """
    from dmoe.experts import find_experts  # torch: imported by the command, not by `dmoe --help`

    directory = experts_dir(directory)
    found = find_experts(directory)
    table = Table(title=f"experts in {directory}")
    for col in ("name", "domain", "rank", "base", "signature", "path"):
        table.add_column(col)
    for e in found:
        cfg = e.adapter_config()
        table.add_row(e.name, e.card.domain or "-", str(cfg.get("r", "?")), e.base.short(), ", ".join(e.card.signature) or "-", str(e.path))
    console.print(table)
    if not found:
        console.print("no experts found")
