"""Default locations of user-facing folders, so commands work from any working directory.

    DMOE_EXPERTS   the experts folders every command uses by default, ':'-separated
                   (default: <examples>/experts); the first holds the router
    DMOE_EXAMPLES  the examples folder (configs, data, experts)

The examples folder is ``$DMOE_EXAMPLES``, else ``./examples`` when the working directory
has one, else the one of the dmoe checkout this package runs from (the editable install
that ``make`` sets up). A missing one is an error that says how to give it.
"""

from __future__ import annotations

import os
from pathlib import Path


def _checkout_examples() -> Path:
    return Path(__file__).resolve().parents[2] / "examples"  # src/dmoe/paths.py -> <checkout>/examples


def examples_dir() -> Path:
    given = os.environ.get("DMOE_EXAMPLES")
    if given:
        return Path(given)
    here = Path("examples")
    if here.is_dir() or not _checkout_examples().is_dir():
        return here
    return _checkout_examples()


def default_experts_dirs() -> list[Path]:
    """``$DMOE_EXPERTS`` (several folders separated by ``os.pathsep``, ':' on Linux), else <examples>/experts."""
    given = [Path(p) for p in os.environ.get("DMOE_EXPERTS", "").split(os.pathsep) if p]
    return given or [examples_dir() / "experts"]


def default_experts_dir() -> Path:
    return default_experts_dirs()[0]


def default_data_dir() -> Path:
    return examples_dir() / "data"
