"""The embedding router: train, calibrate, save, load, route.

    router = train_router(find_experts("examples/experts"), MiniLMEncoder())
    router.save("examples/experts/router")
    router.route("How do I sear a steak?")  # -> RouteDecision(experts=[("cooking", 1.0)], ...)

Training: every expert's prompts are one class, general prompts the ``none`` class
(``prompts.py``). A stratified 20% validation split picks the classifier (centroids,
kNN or logistic regression: best validation accuracy wins) and calibrates the
confidence threshold (the one that maximises validation accuracy when a low-confidence
expert falls back to the base model). The chosen classifier is then refitted on all
prompts.

Files, next to the experts (``<experts>/router/``): ``router.json`` (classes, encoder id,
classifier kind, threshold, the experts it was trained for with a fingerprint of each
adapter, validation report) and ``router.safetensors`` (the classifier's arrays). Per
expert embeddings are cached in ``cache/`` under a hash of (encoder, prompts), so
adding or removing an expert re-encodes only what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic import Field as PField
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from dmoe.experts import ADAPTER_WEIGHTS, Expert
from dmoe.io import atomic_dir, content_hash, read_json_file, verify_manifest
from dmoe.route.classifiers import KINDS, Classifier, fit
from dmoe.route.decision import NONE, RouteDecision, decide
from dmoe.route.encoders import Encoder
from dmoe.route.prompts import RoutingData, routing_data
from dmoe.route.text import RouteError, clean_query

ROUTER_DIR = "router"
ROUTER_JSON = "router.json"
ROUTER_WEIGHTS = "router.safetensors"
VERSION = 1
log = logging.getLogger(__name__)


def expert_fingerprint(expert: Expert) -> str:
    """sha256 (16 hex) of the expert's adapter weights: a changed adapter means a stale router."""
    return content_hash([expert.path / ADAPTER_WEIGHTS])[:16]


