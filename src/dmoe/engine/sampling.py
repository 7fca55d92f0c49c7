"""One token per row of a step's logits, each row under its own request's rules.

In order, per row (a mixed batch mixes them freely):
  1. log-probabilities, when asked: of the model's own distribution (the raw logits,
     before penalties, bias, grammar and temperature; vLLM's default too);
  2. penalties and ``logit_bias``;
  3. the grammar's mask (``grammar.py``): disallowed tokens get -inf;
  4. greedy argmax, or temperature / top-k / top-p and a seeded draw.

``sample_batch_reference`` does the same one row at a time in plain Python: the slow
twin the tests hold the fast path to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dmoe.engine.grammar import allowed_tokens
from dmoe.engine.request import Request, SamplingParams


def _penalize_(row: torch.Tensor, r: Request) -> None:
    """Penalties and bias on one (V,) float row, in place (vLLM's and llama.cpp's definitions)."""
    p, n_vocab = r.params, row.numel()
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long, device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and r.output_ids:
        counts = torch.bincount(torch.tensor(r.output_ids, device=row.device), minlength=n_vocab)[:n_vocab].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    for tok, bias in p.logit_bias:
        row[tok] += bias


def _draw(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """One token (a 0-d tensor, on the logits' device) from a (V,) row, without a host sync:
    the Gumbel-style ``argmax(probs / Exp(1))`` draw of gpt-fast's
    ``multinomial_sample_one_no_sync`` instead of ``torch.multinomial``."""
    logits = logits.float() / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cut = torch.cumsum(sorted_p, 0) - sorted_p > p.top_p  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p.masked_fill(cut, 0.0))
    q = torch.empty_like(probs).exponential_(1, generator=gen)
    return torch.argmax(probs / q)


def _record_logprobs(r: Request, logp: torch.Tensor, tok: int) -> None:
    k = r.params.logprobs or 0
    top = torch.topk(logp, k) if k else None
    r.logprobs.append((float(logp[tok]), list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []))


def sample_batch(logits: torch.Tensor, reqs: Sequence[Request]) -> list[int]:
    """One token per row of (B, V) ``logits`` for ``reqs``. Rows without logprobs, penalties
    or a grammar cost one batched argmax (or a draw) and no host sync before the final
    ``.tolist()``; the others pay for what they ask."""
    want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    logp = torch.log_softmax(logits[want].float(), dim=-1) if want else None
    special = [i for i, r in enumerate(reqs) if r.params.penalized or r.matcher is not None]
    if special:
        logits = logits.float().clone() if logits.dtype != torch.float32 else logits
        for i in special:
            r = reqs[i]
            _penalize_(logits[i], r)
            if r.matcher is not None:
                logits[i].masked_fill_(~torch.from_numpy(allowed_tokens(r.matcher, logits.shape[-1])).to(logits.device), float("-inf"))
    tokens = torch.argmax(logits, dim=-1)  # (B,) greedy rows are done here
    for i, r in enumerate(reqs):
        if not r.params.greedy:
            tokens[i] = _draw(logits[i], r.params, r.generator)
    out = tokens.tolist()
    if logp is not None:
        for k, i in enumerate(want):
            _record_logprobs(reqs[i], logp[k], out[i])
    return out


def sample_batch_reference(logits: torch.Tensor, reqs: Sequence[Request]) -> list[int]:
    """The same, one row at a time with Python loops over the vocabulary (tests only: slow)."""
    out = []
    for row, r in zip(logits.float(), reqs):
        p, vals = r.params, row.tolist()
        if p.logprobs is not None:
            logp = torch.log_softmax(row, -1)
        seen = set(r.prompt_ids) | set(r.output_ids)
        for t in range(len(vals)):
            if p.repetition_penalty != 1 and t in seen:
                vals[t] = vals[t] / p.repetition_penalty if vals[t] > 0 else vals[t] * p.repetition_penalty
            c = r.output_ids.count(t)
            vals[t] -= p.frequency_penalty * c + (p.presence_penalty if c else 0.0)
        for t, b in p.logit_bias:
            vals[t] += b
        if r.matcher is not None:
            allowed = allowed_tokens(r.matcher, len(vals)).tolist()
            vals = [v if ok else float("-inf") for v, ok in zip(vals, allowed)]
        x = torch.tensor(vals)
        tok = int(torch.argmax(x)) if p.greedy else int(_draw(x, p, r.generator))
        if p.logprobs is not None:
            _record_logprobs(r, logp, tok)
        out.append(tok)
    return out
