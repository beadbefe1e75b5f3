"""The supervisor's handle on the engine: one loaded model in a worker process (engine_worker.py), started, asked to
generate with streaming, cancelled, preempted and resumed, limited by the governor's actuators, and stopped.

The worker is a separate process so that a crash or hang in native code (llama.cpp) never takes the supervisor
with it; the two speak engine_protocol's typed messages over a socketpair. Callers import the engine's types from
here (EngineSettings, EngineInfo, GenerationStats are defined in engine_protocol, which the worker shares).

This module imports no front-end and no governor (ARCHITECTURE.md): the supervisor wires it to the rest.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from llmos_edge.engine_protocol import (
    Cancel,
    CpuVariant,
    Done,
    Drop,
    EngineInfo,
    EngineSettings,
    Failed,
    Generate,
    GenerationStats,
    Init,
    Limits,
    Loaded,
    LoadFailed,
    Preempt,
    Preempted,
    Progress,
    ProtocolError,
    Resume,
    Shutdown,
    Tokens,
    ToWorker,
    default_threads,
    receive_from_worker,
)

__all__ = [
    "Engine",
    "EngineError",
    "EngineInfo",
    "EngineSettings",
    "GenerationStats",
    "default_threads",
    "worker_environment",
]

log = logging.getLogger(__name__)

WORKER_MODULE = "llmos_edge.engine_worker"


class EngineError(Exception):
    """A request could not be completed by the engine (crash, hang, unavailable model).

    `transient`: the cause may be gone on the next try (a load that timed out, a worker the OOM killer took while
    loading); otherwise the model file itself is the cause (llama.cpp refused it or crashed on it)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class BadRequest(EngineError):
    """The request itself cannot run (longer than the context, refused by the chat template); the engine is fine."""


class IllegalInstruction(Exception):
    """The worker died with SIGILL in the CPU variant `variant`."""

    def __init__(self, variant: str) -> None:
        super().__init__(variant)
        self.variant = variant


# llama.cpp's CPU backend runs its threads under OpenMP, and libgomp's idle threads spin for 300,000 iterations
# before they sleep. While the governor paces generation (rests between tokens) that spinning turned the rest into
# CPU work: two threads at duty 0.5 still used 1.5 cores here, so pacing cooled the board far less than it should.
# 20,000 iterations leave decode speed unchanged (measured: 688 vs 671-686 tok/s) and make a rest a rest (0.98 cores).
GOMP_SPINCOUNT = "20000"


def worker_environment() -> dict[str, str]:
    """The worker's environment: ours, plus an OpenMP spin limit unless the user has set one."""
    env = dict(os.environ)
    if "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
        env["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    return env


# A worker started before the supervisor has imported the rest of itself (prestart_worker); the first start uses it.
_spare: tuple[subprocess.Popen[bytes], multiprocessing.connection.Connection] | None = None
_spare_lock = threading.Lock()


def _spawn_worker() -> tuple[subprocess.Popen[bytes], multiprocessing.connection.Connection]:
    parent_sock, child_sock = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", WORKER_MODULE, str(child_sock.fileno())],
        pass_fds=[child_sock.fileno()],
        stdin=subprocess.DEVNULL,
        env=worker_environment(),
    )
    child_sock.close()
    return proc, multiprocessing.connection.Connection(parent_sock.detach())


def prestart_worker() -> None:
    """Start the engine's worker process now, before the model to load is known. It imports llama.cpp's bindings
    (numpy with them) while it waits for its Init: seconds on a slow board. `llmos run` calls this before importing
    the supervisor, so the two processes get ready side by side instead of one after the other (docs/image.md,
    boot time). The first Engine.start() sends this
    worker its Init; a worker never used is closed by discard_prestarted() (or dies with its parent)."""
    global _spare
    with _spare_lock:
        if _spare is None:
            _spare = _spawn_worker()


def _take_prestarted() -> tuple[subprocess.Popen[bytes], multiprocessing.connection.Connection] | None:
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    return spare


def discard_prestarted() -> None:
    """Close a prestarted worker that no Engine took (its Init never comes: it sees EOF and exits)."""
    spare = _take_prestarted()
    if spare is not None:
        spare[1].close()
        _wait(spare[0], 2)
        if spare[0].poll() is None:
            spare[0].kill()
            _wait(spare[0], 2)