@dataclass
class EmbeddingRouter:
    encoder: Encoder
    classes: list[str]  # experts..., then "none"
    clf: Classifier
    threshold: float
    experts: dict[str, str]  # name -> adapter fingerprint
    report: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"embedding:{self.clf.kind}"

    def scores(self, texts: list[str]) -> list[list[tuple[str, float]]]:
        """Ranked (class, probability) per text."""
        probs = self.clf.predict_proba(self.encoder.encode(texts))
        return [sorted(zip(self.classes, map(float, row)), key=lambda x: -x[1]) for row in probs]

    def route(self, query, mode: str = "threshold", *, context: Sequence[str] = (), k: int = 2, min_prob: float = 0.2) -> RouteDecision:
        """Route one query. When it is not confident on its own and earlier user turns
        exist (``context``), the recent conversation is routed as a whole instead."""
        t0 = time.perf_counter()
        text, note = clean_query(query)
        if text is None:
            return RouteDecision([], [(NONE, 1.0)], 1.0, note, self.name, mode=mode)
        ranked = self.scores([text])[0]
        if context and ranked[0][1] < self.threshold:
            joined, _ = clean_query(" ".join([*context[-2:], text]))
            with_context = self.scores([joined or text])[0]
            if with_context[0][1] > ranked[0][1]:
                ranked, note = with_context, (note + "; " if note else "") + "routed with the conversation as context"
        experts, conf, reason = decide(ranked, mode, threshold=self.threshold, k=k, min_prob=min_prob)
        reason = f"{reason} ({note})" if note else reason
        return RouteDecision(experts, ranked, conf, reason, self.name, (time.perf_counter() - t0) * 1e3, mode)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        """Write router.json and router.safetensors together: the folder is rebuilt beside itself
        (its embedding cache carried over) and swapped in at once, with a manifest."""
        d = Path(directory)
        meta = {"version": VERSION, "classes": self.classes, "encoder": self.encoder.id, "classifier": self.clf.kind,
                "temperature": self.clf.temperature, "k": self.clf.k, "threshold": self.threshold,
                "experts": self.experts, "report": self.report}
        with atomic_dir(d, replace=True, carry_over=True, manifest=True) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in self.clf.arrays.items()}, str(tmp / ROUTER_WEIGHTS))
            (tmp / ROUTER_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        return d


class RouterMeta(BaseModel):
    """``router.json``, validated before anything in it is used."""

    model_config = ConfigDict(extra="ignore", strict=True)
    version: int
    classes: list[str] = PField(min_length=2, max_length=10_000)
    encoder: str
    classifier: Literal[KINDS]  # type: ignore[valid-type]
    temperature: float = PField(gt=0, allow_inf_nan=False)
    k: int = PField(ge=1, le=100_000)
    threshold: float = PField(ge=0, le=1, allow_inf_nan=False)
    experts: dict[str, str]
    report: dict = PField(default_factory=dict)


# the arrays each classifier kind reads, with their rank (C classes, D dims, M points)
_ARRAYS = {"centroid": {"centroids": 2}, "knn": {"points": 2, "labels": 1}, "logreg": {"coef": 2, "intercept": 1}}


def _read_meta(f: Path) -> RouterMeta:
    raw = read_json_file(f, RouteError, what="router file")
    if raw.get("version") != VERSION:
        raise RouteError(f"{f} has version {raw.get('version')!r}, this dmoe reads {VERSION}: retrain it "
                         f"with `dmoe route train --experts {f.parent.parent}`")
    try:
        return RouterMeta.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise RouteError(f"{f} is damaged: {'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}; retrain it "
                         f"with `dmoe route train --experts {f.parent.parent}`") from None


def _read_arrays(f: Path, meta: RouterMeta, dim: int) -> dict[str, np.ndarray]:
    """The classifier's arrays, checked against the classes and the encoder's dimension."""
    fix = f"retrain it with `dmoe route train --experts {f.parent.parent}`"
    try:
        arrays = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RouteError(f"{f} is not a readable safetensors file ({exc}); {fix}") from None
    n = len(meta.classes)
    for name, ndim in _ARRAYS[meta.classifier].items():
        a = arrays.get(name)
        if a is None or a.ndim != ndim or not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
            raise RouteError(f"{f}: array {name!r} is missing or malformed for a {meta.classifier} router; {fix}")
    rows = {"centroid": ("centroids", n), "logreg": ("coef", n)}.get(meta.classifier)
    if rows is not None and arrays[rows[0]].shape != (rows[1], dim):
        raise RouteError(f"{f}: {rows[0]} has shape {arrays[rows[0]].shape}, expected ({rows[1]}, {dim}); {fix}")
    if meta.classifier == "logreg" and arrays["intercept"].shape != (n,):
        raise RouteError(f"{f}: intercept has shape {arrays['intercept'].shape}, expected ({n},); {fix}")
    if meta.classifier == "knn":
        points, labels = arrays["points"], arrays["labels"]
        if points.shape[1] != dim or labels.shape != (points.shape[0],) or points.shape[0] == 0 \
                or not ((labels >= 0) & (labels < n)).all():
            raise RouteError(f"{f}: knn points {points.shape} / labels {labels.shape} do not fit {n} classes "
                             f"of dimension {dim}; {fix}")
    return arrays


def load_router(directory: str | Path, experts: list[Expert], encoder: Encoder | None = None,
                backend: str = "torch") -> EmbeddingRouter:
    """Load a router and check it was trained for exactly these experts (and adapters). A
    damaged file is a RouteError that says to retrain, never a wrong route. Without an
    ``encoder``, the one its ``router.json`` names is made on ``backend`` (torch or numpy)."""
    d = Path(directory)
    if not (d / ROUTER_JSON).is_file():
        raise RouteError(f"no router in {d}: train one with `dmoe route train --experts {d.parent}`")
    verify_manifest(d, RouteError, names=(ROUTER_WEIGHTS,),  # router.json is validated as it is read
                    fix=f"Retrain it with `dmoe route train --experts {d.parent}`.")
    meta = _read_meta(d / ROUTER_JSON)
    want = {e.name: expert_fingerprint(e) for e in experts}
    have = meta.experts
    if want != have:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        changed = sorted(n for n in set(want) & set(have) if want[n] != have[n])
        parts = [f"new experts {missing}" if missing else "", f"removed experts {extra}" if extra else "",
                 f"retrained experts {changed}" if changed else ""]
        raise RouteError(f"the router in {d} was trained for other experts ({', '.join(p for p in parts if p)}); "
                         f"run `dmoe route train --experts {d.parent}`")
    if encoder is None:
        from dmoe.route.encoders import make_encoder

        kind, *rest = meta.encoder.split(":")
        encoder = make_encoder(kind, dtype=rest[-1] if kind == "minilm" and len(rest) > 1 else None, backend=backend)
    if encoder.id != meta.encoder:
        raise RouteError(f"the router in {d} was trained with encoder {meta.encoder}, not {encoder.id}: retrain it")
    if sorted(meta.classes) != sorted([*have, NONE]):
        raise RouteError(f"{d / ROUTER_JSON} is damaged: its classes {meta.classes} are not its experts "
                         f"{sorted(have)} then {NONE!r}; retrain it with `dmoe route train --experts {d.parent}`")
    arrays = _read_arrays(d / ROUTER_WEIGHTS, meta, encoder.dim)
    clf = Classifier(meta.classifier, arrays, len(meta.classes), meta.temperature, meta.k)
    return EmbeddingRouter(encoder, meta.classes, clf, meta.threshold, have, meta.report)


# ---------------------------------------------------------------------- training
def _cached_encode(encoder: Encoder, prompts: list[str], cache: Path | None, tag: str) -> np.ndarray:
    if not prompts:
        return np.zeros((0, encoder.dim), np.float32)
    key = hashlib.sha256((encoder.id + "\n" + "\n".join(prompts)).encode()).hexdigest()[:16]
    f = cache / f"{tag}-{key}.safetensors" if cache else None
    if f is not None and f.is_file():
        cached = _read_cached(f)
        if cached is not None:
            return cached
    x = encoder.encode(prompts)
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=f".{f.name}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"x": x}, tmp, metadata={"sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()})
            os.replace(tmp, f)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return x


