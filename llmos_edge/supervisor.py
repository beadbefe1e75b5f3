"""The supervisor: wires config, store, engine, scheduler and console together and keeps them running.

It tells systemd READY=1 once it has reached a steady state: the model answered its self-test (serving), or the
model cannot be used for a reason a person must fix (degraded: the console still answers /status with the reason
instead of the service restarting in a loop). A board that boots above its critical temperature waits to cool
before the self-test, asking systemd for more time (EXTEND_TIMEOUT_USEC) meanwhile. WATCHDOG=1 is sent only while
the supervisor's threads are alive and the engine is idle or making progress; STATUS= is a one-line summary.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import sdnotify

from llmos_edge import __version__
from llmos_edge.config import Config, LoadedConfig, last_good_path, save_last_good
from llmos_edge.console import Console
from llmos_edge.control import ControlServer
from llmos_edge.engine import Engine, EngineSettings, default_threads
from llmos_edge.errors import UserError
from llmos_edge.governor import Actuators, Governor
from llmos_edge.keeper import EngineState, Keeper, KeeperState
from llmos_edge.model_store import ModelStore
from llmos_edge.models import MIB, MIN_CONTEXT, GGUFInfo, estimate_memory
from llmos_edge.readiness import ThreadWatch, watchdog_interval
from llmos_edge.scheduler import Scheduler
from llmos_edge.sensors import thermal_zones
from llmos_edge.store import Store
from llmos_edge.voice import VOICE_MEMORY_MB, Voice  # voice (issue 6)

log = logging.getLogger(__name__)

HOT_BOOT_EXTEND_S = 30  # while booting hot, each EXTEND_TIMEOUT_USEC gives systemd this much more patience
SHUTDOWN_S = 4.0  # the whole clean shutdown, inside the documented 5 s


def _fmt_duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class Supervisor:
    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.cfg: Config = loaded.config
        self.started = time.monotonic()
        self.notifier = sdnotify.SystemdNotifier()
        self.stopping = threading.Event()
        self.ready_sent = False
        self.self_test = "not run"
        self.stop_reason = ""  # SIGTERM, SIGINT, SIGHUP or Ctrl-D: recorded as the start's exit_reason
        c = self.cfg
        self.store = Store(
            c.database.path,
            keep_requests=c.database.keep_requests,
            keep_events=c.database.keep_events,
            keep_voice=c.database.keep_voice,
        )
        self.watch = ThreadWatch(self.store)
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
        )
        self.keeper.submit = self.scheduler.submit
        self.control: ControlServer | None = None
        if c.scheduler.control_socket != "none":
            self.control = ControlServer(
                c.scheduler.control_socket, self.scheduler, self.status_lines, c.model.max_tokens, self.model_command
            )
        self.console: Console | None = None
        if c.console.device != "none":
            self.console = Console(
                c.console.device,
                c.console.baud,
                c.console.max_line,
                c.console.echo,
                self.scheduler,
                self.status_lines,
                self.log_lines,
                c.model.max_tokens,
                on_eof=(lambda: self._stop_by("Ctrl-D")) if c.console.device == "stdio" else None,
                model=self.model_command,
                loading=self.loading,
            )
        # voice (issue 6): starts after READY when voice.capture can record; else /status says why
        self.voice = Voice(c.voice, self.scheduler, self.store, self.status_lines, c.model.max_tokens)
        if self.voice.will_run():
            # The model's memory budget is set before voice starts (after READY): leave voice its room now.
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

    # -- self-test and readiness ---------------------------------------------------------------------------
    def _wait_until_steady(self) -> None:
        """Block until serving (the model that came up passed its gate) or settled in a state a person must fix;
        then READY=1. A store model that fails its gate at boot is rolled back and the previous one gated."""
        said_hot = False
        while not self.stopping.is_set():
            if self.keeper.ready.wait(0.2):
                if self.governor.thermal.mode.refuses:
                    # Booted hot (a closed case in the sun): the self-test would only be refused. Wait for the
                    # board to cool, telling systemd we are still starting so it does not kill us for being slow;
                    # the console already answers, with the reason.
                    if not said_hot:
                        said_hot = True
                        self.self_test = "waiting for the board to cool"
                        log.warning("self-test waits: %s", self.governor.thermal.refusal())
                        self.store.event("self_test_waiting", self.governor.thermal.refusal())
                    self.notifier.notify(f"EXTEND_TIMEOUT_USEC={HOT_BOOT_EXTEND_S * 1_000_000}")
                    self._notify_status()
                    self.stopping.wait(1.0)
                    continue
                entry = self.keeper.running
                if entry is None:
                    continue
                ok, result = self.keeper.gate(entry)
                self.self_test = result if ok else f"failed: {result}"
                if ok:
                    self.models.mark(entry.name, good=True, gate=result)
                    self.store.event("ready", f"self-test {self.self_test}", {"model": entry.name})
                    break
                self.store.event("self_test_failed", self.self_test, {"model": entry.name})
                if self.keeper.boot_gate_failed(result):
                    continue  # rolled back to the last good model: gate that one
                self.keeper.es = EngineState(KeeperState.DEGRADED, f"self-test {self.self_test}")
                break
            if self.keeper.es.state is KeeperState.FAILED:
                break
            self._notify_status()
        if not self.stopping.is_set():
            self.notifier.notify("READY=1")
            self.ready_sent = True
            log.info("ready: %s", self.status_line())
            if not self.loaded.fallback and self.keeper.es.state is KeeperState.READY:
                # This configuration ran: it is what a broken edit falls back to from now on.
                try:
                    save_last_good(self.cfg, last_good_path(self.cfg.database.path))
                except UserError as e:
                    log.warning("%s", e)

    # -- status --------------------------------------------------------------------------------------------
    def _shown_state(self) -> KeeperState:
        # The engine is up before the self-test has answered: not ready for people yet.
        state = self.keeper.es.state
        return KeeperState.STARTING if state is KeeperState.READY and not self.ready_sent else state

    def status_line(self) -> str:
        info = self.engine.info
        last = self.scheduler.last_stats
        speed = f"{last.decode_tok_s:.0f} tok/s" if last and last.decode_tok_s else "- tok/s"
        mem = f"mem {_mib(self._engine_rss() + psutil.Process().memory_info().rss)}"
        depth = sum(self.scheduler.depth().values())
        state = self._shown_state()
        reason = self.keeper.es.reason
        head = state if not reason else f"{state}: {reason}"
        return (
            f"{head} | {info.model or Path(self.cfg.model.path).name} | {speed} | {mem} | "
            f"up {_fmt_duration(time.monotonic() - self.started)} | restarts {self.keeper.restarts} | queue {depth} | "
            f"{self.governor.status_summary()}"  # governor (issue 4): temperature vs setpoint, memory vs budget
        )

    def status_lines(self) -> list[str]:
        info, m = self.engine.info, self.keeper.info
        vm = psutil.virtual_memory()
        last = self.scheduler.last_stats
        reason = self.keeper.es.reason
        lines = [f"state: {self._shown_state()}" + (f" ({reason})" if reason else "")]
        if m is not None:
            lines.append(
                f"model: {m.name} ({m.quantization}, {m.n_params / 1e6:.2f}M params, {_mib(m.file_size)}) {m.path}"
            )
        lines.append(self._models_line())
        if info.pid:
            lines.append(f"engine: pid {info.pid}, ctx {info.n_ctx}, {info.n_threads} threads, cpu {info.cpu_backend}")
        lines.append(f"self-test: {self.self_test}")
        if last is not None:
            lines.append(
                f"last answer: {last.tokens_out} tokens, {last.decode_tok_s:.1f} tok/s, "
                f"first token {last.ttft_s * 1000:.1f} ms"
            )
        else:
            lines.append("last answer: none yet")
        lines.append(
            f"memory: supervisor {_mib(psutil.Process().memory_info().rss)}, engine "
            f"{_mib(self._engine_rss())}; available {_mib(vm.available)} of {_mib(vm.total)}"
        )
        zones = thermal_zones(self.cfg.governor.sensors_root)
        lines.append(
            "temperature: "
            + (", ".join(f"{z.type} {z.celsius:.1f} C" for z in zones) if zones else "no thermal sensor")
        )
        lines += self.governor.status_lines()  # governor (issue 4): thermal control, memory budget, machine
        lines.append(self.voice.status_line())  # voice (issue 6)
        lines.append(
            f"uptime: {_fmt_duration(time.monotonic() - self.started)}; engine restarts: {self.keeper.restarts}"
        )
        depth = self.scheduler.depth()
        lines.append("queue: " + ", ".join(f"{k} {v}" for k, v in depth.items()))
        cfg = ", ".join(self.loaded.sources)
        lines.append(f"config: {cfg}" + (f" (FALLBACK: {self.loaded.fallback})" if self.loaded.fallback else ""))
        lines.append(
            f"database: {self.store.path}"
            + (f" ({self.store.pending} rows waiting for disk space)" if self.store.pending else "")
            + (f" (degraded: {self.store.degraded})" if self.store.degraded else "")
        )
        return lines

    def _models_line(self) -> str:
        k = self.keeper
        installed = self.models.installed
        line = f"models: active {k.preferred.name}"
        if k.fallback:
            line += f"; FALLBACK {k.fallback}"
        elif k.trial:
            line += " (trying it: gate running)"
        line += f"; {installed} installed in {self.models.dir} (`/model` lists them)"
        return line + (f"; last change: {k.last_change}" if k.last_change else "")

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
        if action == "remove":
            if not arg:
                raise UserError("remove needs a model name", "`/model` lists the installed models")
            e = self.models.remove(arg)
            return [f"model: removed {e.name}"]
        raise UserError(
            f"unknown model command {action!r}", "use list, install PATH, activate NAME, rollback, remove NAME"
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

    def log_lines(self, n: int) -> list[str]:
        return [format_request(r) for r in self.store.recent_requests(n)]

    def _notify_status(self) -> None:
        self.notifier.notify(f"STATUS={self.status_line()}")

    def _healthy(self) -> bool:
        dead = self.watch.check()
        if dead:
            log.error("not healthy: the %s thread(s) are dead", ", ".join(dead))
            return False
        if self.engine.busy:
            return time.monotonic() - self.engine.last_progress < self.cfg.engine.progress_timeout
        return True

    def loading(self) -> str:
        """For the console's banner and prompt: what is loading and for how long; "" once a model answers."""
        if self.ready_sent and self.keeper.ready.is_set():
            return ""
        k = self.keeper
        since = time.monotonic() - self.started
        if k.es.state in (KeeperState.FAILED, KeeperState.DEGRADED) and not k.ready.is_set():
            return f"{k.es.state.value}: {k.es.reason} (see /status)"
        what = k.es.reason or f"loading {k.target.name}"
        if k.ready.is_set() and not self.ready_sent:
            what = f"{k.target.name} loaded, self-test running"
        return f"{what}, {since:.0f} s"

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
        for message in self.recovered:
            self.store.event("model_store_recovered", message)
        self.keeper.start()
        self.scheduler.start()
        self.governor.start()  # governor (issue 4)
        self.watch.add("engine-keeper", self.keeper.alive)
        self.watch.add("scheduler", self.scheduler.alive)
        self.watch.add("governor", self.governor.alive, self.governor.restart)
        self.watch.add("voice", self.voice.alive, self.voice.restart)
        if self.console is not None:
            self.console.start()
            self.watch.add("console", self.console.alive, self.console.restart)
        if self.control is not None:
            try:
                self.control.start()
                self.watch.add("control", self.control.alive, self.control.restart)
            except UserError as e:
                log.error("%s", e)
                self.store.event("control_socket_failed", str(e))
                self.control = None
        self._wait_until_steady()
        if not self.stopping.is_set():
            # voice (issue 6): loading its models takes seconds on a slow board; the watchdog loop must not wait.
            threading.Thread(target=self.voice.start_when_present, name="voice-start", daemon=True).start()
        interval = watchdog_interval()
        last_ping = 0.0
        while not self.stopping.wait(0.5):
            now = time.monotonic()
            if now - last_ping >= interval:
                if self._healthy():
                    self.notifier.notify("WATCHDOG=1")
                else:
                    log.error("not healthy: withholding the watchdog ping")
                self._notify_status()
                last_ping = now
        return self.shutdown()

    def shutdown(self) -> int:
        """Within SHUTDOWN_S in all (docs/console.md promises 5 s; TimeoutStopSec has a margin over it): each step gets
        what is left of the budget, and the engine is killed rather than waited for."""
        t0 = time.monotonic()
        deadline = t0 + SHUTDOWN_S

        def left(most: float) -> float:
            return max(0.05, min(most, deadline - time.monotonic()))

        self.notifier.notify("STOPPING=1")
        log.info("shutting down (%s)", self.stop_reason or "SIGTERM")
        self.scheduler.cancel_all()  # the answer being generated stops at its next token
        if self.console is not None:
            self.console.write("\n[llmos-edge is shutting down]\n")
            self.console.flush(left(0.5))
            self.console.stop(left(0.5))
        if self.control is not None:
            self.control.stop()
        self.governor.stop(left(0.5))  # governor (issue 4)
        self.voice.stop()  # voice (issue 6)
        self.scheduler.stop(timeout=left(1.0))
        self.engine.stop(timeout=left(1.0))
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
