"""The FastAPI app: the OpenAI routes, the admin routes, and the error table, wired together.

    dmoe serve --experts examples/experts        # 127.0.0.1:8081

One file per concern, as llama.cpp's ``tools/server``: ``openai.py`` (completions and
models), ``admin.py`` (``/lora-adapters``, experts, health, metrics), ``errors.py`` (error
type -> status), ``http.py`` (uvicorn, graceful drain, a server on a thread). The app
runs requests through a back-end (``dmoe.runtime.Backend``): ``local.py`` on this process's
engine, or ``dmoe.cluster``'s gateway on replicas of a Ray Serve cluster: one app, two back-ends.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi

from dmoe import __version__
from dmoe.runtime import ApiState, ServeState
from dmoe.serve import admin, openai
from dmoe.serve.errors import documented_errors, install_error_handlers
from dmoe.serve.guard import Guard
from dmoe.serve.local import LocalBackend

log = logging.getLogger("dmoe.serve.requests")
_COMPLETIONS = ("/v1/chat/completions", "/v1/completions")  # these log their own line, with token counts


def create_app(st: ApiState, after_step=None, mount=None) -> FastAPI:
    """The app over a state whose back-end runs the requests: a :class:`ServeState` (experts
    already loaded) gets a :class:`LocalBackend` on its engine; a cluster gateway brings its own.
    ``after_step`` is handed to the local runner (tests: a hook that fires after N engine steps);
    ``mount(app)`` adds more routes and middleware first (the web UI: ``dmoe.webui.mount``)."""
    if st is not None and st.backend is None:
        assert isinstance(st, ServeState), "a state without an engine brings its own back-end"
        st.backend = LocalBackend(st, after_step=after_step)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await st.backend.start()
        yield
        await st.backend.stop()

    app = FastAPI(title="dmoe", version=__version__, lifespan=lifespan)
    app.state.dmoe = st
    if mount is not None:
        mount(app)  # before the guard: its middleware runs inside the guard's, and it may set body limits

    @app.middleware("http")
    async def _curl_json_and_log(request: Request, call_next):
        # `curl -d '{...}'` labels JSON as a form; every body of this API is JSON, as in llama-server.
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"] + [
                (b"content-type", b"application/json")]
        t0 = time.perf_counter()
        response = await call_next(request)
        if not (request.url.path in _COMPLETIONS and response.status_code == 200):
            log.info("%s %s status=%d ms=%.0f", request.method, request.url.path, response.status_code,
                     (time.perf_counter() - t0) * 1e3)
        return response

    if st is not None:  # (the schema-only app of the docs test has no state)
        app.add_middleware(Guard, max_body=st.max_body_bytes, allowed_hosts=st.allowed_hosts,
                           body_timeout_s=st.client_timeout_s, path_limits=st.body_limits)
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return app


# Schemathesis's stateful tests follow these: load an expert, then use it, then unload it.
_LINKS = {
    "UseTheExpert": {"operationId": "chat_completions_v1_chat_completions_post", "requestBody": {
        "model": "$response.body#/name", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}},
    "UnloadTheExpert": {"operationId": "unload_expert_v1_experts__name__delete",
                        "parameters": {"path.name": "$response.body#/name"}},
}


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema, made true to what the server answers: request-validation failures are
    400 (not FastAPI's 422) in the error shape; every route can meet the guard's statuses; the
    API key is an optional bearer token; and an expert load links to its use and unload."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description="OpenAI- and llama-server-compatible API of dmoe (docs/api.md)")
    guard = documented_errors()
    for ops in schema["paths"].values():
        for op in ops.values():
            responses = op["responses"]
            responses.pop("422", None)
            for status, doc in guard.items():
                responses.setdefault(str(status), {"description": doc["description"], "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)
    schema["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer", "description":
                                               "dmoe serve --api-key: needed by state-changing routes when set"}}
    loaded = schema["paths"]["/v1/experts"]["post"]["responses"]["200"]
    loaded["links"] = _LINKS
    app.openapi_schema = schema
    return schema

