"""Router evaluation: accuracy (off-domain rejection counted), per-class precision and
recall, the confusion matrix, and per-query latency."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from dmoe.io import read_jsonl
from dmoe.route.decision import NONE
from dmoe.route.text import RouteError


def read_labelled(path: str | Path) -> list[tuple[str, str]]:
    """(question, class) rows from JSONL with ``question`` and ``domain`` (``none`` = off-domain)."""
    p = Path(path)
    rows = []
    for i, r in read_jsonl(p, RouteError, what="questions file"):
        if not isinstance(r, dict) or not isinstance(r.get("question"), str):
            raise RouteError(f"{p}: line {i} needs a 'question' string and a 'domain' (an expert name or none)")
        rows.append((r["question"], r.get("domain") or NONE))
    return rows


def evaluate(router, rows: list[tuple[str, str]], mode: str = "threshold") -> dict:
    """Route every question one at a time (as a server would) and score the decisions."""
    predicted, latencies = [], []
    for q, _ in rows:
        t0 = time.perf_counter()
        d = router.route(q, mode)
        latencies.append(time.perf_counter() - t0)
        predicted.append(d.experts[0][0] if d.experts else NONE)
    gold = [g for _, g in rows]
    classes = sorted(set(gold) | set(predicted), key=lambda c: (c == NONE, c))
    confusion = {g: {p: 0 for p in classes} for g in classes}
    for g, p in zip(gold, predicted):
        confusion[g][p] += 1
    per_class = {}
    for c in classes:
        tp = confusion[c][c]
        n_pred = sum(confusion[g][c] for g in classes)
        n_gold = sum(confusion[c].values())
        per_class[c] = {"precision": round(tp / n_pred, 4) if n_pred else None,
                        "recall": round(tp / n_gold, 4) if n_gold else None, "support": n_gold}
    lat = sorted(latencies)
    q = lambda f: round(lat[min(len(lat) - 1, int(f * len(lat)))] * 1e3, 2)  # noqa: E731
    correct = sum(g == p for g, p in zip(gold, predicted))
    return {
        "router": getattr(router, "name", "?"), "mode": mode, "questions": len(rows),
        "accuracy": round(correct / len(rows), 4), "correct": correct,
        "per_class": per_class, "confusion": confusion,
        "latency_ms": {"p50": q(0.5), "p99": q(0.99), "mean": round(statistics.fmean(lat) * 1e3, 2)},
        "errors": [{"question": qq, "gold": g, "predicted": p} for (qq, g), p in zip(rows, predicted) if g != p],
    }
