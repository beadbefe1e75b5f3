"""One loaded model in a worker process: generate with streaming, cancel, report progress per token.

The worker is a separate process (`python -m llmos_edge.engine FD`) so that a crash or hang in native code
(llama.cpp) never takes the supervisor with it. Parent and worker talk over a socketpair wrapped as a
multiprocessing Connection, with small tuples:

  parent -> worker: ("init", EngineSettings) first, then
                    ("generate", rid, prompt, max_tokens, temperature, seed) | ("cancel", rid) | ("shutdown",)
  worker -> parent: ("cpu", variant) | ("loaded", info) | ("load_failed", message)
                    ("progress", rid, prompt_tokens_read) | ("token", rid, text, n_tokens) | ("done", rid, stats)
                    | ("preempted", rid, stats) | ("error", rid, message)

This module imports no front-end and no governor (ARCHITECTURE.md): the supervisor wires it to the rest.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EngineError(Exception):
    """A request could not be completed by the engine (crash, hang, unavailable model).

    `transient`: the cause may be gone on the next try (a load that timed out, a worker the OOM killer took while
    loading); otherwise the model file itself is the cause (llama.cpp refused it or crashed on it)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class IllegalInstruction(Exception):
    """The worker died with SIGILL in the CPU variant `variant`."""

    def __init__(self, variant: str) -> None:
        super().__init__(variant)
        self.variant = variant


@dataclass(frozen=True)
class EngineSettings:
    model_path: str
    n_ctx: int = 512
    n_threads: int = 0  # 0: one per CPU this process may run on
    exclude_cpu: tuple[str, ...] = ()  # CPU variants that died with SIGILL on this machine
    report_every: float = 5.0  # seconds of prefill between progress messages (the handle sets a sixth of its timeout)


@dataclass
class GenerationStats:
    tokens_in: int = 0
    tokens_out: int = 0
    ttft_s: float = 0.0  # from the request reaching the worker to its first token
    decode_tok_s: float = 0.0  # tokens after the first, per second of decoding
    stop: str = ""  # eos | length | cancelled
    text: str = ""


@dataclass
class EngineInfo:
    model: str = ""
    n_ctx: int = 0
    n_threads: int = 0
    cpu_backend: str = ""  # the ggml CPU variant runtime dispatch picked (x64, sse42, haswell, zen4...)
    pid: int = 0
    self_test: dict[str, str] = field(default_factory=dict)


STREAM_INTERVAL = 0.02  # seconds between token messages while a generation streams
N_BATCH = 512  # llama-cpp-python's n_batch: the largest chunk a long prompt is read in
PREFILL_FIRST = 32  # the first chunk of a long prompt: small enough for the slowest board, then sized by its speed


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) or 1


# ---------------------------------------------------------------------------------------------------------------
# Worker side (runs in the child process)


def _die_with_parent() -> None:
    # If the supervisor is SIGKILLed, the kernel kills the worker too instead of leaving an orphan holding memory.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def cpu_variants() -> list[tuple[str, int, Path]]:
    """The ggml CPU variants shipped in the wheel that this CPU supports, best first: (name, score, path).

    The wheel is built with GGML_BACKEND_DL and every CPU variant, installed under site-packages/bin where ggml
    does not look by itself (without loading one, llama.cpp fails with "no backends are loaded"). Each variant
    scores itself from CPUID; 0 means unsupported.
    """
    import llama_cpp  # loads libggml-base, which the variant libraries need

    bin_dir = Path(llama_cpp.__file__).resolve().parent.parent / "bin"
    found = []
    for path in bin_dir.glob("libggml-cpu-*.so"):
        try:
            score_fn = ctypes.CDLL(str(path)).ggml_backend_score
        except (OSError, AttributeError):
            continue
        score_fn.restype = ctypes.c_int
        if (score := score_fn()) > 0:
            found.append((path.name.removeprefix("libggml-cpu-").removesuffix(".so"), score, path))
    return sorted(found, key=lambda v: -v[1])


def load_cpu_backend(exclude: tuple[str, ...] = (), only: str = "") -> str:
    """Load the best CPU variant not in `exclude` and return its name.

    `exclude` exists because CPUID can promise more than the machine delivers: under some hypervisors the
    `sapphirerapids` variant's AMX instructions die with SIGILL although the AMX flags are set. The supervisor
    then excludes that variant and the next best one is used. `only` loads one named variant (benchmarks use it
    to run raw llama.cpp on the variant the engine uses).
    """
    import llama_cpp.llama_cpp as lib

    for name, _score, path in cpu_variants():
        if name in exclude or (only and name != only):
            continue
        fn = lib._lib.ggml_backend_load
        fn.argtypes = [ctypes.c_char_p]
        fn.restype = ctypes.c_void_p
        if fn(os.fsencode(path)):
            return name
    return "builtin"  # a wheel built without GGML_BACKEND_DL has its CPU backend linked in


