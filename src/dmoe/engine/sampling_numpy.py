"""``sampling.py``'s rules over numpy rows, for the llama.cpp engine: its logits are host
arrays already, and a llama.cpp server process then runs without torch (about 210 MB of
RSS for the import alone, docs/benchmarks.md).

The same order per row (log-probabilities of the raw logits; penalties and ``logit_bias``;
the grammar's mask; greedy, or temperature / top-k / top-p and the exponential-race draw),
held to ``sampling.sample_batch_reference`` in tests/test_sampling.py. A seeded request draws
from numpy's PCG64 (``new_generator``): the same seed gives the same tokens on this engine,
not the torch engine's tokens (their random streams differ).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dmoe.engine.grammar import allowed_tokens
from dmoe.engine.request import Request, SamplingParams


def new_generator(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


_UNSEEDED = np.random.default_rng()  # requests without a seed (the engine samples on its one step thread)


def _log_softmax(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64) - row.max()
    return (x - np.log(np.exp(x).sum())).astype(np.float32)


def _penalize_(row: np.ndarray, r: Request) -> None:
    """Penalties and bias on one (V,) float32 row, in place (vLLM's and llama.cpp's definitions)."""
    p = r.params
    if p.repetition_penalty != 1:
        seen = np.fromiter(set(r.prompt_ids) | set(r.output_ids), dtype=np.int64)
        vals = row[seen]
        row[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and r.output_ids:
        counts = np.bincount(np.asarray(r.output_ids), minlength=row.size)[: row.size].astype(np.float32)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    for tok, bias in p.logit_bias:
        row[tok] += bias


def _draw(row: np.ndarray, p: SamplingParams, gen: np.random.Generator | None) -> int:
    """One token from a (V,) row: temperature, top-k, softmax, top-p, then ``argmax(probs / Exp(1))``."""
    x = row.astype(np.float64) / p.temperature
    if p.top_k > 0 and p.top_k < x.size:
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        cut = np.cumsum(sorted_p) - sorted_p > p.top_p  # keep the smallest set reaching top_p
        probs = np.zeros_like(probs)
        probs[order] = np.where(cut, 0.0, sorted_p)
    q = (gen or _UNSEEDED).exponential(1.0, probs.size)
    return int(np.argmax(probs / q))


def _record_logprobs(r: Request, logp: np.ndarray, tok: int) -> None:
    k = r.params.logprobs or 0
    top = np.argpartition(-logp, k - 1)[:k] if k else np.empty(0, dtype=np.int64)  # the k best, not a sort of V
    top = top[np.argsort(-logp[top], kind="stable")]
    r.logprobs.append((float(logp[tok]), [(int(t), float(logp[t])) for t in top]))


def sample_batch(logits: np.ndarray, reqs: Sequence[Request]) -> list[int]:
    """One token per row of (B, V) float32 ``logits`` for ``reqs`` (the rows are not changed)."""
    out = []
    for row, r in zip(logits, reqs):
        p = r.params
        logp = _log_softmax(row) if p.logprobs is not None else None
        if p.penalized or r.matcher is not None:
            row = row.astype(np.float32, copy=True)
            _penalize_(row, r)
            if r.matcher is not None:
                row[~allowed_tokens(r.matcher, row.size)] = -np.inf
        tok = int(np.argmax(row)) if p.greedy else _draw(row, p, r.generator)
        if logp is not None:
            _record_logprobs(r, logp, tok)
        out.append(tok)
    return out
