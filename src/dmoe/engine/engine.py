"""The torch multi-LoRA engine: continuous batching, per-row adapter sets.

    engine = Engine.from_base(model, tokenizer)        # an HF causal LM from dmoe.base
    engine.load_expert(load_expert("examples/experts/cooking"))
    outs = engine.generate([ids_a, ids_b], [[("cooking", 1.0)], []], SamplingParams(max_tokens=32))

Each step: move running rows down into the lowest KV slots (so the decode reads the
cache in place, without a gather), admit waiting requests into the free slots with
one batched prefill (up to ``max_prefill_tokens`` prompt tokens), then one decode
step for every running row together. A row's adapter set is
resolved to (slot, scale) pairs when it is submitted and never changes afterwards,
so loading, unloading or changing defaults never touches a request in flight.
Adapters referenced by queued or running requests cannot be unloaded.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from dmoe import DmoeError
from dmoe.engine.adapters import AdapterSlots, Resident
from dmoe.engine.model import Transformer, from_hf
from dmoe.experts import Expert


class RequestError(DmoeError):
    """A request cannot be served as given (unknown adapter, too long, bad parameters)."""


class UnknownExpertError(RequestError):
    """The request names an expert that is not loaded."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)


@dataclass
class Request:
    prompt_ids: list[int]
    lora: list[tuple[int, float]]  # (slot, scale), resolved at submit
    params: SamplingParams
    id: int = 0
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    kv_slot: int = -1
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from a (V,) logits row."""
    if p.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cut = torch.cumsum(sorted_p, 0) - sorted_p > p.top_p  # keep the smallest set reaching top_p
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def check_request(prompt_ids: list[int], params: SamplingParams, max_seq: int) -> None:
    """What every engine refuses before queueing a request."""
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    if params.max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {params.max_tokens}")
    if len(prompt_ids) + params.max_tokens > max_seq:
        raise RequestError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {max_seq} tokens"
        )


def check_scale(name: str, scale) -> float:
    """A finite adapter scale, or a RequestError naming the expert."""
    if not (isinstance(scale, (int, float)) and abs(scale) < float("inf") and scale == scale):
        raise RequestError(f"scale for expert '{name}' must be a finite number, got {scale!r}")
    return float(scale)


def append_token(r: Request, tok: int, eos_ids: set[int], tokenizer) -> None:
    """Add a sampled token and decide whether the request is finished (EOS, stop string, length)."""
    r.output_ids.append(tok)
    if tok in eos_ids and not r.params.ignore_eos:
        r.finish_reason = "stop"
    elif r.params.stop and any(s in tokenizer.decode(r.output_ids[-16:]) for s in r.params.stop):
        r.finish_reason = "stop"
    elif len(r.output_ids) >= r.params.max_tokens:
        r.finish_reason = "length"


def enqueue_request(engine, prompt_ids: list[int], adapters: list[tuple[str, float]], params: SamplingParams) -> Request:
    """Resolve the adapter set now (unknown names raise) and queue a new request on ``engine``."""
    with engine.lock:
        req = Request(list(prompt_ids), engine.resolve(adapters), params, id=next(engine._ids))
        if params.seed is not None:
            req.generator = torch.Generator().manual_seed(params.seed)
        engine.waiting.append(req)
        return req


def drop_request(engine, req: Request) -> None:
    """Take ``req`` out of the engine's queues and mark it cancelled (caller holds the lock)."""
    if req in engine.waiting:
        engine.waiting.remove(req)
    if req in engine.running:
        engine.running.remove(req)
    req.finish_reason = req.finish_reason or "cancelled"


def generate_all(engine, prompts: list[list[int]], adapter_sets: list[list[tuple[str, float]]], params: SamplingParams) -> list[list[int]]:
    """Submit every request to ``engine``, step until all are done; each one's output ids."""
    reqs = [engine.submit(p, a, params) for p, a in zip(prompts, adapter_sets)]
    while any(not r.done for r in reqs):
        engine.step()
    return [r.output_ids for r in reqs]


