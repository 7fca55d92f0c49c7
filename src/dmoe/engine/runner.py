"""Runs the engine's step loop on its own thread and streams tokens to asyncio handlers.

The HTTP handlers never touch the model: they submit a request (adapter set fixed
at that moment) and read its tokens from an asyncio queue. The loop thread steps
the engine while there is work and sleeps on a condition otherwise. Admin actions
(load/unload) take the engine lock, so they happen between two decode steps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dmoe.engine.protocol import Engine
from dmoe.engine.request import Request, SamplingParams
from dmoe.errors import QueueFull, ShuttingDown

log = logging.getLogger("dmoe.engine.runner")


# A request's last message when the engine failed it or the server stopped before it finished.
FAILED, STOPPED = "error", "shutdown"


@dataclass
class Stream:
    """What a handler holds for one request: the engine request and its token queue."""

    req: Request
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    sent: int = 0  # tokens already pushed to the queue
    label: str = "base"  # the adapter set, for metrics
    last_at: float | None = None


class EngineRunner:
    """The engine's step loop on its own thread, bridging to asyncio handlers.

    ``after_step`` (tests) is called on the loop thread after every engine step with the
    number of steps so far: a hook that fires after N steps, rather than a sleep."""

    def __init__(self, engine: Engine, max_queue: int = 64, on_token: Callable[[Stream, int], None] | None = None,
                 after_step: Callable[[int], None] | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.on_token = on_token  # callback(stream, n_new_tokens) for metrics
        self.after_step = after_step
        self.steps = 0
        self._streams: dict[int, Stream] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._draining = False
        self._thread = threading.Thread(target=self._loop, name="dmoe-engine", daemon=True)
        self.error: Exception | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def stopping(self) -> bool:
        """The drain is over: the loop ends, and requests still in flight get ``shutdown``."""
        return self._stop

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._draining

    def stop(self, drain_s: float = 10.0) -> None:
        """Graceful shutdown: refuse new requests, let those in flight finish for up to
        ``drain_s``, then end the rest with a clean ``shutdown`` finish."""
        self._draining = True
        deadline = time.monotonic() + drain_s
        while self._streams and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        for s in list(self._streams.values()):
            self.cancel(s)
            s.req.finish_reason = STOPPED
            s.loop.call_soon_threadsafe(s.queue.put_nowait, ([], STOPPED))

    async def submit(self, prompt_ids: Sequence[int], adapters: list[tuple[str, float]], params: SamplingParams, label: str = "base") -> Stream:
        """Queue a request (raises RequestError / QueueFull). The engine lock is taken
        off the event loop, so a running decode step never blocks other streams."""
        if self._draining or self._stop:
            raise ShuttingDown("the server is shutting down; retry on another replica or after the restart")
        queue, loop = asyncio.Queue(), asyncio.get_running_loop()
        stream = await asyncio.to_thread(self._submit_bounded, prompt_ids, adapters, params, queue, loop, label)
        with self._cond:
            self._cond.notify_all()
        return stream

    def _submit_bounded(self, prompt_ids: Sequence[int], adapters: list[tuple[str, float]], params: SamplingParams,
                        queue: asyncio.Queue, loop: asyncio.AbstractEventLoop, label: str) -> Stream:
        # Check, enqueue and register the stream under the engine lock: a burst cannot overshoot
        # the bound, and no step can advance (or finish) the request before its stream is known
        # (a request finished before that would never tell its handler: it would wait forever).
        with self.engine.lock:
            waiting = self.engine.stats().waiting
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests already waiting (limit {self.max_queue}); retry later")
            req = self.engine.submit(prompt_ids, adapters, params)
            stream = Stream(req, queue, loop, label=label)
            self._streams[req.id] = stream
            return stream

    def cancel(self, stream: Stream) -> None:
        """The client went away: free the request's KV slot."""
        self.engine.cancel(stream.req)
        self._streams.pop(stream.req.id, None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.engine.has_work():
                    self._cond.wait(timeout=0.5)
                if self._stop:
                    return
            try:
                advanced = self.engine.step()
            except Exception as exc:  # keep serving; fail only the requests this engine had in flight
                log.exception("engine step failed; failing the requests in flight")
                self.error = exc
                with self.engine.lock:
                    advanced = [s.req for s in self._streams.values() if not s.req.done]
                    for r in advanced:
                        self.engine.cancel(r)
                        r.finish_reason = FAILED
            self.steps += 1
            if self.after_step is not None:
                self.after_step(self.steps)
            for r in advanced:
                stream = self._streams.get(r.id)
                if stream is None:
                    continue
                new = r.output_ids[stream.sent:]
                stream.sent = len(r.output_ids)
                if stream.first_token_at is None and new:
                    stream.first_token_at = time.perf_counter()
                if self.on_token and new:
                    self.on_token(stream, len(new))
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, (list(new), r.finish_reason))
                if r.done:
                    self._streams.pop(r.id, None)
