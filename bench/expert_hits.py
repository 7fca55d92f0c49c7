"""Hit rate of each bundled expert on held-out questions, and bleed off-domain.

    .venv/bin/python bench/expert_hits.py [--experts examples/experts] [--max-tokens 64]

For every expert (forced on) and for the bare base model, answers every held-out
question greedily and counts answers matching the expert's signature regexes:
  in_domain      the expert's own held-out questions  (goal >= 90%)
  out_of_domain  the general held-out questions        (goal <= 5%)
  other_domains  the other experts' held-out questions (for information)
The adapter is merged into a copy of the base for speed; the math is the same.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dmoe.base import load_base
from dmoe.evals.hits import answer_all, hit_report, merged_copy, read_questions
from dmoe.experts import check_base, find_experts

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=Path, default=REPO / "examples" / "experts")
    p.add_argument("--questions", type=Path, default=REPO / "examples" / "data" / "heldout.jsonl")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--answers-out", type=Path, default=None, help="write every answer here (JSONL)")
    p.add_argument("--only", action="append", default=None, help="measure only this expert (repeatable)")
    args = p.parse_args()

    rows = read_questions(args.questions)
    questions = [r["question"] for r in rows]
    model, tok, base = load_base(None)
    experts = [e for e in find_experts(args.experts) if not args.only or e.name in args.only]
    t0 = time.perf_counter()
    base_answers = dict(zip(questions, answer_all(model, tok, questions, args.max_tokens)))
    report = {}
    dump = [{"mode": "base", "question": q, "answer": a} for q, a in base_answers.items()]
    for e in experts:
        check_base(e, base.identity)
        answers = dict(zip(questions, answer_all(merged_copy(model, e), tok, questions, args.max_tokens)))
        domain = e.card.domain or e.name
        report[e.name] = {
            "signature": e.card.signature,
            "expert": hit_report(answers, rows, domain, e.card.signature),
            "base": hit_report(base_answers, rows, domain, e.card.signature),
        }
        dump += [{"mode": e.name, "question": q, "answer": a} for q, a in answers.items()]
    if args.answers_out:
        args.answers_out.parent.mkdir(parents=True, exist_ok=True)
        args.answers_out.write_text("".join(json.dumps(d) + "\n" for d in dump))
    print(json.dumps({
        "bench": "expert_hits", "questions": str(args.questions.relative_to(REPO) if args.questions.is_relative_to(REPO) else args.questions),
        "max_tokens": args.max_tokens, "decoding": "greedy",
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "seconds": round(time.perf_counter() - t0, 1), "experts": report,
    }, indent=2))


if __name__ == "__main__":
    main()
