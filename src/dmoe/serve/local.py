"""The back-end that runs requests on this process's engine: ``dmoe serve``, and each
replica of ``dmoe cluster``.

The HTTP handlers (``openai.py``) validate a request and choose its adapters; this module
turns it into engine requests (one per choice), reads their tokens from the runner, and
shapes the chunks and the final body. Nothing here knows HTTP beyond the body's JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from dmoe.engine.grammar import token_bytes
from dmoe.engine.request import SamplingParams
from dmoe.engine.runner import FAILED, STOPPED, EngineRunner, Stream
from dmoe.errors import EngineError, RequestError, ShuttingDown
from dmoe.experts import Expert
from dmoe.io import serially
from dmoe.metrics import Metrics
from dmoe.route import RouteDecision
from dmoe.runtime import Job, Reply, ServeState
from dmoe.serve.errors import error_body, status_of
from dmoe.serve.openai import _finite_lp, cut_at_stop, label, message_text, sampling, usage
from dmoe.serve.schemas import ChatRequest, CompletionRequest

log = logging.getLogger("dmoe.serve.requests")


def mean_logprob(logprobs: list) -> float | None:
    """The mean log-probability of a reply's tokens (None for an empty reply)."""
    vals = [lp for lp, _ in logprobs if math.isfinite(lp)]
    return sum(vals) / len(vals) if vals else None


class LocalBackend:
    """:class:`dmoe.runtime.Backend` over the engine of a :class:`ServeState`, stepped by an
    :class:`EngineRunner` thread (started and stopped with the app)."""

    def __init__(self, st: ServeState, after_step: Callable[[int], None] | None = None):
        self.st, self.after_step = st, after_step

    def names(self) -> dict[str, str]:
        return self.st.names()

    def expert_info(self) -> dict[str, dict]:
        return {n: {"path": r.path, "slot": r.slot, "rank": r.rank} for n, r in self.st.engine.resident.items()}

    async def start(self) -> None:
        st = self.st

        def on_token(stream: Stream, n: int) -> None:
            name = stream.label
            st.metrics.tokens.labels(name).inc(n)
            if stream.sent == n and stream.first_token_at is not None:
                st.metrics.ttft.labels(name).observe(stream.first_token_at - stream.submitted_at)
            else:
                now = time.perf_counter()
                st.metrics.token_latency.labels(name).observe(now - (stream.last_at or now))
            stream.last_at = time.perf_counter()

        st.runner = EngineRunner(st.engine, max_queue=st.max_queue, on_token=on_token, after_step=self.after_step)
        st.runner.start()

    async def stop(self) -> None:
        if self.st.runner is not None:
            await asyncio.to_thread(self.st.runner.stop)

    async def load_expert(self, expert: Expert) -> dict:
        res = await asyncio.to_thread(serially, self.st.engine.load_expert, expert)  # io.serial_openmp
        return {"name": res.name, "slot": res.slot, "rank": res.rank, "path": res.path}

    async def unload_expert(self, name: str) -> None:
        await asyncio.to_thread(serially, self.st.engine.unload_expert, name)

    def health(self) -> dict:
        runner = self.st.runner
        ok = runner is not None and runner.alive
        s = self.st.engine.stats()
        return {"ok": ok, "status": "ok" if ok else "draining" if runner is not None and runner.draining else "down",
                "running": s.running, "waiting": s.waiting}

    def update_gauges(self, m: Metrics) -> None:
        s = self.st.engine.stats()
        m.batch_size.set(s.running)
        m.waiting.set(s.waiting)
        m.kv_bytes.set(s.kv_bytes_used)
        m.kv_bytes_total.set(s.kv_bytes_total)
        m.loaded_experts.set(s.experts)
        m.adapter_switches.set(s.adapter_switches)

    def prompt_ids(self, job: Job) -> list[int]:
        body, tok = job.body, self.st.tokenizer
        if job.kind == "text":
            return tok.encode(body.prompt if isinstance(body.prompt, str) else body.prompt[0], add_special_tokens=False)
        msgs = [{"role": m.role, "content": message_text(m.content)} for m in body.messages]
        try:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **(body.chat_template_kwargs or {}))
            if hasattr(ids, "input_ids") or isinstance(ids, dict):
                ids = ids["input_ids"]
        except Exception as exc:  # jinja raises its own types: a template that rejects the roles, for instance
            raise RequestError(f"messages cannot be rendered by the chat template: {exc}") from None
        return list(ids)

    async def complete(self, job: Job, score: bool = False) -> Reply:
        """Run ``job``: every choice submitted (all or none), then one body or SSE lines.
        ``score``: report each choice's mean token log-probability in ``dmoe.mean_logprob``."""
        st, body = self.st, job.body
        if isinstance(body, dict):  # from a remote gateway: the same model the handler validated
            body = (ChatRequest if job.kind == "chat" else CompletionRequest).model_validate(body)
            job = replace(job, body=body)
        params = sampling(body)
        hide = False
        if score and params[0].logprobs is None:
            params, hide = [replace(p, logprobs=0) for p in params], True
        prompt_ids = self.prompt_ids(job)
        streams: list[Stream] = []
        try:
            for p in params:
                streams.append(await submit(st, prompt_ids, job.adapters, p))
        except Exception:
            assert st.runner is not None
            for stream in streams:  # a later choice was refused (the queue is full): drop the earlier ones
                st.runner.cancel(stream)
                st.metrics.requests.labels(stream.label, "cancelled").inc()
            raise
        c = Completion(st, job.kind, body.model or label(job.adapters), params[0], job.adapters, job.decision, prompt_ids,
                       streams, body.return_token_ids, score=score, hide_logprobs=hide,
                       include_usage=bool(body.stream_options and body.stream_options.include_usage))
        if body.stream:
            return Reply(stream=sse(c), headers=c.headers())
        return Reply(body=await run_to_end(c), headers=c.headers())


