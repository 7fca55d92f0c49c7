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

from dmoe.config import ConfigError
from dmoe.errors import (
    AdapterError,
    AdapterInUseError,
    DmoeError,
    EngineError,
    ExpertError,
    ExpertNotFoundError,
    ExpertNotLoadedError,
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
    ExpertError: (400, "invalid_request_error"),
    ExpertNotFoundError: (404, "model_not_found"),
    OutsideRootsError: (403, "forbidden"),
    AdapterError: (400, "invalid_request_error"),
    AdapterInUseError: (409, "conflict"),
    ExpertNotLoadedError: (404, "model_not_found"),
    ConfigError: (400, "invalid_request_error"),
    EngineError: (500, "server_error"),
    DmoeError: (400, "invalid_request_error"),
}


def status_of(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error code) for an exception; anything unexpected is a 500."""
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500, "server_error"


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

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s: unexpected error", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}); see the server log", 500, "server_error"),
                            status_code=500)
