"""The governor: keeps inference inside its thermal and memory budgets, and writes down every decision.

It decides and never runs inference: it reads the machine through `sensors`, and acts only through the narrow
actuators the supervisor hands it (the engine's thread count and duty cycle, stopping the running generation,
unloading and reloading the model) and through admission (`admit`, which the scheduler calls before a request
starts).

This module is the coordinator: one loop that reads the sensors once per `interval` and hands the reading to
thermal control (thermal.py: the PI controller, critical stop) and to the memory budget (memory_budget.py:
pre-flight, shedding), then admission and status over both. Every action is an event row:
`store.event("governor", message, {inputs, action, before, after})`, whose inputs are both parts' (temperature and
memory), so a row shows what the governor saw whichever part acted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from llmos_edge.config import GovernorConfig
from llmos_edge.memory_budget import MemoryBudget, RequestLike
from llmos_edge.models import MIB
from llmos_edge.sensors import Reading, Sensors
from llmos_edge.thermal import Limits, ThermalControl

__all__ = ["Actuators", "EventSink", "Governor", "Limits"]

log = logging.getLogger(__name__)


class EventSink(Protocol):
    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None: ...


@dataclass
class Actuators:
    """What the supervisor lets the governor touch. Defaults do nothing, for tests and benchmarks that need fewer.
    Thermal control gets set_limits and stop_generation, the memory budget unload and reload."""

    set_limits: Callable[[int, float], None] = lambda _threads, _duty: None  # engine: threads, duty cycle
    stop_generation: Callable[[str], None] = lambda _reason: None  # cancel the request running now
    unload: Callable[[str], None] = lambda _reason: None  # stop the worker and keep it stopped
    reload: Callable[[], None] = lambda: None  # let the supervisor start it again (pre-flight runs again)
    worker_pid: Callable[[], int | None] = lambda: None
    busy: Callable[[], bool] = lambda: True  # generating now: only then does the temperature answer the actuators


class Governor:
    def __init__(
        self,
        cfg: GovernorConfig,
        store: EventSink,
        actuators: Actuators,
        *,
        max_threads: int,
        sensors: Sensors | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.act = actuators
        self.sensors = sensors or Sensors(cfg.sensors_root)
        self.clock = clock
        self.thermal = ThermalControl(cfg, actuators, self._record, max_threads=max_threads)
        self.memory = MemoryBudget(cfg, actuators, self._record, self.sensors)
        self.reading: Reading | None = None
        self._last_tick: float | None = None
        self._last_pid: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(
        self, message: str, action: str, inputs: dict[str, Any], before: dict[str, Any], after: dict[str, Any]
    ) -> None:
        seen = self.thermal.inputs() | self.memory.inputs() | inputs
        self.store.event("governor", message, {"action": action, "inputs": seen, "before": before, "after": after})

    # -- the loop ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="governor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return not self.cfg.enabled or (self._thread is not None and self._thread.is_alive())

    def restart(self) -> None:
        if not self._stop.is_set():
            self.start()

    def _run(self) -> None:
        # The first decision at once, not one interval in: the supervisor's self-test must know if the board
        # booted hot before it asks for a generation.
        while True:
            try:
                self.tick()
            except Exception:  # the governor must outlive a sensor glitch; the next tick tries again
                log.exception("governor tick failed")
            if self._stop.wait(self.cfg.interval):
                return

    def tick(self, now: float | None = None) -> None:
        """One decision: read, decide, act. `now` lets tests and the benchmark run on simulated time."""
        if not self.cfg.enabled:
            return
        with self._lock:
            now = self.clock() if now is None else now
            dt = self.cfg.interval if self._last_tick is None else max(0.0, now - self._last_tick)
            self._last_tick = now
            self.reading = self.sensors.read()
            pid = self.act.worker_pid()
            self.memory.observe(self.reading, pid)
            if pid != self._last_pid:
                self._last_pid = pid
                self.thermal.new_worker(running=pid is not None)
            self.thermal.step(self.reading.zone(self.cfg.thermal_zone), dt, busy=self.act.busy())
            self.memory.step(now)

    # -- admission ------------------------------------------------------------------------------------------
    def admit(self, req: RequestLike) -> str | None:
        """The scheduler's admission check: None to go ahead (perhaps with a shorter answer), or the reason."""
        if not self.cfg.enabled:
            return None
        if self.thermal.mode.refuses:
            return self.thermal.refusal()
        return self.memory.admit(req)

    # -- status -------------------------------------------------------------------------------------------------
    def status_lines(self) -> list[str]:
        if not self.cfg.enabled:
            return ["governor: off (governor.enabled is false)"]
        lines = [self.thermal.status_line(), self.memory.status_line()]
        r = self.reading
        if r is not None:
            extra = []
            if r.memory is not None:
                extra.append(f"available {r.memory.headroom / MIB:.0f} MiB")
            if r.psi_memory is not None:
                extra.append(f"memory pressure {r.psi_memory.some_avg10:.1f}%/{r.psi_memory.full_avg10:.1f}%")
            if r.psi_cpu is not None:
                extra.append(f"cpu pressure {r.psi_cpu.some_avg10:.1f}%")
            if r.cpufreq:
                cur = max(f.cur_khz for f in r.cpufreq)
                mx = max(f.max_khz for f in r.cpufreq)
                extra.append(f"cpufreq {cur // 1000}/{mx // 1000} MHz")
            if r.throttle is not None:
                extra.append("firmware: " + (", ".join(r.throttle.now) or "not throttled"))
            if extra:
                lines.append("machine: " + ", ".join(extra))
        return lines

    def status_summary(self) -> str:
        """For STATUS=: temperature vs setpoint, current throttle, memory vs budget."""
        if not self.cfg.enabled:
            return "governor off"
        return f"{self.thermal.status_summary()} | {self.memory.status_summary()}"
