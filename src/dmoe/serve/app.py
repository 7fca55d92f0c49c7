"""FastAPI app: OpenAI-compatible completions, llama-server's /lora-adapters, admin, metrics.

    dmoe serve --experts examples/experts        # 127.0.0.1:8081

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
import math
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from pydantic import TypeAdapter, ValidationError

from dmoe import DmoeError
from dmoe.base import BaseIdentity
from dmoe.engine.adapters import AdapterError
from dmoe.engine.engine import Engine, SamplingParams, UnknownExpertError
from dmoe.experts import ExpertError, check_base, find_experts, resolve_expert
from dmoe.serve.metrics import Metrics
from dmoe.route import NONE, RouteDecision
from dmoe.route.decision import MODES
from dmoe.serve.runner import FAILED, STOPPED, EngineRunner, QueueFull, ShuttingDown, Stream
from dmoe.serve.schemas import ChatRequest, CompletionRequest, LoadExpertRequest, LoraScale

DEFAULT_MAX_TOKENS = 256


class HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error"):
        self.status, self.message, self.code = status, message, code


@dataclass
class ServeState:
    engine: Engine
    tokenizer: object
    base: BaseIdentity
    roots: list[Path]
    api_key: str | None = None
    max_queue: int = 64
    adapter_ids: dict[int, str] = field(default_factory=dict)  # llama-server id -> expert name
    defaults: dict[str, float] = field(default_factory=dict)  # POST /lora-adapters
    metrics: Metrics = field(default_factory=Metrics)
    runner: EngineRunner | None = None
    router: object | None = None  # EmbeddingRouter | KeywordRouter | None (auto -> base)
    route_mode: str = "threshold"
    router_note: str = ""

    def next_id(self) -> int:
        return max(self.adapter_ids, default=-1) + 1


# ------------------------------------------------------------------ helpers
def _label(adapters: list[tuple[str, float]]) -> str:
    return "+".join(f"{n}" if s == 1 else f"{n}*{s:g}" for n, s in adapters) or "base"


def _finite(x: float, what: str) -> float:
    if not isinstance(x, (int, float)) or math.isnan(x) or math.isinf(x):
        raise HTTPError(400, f"{what} must be a finite number, got {x!r}")
    return float(x)


def _is_auto(body) -> bool:
    """model=auto, and no explicit adapter choice that would take precedence."""
    return body.model == "auto" and not body.experts and body.lora is None


def choose_adapters(st: ServeState, body) -> list[tuple[str, float]]:
    """The request's adapter set (see module docstring); raises HTTPError for unknowns."""
    loaded = st.engine.slots.resident
    if body.experts:
        out = []
        for e in body.experts:
            if e.name not in loaded:
                raise HTTPError(404, f"unknown expert '{e.name}'; loaded experts: {', '.join(sorted(loaded)) or 'none'}", "model_not_found")
            out.append((e.name, _finite(e.scale, f"scale of expert '{e.name}'")))
        return out
    if body.lora is not None:
        out = []
        for item in body.lora:
            name = st.adapter_ids.get(item.id)
            if name is None:
                raise HTTPError(404, f"unknown lora id {item.id}; ids: {sorted(st.adapter_ids)}", "model_not_found")
            out.append((name, _finite(item.scale, f"scale of lora id {item.id}")))
        return out
    model = body.model
    if model and model not in ("base", "default", st.base.name):
        if model not in loaded:
            names = ["base", *sorted(loaded)]
            raise HTTPError(404, f"unknown model '{model}'; available: {', '.join(names)}", "model_not_found")
        return [(model, 1.0)]
    if model in ("base", st.base.name):
        return []
    return [(n, s) for n, s in st.defaults.items() if s != 0 and n in loaded]


def sampling(body) -> SamplingParams:
    max_tokens = body.max_completion_tokens or body.max_tokens
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise HTTPError(400, f"max_tokens must be at least 1, got {max_tokens}")
    _finite(body.temperature, "temperature")
    _finite(body.top_p, "top_p")
    if body.temperature < 0 or not (0 < body.top_p <= 1) or body.top_k < 0:
        raise HTTPError(400, "temperature must be >= 0, top_p in (0, 1], top_k >= 0")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=body.top_k, seed=body.seed, stop=stop)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def _require_key(st: ServeState, request: Request) -> None:
    if not st.api_key:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    if not secrets.compare_digest(given.encode(), st.api_key.encode()):
        raise HTTPError(401, "admin endpoints need the API key: send 'Authorization: Bearer <key>'", "unauthorized")


