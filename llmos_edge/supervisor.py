"""The supervisor: wires config, store, engine, keeper, governor, scheduler and the front-ends together, runs them
and shuts them down within SHUTDOWN_S.

The jobs live in their own modules: the engine's lifecycle in keeper.py, READY/WATCHDOG/STATUS and the self-test in
readiness.py, the snapshot every front-end renders in status.py. What stays here is the wiring, the governor's
actuators, the model commands and the order of start and stop.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from llmos_edge import __version__, factory_reset, update
from llmos_edge.config import Config, LoadedConfig, last_good_path, save_last_good
from llmos_edge.console import Console
from llmos_edge.consolidation import Consolidation, Recipe
from llmos_edge.control import ControlServer
from llmos_edge.engine import Engine, EngineSettings, default_threads, discard_prestarted
from llmos_edge.errors import UserError
from llmos_edge.governor import Actuators, Governor
from llmos_edge.keeper import Keeper, KeeperState
from llmos_edge.learning import SOURCES, Teaching
from llmos_edge.memory import TEMPLATE_RESERVE, Memory, prompt_cost
from llmos_edge.model_store import ModelStore
from llmos_edge.models import MIB, MIN_CONTEXT, GGUFInfo, estimate_memory
from llmos_edge.readiness import Readiness
from llmos_edge.sampler import Sampler
from llmos_edge.scheduler import Request, Result, Scheduler
from llmos_edge.sensors import thermal_zones
from llmos_edge.status import (
    EngineStatus,
    GovernorStatus,
    LastAnswer,
    MemoryStatus,
    ModelStatus,
    Status,
    StoreStatus,
)
from llmos_edge.status import summary as status_summary
from llmos_edge.store import Store
from llmos_edge.thermal import ThermalMode
from llmos_edge.voice import VOICE_MEMORY_MB, Voice  # voice (issue 6)
from llmos_edge.wear import WearMeter

if TYPE_CHECKING:
    from llmos_edge.http_api import HttpApi
    from llmos_edge.metrics import Metrics

log = logging.getLogger(__name__)

SHUTDOWN_S = 4.0  # the whole clean shutdown, inside the documented 5 s


class Supervisor:
    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.cfg: Config = loaded.config
        self.started = time.monotonic()
        self.stopping = threading.Event()
        self.stop_reason = ""  # SIGTERM, SIGINT, SIGHUP or Ctrl-D: recorded as the start's exit_reason
        c = self.cfg
        self.store = Store(
            c.database.path,
            keep_requests=c.database.keep_requests,
            keep_events=c.database.keep_events,
            keep_voice=c.database.keep_voice,
            keep_samples=c.database.keep_samples,
            samples_per_commit=round(c.database.sample_flush / c.database.sample_interval),
            samples_per_row=round(c.database.sample_row / c.database.sample_interval),
            request_flush=c.database.request_flush,
        )
        # learning (issue 15): taught pairs and conversation memory, both in the database
        self.teaching = Teaching(self.store, c.learning.max_pairs, c.learning.teach)
        self.memory = Memory(
            self.store,
            keep_turns=c.learning.keep_turns,
            keep_days=c.learning.keep_days,
            recall_turns=c.learning.recall_turns,
            recall_tokens=c.learning.recall_tokens,
            enabled=c.learning.memory,
        )
        self.memory.prune()  # the retention limits, at start (then every memory.PRUNE_EVERY turns)
        self.models = ModelStore(self.store, c.models.store, c.model.path)
        self.recovered = self.models.recover()
        self.engine = Engine(
            EngineSettings(model_path=c.model.path, n_ctx=c.model.context, n_threads=c.model.threads),
            load_timeout=c.engine.load_timeout,
            progress_timeout=c.engine.progress_timeout,
        )
        # governor (issue 4): thermal and memory budgets; it acts only through these actuators and admission.
        self.governor = Governor(
            c.governor,
            self.store,
            Actuators(
                set_limits=self._set_limits,
                stop_generation=self._stop_generation,
                unload=lambda reason: self.keeper.unload(reason),
                reload=lambda: self.keeper.reload(),
                worker_pid=lambda: self.engine.pid if self.keeper.ready.is_set() else None,
                busy=lambda: self.engine.busy,
            ),
            max_threads=c.model.threads or default_threads(),
        )
        self.keeper = Keeper(c, self.engine, self.store, self.models, self.governor, self.stopping)
        self.memory.model_takes = self._takes_conversations  # turns only for a model that can be given them
        self.readiness = Readiness(
            self.keeper,
            self.governor,
            self.models,
            self.store,
            self.engine,
            progress_timeout=c.engine.progress_timeout,
            stopping=self.stopping,
            started=self.started,
            summary=lambda: status_summary(self.status()),
        )
        # http (issue 13): counters fed by the scheduler as requests finish, gauges read from status() per scrape
        # Imported only when enabled: the HTTP stack (prometheus_client, http.server) costs boot time on a slow board.
        self.metrics: Metrics | None = None
        if c.http.enabled:
            from llmos_edge.metrics import Metrics

            self.metrics = Metrics(self.status)
        self.scheduler = Scheduler(
            self.engine,
            self.store,
            queue_size=c.scheduler.queue_size,
            aging_s=c.scheduler.aging,
            deadlines={"interactive": c.scheduler.deadline_interactive, "background": c.scheduler.deadline_background},
            wait_ready=self.keeper.ready.wait,
            temperature=c.model.temperature,
            seed=c.model.seed,
            memory_mb=self._engine_rss_mb,
            admit=self.governor.admit,  # governor (issue 4)
            unavailable=self.keeper.unavailable,
            observe=self._observe,
            prepare=self._prepare,
            also_record=self._turn_of,
        )
        self.keeper.submit = self.scheduler.submit
        # consolidation (issue 15, point 2): taught pairs into a new version of the built-in model, at idle
        self.consolidation = Consolidation(
            self.store,
            self.teaching,
            self.models,
            self.keeper,
            work_dir=Path(c.models.store).parent / "consolidation",
            master=c.learning.consolidate_master or c.model.path,
            baseline=c.model.path,
            quantization=lambda: self.models.active().quantization,
            idle=lambda: self.scheduler.idle,
            hot=self._too_hot_to_train,
            after=c.learning.consolidate_after,
            memory=self.governor.memory.room_for,  # the trainer and its validation engine beside ours
            shed=self.governor.memory.shedding,
            threads=c.learning.consolidate_threads,
            max_drop=c.learning.consolidate_max_drop,
            recipe=Recipe(
                steps=c.learning.consolidate_steps,
                batch=c.learning.consolidate_batch,
                window=c.learning.consolidate_window,
                rate=c.learning.consolidate_rate,
                heldout=c.learning.consolidate_heldout,
            ),
        )
        self.control: ControlServer | None = None
        if c.scheduler.control_socket != "none":
            self.control = ControlServer(
                c.scheduler.control_socket,
                self.scheduler,
                self.status,
                c.model.max_tokens,
                self.model_command,
                teaching=self.teaching,
                memory=self.memory,
            )
        # The console on console.device, and a second session on console.also (a USB serial gadget on a Pi 4)
        devices = [d for d in (c.console.device, c.console.also) if d not in ("", "none")]
        self.consoles = [
            Console(
                device,
                c.console.baud,
                c.console.max_line,
                c.console.echo,
                self.scheduler,
                self.status,
                self.log_lines,
                c.model.max_tokens,
                on_eof=(lambda: self._stop_by("Ctrl-D")) if device == "stdio" else None,
                model=self.model_command,
                loading=self.readiness.loading,
                teaching=self.teaching,
                memory=self.memory,
                request_reset=self.request_factory_reset,
                request_update=self.request_update,
                hotplug=device == c.console.also,
            )
            for device in devices
        ]
        self.http: HttpApi | None = None
        if self.metrics is not None:
            from llmos_edge import status_page
            from llmos_edge.http_api import HttpApi

            self.http = HttpApi(
                c.http,
                self.scheduler,
                self.status,
                self.metrics,
                max_tokens=c.model.max_tokens,
                page=lambda: status_page.render(self.status(), self.store, time.time()),
                teaching=self.teaching,
                memory=self.memory,
            )
        # the status page's history (issue 13): a sample every database.sample_interval seconds, a row every sample_row
        # flash wear (issue 14): bytes written to the database's partition, counted at the sampler's ticks
        self.wear = WearMeter(Path(c.database.path).parent)
        self.sampler = Sampler(self.store, self.status, c.database.sample_interval, self.wear)
        # voice (issue 6): when voice.capture can record, its models load beside the engine's before READY and it
        # listens from READY on; else /status says why
        self.voice = Voice(c.voice, self.scheduler, self.store, self.status, c.model.max_tokens)
        self.voice_at_boot = self.voice.will_run()  # probed once: run() loads voice's models before READY then
        if self.voice_at_boot:
            # The model's memory budget is set as the engine loads, beside voice: leave voice its room now.
            self.governor.memory.reserve_extra = VOICE_MEMORY_MB * MIB
            log.info("memory: %d MiB reserved for the voice front-end", VOICE_MEMORY_MB)

    # -- memory --------------------------------------------------------------------------------------------
    def _engine_rss(self) -> int:
        pid = self.engine.pid
        if pid is None or not self.engine.alive():
            return 0
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return 0

    def _engine_rss_mb(self) -> float:
        return round(self._engine_rss() / 2**20, 1)

    # -- governor actuators (issue 4) ----------------------------------------------------------------------
    def _set_limits(self, threads: int, duty: float) -> None:
        # Only to a loaded worker: bytes it has not read when it dies while loading (SIGILL) turn its EOF into a
        # connection reset. The governor sends the limits again when the new worker's pid appears.
        if self.keeper.ready.is_set():
            self.engine.set_limits(threads=threads, duty=duty)

    def _stop_generation(self, reason: str) -> None:
        current = self.scheduler.current
        if current is not None:
            log.warning("stopping request %d: %s", current.id, reason)
            current.cancel()

    # -- learning (issue 15) -------------------------------------------------------------------------------
    def _too_hot_to_train(self) -> bool:
        """Consolidation waits while the governor brakes generation: training would only heat the board more."""
        return self.governor.thermal.mode in (ThermalMode.THROTTLING, ThermalMode.CRITICAL, ThermalMode.COOLING)

    def _prepare(self, req: Request) -> str | None:
        """Before a request starts: its taught answer, if one is taught; else its conversation's relevant earlier
        turns go before it, within the room the context leaves (memory.py says how that is counted)."""
        if req.raw or req.source not in SOURCES:
            return None
        # None when learning.teach is false; learning.lookup false leaves the answer to the model's weights
        pair = self.teaching.lookup(req.prompt) if self.cfg.learning.lookup else None
        if pair is not None:
            req.taught_id = pair.id
            return pair.answer
        if self.memory.enabled and len(req.messages) <= 1 and self._takes_conversations():
            # (a chat that brings its own history keeps it as it is)
            n_ctx = self.engine.info.n_ctx or self.cfg.model.context
            room = n_ctx - req.max_tokens - prompt_cost(req.prompt) - TEMPLATE_RESERVE
            turns = self.memory.recall(req.source, req.prompt, room)
            if turns:
                req.recalled = tuple(t.id for t in turns)
                history = [
                    ({"role": "user", "content": t.question}, {"role": "assistant", "content": t.answer}) for t in turns
                ]
                req.messages = (*(m for pair_ in history for m in pair_), {"role": "user", "content": req.prompt})
        return None

    def _takes_conversations(self) -> bool:
        """Whether the running model is given a conversation: one with a chat template. Our own models take one
        question (llmos.prompt_template) and template-less ones raw text: recalled turns would be ignored, or garble
        the prompt, and cost prefill time."""
        meta = self.keeper.info.metadata if self.keeper.info is not None else {}
        return bool(meta.get("tokenizer.chat_template")) and not meta.get("llmos.prompt_template")

    def _turn_of(self, req: Request, result: Result) -> list[tuple[str, dict[str, Any]]]:
        """The conversation turn a finished request makes, written with its request row (one commit). Only while the
        running model takes conversations: another model could never be given the turn, and a stored turn costs the
        flash about 2.8 kB even committed in batches (its row, its FTS5 index: measured on ext4)."""
        if (
            self.memory.enabled
            and self.memory.model_takes()
            and req.source in SOURCES
            and not req.raw
            and result.outcome == "ok"  # a blank answer too: what the person said may matter later
        ):
            return [self.memory.turn_row(req.source, req.prompt, result.text, req.id)]
        return []

    def _observe(self, req: Request, result: Result) -> None:
        if self.metrics is not None:
            self.metrics.observe(req, result)
        self.memory.prune_when_due()

    # -- status --------------------------------------------------------------------------------------------
    def status(self) -> Status:
        """One snapshot of everything /status, STATUS= and the voice front-end report."""
        info, m, k = self.engine.info, self.keeper.info, self.keeper
        last = self.scheduler.last_stats
        vm = psutil.virtual_memory()
        g = self.governor
        return Status(
            state=self.readiness.shown_state(),
            reason=k.es.reason,
            serving=self.readiness.ready_sent and k.ready.is_set(),
            model_file=info.model or Path(self.cfg.model.path).name,
            model=None if m is None else ModelStatus(m.name, m.quantization, m.n_params, m.file_size, str(m.path)),
            store=StoreStatus(
                active=k.preferred.name,
                fallback=k.fallback,
                trial=bool(k.trial),
                installed=self.models.installed,
                directory=str(self.models.dir),
                last_change=k.last_change,
            ),
            engine=EngineStatus(info.pid, info.n_ctx, info.n_threads, info.cpu_backend) if info.pid else None,
            self_test=self.readiness.self_test,
            last=None if last is None else LastAnswer(last.tokens_out, last.decode_tok_s, last.ttft_s),
            memory=MemoryStatus(psutil.Process().memory_info().rss, self._engine_rss(), vm.available, vm.total),
            temperatures=tuple((z.type, z.celsius) for z in thermal_zones(self.cfg.governor.sensors_root)),
            governor=GovernorStatus(  # governor (issue 4): thermal control, memory budget, machine
                enabled=self.cfg.governor.enabled,
                celsius=g.thermal.celsius,
                setpoint=self.cfg.governor.setpoint,
                mode=g.thermal.mode.value,
                share=g.thermal.limits.share,
                budget=g.memory.budget,
                lines=tuple(g.status_lines()),
                summary=g.status_summary(),
            ),
            voice=self.voice.status_line(),  # voice (issue 6)
            uptime_s=time.monotonic() - self.started,
            restarts=k.restarts,
            queue=self.scheduler.depth(),
            config_sources=tuple(self.loaded.sources),
            config_fallback=self.loaded.fallback,
            database=str(self.store.path),
            database_pending=self.store.pending,
            database_degraded=self.store.degraded,
            database_ring=self.store.ring_line(),
            learning=self._learning_line(),
            flash=self.wear.line(),
            idle=self.scheduler.idle,
            system=update.system_line(),
        )

    def _learning_line(self) -> str:
        try:
            pairs = self.teaching.count()
            turns = sum(self.memory.counts().values())
        except sqlite3.Error as e:  # a status that cannot count still renders
            return f"learning: cannot read the database ({e})"
        teach = f"{pairs} taught pairs" + ("" if self.teaching.enabled else " (off: learning.teach)")
        if self.teaching.enabled and not self.cfg.learning.lookup:
            teach += " (not looked up: learning.lookup)"  # every answer comes from the model's weights
        memory = f"{turns} turns remembered" + ("" if self.memory.enabled else " (off: learning.memory)")
        return f"learning: {teach} (/taught); {memory} (/memory); {self.consolidation.status_line()}"

    def model_command(self, args: str, progress: Callable[[str], None]) -> list[str]:
        """`/model ...` on the console, `llmos model ...` through the control socket. Raises UserError."""
        action, _, arg = args.strip().partition(" ")
        arg = arg.strip()
        if action in ("", "list"):
            return [e.describe() for e in self.models.entries()]
        if action == "install":
            if not arg:
                raise UserError("install needs a path", "e.g. /model install /media/MODELS/model.gguf")
            entry, _new = self.models.install(arg, self._install_preflight, progress)
            progress(f"installed {entry.name} ({entry.architecture}, {entry.quantization}); activating ...")
            return [self.keeper.activate(entry.name, progress)]
        if action == "activate":
            if not arg:
                raise UserError("activate needs a model name", "`/model` lists the installed models")
            return [self.keeper.activate(arg, progress)]
        if action == "rollback":
            return [self.keeper.rollback(progress)]
        if action == "consolidate":  # /consolidate, llmos consolidate: taught pairs into the weights (issue 15)
            return [self.consolidation.status_line() if arg == "status" else self.consolidation.request()]
        if action == "remove":
            if not arg:
                raise UserError("remove needs a model name", "`/model` lists the installed models")
            e = self.models.remove(arg)
            return [f"model: removed {e.name}"]
        raise UserError(
            f"unknown model command {action!r}",
            "use list, install PATH, activate NAME, rollback, remove NAME, consolidate [status]",
        )

    def _install_preflight(self, info: GGUFInfo) -> None:
        """A model that could never fit this device's memory budget is refused before it is copied."""
        if not self.governor.memory.fits_ever(info):
            ceiling = self.governor.memory.ceiling()
            est = estimate_memory(info, MIN_CONTEXT)
            raise UserError(
                f"{info.path.name} needs {est.total / MIB:.0f} MiB even at context {MIN_CONTEXT}, more than this "
                f"device's {ceiling / MIB:.0f} MiB budget",
                "use a smaller quantization (Q4_K_M) or a smaller model",
            )

    def request_factory_reset(self) -> str:
        """`/factory-reset`, confirmed: write the request (factory_reset.py); on the device a root unit arms it and
        reboots. Raises UserError."""
        path = factory_reset.request(self.cfg.database.path, "console")
        self.store.event("factory_reset_requested", f"request {path}")
        log.warning("factory reset requested on the console (%s)", path)
        return "factory reset requested: the device restarts now and erases /var as it boots"

    def request_update(self, bundle_dir: str) -> str:
        """`/update PATH`: write the request (update.py); on the device a root unit verifies and installs the bundle,
        then reboots once no request is being answered. Raises UserError."""
        path = update.request(self.cfg.database.path, bundle_dir)
        self.store.event("update_requested", f"bundle {bundle_dir.strip()}, request {path}")
        log.warning("update requested on the console from %s", bundle_dir.strip())
        return (
            f"update requested from {bundle_dir.strip()}: it is verified and installed into the other slot, then the "
            "device restarts into it (the previous version comes back by itself if the new one does not work)"
        )

    def log_lines(self, n: int) -> list[str]:
        return [format_request(r) for r in self.store.recent_requests(n)]

    # -- lifecycle -----------------------------------------------------------------------------------------
    def _stop_by(self, why: str) -> None:
        if not self.stop_reason:
            self.stop_reason = why
        self.stopping.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: self._stop_by(signal.Signals(signum).name))
        self.store.record_start(
            version=__version__,
            config_sources=", ".join(self.loaded.sources),
            config_fallback=self.loaded.fallback,
            model=self.cfg.model.path,
        )
        if self.loaded.fallback:
            log.error("config fallback: %s", self.loaded.fallback)
            self.store.event("config_fallback", self.loaded.fallback)
        if self.store.recovered_from:
            self.store.event("database_recovered", f"corrupt database moved to {self.store.recovered_from}")
        if self.store.replayed:
            self.store.event(
                "ring_replayed",
                f"{self.store.replayed} answered requests' rows taken from the request ring (an unclean stop)",
                {"records": self.store.replayed},
            )
        for message in self.recovered:
            self.store.event("model_store_recovered", message)
        self.keeper.start()
        if self.voice_at_boot:
            # voice (issue 6): its models load now, beside the engine's, and READY waits for them (Voice.load says why)
            loading = threading.Thread(target=self.voice.load, name="voice-load", daemon=True)
            loading.start()
            self.readiness.before_ready.append(loading)
        self.scheduler.start()
        self.governor.start()  # governor (issue 4)
        self.readiness.watch.add("engine-keeper", self.keeper.alive)
        self.readiness.watch.add("scheduler", self.scheduler.alive)
        self.readiness.watch.add("governor", self.governor.alive, self.governor.restart)
        self.readiness.watch.add("voice", self.voice.alive, self.voice.restart)
        self.sampler.start()
        self.readiness.watch.add("sampler", self.sampler.alive, self.sampler.restart)
        self.consolidation.start()
        for n, console in enumerate(self.consoles):
            console.start()
            self.readiness.watch.add("console" if n == 0 else f"console {console.device}", console.alive,
                                     console.restart)  # fmt: skip
        if self.http is not None:
            try:
                self.http.start()
                self.readiness.watch.add("http", self.http.alive, self.http.restart)
            except UserError as e:
                log.error("%s", e)
                self.store.event("http_failed", str(e))
                self.http = None
        if self.control is not None:
            try:
                self.control.start()
                self.readiness.watch.add("control", self.control.alive, self.control.restart)
            except UserError as e:
                log.error("%s", e)
                self.store.event("control_socket_failed", str(e))
                self.control = None
        self.readiness.wait_until_steady()
        if self.readiness.ready_sent and not self.loaded.fallback and self.keeper.es.state is KeeperState.READY:
            # This configuration ran: it is what a broken edit falls back to from now on.
            try:
                save_last_good(self.cfg, last_good_path(self.cfg.database.path))
            except UserError as e:
                log.warning("%s", e)
        if not self.stopping.is_set():
            # voice (issue 6): starting it probes the microphone again (one plugged in later starts it then); the
            # watchdog loop must not wait for that.
            threading.Thread(target=self.voice.start_when_present, name="voice-start", daemon=True).start()
        self.readiness.keep_alive()
        return self.shutdown()

    def shutdown(self) -> int:
        """Within SHUTDOWN_S in all (docs/console.md promises 5 s; TimeoutStopSec has a margin over it): each step gets
        what is left of the budget, and the engine is killed rather than waited for."""
        t0 = time.monotonic()
        deadline = t0 + SHUTDOWN_S

        def left(most: float) -> float:
            return max(0.05, min(most, deadline - time.monotonic()))

        self.readiness.stopping_now()
        log.info("shutting down (%s)", self.stop_reason or "SIGTERM")
        self.scheduler.cancel_all()  # the answer being generated stops at its next token
        for console in self.consoles:
            console.announce_shutdown()
        flushed = time.monotonic() + left(0.5)  # the consoles' half seconds run side by side, not one after another
        for console in self.consoles:
            console.flush(max(0.05, flushed - time.monotonic()))
        stopped = time.monotonic() + left(0.5)
        for console in self.consoles:
            console.stop(max(0.05, stopped - time.monotonic()))
        if self.control is not None:
            self.control.stop()
        if self.http is not None:
            self.http.stop()
        self.governor.stop(left(0.5))  # governor (issue 4)
        self.sampler.stop(left(0.5))
        self.voice.stop()  # voice (issue 6)
        self.consolidation.stop()  # a run in progress is killed; the next start begins it again
        self.scheduler.stop(timeout=left(1.0))
        self.engine.stop(timeout=left(1.0))
        discard_prestarted()  # a worker prestarted for a model that never loaded
        self.store.event("stop", f"clean shutdown in {time.monotonic() - t0:.2f} s ({self.stop_reason or 'SIGTERM'})")
        self.store.record_stop(self.stop_reason or "SIGTERM")
        self.store.close()
        return 0


def format_request(r: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.get("created_at") or 0))
    answer = (r.get("answer") or r.get("error") or "").replace("\n", " ")
    prompt = (r.get("prompt") or "").replace("\n", " ")
    return (
        f"#{r['id']} {when} {r.get('source', '')} {r.get('outcome', '')} {r.get('tokens_out') or 0} tok "
        f"{r.get('tok_s') or 0:.0f} tok/s  {prompt[:60]!r} -> {answer[:60]!r}"
    )
