"""The memory budget: what the engine's worker may use, whether a model fits it, and shedding when memory is short.

Before a load, `preflight` picks the largest context whose estimate (models.estimate_memory) fits the budget, or
refuses in one sentence. At run time three signals (the worker's RSS against the budget, the memory still available
to us, and pressure stall information) give a level; each level adds one measure, in order: 1 shed background work,
2 shorten new requests, 3 unload the model. Levels rise at once and step back one at a time after `calm` seconds.

It acts only through the two actuators it is given (`unload`, `reload`) and through admission (`admit`), and reports
each decision to `record`; the governor (governor.py) reads the sensors and calls `step` once per tick.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from enum import IntEnum
from typing import Any, Protocol

import psutil

from llmos_edge.config import GovernorConfig
from llmos_edge.errors import UserError
from llmos_edge.models import MIB, MIN_CONTEXT, GGUFInfo, MemoryEstimate, fit_context
from llmos_edge.sensors import Reading, Sensors

# record(message, action, inputs, before, after): the governor writes it as a `governor` event, adding its own inputs.
Record = Callable[[str, str, dict[str, Any], dict[str, Any], dict[str, Any]], None]


class MemoryLevel(IntEnum):
    """How short memory is. An IntEnum, not a StrEnum: levels are ordered, rise at once and step back one at a time.
    The values (events' `level`) and `measure` (events' `measure`, /status) are what they have always been."""

    CALM = 0
    SHED_BACKGROUND = 1
    SHORTEN_REQUESTS = 2
    UNLOAD = 3

    @property
    def measure(self) -> str:
        return _MEASURES[self]

    @property
    def action(self) -> str:
        """The event action for taking this level's measure."""
        return self.name.lower()


_MEASURES = ("no shedding", "shedding background work", "shortening new requests", "model unloaded")


class MemoryActuators(Protocol):
    """The part of the governor's actuators the memory budget may touch."""

    @property
    def unload(self) -> Callable[[str], None]: ...  # stop the worker and keep it stopped, with the reason

    @property
    def reload(self) -> Callable[[], None]: ...  # let the supervisor start it again (pre-flight runs again)


class RequestLike(Protocol):
    @property
    def priority(self) -> str: ...

    max_tokens: int  # admission may shorten it


