"""Router accuracy and latency on the held-out questions, with the keyword baseline.

    .venv/bin/python bench/router.py [--experts examples/experts] [--questions examples/data/heldout.jsonl]

Trains an embedding router per encoder (MiniLM, and the base model's own hidden
states) from the experts' training prompts and the general prompt set, exactly as
`dmoe route train` does, then routes every held-out question one at a time: accuracy
with off-domain questions counted (the right answer for them is the base model),
per-class precision/recall, the confusion matrix and per-query latency (p50/p99).
The keyword rules in examples/routers/keywords.yaml are the baseline. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from dmoe.experts import find_experts
from dmoe.route.classifiers import KINDS
from dmoe.route.encoders import make_encoder
from dmoe.route.evaluate import evaluate, read_labelled
from dmoe.route.keyword import KeywordRouter
from dmoe.route.router import train_router

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=Path, default=REPO / "examples" / "experts")
    p.add_argument("--questions", type=Path, default=REPO / "examples" / "data" / "heldout.jsonl")
    p.add_argument("--keywords", type=Path, default=REPO / "examples" / "routers" / "keywords.yaml")
    p.add_argument("--encoders", default="minilm,base")
    args = p.parse_args()
    experts = find_experts(args.experts)
    rows = read_labelled(args.questions)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for kind in args.encoders.split(","):
            t0 = time.perf_counter()
            router = train_router(experts, make_encoder(kind), cache=Path(d) / kind)
            train_s = time.perf_counter() - t0
            for q, _ in rows[:5]:  # warm-up
                router.route(q)
            rep = evaluate(router, rows)
            rep["train_seconds"] = round(train_s, 1)
            rep["threshold"] = round(router.threshold, 4)
            rep["classifier_trials"] = router.report["classifier_trials"]
            rep["train_prompts"] = router.report["train_prompts"]
            rep["chosen_classifier"] = router.clf.kind
            # every classifier on the held-out set, for the record (training picks on its own validation split)
            rep["heldout_accuracy_by_classifier"] = {
                k: evaluate(train_router(experts, router.encoder, cache=Path(d) / kind, kinds=(k,)), rows)["accuracy"] for k in KINDS}
            results[f"embedding_{kind}"] = rep
    results["keyword_baseline"] = evaluate(KeywordRouter.load(args.keywords), rows, mode="top1")
    print(json.dumps({
        "bench": "router", "questions": str(args.questions.relative_to(REPO) if args.questions.is_relative_to(REPO) else args.questions),
        "experts": [e.name for e in experts],
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
