"""The engine keeper: which model runs, keeping its worker alive, and every model change (gate, rollback, ladder).

It never dies and never parks. Whatever goes wrong while loading or gating becomes a state with a reason (shown in
/status and STATUS=, recorded as an event), and then:
- a transient cause (a load that timed out, the worker killed while loading, memory briefly short) is retried with
  backoff;
- a cause a person must fix (a missing, corrupt or unsupported file) waits, and is retried when the file changes;
- when the model that should run cannot run within the budgets (memory, a crash loop, a board too hot for it), the
  degradation ladder runs the next smaller good model instead (the built-in default last) and goes back when the
  cause is gone;
- a newly activated model that fails its gate, or crash-loops soon after activation, is rolled back to the last
  good one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from llmos_edge.config import Config
from llmos_edge.engine import Engine, EngineError
from llmos_edge.errors import UserError
from llmos_edge.governor import Governor
from llmos_edge.model_store import ModelEntry, ModelStore, gate_prompts
from llmos_edge.models import GGUFInfo, check_loadable, read_gguf
from llmos_edge.scheduler import Request
from llmos_edge.store import Store

log = logging.getLogger(__name__)

CRASH_LOOP = (5, 60.0)  # this many restarts within this many seconds is a crash loop
STABLE_AFTER = 60.0  # seconds of uptime after which the restart backoff starts over
ROLLBACK_WINDOW = 600.0  # a model that crash-loops this soon after its activation is rolled back, not laddered
GATE_TOKENS = 16  # a model with no golden prompts must generate this many tokens without error
SWITCH_DRAIN_S = 30.0  # how long a model switch waits for the answer being generated to finish


class KeeperState(StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"  # the worker died while serving; it is being started again
    RETRYING = "retrying"  # a transient failure; tried again after a backoff
    FAILED = "failed"  # a person must fix the model file; tried again when it changes
    DEGRADED = "degraded"  # running, but not as it should (crash loop, failed self-test)
    UNLOADED = "unloaded"  # the governor unloaded the model until memory is calm


class FallbackCause(StrEnum):
    """Why the ladder runs a smaller model; each goes back by its own rule (see `_watch_ladder`)."""

    MEMORY = "memory"  # the model does not fit the memory budget now: back when it fits beside the fallback
    CRASH = "crash"  # it crash-looped: back after ten times models.recheck
    HOT = "hot"  # the board stays too hot for it: back after as long cool
    FILE = "file"  # its file is missing, corrupt or unsupported: back when the file changes and fits


@dataclass(frozen=True)
class EngineState:
    state: KeeperState = KeeperState.STARTING
    reason: str = ""


def _stamp(path: str) -> tuple[float, int]:
    try:
        st = Path(path).stat()
        return (st.st_mtime, st.st_size)
    except OSError:
        return (0.0, 0)


class Keeper:
    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        store: Store,
        models: ModelStore,
        governor: Governor,
        stopping: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.store = store
        self.models = models
        self.governor = governor
        self.stopping = stopping
        self.clock = clock
        self.submit: Callable[[Request], Request] | None = None  # the scheduler's, set once it exists (gates)
        self.ready = threading.Event()  # a worker is loaded with `running` and may take requests
        self.es = EngineState(KeeperState.STARTING, "loading the model")
        self.preferred: ModelEntry = models.active()
        self.target: ModelEntry = self.preferred
        self.running: ModelEntry | None = None
        self.info: GGUFInfo | None = None  # the running model's header
        self.trial = False  # the target is a model being activated: no ladder, its failure is the gate's answer
        self.fallback = ""  # why the ladder runs `target` instead of `preferred`; empty when it does not
        self._fallback_cause: FallbackCause | None = None
        self._fallback_at = 0.0
        self._recheck_every = cfg.models.recheck  # doubles while going back keeps failing (no bouncing)
        self._went_back_at = -1e9
        self._hot_since: float | None = None
        self._cool_since: float | None = None
        self._load_error = ""  # the last load failure of the current target, for wait_settled
        self._failed_stamp: tuple[float, int] | None = None
        self._retry_at = 0.0
        self._backoff = 0.2
        self.restarts = 0
        self._restart_times: deque[float] = deque(maxlen=CRASH_LOOP[0])
        self._loaded_at = 0.0
        self.last_change = ""  # the last model change and how it went, for /status
        self._lock = threading.RLock()  # model changes: one at a time
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    # -- the thread ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-keeper", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._tick()
            except Exception as e:  # the keeper must outlive anything; what went wrong becomes a reason
                log.exception("engine keeper")
                self._set(KeeperState.RETRYING, f"internal error while keeping the engine: {type(e).__name__}: {e}")
                self.store.event("keeper_error", self.es.reason)
                self._retry_at = self.clock() + self._backoff
                self._backoff = min(self._backoff * 2, self.cfg.engine.restart_backoff_max)
                self.stopping.wait(0.5)

    def _set(self, state: KeeperState, reason: str = "") -> None:
        with self._changed:
            self.es = EngineState(state, reason)
            self._changed.notify_all()

    def _tick(self) -> None:
        now = self.clock()
        target = self.target
        if self.engine.alive():
            if self.running is not None and self.running.path != target.path:
                self._stop_for_switch()
                return
            if now - self.engine.last_progress > STABLE_AFTER and not self.engine.busy:
                self._backoff = 0.2
            self._watch_ladder(now)
            self.stopping.wait(0.1)
            return
        state = self.es.state
        if state is KeeperState.UNLOADED:  # held stopped by the governor until memory is calm
            self.stopping.wait(0.2)
            return
        if state is KeeperState.READY or (state is KeeperState.DEGRADED and self.running is not None):
            self._died_while_serving(now)
            return
        if state is KeeperState.FAILED and self._failed_stamp == _stamp(target.path):
            self._watch_ladder(now)
            self.stopping.wait(0.5)  # a person must fix the file: look again when it changes
            return
        if state in (KeeperState.RETRYING, KeeperState.RESTARTING) and now < self._retry_at:
            self.stopping.wait(min(0.2, self._retry_at - now))
            return
        self._load(target)

    def _stop_for_switch(self) -> None:
        """A different model is wanted: let the answer being generated finish (briefly), then stop the worker."""
        self.ready.clear()
        deadline = self.clock() + SWITCH_DRAIN_S
        while self.engine.busy and self.clock() < deadline and not self.stopping.is_set():
            self.stopping.wait(0.05)
        self.engine.stop(timeout=2.0)
        self.running = None
        self.info = None
        self._set(KeeperState.LOADING, f"switching to {self.target.name}")

    # -- loading -------------------------------------------------------------------------------------------
    def _load(self, target: ModelEntry) -> None:
        self._set(KeeperState.LOADING, f"loading {target.name}")
        try:
            info = read_gguf(target.path)
            check_loadable(info)
        except UserError as e:
            self._failed(target, str(e), cause=FallbackCause.FILE)
            return
        try:
            n_ctx = self.governor.memory.preflight(info, self.cfg.model.context)
        except UserError as e:
            if self.governor.memory.fits_ever(info):  # memory is briefly short: it will be there again
                self._transient(target, f"memory is short for now: {e}", cause=FallbackCause.MEMORY)
            else:
                self._failed(target, str(e), cause=FallbackCause.MEMORY)
            return
        self.engine.settings = dataclasses.replace(self.engine.settings, model_path=target.path, n_ctx=n_ctx)
        try:
            loaded = self.engine.start()
        except EngineError as e:
            if e.transient:
                self._transient(target, str(e), cause=FallbackCause.MEMORY)
            else:
                self._failed(target, str(e), cause=FallbackCause.FILE)
            return
        self.running, self.info = target, info
        self._failed_stamp = None
        self._load_error = ""
        self._loaded_at = self.clock()
        self.ready.set()
        if self.fallback:
            self._set(KeeperState.DEGRADED, self.fallback)
        else:
            self._set(KeeperState.READY)
        self.store.event(
            "engine_loaded",
            f"{loaded.model} ({target.name}) loaded in pid {loaded.pid}",
            {
                "cpu_backend": loaded.cpu_backend,
                "threads": loaded.n_threads,
                "n_ctx": loaded.n_ctx,
                "model": target.name,
            },
        )

    def _transient(self, target: ModelEntry, reason: str, cause: FallbackCause) -> None:
        """Tried again after a backoff; meanwhile, the ladder may run a smaller model."""
        self._load_error = reason
        if self._step_down(target, reason, cause):
            return
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.cfg.engine.restart_backoff_max)
        self._retry_at = self.clock() + delay
        self._set(KeeperState.RETRYING, f"{reason}; trying again in {delay:.1f} s")
        self.store.event(
            "model_retry", f"{target.name}: {reason}; trying again in {delay:.1f} s", {"model": target.name}
        )
        self.ready.clear()

    def _failed(self, target: ModelEntry, reason: str, cause: FallbackCause) -> None:
        """A person must fix it: wait for the file to change; meanwhile, the ladder may run a smaller model."""
        self._load_error = reason
        self._failed_stamp = _stamp(target.path)
        if self._step_down(target, reason, cause):
            return
        if self.es.reason != reason:
            log.error("model unavailable: %s", reason)
            self.store.event("model_failed", reason, {"model": target.name})
        self._set(KeeperState.FAILED, reason)
        self.ready.clear()

    # -- crashes -------------------------------------------------------------------------------------------
    def _died_while_serving(self, now: float) -> None:
        self.ready.clear()
        why = self.engine.exit_description()
        running = self.running
        self.running = None
        self.restarts += 1
        self._restart_times.append(now)
        loop = len(self._restart_times) == CRASH_LOOP[0] and now - self._restart_times[0] < CRASH_LOOP[1]
        reason = f"engine {why}"
        if loop:
            self._restart_times.clear()
            reason = f"crash loop: {CRASH_LOOP[0]} restarts within {CRASH_LOOP[1]:.0f} s; last: engine {why}"
            entry = self.models.get((running or self.target).name) or running or self.target
            recent = entry.activated_at and time.time() - entry.activated_at < ROLLBACK_WINDOW
            if not entry.builtin and not self.fallback and recent and entry.name == self.preferred.name:
                self.store.event(
                    "engine_restart", f"{reason}; rolling back", {"restarts": self.restarts, "crash_loop": True}
                )
                self._rollback_failed(entry, reason, wait=False)  # this thread does the loading: never wait on it
                return
            if self._step_down(entry, reason, FallbackCause.CRASH):
                self.store.event("engine_restart", reason, {"restarts": self.restarts, "crash_loop": True})
                return
            delay = self.cfg.engine.restart_backoff_max
            self._set(KeeperState.DEGRADED, reason)
        else:
            delay = self._backoff
            self._backoff = min(self._backoff * 2, self.cfg.engine.restart_backoff_max)
            self._set(KeeperState.RESTARTING, reason)
        self.store.event(
            "engine_restart",
            f"engine {why}; restarting in {delay:.1f} s",
            {"restarts": self.restarts, "crash_loop": loop},
        )
        self._retry_at = now + delay
        if not loop:
            return
        # A crash loop with nowhere to go: wait, then try again (the state says why meanwhile).
        self.stopping.wait(delay)
        self._set(KeeperState.RESTARTING, reason)
        self._retry_at = 0.0

    # -- the degradation ladder ----------------------------------------------------------------------------
    def _step_down(self, failing: ModelEntry, reason: str, cause: FallbackCause) -> bool:
        """Run the next smaller good model that fits instead of `failing`. False when there is none (or the ladder
        is off, or this is a trial, which must answer for itself)."""
        if self.trial or not self.cfg.models.ladder:
            return False
        for rung in self.models.ladder_below(failing):
            if not rung.builtin and not self._fits_now(rung):
                continue
            first = not self.fallback
            now = self.clock()
            if first and now - self._went_back_at < 60.0:  # the way back failed again: wait longer before the next try
                self._recheck_every = min(self._recheck_every * 2, 600.0)
            elif first:
                self._recheck_every = self.cfg.models.recheck
            self.fallback = f"running {rung.name} instead of {self.preferred.name}: {reason}"
            self._fallback_cause = cause if first else self._fallback_cause
            self._fallback_at = self.clock()
            self.target = rung
            self._retry_at = 0.0
            self._hot_since = None
            self.ready.clear()
            log.warning("degradation ladder: %s", self.fallback)
            self.store.event(
                "model_fallback",
                self.fallback,
                {"preferred": self.preferred.name, "running": rung.name, "cause": cause},
            )
            self._set(KeeperState.LOADING, self.fallback)
            return True
        return False

    def _fits_now(self, entry: ModelEntry, *, beside_worker: bool = False) -> bool:
        try:
            info = read_gguf(entry.path)
            check_loadable(info)
        except UserError:
            return False
        return self.governor.memory.fits_now(info, beside_worker=beside_worker)

    def _watch_ladder(self, now: float) -> None:
        """While serving: step down when the board stays too hot for this model; while on a fallback: go back to
        the preferred model when its cause is gone."""
        if self.trial or not self.cfg.models.ladder:
            return
        thermal = self.governor.thermal
        self._hot_since = (self._hot_since or now) if thermal.pinned() else None
        self._cool_since = (self._cool_since or now) if thermal.cool() else None
        hot_for = self.cfg.models.hot_for
        if self.running is not None and self._hot_since is not None and now - self._hot_since >= hot_for:
            t = thermal.celsius
            why = f"the board stays too hot for it ({t:.1f} °C)" if t is not None else "the board stays too hot for it"
            if not self._step_down(self.running, why, FallbackCause.HOT):
                self._hot_since = now  # already the smallest: ask again after another hot_for, not every tick
            return
        if not self.fallback or now - self._fallback_at < self._recheck_every:
            return
        cause, back = self._fallback_cause, False
        if cause is FallbackCause.HOT:
            back = self._cool_since is not None and now - self._cool_since >= hot_for
        elif cause is FallbackCause.CRASH:
            back = now - self._fallback_at >= 10 * self.cfg.models.recheck
        elif cause is FallbackCause.FILE:
            back = self._failed_stamp != _stamp(self.preferred.path) and self._fits_now(self.preferred)
        else:
            back = self._fits_now(self.preferred, beside_worker=True)
        self._fallback_at = now
        if back:
            log.info("degradation ladder: going back to %s (%s is gone)", self.preferred.name, cause)
            self.store.event("model_fallback_end", f"back to {self.preferred.name}: the {cause} cause is gone")
            self._went_back_at = now
            self.fallback = ""
            self.target = self.preferred
            self._failed_stamp = None

    def unavailable(self) -> str:
        """For the scheduler: why no engine will come without a person ("" while one is on its way)."""
        es = self.es
        if es.state is KeeperState.FAILED or (es.state is KeeperState.DEGRADED and self.running is None):
            return es.reason
        return ""

    # -- the governor's actuators --------------------------------------------------------------------------
    def unload(self, reason: str) -> None:
        self._set(KeeperState.UNLOADED, reason)  # first, so the keeper holds it stopped instead of restarting
        self.ready.clear()
        self.engine.stop()
        self.running = None

    def reload(self) -> None:
        if self.es.state is KeeperState.UNLOADED:
            self._set(KeeperState.STARTING, "reloading: memory is calm again")

    # -- waiting and gating --------------------------------------------------------------------------------
    def wait_settled(self, timeout: float) -> str | None:
        """Wait until the target model is loaded (None) or its load failed (the reason)."""
        deadline = self.clock() + timeout
        with self._changed:
            while not self.stopping.is_set():
                if self.ready.is_set() and self.running is not None and self.running.path == self.target.path:
                    return None
                if self.es.state in (KeeperState.FAILED, KeeperState.RETRYING) and self._load_error:
                    return self._load_error
                left = deadline - self.clock()
                if left <= 0:
                    return f"{self.target.name} did not load within {timeout:.0f} s ({self.es.reason})"
                self._changed.wait(min(left, 0.5))
        return "shutting down"

    def gate(self, entry: ModelEntry) -> tuple[bool, str]:
        """Ask the running model its golden prompts (or make it generate) through the scheduler."""
        assert self.submit is not None
        try:
            prompts = gate_prompts(entry, self.info)
        except UserError as e:
            return False, str(e)
        timeout = self.cfg.engine.load_timeout
        if not prompts:
            req = self.submit(Request(prompt="Hello", source="gate", max_tokens=GATE_TOKENS))
            r = req.wait(timeout)
            if r is None or r.outcome != "ok":
                return False, f"generation failed: {r.error if r else 'no answer in time'}"
            return True, f"passed (generated {r.stats.tokens_out} tokens)"
        for g in prompts:
            req = self.submit(Request(prompt=g.prompt, source="gate", max_tokens=max(32, self.cfg.model.max_tokens)))
            r = req.wait(timeout)
            if r is None or r.outcome != "ok":
                return False, f"{g.prompt!r} got no answer: {r.error if r else 'no answer in time'}"
            got = r.text.strip()
            if g.answer and got != g.answer:
                return False, f"expected {g.answer!r} for {g.prompt!r}, got {got!r}"
            if not got:
                return False, f"no text for {g.prompt!r}"
        if len(prompts) == 1:
            return True, f"passed ({prompts[0].prompt!r} -> {prompts[0].answer!r})"
        return True, f"passed ({len(prompts)} golden prompts)"

    # -- model changes -------------------------------------------------------------------------------------
    def _switch(self, entry: ModelEntry, *, trial: bool) -> None:
        with self._changed:
            self.preferred = entry
            self.target = entry
            self.trial = trial
            self.fallback = ""
            self._fallback_cause = None
            self._load_error = ""
            self._failed_stamp = None
            self._retry_at = 0.0
            self._backoff = 0.2
            self._restart_times.clear()
            if self.running is None or self.running.path != entry.path:
                self.ready.clear()
                self.es = EngineState(KeeperState.LOADING, f"loading {entry.name}")
            self._changed.notify_all()

    def activate(self, name: str, progress: Callable[[str], None]) -> str:
        """Run `name` through its gate on the real engine; make it active if it passes, else roll back."""
        entry = self.models.get(name)
        if entry is None:
            raise UserError(f"no model named {name}", "`/model` lists the installed models")
        if self.governor.thermal.mode.refuses:
            raise UserError("the board is too hot to try a new model now", "try again when it has cooled")
        with self._lock:
            previous = self.preferred
            if entry.name == previous.name and not self.fallback and self.es.state is KeeperState.READY:
                return f"model: active {name} (already)"
            progress(f"loading {name} ...")
            self._switch(entry, trial=True)
            error = self.wait_settled(self.cfg.engine.load_timeout + 30)
            ok, result = (False, f"did not load: {error}") if error else (False, "")
            if not error:
                progress(f"{name} loaded; gate ...")
                ok, result = self.gate(entry)
            if ok:
                self.models.set_active(name, gate=result)
                self.preferred = self.models.get(name) or entry
                self.target = self.preferred
                self.trial = False
                self.store.event("model_activated", f"{name} is active; gate {result}", {"model": name})
                self.last_change = f"{name} activated (gate {result})"
                return f"model: active {name} (gate {result})"
            return self._rollback_failed(entry, result, previous=previous, progress=progress)

    def _rollback_failed(
        self,
        entry: ModelEntry,
        reason: str,
        previous: ModelEntry | None = None,
        progress: Callable[[str], None] = lambda _m: None,
        wait: bool = True,
    ) -> str:
        """`entry` failed (its gate, or a crash loop after activation): mark it and go back to a good model."""
        self.models.mark(entry.name, gate=f"failed: {reason}", failed=True)
        self.store.event("model_gate_failed", f"{entry.name} failed: {reason}", {"model": entry.name})
        back = previous if previous is not None and previous.name != entry.name else None
        back = back or self.models.previous_good(exclude=entry.name)
        if self.models.active().name != back.name:
            self.models.set_active(back.name, gate=back.gate or "rolled back to")
        back = self.models.get(back.name) or back
        progress(f"{entry.name} failed its gate; going back to {back.name} ...")
        self._switch(back, trial=False)
        error = self.wait_settled(self.cfg.engine.load_timeout + 30) if wait else None
        message = f"model: {entry.name} failed its gate ({reason}); rolled back to {back.name}"
        if error:
            message += f" (which did not load: {error})"
        self.store.event("model_rolled_back", message, {"failed": entry.name, "active": back.name})
        self.last_change = message.removeprefix("model: ")
        log.warning("%s", message)
        return message

    def rollback(self, progress: Callable[[str], None]) -> str:
        """`/model rollback`: back to the model that was active before this one (the person's choice)."""
        current = self.preferred
        back = self.models.previous_good(exclude=current.name)
        if back.name == current.name:
            raise UserError("there is no earlier model to roll back to", "`/model` lists the installed models")
        return self.activate(back.name, progress)

    def boot_gate_failed(self, reason: str) -> bool:
        """The model that came up at boot failed its self-test. A store model is rolled back (True: the caller gates
        again); the built-in one has nowhere to go (False)."""
        entry = self.running or self.target
        if entry.builtin or self.fallback:
            return False
        self._rollback_failed(entry, reason, wait=False)  # the caller waits for the next ready engine itself
        return True
