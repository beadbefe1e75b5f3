"""The engine's worker process: one loaded model, generating with streaming, cancel, preemption with exact resume.

Started by the handle (engine.py) as `python -m llmos_edge.engine_worker FD`, so that a crash or hang in native code
(llama.cpp) never takes the supervisor with it. It speaks only engine_protocol's messages over the socket FD and
imports nothing else of the package: no front-end, no governor (ARCHITECTURE.md).
"""

from __future__ import annotations

import codecs
import ctypes
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

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
    Resume,
    Shutdown,
    Tokens,
    ToWorker,
    default_threads,
    receive_to_worker,
)

# Seconds between token messages while a generation streams. Each message costs the supervisor about 0.6 ms of CPU
# (handle, console queue, writer thread, pty; measured 0.56-0.75 ms per message over 3 answers of 256 one-token
# messages, above its idle 6 ms/s), taken from the two inference threads of a 2-core board: at 20 ms that was 1.5% of
# the machine at 350 tok/s, at 50 ms it is 0.6%. 20 updates a second still stream smoothly to a person, the first
# token still goes at once, and preemption no longer waits for a message (Engine.preempt).
STREAM_INTERVAL = 0.05
N_BATCH = 512  # llama-cpp-python's n_batch: the largest chunk a long prompt is read in
PREFILL_FIRST = 32  # the first chunk of a long prompt: small enough for the slowest board, then sized by its speed


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


class BadPrompt(Exception):
    """The request cannot be run as given (the model's chat template refused it)."""


def prompt_text(
    llm: Any, prompt: str, messages: tuple[tuple[str, str], ...] = (), raw: bool = False
) -> tuple[str, bool]:
    """The text given to the model, and whether to add BOS.

    `raw` (a text completion): the prompt as it is. Our own models carry `llmos.prompt_template`, made for one
    question: the prompt (a chat's last user message) goes in it. Models with a chat template get the whole
    conversation (`messages`, or the one question) through it. Others get the raw text (a chat's contents, one per
    line).
    """
    if raw:
        return prompt, True
    meta = llm.metadata
    template = meta.get("llmos.prompt_template")
    if template:
        return template.replace("{prompt}", prompt), True
    chat = meta.get("tokenizer.chat_template")
    turns = [{"role": r, "content": c} for r, c in messages] or [{"role": "user", "content": prompt}]
    if chat:
        import jinja2
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
        eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
        try:
            formatted = Jinja2ChatFormatter(chat, eos_token=eos, bos_token=bos)(messages=turns)  # type: ignore[arg-type]
        except (jinja2.TemplateError, ValueError) as e:  # e.g. no system message allowed, or turns not alternating
            raise BadPrompt(f"the model's chat template refused this conversation: {e}") from None
        return formatted.prompt, False
    return "\n".join(t["content"] for t in turns), True


@dataclass
class _Job:
    """One generation in the worker: its tokens so far, and while preempted, llama.cpp's saved state."""

    rid: int
    tokens: list[int]
    budget: int
    stats: GenerationStats
    decoder: codecs.IncrementalDecoder
    t0: float
    parts: list[str] = field(default_factory=list)
    decode_s: float = 0.0
    decode_n: int = 0
    state: Any = None
    preempt_asked: bool = False


