"""The request queue: every request from every front-end goes through here, never to the engine directly.

Priority classes (interactive before background), FIFO within a class, a bounded queue that refuses at once when
full, cancellation from any front-end, and one runner thread that feeds the engine one request at a time and
records each request in the store.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from llmos_edge.engine import EngineError, GenerationStats

log = logging.getLogger(__name__)

Priority = Literal["interactive", "background"]
Outcome = Literal["ok", "cancelled", "error", "refused"]
CLASSES: tuple[Priority, ...] = ("interactive", "background")


class Refused(Exception):
    """The request was not accepted; the message says why and what to do."""


class EngineLike(Protocol):
    def generate(
        self,
        prompt: str,
        max_tokens: int,
        on_token: Callable[[str], None],
        cancelled: Callable[[], bool],
        temperature: float = 0.0,
        seed: int = 0,
    ) -> GenerationStats: ...


class Recorder(Protocol):
    def record_request(self, row: dict[str, object]) -> None: ...


@dataclass
class Result:
    outcome: Outcome
    text: str = ""
    error: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)
    queue_wait_s: float = 0.0


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt: str
    source: str = "console"
    priority: Priority = "interactive"
    max_tokens: int = 128
    on_token: Callable[[str], None] = lambda _t: None
    on_done: Callable[[Result], None] = lambda _r: None
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.monotonic)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    result: Result | None = None

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> Result | None:
        self._done.wait(timeout)
        return self.result


class Scheduler:
    def __init__(
        self,
        engine: EngineLike,
        recorder: Recorder,
        *,
        queue_size: int = 16,
        wait_ready: Callable[[float], bool] = lambda _t: True,
        temperature: float = 0.0,
        seed: int = 0,
        memory_mb: Callable[[], float] = lambda: 0.0,
        admit: Callable[[Request], str | None] = lambda _r: None,
    ) -> None:
        self.engine = engine
        self.recorder = recorder
        self.queue_size = queue_size
        self.wait_ready = wait_ready
        self.temperature = temperature
        self.seed = seed
        self.memory_mb = memory_mb
        self.admit = admit  # the governor's admission check: None to go ahead, or the reason to refuse
        self.paused = ""  # why the queue is paused (the governor's actuator); empty when running
        self._queues: dict[Priority, deque[Request]] = {c: deque() for c in CLASSES}
        self._cond = threading.Condition()
        self._stopping = False
        self.current: Request | None = None
        self.last_stats: GenerationStats | None = None
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def pause(self, reason: str) -> None:
        """Hold queued requests (the one running finishes); they wait, subject to the queue's limits."""
        with self._cond:
            self.paused = reason

    def resume(self) -> None:
        with self._cond:
            self.paused = ""
            self._cond.notify_all()

    def depth(self) -> dict[str, int]:
        with self._cond:
            return {c: len(q) for c, q in self._queues.items()}

    @property
    def idle(self) -> bool:
        with self._cond:
            return self.current is None and not any(self._queues.values())

    def submit(self, req: Request) -> Request:
        with self._cond:
            if self._stopping:
                raise Refused("shutting down; try again after the restart")
            if sum(len(q) for q in self._queues.values()) >= self.queue_size:
                self._finish(
                    req,
                    Result(
                        "refused",
                        error=f"busy: the queue is full ({self.queue_size} requests); try again in a moment",
                    ),
                )
                raise Refused(req.result.error if req.result else "busy")
            self._queues[req.priority].append(req)
            self._cond.notify_all()
        return req

    def cancel_all(self) -> None:
        with self._cond:
            for q in self._queues.values():
                for r in q:
                    r.cancel()
            if self.current is not None:
                self.current.cancel()

    def stop(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.cancel_all()
        self._thread.join(timeout)

    def _next(self) -> Request | None:
        with self._cond:
            while not self._stopping:
                for c in CLASSES if not self.paused else ():
                    if self._queues[c]:
                        self.current = self._queues[c].popleft()
                        return self.current
                self._cond.wait(0.5)
            # Shutting down: whatever is still queued gets a clear answer, not silence.
            for q in self._queues.values():
                while q:
                    self._finish(q.popleft(), Result("cancelled", error="shutting down"))
            return None

    def _run(self) -> None:
        while (req := self._next()) is not None:
            try:
                self._serve(req)
            except Exception as e:  # the runner must outlive any one request
                log.exception("request %d failed unexpectedly", req.id)
                self._finish(req, Result("error", error=f"internal error: {e}"))
            finally:
                with self._cond:
                    self.current = None

    def _serve(self, req: Request) -> None:
        started = time.monotonic()
        wait_s = started - req.created
        if req.cancelled:
            self._finish(req, Result("cancelled", error="cancelled before it started", queue_wait_s=wait_s))
            return
        refusal = self.admit(req)
        if refusal:
            self._finish(req, Result("refused", error=refusal, queue_wait_s=wait_s))
            return
        if not self.wait_ready(10.0):
            self._finish(req, Result("error", error="the engine is not available; see /status", queue_wait_s=wait_s))
            return
        rss_start = self.memory_mb()
        try:
            stats = self.engine.generate(
                req.prompt,
                req.max_tokens,
                req.on_token,
                lambda: req.cancelled,
                temperature=self.temperature,
                seed=self.seed,
            )
        except EngineError as e:
            self._finish(req, Result("error", error=str(e), queue_wait_s=wait_s), rss_start)
            return
        self.last_stats = stats
        outcome: Outcome = "cancelled" if stats.stop == "cancelled" else "ok"
        self._finish(req, Result(outcome, text=stats.text, stats=stats, queue_wait_s=wait_s), rss_start)

    def _finish(self, req: Request, result: Result, rss_start: float = 0.0) -> None:
        req.result = result
        s = result.stats
        try:
            self.recorder.record_request(
                {
                    "source": req.source,
                    "priority": req.priority,
                    "prompt": req.prompt,
                    "answer": result.text,
                    "tokens_in": s.tokens_in,
                    "tokens_out": s.tokens_out,
                    "queue_wait_ms": round(result.queue_wait_s * 1000, 2),
                    "ttft_ms": round(s.ttft_s * 1000, 2),
                    "tok_s": round(s.decode_tok_s, 2),
                    "outcome": result.outcome,
                    "error": result.error,
                    "created_at": time.time() - (time.monotonic() - req.created),
                    "finished_at": time.time(),
                    "rss_start_mb": rss_start,
                    "rss_end_mb": self.memory_mb() if rss_start else 0.0,
                }
            )
        except Exception:
            log.exception("could not record request %d", req.id)
        req._done.set()
        try:
            req.on_done(result)
        except Exception:
            log.exception("on_done of request %d failed", req.id)
