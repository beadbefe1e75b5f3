"""The governor: keeps inference inside its thermal and memory budgets, and writes down every decision.

It decides and never runs inference: it reads the machine through `sensors`, and acts only through the narrow
actuators the supervisor hands it (the engine's thread count and duty cycle, stopping the running generation,
unloading and reloading the model) and through admission (`admit`, which the scheduler calls before a request
starts).

Thermal: a PI controller holds the hottest zone (or `thermal_zone`) at `setpoint`. Its output is a CPU share (1.0 =
every inference thread computing all the time). The share is realised with as few threads as possible at full pace
(decode is memory-bound: fewer threads cost less speed than they save power), dithering between two neighbouring
thread counts for fractions, and pacing (the duty cycle) only below one thread. Anti-windup: the integral is frozen
while the output is saturated, so a cool board going flat out does not store up a debt that would overshoot later.
Above `critical` the running generation is stopped and new requests are refused until the board has cooled by
`cool_margin` (hysteresis).

Memory: before a load, `preflight` picks the largest context whose estimate (models.estimate_memory) fits the
budget, or refuses in one sentence. At run time three signals (the worker's RSS against the budget, the memory
still available to us, and pressure stall information) give a level; each level adds one measure, in order:
1 shed background work, 2 shorten new requests, 3 unload the model. Levels rise at once and step back one at a
time after `calm` seconds.

Every action is an event row: `store.event("governor", message, {inputs, action, before, after})`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import psutil

from llmos_edge.config import GovernorConfig
from llmos_edge.errors import UserError
from llmos_edge.models import MIB, MIN_CONTEXT, GGUFInfo, MemoryEstimate, fit_context
from llmos_edge.sensors import Reading, Sensors

log = logging.getLogger(__name__)

MEMORY_MEASURES = ("no shedding", "shedding background work", "shortening new requests", "model unloaded")


class EventSink(Protocol):
    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None: ...


class RequestLike(Protocol):
    @property
    def priority(self) -> str: ...

    max_tokens: int  # admission may shorten it


@dataclass
class Actuators:
    """What the supervisor lets the governor touch. Defaults do nothing, for tests and benchmarks that need fewer."""

    set_limits: Callable[[int, float], None] = lambda _threads, _duty: None  # engine: threads, duty cycle
    stop_generation: Callable[[str], None] = lambda _reason: None  # cancel the request running now
    unload: Callable[[str], None] = lambda _reason: None  # stop the worker and keep it stopped
    reload: Callable[[], None] = lambda: None  # let the supervisor start it again (pre-flight runs again)
    worker_pid: Callable[[], int | None] = lambda: None
    busy: Callable[[], bool] = lambda: True  # generating now: only then does the temperature answer the actuators


@dataclass
class Limits:
    share: float = 1.0  # the controller's output: fraction of full CPU use
    threads: int = 1
    duty: float = 1.0


class PIController:
    """A PI controller on temperature with conditional-integration anti-windup.

    u = kp·e + I, e = setpoint - T (positive when cool), u clamped to [u_min, 1]. I integrates ki·e·dt only when
    that does not push a saturated output further into saturation, and only while the plant is driven (`learn`).
    I is the controller's memory of the share that holds the setpoint. It starts at 0: on the first climb the
    proportional term alone starts braking 1/kp degrees early, which cannot overshoot whatever the board; a higher
    start would overshoot on any board hotter than guessed. Once learned, it is kept across idle periods (frozen
    while saturated), so the next climb brakes at the right point.
    """

    def __init__(self, setpoint: float, kp: float, ki: float, u_min: float, i0: float = 0.0) -> None:
        self.setpoint, self.kp, self.ki, self.u_min = setpoint, kp, ki, u_min
        self.integral = i0
        self.last_p = 0.0

    def update(self, celsius: float, dt: float, learn: bool = True) -> float:
        e = self.setpoint - celsius
        self.last_p = self.kp * e
        raw = self.last_p + self.integral
        saturated_high, saturated_low = raw >= 1.0, raw <= self.u_min
        if learn and not (saturated_high and e > 0) and not (saturated_low and e < 0):
            self.integral = min(1.0, max(0.0, self.integral + self.ki * e * dt))
        return min(1.0, max(self.u_min, self.last_p + self.integral))

    def reset(self, integral: float) -> None:
        self.integral = integral


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
        self.max_threads = max(1, max_threads)
        self.sensors = sensors or Sensors(cfg.sensors_root)
        self.clock = clock
        self.pi = PIController(cfg.setpoint, cfg.kp, cfg.ki, cfg.min_share)
        self.limits = Limits(threads=self.max_threads)
        self._dither = 0.0  # sigma-delta accumulator for fractional thread counts
        self._logged_share = 1.0
        self.thermal = "unknown"  # before the first reading; then no thermal sensor | normal | throttling | critical
        # | cooling
        self.celsius: float | None = None
        self.zone_name = ""
        self.reading: Reading | None = None
        self.memory_level = 0
        self.memory_reason = ""
        self._calm_since: float | None = None
        self.budget = 0  # bytes the worker may use; 0 until the first pre-flight
        self.reserve_extra = 0  # bytes kept back beyond memory_reserve_mb (the voice front-end's share)
        self.estimate: MemoryEstimate | None = None
        self.worker_rss = 0
        self.shortened = 0
        self._last_tick: float | None = None
        self._last_pid: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- events --------------------------------------------------------------------------------------------
    def _event(
        self, message: str, action: str, inputs: dict[str, Any], before: dict[str, Any], after: dict[str, Any]
    ) -> None:
        self.store.event("governor", message, {"action": action, "inputs": inputs, "before": before, "after": after})

    def _inputs(self) -> dict[str, Any]:
        r = self.reading
        psi = r.psi_memory if r is not None else None
        mem = r.memory if r is not None else None
        return {
            "celsius": None if self.celsius is None else round(self.celsius, 2),
            "zone": self.zone_name,
            "setpoint": self.cfg.setpoint,
            "critical": self.cfg.critical,
            "worker_rss_mib": round(self.worker_rss / MIB, 1),
            "budget_mib": round(self.budget / MIB, 1),
            "headroom_mib": None if mem is None else round(mem.headroom / MIB, 1),
            "psi_some_avg10": None if psi is None else psi.some_avg10,
            "psi_full_avg10": None if psi is None else psi.full_avg10,
        }

    # -- memory: pre-flight --------------------------------------------------------------------------------
    def memory_budget(self) -> int:
        """Bytes the worker may use: configured, or what this cgroup (or the machine) leaves, less the reserve."""
        if self.cfg.memory_budget_mb:
            return self.cfg.memory_budget_mb * MIB
        mem = self.sensors.read().memory
        if mem is None:
            return 0  # unknown: no budget is enforced
        # The worker being replaced (on a reload) still counts as used; what it holds is ours to reuse.
        room = mem.headroom + self.worker_rss
        return max(0, room - self.cfg.memory_reserve_mb * MIB - self.reserve_extra)

    def memory_ceiling(self) -> int:
        """The most the worker could ever get on this device (0: unknown): the configured budget, or the cgroup's
        limit (else the machine's memory) less the reserves. A model over this can never load here; one under it
        that is refused now was refused because memory was briefly short, and is tried again."""
        if self.cfg.memory_budget_mb:
            return self.cfg.memory_budget_mb * MIB
        mem = self.sensors.read().memory
        if mem is None or not mem.total:
            return 0
        cap = mem.total if mem.cgroup_limit is None else min(mem.total, mem.cgroup_limit)
        return max(0, cap - self.cfg.memory_reserve_mb * MIB - self.reserve_extra)

    def fits_ever(self, info: GGUFInfo) -> bool:
        ceiling = self.memory_ceiling()
        if not self.cfg.enabled or ceiling <= 0:
            return True
        try:
            fit_context(info, ceiling, MIN_CONTEXT)
        except UserError:
            return False
        return True

    def fits_now(self, info: GGUFInfo, *, beside_worker: bool = False) -> bool:
        """Would `info` pass the pre-flight now (at the smallest context)? No event: the ladder asks this often.
        `beside_worker`: without counting the running worker's memory as free (the ladder goes back to a bigger model
        only when it fits beside the fallback's memory, so a step back never has to be undone at once)."""
        budget = self.memory_budget() if self.cfg.enabled else 0
        if beside_worker and budget > 0 and not self.cfg.memory_budget_mb:
            budget = max(1, budget - self.worker_rss)
        if budget <= 0:
            return True
        try:
            fit_context(info, budget, MIN_CONTEXT)
        except UserError:
            return False
        return True

    def preflight(self, info: GGUFInfo, wanted_ctx: int) -> int:
        """The context to load `info` with: the largest up to `wanted_ctx` that fits the budget. Raises UserError
        (one sentence: needed, budget, what to do) when none does."""
        if not self.cfg.enabled:
            return wanted_ctx
        budget = self.memory_budget()
        if budget <= 0:
            return wanted_ctx
        before = {"n_ctx": wanted_ctx, "budget_mib": round(self.budget / MIB, 1)}
        self.budget = budget
        try:
            est = fit_context(info, budget, wanted_ctx)
        except Exception as e:
            self._event(f"refused to load {info.name}: {e}", "refuse_load", self._inputs(), before, {"n_ctx": 0})
            raise
        self.estimate = est
        chosen = min(est.n_ctx, wanted_ctx)
        if chosen < wanted_ctx:
            message = f"context {wanted_ctx} does not fit the {budget / MIB:.0f} MiB budget; loading with {chosen}"
        else:
            message = f"{info.name} fits: estimate {est.total / MIB:.0f} MiB of a {budget / MIB:.0f} MiB budget"
        self._event(
            message,
            "preflight",
            self._inputs(),
            before,
            {
                "n_ctx": chosen,
                "estimate": {k: round(v / MIB, 1) for k, v in asdict(est).items() if k not in ("n_ctx", "kv_type")},
                "budget_mib": round(budget / MIB, 1),
            },
        )
        return chosen

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
            self.worker_rss = _rss(pid)
            if pid != self._last_pid:
                self._last_pid = pid
                self._dither = 0.0
                if pid is not None:  # a new worker starts unthrottled: give it the current limits at once
                    self._apply(self.limits.share, force=True)
            self._thermal(dt)
            self._memory(now)

    # -- thermal -------------------------------------------------------------------------------------------
    def _thermal(self, dt: float) -> None:
        assert self.reading is not None
        zone = self.reading.zone(self.cfg.thermal_zone)
        if zone is None:
            if self.thermal != "no thermal sensor":
                self._event(
                    "no thermal sensor: thermal control off",
                    "no_sensor",
                    self._inputs(),
                    {"mode": self.thermal},
                    {"mode": "no thermal sensor"},
                )
                self.thermal = "no thermal sensor"
                self._apply(1.0)
            self.celsius = None
            return
        self.celsius, self.zone_name = zone.celsius, zone.type
        t, cfg = zone.celsius, self.cfg
        if self.thermal in ("unknown", "no thermal sensor"):
            self._set_mode("normal", f"thermal control on {zone.type} ({zone.name}) at {t:.1f} °C", "sensor")
        if self.thermal in ("critical", "cooling"):
            if t <= cfg.critical - cfg.cool_margin:
                self.pi.reset(cfg.min_share)  # start again gently: the board is still warm
                self._set_mode("normal", f"cooled to {t:.1f} °C: accepting requests again", "resume")
            else:
                if t < cfg.critical and self.thermal == "critical":
                    self.thermal = "cooling"
                return
        if t >= cfg.critical:
            before = asdict(self.limits)
            self._apply(cfg.min_share)
            self._set_mode(
                "critical",
                f"{t:.1f} °C is above the critical {cfg.critical:g} °C: generation stopped, new requests refused",
                "critical_stop",
                before,
            )
            self.act.stop_generation(self.refusal_thermal())
            return
        share = self.pi.update(t, dt, learn=self.act.busy())
        before = asdict(self.limits)
        self._apply(share)
        mode = "throttling" if share < 1.0 else "normal"
        if mode != self.thermal:
            self._set_mode(
                mode,
                f"{t:.1f} °C, setpoint {cfg.setpoint:g} °C: CPU share {share:.2f}",
                "throttle" if mode == "throttling" else "unthrottle",
                before,
            )
        elif abs(share - self._logged_share) >= 0.1:
            self._event(
                f"{t:.1f} °C: CPU share {self._logged_share:.2f} -> {share:.2f}",
                "adjust",
                self._inputs() | {"p": round(self.pi.last_p, 3), "i": round(self.pi.integral, 3)},
                before,
                asdict(self.limits),
            )
            self._logged_share = share

    def _set_mode(self, mode: str, message: str, action: str, before: dict[str, Any] | None = None) -> None:
        old = self.thermal
        self.thermal = mode
        self._logged_share = self.limits.share
        self._event(
            message,
            action,
            self._inputs() | {"p": round(self.pi.last_p, 3), "i": round(self.pi.integral, 3)},
            {"mode": old, **(before or {})},
            {"mode": mode, **asdict(self.limits)},
        )

    def _apply(self, share: float, force: bool = False) -> None:
        """Realise a CPU share with the fewest threads at full pace; a fractional thread count is dithered."""
        cores = share * self.max_threads
        if cores >= 1.0:
            base = math.floor(cores)
            self._dither += cores - base
            extra = 1 if self._dither >= 1.0 else 0
            self._dither -= extra
            threads, duty = min(self.max_threads, base + extra), 1.0
        else:
            threads, duty = 1, max(0.05, cores)
        changed = (threads, round(duty, 3)) != (self.limits.threads, round(self.limits.duty, 3))
        self.limits = Limits(share=share, threads=threads, duty=duty)
        if changed or force:
            self.act.set_limits(threads, duty)

    # -- memory: run time ----------------------------------------------------------------------------------
    def _memory_signal(self) -> tuple[int, str]:
        cfg, r = self.cfg, self.reading
        assert r is not None
        level, why = 0, []
        if self.budget and self.worker_rss:
            # The context was fitted to the budget with an estimate that errs high, so a worker over its budget
            # has grown past what was planned (a leak, a bigger prompt than the estimate covers).
            ratio = self.worker_rss / self.budget
            lvl = 3 if ratio > 1.25 else 2 if ratio > 1.1 else 1 if ratio > 1.0 else 0
            if lvl:
                level = max(level, lvl)
                why.append(f"engine {self.worker_rss / MIB:.0f} MiB of a {self.budget / MIB:.0f} MiB budget")
        if r.memory is not None and cfg.min_available_mb:
            room, floor = r.memory.headroom, cfg.min_available_mb * MIB
            if self.memory_level == 3 and self.estimate is not None and not self.worker_rss:
                # Unloaded: what counts is the room left after loading it again, or it would bounce in and out.
                room -= self.estimate.total
            lvl = 3 if room < floor / 2 else 2 if room < floor else 1 if room < 2 * floor else 0
            if lvl:
                level = max(level, lvl)
                why.append(f"{room / MIB:.0f} MiB available")
        psi = r.psi_memory
        if psi is not None:
            lvl = 0
            if cfg.psi_full and psi.full_avg10 >= 2 * cfg.psi_full:
                lvl = 3
            elif cfg.psi_full and psi.full_avg10 >= cfg.psi_full:
                lvl = 2
            elif cfg.psi_some and psi.some_avg10 >= cfg.psi_some:
                lvl = 1
            if lvl:
                level = max(level, lvl)
                why.append(f"memory pressure some {psi.some_avg10:.0f}% full {psi.full_avg10:.0f}%")
        return level, ", ".join(why)

    def _memory(self, now: float) -> None:
        signal, why = self._memory_signal()
        old = self.memory_level
        if signal > old:
            self.memory_level, self.memory_reason, self._calm_since = signal, why, None
        elif signal < old:
            if self._calm_since is None:
                self._calm_since = now
            if now - self._calm_since < self.cfg.calm:
                return
            self.memory_level, self._calm_since = old - 1, now
            self.memory_reason = why or "memory is calm again"
        else:
            self._calm_since = None
            if why:
                self.memory_reason = why
            return
        new = self.memory_level
        inputs, before, after = (
            self._inputs(),
            {"level": old, "measure": MEMORY_MEASURES[old]},
            {"level": new, "measure": MEMORY_MEASURES[new]},
        )
        if new > old:
            for level in range(old + 1, new + 1):
                self._event(
                    f"memory short ({why}): {MEMORY_MEASURES[level]}", _MEMORY_ACTIONS[level], inputs, before, after
                )
            if new == 3:
                self.act.unload(self.refusal_memory())
        else:
            self._event(
                f"memory calm ({self.memory_reason}): stepping back to {MEMORY_MEASURES[new]}",
                "memory_step_back",
                inputs,
                before,
                after,
            )
            if old == 3:
                self.act.reload()

    # -- admission ------------------------------------------------------------------------------------------
    def refusal_thermal(self) -> str:
        t = "?" if self.celsius is None else f"{self.celsius:.1f}"
        return (
            f"refused: the board is too hot ({t} °C, limit {self.cfg.critical:g} °C); requests are accepted again "
            f"below {self.cfg.critical - self.cfg.cool_margin:g} °C, try again in a minute"
        )

    def refusal_memory(self) -> str:
        return (
            f"refused: the model is unloaded because memory is short ({self.memory_reason}); it reloads when memory "
            "frees up, try again in a minute"
        )

    def admit(self, req: RequestLike) -> str | None:
        """The scheduler's admission check: None to go ahead (perhaps with a shorter answer), or the reason."""
        if not self.cfg.enabled:
            return None
        if self.thermal in ("critical", "cooling"):
            return self.refusal_thermal()
        level = self.memory_level
        if level >= 3:
            return self.refusal_memory()
        if level >= 1 and req.priority == "background":
            return f"refused: background work is shed while memory is short ({self.memory_reason}); submit it later"
        if level >= 2 and req.max_tokens > self.cfg.shrink_tokens:
            req.max_tokens = self.cfg.shrink_tokens
            self.shortened += 1
        return None

    # -- status -------------------------------------------------------------------------------------------------
    def status_lines(self) -> list[str]:
        if not self.cfg.enabled:
            return ["governor: off (governor.enabled is false)"]
        lim = self.limits
        if self.celsius is None:
            thermal = "thermal: no thermal sensor (not throttling)"
        else:
            thermal = (
                f"thermal: {self.zone_name} {self.celsius:.1f} C, setpoint {self.cfg.setpoint:g} C, critical "
                f"{self.cfg.critical:g} C; {self.thermal}: CPU share {lim.share:.2f} ({lim.threads} of "
                f"{self.max_threads} threads, duty {lim.duty:.2f})"
            )
        budget = f"{self.budget / MIB:.0f} MiB" if self.budget else "none"
        est = f", estimate {self.estimate.total / MIB:.0f} MiB at ctx {self.estimate.n_ctx}" if self.estimate else ""
        lines = [
            thermal,
            f"memory budget: engine {self.worker_rss / MIB:.0f} MiB of {budget}{est}; "
            + MEMORY_MEASURES[self.memory_level]
            + (f" ({self.memory_reason})" if self.memory_level else ""),
        ]
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
        """For STATUS=: temperature vs setpoint, memory vs budget, current throttle."""
        if not self.cfg.enabled:
            return "governor off"
        t = "no thermal sensor" if self.celsius is None else f"{self.celsius:.0f}/{self.cfg.setpoint:g} C"
        mode = "" if self.thermal in ("normal", "no thermal sensor") else f" {self.thermal}"
        share = f" share {self.limits.share:.2f}" if self.limits.share < 1.0 else ""
        budget = f"/{self.budget / MIB:.0f}" if self.budget else ""
        mem = f"engine {self.worker_rss / MIB:.0f}{budget} MiB"
        if self.memory_level:
            mem += f" {MEMORY_MEASURES[self.memory_level]}"
        return f"{t}{mode}{share} | {mem}"


_MEMORY_ACTIONS = ("", "shed_background", "shorten_requests", "unload")


def _rss(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0
