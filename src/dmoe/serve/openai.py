"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions (SSE or not), /v1/models.

Choosing the adapter set of a request, first match wins:
  1. ``experts: [{"name": .., "scale": ..}]``  dmoe's blend extension;
  2. ``lora: [{"id": .., "scale": ..}]``       llama-server's per-request field;
  3. ``model: "<expert>"``, ``"base"``, or ``"auto"``: the router picks (the decision comes
     back in the ``dmoe.route`` field and the ``X-DMoE-Route`` header);
  4. otherwise the global defaults set by ``POST /lora-adapters`` (all 0 at start).
The set is fixed when the request is queued: later global changes or loads do not
affect it. An unknown expert is a 404, never a silent fall-back to the base.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from dmoe.engine.grammar import gbnf_grammar, json_schema_grammar, response_format_grammar, token_bytes
from dmoe.engine.request import SamplingParams, check_scale
from dmoe.engine.runner import FAILED, STOPPED, Stream
from dmoe.errors import EngineError, RequestError, ShuttingDown, UnknownExpertError
from dmoe.route import NONE, RouteDecision
from dmoe.runtime import ServeState
from dmoe.serve.errors import documented_errors, error_body, status_of
from dmoe.serve.schemas import (
    MAX_MESSAGES,
    ChatCompletion,
    ChatRequest,
    CompletionRequest,
    LoraScale,
    ModelList,
    TextCompletion,
)

DEFAULT_MAX_TOKENS = 256

router = APIRouter()
log = logging.getLogger("dmoe.serve.requests")


def state(request: Request) -> ServeState:
    return request.app.state.dmoe


def label(adapters: list[tuple[str, float]]) -> str:
    return "+".join(f"{n}" if s == 1 else f"{n}*{s:g}" for n, s in adapters) or "base"


def is_auto(body: ChatRequest | CompletionRequest) -> bool:
    """model=auto, and no explicit adapter choice that would take precedence."""
    return body.model == "auto" and not body.experts and body.lora is None


def lora_adapter(st: ServeState, item: LoraScale) -> str:
    """The expert a llama-server ``{"id", "scale"[, "path"]}`` entry names; an unknown id is a
    404, and a ``path`` (GET /lora-adapters output posted back) must be that adapter's."""
    name = st.adapter_ids.get(item.id)
    res = st.engine.resident.get(name) if name is not None else None
    if name is None or res is None:
        raise UnknownExpertError(f"unknown lora id {item.id}; ids: {sorted(st.adapter_ids)}")
    if item.path is not None and item.path != res.path:
        raise RequestError(f"lora id {item.id} is {res.path}, not {item.path}; leave path out or give the adapter's own")
    return name


def choose_adapters(st: ServeState, body: ChatRequest | CompletionRequest) -> list[tuple[str, float]]:
    """The request's adapter set (see module docstring); an unknown name or id is a 404."""
    loaded = st.engine.resident
    if body.experts:
        out = []
        for e in body.experts:
            if e.name not in loaded:
                raise UnknownExpertError(f"unknown expert '{e.name}'; loaded experts: {', '.join(sorted(loaded)) or 'none'}")
            out.append((e.name, check_scale(e.name, e.scale)))
        return out
    if body.lora is not None:
        out = []
        for item in body.lora:
            name = lora_adapter(st, item)
            out.append((name, check_scale(name, item.scale)))
        return out
    model = body.model
    if model and model not in ("base", "default", st.base.name):
        if model not in loaded:
            raise UnknownExpertError(f"unknown model '{model}'; available: {', '.join(['base', *sorted(loaded), 'auto'])}")
        return [(model, 1.0)]
    if model in ("base", st.base.name):
        return []
    return [(n, s) for n, s in st.defaults.items() if s != 0 and n in loaded]


def check_fields(st: ServeState, body: ChatRequest | CompletionRequest) -> None:
    """Every field is honoured or refused, never silently ignored (``--lenient``: unknown
    fields are ignored; fields dmoe knows but cannot honour are still refused)."""
    problems = body.unsupported()
    if isinstance(body, ChatRequest):
        problems += message_problems(body, st.lenient)
    unknown = sorted(body.model_extra or {})
    if unknown and not st.lenient:
        problems.append(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: dmoe does not ignore fields it "
                        "does not support (start the server with --lenient to ignore unknown fields)")
    if problems:
        raise RequestError("; ".join(problems))


