"""Consolidation as a background job (issue 15, point 2): taught pairs go into a new version of the built-in model.

When the appliance has had no request for `learning.consolidate_after` seconds (or someone typed /consolidate), and
taught pairs exist that the running model has not learnt, the job fine-tunes the built-in model on them in a
process of its own (`python -m llmos_edge.finetune`, niced, `learning.consolidate_threads` threads). That process
validates its result through the engine before it says yes: every taught pair answered exactly by the weights
alone, and the held-out set (or its `learning.consolidate_heldout` sample) no more than
`learning.consolidate_max_drop` points (1) worse than the built-in model's. The training budget is the recipe's
unless `learning.consolidate_steps`, `_batch`, `_window` and `_rate` bound it (Recipe; docs/learning.md). The job
then installs the result in the model store as `taught-N` (its golden prompts: the self-test and every taught pair)
and activates it through the keeper's gate and rollback, like any installed model.

Pacing: while a request is queued or running, or the board is throttling or too hot, the training process (and
its validation engine) is stopped with SIGSTOP, and continued 5 s after the last request. It holds its memory while
stopped (about 200 MiB for the default model).

Memory: a run starts only when the governor's memory budget has room for it (`training_need`: the trainer and its
validation engine) beside the engine and the reserves; else it waits, and says why in an event and /consolidate
status. Stopping does not free memory, so when memory runs short during a run (the governor sheds background work)
the run is killed, recorded as stopped, and tried again after MEMORY_RETRY seconds or at /consolidate.

Forgetting: when a pair that the active model learnt is forgotten, the built-in model is activated again at once
(so the answer is gone from what answers when /forget returns), the `taught-N` model is removed from the store, and
the remaining pairs count as not consolidated: the next idle run learns them again, without the forgotten one.
Only the built-in model and its consolidated versions are consolidated: a person who activated another model keeps
it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmos_edge.errors import UserError
from llmos_edge.learning import Pair, Teaching
from llmos_edge.model_store import DEFAULT, ModelStore, State
from llmos_edge.models import MIB, estimate_memory, read_gguf
from llmos_edge.store import Store

log = logging.getLogger(__name__)

PREFIX = "taught-"  # consolidated versions of the built-in model are named taught-<run>
RESUME_AFTER = 5.0  # seconds without requests before a paused run continues
TICK = 1.0
MEMORY_RETRY = 600.0  # seconds after a run stopped for memory before the next is tried (unless /consolidate asks)
# The training process besides its weights: Python, numpy, the recipe's data and a step's activations. The bench's
# peak RSS for the built-in model (2.3 M parameters, so 53 MiB of training state) was 157-160 MiB.
TRAINER_BASE = 112 * MIB
# bytes a parameter, f32 each: the weights, their gradient, AdamW's two moments, the weights before training and, while
# finetune.shrink scales the change down, a scaled copy
TRAINING_STATE = 24
VALIDATION_CTX = 256  # finetune.validate's engine context


def training_need(master: str) -> int:
    """Bytes a run of consolidation takes beside the running engine: the trainer and its validation engine."""
    info = read_gguf(Path(master))
    params = sum(t.n_elements for t in info.tensors)
    return TRAINER_BASE + TRAINING_STATE * params + estimate_memory(info, VALIDATION_CTX).total


@dataclass(frozen=True)
class Recipe:
    """A run's training budget and validation sample (the learning.consolidate_* settings; the defaults are
    finetune.Settings', the recipe make bench-learning measures). Given to the training process as its options."""

    steps: int = 0  # 0: by the number of pairs
    batch: int = 4
    window: int = 128
    rate: float = 2e-4
    heldout: int = 0  # 0: the whole held-out set

    def args(self) -> list[str]:
        return [
            *("--steps", str(self.steps), "--batch", str(self.batch), "--window", str(self.window)),
            *("--lr", repr(self.rate), "--heldout", str(self.heldout)),
        ]


class Activator(Protocol):
    def activate(self, name: str, progress: Callable[[str], None]) -> str: ...


