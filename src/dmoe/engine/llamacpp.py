"""The llama.cpp engine: a GGUF base, GGUF LoRA adapters, the torch engine's interface.

    engine = LlamaCppEngine(resolve_base("model.gguf"), tokenizer)
    engine.load_expert(load_expert("examples/experts/cooking"))   # PEFT -> GGUF, cached
    generate(engine, [ids_a, ids_b], [[("cooking", 1.0)], []], SamplingParams(max_tokens=32))

llama.cpp applies one adapter set to a whole context (``llama_set_adapters_lora``),
so requests are grouped by adapter set. Each step picks the next group with work,
round-robin, sets its adapters, and runs ``llama_decode`` with that group's new
prompts (prefill) and one token for each of its running sequences, for up to
``slice_steps`` steps (a switch costs about 4 ms on a 2-core CPU). Other
groups keep their KV cells and wait for their turn: a request is only ever
computed under its own set, so its greedy output does not depend on the load.
A single context with one sequence per request keeps one copy of the KV cache
budget; see docs/architecture.md for the trade-off against one context per set.

Adapters are loaded (``llama_adapter_lora_init``) and freed only under the engine
lock, between two decode calls. PEFT experts are converted to GGUF on first load
and cached under $DMOE_HOME/gguf-adapters, keyed by adapter and base content.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dmoe.base import BaseSpec, stop_token_ids
from dmoe.engine.grammar import new_matcher
from dmoe.engine.protocol import EngineStats, Resident, generate
from dmoe.engine.request import (
    Request,
    RequestQueue,
    SamplingParams,
    append_token,
    check_prompt,
    check_scale,
)
from dmoe.engine.sampling_numpy import new_generator, sample_batch
from dmoe.errors import (
    AdapterError,
    AdapterInUseError,
    EngineError,
    ExpertNotLoadedError,
    RequestError,
    UnknownExpertError,
)
from dmoe.experts import Expert
from dmoe.lora_gguf import ExportError, cached_adapter_gguf, check_adapter_fits

if TYPE_CHECKING:
    import torch


class LlamaCppError(EngineError):
    """llama.cpp is missing, or refused a model, an adapter or a batch."""


def _llama_cpp():
    try:
        import llama_cpp  # a compiled extension: imported only when this engine is used
    except ImportError as exc:  # pragma: no cover - part of the default install
        raise LlamaCppError(f"llama-cpp-python is not installed ({exc}); run: pip install 'llama-cpp-python>=0.3.36,<0.4'") from None
    return llama_cpp


_LOG_SINK = None


def _silence_llama_logs() -> None:
    """llama.cpp logs every tensor to stderr; keep errors only."""
    global _LOG_SINK
    lc = _llama_cpp()
    if _LOG_SINK is None:
        def sink(level, text, user_data):  # noqa: ARG001 - ctypes callback signature
            if level == 4:  # GGML_LOG_LEVEL_ERROR
                os.write(2, text)
        _LOG_SINK = lc.llama_log_callback(sink)
        lc.llama_log_set(_LOG_SINK, ctypes.c_void_p(0))


@dataclass
class _Loaded:
    resident: Resident
    handle: Any  # llama_adapter_lora_p (a ctypes pointer)


class LlamaCppEngine:
    """One GGUF base in llama.cpp, many GGUF adapters, requests grouped by adapter set
    (implements ``Engine``)."""

    def __init__(self, base: BaseSpec, tokenizer, *, max_batch: int = 8, max_seq: int = 2048,
                 max_prefill_tokens: int = 1024, n_threads: int | None = None, slice_steps: int = 4):
        if not base.is_gguf:
            raise LlamaCppError(f"the llama.cpp engine needs a GGUF base; {base.path} is an HF directory. "
                                f"write one with: dmoe export base --base {base.path} -o base.gguf, then serve with --base base.gguf")
        lc = _llama_cpp()
        _silence_llama_logs()
        lc.llama_backend_init()
        self.base = base
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq = max_seq
        self.max_prefill_tokens = max_prefill_tokens
        self.slice_steps = max(1, slice_steps)  # decode steps a set keeps the context before the next set's turn
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        self._model: Any = lc.llama_model_load_from_file(str(base.path).encode(), mp)
        if not self._model:
            raise LlamaCppError(f"llama.cpp could not load {base.path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = max_seq * max_batch
        cp.n_seq_max = max_batch
        cp.kv_unified = True  # sequences share one cell pool: short requests leave room for long ones
        cp.n_batch = max(max_prefill_tokens + max_batch, 512)
        # llama-server's default physical batch: llama.cpp sizes its compute buffers for n_ubatch
        # tokens and splits a longer prefill; at n_batch (1032) they held 16 MB more at peak
        # (bench/serve_memory.py, llamacpp-no-router), for no speed a 2-core CPU can use
        cp.n_ubatch = min(cp.n_batch, 512)
        threads = n_threads or os.cpu_count() or 1
        cp.n_threads = cp.n_threads_batch = self.n_threads = threads
        self._ctx: Any = lc.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise LlamaCppError("llama.cpp could not create a context")
        self._mem: Any = lc.llama_get_memory(self._ctx)
        vocab: Any = lc.llama_model_get_vocab(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(vocab)
        self._batch = lc.llama_batch_init(cp.n_batch, 0, 1)
        self._batch_cap = cp.n_batch
        self._loaded: dict[str, _Loaded] = {}
        self._active: tuple = ()  # the adapter set now on the context
        self._turn = 0
        self._slice_left = 0
        self.queue = RequestQueue(new_generator)  # numpy: this engine runs without torch
        self.free_seqs = list(range(max_batch))
        self.lock = threading.RLock()
        # KV bytes per token: K and V, every layer, f16 cells (llama.cpp's default cache type)
        n_layer, n_embd = lc.llama_model_n_layer(self._model), lc.llama_model_n_embd(self._model)
        n_head, n_head_kv = lc.llama_model_n_head(self._model), lc.llama_model_n_head_kv(self._model)
        self._kv_per_token = 2 * 2 * n_layer * (n_embd // max(n_head, 1)) * n_head_kv
        self._n_ctx = cp.n_ctx
        self.eos_ids = stop_token_ids(tokenizer)
        self.adapter_switches = 0

    def close(self) -> None:
        """Free the context, the adapters and the model (the engine is unusable afterwards)."""
        lc = _llama_cpp()
        with self.lock:
            if self._ctx:
                lc.llama_batch_free(self._batch)
                lc.llama_free(self._ctx)
                self._ctx = None
            for item in self._loaded.values():
                lc.llama_adapter_lora_free(item.handle)
            self._loaded.clear()
            if self._model:
                lc.llama_model_free(self._model)
                self._model = None

    # -------------------------------------------------------------- adapters
    @property
    def resident(self) -> Mapping[str, Resident]:
        return {name: item.resident for name, item in self._loaded.items()}

    def _in_use(self) -> set[str]:
        return {n for r in self.queue.in_flight() for n, _ in r.lora}

    def load_expert(self, expert: Expert) -> Resident:
        """Convert (cached) and check outside the lock; hand the file to llama.cpp between steps."""
        path = cached_adapter_gguf(expert, self.base)
        try:
            check_adapter_fits(path, self.base.path)
        except ExportError as exc:
            raise AdapterError(str(exc)) from None
        rank = int(expert.adapter_config().get("r", 0))
        lc = _llama_cpp()
        with self.lock:
            old = self._loaded.get(expert.name)
            if old is not None and expert.name in self._in_use():
                raise AdapterInUseError(f"expert '{expert.name}' is in use by queued or running requests; reload it when they finish, "
                                        "or load it under another name")
            handle = lc.llama_adapter_lora_init(self._model, str(path).encode())
            if not handle:
                raise AdapterError(f"llama.cpp refused the adapter {path}")
            if old is not None:
                self._drop(expert.name)
            res = Resident(expert.name, len(self._loaded), rank, str(expert.path))
            self._loaded[expert.name] = _Loaded(res, handle)
            return res

    def _drop(self, name: str) -> None:
        lc = _llama_cpp()
        item = self._loaded.pop(name)
        if any(n == name for n, _ in self._active):
            lc.llama_set_adapters_lora(self._ctx, None, 0, None)
            self._active = ()
        lc.llama_adapter_lora_free(item.handle)

    def _unknown(self, name: str) -> str:
        return f"unknown expert '{name}'; loaded experts: {', '.join(sorted(self._loaded)) or 'none'}"

    def unload_expert(self, name: str) -> None:
        with self.lock:
            if name not in self._loaded:
                raise ExpertNotLoadedError(f"expert '{name}' is not loaded; loaded experts: {', '.join(sorted(self._loaded)) or 'none'}")
            if name in self._in_use():
                raise AdapterInUseError(f"expert '{name}' is in use by queued or running requests; unload it when they finish")
            self._drop(name)

    def _resolve(self, adapters: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """Check names and scales; the set is kept by name (sorted), zero scales dropped."""
        out = []
        for name, scale in adapters:
            if name not in self._loaded:
                raise UnknownExpertError(self._unknown(name))
            if check_scale(name, scale) != 0:
                out.append((name, float(scale)))
        return sorted(out)

    def _set_adapters(self, key: tuple) -> None:
        if key == self._active:
            return
        lc = _llama_cpp()
        n = len(key)
        handles = (lc.llama_adapter_lora_p_ctypes * max(n, 1))(*[self._loaded[name].handle for name, _ in key])
        scales = (ctypes.c_float * max(n, 1))(*[s for _, s in key])
        if lc.llama_set_adapters_lora(self._ctx, handles if n else None, n, scales if n else None) != 0:
            raise LlamaCppError(f"llama.cpp refused the adapter set {key}")
        self._active = key
        self.adapter_switches += 1

    # -------------------------------------------------------------- requests
    def submit(self, prompt_ids: Sequence[int], adapters: list[tuple[str, float]], params: SamplingParams) -> Request:
        """Queue a request; its adapter set is fixed now."""
        check_prompt(prompt_ids, params, self.max_seq, self.n_vocab)
        if len(prompt_ids) > self.max_prefill_tokens:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this engine prefills at most {self.max_prefill_tokens}")
        matcher = new_matcher(self.tokenizer, self.n_vocab, params.grammar)  # outside the lock: it can take 100 ms
        with self.lock:
            return self.queue.add(prompt_ids, self._resolve(adapters), params, matcher)

    def has_work(self) -> bool:
        return self.queue.has_work()

    def _release(self, r: Request) -> None:
        if r.kv_slot >= 0:
            _llama_cpp().llama_memory_seq_rm(self._mem, r.kv_slot, -1, -1)
            self.free_seqs.append(r.kv_slot)
            r.kv_slot = -1

    def _next_group(self) -> tuple | None:
        """The adapter set to run: the current one for up to ``slice_steps`` steps while it has
        work, then the next set with work, round-robin (running first, then waiting)."""
        keys: list[tuple] = []
        for r in self.queue.in_flight():
            k = tuple(r.lora)
            if k not in keys:
                keys.append(k)
        if not keys:
            return None
        if self._active in keys and self._slice_left > 0:
            self._slice_left -= 1
            return self._active
        self._turn = (self._turn + 1) % len(keys)
        self._slice_left = self.slice_steps - 1
        return keys[self._turn]

    def step(self) -> list[Request]:
        """One llama_decode for one adapter set's requests. Returns the requests that advanced."""
        lc = _llama_cpp()
        with self.lock:
            key = self._next_group()
            if key is None:
                return []
            queue = self.queue
            rows = [r for r in queue.running if tuple(r.lora) == key]
            budget = self._batch_cap - len(rows)
            admitted = []
            for r in list(queue.waiting):
                if tuple(r.lora) != key or not self.free_seqs:
                    continue
                if admitted and len(r.prompt_ids) > min(budget, self.max_prefill_tokens):
                    break
                if len(r.prompt_ids) > budget:
                    break
                queue.waiting.remove(r)
                r.kv_slot = self.free_seqs.pop(0)
                admitted.append(r)
                budget -= len(r.prompt_ids)
            if not rows and not admitted:
                return []
            self._set_adapters(key)
            b = self._batch
            n = 0
            out_index: list[tuple[Request, int]] = []

            def put(tok: int, pos: int, seq: int, logits: bool) -> None:
                nonlocal n
                b.token[n], b.pos[n], b.n_seq_id[n] = tok, pos, 1
                b.seq_id[n][0] = seq
                b.logits[n] = logits
                n += 1

            for r in rows:
                put(r.output_ids[-1], len(r.prompt_ids) + len(r.output_ids) - 1, r.kv_slot, True)
                out_index.append((r, n - 1))
            for r in admitted:
                last = len(r.prompt_ids) - 1
                for i, t in enumerate(r.prompt_ids):
                    put(t, i, r.kv_slot, i == last)
                out_index.append((r, n - 1))
            b.n_tokens = n
            rc = lc.llama_decode(self._ctx, b)
            if rc != 0:
                for r in admitted:  # give the new ones their place back; the running ones fail in the runner
                    self._release(r)
                    queue.waiting.appendleft(r)
                raise LlamaCppError(f"llama_decode returned {rc} for {n} tokens")
            queue.running += admitted
            logits = np.stack([np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))
                               for _, i in out_index])
            reqs = [r for r, _ in out_index]
            for r, tok in zip(reqs, sample_batch(logits, reqs)):
                append_token(r, tok, self.eos_ids, self.tokenizer)
            for r in [r for r in queue.running if r.done]:
                self._release(r)
            queue.running = [r for r in queue.running if not r.done]
            return reqs

    def logits(self, ids: list[int], adapters: list[tuple[str, float]]) -> torch.Tensor:
        """(len(ids), V) logits of one sequence under an adapter set, every position
        (teacher forcing, for parity checks). Waits for the step boundary; uses a free sequence."""
        import torch  # parity checks only: serving never imports torch here

        lc = _llama_cpp()
        key = tuple(self._resolve(adapters))
        if len(ids) > self._batch_cap:
            raise RequestError(f"{len(ids)} tokens; at most {self._batch_cap} in one call")
        with self.lock:
            if not self.free_seqs:
                raise RequestError("no free sequence; try again when requests finish")
            seq = self.free_seqs.pop(0)
            try:
                self._set_adapters(key)
                b = self._batch
                for i, t in enumerate(ids):
                    b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, True
                    b.seq_id[i][0] = seq
                b.n_tokens = len(ids)
                if lc.llama_decode(self._ctx, b) != 0:
                    raise LlamaCppError(f"llama_decode failed for {len(ids)} tokens")
                rows = [np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,)).copy() for i in range(len(ids))]
                return torch.from_numpy(np.stack(rows))
            finally:
                lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
                self.free_seqs.append(seq)

    def cancel(self, req: Request) -> None:
        """Drop a request (a client went away); its sequence's KV cells are freed."""
        with self.lock:
            self.queue.drop(req)
            self._release(req)

    def describe(self) -> str:
        return f"llama.cpp engine on cpu, {self.n_threads} threads, the GGUF's own weights ({self.base.path.name})"

    def stats(self) -> EngineStats:
        with self.lock:
            held = sum(len(r.prompt_ids) + len(r.output_ids) for r in self.queue.running)
            return EngineStats(running=len(self.queue.running), waiting=len(self.queue.waiting), kv_tokens=held,
                               kv_bytes_used=self._kv_per_token * held, kv_bytes_total=self._kv_per_token * self._n_ctx,
                               experts=len(self._loaded), adapter_switches=self.adapter_switches)

    def generate(self, prompts: list[list[int]], adapter_sets: list[list[tuple[str, float]]], params: SamplingParams) -> list[list[int]]:
        """Run requests to completion together (bounded); returns each one's output ids."""
        return generate(self, prompts, adapter_sets, params)