def message_problems(body: ChatRequest, lenient: bool) -> list[str]:
    """Message fields and content parts dmoe would otherwise drop: refused by name (``--lenient``
    ignores unknown message fields; a non-text part is refused even then, as its content would be lost)."""
    out = []
    if len(body.messages) > MAX_MESSAGES:
        return [f"messages: at most {MAX_MESSAGES} messages, got {len(body.messages)}"]
    for i, m in enumerate(body.messages):
        if m.model_extra and not lenient:
            out.append(f"messages[{i}]: unknown field{'s' if len(m.model_extra) > 1 else ''} {', '.join(sorted(m.model_extra))} "
                       "(only role and content are used)")
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.get("type", "text") != "text" or not isinstance(part.get("text", ""), str):
                out.append(f"messages[{i}].content[{j}]: part type {part.get('type')!r} is not supported; send text parts only")
    return out


def top_logprobs(body: ChatRequest | CompletionRequest) -> int | None:
    """How many top tokens to return per position (None: no logprobs). Chat: ``logprobs: true``
    and ``top_logprobs: k``; completions: ``logprobs: k`` (OpenAI's two shapes)."""
    if isinstance(body, ChatRequest):
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise RequestError("logprobs: in chat completions it is true or false; give the count as top_logprobs")
        if body.top_logprobs and not body.logprobs:
            raise RequestError("top_logprobs needs logprobs: true")
        return (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs is not None:
        raise RequestError("top_logprobs is a chat field; completions take the count as logprobs: k")
    if isinstance(body.logprobs, bool):
        raise RequestError("logprobs: in completions it is the number of top tokens per position (0-20), not true/false")
    return body.logprobs


def output_grammar(body: ChatRequest | CompletionRequest) -> str | None:
    """The grammar the output must match: OpenAI's response_format, or llama-server's json_schema or grammar."""
    if body.json_schema is not None:
        return json_schema_grammar(body.json_schema)
    if body.grammar is not None:
        return gbnf_grammar(body.grammar)
    return response_format_grammar(body.response_format)


def sampling(body: ChatRequest | CompletionRequest) -> list[SamplingParams]:
    """The sampling parameters of each of the ``n`` choices (SamplingParams checks every value).
    A seeded request gives choice i the seed ``seed + i``: reproducible, and not n copies."""
    max_tokens = body.max_completion_tokens or body.max_tokens
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    bias = tuple((int(k), v) for k, v in (body.logit_bias or {}).items())
    first = SamplingParams(max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens, temperature=body.temperature,
                           top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=stop, ignore_eos=body.ignore_eos,
                           presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                           repetition_penalty=body.repetition_penalty, logit_bias=bias, logprobs=top_logprobs(body),
                           grammar=output_grammar(body))
    return [first, *(replace(first, seed=None if body.seed is None else body.seed + i) for i in range(1, body.n))]


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def _finite_lp(x: float) -> float:
    return max(x, -9999.0)  # JSON has no -inf; OpenAI reports -9999 for impossible tokens


def usage(prompt: int, completion: int) -> dict:
    # prompt_tokens_details as OpenAI and llama-server send it; no prefix cache yet, so 0 cached
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0}}


async def route(st: ServeState, text: str, context: list[str]) -> RouteDecision:
    """model=auto: route off the event loop; experts not loaded (any more) are dropped, with a reason."""
    if st.router is None:
        decision = RouteDecision([], [(NONE, 1.0)], 1.0, f"no router: base model ({st.router_note or 'none configured'})")
    else:
        decision = await asyncio.to_thread(st.router.route, text, st.route_mode, context=context)
    loaded = st.engine.resident
    gone = [n for n, _ in decision.experts if n not in loaded]
    if gone:
        kept = [(n, s) for n, s in decision.experts if n in loaded]
        decision = replace(decision, experts=kept, reason=f"{decision.reason}; {', '.join(gone)} not loaded")
    st.metrics.routes.labels(decision.label).inc()
    st.metrics.route_latency.observe(decision.latency_ms / 1e3)
    return decision


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

    def final(self, results: list[tuple[str, str, list[int]]]) -> JSONResponse:
        """A non-streamed response: one choice per result, usage, and the adapter set that served it."""
        choices = []
        for i, (text, finish, ids) in enumerate(results):
            lp = self.logprobs(i, 0, len(ids))
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
        n_out = sum(len(ids) for _, _, ids in results)
        return JSONResponse({**head, "choices": choices, "usage": usage(len(self.prompt_ids), n_out), "dmoe": info},
                            headers=self.headers())

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