class MemoryBudget:
    def __init__(self, cfg: GovernorConfig, actuators: MemoryActuators, record: Record, sensors: Sensors) -> None:
        self.cfg = cfg
        self.act = actuators
        self.record = record
        self.sensors = sensors
        self.level = MemoryLevel.CALM
        self.reason = ""
        self.budget = 0  # bytes the worker may use; 0 until the first pre-flight
        self.reserve_extra = 0  # bytes kept back beyond memory_reserve_mb (the voice front-end's share)
        self.estimate: MemoryEstimate | None = None
        self.worker_rss = 0
        self.reading: Reading | None = None
        self.shortened = 0
        self._calm_since: float | None = None

    def inputs(self) -> dict[str, Any]:
        r = self.reading
        psi = r.psi_memory if r is not None else None
        mem = r.memory if r is not None else None
        return {
            "worker_rss_mib": round(self.worker_rss / MIB, 1),
            "budget_mib": round(self.budget / MIB, 1),
            "headroom_mib": None if mem is None else round(mem.headroom / MIB, 1),
            "psi_some_avg10": None if psi is None else psi.some_avg10,
            "psi_full_avg10": None if psi is None else psi.full_avg10,
        }

    # -- pre-flight ---------------------------------------------------------------------------------------------
    def available(self) -> int:
        """Bytes the worker may use now: configured, or what this cgroup (or the machine) leaves, less the reserve."""
        if self.cfg.memory_budget_mb:
            return self.cfg.memory_budget_mb * MIB
        mem = self.sensors.read().memory
        if mem is None:
            return 0  # unknown: no budget is enforced
        # The worker being replaced (on a reload) still counts as used; what it holds is ours to reuse.
        room = mem.headroom + self.worker_rss
        return max(0, room - self.cfg.memory_reserve_mb * MIB - self.reserve_extra)

    def ceiling(self) -> int:
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
        ceiling = self.ceiling()
        if not self.cfg.enabled or ceiling <= 0:
            return True
        return _fits(info, ceiling)

    def fits_now(self, info: GGUFInfo, *, beside_worker: bool = False) -> bool:
        """Would `info` pass the pre-flight now (at the smallest context)? No event: the ladder asks this often.
        `beside_worker`: without counting the running worker's memory as free (the ladder goes back to a bigger model
        only when it fits beside the fallback's memory, so a step back never has to be undone at once)."""
        budget = self.available() if self.cfg.enabled else 0
        if beside_worker and budget > 0 and not self.cfg.memory_budget_mb:
            budget = max(1, budget - self.worker_rss)
        if budget <= 0:
            return True
        return _fits(info, budget)

    def preflight(self, info: GGUFInfo, wanted_ctx: int) -> int:
        """The context to load `info` with: the largest up to `wanted_ctx` that fits the budget. Raises UserError
        (one sentence: needed, budget, what to do) when none does."""
        if not self.cfg.enabled:
            return wanted_ctx
        budget = self.available()
        if budget <= 0:
            return wanted_ctx
        before = {"n_ctx": wanted_ctx, "budget_mib": round(self.budget / MIB, 1)}
        self.budget = budget
        try:
            est = fit_context(info, budget, wanted_ctx)
        except Exception as e:
            self.record(f"refused to load {info.name}: {e}", "refuse_load", {}, before, {"n_ctx": 0})
            raise
        self.estimate = est
        chosen = min(est.n_ctx, wanted_ctx)
        if chosen < wanted_ctx:
            message = f"context {wanted_ctx} does not fit the {budget / MIB:.0f} MiB budget; loading with {chosen}"
        else:
            message = f"{info.name} fits: estimate {est.total / MIB:.0f} MiB of a {budget / MIB:.0f} MiB budget"
        self.record(
            message,
            "preflight",
            {},
            before,
            {
                "n_ctx": chosen,
                "estimate": {k: round(v / MIB, 1) for k, v in asdict(est).items() if k not in ("n_ctx", "kv_type")},
                "budget_mib": round(budget / MIB, 1),
            },
        )
        return chosen

    # -- run time -----------------------------------------------------------------------------------------------
    def signal(self) -> tuple[MemoryLevel, str]:
        """The level the latest reading calls for, and why (empty when memory is calm)."""
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
            if self.level is MemoryLevel.UNLOAD and self.estimate is not None and not self.worker_rss:
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
        return MemoryLevel(level), ", ".join(why)

    def observe(self, reading: Reading, worker_pid: int | None) -> None:
        """Take a tick's reading and the worker's memory (before any decision of the tick, so every event of it
        shows them)."""
        self.reading = reading
        self.worker_rss = _rss(worker_pid)

    def step(self, now: float) -> None:
        """One decision on the observed reading."""
        signal, why = self.signal()
        old = self.level
        if signal > old:
            self.level, self.reason, self._calm_since = signal, why, None
        elif signal < old:
            if self._calm_since is None:
                self._calm_since = now
            if now - self._calm_since < self.cfg.calm:
                return
            self.level, self._calm_since = MemoryLevel(old - 1), now
            self.reason = why or "memory is calm again"
        else:
            self._calm_since = None
            if why:
                self.reason = why
            return
        new = self.level
        before, after = {"level": old, "measure": old.measure}, {"level": new, "measure": new.measure}
        if new > old:
            for level in range(old + 1, new + 1):
                lvl = MemoryLevel(level)
                self.record(f"memory short ({why}): {lvl.measure}", lvl.action, {}, before, after)
            if new is MemoryLevel.UNLOAD:
                self.act.unload(self.refusal())
        else:
            self.record(
                f"memory calm ({self.reason}): stepping back to {new.measure}", "memory_step_back", {}, before, after
            )
            if old is MemoryLevel.UNLOAD:
                self.act.reload()

    # -- background jobs beside the engine -----------------------------------------------------------------------
    def shedding(self) -> str | None:
        """Why background work must stop now (memory short: level 1 or above), or None."""
        if self.level < MemoryLevel.SHED_BACKGROUND:
            return None
        return f"memory is short ({self.reason or self.level.measure}): background work is shed"

    def room_for(self, need: int) -> str | None:
        """None when a background job of `need` bytes (a process beside the engine, e.g. consolidation's training)
        fits now; else why not, in words. What it leaves must cover the reserve and twice min_available_mb: below
        that the governor would shed it again at once (level 1) and a run would start and stop in a loop."""
        if not self.cfg.enabled:
            return None
        shed = self.shedding()
        if shed:
            return shed
        mem = self.sensors.read().memory
        if mem is None:
            return None  # unknown (no /proc): not enforced, as the engine's budget is not
        keep = (self.cfg.memory_reserve_mb + 2 * self.cfg.min_available_mb) * MIB + self.reserve_extra
        if mem.headroom - keep >= need:
            return None
        return (
            f"memory short: it needs {need / MIB:.0f} MiB and keeps {keep / MIB:.0f} MiB free, "
            f"{mem.headroom / MIB:.0f} MiB are available"
        )

    # -- admission ----------------------------------------------------------------------------------------------
    def refusal(self) -> str:
        return (
            f"refused: the model is unloaded because memory is short ({self.reason}); it reloads when memory "
            "frees up, try again in a minute"
        )

    def admit(self, req: RequestLike) -> str | None:
        """None to go ahead (perhaps with a shorter answer: `req.max_tokens` is lowered), or the reason to refuse."""
        if self.level >= MemoryLevel.UNLOAD:
            return self.refusal()
        if self.level >= MemoryLevel.SHED_BACKGROUND and req.priority == "background":
            return f"refused: background work is shed while memory is short ({self.reason}); submit it later"
        if self.level >= MemoryLevel.SHORTEN_REQUESTS and req.max_tokens > self.cfg.shrink_tokens:
            req.max_tokens = self.cfg.shrink_tokens
            self.shortened += 1
        return None

    # -- status -------------------------------------------------------------------------------------------------
    def status_line(self) -> str:
        budget = f"{self.budget / MIB:.0f} MiB" if self.budget else "none"
        est = f", estimate {self.estimate.total / MIB:.0f} MiB at ctx {self.estimate.n_ctx}" if self.estimate else ""
        why = f" ({self.reason})" if self.level else ""
        return f"memory budget: engine {self.worker_rss / MIB:.0f} MiB of {budget}{est}; {self.level.measure}{why}"

    def status_summary(self) -> str:
        """For STATUS=: the worker's memory against its budget, and the measure in force."""
        budget = f"/{self.budget / MIB:.0f}" if self.budget else ""
        mem = f"engine {self.worker_rss / MIB:.0f}{budget} MiB"
        return mem + (f" {self.level.measure}" if self.level else "")


def _fits(info: GGUFInfo, budget: int) -> bool:
    try:
        fit_context(info, budget, MIN_CONTEXT)
    except UserError:
        return False
    return True


def _rss(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0
