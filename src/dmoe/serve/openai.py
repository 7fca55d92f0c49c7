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
import logging
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from dmoe.engine.grammar import gbnf_grammar, json_schema_grammar, response_format_grammar
from dmoe.engine.request import SamplingParams, check_scale
from dmoe.errors import RequestError, UnknownExpertError
from dmoe.io import serially
from dmoe.route import NONE, RouteDecision
from dmoe.runtime import ApiState, Job, Reply
from dmoe.serve.errors import documented_errors
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


def state(request: Request) -> ApiState:
    return request.app.state.dmoe


def label(adapters: list[tuple[str, float]]) -> str:
    return "+".join(f"{n}" if s == 1 else f"{n}*{s:g}" for n, s in adapters) or "base"


def is_auto(body: ChatRequest | CompletionRequest) -> bool:
    """model=auto, and no explicit adapter choice that would take precedence."""
    return body.model == "auto" and not body.experts and body.lora is None


def lora_adapter(st: ApiState, item: LoraScale) -> str:
    """The expert a llama-server ``{"id", "scale"[, "path"]}`` entry names; an unknown id is a
    404, and a ``path`` (GET /lora-adapters output posted back) must be that adapter's."""
    name = st.adapter_ids.get(item.id)
    path = st.names().get(name) if name is not None else None
    if name is None or path is None:
        raise UnknownExpertError(f"unknown lora id {item.id}; ids: {sorted(st.adapter_ids)}")
    if item.path is not None and item.path != path:
        raise RequestError(f"lora id {item.id} is {path}, not {item.path}; leave path out or give the adapter's own")
    return name


def choose_adapters(st: ApiState, body: ChatRequest | CompletionRequest) -> list[tuple[str, float]]:
    """The request's adapter set (see module docstring); an unknown name or id is a 404."""
    loaded = st.names()
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


def check_fields(st: ApiState, body: ChatRequest | CompletionRequest) -> None:
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


def message_text(content: str | list[dict[str, Any]] | None) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in (content or []))


def usage(prompt: int, completion: int) -> dict:
    # prompt_tokens_details as OpenAI and llama-server send it; no prefix cache yet, so 0 cached
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0}}


async def route(st: ApiState, text: str, context: list[str], mode: str | None = None, k: int = 2,
                min_prob: float = 0.2) -> RouteDecision:
    """model=auto: route off the event loop; experts not loaded (any more) are dropped, with a reason."""
    if st.router is None:
        decision = RouteDecision([], [(NONE, 1.0)], 1.0, f"no router: base model ({st.router_note or 'none configured'})")
    else:
        decision = await asyncio.to_thread(serially, st.router.route, text, mode or st.route_mode, context=context, k=k,
                                           min_prob=min_prob)  # one OpenMP thread beside the engine's (io.serial_openmp)
    loaded = st.names()
    gone = [n for n, _ in decision.experts if n not in loaded]
    if gone:
        kept = [(n, s) for n, s in decision.experts if n in loaded]
        decision = replace(decision, experts=kept, reason=f"{decision.reason}; {', '.join(gone)} not loaded")
    st.metrics.routes.labels(decision.label).inc()
    st.metrics.route_latency.observe(decision.latency_ms / 1e3)
    return decision