async def run_to_end(c: Completion) -> JSONResponse:
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


async def respond(st: ServeState, kind: str, body: ChatRequest | CompletionRequest, prompt_ids: list[int],
                  params: list[SamplingParams], adapters: list[tuple[str, float]], decision: RouteDecision | None):
    streams: list[Stream] = []
    try:
        for p in params:
            streams.append(await submit(st, prompt_ids, adapters, p))
    except Exception:
        assert st.runner is not None
        for stream in streams:  # a later choice was refused (the queue is full): drop the earlier ones
            st.runner.cancel(stream)
            st.metrics.requests.labels(stream.label, "cancelled").inc()
        raise
    c = Completion(st, kind, body.model or label(adapters), params[0], adapters, decision, prompt_ids, streams,
                   body.return_token_ids, include_usage=bool(body.stream_options and body.stream_options.include_usage))
    if body.stream:
        return StreamingResponse(sse(c), media_type="text/event-stream", headers=c.headers())
    return await run_to_end(c)


def _message_text(content: str | list[dict[str, Any]] | None) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in (content or []))


def _generated(model: type) -> dict:
    """A generation route's responses: JSON, or SSE when ``stream`` is true, and its errors."""
    return {200: {"model": model, "description": "the completion; with stream=true, text/event-stream chunks",
                  "content": {"text/event-stream": {"schema": {  # one SSE event: its data is a JSON chunk, or [DONE]
                      "type": "object", "required": ["data"],
                      "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}},
            **documented_errors(404, 429, 503)}


@router.post("/v1/chat/completions", responses=_generated(ChatCompletion))
async def chat_completions(body: ChatRequest, request: Request):
    st = state(request)
    check_fields(st, body)
    if not body.messages:
        raise RequestError("messages is empty; send at least one user message")
    params = sampling(body)
    msgs = [{"role": m.role, "content": _message_text(m.content)} for m in body.messages]
    decision = None
    if is_auto(body):
        users = [m["content"] for m in msgs if m["role"] == "user"]
        decision = await route(st, users[-1] if users else "", users[:-1])
        adapters = decision.experts
    else:
        adapters = choose_adapters(st, body)
    try:
        prompt_ids = st.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                      **(body.chat_template_kwargs or {}))
        if hasattr(prompt_ids, "input_ids") or isinstance(prompt_ids, dict):
            prompt_ids = prompt_ids["input_ids"]
    except Exception as exc:  # jinja raises its own types: a template that rejects the roles, for instance
        raise RequestError(f"messages cannot be rendered by the chat template: {exc}") from None
    return await respond(st, "chat", body, list(prompt_ids), params, adapters, decision)


@router.post("/v1/completions", responses=_generated(TextCompletion))
async def completions(body: CompletionRequest, request: Request):
    st = state(request)
    check_fields(st, body)
    prompt = body.prompt if isinstance(body.prompt, str) else (body.prompt[0] if len(body.prompt) == 1 else None)
    if prompt is None:
        raise RequestError("prompt must be one string (batches of prompts: send one request each)")
    if not prompt:
        raise RequestError("prompt is empty")
    params = sampling(body)
    decision = None
    if is_auto(body):
        decision = await route(st, prompt, [])
        adapters = decision.experts
    else:
        adapters = choose_adapters(st, body)
    prompt_ids = st.tokenizer.encode(prompt, add_special_tokens=False)
    return await respond(st, "text", body, prompt_ids, params, adapters, decision)


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request):
    st = state(request)
    names = ["base", *sorted(st.engine.resident), "auto"]
    return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "dmoe"} for n in names]}
