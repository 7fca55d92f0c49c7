"""``dmoe experts list``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from dmoe.cli.common import console, experts_dirs, user_errors

experts_app = typer.Typer(no_args_is_help=True, help="Expert directories.")


@experts_app.command("list")
@user_errors
def experts_list(directories: Optional[list[Path]] = typer.Argument(None, help="experts folders (default: $DMOE_EXPERTS or ./examples/experts)")):
    """List the experts found in one or more folders.

    Example: dmoe experts list examples/experts
    """
    from dmoe.experts import find_experts_in  # torch: imported by the command, not by `dmoe --help`

    folders = experts_dirs(directories)
    found = find_experts_in(folders)
    table = Table(title=f"experts in {', '.join(map(str, folders))}")
    for col in ("name", "domain", "rank", "base", "signature", "path"):
        table.add_column(col)
    for e in found:
        cfg = e.adapter_config()
        table.add_row(e.name, e.card.domain or "-", str(cfg.get("r", "?")), e.base.short(), ", ".join(e.card.signature) or "-", str(e.path))
    console.print(table)
    if not found:
        console.print("no experts found")