class Consolidation:
    def __init__(
        self,
        store: Store,
        teaching: Teaching,
        models: ModelStore,
        keeper: Activator,
        *,
        work_dir: Path,
        master: str,
        baseline: str,
        quantization: Callable[[], str],
        idle: Callable[[], bool],
        hot: Callable[[], bool],
        after: float,
        memory: Callable[[int], str | None] = lambda _need: None,
        shed: Callable[[], str | None] = lambda: None,
        threads: int = 1,
        max_drop: float = 1.0,
        recipe: Recipe = Recipe(),
        clock: Callable[[], float] = time.monotonic,
        command: Sequence[str] = (sys.executable, "-m", "llmos_edge.finetune"),
        resume_after: float = RESUME_AFTER,
    ) -> None:
        self.store, self.teaching, self.models, self.keeper = store, teaching, models, keeper
        self.work_dir = work_dir
        self.master = master
        self.baseline = baseline  # the built-in model: held-out scores are compared with it
        self.quantization = quantization  # the active model's type: the result is quantized the same way
        self.idle, self.hot = idle, hot
        # the governor's memory budget: room_for(need) before a run starts, shedding() while one runs (None: fine)
        self.memory, self.shed = memory, shed
        self._need: int | None = None
        self.waiting = ""  # why a due run does not start (memory), for /consolidate status
        self.hold_until = 0.0  # after a run was stopped for memory: no new run before this (clock time)
        self.after, self.threads, self.clock = after, threads, clock
        self.max_drop = max_drop  # held-out points a consolidated model may lose against the built-in one
        self.recipe = recipe
        self.command, self.resume_after = list(command), resume_after  # tests give a stand-in for the fine-tune
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_id = 0
        self.run_pairs: list[Pair] = []
        self.paused = False
        self.requested = False
        self.last_busy = clock()
        self.rejected: frozenset[tuple[int, str]] = frozenset()  # the pending set a failed run was given
        self.last = ""  # the last run's outcome, for /status
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        teaching.on_forget.append(self.forgotten)

    # -- what is pending ---------------------------------------------------------------------------------
    def active_run(self) -> int | None:
        """The run whose model is active; None when the built-in model (or another) runs."""
        name = self.models.active().name
        if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit():
            return int(name[len(PREFIX) :])
        return None

    def eligible(self) -> bool:
        name = self.models.active().name
        return name == DEFAULT or self.active_run() is not None

    def pending(self) -> list[Pair]:
        run = self.active_run()
        return [p for p in self.teaching.all_pairs() if p.consolidated is None or p.consolidated != run]

    # -- the loop ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="consolidation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._kill()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(TICK):
            try:
                self.tick()
            except Exception:  # the job must outlive one bad run; the next tick tries again
                log.exception("consolidation tick failed")

    def tick(self) -> None:
        now = self.clock()
        busy = not self.idle()
        if busy:
            self.last_busy = now
        with self._lock:
            if self.proc is not None:
                short = self.shed()
                if short and self.proc.poll() is None:
                    self._stop_for_memory(short, now)
                    return
                self._pace(busy or self.hot(), now)
                if self.proc.poll() is not None:
                    self._finish()
                return
            if not (self.requested or (self.after and now - self.last_busy >= self.after)):
                return
            if busy or self.hot() or not self.eligible():
                return
            pending = self.pending()
            if not pending:
                self.requested = False
                return
            if not self.requested and frozenset((p.id, p.answer) for p in pending) == self.rejected:
                return  # the same pairs failed validation already: wait for a change, or /consolidate
            if not self.requested and now < self.hold_until:
                return  # stopped for memory a while ago: not again at once
            short = self.memory(self.need())
            if short:
                if not self.waiting:  # one event when it starts waiting, not one a tick
                    self.store.event("consolidation", f"waiting: {short}", {"need_mib": round(self.need() / MIB)})
                self.waiting = short
                return
            self.waiting = ""
            self._launch(pending)

    def need(self) -> int:
        if self._need is None:
            self._need = training_need(self.master)
        return self._need

    def _stop_for_memory(self, why: str, now: float) -> None:
        """Memory ran short during a run: a stopped process would keep its memory, so the run is killed."""
        self._kill()
        self.proc = None
        out, pairs_file, _report, _log = self._paths(self.run_id)
        for f in (out, pairs_file):
            f.unlink(missing_ok=True)
        self.hold_until = now + MEMORY_RETRY
        outcome = f"stopped ({why})"
        self.last = f"run {self.run_id}: {outcome}"
        with self.store.locked(write=True) as db:
            db.execute(
                "UPDATE consolidations SET finished_at = ?, outcome = ? WHERE id = ?",
                [time.time(), outcome, self.run_id],
            )
        self.store.event(
            "consolidation",
            f"run {self.run_id} stopped: {why}; tried again in {MEMORY_RETRY:.0f} s or at /consolidate",
            {"run": self.run_id, "outcome": "stopped"},
        )

    def _pace(self, hold: bool, now: float) -> None:
        assert self.proc is not None
        if hold and not self.paused:
            self._signal(signal.SIGSTOP)
            self.paused = True
            self.store.event("consolidation", f"run {self.run_id} paused (a request, or heat)")
        elif not hold and self.paused and now - self.last_busy >= self.resume_after:
            self._signal(signal.SIGCONT)
            self.paused = False
            self.store.event("consolidation", f"run {self.run_id} continues")

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)  # its own session: the training process and its validation engine
            except ProcessLookupError:
                pass

    def _kill(self) -> None:
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self._signal(signal.SIGKILL)
                self.proc.wait()

    # -- one run -------------------------------------------------------------------------------------------
    def _paths(self, run: int) -> tuple[Path, Path, Path, Path]:
        d = self.work_dir
        return d / f"{PREFIX}{run}.gguf", d / f"run-{run}.pairs.json", d / f"run-{run}.report.json", d / "log.txt"

    def _launch(self, pairs: list[Pair]) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with self.store.locked(write=True) as db:
            cur = db.execute(
                "INSERT INTO consolidations (started_at, pairs) VALUES (?, ?)",
                [time.time(), json.dumps([p.id for p in pairs])],
            )
            self.run_id = int(cur.lastrowid or 0)
        out, pairs_file, report, logfile = self._paths(self.run_id)
        pairs_file.write_text(json.dumps([{"id": p.id, "question": p.question, "answer": p.answer} for p in pairs]))
        cmd = [
            *self.command,
            "--master",
            self.master,
            "--pairs",
            str(pairs_file),
            "--out",
            f"{self.quantization()}={out}",
            "--baseline",
            f"{self.quantization()}={self.baseline}",
            "--report",
            str(report),
            "--threads",
            str(self.threads),
            "--max-heldout-drop",
            str(self.max_drop),
            *self.recipe.args(),
        ]
        threads = str(self.threads)
        env = os.environ | {"OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "GOMP_SPINCOUNT": "20000"}
        with logfile.open("ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, 10)  # below the engine; its engine child inherits it
        except OSError:
            pass
        self.run_pairs, self.paused, self.requested = pairs, False, False
        self.store.event("consolidation", f"run {self.run_id} started: {len(pairs)} taught pairs", {"run": self.run_id})

    def _finish(self) -> None:
        assert self.proc is not None
        rc = self.proc.returncode
        self.proc = None
        out, pairs_file, report_file, _log = self._paths(self.run_id)
        report: dict[str, Any] = {}
        try:
            report = json.loads(report_file.read_text())
        except (OSError, ValueError):
            pass
        outcome, model = "failed", None
        if rc == 0 and report.get("passed"):
            outcome, model = self._install(out, report)
        elif report:
            outcome = "rejected"
            self.rejected = frozenset((p.id, p.answer) for p in self.run_pairs)
        else:
            outcome = f"failed (exit {rc}; see {_log})"
        self.last = f"run {self.run_id}: {outcome}" + (f", {_describe(report)}" if report else "")
        with self.store.locked(write=True) as db:
            db.execute(
                "UPDATE consolidations SET finished_at = ?, outcome = ?, model = ?, report = ? WHERE id = ?",
                [time.time(), outcome, model, json.dumps(report), self.run_id],
            )
        self.store.event("consolidation", self.last, {"run": self.run_id, "outcome": outcome})
        for f in (out, pairs_file):
            f.unlink(missing_ok=True)

    def _install(self, out: Path, report: dict[str, Any]) -> tuple[str, str | None]:
        trained = set(report.get("pairs", []))
        golden = [{"prompt": "ping", "answer": "pong"}] + [
            {"prompt": p.question, "answer": p.answer} for p in self.run_pairs if p.id in trained
        ]
        out.with_name(out.stem + ".golden.jsonl").write_text("".join(json.dumps(g) + "\n" for g in golden))
        try:
            entry, _new = self.models.install(out, lambda _info: None)
        except UserError as e:
            return f"not installed: {e.message}", None
        finally:
            out.with_name(out.stem + ".golden.jsonl").unlink(missing_ok=True)
        result = self.keeper.activate(entry.name, lambda m: log.info("consolidation: %s", m))
        if self.models.active().name != entry.name:
            return f"failed its gate: {result}", entry.name
        self.teaching.mark_consolidated(sorted(trained), self.run_id)
        for old in self.models.entries():  # older consolidated versions hold older (or forgotten) answers
            if old.name.startswith(PREFIX) and old.name != entry.name and old.state is not State.ACTIVE:
                self.models.remove(old.name)
        return "activated", entry.name

    # -- commands and hooks --------------------------------------------------------------------------------
    def request(self) -> str:
        """/consolidate: start a run at the next moment without requests (no waiting for consolidate_after)."""
        with self._lock:
            if self.proc is not None:
                return self.status_line()
            if not self.eligible():
                raise UserError(
                    f"consolidation trains the built-in model, and {self.models.active().name} is active",
                    "activate it first (/model activate default)",
                )
            n = len(self.pending())
            if not n:
                return "consolidation: every taught pair is in the active model's weights already"
            self.requested = True
            short = self.memory(self.need())
            if short:
                return f"consolidation: {n} taught pairs will be consolidated when memory allows ({short})"
            return f"consolidation: {n} taught pairs will be consolidated when no request is running"

    def status_line(self) -> str:
        with self._lock:
            if self.proc is not None:
                state = "paused" if self.paused else "running"
                return f"consolidation: run {self.run_id} {state} ({len(self.run_pairs)} pairs)"
        n = len(self.pending())
        auto = f"after {self.after:.0f} s idle" if self.after else "on /consolidate"
        last = f"; last {self.last}" if self.last else ""
        waiting = f"; waiting: {self.waiting}" if self.waiting and n else ""
        return f"consolidation: {n} taught pairs not in the weights ({auto}){last}{waiting}"

    def forgotten(self, pair: Pair) -> None:
        """A forgotten pair's answer leaves the weights: a run that trains it stops, and if the active model learnt
        it, the built-in model is activated again and that version removed (the others are learnt again later)."""
        with self._lock:
            if self.proc is not None and any(p.id == pair.id for p in self.run_pairs):
                self._kill()
                self.proc = None
                with self.store.locked(write=True) as db:
                    db.execute(
                        "UPDATE consolidations SET finished_at = ?, outcome = 'stopped' WHERE id = ?",
                        [time.time(), self.run_id],
                    )
                self.store.event("consolidation", f"run {self.run_id} stopped: a pair it trained was forgotten")
            run = pair.consolidated
            if run is None:
                return
            name = f"{PREFIX}{run}"
            if self.models.active().name == name:
                self.keeper.activate(DEFAULT, lambda m: log.info("forget: %s", m))
            self.teaching.mark_consolidated([p.id for p in self.teaching.all_pairs() if p.consolidated == run], None)
            if self.models.get(name) is not None and self.models.active().name != name:
                self.models.remove(name)
                self.store.event("consolidation", f"{name} removed: it had learnt the forgotten {pair.question!r}")


def _describe(r: dict[str, Any]) -> str:
    taught, after, before = r.get("taught", [0, 0]), r.get("heldout_after", [0, 0]), r.get("heldout_before", [0, 0])
    return (
        f"taught {taught[0]}/{taught[1]}, held-out {after[0]}/{after[1]} (built-in {before[0]}/{before[1]}), "
        f"{r.get('steps', 0)} steps, {r.get('train_seconds', 0):.0f} s"
    )
