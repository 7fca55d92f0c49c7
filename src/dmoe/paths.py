"""Default locations of user-facing folders, so commands work from any working directory.

    DMOE_EXPERTS   the experts folders every command uses by default, ':'-separated
                   (default: <examples>/experts); the first holds the router
    DMOE_EXAMPLES  the examples folder (configs, data, experts)

The examples folder is ``$DMOE_EXAMPLES``, else ``./examples`` when the working directory
has one, else the one of the dmoe checkout this package runs from (the editable install
that ``make`` sets up), else the copy a wheel installs under ``<prefix>/share/dmoe/examples``.
A missing one is an error that says how to give it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _checkout_examples() -> Path:
    return Path(__file__).resolve().parents[2] / "examples"  # src/dmoe/paths.py -> <checkout>/examples


def _installed_examples() -> Path:
    return Path(sys.prefix) / "share" / "dmoe" / "examples"  # pyproject's data-files


def examples_dir() -> Path:
    given = os.environ.get("DMOE_EXAMPLES")
    if given:
        return Path(given)
    here = Path("examples")
    for candidate in (here, _checkout_examples(), _installed_examples()):
        if candidate.is_dir():
            return candidate
    return here


def default_experts_dirs() -> list[Path]:
    """``$DMOE_EXPERTS`` (several folders separated by ``os.pathsep``, ':' on Linux), else <examples>/experts."""
    given = [Path(p) for p in os.environ.get("DMOE_EXPERTS", "").split(os.pathsep) if p]
    return given or [examples_dir() / "experts"]


def default_experts_dir() -> Path:
    return default_experts_dirs()[0]


def default_data_dir() -> Path:
    return examples_dir() / "data"


def dmoe_runs_dir() -> Path:
    """Where the web UI keeps its training runs' records and configs: ``$DMOE_HOME/webui/runs``."""
    from dmoe.io import dmoe_home

    return dmoe_home() / "webui" / "runs"
