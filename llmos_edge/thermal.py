"""Thermal control: hold the board at the setpoint by limiting the engine's CPU share, and stop at critical.

A PI controller holds the hottest zone (or `thermal_zone`) at `setpoint`. Its output is a CPU share (1.0 = every
inference thread computing all the time). The share is realised with as few threads as possible at full pace
(decode is memory-bound: fewer threads cost less speed than they save power), dithering between two neighbouring
thread counts for fractions, and pacing (the duty cycle) only below one thread. Anti-windup: the integral is frozen
while the output is saturated, so a cool board going flat out does not store up a debt that would overshoot later.
Above `critical` the running generation is stopped and new requests are refused until the board has cooled by
`cool_margin` (hysteresis).

It acts only through the two actuators it is given (`set_limits`, `stop_generation`) and reports each decision to
`record`; the governor (governor.py) reads the sensors and calls `step` once per tick.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Protocol

from llmos_edge.config import GovernorConfig
from llmos_edge.sensors import ThermalZone

# record(message, action, inputs, before, after): the governor writes it as a `governor` event, adding its own inputs.
Record = Callable[[str, str, dict[str, Any], dict[str, Any], dict[str, Any]], None]


class ThermalMode(StrEnum):
    """The values are what events (`before`/`after` `mode`) and /status have always shown."""

    UNKNOWN = "unknown"  # before the first reading
    NO_SENSOR = "no thermal sensor"  # thermal control off, not throttling
    NORMAL = "normal"
    THROTTLING = "throttling"  # the controller gives generation less than its full share
    CRITICAL = "critical"  # above critical: generation stopped, new requests refused
    COOLING = "cooling"  # below critical but not yet by cool_margin: still refused

    @property
    def refuses(self) -> bool:
        return self in (ThermalMode.CRITICAL, ThermalMode.COOLING)


class ThermalActuators(Protocol):
    """The part of the governor's actuators thermal control may touch."""

    @property
    def set_limits(self) -> Callable[[int, float], None]: ...  # engine: threads, duty cycle

    @property
    def stop_generation(self) -> Callable[[str], None]: ...  # cancel the request running now, with the reason


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


