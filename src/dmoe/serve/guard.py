"""What every request meets before the app reads it: a ``Host`` check against DNS rebinding,
a body size limit that refuses without reading the body into memory, and a deadline for the
body (a client that drips its body a byte at a time gets 408 and loses the connection).

A pure ASGI middleware (not FastAPI's ``@app.middleware``, which would buffer), so an
oversized body is refused from its ``Content-Length`` at once; any other body (with a
length, or chunked) is read here up to the limit, within ``body_timeout_s``, and handed
to the app whole. The deadline for the request's *headers* is the protocol's
(``serve/http.py``), since no ASGI code runs before they are complete.

DNS rebinding: a web page on evil.example.com can resolve its own name to 127.0.0.1 and
send requests to a local dmoe; the browser then sends ``Host: evil.example.com``. A server
bound to loopback accepts only loopback names (the rule the MCP SDK applies to its HTTP
transport); ``--allowed-hosts`` adds names.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from dmoe.runtime import LOOPBACK_HOSTS

DEFAULT_MAX_BODY = 4 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0
log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def host_name(header: str) -> str:
    """``Host`` without its port: 'localhost:8081' -> 'localhost', '[::1]:80' -> '[::1]'."""
    if header.startswith("["):
        return header[:header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """``allowed_hosts``: None = no Host check (a server bound to a public address; put a proxy
    with its own rules in front); otherwise the names accepted, without ports."""

    def __init__(self, app, *, max_body: int = DEFAULT_MAX_BODY, allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, path_limits: dict[str, int] | None = None):
        self.app = app
        self.max_body = max_body
        self.path_limits = dict(path_limits or {})  # a path with a limit of its own (an upload)
        self.body_timeout_s = body_timeout_s
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed is not None:
            host = host_name(headers.get("host", "")).lower()
            if host not in self.allowed:
                return await _error(send, 421, f"Host {host or '(none)'!r} is not served here: this server accepts "
                                               f"{', '.join(sorted(self.allowed))} (DNS-rebinding protection; "
                                               "dmoe serve --allowed-hosts NAME adds one)", "invalid_host")
        limit = self.path_limits.get(scope.get("path", ""), self.max_body)
        hint = "dmoe webui --max-upload-mb" if scope.get("path", "") in self.path_limits else "dmoe serve --max-body-mb"
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _error(send, 413, f"the request body has {int(length)} bytes; this server takes at most "
                                           f"{limit} ({hint})", "request_too_large")
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            try:
                body = await asyncio.wait_for(self._read_body(receive, limit), self.body_timeout_s)
            except asyncio.TimeoutError:
                log.warning("a client took over %.0f s to send its request body; closed", self.body_timeout_s)
                return await _error(send, 408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                               "(dmoe serve --client-timeout)", "request_timeout")
            if body is None:
                return  # the client went away
            if len(body) > limit:
                return await _error(send, 413, f"the request body passed {limit} bytes; this server takes "
                                               f"at most {limit} ({hint})", "request_too_large")
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            return await self.app(scope, replay, send)
        await self.app(scope, receive, send)


    async def _read_body(self, receive: Receive, limit: int) -> bytes | None:
        """The whole body, or as much as passes ``max_body`` by one chunk (the caller refuses
        it); None when the client disconnects first."""
        chunks, received, more = [], 0, True
        while more and received <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            more = message.get("more_body", False)
        return b"".join(chunks)


async def _error(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