def _prompt_text(llm: Any, prompt: str) -> tuple[str, bool]:
    """The text given to the model for a user's question, and whether to add BOS.

    Our own models carry `llmos.prompt_template`; models with a chat template use it; others get the raw text.
    """
    meta = llm.metadata
    template = meta.get("llmos.prompt_template")
    if template:
        return template.replace("{prompt}", prompt), True
    chat = meta.get("tokenizer.chat_template")
    if chat:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
        eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
        formatted = Jinja2ChatFormatter(chat, eos_token=eos, bos_token=bos)(
            messages=[{"role": "user", "content": prompt}]
        )
        return formatted.prompt, False
    return prompt, True


class _Worker:
    def __init__(self, conn: multiprocessing.connection.Connection, settings: EngineSettings) -> None:
        self.conn = conn
        self.settings = settings
        self.backlog: list[tuple[Any, ...]] = []
        self.duty = 1.0
        self.threads = 0
        self.suspended: dict[int, _Job] = {}

    def load(self) -> EngineInfo:
        from llama_cpp import Llama

        cpu = load_cpu_backend(self.settings.exclude_cpu)
        self.conn.send(("cpu", cpu))  # so the supervisor knows which variant to blame for a SIGILL
        threads = self.settings.n_threads or default_threads()
        self.llm = Llama(
            model_path=self.settings.model_path,
            n_ctx=self.settings.n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        import llama_cpp

        self.vocab = self.llm._model.vocab
        self.is_eog = llama_cpp.llama_vocab_is_eog
        # Decode a few tokens now: an unusable CPU variant dies here, while loading, not in a user's request.
        self.llm.eval(self.llm.tokenize(b"probe\n", add_bos=True)[:4])
        self.llm.reset()  # type: ignore[no-untyped-call]
        meta = self.llm.metadata
        self_test = {}
        if meta.get("llmos.self_test.prompt"):
            self_test = {
                "prompt": meta["llmos.self_test.prompt"],
                "answer": meta.get("llmos.self_test.answer", ""),
            }
        return EngineInfo(
            model=meta.get("general.name", Path(self.settings.model_path).stem),
            n_ctx=self.llm.n_ctx(),
            n_threads=threads,
            cpu_backend=cpu,
            pid=os.getpid(),
            self_test=self_test,
        )

    def apply_limits(self, limits: dict[str, float]) -> None:
        """The governor's actuators: thread count and a duty cycle (the fraction of time spent computing)."""
        if "threads" in limits:
            import llama_cpp

            self.threads = max(1, int(limits["threads"]))
            llama_cpp.llama_set_n_threads(self.llm._ctx.ctx, self.threads, self.threads)
        if "duty" in limits:
            self.duty = min(1.0, max(0.05, float(limits["duty"])))

    def _control(self, rid: int) -> str:
        """Between tokens: messages for the running job. Returns "" to go on, "cancel" or "preempt"."""
        while self.conn.poll():
            msg = self.conn.recv()
            if msg[0] == "limits":
                self.apply_limits(msg[1])
            elif msg[0] in ("cancel", "preempt") and msg[1] == rid:
                return str(msg[0])
            elif msg[0] == "shutdown":
                self.backlog.append(msg)
                return "cancel"
            elif msg[0] not in ("cancel", "preempt"):  # those, for an older job, are stale; the rest wait their turn
                self.backlog.append(msg)
        return ""

    def start_job(self, rid: int, prompt: str, max_tokens: int, seed: int) -> _Job | None:
        t0 = time.perf_counter()
        text, add_bos = _prompt_text(self.llm, prompt)
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=not add_bos)
        n_ctx = self.llm.n_ctx()
        if len(tokens) >= n_ctx:
            self.conn.send(("error", rid, f"the prompt is {len(tokens)} tokens; the context holds {n_ctx}"))
            return None
        self.llm.set_seed(seed)
        return _Job(
            rid=rid,
            tokens=tokens,
            budget=min(max_tokens, n_ctx - len(tokens)),
            stats=GenerationStats(tokens_in=len(tokens), stop="length"),
            decoder=codecs.getincrementaldecoder("utf-8")(errors="replace"),
            t0=t0,
        )

    def run_job(self, job: _Job, temperature: float) -> None:
        """Generate until EOS, the budget, a cancel, or a preemption (then the job is kept, with llama.cpp's saved
        state, to be resumed later exactly where it stopped)."""
        stats = job.stats
        t_prev: float | None = None
        work_start = time.perf_counter()
        pending: list[str] = []
        last_sent = 0.0
        if job.state is None and self._prefill(job):
            stats.stop = "cancelled"
            stats.text = ""
            self.conn.send(("done", job.rid, stats))
            return
        gen = self.llm.generate(job.tokens, temp=temperature, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0)
        for tok in gen:
            if self.is_eog(self.vocab, tok):
                stats.stop = "eos"
                break
            now = time.perf_counter()
            if stats.tokens_out == 0:
                stats.ttft_s = now - job.t0
            elif t_prev is not None:
                job.decode_s += now - t_prev
                job.decode_n += 1
            t_prev = now
            job.tokens.append(tok)
            stats.tokens_out += 1
            piece = job.decoder.decode(self.llm.detokenize([tok]))
            job.parts.append(piece)
            pending.append(piece)
            # Coalesce: at hundreds of tokens a second a message per token costs the supervisor (and the console)
            # CPU that the inference threads need. The first token goes at once; then at most one message per
            # STREAM_INTERVAL, which is still smooth streaming for a person and frequent progress for the watchdog.
            if stats.tokens_out == 1 or now - last_sent >= STREAM_INTERVAL:
                self.conn.send(("token", job.rid, "".join(pending), len(pending)))
                pending.clear()
                last_sent = now
            if self.duty < 1.0:  # pacing: rest in proportion to the work, so the average load is `duty`
                time.sleep((now - work_start) * (1.0 - self.duty) / self.duty)
            work_start = time.perf_counter()
            if stats.tokens_out >= job.budget:
                break
            control = self._control(job.rid)
            if job.preempt_asked:
                control, job.preempt_asked = control or "preempt", False
            if control == "cancel":
                stats.stop = "cancelled"
                break
            if control == "preempt":
                # The last token is sampled but not yet evaluated; the saved state holds everything before it,
                # so resuming evaluates it exactly as the uninterrupted run would have.
                gen.close()
                if pending:
                    self.conn.send(("token", job.rid, "".join(pending), len(pending)))
                job.state = self.llm.save_state()
                self.suspended[job.rid] = job
                self.conn.send(("preempted", job.rid, replace(stats, stop="preempted", text="".join(job.parts))))
                return
        tail = job.decoder.decode(b"", final=True)
        job.parts.append(tail)
        if "".join(pending) or tail:
            self.conn.send(("token", job.rid, "".join(pending) + tail, len(pending)))
        if job.decode_n and job.decode_s > 0:
            stats.decode_tok_s = job.decode_n / job.decode_s
        stats.text = "".join(job.parts)
        self.conn.send(("done", job.rid, stats))

    def _prefill(self, job: _Job) -> bool:
        """A prompt longer than one batch is evaluated in chunks with a progress message after each: prefill is
        progress, so a prompt that takes longer than `progress_timeout` to read is not killed as hung, and it can be
        cancelled meanwhile. The first chunk is small; the next ones take about `report_every` seconds on this
        machine, at most llama-cpp-python's own batch (n_batch: on a quick machine the batches, and so the memory
        they touch, are what generate() would have used). generate() then finds the prompt in the KV cache and
        evaluates only its last token. Returns True when the request was cancelled during the prefill."""
        head = job.tokens[:-1]
        if len(head) <= N_BATCH:
            return False  # one batch: generate() evaluates it at once, as before
        self.llm.reset()  # type: ignore[no-untyped-call]
        i, n = 0, PREFILL_FIRST
        while i < len(head):
            t0 = time.perf_counter()
            chunk = head[i : i + n]
            self.llm.eval(chunk)
            i += len(chunk)
            per_token = max((time.perf_counter() - t0) / len(chunk), 1e-6)
            n = max(PREFILL_FIRST, min(N_BATCH, int(self.settings.report_every / per_token)))
            self.conn.send(("progress", job.rid, i))
            control = self._control(job.rid)
            if control == "cancel":
                return True
            job.preempt_asked = job.preempt_asked or control == "preempt"  # honoured at the first token
        return False

    def serve(self) -> None:
        while True:
            msg = self.backlog.pop(0) if self.backlog else self.conn.recv()
            kind = msg[0]
            try:
                if kind == "shutdown":
                    return
                if kind == "limits":
                    self.apply_limits(msg[1])
                elif kind == "generate":
                    _, rid, prompt, max_tokens, temperature, seed = msg
                    job = self.start_job(rid, prompt, max_tokens, seed)
                    if job is not None:
                        self.run_job(job, temperature)
                elif kind == "resume":
                    _, rid, temperature = msg
                    job = self.suspended.pop(rid, None)
                    if job is None:
                        self.conn.send(("error", rid, "the paused generation was lost when the engine restarted"))
                    else:
                        self.llm.load_state(job.state)
                        job.state = None
                        self.run_job(job, temperature)
                elif kind == "drop":
                    self.suspended.pop(msg[1], None)
            except Exception as e:  # a failed request must not end the worker
                if kind in ("generate", "resume"):
                    self.conn.send(("error", msg[1], f"generation failed: {e}"))


