"""What both engines share about a request: its sampling parameters (validated once,
here), the request itself, the queue it waits in, sampling, and the end-of-request rule.

    params = SamplingParams(max_tokens=32, temperature=0.7, seed=1)   # a bad value raises RequestError
    queue = RequestQueue(device)
    req = queue.add(prompt_ids, lora, params)
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dmoe.errors import RequestError, UnknownExpertError

__all__ = ["Request", "RequestError", "RequestQueue", "SamplingParams", "UnknownExpertError",
           "append_token", "check_prompt", "check_scale", "sample_batch"]


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def check_scale(name: str, scale: Any) -> float:
    """A finite adapter scale, or a RequestError naming the expert. The one scale check."""
    return _finite(scale, f"scale for expert '{name}'")


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. Every value is checked here, once, when it is made."""

    max_tokens: int = 128       # new tokens at most (>= 1)
    temperature: float = 0.0    # 0 = greedy
    top_p: float = 1.0          # nucleus mass kept, in (0, 1]
    top_k: int = 0              # 0 = off
    seed: int | None = None     # per-request generator: the same seed gives the same sample
    stop: tuple[str, ...] = ()  # stop strings (the text is cut before them)
    ignore_eos: bool = False    # generate exactly max_tokens (benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer of at least 1, got {self.max_tokens!r}")
        if _finite(self.temperature, "temperature") < 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < _finite(self.top_p, "top_p") <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(eq=False)  # identity, not value: two requests with the same prompt are two requests
class Request:
    """One sequence in an engine. ``lora`` is the engine's resolved adapter set (torch:
    (slot, scale); llama.cpp: (name, scale)), fixed at submit and never changed."""

    prompt_ids: list[int]
    lora: list[tuple[Any, float]]
    params: SamplingParams
    id: int = 0
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" (| the runner's "error"/"shutdown")
    kv_slot: int = -1
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class RequestQueue:
    """The waiting and running requests of one engine, and their ids (callers hold the engine lock)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count(1)

    def add(self, prompt_ids: Sequence[int], lora: list[tuple[Any, float]], params: SamplingParams) -> Request:
        req = Request(list(prompt_ids), lora, params, id=next(self._ids))
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.waiting.append(req)
        return req

    def drop(self, req: Request) -> None:
        """Take ``req`` out of the queue and mark it cancelled (if it had not finished)."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        req.finish_reason = req.finish_reason or "cancelled"

    def in_flight(self) -> Iterator[Request]:
        return itertools.chain(self.waiting, self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)


def check_prompt(prompt_ids: Sequence[int], params: SamplingParams, max_seq: int) -> None:
    """What every engine refuses before queueing a request."""
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    if len(prompt_ids) + params.max_tokens > max_seq:
        raise RequestError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {max_seq} tokens"
        )


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
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


def sample_batch(logits: torch.Tensor, reqs: Sequence[Request]) -> list[int]:
    """One token per row of (B, V) ``logits`` for ``reqs``. Everything stays on the logits'
    device; the only device->host transfer is the final ``.tolist()`` of B ids."""
    tokens = torch.argmax(logits, dim=-1)  # (B,) greedy rows are done here
    for i, r in enumerate(reqs):
        if not r.params.greedy:
            tokens[i] = _sample_row(logits[i], r.params, r.generator)
    return tokens.tolist()


def append_token(r: Request, tok: int, eos_ids: set[int], tokenizer: Any) -> None:
    """Add a sampled token and decide whether the request is finished (EOS, stop string, length)."""
    r.output_ids.append(tok)
    if tok in eos_ids and not r.params.ignore_eos:
        r.finish_reason = "stop"
    elif r.params.stop and any(s in tokenizer.decode(r.output_ids[-16:]) for s in r.params.stop):
        r.finish_reason = "stop"
    elif len(r.output_ids) >= r.params.max_tokens:
        r.finish_reason = "length"