class Engine:
    """One base model, many adapters, a continuously batched decode loop."""

    def __init__(self, model: Transformer, tokenizer, *, max_batch: int = 8, max_seq: int = 2048,
                 max_loras: int = 8, max_rank: int = 64, max_prefill_tokens: int = 1024):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq = max_seq
        self.max_prefill_tokens = max_prefill_tokens
        p = next(model.parameters())
        self.device = p.device
        model.allocate_cache(max_batch, max_seq, p.dtype, p.device)
        self.slots = AdapterSlots(model, max_loras, max_rank)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.lock = threading.RLock()  # guards slots and queues between steps
        self._ids = itertools.count(1)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = {eos} if eos is not None else set()

    @classmethod
    def from_base(cls, hf_model, tokenizer, dtype: torch.dtype | None = None, **kw) -> "Engine":
        """An engine over an HF causal LM's weights (cast to ``dtype`` if given)."""
        return cls(from_hf(hf_model, dtype), tokenizer, **kw)

    # -------------------------------------------------------------- adapters
    def _in_use(self) -> set[int]:
        return {s for r in itertools.chain(self.waiting, self.running) for s, _ in r.lora}

    def load_expert(self, expert: Expert) -> Resident:
        """Load (or replace) an expert while requests run. Reading and validating happen
        outside the engine lock; only the slot copy waits for the step boundary."""
        prepared = self.slots.prepare(expert)
        with self.lock:
            return self.slots.commit(prepared, self._in_use())

    def unload_expert(self, name: str) -> None:
        with self.lock:
            self.slots.unload(name, self._in_use())

    def resolve(self, adapters: list[tuple[str, float]]) -> list[tuple[int, float]]:
        """Names -> (slot, scale); an unknown name is an error, never a silent fall-back to the base."""
        out = []
        for name, scale in adapters:
            res = self.slots.resident.get(name)
            if res is None:
                known = ", ".join(sorted(self.slots.resident)) or "none"
                raise UnknownExpertError(f"unknown expert '{name}'; loaded experts: {known}")
            if check_scale(name, scale) != 0:
                out.append((res.slot, float(scale)))
        return out

    # -------------------------------------------------------------- requests
    def submit(self, prompt_ids: list[int], adapters: list[tuple[str, float]], params: SamplingParams) -> Request:
        """Queue a request; its adapter set is fixed now."""
        check_request(prompt_ids, params, self.max_seq)
        return enqueue_request(self, prompt_ids, adapters, params)

    def _set_lora(self, reqs: list[Request]) -> None:
        k = max((len(r.lora) for r in reqs), default=0)
        lora = self.model.lora
        if k == 0:
            lora.clear()
            return
        idx = torch.full((len(reqs), k), -1, dtype=torch.long)
        scale = torch.zeros((len(reqs), k))
        for i, r in enumerate(reqs):
            for j, (s, w) in enumerate(r.lora):
                idx[i, j], scale[i, j] = s, w
        lora.set(idx.to(self.device), scale.to(self.device), next(self.model.parameters()).dtype)

    def _finish_check(self, r: Request, tok: int) -> None:
        append_token(r, tok, self.eos_ids, self.tokenizer)

    def _compact(self) -> None:
        """Move running rows into KV slots 0..n-1, in slot order (a few MB of copies per finished row)."""
        self.running.sort(key=lambda r: r.kv_slot)
        kc, vc = self.model.k_cache, self.model.v_cache
        for i, r in enumerate(self.running):
            if r.kv_slot != i:  # slot i is free: rows before it were already moved below i
                n = len(r.prompt_ids) + len(r.output_ids)
                kc[:, i, :n] = kc[:, r.kv_slot, :n]
                vc[:, i, :n] = vc[:, r.kv_slot, :n]
                r.kv_slot = i

    def _admit(self) -> list[Request]:
        """Prefill waiting requests into the free slots, as one right-padded batch."""
        batch: list[Request] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_batch:
            n = len(self.waiting[0].prompt_ids)
            if batch and tokens + n > self.max_prefill_tokens:
                break
            batch.append(self.waiting.popleft())
            tokens += n
        if not batch:
            return []
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)  # pad id 0: pad keys sit after each
        for i, r in enumerate(batch):                              # prompt and are overwritten by decode
            r.kv_slot = len(self.running) + i                      # before any query can see them
            ids[i, :len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        self._set_lora(batch)
        last = torch.tensor([len(r.prompt_ids) - 1 for r in batch], device=self.device)
        slots = torch.tensor([r.kv_slot for r in batch], device=self.device)
        pos = torch.arange(width, device=self.device).expand(len(batch), width)
        logits = self.model(ids.to(self.device), pos, slots, logits_at=last).cpu()
        for i, r in enumerate(batch):
            self._finish_check(r, sample(logits[i], r.params, r.generator))
        self.running += [r for r in batch if not r.done]
        return batch

    def step(self) -> list[Request]:
        """Admit, then decode one token for every running row. Returns the requests that advanced."""
        with self.lock:
            self._compact()
            rows = list(self.running)
            advanced = self._admit()
            if rows:
                self._set_lora(rows)
                tokens = torch.tensor([[r.output_ids[-1]] for r in rows], device=self.device)
                pos = torch.tensor([[len(r.prompt_ids) + len(r.output_ids) - 1] for r in rows], device=self.device)
                slots = torch.tensor([r.kv_slot for r in rows], device=self.device)
                logits = self.model(tokens, pos, slots).cpu()
                for i, r in enumerate(rows):
                    self._finish_check(r, sample(logits[i], r.params, r.generator))
                advanced += rows
            self.running = [r for r in self.running if not r.done]
            return advanced

    def cancel(self, req: Request) -> None:
        """Drop a request (a client went away); its KV slot is freed."""
        with self.lock:
            drop_request(self, req)

    def generate(self, prompts: list[list[int]], adapter_sets: list[list[tuple[str, float]]], params: SamplingParams) -> list[list[int]]:
        """Run requests to completion together; returns each one's output ids."""
        return generate_all(self, prompts, adapter_sets, params)