def _read_cached(f: Path) -> np.ndarray | None:
    """A cached embedding matrix whose bytes match the digest saved with it; None (encode
    again) for a file that was cut, changed or written by an older dmoe."""
    try:
        with safe_open(str(f), "np") as fh:
            want = (fh.metadata() or {}).get("sha256")
            x = fh.get_tensor("x")
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        log.warning("re-encoding: the cached embeddings %s are unreadable (%s)", f, exc)
        return None
    if want is None:
        log.info("re-encoding: the cached embeddings %s carry no digest (an older dmoe wrote them)", f)
        return None
    if want != hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest():
        log.warning("re-encoding: the cached embeddings %s do not match their digest", f)
        return None
    return x


def _split(y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/validation index split."""
    rng = random.Random(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = [int(i) for i in np.flatnonzero(y == c)]
        rng.shuffle(idx)
        n_val = max(1, int(round(len(idx) * frac))) if len(idx) > 1 else 0
        val += idx[:n_val]
        train += idx[n_val:]
    return np.array(sorted(train)), np.array(sorted(val))


def calibrate_threshold(probs: np.ndarray, y: np.ndarray, none_idx: int) -> tuple[float, float]:
    """(threshold, accuracy): below it an expert prediction becomes ``none``."""
    pred, conf = probs.argmax(1), probs.max(1)
    best = (0.0, float((pred == y).mean()))
    for t in np.unique(np.round(conf, 4)):
        p = np.where((pred != none_idx) & (conf < t), none_idx, pred)
        acc = float((p == y).mean())
        if acc > best[1] + 1e-12:
            best = (float(t), acc)
    return best


_QUERY_COST = ("centroid", "logreg", "knn")


def train_router(experts: list[Expert], encoder: Encoder, *, data: RoutingData | None = None, data_dirs: Sequence[Path] = (),
                 general_files: Sequence[Path] = (), cache: Path | None = None, seed: int = 0,
                 kinds: tuple[str, ...] = KINDS) -> EmbeddingRouter:
    """Fit, select and calibrate a router for ``experts`` (see the module docstring)."""
    if not experts:
        raise RouteError("no experts to route to")
    data = data or routing_data(experts, data_dirs, general_files)
    classes = [e.name for e in experts] + [NONE]
    xs, ys = [], []
    for i, name in enumerate(classes):
        prompts = data.none if name == NONE else data.per_expert[name]
        xs.append(_cached_encode(encoder, prompts, cache, name))
        ys.append(np.full(len(prompts), i))
    x, y = np.concatenate(xs), np.concatenate(ys)
    tr, va = _split(y, 0.2, seed)
    none_idx = len(classes) - 1
    trials = {}
    for kind in kinds:
        clf = fit(kind, x[tr], y[tr], len(classes), seed)
        probs = clf.predict_proba(x[va])
        t, acc = calibrate_threshold(probs, y[va], none_idx)
        trials[kind] = {"val_accuracy_top1": round(float((probs.argmax(1) == y[va]).mean()), 4),
                        "val_accuracy": round(acc, 4), "threshold": round(t, 4)}
    # ties go to the cheaper classifier at query time: kNN compares against every training prompt
    best = max(kinds, key=lambda k: (trials[k]["val_accuracy"], -_QUERY_COST.index(k)))
    clf = fit(best, x, y, len(classes), seed)
    report = {"classifier_trials": trials, "chosen": best, "train_prompts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
              "validation_prompts": int(len(va)), "notes": data.notes, "seed": seed}
    return EmbeddingRouter(encoder, classes, clf, trials[best]["threshold"], {e.name: expert_fingerprint(e) for e in experts}, report)
