"""Default locations of user-facing folders. None of them points into dmoe's source tree
(on a non-editable install that would be site-packages): they resolve from the
environment or the current directory, and a missing one is an error that says how to
give it.

    DMOE_EXPERTS   the experts folder every command uses by default (default: ./examples/experts)
    DMOE_EXAMPLES  the examples folder (configs, data, experts; default: ./examples)
"""

from __future__ import annotations

import os
from pathlib import Path


def examples_dir() -> Path:
    return Path(os.environ.get("DMOE_EXAMPLES") or "examples")


def default_experts_dir() -> Path:
    return Path(os.environ.get("DMOE_EXPERTS") or examples_dir() / "experts")


def default_data_dir() -> Path:
    return examples_dir() / "data"
