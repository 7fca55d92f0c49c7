"""What the benchmark scripts share: a free loopback port, waiting for a server's /health,
stopping a server process. (``python bench/X.py`` puts bench/ on the import path.)"""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, limit_s: float = 300) -> None:
    """Until ``url/health`` answers 200; a server process that exits first ends the benchmark."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become ready in {limit_s:.0f} s")


def stop(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM (the server drains), then SIGKILL after ``grace_s``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
