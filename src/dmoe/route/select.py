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


def startup_router(experts_dir: Path, experts: list[Expert], keywords: Path | None = None, encoder=None,
                   backend: str = "torch"):
    """(router or None, note). Warns when it falls back. ``backend``: what the encoder runs on
    (numpy: no torch in the process; the same encoder id)."""
    d = Path(experts_dir) / ROUTER_DIR
    if (d / ROUTER_JSON).is_file():
        try:
            return load_router(d, experts, encoder, backend), ""
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


def refit_router(experts: list[Expert], current, *, cache: Path | None = None, data_dirs=(), encoder=None,
                 backend: str = "torch"):
    """A new embedding router for ``experts`` (the loaded set after a hot load or unload),
    with the current router's encoder when it has one (cached embeddings: only a new expert's
    prompts are encoded). Returns (router or None, validation accuracy, warnings). An expert
    with no prompts to route on is left out, with a warning: it is still served by name."""
    from dmoe.route.prompts import expert_rows
    from dmoe.route.router import EmbeddingRouter, train_router

    warnings, routable = [], []
    for e in experts:
        mine, _ = expert_rows(e, list(data_dirs))
        if mine:
            routable.append(e)
        else:
            warnings.append(f"expert '{e.name}' has no training prompts or card examples, so model=auto never picks it "
                            f"(add 'examples' to {e.path / 'expert.yaml'}); it is served by name")
    if not routable:
        return None, None, [*warnings, "no routable experts: model=auto serves the base model"]
    if encoder is None:
        if isinstance(current, EmbeddingRouter):
            encoder = current.encoder
        else:
            from dmoe.route.encoders import make_encoder

            encoder = make_encoder("minilm", backend=backend)
    router = train_router(routable, encoder, data_dirs=data_dirs, cache=cache)
    trials = router.report["classifier_trials"][router.report["chosen"]]
    return router, trials["val_accuracy"], warnings + list(router.report.get("notes", []))
