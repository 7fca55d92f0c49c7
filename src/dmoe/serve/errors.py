"""Errors at the HTTP edge: one table from error *type* to (status, OpenAI error code).

Handlers and engines raise dmoe's typed errors (``dmoe.errors``); nothing here reads the
text of a message to pick a status. The body is OpenAI's error shape:
``{"error": {"message": ..., "type": ..., "code": <status>}}``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dmoe.config import ConfigError
from dmoe.errors import (
    AdapterError,
    AdapterInUseError,
    ClusterError,
    ConflictError,
    CrossSiteError,
    DmoeError,
    EngineError,
    ExpertError,
    ExpertNotFoundError,
    ExpertNotLoadedError,
    NotFoundError,
    OutsideRootsError,
    QueueFull,
    RequestError,
    ShuttingDown,
    Unauthorized,
    UnknownExpertError,
)

log = logging.getLogger("dmoe.serve")

# The most specific class wins (looked up along the exception's MRO).
ERROR_STATUS: dict[type[Exception], tuple[int, str]] = {
    RequestError: (400, "invalid_request_error"),
    UnknownExpertError: (404, "model_not_found"),
    QueueFull: (429, "rate_limit_exceeded"),
    ShuttingDown: (503, "service_unavailable"),
    Unauthorized: (401, "unauthorized"),
    CrossSiteError: (403, "forbidden"),
    NotFoundError: (404, "not_found"),
    ConflictError: (409, "conflict"),
    ExpertError: (400, "invalid_request_error"),
    ExpertNotFoundError: (404, "model_not_found"),
    OutsideRootsError: (403, "forbidden"),
    AdapterError: (400, "invalid_request_error"),
    AdapterInUseError: (409, "conflict"),
    ExpertNotLoadedError: (404, "model_not_found"),
    ConfigError: (400, "invalid_request_error"),
    EngineError: (500, "server_error"),
    ClusterError: (503, "service_unavailable"),
    DmoeError: (400, "invalid_request_error"),
}


def status_of(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error code) for an exception; anything unexpected is a 500."""
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500, "server_error"


STATUS_MEANING = {
    400: "a bad request: the message names the field and what would be right",
    401: "this endpoint changes the server's state and needs the API key",
    403: "the path lies outside the configured roots, or a browser sent the request from another site's page",
    404: "unknown model, expert or lora id (never a silent fall-back to another)",
    408: "the request body did not arrive within --client-timeout",
    409: "the expert is in use by requests in flight (web UI: a training run already holds that expert)",
    413: "the request body is larger than --max-body-mb (refused unread)",
    421: "the Host header is not served here (DNS-rebinding protection)",
    429: "the queue is full: retry later",
    503: "the server is draining (shutting down), or no replica of a cluster could serve the request",
}
GUARD_STATUSES = (400, 408, 413, 421)  # any route: bad JSON or fields, slow body, large body, foreign Host


def documented_errors(*statuses: int) -> dict[int | str, dict]:
    """The OpenAPI ``responses`` of a route's error statuses (the guard's always included)."""
    from dmoe.serve.schemas import ErrorResponse

    return {s: {"model": ErrorResponse, "description": STATUS_MEANING[s]} for s in sorted({*GUARD_STATUSES, *statuses})}


def error_body(message: str, status: int, code: str) -> dict:
    return {"error": {"message": message, "type": code, "code": status}}


def error_response(exc: BaseException) -> JSONResponse:
    status, code = status_of(exc)
    return JSONResponse(error_body(str(exc), status, code), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Typed errors -> their status; request-validation failures -> 400 naming the field."""

    @app.exception_handler(DmoeError)
    async def _dmoe_error(request: Request, exc: DmoeError) -> JSONResponse:
        status, _ = status_of(exc)
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = "malformed JSON body" if first.get("type") == "json_invalid" else f"{where or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(error_body(msg, 400, "invalid_request_error"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # the framework's own refusals (a body that is not JSON text, an unknown route, a wrong
        # method) in the same error shape as every other error
        message = {404: f"no route {request.method} {request.url.path}; see /docs for the API",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        if exc.status_code == 400 and str(exc.detail) == "There was an error parsing the body":
            message = "the request body is not valid JSON text (send UTF-8 JSON)"
        code = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(message, exc.status_code, code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s: unexpected error", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}); see the server log", 500, "server_error"),
                            status_code=500)
