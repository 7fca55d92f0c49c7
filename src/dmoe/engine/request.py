"""What both engines share about a request: its sampling parameters (validated once,
here), the request itself, the queue it waits in, and the end-of-request rule
(sampling itself is ``sampling.py``).

    params = SamplingParams(max_tokens=32, temperature=0.7, seed=1)   # a bad value raises RequestError
    queue = RequestQueue(new_generator)   # new_generator(seed): the engine's seeded random source
    req = queue.add(prompt_ids, lora, params)
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dmoe.errors import RequestError, UnknownExpertError

__all__ = ["MAX_LOGPROBS", "Request", "RequestError", "RequestQueue", "SamplingParams", "UnknownExpertError",
           "append_token", "check_prompt", "check_scale"]


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def check_scale(name: str, scale: Any) -> float:
    """A finite adapter scale, or a RequestError naming the expert. The one scale check."""
    return _finite(scale, f"scale for expert '{name}'")


MAX_LOGPROBS = 20  # top log-probabilities per token at most (OpenAI's limit)


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
    presence_penalty: float = 0.0    # OpenAI: minus this for every token already in the output, in [-2, 2]
    frequency_penalty: float = 0.0   # OpenAI: minus this times the token's count in the output, in [-2, 2]
    repetition_penalty: float = 1.0  # HF/llama.cpp: tokens of the prompt and output, logit / p if > 0 else * p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    logprobs: int | None = None      # None: off; k: the sampled token's log-probability and the k most likely
    grammar: str | None = None       # an llguidance grammar the output must match (engine/grammar.py)

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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= _finite(getattr(self, name), name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if _finite(self.repetition_penalty, "repetition_penalty") <= 0:
            raise RequestError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for tok, bias in self.logit_bias:
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise RequestError(f"logit_bias: token ids must be integers >= 0, got {tok!r}")
            if not -100 <= _finite(bias, f"logit_bias for token {tok}") <= 100:
                raise RequestError(f"logit_bias for token {tok} must be in [-100, 100], got {bias!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise RequestError(f"top log-probabilities must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalized(self) -> bool:
        """Whether the logits are changed before sampling (penalties or a bias; the grammar is per request)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 or self.logit_bias)


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
    generator: Any = None  # the engine's seeded random source (torch.Generator; numpy's Generator for llama.cpp)
    matcher: Any = None  # the grammar's llguidance matcher (params.grammar), made at submit
    # params.logprobs: per output token, (its log-probability, [(token id, log-probability)] of the k most likely)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class RequestQueue:
    """The waiting and running requests of one engine, and their ids (callers hold the engine lock)."""

    def __init__(self, new_generator: Callable[[int], Any]):
        self.new_generator = new_generator  # seed -> the engine's random source, for a request with a seed
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count(1)

    def add(self, prompt_ids: Sequence[int], lora: list[tuple[Any, float]], params: SamplingParams,
            matcher: Any = None) -> Request:
        req = Request(list(prompt_ids), lora, params, id=next(self._ids), matcher=matcher)
        if params.seed is not None:
            req.generator = self.new_generator(params.seed)
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


def check_prompt(prompt_ids: Sequence[int], params: SamplingParams, max_seq: int, n_vocab: int) -> None:
    """What every engine refuses before queueing a request."""
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    bad = [t for t in prompt_ids if not 0 <= t < n_vocab]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary of {n_vocab}")
    bad = [t for t, _ in params.logit_bias if t >= n_vocab]
    if bad:
        raise RequestError(f"logit_bias: token id {bad[0]} is outside the vocabulary of {n_vocab}")
    if len(prompt_ids) + params.max_tokens > max_seq:
        raise RequestError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {max_seq} tokens"
        )


def append_token(r: Request, tok: int, eos_ids: set[int], tokenizer: Any) -> None:
    """Add a sampled token and decide whether the request is finished (EOS, stop string, length)."""
    r.output_ids.append(tok)
    if r.matcher is not None and (not r.matcher.consume_token(tok) or r.matcher.is_stopped()):
        r.finish_reason = "stop"  # the grammar is complete (an error cannot happen: its mask chose the token)
    elif tok in eos_ids and not r.params.ignore_eos:
        r.finish_reason = "stop"
    elif r.params.stop and any(s in tokenizer.decode(r.output_ids[-16:]) for s in r.params.stop):
        r.finish_reason = "stop"
    elif len(r.output_ids) >= r.params.max_tokens:
        r.finish_reason = "length"
