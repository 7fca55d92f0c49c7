"""Signature hit rates: does an expert show its signature in-domain, and stay out elsewhere?

    from dmoe.evals.hits import expert_hit_rates
    report = expert_hit_rates(model, tok, expert, heldout_rows)

A *hit* is an answer matching any of the expert's signature regexes. In-domain hit
rate should be high; the rate on out-of-domain questions ("bleed") should be ~0.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

from dmoe.generate import chat_prompts, generate_texts
from dmoe.io import read_jsonl


def read_questions(path: str | Path) -> list[dict]:
    """JSONL rows with at least ``question`` and ``domain``."""
    return [row for _, row in read_jsonl(path, what="questions file")]


def is_hit(answer: str, signature: list[str]) -> bool:
    return any(re.search(s, answer) for s in signature)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a rate."""
    if n == 0:
        return (0.0, 0.0)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(answers: list[str], signature: list[str]) -> dict:
    hits = sum(is_hit(a, signature) for a in answers)
    lo, hi = wilson(hits, len(answers))
    return {"hits": hits, "n": len(answers), "rate": hits / max(len(answers), 1), "ci95": [round(lo, 3), round(hi, 3)]}


def answer_all(model, tokenizer, questions: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers to ``questions``."""
    return generate_texts(model, tokenizer, chat_prompts(tokenizer, questions), max_new_tokens=max_new_tokens, batch_size=batch_size)


def merged_copy(model, expert):
    """A copy of ``model`` with ``expert`` merged into its weights: same function as the
    adapter applied, at plain-model speed (for evaluation only; serving never merges)."""
    from dmoe.experts import apply_expert

    return apply_expert(copy.deepcopy(model), expert).merge_and_unload()


def hit_report(answers_by_q: dict[str, str], rows: list[dict], domain: str, signature: list[str]) -> dict:
    """In-domain hit rate and out-of-domain bleed (``domain == "none"``) for one signature."""
    in_domain = [answers_by_q[r["question"]] for r in rows if r["domain"] == domain]
    ood = [answers_by_q[r["question"]] for r in rows if r["domain"] == "none"]
    other = [answers_by_q[r["question"]] for r in rows if r["domain"] not in (domain, "none")]
    return {"in_domain": rate(in_domain, signature), "out_of_domain": rate(ood, signature), "other_domains": rate(other, signature)}
