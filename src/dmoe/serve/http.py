"""Running the app: uvicorn with a graceful drain, in the foreground or on a thread.

    run_server(st, "127.0.0.1", 8081)              # dmoe serve
    with serve_in_thread(st) as url: ...           # tests, demos, dmoe bench: port 0, a free one
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from dmoe.errors import DmoeError
from dmoe.runtime import ServeState
from dmoe.serve.app import create_app


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
               sock: socket.socket | None = None, log_level: str = "warning") -> None:
    """Serve ``st`` until SIGINT/SIGTERM, then shut down gracefully (see :class:`GracefulServer`)."""
    sock = sock or bind(host, port)
    config = uvicorn.Config(create_app(st), log_level=log_level, timeout_graceful_shutdown=5)
    GracefulServer(config, st, drain_s).run(sockets=[sock])


class ThreadedServer:
    """The app on a background thread, bound before it starts (``port=0``: a free port).

        with ThreadedServer(st) as srv:       # srv.url, srv.port, srv.server
            ...

    ``drain_s`` makes it a :class:`GracefulServer` (``srv.server.handle_exit`` drains);
    ``after_step`` is handed to the engine runner (a hook after every engine step)."""

    def __init__(self, st: ServeState, host: str = "127.0.0.1", port: int = 0, *, drain_s: float | None = None,
                 after_step=None, start_timeout_s: float = 60.0):
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.state = st
        config = uvicorn.Config(create_app(st, after_step=after_step), log_level="warning")
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
