"""The engine protocol: what the server, the runner, MCP and the CLI may ask of an engine.

Both engines (``TorchEngine`` in ``torch_engine.py``, ``LlamaCppEngine`` in
``llamacpp.py``) implement it; nothing above this layer reaches into either one's
internals. As in vLLM's ``EngineClient``, there is no shim that makes one engine look
like the other: each is one implementation of this protocol.

    req = engine.submit(prompt_ids, [("cooking", 1.0)], SamplingParams(max_tokens=32))
    run_until_done(engine, [req])          # bounded: raises EngineError if it cannot finish
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from dmoe.engine.request import Request, SamplingParams
from dmoe.errors import EngineError
from dmoe.experts import Expert


@dataclass
class Resident:
    """An expert loaded into an engine."""

    name: str
    slot: int
    rank: int
    path: str
    modules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics and /health, taken under the engine lock."""

    running: int
    waiting: int
    kv_tokens: int        # tokens held in the KV cache by running requests
    kv_bytes_used: int
    kv_bytes_total: int
    experts: int          # resident adapters
    adapter_switches: int  # llama.cpp: adapter-set changes on the context; torch: 0 (sets live per row)


@runtime_checkable
class Engine(Protocol):
    """One base model, many adapters, continuous batching with a per-request adapter set."""

    tokenizer: Any
    n_vocab: int  # rows of the logits (may exceed the tokenizer's vocabulary)
    max_batch: int
    max_seq: int
    lock: threading.RLock  # held by each step; admin changes and submits take it between steps

    @property
    def resident(self) -> Mapping[str, Resident]:
        """The loaded experts by name."""
        ...

    def submit(self, prompt_ids: Sequence[int], adapters: list[tuple[str, float]], params: SamplingParams) -> Request:
        """Queue a request. Its adapter set is resolved now and never changes; an unknown
        expert raises UnknownExpertError, a bad request RequestError."""
        ...

    def step(self) -> list[Request]:
        """Advance the engine by one scheduling step; returns the requests that got a token."""
        ...

    def cancel(self, req: Request) -> None:
        """Drop a request (a client went away) and free its KV memory."""
        ...

    def load_expert(self, expert: Expert) -> Resident:
        """Load or replace an expert while requests run (AdapterInUseError if one uses it)."""
        ...

    def unload_expert(self, name: str) -> None:
        """ExpertNotLoadedError if absent, AdapterInUseError while requests use it."""
        ...

    def has_work(self) -> bool:
        ...

    def stats(self) -> EngineStats:
        ...

    def describe(self) -> str:
        """What runs the steps, for the start-up banner (engine, device, dtype, weights' format)."""
        ...

    def close(self) -> None:
        """Free what the engine holds outside Python's garbage collector."""
        ...


def step_budget(reqs: Sequence[Request]) -> int:
    """Steps that are always enough to finish ``reqs``: every step gives a token to at least
    one request with work (the llama.cpp engine's groups take turns, hence the factor 2)."""
    return 2 * (sum(r.params.max_tokens for r in reqs) + len(reqs)) + 16


def run_until_done(engine: Engine, reqs: Sequence[Request], max_steps: int | None = None) -> int:
    """Step ``engine`` until every one of ``reqs`` is done; returns the steps taken. A bug
    that stops progress raises EngineError after ``max_steps`` instead of hanging."""
    limit = step_budget(reqs) if max_steps is None else max_steps
    for n in range(limit + 1):
        if all(r.done for r in reqs):
            return n
        engine.step()
    raise EngineError(f"{sum(not r.done for r in reqs)} of {len(reqs)} requests were not done after {limit} engine steps")


def generate(engine: Engine, prompts: Sequence[Sequence[int]], adapter_sets: Sequence[list[tuple[str, float]]],
             params: SamplingParams) -> list[list[int]]:
    """Submit every request, step until all are done (bounded); each one's output ids."""
    reqs = [engine.submit(p, a, params) for p, a in zip(prompts, adapter_sets, strict=True)]
    run_until_done(engine, reqs)
    return [r.output_ids for r in reqs]
