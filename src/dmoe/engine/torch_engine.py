"""The torch multi-LoRA engine: continuous batching, per-row adapter sets.

    engine = TorchEngine.from_base(model, tokenizer)      # an HF causal LM from dmoe.base
    engine.load_expert(load_expert("examples/experts/cooking"))
    outs = generate(engine, [ids_a, ids_b], [[("cooking", 1.0)], []], SamplingParams(max_tokens=32))

Each step: move running rows down into the lowest KV slots (so the decode reads the
cache in place, without a gather), admit waiting requests into the free slots with
one batched prefill (up to ``max_prefill_tokens`` prompt tokens), then one decode
step for every running row together. A row's adapter set is resolved to
(slot, scale) pairs when it is submitted and never changes, so loading, unloading or
changing defaults never touches a request in flight. Adapters referenced by queued
or running requests cannot be unloaded.

Everything a forward needs is computed on the host from Python ints (positions,
slot ranges, adapter slots) and copied to the device once; sampling runs on the
device, and a step's only device->host transfer is one ``.tolist()`` of its tokens.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence

import torch

from dmoe.base import stop_token_ids
from dmoe.engine.adapters import AdapterSlots
from dmoe.engine.grammar import new_matcher
from dmoe.engine.model import StepInput, Transformer, compile_blocks, from_hf
from dmoe.engine.native import native_decode, native_kernel
from dmoe.engine.protocol import EngineStats, Resident, generate
from dmoe.engine.request import (
    Request,
    RequestQueue,
    SamplingParams,
    append_token,
    check_prompt,
    check_scale,
)
from dmoe.engine.sampling import sample_batch
from dmoe.errors import UnknownExpertError
from dmoe.experts import Expert

BUCKET_PREFILL = os.environ.get("DMOE_PREFILL_BUCKETS", "1") != "0"  # 0: the unbucketed baseline (benchmarks)


def prefill_width(longest: int, max_seq: int) -> int:
    """A prefill batch's padded width: the next power of two (at least 16, at most ``max_seq``).

    Few distinct matmul shapes, so memory stays bounded: in bf16 on CPU, torch's oneDNN path
    keeps memory for every new matmul shape it meets, never given back (the embedded model,
    240 prefills of random lengths: +876 MB unbucketed, +161 MB and levelling off with these
    buckets; bench/serve_memory.py). With buckets a shape is met once per bucket and batch size.
    The pad columns cost at most twice the prefill's matmul rows; pad keys sit after each
    prompt and are overwritten by decode before any query reads them."""
    if not BUCKET_PREFILL:
        return longest
    return min(max_seq, max(16, 1 << (longest - 1).bit_length()))


class TorchEngine:
    """One base model, many adapters, a continuously batched decode loop (implements ``Engine``)."""

    def __init__(self, model: Transformer, tokenizer, *, max_batch: int = 8, max_seq: int = 2048,
                 max_loras: int = 8, max_rank: int = 64, max_prefill_tokens: int = 1024, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq = max_seq
        self.max_prefill_tokens = max_prefill_tokens
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.n_vocab = model.args.vocab_size
        model.allocate_cache(max_batch, max_seq, p.dtype, p.device)
        self.slots = AdapterSlots(model, max_loras, max_rank)
        self.queue = RequestQueue(lambda seed: torch.Generator(device=self.device).manual_seed(seed))
        self.lock = threading.RLock()  # guards slots and queues between steps
        self.eos_ids = stop_token_ids(tokenizer)
        self.compiled = compile
        self.weights_note = ""  # why packed int4 weights are off, when the default chose dense (runtime.build_engine)
        if compile:
            compile_blocks(model)
        elif self.device.type == "cpu":
            model.lora.use_native(native_kernel())  # decode steps' LoRA in C (None: no compiler, the torch ops)
            model.use_native_decode(native_decode())  # and the work between their matmuls (Llama-family models)

    @classmethod
    def from_base(cls, hf_model, tokenizer, dtype: torch.dtype | None = None, **kw) -> "TorchEngine":
        """An engine over an HF causal LM's weights (cast to ``dtype`` if given)."""
        return cls(from_hf(hf_model, dtype), tokenizer, **kw)

    # -------------------------------------------------------------- adapters
    @property
    def resident(self) -> Mapping[str, Resident]:
        return self.slots.resident

    def _in_use(self) -> set[int]:
        return {s for r in self.queue.in_flight() for s, _ in r.lora}

    def load_expert(self, expert: Expert) -> Resident:
        """Load (or replace) an expert while requests run. Reading and validating happen
        outside the engine lock; only the slot copy waits for the step boundary."""
        prepared = self.slots.prepare(expert)
        with self.lock:
            return self.slots.commit(prepared, self._in_use())

    def unload_expert(self, name: str) -> None:
        with self.lock:
            self.slots.unload(name, self._in_use())

    def _resolve(self, adapters: list[tuple[str, float]]) -> list[tuple[int, float]]:
        """Names -> (slot, scale); an unknown name is an error, never a silent fall-back to the base."""
        out = []
        for name, scale in adapters:
            res = self.resident.get(name)
            if res is None:
                known = ", ".join(sorted(self.resident)) or "none"
                raise UnknownExpertError(f"unknown expert '{name}'; loaded experts: {known}")
            if check_scale(name, scale) != 0:
                out.append((res.slot, float(scale)))
        return out

    # -------------------------------------------------------------- requests
    def submit(self, prompt_ids: Sequence[int], adapters: list[tuple[str, float]], params: SamplingParams) -> Request:
        """Queue a request; its adapter set is fixed now."""
        check_prompt(prompt_ids, params, self.max_seq, self.n_vocab)
        matcher = new_matcher(self.tokenizer, self.n_vocab, params.grammar)  # outside the lock: it can take 100 ms
        with self.lock:
            return self.queue.add(prompt_ids, self._resolve(adapters), params, matcher)

    def cancel(self, req: Request) -> None:
        """Drop a request (a client went away); its KV slot is free from the next step on."""
        with self.lock:
            self.queue.drop(req)

    def has_work(self) -> bool:
        return self.queue.has_work()

    def _compact(self) -> None:
        """Move running rows into KV slots 0..n-1, in slot order (a few MB of copies per finished row)."""
        running = self.queue.running
        running.sort(key=lambda r: r.kv_slot)
        kc, vc = self.model.k_cache, self.model.v_cache
        assert kc is not None and vc is not None
        for i, r in enumerate(running):
            if r.kv_slot != i:  # slot i is free: rows before it were already moved below i
                n = len(r.prompt_ids) + len(r.output_ids)
                kc[:, i, :n] = kc[:, r.kv_slot, :n]
                vc[:, i, :n] = vc[:, r.kv_slot, :n]
                r.kv_slot = i

    def _forward(self, reqs: list[Request], step: StepInput) -> list[int]:
        """One forward for ``reqs`` under their own adapter sets; one sampled token each."""
        self.model.lora.set([r.lora for r in reqs], self.dtype, self.device)
        return sample_batch(self.model(step), reqs)

    def _admit(self) -> list[Request]:
        """Prefill waiting requests into the free slots, as one right-padded batch."""
        waiting, batch, tokens = self.queue.waiting, [], 0
        while waiting and len(self.queue.running) + len(batch) < self.max_batch:
            n = len(waiting[0].prompt_ids)
            if batch and tokens + n > self.max_prefill_tokens:
                break
            batch.append(waiting.popleft())
            tokens += n
        if not batch:
            return []
        width = prefill_width(max(len(r.prompt_ids) for r in batch), self.max_seq)
        for i, r in enumerate(batch):
            r.kv_slot = len(self.queue.running) + i
        # pad id 0: pad keys sit after each prompt and are overwritten by decode before any query sees them
        step = StepInput.build([r.prompt_ids + [0] * (width - len(r.prompt_ids)) for r in batch],
                               [list(range(width))] * len(batch), [r.kv_slot for r in batch], self.device,
                               logits_at=[len(r.prompt_ids) - 1 for r in batch])
        for r, tok in zip(batch, self._forward(batch, step)):
            append_token(r, tok, self.eos_ids, self.tokenizer)
        self.queue.running += [r for r in batch if not r.done]
        return batch

    def step(self) -> list[Request]:
        """Admit, then decode one token for every running row. Returns the requests that advanced."""
        with self.lock:
            self._compact()
            rows = list(self.queue.running)
            advanced = self._admit()
            if rows:
                step = StepInput.build([[r.output_ids[-1]] for r in rows],
                                       [[len(r.prompt_ids) + len(r.output_ids) - 1] for r in rows],
                                       [r.kv_slot for r in rows], self.device)
                for r, tok in zip(rows, self._forward(rows, step)):
                    append_token(r, tok, self.eos_ids, self.tokenizer)
                advanced += rows
            self.queue.running = [r for r in self.queue.running if not r.done]
            return advanced

    def warm_up(self) -> None:
        """Run once the kinds of step serving meets (one row and several, prefill and decode, the
        base, an expert in the lowest and in the highest slot, two experts mixed), so a compiled
        engine compiles before the first request instead of during it. Changes no state."""
        short, long = [1, 2, 3], list(range(1, 18))  # 16- and 32-wide prefills
        by_slot = sorted(self.resident.values(), key=lambda r: r.slot)
        choices: list[list[tuple[str, float]]] = [[]]
        if by_slot:  # the lowest and the highest slot: slot ranges of width 1 and wider
            choices += [[(by_slot[0].name, 1.0)], [(by_slot[-1].name, 1.0)]]
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        for choice in choices:
            self.generate([long], [choice], params)  # one row
            self.generate([short, long], [choice, choice], params)  # several rows
        if len(by_slot) > 1:
            self.generate([short, long], [choices[1], choices[2]], params)  # a mixed batch

    def describe(self) -> str:
        linears = self.slots.linears
        packed = sum(getattr(lin, "int4", None) is not None for lin in linears)
        weights = (f"packed int4 weights in decode steps ({packed} of {len(linears)} linears)" if packed
                   else "dense weights" + (f" (int4 off: {self.weights_note})" if self.weights_note else ""))
        lora = "" if self.slots.dtype == self.dtype else f", {str(self.slots.dtype).removeprefix('torch.')} LoRA ops"
        if self.model.lora.native is not None:
            lora += ", LoRA of decode steps in dmoe's C kernel"
        elif self.device.type == "cpu" and not self.compiled:
            lora += ", LoRA on torch ops (the C kernel is off or could not be built: see the log)"
        if self.model.glue is not None:
            lora += ", decode steps' norms and attention in C"
        return (f"torch engine on {self.device.type} in {str(self.dtype).removeprefix('torch.')}, {weights}{lora}"
                + (", compiled blocks" if self.compiled else ""))

    def stats(self) -> EngineStats:
        kv = self.model.k_cache
        assert kv is not None
        per_token = 2 * kv.element_size() * kv.shape[0] * kv.shape[3] * kv.shape[4]  # K and V, every layer
        with self.lock:
            held = sum(len(r.prompt_ids) + len(r.output_ids) for r in self.queue.running)
            return EngineStats(running=len(self.queue.running), waiting=len(self.queue.waiting), kv_tokens=held,
                               kv_bytes_used=per_token * held, kv_bytes_total=2 * kv.numel() * kv.element_size(),
                               experts=len(self.resident), adapter_switches=0)

    def close(self) -> None:
        """Nothing outside Python's memory: the GC frees the weights and the cache."""

    def generate(self, prompts: list[list[int]], adapter_sets: list[list[tuple[str, float]]], params: SamplingParams) -> list[list[int]]:
        """Run requests to completion together (bounded); returns each one's output ids."""
        return generate(self, prompts, adapter_sets, params)
