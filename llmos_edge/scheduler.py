"""The request queue: every request from every front-end goes through here, never to the engine directly.

- Priority classes: interactive (console, voice) before background (`llmos submit`), FIFO within a class.
- Aging: a background request that has waited `aging_s` is served next and is no longer preempted, so background
  work is never starved, however busy the console is.
- Deadlines: a request that waited longer than its class's deadline is answered at once with a clear
  "busy, try again in N s" instead of running late.
- Bounded: a full queue refuses at once, with the reason.
- Preemption: an interactive request arriving while a background generation runs pauses it (llama.cpp's state is
  saved in the worker); the interactive one is served, then the background one resumes exactly where it stopped.
- Cancellation from any front-end, queued or running; admission by the governor before a request starts.
- Before a request starts, `prepare` may answer it from a taught pair (learning.py: no engine needed, recorded like
  any answer) or give it the recalled earlier turns of its conversation (memory.py).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from llmos_edge.engine import BadRequest, EngineError, GenerationStats

log = logging.getLogger(__name__)

Priority = Literal["interactive", "background"]
Outcome = Literal["ok", "cancelled", "error", "refused"]
CLASSES: tuple[Priority, ...] = ("interactive", "background")


class Refused(Exception):
    """The request was not accepted; the message says why and what to do."""

    def __init__(self, message: str, retry_after_s: int = 0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # when trying again may work (HTTP's Retry-After); 0: not known


class EngineLike(Protocol):
    def generate(
        self,
        prompt: str,
        max_tokens: int,
        on_token: Callable[[str], None],
        cancelled: Callable[[], bool],
        temperature: float = 0.0,
        seed: int = 0,
        *,
        job: int = 0,
        resume: bool = False,
        preempt: Callable[[], bool] = lambda: False,
        messages: Sequence[Mapping[str, str]] = (),
        raw: bool = False,
    ) -> GenerationStats: ...

    def discard(self, job: int) -> None: ...

    def preempt(self, job: int) -> None: ...


Row = tuple[str, dict[str, Any]]  # a table and a row for it


class Recorder(Protocol):
    def record_request(self, row: dict[str, Any], also: Sequence[Row] = ()) -> None: ...


@dataclass
class Result:
    outcome: Outcome
    text: str = ""
    error: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)
    queue_wait_s: float = 0.0
    retry_after_s: int = 0  # refused for being busy: when trying again may work
    bad_request: bool = False  # an error in the request itself (too long for the context ...), not in the engine


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt: str
    source: str = "console"
    priority: Priority = "interactive"
    max_tokens: int = 128
    on_token: Callable[[str], None] = lambda _t: None
    on_done: Callable[[Result], None] = lambda _r: None
    deadline_s: float | None = None  # longest wait in the queue; None: the scheduler's default for the class
    temperature: float | None = None  # None: the configured model.temperature
    seed: int | None = None  # None: the configured model.seed
    # A chat (HTTP's /v1/chat/completions): the whole conversation for the model's chat template; `prompt` is then
    # its last user message, for the request's row. Empty: `prompt` is one question.
    messages: tuple[dict[str, str], ...] = ()
    raw: bool = False  # HTTP's /v1/completions: the prompt as it is, no chat template
    taught_id: int = 0  # answered from this taught pair (learning.py), not by the engine
    recalled: tuple[int, ...] = ()  # earlier turns of its conversation put before it (memory.py)
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.monotonic)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    result: Result | None = None
    preemptions: int = 0
    paused: bool = False  # preempted: the worker holds its state, to be resumed
    aged: bool = False  # waited past the aging limit: served next and never preempted
    started: float = 0.0  # monotonic time it first reached the engine
    ran_s: float = 0.0  # time spent in the engine, over all its runs

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
        aging_s: float = 30.0,
        deadlines: dict[str, float] | None = None,
        wait_ready: Callable[[float], bool] = lambda _t: True,
        temperature: float = 0.0,
        seed: int = 0,
        memory_mb: Callable[[], float] = lambda: 0.0,
        admit: Callable[[Request], str | None] = lambda _r: None,
        unavailable: Callable[[], str] = lambda: "",
        observe: Callable[[Request, Result], None] = lambda _req, _res: None,
        prepare: Callable[[Request], str | None] = lambda _r: None,
        also_record: Callable[[Request, Result], Sequence[Row]] = lambda _req, _res: (),
    ) -> None:
        self.engine = engine
        self.recorder = recorder
        self.queue_size = queue_size
        self.aging_s = aging_s
        self.deadlines = deadlines or {"interactive": 120.0, "background": 3600.0}
        self.wait_ready = wait_ready
        self.temperature = temperature
        self.seed = seed
        self.memory_mb = memory_mb
        self.admit = admit  # the governor's admission check: None to go ahead, or the reason to refuse
        # While no engine is ready: "" if one is coming (loading, restarting: the request waits, up to its
        # deadline), else why none will come without a person (then the request is answered at once).
        self.unavailable = unavailable
        self.observe = observe  # told of every finished request (the metrics, the conversation memory)
        # Before a request starts: a taught answer to give instead of generating, or None (it may also set the
        # request's messages to the recalled conversation).
        self.prepare = prepare
        # Rows that belong with a finished request's row (its conversation turn), written in the same commit: an
        # answer costs one fsync of the flash, not one per table.
        self.also_record = also_record
        self._queues: dict[Priority, deque[Request]] = {c: deque() for c in CLASSES}
        self._cond = threading.Condition()
        self._stopping = False
        self.current: Request | None = None
        self.last_stats: GenerationStats | None = None
        self.preemptions = 0
        self._service_s = 2.0  # moving average of a request's time in the engine, for "try again in N s"
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        # Deadlines expire while the runner is busy in a long generation: a second thread answers them on time.
        self._reaper = threading.Thread(target=self._reap, name="scheduler-deadlines", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._reaper.start()

    def _reap(self) -> None:
        with self._cond:
            while not self._stopping:
                self._expire(time.monotonic())
                self._cond.wait(0.25)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def depth(self) -> dict[str, int]:
        with self._cond:
            return {c: len(q) for c, q in self._queues.items()}

    @property
    def idle(self) -> bool:
        with self._cond:
            return self.current is None and not any(self._queues.values())

    def find(self, request_id: int) -> Request | None:
        with self._cond:
            for r in [self.current, *self._queues["interactive"], *self._queues["background"]]:
                if r is not None and r.id == request_id:
                    return r
        return None

    def submit(self, req: Request) -> Request:
        with self._cond:
            if self._stopping:
                raise Refused("shutting down; try again after the restart")
            if sum(len(q) for q in self._queues.values()) >= self.queue_size:
                eta = self._eta(self.queue_size)
                msg = f"busy: the queue is full ({self.queue_size} requests); try again in {eta} s"
                self._finish(req, Result("refused", error=msg, retry_after_s=eta))
                raise Refused(msg, eta)
            if req.deadline_s is None:
                req.deadline_s = self.deadlines.get(req.priority)
            self._queues[req.priority].append(req)
            self._cond.notify_all()
            if self.current is not None and self._should_preempt(self.current):
                # At once: the engine would otherwise notice only when it next polls (up to 50 ms), and the
                # interactive request's first token would wait for that.
                self.engine.preempt(self.current.id)
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

    # -- choosing the next request ---------------------------------------------------------------------------
    def _eta(self, ahead: int) -> int:
        return max(1, math.ceil(self._service_s * (ahead + 1)))

    def _expire(self, now: float) -> None:
        """Answer, at once, every queued request that has waited past its deadline (lock held)."""
        for q in self._queues.values():
            for r in [r for r in q if r.deadline_s is not None and now - r.created > r.deadline_s and not r.paused]:
                q.remove(r)
                ahead = sum(len(x) for x in self._queues.values()) + (self.current is not None)
                eta = self._eta(ahead)
                self._finish(
                    r,
                    Result(
                        "refused",
                        error=f"busy: waited {now - r.created:.1f} s for the engine (deadline {r.deadline_s:g} s);"
                        f" try again in {eta} s",
                        queue_wait_s=now - r.created,
                        retry_after_s=eta,
                    ),
                )

    def _pick(self, now: float) -> Request | None:
        """Interactive first; but a background request that has waited `aging_s` goes before anything (lock held)."""
        bg, inter = self._queues["background"], self._queues["interactive"]
        if bg and (bg[0].aged or now - bg[0].created >= self.aging_s):
            bg[0].aged = True
            return bg.popleft()
        if inter:
            return inter.popleft()
        return bg.popleft() if bg else None

    def _next(self) -> Request | None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                self._expire(now)
                req = self._pick(now)
                if req is not None:
                    self.current = req
                    return req
                self._cond.wait(0.25)
            # Shutting down: whatever is still queued gets a clear answer, not silence.
            for q in self._queues.values():
                while q:
                    self._finish(q.popleft(), Result("cancelled", error="shutting down"))
            return None

    def _should_preempt(self, req: Request) -> bool:
        return req.priority == "background" and not req.aged and bool(self._queues["interactive"])

    # -- running it --------------------------------------------------------------------------------------------
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
        now = time.monotonic()
        wait_s = now - req.created - req.ran_s
        if req.cancelled:
            if req.paused:
                self.engine.discard(req.id)
            self._finish(req, Result("cancelled", error="cancelled before it finished", queue_wait_s=wait_s))
            return
        if not req.paused:
            try:
                taught = self.prepare(req)
            except Exception:  # teaching and memory are extras: a failure there must not cost the answer
                log.exception("preparing request %d failed; it goes to the engine as it is", req.id)
                taught = None
            if taught is not None:
                # Straight from the taught pair: no admission (it costs no engine time) and no wait for a model.
                req.on_token(taught)
                stats = GenerationStats(stop="taught", text=taught)
                self._finish(req, Result("ok", text=taught, stats=stats, queue_wait_s=wait_s))
                return
            refusal = self.admit(req)
            if refusal:
                self._finish(req, Result("refused", error=refusal, queue_wait_s=wait_s))
                return
        if not self._wait_engine(req):
            return
        rss_start = self.memory_mb()
        req.started = req.started or now
        try:
            stats = self.engine.generate(
                req.prompt,
                req.max_tokens,
                req.on_token,
                lambda: req.cancelled,
                temperature=self.temperature if req.temperature is None else req.temperature,
                seed=self.seed if req.seed is None else req.seed,
                job=req.id,
                resume=req.paused,
                preempt=lambda: self._should_preempt(req),
                messages=req.messages,
                raw=req.raw,
            )
        except EngineError as e:
            result = Result("error", error=str(e), queue_wait_s=wait_s, bad_request=isinstance(e, BadRequest))
            self._finish(req, result, rss_start)
            return
        finally:
            req.ran_s += time.monotonic() - now
        if stats.stop == "preempted":
            req.paused = True
            req.preemptions += 1
            self.preemptions += 1
            log.info("request %d preempted after %d tokens", req.id, stats.tokens_out)
            with self._cond:
                self._queues["background"].appendleft(req)  # first in line to resume
            return
        self._service_s = 0.8 * self._service_s + 0.2 * req.ran_s
        self.last_stats = stats
        outcome: Outcome = "cancelled" if stats.stop == "cancelled" else "ok"
        self._finish(req, Result(outcome, text=stats.text, stats=stats, queue_wait_s=wait_s), rss_start)

    def _wait_engine(self, req: Request) -> bool:
        """Wait for a loaded engine: while a model loads (at boot, after a crash, on a model switch) a request waits
        up to its deadline; when the engine cannot come without a person, it is answered at once."""
        while not self.wait_ready(0.25):
            now = time.monotonic()
            waited = now - req.created - req.ran_s
            why = self.unavailable()
            if why or req.cancelled or self._stopping:
                error = "cancelled before it started" if req.cancelled or self._stopping else ""
                outcome: Outcome = "cancelled" if error else "error"
                error = error or f"the engine is not available: {why}; see /status"
                self._finish(req, Result(outcome, error=error, queue_wait_s=waited))
                return False
            if req.deadline_s is not None and waited > req.deadline_s:
                msg = f"busy: waited {waited:.1f} s for the model to load (deadline {req.deadline_s:g} s); see /status"
                self._finish(req, Result("refused", error=msg, queue_wait_s=waited, retry_after_s=5))
                return False
        return True

    def _finish(self, req: Request, result: Result, rss_start: float = 0.0) -> None:
        req.result = result
        s = result.stats
        try:
            also = self.also_record(req, result)
        except Exception:
            log.exception("could not make the rows that go with request %d", req.id)
            also = ()
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
                    "preemptions": req.preemptions,
                    "taught_id": req.taught_id or None,
                    "recalled": ",".join(map(str, req.recalled)) or None,
                    "outcome": result.outcome,
                    "error": result.error,
                    "created_at": time.time() - (time.monotonic() - req.created),
                    "finished_at": time.time(),
                    "rss_start_mb": rss_start,
                    "rss_end_mb": self.memory_mb() if rss_start else 0.0,
                },
                also,
            )
        except Exception:
            log.exception("could not record request %d", req.id)
        try:
            self.observe(req, result)
        except Exception:
            log.exception("could not observe request %d", req.id)
        req._done.set()
        try:
            req.on_done(result)
        except Exception:
            log.exception("on_done of request %d failed", req.id)
