"""Running the app: uvicorn with a graceful drain, in the foreground or on a thread.

    run_server(st, "127.0.0.1", 8081)              # dmoe serve
    with serve_in_thread(st) as url: ...           # tests, demos, dmoe bench: port 0, a free one

Slow clients (slowloris) cannot hold the server: a connection gets ``client_timeout_s`` to
send each request's headers (here, in the protocol: no ASGI code runs before the headers
are complete) and as long again for its body (``guard.py``); an idle keep-alive connection
closes after 5 s (uvicorn's own timer); at most ``max_connections`` are open, and a request
on one more gets uvicorn's 503.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from dmoe.errors import DmoeError
from dmoe.runtime import ApiState, ServeState
from dmoe.serve.app import create_app

log = logging.getLogger(__name__)
# An idle keep-alive connection is closed after this many seconds. It must be longer than the
# clients' own pool expiry: httpx (the OpenAI Python client's transport) drops an idle connection
# after 5 s, and a server that also closes at 5 s races it: the client sends its next request on
# a connection the server is closing, and gets "Server disconnected without sending a response"
# (seen in bench/load_faults.py's admin client, idle 5 s between faults). aiohttp's is 15 s.
# Idle connections stay bounded by --client-timeout (the header deadline) and --max-connections.
KEEP_ALIVE_S = 20


def with_header_deadline(protocol: Any, seconds: float) -> Any:
    """uvicorn's HTTP protocol class (h11 or httptools), closing a connection whose next
    request's headers are not complete ``seconds`` after it opened or after its last response.
    A request in progress is never cut: the deadline only closes a connection between requests."""

    class HeaderDeadline(protocol):  # uvicorn's H11Protocol or HttpToolsProtocol
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _expired(self) -> None:
            self._deadline = None
            cycle = self.cycle
            if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                log.warning("a client took over %.0f s to send its request headers; closed", seconds)
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

    HeaderDeadline.__name__ = f"HeaderDeadline{protocol.__name__}"
    return HeaderDeadline


def uvicorn_config(st: ApiState, log_level: str = "warning", **app_kwargs) -> uvicorn.Config:
    """The one uvicorn configuration of every dmoe server: timeouts and connection limit from ``st``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return uvicorn.Config(create_app(st, **app_kwargs), log_level=log_level, timeout_graceful_shutdown=5,
                          http=with_header_deadline(AutoHTTPProtocol, st.client_timeout_s),
                          timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=st.max_connections)


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
        assert self.st.runner is not None
        self.st.runner.stop(self.drain_s)
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before anything slow happens (a busy port fails at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DmoeError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or stop what uses it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(st: ServeState, host: str = "127.0.0.1", port: int = 8081, drain_s: float = 10.0,
               sock: socket.socket | None = None, log_level: str = "warning", mount=None) -> None:
    """Serve ``st`` until SIGINT/SIGTERM, then shut down gracefully (see :class:`GracefulServer`);
    ``mount``: more routes on the app (the web UI)."""
    sock = sock or bind(host, port)
    GracefulServer(uvicorn_config(st, log_level, mount=mount), st, drain_s).run(sockets=[sock])


class ThreadedServer:
    """The app on a background thread, bound before it starts (``port=0``: a free port).

        with ThreadedServer(st) as srv:       # srv.url, srv.port, srv.server
            ...

    ``drain_s`` makes it a :class:`GracefulServer` (``srv.server.handle_exit`` drains);
    ``after_step`` is handed to the engine runner (a hook after every engine step)."""

    def __init__(self, st: ServeState, host: str = "127.0.0.1", port: int = 0, *, drain_s: float | None = None,
                 after_step=None, start_timeout_s: float = 60.0, mount=None):
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.state = st
        config = uvicorn_config(st, after_step=after_step, mount=mount)
        self.server = GracefulServer(config, st, drain_s) if drain_s is not None else uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="dmoe-server", daemon=True)
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.sock.close()
                raise DmoeError(f"the server could not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@contextmanager
def serve_in_thread(st: ServeState, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the server on a background thread; yields its base URL. ``port=0`` takes a free port."""
    with ThreadedServer(st, host, port) as srv:
        yield srv.url