class _Worker:
    def __init__(self, conn: multiprocessing.connection.Connection, settings: EngineSettings) -> None:
        self.conn = conn
        self.settings = settings
        self.backlog: list[ToWorker] = []
        self.duty = 1.0
        self.threads = 0
        self.suspended: dict[int, _Job] = {}

    def load(self) -> EngineInfo:
        from llama_cpp import Llama

        cpu = load_cpu_backend(self.settings.exclude_cpu)
        self.conn.send(CpuVariant(cpu))
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

    def apply_limits(self, limits: Limits) -> None:
        """The governor's actuators: thread count and a duty cycle (the fraction of time spent computing)."""
        if limits.threads is not None:
            import llama_cpp

            self.threads = max(1, int(limits.threads))
            llama_cpp.llama_set_n_threads(self.llm._ctx.ctx, self.threads, self.threads)
        if limits.duty is not None:
            self.duty = min(1.0, max(0.05, float(limits.duty)))

    def _control(self, rid: int) -> str:
        """Between tokens: messages for the running job. Returns "" to go on, "cancel" or "preempt"."""
        while self.conn.poll():
            msg = receive_to_worker(self.conn)
            match msg:
                case Limits():
                    self.apply_limits(msg)
                case Cancel(rid=r) if r == rid:
                    return "cancel"
                case Preempt(rid=r) if r == rid:
                    return "preempt"
                case Cancel() | Preempt():
                    pass  # for an older job: stale
                case Shutdown():
                    self.backlog.append(msg)
                    return "cancel"
                case _:
                    self.backlog.append(msg)  # waits its turn
        return ""

    def start_job(self, msg: Generate) -> _Job | None:
        t0 = time.perf_counter()
        rid = msg.rid
        try:
            text, add_bos = prompt_text(self.llm, msg.prompt, msg.messages, msg.raw)
        except BadPrompt as e:
            self.conn.send(Failed(rid, str(e), bad_request=True))
            return None
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=not add_bos)
        n_ctx = self.llm.n_ctx()
        if len(tokens) >= n_ctx:
            message = f"the prompt is {len(tokens)} tokens; the context holds {n_ctx}"
            self.conn.send(Failed(rid, message, bad_request=True))
            return None
        seed, max_tokens = msg.seed, msg.max_tokens
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
            self.conn.send(Done(job.rid, stats))
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
                self.conn.send(Tokens(job.rid, "".join(pending), len(pending)))
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
                    self.conn.send(Tokens(job.rid, "".join(pending), len(pending)))
                job.state = self.llm.save_state()
                self.suspended[job.rid] = job
                self.conn.send(Preempted(job.rid, replace(stats, stop="preempted", text="".join(job.parts))))
                return
        tail = job.decoder.decode(b"", final=True)
        job.parts.append(tail)
        if "".join(pending) or tail:
            self.conn.send(Tokens(job.rid, "".join(pending) + tail, len(pending)))
        if job.decode_n and job.decode_s > 0:
            stats.decode_tok_s = job.decode_n / job.decode_s
        stats.text = "".join(job.parts)
        self.conn.send(Done(job.rid, stats))

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
            self.conn.send(Progress(job.rid, i))
            control = self._control(job.rid)
            if control == "cancel":
                return True
            job.preempt_asked = job.preempt_asked or control == "preempt"  # honoured at the first token
        return False

    def serve(self) -> None:
        while True:
            msg = self.backlog.pop(0) if self.backlog else receive_to_worker(self.conn)
            try:
                match msg:
                    case Shutdown():
                        return
                    case Limits():
                        self.apply_limits(msg)
                    case Generate():
                        job = self.start_job(msg)
                        if job is not None:
                            self.run_job(job, msg.temperature)
                    case Resume(rid, temperature):
                        suspended = self.suspended.pop(rid, None)
                        if suspended is None:
                            self.conn.send(Failed(rid, "the paused generation was lost when the engine restarted"))
                        else:
                            self.llm.load_state(suspended.state)
                            suspended.state = None
                            self.run_job(suspended, temperature)
                    case Drop(rid):
                        self.suspended.pop(rid, None)
                    case Cancel() | Preempt() | Init():
                        pass  # a cancel or preempt that arrived after its request ended; Init comes only once
            except Exception as e:  # a failed request must not end the worker
                if isinstance(msg, Generate | Resume):
                    self.conn.send(Failed(msg.rid, f"generation failed: {e}"))


def worker_main(fd: int) -> None:
    _die_with_parent()
    # Ctrl-C on a terminal reaches the whole process group; only the supervisor decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = multiprocessing.connection.Connection(fd)
    try:
        # The bindings first, before the Init that names the model: a prestarted worker (engine.prestart_worker)
        # imports them while the supervisor still gets ready. Loading a CPU variant waits for the Init, which
        # carries the variants to exclude. A missing or broken package is reported by load() as before.
        try:
            import llama_cpp  # noqa: F401
        except Exception:
            pass
        init = receive_to_worker(conn)
        if not isinstance(init, Init):
            raise SystemExit(f"engine worker: expected Init first, got {type(init).__name__}")
        worker = _Worker(conn, init.settings)
        try:
            info = worker.load()
        except Exception as e:
            conn.send(LoadFailed(f"{type(e).__name__}: {e}"))
            return
        conn.send(Loaded(info))
        worker.serve()
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        pass  # the supervisor went away: nothing left to serve


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