@dataclass
class _Job:
    """One generation in the worker: its tokens so far, and while preempted, llama.cpp's saved state."""

    rid: int
    tokens: list[int]
    budget: int
    stats: GenerationStats
    decoder: Any
    t0: float
    parts: list[str] = field(default_factory=list)
    decode_s: float = 0.0
    decode_n: int = 0
    state: Any = None
    preempt_asked: bool = False


def worker_main(fd: int) -> None:
    _die_with_parent()
    # Ctrl-C on a terminal reaches the whole process group; only the supervisor decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = multiprocessing.connection.Connection(fd)
    try:
        kind, settings = conn.recv()
        assert kind == "init"
        worker = _Worker(conn, settings)
        try:
            info = worker.load()
        except Exception as e:
            conn.send(("load_failed", f"{type(e).__name__}: {e}"))
            return
        conn.send(("loaded", info))
        worker.serve()
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        pass  # the supervisor went away: nothing left to serve


# ---------------------------------------------------------------------------------------------------------------
# Supervisor side


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
            parent_sock, child_sock = socket.socketpair()
            proc = subprocess.Popen(
                [sys.executable, "-m", "llmos_edge.engine", str(child_sock.fileno())],
                pass_fds=[child_sock.fileno()],
                stdin=subprocess.DEVNULL,
                env=worker_environment(),
            )
            child_sock.close()
            parent = multiprocessing.connection.Connection(parent_sock.detach())
            parent.send(("init", self.settings))
            self._proc, self._conn = proc, parent
            deadline = time.monotonic() + self.load_timeout
            cpu = ""
            while time.monotonic() < deadline:
                if parent.poll(0.1):
                    try:
                        msg = parent.recv()
                    except (EOFError, OSError):  # a worker dying with our messages unread resets the socket
                        break
                    if msg[0] == "cpu":
                        cpu = msg[1]
                    elif msg[0] == "loaded":
                        self.info = msg[1]
                        self.last_progress = time.monotonic()
                        return self.info
                    elif msg[0] == "load_failed":
                        _wait(proc, 5)
                        raise EngineError(f"the model did not load: {msg[1]}")
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
            rid = self._current = job
            sent_cancel = sent_preempt = False
            self.busy = True
            self.last_progress = time.monotonic()
            try:
                with self._send_lock:
                    if resume:
                        conn.send(("resume", rid, temperature))
                    else:
                        conn.send(("generate", rid, prompt, max_tokens, temperature, seed))
                while True:
                    if not sent_cancel and cancelled():
                        with self._send_lock:
                            conn.send(("cancel", rid))
                        sent_cancel = True
                    if not sent_preempt and not sent_cancel and preempt():
                        with self._send_lock:
                            conn.send(("preempt", rid))
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
                    msg = conn.recv()
                    if msg[1] != rid:
                        continue  # a late message of an earlier, abandoned request
                    self.last_progress = time.monotonic()
                    if msg[0] == "token":
                        self.tokens_total += msg[3]
                        on_token(msg[2])
                    elif msg[0] in ("done", "preempted"):
                        stats: GenerationStats = msg[2]
                        return stats
                    elif msg[0] == "error":
                        raise EngineError(msg[2])
            except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
                if self._proc is not None:
                    _wait(self._proc, 1)
                raise EngineError(f"the engine crashed ({self.exit_description()})") from None
            finally:
                self.busy = False
                self.last_progress = time.monotonic()

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
            with self._send_lock:
                try:
                    conn.send(("drop", job))
                except OSError:
                    pass

    def set_limits(self, threads: int | None = None, duty: float | None = None) -> None:
        """Actuators for the governor, applied by the worker between tokens (or at once when idle)."""
        limits: dict[str, float] = {}
        if threads is not None:
            limits["threads"] = threads
            self.info.n_threads = threads
        if duty is not None:
            limits["duty"] = duty
            self.duty = duty
        conn = self._conn
        if limits and conn is not None and self.alive():
            with self._send_lock:
                try:
                    conn.send(("limits", limits))
                except OSError:
                    pass  # a dead worker is the keeper's business; the limits are sent again at start

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the worker to exit; kill it if it does not within `timeout`."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        if conn is not None and proc.poll() is None:
            try:
                conn.send(("shutdown",))
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


if __name__ == "__main__":
    # Run through the imported module, not __main__, so the classes we pickle name `llmos_edge.engine`.
    from llmos_edge import engine

    engine.worker_main(int(sys.argv[1]))
