"""The supervisor: wires config, store, engine, scheduler and console together and keeps them running.

It tells systemd READY=1 once it has reached a steady state: the model answered its self-test (serving), or the
model cannot be used for a reason a person must fix (degraded: the console still answers /status with the reason
instead of the service restarting in a loop). A board that boots above its critical temperature waits to cool
before the self-test, asking systemd for more time (EXTEND_TIMEOUT_USEC) meanwhile. WATCHDOG=1 is sent only while
the supervisor's threads are alive and the engine is idle or making progress; STATUS= is a one-line summary.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import sdnotify

from llmos_edge import __version__
from llmos_edge.config import Config, LoadedConfig
from llmos_edge.console import Console
from llmos_edge.control import ControlServer
from llmos_edge.engine import Engine, EngineError, EngineSettings, default_threads
from llmos_edge.errors import UserError
from llmos_edge.governor import Actuators, Governor
from llmos_edge.models import MIB, GGUFInfo, read_gguf
from llmos_edge.scheduler import Request, Scheduler
from llmos_edge.sensors import thermal_zones
from llmos_edge.store import Store
from llmos_edge.voice import VOICE_MEMORY_MB, Voice  # voice (issue 6)

log = logging.getLogger(__name__)

CRASH_LOOP = (5, 60.0)  # this many restarts within this many seconds is a crash loop
STABLE_AFTER = 60.0  # seconds of uptime after which the restart backoff starts over
HOT_BOOT_EXTEND_S = 30  # while booting hot, each EXTEND_TIMEOUT_USEC gives systemd this much more patience


@dataclass
class EngineState:
    state: str = "starting"  # starting | ready | restarting | failed | degraded
    reason: str = ""


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
        self.restarts = 0
        self._restart_times: deque[float] = deque(maxlen=CRASH_LOOP[0])
        self.es = EngineState()
        self.model: GGUFInfo | None = None
        self.self_test = "not run"
        self.engine_ready = threading.Event()
        c = self.cfg
        self.store = Store(c.database.path, keep_requests=c.database.keep_requests)
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
                unload=self._unload,
                reload=self._reload,
                worker_pid=lambda: self.engine.pid if self.engine_ready.is_set() else None,
                busy=lambda: self.engine.busy,
            ),
            max_threads=c.model.threads or default_threads(),
        )
        self.scheduler = Scheduler(
            self.engine,
            self.store,
            queue_size=c.scheduler.queue_size,
            aging_s=c.scheduler.aging,
            deadlines={"interactive": c.scheduler.deadline_interactive, "background": c.scheduler.deadline_background},
            wait_ready=self.engine_ready.wait,
            temperature=c.model.temperature,
            seed=c.model.seed,
            memory_mb=self._engine_rss_mb,
            admit=self.governor.admit,  # governor (issue 4)
        )
        self.control: ControlServer | None = None
        if c.scheduler.control_socket != "none":
            self.control = ControlServer(
                c.scheduler.control_socket, self.scheduler, self.status_lines, c.model.max_tokens
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
                on_eof=self.stopping.set if c.console.device == "stdio" else None,
            )
        # voice (issue 6): starts after READY when voice.capture can record; else /status says why
        self.voice = Voice(c.voice, self.scheduler, self.store, self.status_lines, c.model.max_tokens)
        if self.voice.will_run():
            # The model's memory budget is set before voice starts (after READY): leave voice its room now.
            self.governor.reserve_extra = VOICE_MEMORY_MB * MIB
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

    # -- engine keeper -------------------------------------------------------------------------------------
    def _keep_engine(self) -> None:
        backoff = 0.2
        model_stamp: tuple[float, int] | None = None
        while not self.stopping.is_set():
            if self.engine.alive():
                if time.monotonic() - self.engine.last_progress > STABLE_AFTER and not self.engine.busy:
                    backoff = 0.2
                self.stopping.wait(0.1)
                continue
            if self.es.state == "unloaded":  # governor (issue 4): held stopped until memory is calm
                self.stopping.wait(0.2)
                continue
            if self.es.state == "ready":  # it was serving and died
                self.engine_ready.clear()
                why = self.engine.exit_description()
                self.restarts += 1
                self._restart_times.append(time.monotonic())
                loop = (
                    len(self._restart_times) == CRASH_LOOP[0]
                    and self._restart_times[-1] - self._restart_times[0] < CRASH_LOOP[1]
                )
                if loop:
                    backoff = self.cfg.engine.restart_backoff_max
                    self.es = EngineState(
                        "degraded",
                        f"crash loop: {CRASH_LOOP[0]} restarts within {CRASH_LOOP[1]:.0f} s; last: engine {why}",
                    )
                else:
                    self.es = EngineState("restarting", f"engine {why}")
                self.store.event(
                    "engine_restart",
                    f"engine {why}; restarting in {backoff:.1f} s",
                    {"restarts": self.restarts, "crash_loop": loop},
                )
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, self.cfg.engine.restart_backoff_max)
                if self.stopping.is_set():
                    return
            elif self.es.state == "failed" and model_stamp is not None:
                # A person must fix the model file: check again when it changes, not in a tight loop.
                if self._model_stamp() == model_stamp:
                    self.stopping.wait(2)
                    continue
            try:
                self.model = read_gguf(self.cfg.model.path)
                # governor (issue 4): the largest context that fits the memory budget, or a one-sentence refusal
                n_ctx = self.governor.preflight(self.model, self.cfg.model.context)
                self.engine.settings = replace(self.engine.settings, n_ctx=n_ctx)
                info = self.engine.start()
            except UserError as e:
                model_stamp = self._model_stamp()
                self._fail(str(e))
                continue
            except EngineError as e:
                model_stamp = self._model_stamp()
                self._fail(f"{e}")
                continue
            model_stamp = None
            self.es = EngineState("ready")
            self.engine_ready.set()
            self.store.event(
                "engine_loaded",
                f"{info.model} loaded in pid {info.pid}",
                {"cpu_backend": info.cpu_backend, "threads": info.n_threads, "n_ctx": info.n_ctx},
            )

    # -- governor actuators (issue 4) ----------------------------------------------------------------------
    def _set_limits(self, threads: int, duty: float) -> None:
        # Only to a loaded worker: bytes it has not read when it dies while loading (SIGILL) turn its EOF into a
        # connection reset. The governor sends the limits again when the new worker's pid appears.
        if self.engine_ready.is_set():
            self.engine.set_limits(threads=threads, duty=duty)

    def _stop_generation(self, reason: str) -> None:
        current = self.scheduler.current
        if current is not None:
            log.warning("stopping request %d: %s", current.id, reason)
            current.cancel()

    def _unload(self, reason: str) -> None:
        self.es = EngineState("unloaded", reason)  # first, so the keeper holds it stopped instead of restarting
        self.engine_ready.clear()
        self.engine.stop()

    def _reload(self) -> None:
        if self.es.state == "unloaded":
            self.es = EngineState("starting", "reloading: memory is calm again")

    def _model_stamp(self) -> tuple[float, int]:
        try:
            st = Path(self.cfg.model.path).stat()
            return (st.st_mtime, st.st_size)
        except OSError:
            return (0.0, 0)

    def _fail(self, reason: str) -> None:
        if self.es.reason != reason:
            log.error("model unavailable: %s", reason)
            self.store.event("model_failed", reason)
        self.es = EngineState("failed", reason)
        self.engine_ready.clear()

    # -- self-test and readiness ---------------------------------------------------------------------------
    def _self_test(self) -> bool:
        test = self.engine.info.self_test
        prompt, expected = (test["prompt"], test["answer"]) if test else ("Hello", "")
        req = self.scheduler.submit(Request(prompt=prompt, source="self-test", max_tokens=32))
        result = req.wait(self.cfg.engine.load_timeout)
        if result is None or result.outcome != "ok":
            self.self_test = f"failed: {result.error if result else 'no answer in time'}"
        elif expected and result.text.strip() != expected:
            self.self_test = f"failed: expected {expected!r}, got {result.text.strip()!r}"
        elif not expected and not result.text:
            self.self_test = "failed: the model produced no text"
        else:
            self.self_test = f"passed ({prompt!r} -> {result.text.strip()!r})"
            return True
        return False

    def _wait_until_steady(self) -> None:
        """Block until serving (self-test passed) or failed for a reason a person must fix; then READY=1."""
        said_hot = False
        while not self.stopping.is_set():
            if self.engine_ready.wait(0.2):
                if self.governor.thermal in ("critical", "cooling"):
                    # Booted hot (a closed case in the sun): the self-test would only be refused. Wait for the
                    # board to cool, telling systemd we are still starting so it does not kill us for being slow;
                    # the console already answers, with the reason.
                    if not said_hot:
                        said_hot = True
                        self.self_test = "waiting for the board to cool"
                        log.warning("self-test waits: %s", self.governor.refusal_thermal())
                        self.store.event("self_test_waiting", self.governor.refusal_thermal())
                    self.notifier.notify(f"EXTEND_TIMEOUT_USEC={HOT_BOOT_EXTEND_S * 1_000_000}")
                    self._notify_status()
                    self.stopping.wait(1.0)
                    continue
                if self._self_test():
                    self.store.event("ready", f"self-test {self.self_test}")
                    break
                self.es = EngineState("degraded", f"self-test {self.self_test}")
                self.store.event("self_test_failed", self.self_test)
                break
            if self.es.state == "failed":
                break
            self._notify_status()
        if not self.stopping.is_set():
            self.notifier.notify("READY=1")
            self.ready_sent = True
            log.info("ready: %s", self.status_line())

    # -- status --------------------------------------------------------------------------------------------
    def _shown_state(self) -> str:
        # The engine is up before the self-test has answered: not ready for people yet.
        return "starting" if self.es.state == "ready" and not self.ready_sent else self.es.state

    def status_line(self) -> str:
        info = self.engine.info
        last = self.scheduler.last_stats
        speed = f"{last.decode_tok_s:.0f} tok/s" if last and last.decode_tok_s else "- tok/s"
        mem = f"mem {_mib(self._engine_rss() + psutil.Process().memory_info().rss)}"
        depth = sum(self.scheduler.depth().values())
        state = self._shown_state()
        head = state if not self.es.reason else f"{state}: {self.es.reason}"
        return (
            f"{head} | {info.model or Path(self.cfg.model.path).name} | {speed} | {mem} | "
            f"up {_fmt_duration(time.monotonic() - self.started)} | restarts {self.restarts} | queue {depth} | "
            f"{self.governor.status_summary()}"  # governor (issue 4): temperature vs setpoint, memory vs budget
        )

    def status_lines(self) -> list[str]:
        info, m = self.engine.info, self.model
        vm = psutil.virtual_memory()
        last = self.scheduler.last_stats
        lines = [f"state: {self._shown_state()}" + (f" ({self.es.reason})" if self.es.reason else "")]
        if m is not None:
            lines.append(
                f"model: {m.name} ({m.quantization}, {m.n_params / 1e6:.2f}M params, {_mib(m.file_size)}) {m.path}"
            )
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
        lines.append(f"uptime: {_fmt_duration(time.monotonic() - self.started)}; engine restarts: {self.restarts}")
        depth = self.scheduler.depth()
        lines.append("queue: " + ", ".join(f"{k} {v}" for k, v in depth.items()))
        cfg = ", ".join(self.loaded.sources)
        lines.append(f"config: {cfg}" + (f" (FALLBACK: {self.loaded.fallback})" if self.loaded.fallback else ""))
        lines.append(
            f"database: {self.store.path}"
            + (f" ({self.store.pending} rows waiting for disk space)" if self.store.pending else "")
        )
        return lines

    def log_lines(self, n: int) -> list[str]:
        return [format_request(r) for r in self.store.recent_requests(n)]

    def _notify_status(self) -> None:
        self.notifier.notify(f"STATUS={self.status_line()}")

    def _healthy(self) -> bool:
        threads_ok = self._keeper.is_alive() and self.scheduler.alive()
        if self.engine.busy:
            return threads_ok and time.monotonic() - self.engine.last_progress < self.cfg.engine.progress_timeout
        return threads_ok

    # -- lifecycle -----------------------------------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stopping.set())
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
        self._keeper = threading.Thread(target=self._keep_engine, name="engine-keeper", daemon=True)
        self._keeper.start()
        self.scheduler.start()
        self.governor.start()  # governor (issue 4)
        if self.console is not None:
            self.console.start()
        if self.control is not None:
            try:
                self.control.start()
            except UserError as e:
                log.error("%s", e)
                self.store.event("control_socket_failed", str(e))
                self.control = None
        self._wait_until_steady()
        if not self.stopping.is_set():
            # voice (issue 6): loading its models takes seconds on a slow board; the watchdog loop must not wait.
            threading.Thread(target=self.voice.start_when_present, name="voice-start", daemon=True).start()
        interval = _watchdog_interval()
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
        t0 = time.monotonic()
        self.notifier.notify("STOPPING=1")
        log.info("shutting down")
        if self.console is not None:
            self.console.write("\n[llmos-edge is shutting down]\n")
            self.console.stop()
        if self.control is not None:
            self.control.stop()
        self.governor.stop()  # governor (issue 4)
        self.voice.stop()  # voice (issue 6)
        self.scheduler.stop(timeout=1.5)
        self.engine.stop(timeout=1.0)
        self.store.event("stop", f"clean shutdown in {time.monotonic() - t0:.2f} s")
        self.store.record_stop("SIGTERM")
        self.store.close()
        return 0


def _watchdog_interval() -> float:
    usec = os.environ.get("WATCHDOG_USEC")
    return max(int(usec) / 2e6, 0.5) if usec and usec.isdigit() else 5.0


def format_request(r: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.get("created_at") or 0))
    answer = (r.get("answer") or r.get("error") or "").replace("\n", " ")
    prompt = (r.get("prompt") or "").replace("\n", " ")
    return (
        f"#{r['id']} {when} {r.get('source', '')} {r.get('outcome', '')} {r.get('tokens_out') or 0} tok "
        f"{r.get('tok_s') or 0:.0f} tok/s  {prompt[:60]!r} -> {answer[:60]!r}"
    )