# ------------------------------------------------------------------ app
def create_app(st: ServeState) -> FastAPI:
    """The FastAPI app around a ready engine (experts already loaded)."""

    def on_token(stream: Stream, n: int) -> None:
        label = stream.label
        st.metrics.tokens.labels(label).inc(n)
        if stream.sent == n:
            st.metrics.ttft.labels(label).observe(stream.first_token_at - stream.submitted_at)
        else:
            now = time.perf_counter()
            st.metrics.token_latency.labels(label).observe(now - (stream.last_at or now))
        stream.last_at = time.perf_counter()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.runner = EngineRunner(st.engine, max_queue=st.max_queue, on_token=on_token)
        st.runner.start()
        yield
        await asyncio.to_thread(st.runner.stop)

    app = FastAPI(title="dmoe", lifespan=lifespan)
    app.state.dmoe = st

    @app.middleware("http")
    async def _curl_json(request: Request, call_next):
        # `curl -d '{...}'` labels JSON as a form; every body of this API is JSON, as in llama-server.
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"] + [
                (b"content-type", b"application/json")]
        return await call_next(request)

    @app.exception_handler(HTTPError)
    async def _http_error(_, exc: HTTPError):
        return JSONResponse({"error": {"message": exc.message, "type": exc.code, "code": exc.status}}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = "malformed JSON body" if first.get("type") == "json_invalid" else f"{where or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error", "code": 400}}, status_code=400)

    def _to_http(exc: DmoeError) -> HTTPError:
        if isinstance(exc, QueueFull):
            return HTTPError(429, str(exc), "rate_limit_exceeded")
        if isinstance(exc, UnknownExpertError):
            return HTTPError(404, str(exc), "model_not_found")
        if isinstance(exc, ShuttingDown):
            return HTTPError(503, str(exc), "service_unavailable")
        return HTTPError(400, str(exc))

    def _failure(stream: Stream, finish: str) -> HTTPError | None:
        """The error for a request the engine failed or the shutdown ended, else None."""
        if finish == STOPPED:
            return HTTPError(503, "the server shut down before this request finished; retry", "service_unavailable")
        if finish == FAILED:
            return HTTPError(500, f"the engine failed this request: {st.runner.error!r}", "server_error")
        return None

    async def _submit(prompt_ids: list[int], adapters, params) -> Stream:
        if len(prompt_ids) >= st.engine.max_seq:
            raise HTTPError(400, f"the prompt has {len(prompt_ids)} tokens; the context is {st.engine.max_seq}")
        try:
            stream = await st.runner.submit(prompt_ids, adapters, params, label=_label(adapters))
        except DmoeError as exc:
            st.metrics.requests.labels(_label(adapters), "rejected").inc()
            raise _to_http(exc) from None
        st.metrics.prompt_tokens.labels(stream.label).inc(len(prompt_ids))
        return stream

    async def _run(stream: Stream, params: SamplingParams, request: Request) -> tuple[str, str, list[int]]:
        """Wait for the whole completion; returns (text, finish_reason, completion token ids)."""
        ids: list[int] = []
        finish = None
        try:
            while finish is None:
                new, finish = await stream.queue.get()
                ids += new
        except asyncio.CancelledError:
            st.runner.cancel(stream)
            raise
        st.metrics.requests.labels(stream.label, finish).inc()
        if (err := _failure(stream, finish)) is not None:
            raise err
        text = st.tokenizer.decode(ids, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, params.stop)
        return text, ("stop" if stopped else finish), ids

    async def _sse(stream: Stream, params: SamplingParams, request: Request, chunk):
        """Server-sent events; a disconnect cancels the request and frees its slot."""
        ids: list[int] = []
        sent_text = ""
        finish = None
        try:
            yield f"data: {json.dumps(chunk(None, role=True))}\n\n"
            while finish is None:
                new, finish = await stream.queue.get()
                if (err := _failure(stream, finish)) is not None:
                    yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.code, 'code': err.status}})}\n\n"
                    yield "data: [DONE]\n\n"
                    st.metrics.requests.labels(stream.label, finish).inc()
                    return
                ids += new
                text = st.tokenizer.decode(ids, skip_special_tokens=True)
                text, stopped = _cut_at_stop(text, params.stop)
                if stopped:
                    finish = "stop"
                if text.endswith("\ufffd") and finish is None:
                    continue  # half a UTF-8 character: wait for the rest
                if len(text) > len(sent_text):
                    yield f"data: {json.dumps(chunk(text[len(sent_text):]))}\n\n"
                    sent_text = text
            if finish == "stop" and not stream.req.done:
                st.runner.cancel(stream)
            yield f"data: {json.dumps(chunk(None, finish=finish, usage=(len(stream.req.prompt_ids), len(ids))))}\n\n"
            yield "data: [DONE]\n\n"
            st.metrics.requests.labels(stream.label, finish).inc()
        except (asyncio.CancelledError, GeneratorExit):
            st.runner.cancel(stream)
            st.metrics.requests.labels(stream.label, "cancelled").inc()
            raise

    def _usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _route(text: str, context: list[str]) -> RouteDecision:
        """model=auto: route off the event loop; experts not loaded (any more) are dropped, with a reason."""
        if st.router is None:
            decision = RouteDecision([], [(NONE, 1.0)], 1.0, f"no router: base model ({st.router_note or 'none configured'})")
        else:
            decision = await asyncio.to_thread(st.router.route, text, st.route_mode, context=context)
        loaded = st.engine.slots.resident
        gone = [n for n, _ in decision.experts if n not in loaded]
        if gone:
            kept = [(n, s) for n, s in decision.experts if n in loaded]
            decision = replace(decision, experts=kept, reason=f"{decision.reason}; {', '.join(gone)} not loaded")
        st.metrics.routes.labels(decision.label).inc()
        st.metrics.route_latency.observe(decision.latency_ms / 1e3)
        return decision

    def _headers(adapters, decision: RouteDecision | None) -> dict[str, str]:
        h = {"X-DMoE-Experts": _label(adapters)}
        if decision is not None:
            h["X-DMoE-Route"] = decision.header()
        return h

    def _final(head: dict, choice: dict, body, prompt_ids, ids, adapters, headers, decision=None) -> JSONResponse:
        """A non-streamed response: one choice, usage, and the adapter set that served it."""
        if body.return_token_ids:
            choice["token_ids"] = ids
        route = {"experts": [{"name": n, "scale": s} for n, s in adapters]}
        if decision is not None:
            route["route"] = decision.to_dict()
        return JSONResponse({**head, "choices": [choice], "usage": _usage(len(prompt_ids), len(ids)), "dmoe": route},
                            headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if not body.messages:
            raise HTTPError(400, "messages is empty; send at least one user message")
        params = sampling(body)
        msgs = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                 "".join(p.get("text", "") for p in (m.content or []))} for m in body.messages]
        decision = None
        if _is_auto(body):
            users = [m["content"] for m in msgs if m["role"] == "user"]
            decision = await _route(users[-1] if users else "", users[:-1])
            adapters = decision.experts
        else:
            adapters = choose_adapters(st, body)
        try:
            prompt_ids = st.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if hasattr(prompt_ids, "input_ids") or isinstance(prompt_ids, dict):
                prompt_ids = prompt_ids["input_ids"]
        except Exception as exc:  # a template that rejects the roles, for instance
            raise HTTPError(400, f"messages cannot be rendered by the chat template: {exc}") from None
        stream = await _submit(list(prompt_ids), adapters, params)
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body.model or _label(adapters)
        headers = _headers(adapters, decision)
        if body.stream:
            def chunk(delta, role=False, finish=None, usage=None):
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}
                if role and decision is not None:
                    out["dmoe"] = {"route": decision.to_dict()}
                if usage:
                    out["usage"] = _usage(*usage)
                return out
            return StreamingResponse(_sse(stream, params, request, chunk), media_type="text/event-stream", headers=headers)
        text, finish, ids = await _run(stream, params, request)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        head = {"id": cid, "object": "chat.completion", "created": created, "model": model}
        return _final(head, choice, body, prompt_ids, ids, adapters, headers, decision)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt if isinstance(body.prompt, str) else (body.prompt[0] if len(body.prompt) == 1 else None)
        if prompt is None:
            raise HTTPError(400, "prompt must be one string (batches of prompts: send one request each)")
        if not prompt:
            raise HTTPError(400, "prompt is empty")
        params = sampling(body)
        decision = None
        if _is_auto(body):
            decision = await _route(prompt, [])
            adapters = decision.experts
        else:
            adapters = choose_adapters(st, body)
        prompt_ids = st.tokenizer.encode(prompt, add_special_tokens=False)
        stream = await _submit(prompt_ids, adapters, params)
        cid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body.model or _label(adapters)
        headers = _headers(adapters, decision)
        if body.stream:
            def chunk(delta, role=False, finish=None, usage=None):
                out = {"id": cid, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"index": 0, "text": delta or "", "finish_reason": finish}]}
                if usage:
                    out["usage"] = _usage(*usage)
                return out
            return StreamingResponse(_sse(stream, params, request, chunk), media_type="text/event-stream", headers=headers)
        text, finish, ids = await _run(stream, params, request)
        choice = {"index": 0, "text": text, "finish_reason": finish}
        head = {"id": cid, "object": "text_completion", "created": created, "model": model}
        return _final(head, choice, body, prompt_ids, ids, adapters, headers, decision)

    @app.get("/v1/models")
    async def models():
        names = ["base", *sorted(st.engine.slots.resident), "auto"]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "dmoe"} for n in names]}

    @app.get("/lora-adapters")
    async def lora_adapters():
        res = st.engine.slots.resident
        return [{"id": i, "path": res[n].path, "scale": st.defaults.get(n, 0.0)} for i, n in sorted(st.adapter_ids.items()) if n in res]

    @app.post("/lora-adapters")
    async def set_lora_adapters(request: Request):
        # Parsed by hand: the seed's `curl -d '[...]'` sends no JSON content type, and llama-server accepts it.
        _require_key(st, request)
        try:
            items = TypeAdapter(list[LoraScale]).validate_json(await request.body())
        except ValidationError as exc:
            e = exc.errors()[0]
            raise HTTPError(400, f"expected [{{\"id\": 0, \"scale\": 1.0}}, ...]: {e['msg']}") from None
        new = dict(st.defaults)
        for item in items:
            name = st.adapter_ids.get(item.id)
            if name is None:
                raise HTTPError(404, f"unknown lora id {item.id}; ids: {sorted(st.adapter_ids)}", "model_not_found")
            new[name] = _finite(item.scale, f"scale of lora id {item.id}")
        st.defaults = new  # one assignment: requests see the old defaults or the new, never a mix
        return await lora_adapters()

    @app.post("/v1/experts")
    async def load_expert_endpoint(body: LoadExpertRequest, request: Request):
        _require_key(st, request)
        try:
            expert = resolve_expert(body.path, st.roots)
            if body.name and body.name != expert.name:
                raise HTTPError(400, f"the expert at {body.path} is named '{expert.name}', not '{body.name}'")
            check_base(expert, st.base)
            res = await asyncio.to_thread(st.engine.load_expert, expert)
        except (ExpertError, AdapterError) as exc:
            status = 403 if "outside the expert roots" in str(exc) else 409 if "serving requests" in str(exc) else 400
            raise HTTPError(status, str(exc)) from None
        if expert.name not in st.adapter_ids.values():
            st.adapter_ids[st.next_id()] = expert.name
        st.metrics.loaded_experts.set(len(st.engine.slots.resident))
        return {"name": res.name, "slot": res.slot, "rank": res.rank, "path": res.path}

    @app.delete("/v1/experts/{name}")
    async def unload_expert_endpoint(name: str, request: Request):
        _require_key(st, request)
        try:
            await asyncio.to_thread(st.engine.unload_expert, name)
        except AdapterError as exc:
            raise HTTPError(404 if "not loaded" in str(exc) else 409, str(exc)) from None
        st.adapter_ids = {i: n for i, n in st.adapter_ids.items() if n != name}
        st.defaults.pop(name, None)
        st.metrics.loaded_experts.set(len(st.engine.slots.resident))
        return {"unloaded": name}

    @app.get("/health")
    async def health():
        ok = st.runner is not None and st.runner.alive
        status = "ok" if ok else "draining" if st.runner is not None and st.runner.draining else "down"
        return JSONResponse({"status": status, "experts": sorted(st.engine.slots.resident),
                             "running": len(st.engine.running), "waiting": len(st.engine.waiting)}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        eng = st.engine
        m = st.metrics
        m.batch_size.set(len(eng.running))
        m.waiting.set(len(eng.waiting))
        kv = eng.model.k_cache
        per_token = 2 * kv.element_size() * kv.shape[0] * kv.shape[3] * kv.shape[4]
        m.kv_bytes.set(per_token * sum(len(r.prompt_ids) + len(r.output_ids) for r in list(eng.running)))
        m.kv_bytes_total.set(2 * kv.numel() * kv.element_size())
        return PlainTextResponse(generate_latest(m.registry).decode(), media_type="text/plain; version=0.0.4")

    return app


class GracefulServer(uvicorn.Server):
    """uvicorn, but the first stop signal drains the engine before uvicorn closes anything:
    new requests get 503, requests in flight finish for up to ``drain_s`` seconds, and the
    rest end with a clean 503 (an SSE error event when streaming). A second signal exits now."""

    def __init__(self, config: uvicorn.Config, st: ServeState, drain_s: float = 10.0):
        super().__init__(config)
        self.st, self.drain_s = st, drain_s
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._drainer is None and self.st.runner is not None:
            self._drainer = threading.Thread(target=self._drain_then_exit, args=(sig, frame), name="dmoe-drain", daemon=True)
            self._drainer.start()
        else:
            super().handle_exit(sig, frame)

    def _drain_then_exit(self, sig, frame) -> None:
        self.st.runner.stop(self.drain_s)
        super().handle_exit(sig, frame)


def run_server(st: ServeState, host: str = "127.0.0.1", port: int = 8081, drain_s: float = 10.0) -> None:
    """Serve ``st`` until SIGINT/SIGTERM, then shut down gracefully (see :class:`GracefulServer`)."""
    config = uvicorn.Config(create_app(st), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    GracefulServer(config, st, drain_s).run()


@contextmanager
def serve_in_thread(st: ServeState, host: str = "127.0.0.1", port: int = 8081):
    """Run the server on a background thread (demos, notebooks); yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(st), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="dmoe-server", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise DmoeError(f"the server could not start on {host}:{port}")
            time.sleep(0.05)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def build_state(base_spec: str | None, experts_dir: Path, *, roots: list[Path] | None = None, api_key: str | None = None,
                max_batch: int = 8, max_seq: int = 2048, max_loras: int = 8, max_rank: int = 64, max_queue: int = 64,
                dtype: str = "auto", device: str = "auto", keywords: Path | None = None, route_mode: str = "threshold",
                use_router: bool = True, engine_kind: str = "torch") -> ServeState:
    """Load the base once, build the engine, and load every expert found in ``experts_dir``.

    ``engine_kind`` torch (any base) or llamacpp (a GGUF base; PEFT experts are converted
    to GGUF adapters on load). ``device`` auto = CUDA when present, else CPU; ``dtype``
    auto = bf16 on CUDA, fp32 on CPU (torch engine).
    """
    from dmoe.base import load_base, load_tokenizer, resolve_base

    if engine_kind not in ("torch", "llamacpp"):
        raise DmoeError(f"engine must be torch or llamacpp, not {engine_kind!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise DmoeError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    if engine_kind == "llamacpp":
        from dmoe.engine.llamacpp import LlamaCppEngine

        spec = resolve_base(base_spec)
        tok = load_tokenizer(spec)
        engine = LlamaCppEngine(spec, tok, max_batch=max_batch, max_seq=max_seq)
    else:
        model, tok, spec = load_base(base_spec, dtype=None if dtype == "auto" else getattr(torch, dtype), device=device)
        engine = Engine.from_base(model, tok, max_batch=max_batch, max_seq=max_seq, max_loras=max_loras, max_rank=max_rank)
    st = ServeState(engine=engine, tokenizer=tok, base=spec.identity, roots=roots or [experts_dir], api_key=api_key, max_queue=max_queue)
    experts = find_experts(experts_dir) if experts_dir.is_dir() else []
    for expert in experts:
        check_base(expert, spec.identity)
        engine.load_expert(expert)
        st.adapter_ids[st.next_id()] = expert.name
    st.metrics.loaded_experts.set(len(engine.slots.resident))
    if route_mode not in MODES:
        raise DmoeError(f"route mode must be one of {', '.join(MODES)}, not {route_mode!r}")
    st.route_mode = route_mode
    if use_router:
        from dmoe.route.select import startup_router

        st.router, st.router_note = startup_router(experts_dir, experts, keywords)
    return st