def failure(st: ServeState, finish: str) -> Exception | None:
    """The error for a request the engine failed or the shutdown ended, else None."""
    if finish == STOPPED:
        return ShuttingDown("the server shut down before this request finished; retry")
    if finish == FAILED:
        assert st.runner is not None
        return EngineError(f"the engine failed this request: {st.runner.error!r}")
    return None


@dataclass
class Completion:
    """One request in flight (``n`` engine requests, one per choice): what it asked, what
    serves it, and how its chunks and its final body are shaped for chat or text."""

    st: ServeState
    kind: str  # "chat" | "text"
    model: str
    params: SamplingParams
    adapters: list[tuple[str, float]]
    decision: RouteDecision | None
    prompt_ids: list[int]
    streams: list[Stream]
    return_token_ids: bool
    include_usage: bool = False
    score: bool = False  # report each choice's mean token log-probability (dmoe.mean_logprob)
    hide_logprobs: bool = False  # logprobs were computed for the score only: not sent
    id: str = ""
    created: int = 0
    started: float = 0.0

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.started = time.perf_counter()

    def headers(self) -> dict[str, str]:
        h = {"X-DMoE-Experts": label(self.adapters)}
        if self.decision is not None:
            h["X-DMoE-Route"] = self.decision.header()
        return h

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def logprobs(self, i: int, start: int, end: int) -> dict | None:
        """Choice ``i``'s log-probabilities for its output tokens ``start:end``, in the chat
        shape (``content``: one entry per token) or the completions one (parallel lists)."""
        if self.params.logprobs is None:
            return None
        req = self.streams[i].req
        ids, lps = req.output_ids[start:end], req.logprobs[start:end]
        tok, n_vocab = self.st.tokenizer, self.st.engine.n_vocab

        def piece(t: int) -> tuple[str, bytes]:
            b = token_bytes(tok, n_vocab, t)
            return b.decode("utf-8", errors="replace"), b

        if self.kind == "chat":
            content = []
            for t, (lp, top) in zip(ids, lps):
                text, raw = piece(t)
                content.append({"token": text, "logprob": _finite_lp(lp), "bytes": list(raw),
                                "top_logprobs": [{"token": piece(a)[0], "logprob": _finite_lp(b), "bytes": list(piece(a)[1])}
                                                 for a, b in top]})
            return {"content": content}
        texts = [piece(t)[0] for t in ids]
        offsets, at = [], 0
        for text in texts:
            offsets.append(at)
            at += len(text)
        return {"tokens": texts, "token_logprobs": [_finite_lp(lp) for lp, _ in lps],
                "top_logprobs": [{piece(a)[0]: _finite_lp(b) for a, b in top} for _, top in lps],
                "text_offset": offsets}

    def chunk(self, delta: str | None, *, index: int = 0, role: bool = False, finish: str | None = None,
              n_out: int | None = None, logprobs: dict | None = None) -> dict:
        """One SSE chunk of choice ``index``: the opening one (``role``), a text delta, or the closing one (``finish``)."""
        if self.kind == "chat":
            d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
            choice = {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
            if role and self.decision is not None:
                out["dmoe"] = {"route": self.decision.to_dict()}
        else:
            out = {**self._head("text_completion"),
                   "choices": [{"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}]}
        if n_out is not None:
            out["usage"] = usage(len(self.prompt_ids), n_out)
        return out

    def usage_chunk(self, n_out: int) -> dict:
        """``stream_options.include_usage``: a last chunk with no choices and the whole request's usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(len(self.prompt_ids), n_out)}

    def final(self, results: list[tuple[str, str, list[int]]]) -> dict:
        """A non-streamed response: one choice per result, usage, and the adapter set that served it."""
        choices = []
        for i, (text, finish, ids) in enumerate(results):
            lp = None if self.hide_logprobs else self.logprobs(i, 0, len(ids))
            if self.kind == "chat":
                choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                          "finish_reason": finish}
            else:
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
            if self.return_token_ids:
                choice["token_ids"] = ids
            choices.append(choice)
        info: dict[str, Any] = {"experts": [{"name": n, "scale": s} for n, s in self.adapters]}
        if self.decision is not None:
            info["route"] = self.decision.to_dict()
        head = self._head("chat.completion" if self.kind == "chat" else "text_completion")
        if self.score:  # a cluster fan-out ranks replies by their mean token log-probability
            info["mean_logprob"] = [mean_logprob(s.req.logprobs) for s in self.streams]
        n_out = sum(len(ids) for _, _, ids in results)
        return {**head, "choices": choices, "usage": usage(len(self.prompt_ids), n_out), "dmoe": info}

    def log(self, status: int | str, n_out: int) -> None:
        """One line per request; never the prompt's text."""
        log.info("%s model=%s adapters=%s n=%d status=%s prompt_tokens=%d completion_tokens=%d ms=%.0f", self.id, self.model,
                 label(self.adapters), len(self.streams), status, len(self.prompt_ids), n_out,
                 (time.perf_counter() - self.started) * 1e3)

    def cancel_all(self) -> None:
        assert self.st.runner is not None
        for stream in self.streams:
            if not stream.req.done:
                self.st.runner.cancel(stream)


async def submit(st: ServeState, prompt_ids: list[int], adapters: list[tuple[str, float]], params: SamplingParams) -> Stream:
    if len(prompt_ids) >= st.engine.max_seq:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the context is {st.engine.max_seq}")
    assert st.runner is not None, "the app's lifespan starts the runner"
    st.metrics.started.labels(label(adapters)).inc()
    try:
        stream = await st.runner.submit(prompt_ids, adapters, params, label=label(adapters))
    except Exception:
        st.metrics.requests.labels(label(adapters), "rejected").inc()
        raise
    st.metrics.prompt_tokens.labels(stream.label).inc(len(prompt_ids))
    return stream


async def collect(c: Completion, i: int) -> tuple[str, str, list[int]]:
    """Wait for choice ``i`` to finish; (text, finish_reason, completion token ids)."""
    st, stream = c.st, c.streams[i]
    ids: list[int] = []
    finish = None
    try:
        while finish is None:
            new, finish = await stream.queue.get()
            ids += new
    except asyncio.CancelledError:
        assert st.runner is not None
        st.runner.cancel(stream)
        st.metrics.requests.labels(stream.label, "cancelled").inc()
        raise
    st.metrics.requests.labels(stream.label, finish).inc()
    if (err := failure(st, finish)) is not None:
        raise err
    text = st.tokenizer.decode(ids, skip_special_tokens=True)
    text, stopped = cut_at_stop(text, c.params.stop)
    if stopped and not stream.req.done:
        assert st.runner is not None
        st.runner.cancel(stream)
    return text, ("stop" if stopped else finish), ids


async def run_to_end(c: Completion) -> dict:
    """All choices, then one response (or the first choice's error: the others are cancelled)."""
    tasks = [asyncio.ensure_future(collect(c, i)) for i in range(len(c.streams))]
    try:
        results = await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        c.log("cancelled", 0)
        raise
    except Exception as exc:
        for t in tasks:
            t.cancel()
        c.cancel_all()
        c.log(status_of(exc)[0], 0)
        raise
    c.log(200, sum(len(ids) for _, _, ids in results))
    return c.final(results)


async def sse(c: Completion) -> AsyncIterator[str]:
    """Server-sent events, the n choices interleaved as their tokens arrive; a disconnect
    cancels every choice's request and frees its slot."""
    st = c.st
    assert st.runner is not None
    n = len(c.streams)
    ids: list[list[int]] = [[] for _ in range(n)]
    sent = [""] * n
    lp_sent = [0] * n  # tokens whose logprobs went out
    pending: dict[int, asyncio.Future] = {}
    counted: set[int] = set()  # choices whose outcome is in the requests counter
    total = 0

    def count(i: int, outcome: str) -> None:
        if i not in counted:
            counted.add(i)
            st.metrics.requests.labels(c.streams[i].label, outcome).inc()

    try:
        for i in range(n):
            yield f"data: {json.dumps(c.chunk(None, index=i, role=True))}\n\n"
        pending = {i: asyncio.ensure_future(c.streams[i].queue.get()) for i in range(n)}
        while pending:
            done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
            for i in [i for i, f in pending.items() if f in done]:
                new, finish = pending.pop(i).result()
                stream = c.streams[i]
                if (err := failure(st, finish)) is not None:
                    status, code = status_of(err)
                    yield f"data: {json.dumps(error_body(str(err), status, code))}\n\n"
                    yield "data: [DONE]\n\n"
                    count(i, finish)
                    c.log(status, total)
                    for f in pending.values():
                        f.cancel()
                    pending.clear()
                    c.cancel_all()
                    for j in range(n):
                        count(j, "cancelled")
                    return
                ids[i] += new
                text = st.tokenizer.decode(ids[i], skip_special_tokens=True)
                text, stopped = cut_at_stop(text, c.params.stop)
                if stopped:
                    finish = "stop"
                if not (text.endswith("\ufffd") and finish is None) and len(text) > len(sent[i]):  # wait for half a UTF-8 char
                    lp = c.logprobs(i, lp_sent[i], len(ids[i]))
                    lp_sent[i] = len(ids[i])
                    yield f"data: {json.dumps(c.chunk(text[len(sent[i]):], index=i, logprobs=lp))}\n\n"
                    sent[i] = text
                if finish is None:
                    pending[i] = asyncio.ensure_future(stream.queue.get())
                    continue
                if finish == "stop" and not stream.req.done:
                    st.runner.cancel(stream)
                total += len(ids[i])
                lp = c.logprobs(i, lp_sent[i], len(ids[i])) if lp_sent[i] < len(ids[i]) else None
                count(i, finish)
                yield f"data: {json.dumps(c.chunk(None, index=i, finish=finish, n_out=len(ids[i]), logprobs=lp))}\n\n"
        if c.include_usage:
            yield f"data: {json.dumps(c.usage_chunk(total))}\n\n"
        yield "data: [DONE]\n\n"
        c.log(200, total)
    except (asyncio.CancelledError, GeneratorExit):
        for f in pending.values():
            f.cancel()
        c.cancel_all()
        for j in range(n):
            count(j, "cancelled")
        c.log("cancelled", total)
        raise
