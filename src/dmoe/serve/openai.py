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

from dmoe.engine.request import SamplingParams, check_scale
from dmoe.engine.runner import FAILED, STOPPED, Stream
from dmoe.errors import EngineError, RequestError, ShuttingDown, UnknownExpertError
from dmoe.route import NONE, RouteDecision
from dmoe.runtime import ServeState
from dmoe.serve.errors import error_body, status_of
from dmoe.serve.schemas import ChatRequest, CompletionRequest

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
            name = st.adapter_ids.get(item.id)
            if name is None:
                raise UnknownExpertError(f"unknown lora id {item.id}; ids: {sorted(st.adapter_ids)}")
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


def sampling(body: ChatRequest | CompletionRequest) -> SamplingParams:
    """The request's sampling parameters; SamplingParams checks every value itself."""
    max_tokens = body.max_completion_tokens or body.max_tokens
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
                          temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=stop)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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
    """One request in flight: what it asked, what serves it, and how to shape its chunks."""

    st: ServeState
    kind: str  # "chat" | "text"
    model: str
    params: SamplingParams
    adapters: list[tuple[str, float]]
    decision: RouteDecision | None
    prompt_ids: list[int]
    stream: Stream
    return_token_ids: bool
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

    def chunk(self, delta: str | None, *, role: bool = False, finish: str | None = None, n_out: int | None = None) -> dict:
        """One SSE chunk: the opening one (``role``), a text delta, or the closing one (``finish``)."""
        if self.kind == "chat":
            d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
            out = {**self._head("chat.completion.chunk"), "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}
            if role and self.decision is not None:
                out["dmoe"] = {"route": self.decision.to_dict()}
        else:
            out = {**self._head("text_completion"), "choices": [{"index": 0, "text": delta or "", "finish_reason": finish}]}
        if n_out is not None:
            out["usage"] = usage(len(self.prompt_ids), n_out)
        return out

    def final(self, text: str, finish: str, ids: list[int]) -> JSONResponse:
        """A non-streamed response: one choice, usage, and the adapter set that served it."""
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish}
            head = self._head("text_completion")
        if self.return_token_ids:
            choice["token_ids"] = ids
        info: dict[str, Any] = {"experts": [{"name": n, "scale": s} for n, s in self.adapters]}
        if self.decision is not None:
            info["route"] = self.decision.to_dict()
        return JSONResponse({**head, "choices": [choice], "usage": usage(len(self.prompt_ids), len(ids)), "dmoe": info},
                            headers=self.headers())

    def log(self, status: int | str, n_out: int) -> None:
        """One line per request; never the prompt's text."""
        log.info("%s model=%s adapters=%s status=%s prompt_tokens=%d completion_tokens=%d ms=%.0f", self.id, self.model,
                 label(self.adapters), status, len(self.prompt_ids), n_out, (time.perf_counter() - self.started) * 1e3)


async def submit(st: ServeState, prompt_ids: list[int], adapters: list[tuple[str, float]], params: SamplingParams) -> Stream:
    if len(prompt_ids) >= st.engine.max_seq:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the context is {st.engine.max_seq}")
    assert st.runner is not None, "the app's lifespan starts the runner"
    try:
        stream = await st.runner.submit(prompt_ids, adapters, params, label=label(adapters))
    except Exception:
        st.metrics.requests.labels(label(adapters), "rejected").inc()
        raise
    st.metrics.prompt_tokens.labels(stream.label).inc(len(prompt_ids))
    return stream


async def run_to_end(c: Completion) -> tuple[str, str, list[int]]:
    """Wait for the whole completion; (text, finish_reason, completion token ids)."""
    st, stream = c.st, c.stream
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
        c.log("cancelled", len(ids))
        raise
    st.metrics.requests.labels(stream.label, finish).inc()
    if (err := failure(st, finish)) is not None:
        c.log(status_of(err)[0], len(ids))
        raise err
    text = st.tokenizer.decode(ids, skip_special_tokens=True)
    text, stopped = cut_at_stop(text, c.params.stop)
    c.log(200, len(ids))
    return text, ("stop" if stopped else finish), ids


async def sse(c: Completion) -> AsyncIterator[str]:
    """Server-sent events; a disconnect cancels the request and frees its slot."""
    st, stream = c.st, c.stream
    assert st.runner is not None
    ids: list[int] = []
    sent_text = ""
    finish = None
    try:
        yield f"data: {json.dumps(c.chunk(None, role=True))}\n\n"
        while finish is None:
            new, finish = await stream.queue.get()
            if (err := failure(st, finish)) is not None:
                status, code = status_of(err)
                yield f"data: {json.dumps(error_body(str(err), status, code))}\n\n"
                yield "data: [DONE]\n\n"
                st.metrics.requests.labels(stream.label, finish).inc()
                c.log(status, len(ids))
                return
            ids += new
            text = st.tokenizer.decode(ids, skip_special_tokens=True)
            text, stopped = cut_at_stop(text, c.params.stop)
            if stopped:
                finish = "stop"
            if text.endswith("\ufffd") and finish is None:
                continue  # half a UTF-8 character: wait for the rest
            if len(text) > len(sent_text):
                yield f"data: {json.dumps(c.chunk(text[len(sent_text):]))}\n\n"
                sent_text = text
        if finish == "stop" and not stream.req.done:
            st.runner.cancel(stream)
        yield f"data: {json.dumps(c.chunk(None, finish=finish, n_out=len(ids)))}\n\n"
        yield "data: [DONE]\n\n"
        st.metrics.requests.labels(stream.label, finish).inc()
        c.log(200, len(ids))
    except (asyncio.CancelledError, GeneratorExit):
        st.runner.cancel(stream)
        st.metrics.requests.labels(stream.label, "cancelled").inc()
        c.log("cancelled", len(ids))
        raise


async def respond(st: ServeState, kind: str, body: ChatRequest | CompletionRequest, prompt_ids: list[int],
                  params: SamplingParams, adapters: list[tuple[str, float]], decision: RouteDecision | None):
    stream = await submit(st, prompt_ids, adapters, params)
    c = Completion(st, kind, body.model or label(adapters), params, adapters, decision, prompt_ids, stream, body.return_token_ids)
    if body.stream:
        return StreamingResponse(sse(c), media_type="text/event-stream", headers=c.headers())
    text, finish, ids = await run_to_end(c)
    return c.final(text, finish, ids)


def _message_text(content: str | list[dict[str, Any]] | None) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in (content or []))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    st = state(request)
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
        prompt_ids = st.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if hasattr(prompt_ids, "input_ids") or isinstance(prompt_ids, dict):
            prompt_ids = prompt_ids["input_ids"]
    except Exception as exc:  # jinja raises its own types: a template that rejects the roles, for instance
        raise RequestError(f"messages cannot be rendered by the chat template: {exc}") from None
    return await respond(st, "chat", body, list(prompt_ids), params, adapters, decision)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    st = state(request)
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


@router.get("/v1/models")
async def models(request: Request):
    st = state(request)
    names = ["base", *sorted(st.engine.resident), "auto"]
    return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "dmoe"} for n in names]}