class Engine:
    """The supervisor's handle on the worker process: start, generate (blocking, streaming), cancel, stop.

    One request at a time (the scheduler serialises them). `last_progress` is the monotonic time of the last sign
    of life (model loaded, token produced), read by the supervisor's watchdog.
    """

    def __init__(self, settings: EngineSettings, load_timeout: float = 120.0, progress_timeout: float = 30.0) -> None:
        # A long prompt's prefill reports progress several times per progress_timeout, so it is never taken for a hang.
        self.settings = replace(settings, report_every=min(5.0, progress_timeout / 6))
        self.load_timeout = load_timeout
        self.progress_timeout = progress_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._lock = threading.Lock()  # held for a whole request, or a start
        self._rid = 0
        self._current = 0
        self.info = EngineInfo()
        self.last_progress = time.monotonic()
        self.busy = False
        self.tokens_total = 0  # tokens generated since this Engine was made, across worker restarts
        self.bad_cpu: list[str] = list(settings.exclude_cpu)
        self._send_lock = threading.Lock()  # the scheduler thread and the governor both send
        self._preempt_sent = 0  # the job a Preempt was sent for by preempt(), so generate() does not send another
        self.duty = 1.0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_description(self) -> str:
        code = self._proc.poll() if self._proc is not None else None
        if code is None:
            return "running" if self.alive() else "not started"
        if code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def start(self) -> EngineInfo:
        """Spawn the worker and wait until the model is loaded. Raises EngineError with llama.cpp's reason.

        A CPU variant that dies with SIGILL (loading, or earlier while serving) is excluded and the next best one
        is tried: the machine keeps working at the best speed it really has."""
        if self._proc is not None and self._proc.poll() == -signal.SIGILL and self.info.cpu_backend:
            self._exclude(self.info.cpu_backend)
        while True:
            try:
                return self._start_once()
            except IllegalInstruction as e:
                self._exclude(e.variant)

    def _exclude(self, variant: str) -> None:
        if variant in self.bad_cpu:
            return
        self.bad_cpu.append(variant)
        log.error("CPU variant %s died with SIGILL (illegal instruction); excluding it", variant)
        self.settings = replace(self.settings, exclude_cpu=tuple(self.bad_cpu))

    def _start_once(self) -> EngineInfo:
        with self._lock:
            self._kill_locked()
            proc, parent = _take_prestarted() or _spawn_worker()
            try:
                parent.send(Init(self.settings))
            except OSError:
                # A prestarted worker that died waiting (killed, or crashed importing llama.cpp) is a death at start
                # like any other: reported and retried below, never replaced in silence.
                pass
            self._proc, self._conn = proc, parent
            deadline = time.monotonic() + self.load_timeout
            cpu = ""
            while time.monotonic() < deadline:
                if parent.poll(0.1):
                    try:
                        msg = receive_from_worker(parent)
                    except (EOFError, OSError):  # a worker dying with our messages unread resets the socket
                        break
                    match msg:
                        case CpuVariant(name):
                            cpu = name
                        case Loaded(info):
                            self.info = info
                            self.last_progress = time.monotonic()
                            return self.info
                        case LoadFailed(message):
                            _wait(proc, 5)
                            raise EngineError(f"the model did not load: {message}")
                elif proc.poll() is not None:
                    break
            else:
                self._kill_locked()
                raise EngineError(f"the model did not load within {self.load_timeout:.0f} s", transient=True)
            _wait(proc, 1)
            if proc.returncode == -signal.SIGILL and cpu not in ("", "builtin", *self.bad_cpu):
                raise IllegalInstruction(cpu)
            # SIGKILL while loading is the OOM killer (or a person): memory may be there on the next try. A crash of
            # llama.cpp's own (an assertion, a segfault) comes from the file and would come again.
            raise EngineError(
                f"the engine died while loading the model ({self.exit_description()})",
                transient=proc.returncode == -signal.SIGKILL,
            )

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
    ) -> GenerationStats:
        """Run one request, calling on_token for each piece of text. Cancellation and preemption are polled
        between tokens. A preempted job returns stats with stop="preempted"; call again with the same `job` and
        `resume=True` to continue it exactly where it stopped.

        Raises EngineError if the worker dies, or produces nothing for `progress_timeout` seconds (then it is
        killed, so the supervisor restarts it)."""
        with self._lock:
            if not self.alive() or self._conn is None:
                raise EngineError("the engine is not running")
            conn = self._conn
            if not job:
                self._rid -= 1  # ids of our own below zero never meet a caller's job id
                job = self._rid
            rid = job
            sent_cancel = sent_preempt = False
            self.busy = True
            self.last_progress = time.monotonic()
            try:
                with self._send_lock:
                    conn.send(
                        Resume(rid, temperature)
                        if resume
                        else Generate(
                            rid,
                            prompt,
                            max_tokens,
                            temperature,
                            seed,
                            tuple((m["role"], m["content"]) for m in messages),
                            raw,
                        )
                    )
                    # Only now may preempt() send: a Preempt that reached the worker before its job would be stale.
                    self._current, self._preempt_sent = rid, 0
                while True:
                    if not sent_cancel and cancelled():
                        self._send(conn, Cancel(rid))
                        sent_cancel = True
                    sent_preempt = sent_preempt or self._preempt_sent == rid
                    if not sent_preempt and not sent_cancel and preempt():
                        self._send(conn, Preempt(rid))
                        sent_preempt = True
                    if not conn.poll(0.05):
                        if not self.alive():
                            raise EngineError(f"the engine crashed ({self.exit_description()})")
                        if time.monotonic() - self.last_progress > self.progress_timeout:
                            self._kill_locked()
                            raise EngineError(
                                f"the engine made no progress for {self.progress_timeout:.0f} s and was restarted"
                            )
                        continue
                    msg = receive_from_worker(conn)
                    if not isinstance(msg, Progress | Tokens | Done | Preempted | Failed) or msg.rid != rid:
                        continue  # a late message of an earlier, abandoned request
                    self.last_progress = time.monotonic()
                    match msg:
                        case Tokens(_, text, n_tokens):
                            self.tokens_total += n_tokens
                            on_token(text)
                        case Done(_, stats) | Preempted(_, stats):
                            return stats
                        case Failed(_, message, bad_request):
                            raise BadRequest(message) if bad_request else EngineError(message)
            except ProtocolError as e:
                self._kill_locked()
                raise EngineError(f"the engine was restarted: {e}") from None
            except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
                if self._proc is not None:
                    _wait(self._proc, 1)
                raise EngineError(f"the engine crashed ({self.exit_description()})") from None
            finally:
                self.busy = False
                with self._send_lock:
                    self._current = 0
                self.last_progress = time.monotonic()

    def preempt(self, job: int) -> None:
        """Ask running job `job` to stop at its next token, now: generate() itself would ask only when it next wakes
        (a token message, up to STREAM_INTERVAL away, or its 50 ms poll), which an interactive request's first token
        would wait for. A job that is not running is left alone (the `preempt` callable of generate still decides)."""
        conn = self._conn
        with self._send_lock:
            if conn is None or not self.busy or self._current != job or self._preempt_sent == job:
                return
            try:
                conn.send(Preempt(job))
            except OSError:
                return  # a dead worker: generate() reports it
            self._preempt_sent = job

    def _send(self, conn: multiprocessing.connection.Connection, msg: ToWorker) -> None:
        with self._send_lock:  # the scheduler's thread and the governor's both send
            conn.send(msg)

    def _kill_locked(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            _wait(self._proc, 5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def discard(self, job: int) -> None:
        """Forget a preempted job that will not be resumed (it was cancelled while paused)."""
        conn = self._conn
        if conn is not None and self.alive():
            try:
                self._send(conn, Drop(job))
            except OSError:
                pass

    def set_limits(self, threads: int | None = None, duty: float | None = None) -> None:
        """Actuators for the governor, applied by the worker between tokens (or at once when idle)."""
        if threads is not None:
            self.info.n_threads = threads
        if duty is not None:
            self.duty = duty
        conn = self._conn
        if (threads is not None or duty is not None) and conn is not None and self.alive():
            try:
                self._send(conn, Limits(threads=threads, duty=duty))
            except OSError:
                pass  # a dead worker is the keeper's business; the limits are sent again at start

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the worker to exit; kill it if it does not within `timeout`."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        if conn is not None and proc.poll() is None:
            try:
                self._send(conn, Shutdown())
            except (OSError, BrokenPipeError):
                pass
            _wait(proc, timeout)
        if proc.poll() is None:
            proc.kill()
            _wait(proc, 2)


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