class ThermalControl:
    def __init__(self, cfg: GovernorConfig, actuators: ThermalActuators, record: Record, *, max_threads: int) -> None:
        self.cfg = cfg
        self.act = actuators
        self.record = record
        self.max_threads = max(1, max_threads)
        self.pi = PIController(cfg.setpoint, cfg.kp, cfg.ki, cfg.min_share)
        self.limits = Limits(threads=self.max_threads)
        self.mode = ThermalMode.UNKNOWN
        self.celsius: float | None = None
        self.zone_name = ""
        self._dither = 0.0  # sigma-delta accumulator for fractional thread counts
        self._logged_share = 1.0

    # -- questions others ask -------------------------------------------------------------------------------
    def pinned(self) -> bool:
        """The controller can do no more: refusing, or throttled down to its least share (the ladder's "too hot")."""
        return self.mode.refuses or (
            self.mode is ThermalMode.THROTTLING and self.limits.share <= self.cfg.min_share + 1e-6
        )

    def cool(self) -> bool:
        """Cooler than the controller would ever need to brake at: by cool_margin below the setpoint."""
        return self.celsius is not None and self.celsius < self.cfg.setpoint - self.cfg.cool_margin

    def refusal(self) -> str:
        t = "?" if self.celsius is None else f"{self.celsius:.1f}"
        return (
            f"refused: the board is too hot ({t} °C, limit {self.cfg.critical:g} °C); requests are accepted again "
            f"below {self.cfg.critical - self.cfg.cool_margin:g} °C, try again in a minute"
        )

    def inputs(self) -> dict[str, Any]:
        return {
            "celsius": None if self.celsius is None else round(self.celsius, 2),
            "zone": self.zone_name,
            "setpoint": self.cfg.setpoint,
            "critical": self.cfg.critical,
        }

    # -- deciding -------------------------------------------------------------------------------------------
    def new_worker(self, running: bool) -> None:
        """The engine's worker changed: a new one starts unthrottled, so it gets the current limits at once."""
        self._dither = 0.0
        if running:
            self.apply(self.limits.share, force=True)

    def step(self, zone: ThermalZone | None, dt: float, busy: bool) -> None:
        """One decision on the zone's temperature. `busy`: generating now, the only time the temperature answers
        the actuators, so the only time the controller learns."""
        if zone is None:
            if self.mode is not ThermalMode.NO_SENSOR:
                self.record(
                    "no thermal sensor: thermal control off",
                    "no_sensor",
                    {},
                    {"mode": self.mode},
                    {"mode": ThermalMode.NO_SENSOR},
                )
                self.mode = ThermalMode.NO_SENSOR
                self.apply(1.0)
            self.celsius = None
            return
        self.celsius, self.zone_name = zone.celsius, zone.type
        t, cfg = zone.celsius, self.cfg
        if self.mode in (ThermalMode.UNKNOWN, ThermalMode.NO_SENSOR):
            self._set_mode(ThermalMode.NORMAL, f"thermal control on {zone.type} ({zone.name}) at {t:.1f} °C", "sensor")
        if self.mode.refuses:
            if t <= cfg.critical - cfg.cool_margin:
                self.pi.reset(cfg.min_share)  # start again gently: the board is still warm
                self._set_mode(ThermalMode.NORMAL, f"cooled to {t:.1f} °C: accepting requests again", "resume")
            else:
                if t < cfg.critical and self.mode is ThermalMode.CRITICAL:
                    self.mode = ThermalMode.COOLING
                return
        if t >= cfg.critical:
            before = asdict(self.limits)
            self.apply(cfg.min_share)
            self._set_mode(
                ThermalMode.CRITICAL,
                f"{t:.1f} °C is above the critical {cfg.critical:g} °C: generation stopped, new requests refused",
                "critical_stop",
                before,
            )
            self.act.stop_generation(self.refusal())
            return
        share = self.pi.update(t, dt, learn=busy)
        before = asdict(self.limits)
        self.apply(share)
        mode = ThermalMode.THROTTLING if share < 1.0 else ThermalMode.NORMAL
        if mode is not self.mode:
            self._set_mode(
                mode,
                f"{t:.1f} °C, setpoint {cfg.setpoint:g} °C: CPU share {share:.2f}",
                "throttle" if mode is ThermalMode.THROTTLING else "unthrottle",
                before,
            )
        elif abs(share - self._logged_share) >= 0.1:
            self.record(
                f"{t:.1f} °C: CPU share {self._logged_share:.2f} -> {share:.2f}",
                "adjust",
                self._pi_inputs(),
                before,
                asdict(self.limits),
            )
            self._logged_share = share

    def _pi_inputs(self) -> dict[str, Any]:
        return {"p": round(self.pi.last_p, 3), "i": round(self.pi.integral, 3)}

    def _set_mode(self, mode: ThermalMode, message: str, action: str, before: dict[str, Any] | None = None) -> None:
        old = self.mode
        self.mode = mode
        self._logged_share = self.limits.share
        self.record(
            message,
            action,
            self._pi_inputs(),
            {"mode": old, **(before or {})},
            {"mode": mode, **asdict(self.limits)},
        )

    # -- acting ---------------------------------------------------------------------------------------------
    def apply(self, share: float, force: bool = False) -> None:
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

    # -- status ---------------------------------------------------------------------------------------------
    def status_line(self) -> str:
        if self.celsius is None:
            return "thermal: no thermal sensor (not throttling)"
        lim = self.limits
        return (
            f"thermal: {self.zone_name} {self.celsius:.1f} C, setpoint {self.cfg.setpoint:g} C, critical "
            f"{self.cfg.critical:g} C; {self.mode}: CPU share {lim.share:.2f} ({lim.threads} of "
            f"{self.max_threads} threads, duty {lim.duty:.2f})"
        )

    def status_summary(self) -> str:
        """For STATUS=: temperature vs setpoint and the current throttle."""
        t = "no thermal sensor" if self.celsius is None else f"{self.celsius:.0f}/{self.cfg.setpoint:g} C"
        mode = "" if self.mode in (ThermalMode.NORMAL, ThermalMode.NO_SENSOR) else f" {self.mode}"
        share = f" share {self.limits.share:.2f}" if self.limits.share < 1.0 else ""
        return f"{t}{mode}{share}"