def _generated(model: type) -> dict:
    """A generation route's responses: JSON, or SSE when ``stream`` is true, and its errors."""
    return {200: {"model": model, "description": "the completion; with stream=true, text/event-stream chunks",
                  "content": {"text/event-stream": {"schema": {  # one SSE event: its data is a JSON chunk, or [DONE]
                      "type": "object", "required": ["data"],
                      "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}},
            **documented_errors(404, 429, 503)}


def check_options(st: ApiState, body: ChatRequest | CompletionRequest) -> None:
    """``dmoe`` options the back-end cannot honour are refused by name, never ignored."""
    opts = body.dmoe
    if opts is None:
        return
    caps = getattr(st.backend, "routings", ("threshold", "top1", "topk"))
    if opts.routing is not None and opts.routing not in caps:
        raise RequestError(f"dmoe.routing={opts.routing!r} needs a cluster of replicas (dmoe cluster up); "
                           f"this server routes with {', '.join(caps)}")
    aggs = getattr(st.backend, "aggregates", ("ensemble",))
    if opts.aggregate is not None and opts.aggregate not in aggs:
        raise RequestError(f"dmoe.aggregate={opts.aggregate!r} needs a cluster of replicas (dmoe cluster up); "
                           f"this server aggregates top-k with {', '.join(aggs)} (a blend of the experts)")
    if opts.timeout_s is not None and not getattr(st.backend, "timeouts", False):
        raise RequestError("dmoe.timeout_s is the per-expert failover timeout of dmoe cluster; this server has no failover")
    topk_only = [f for f in ("k", "aggregate", "min_prob") if getattr(opts, f) is not None]
    if topk_only and (opts.routing or st.route_mode) != "topk":
        raise RequestError(f"dmoe.{', dmoe.'.join(topk_only)} go{'es' if len(topk_only) == 1 else ''} with dmoe.routing='topk'")
    if not is_auto(body) and (opts.routing in ("threshold", "top1", "topk") or topk_only):
        raise RequestError("dmoe.routing threshold/top1/topk, k and aggregate choose experts for model=auto; this request "
                           "names its adapters (load and latency, which choose replicas, apply to any request)")


def route_mode(st: ApiState, body: ChatRequest | CompletionRequest) -> tuple[str, int, float]:
    """The router mode, k and min_prob of a request (its dmoe options, else the server's).
    ``load`` routes top-k (the qualifying experts), ``latency`` as threshold (one expert)."""
    opts = body.dmoe
    mode = (opts.routing if opts and opts.routing else st.route_mode)
    mode = {"load": "topk", "latency": "threshold"}.get(mode, mode)
    k = opts.k if opts and opts.k else 2
    return mode, k, (opts.min_prob if opts and opts.min_prob is not None else 0.2)


async def reply(st: ApiState, job: Job):
    r: Reply = await st.backend.complete(job)
    if r.stream is not None:
        return StreamingResponse(r.stream, media_type="text/event-stream", headers=r.headers)
    return JSONResponse(r.body, headers=r.headers)


@router.post("/v1/chat/completions", responses=_generated(ChatCompletion))
async def chat_completions(body: ChatRequest, request: Request):
    st = state(request)
    check_fields(st, body)
    check_options(st, body)
    if not body.messages:
        raise RequestError("messages is empty; send at least one user message")
    sampling(body)  # every value checked before anything runs
    decision = None
    if is_auto(body):
        users = [message_text(m.content) for m in body.messages if m.role == "user"]
        decision = await route(st, users[-1] if users else "", users[:-1], *route_mode(st, body))
        adapters = decision.experts
    else:
        adapters = choose_adapters(st, body)
    return await reply(st, Job("chat", body, adapters, decision))


@router.post("/v1/completions", responses=_generated(TextCompletion))
async def completions(body: CompletionRequest, request: Request):
    st = state(request)
    check_fields(st, body)
    check_options(st, body)
    prompt = body.prompt if isinstance(body.prompt, str) else (body.prompt[0] if len(body.prompt) == 1 else None)
    if prompt is None:
        raise RequestError("prompt must be one string (batches of prompts: send one request each)")
    if not prompt:
        raise RequestError("prompt is empty")
    sampling(body)
    decision = None
    if is_auto(body):
        decision = await route(st, prompt, [], *route_mode(st, body))
        adapters = decision.experts
    else:
        adapters = choose_adapters(st, body)
    return await reply(st, Job("text", body, adapters, decision))


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request):
    st = state(request)
    names = ["base", *sorted(st.names()), "auto"]
    return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "dmoe"} for n in names]}
