"""Which router a server (or the CLI) starts with.

The trained router next to the experts (``<experts>/router/``) when it matches them;
otherwise the keyword rules when given; otherwise none (``model: auto`` serves the
base model). Every fall-back comes with a warning that says why and what to run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dmoe.experts import Expert
from dmoe.route.keyword import KeywordRouter
from dmoe.route.router import ROUTER_DIR, ROUTER_JSON, load_router
from dmoe.route.text import RouteError

log = logging.getLogger("dmoe.route")


def startup_router(experts_dir: Path, experts: list[Expert], keywords: Path | None = None, encoder=None):
    """(router or None, note). Warns when it falls back."""
    d = Path(experts_dir) / ROUTER_DIR
    if (d / ROUTER_JSON).is_file():
        try:
            return load_router(d, experts, encoder), ""
        except RouteError as exc:
            note = str(exc)
    else:
        note = f"no trained router in {d} (train one: dmoe route train --experts {experts_dir})"
    if keywords is not None:
        note += f"; routing with the keyword rules {keywords}"
        log.warning(note)
        return KeywordRouter.load(keywords), note
    note += "; model=auto serves the base model"
    log.warning(note)
    return None, note
