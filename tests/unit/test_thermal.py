"""Thermal control on its own: fed temperatures directly (no sensors, no governor loop), acting on recorded actuators.

The control law against a simulated board, with the sensors and the loop, is in test_governor.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest

from llmos_edge.config import GovernorConfig
from llmos_edge.sensors import ThermalZone
from llmos_edge.thermal import PIController, ThermalControl, ThermalMode
from tests.decisions import Decisions


@dataclasses.dataclass
class Hands:
    """The two actuators thermal control is given, recording what it did with them."""

    limits: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    stopped: list[str] = dataclasses.field(default_factory=list)

    @property
    def set_limits(self) -> Callable[[int, float], None]:
        return lambda threads, duty: self.limits.append((threads, duty))

    @property
    def stop_generation(self) -> Callable[[str], None]:
        return self.stopped.append


class Rig:
    def __init__(self, max_threads: int = 4, **cfg: Any) -> None:
        self.cfg = dataclasses.replace(GovernorConfig(), **cfg)
        self.hands = Hands()
        self.decisions = Decisions()
        self.rows = self.decisions.rows
        self.control = ThermalControl(self.cfg, self.hands, self.decisions, max_threads=max_threads)

    def at(self, celsius: float | None, busy: bool = True, dt: float = 1.0) -> None:
        zone = None if celsius is None else ThermalZone("thermal_zone0", "cpu-thermal", celsius)
        self.control.step(zone, dt, busy)


def test_modes_keep_the_words_events_and_status_have_always_used() -> None:
    assert [m.value for m in ThermalMode] == [
        "unknown",
        "no thermal sensor",
        "normal",
        "throttling",
        "critical",
        "cooling",
    ]
    assert [m for m in ThermalMode if m.refuses] == [ThermalMode.CRITICAL, ThermalMode.COOLING]
    assert json.dumps({"mode": ThermalMode.NO_SENSOR}) == '{"mode": "no thermal sensor"}'


def test_first_reading_turns_control_on_and_names_the_zone() -> None:
    rig = Rig()
    assert rig.control.mode is ThermalMode.UNKNOWN
    rig.at(40.0)
    assert rig.control.mode is ThermalMode.NORMAL and rig.decisions.actions() == ["sensor"]
    message, _, inputs, before, after = rig.rows[0]
    assert "cpu-thermal (thermal_zone0) at 40.0 °C" in message
    assert before["mode"] == "unknown" and after["mode"] == "normal" and "p" in inputs and "i" in inputs
    assert rig.control.inputs() == {"celsius": 40.0, "zone": "cpu-thermal", "setpoint": 75.0, "critical": 85.0}


def test_a_hot_board_is_throttled_and_set_free_when_it_cools() -> None:
    rig = Rig()
    rig.at(74.0)
    rig.at(80.0)  # 5 °C over the setpoint: the proportional term alone takes the share below 1
    assert rig.control.mode is ThermalMode.THROTTLING and rig.control.limits.share < 1.0
    assert rig.hands.limits and rig.hands.limits[-1][0] < 4
    assert "throttle" in rig.decisions.actions()
    for _ in range(5):
        rig.at(50.0)
    assert rig.control.mode is ThermalMode.NORMAL and rig.control.limits.share == 1.0
    assert rig.hands.limits[-1] == (4, 1.0) and "unthrottle" in rig.decisions.actions()


def test_share_is_realised_with_few_threads_at_full_pace() -> None:
    rig = Rig()
    seen = []
    for _ in range(100):
        rig.control.apply(0.6)
        seen.append(rig.control.limits)
    assert {lim.threads for lim in seen} == {2, 3} and all(lim.duty == 1.0 for lim in seen)
    assert sum(lim.threads for lim in seen) / len(seen) == pytest.approx(2.4, abs=0.05)
    rig.control.apply(0.1)
    assert rig.hands.limits[-1] == (1, pytest.approx(0.4))


def test_unchanged_limits_are_not_sent_again_but_a_new_worker_gets_them() -> None:
    rig = Rig()
    rig.control.apply(0.5)
    sent = len(rig.hands.limits)
    rig.control.apply(0.5)
    assert len(rig.hands.limits) == sent
    rig.control.new_worker(running=False)  # no worker yet: nothing to send to
    assert len(rig.hands.limits) == sent
    rig.control.new_worker(running=True)
    assert len(rig.hands.limits) == sent + 1 and rig.hands.limits[-1] == (2, 1.0)


def test_critical_stops_generation_and_refuses_until_cooled_by_the_margin() -> None:
    rig = Rig()
    rig.at(70.0)
    rig.at(86.0)
    assert rig.control.mode is ThermalMode.CRITICAL and rig.control.mode.refuses
    assert rig.hands.stopped == [rig.control.refusal()]
    assert "86.0 °C" in rig.control.refusal() and "below 80" in rig.control.refusal()
    assert rig.control.limits.share == rig.cfg.min_share
    rig.at(82.0)  # below critical, above critical - cool_margin
    assert rig.control.mode is ThermalMode.COOLING and rig.control.mode.refuses
    rig.at(80.5)
    assert rig.control.mode is ThermalMode.COOLING
    rig.at(79.5)
    assert not rig.control.mode.refuses and "resume" in rig.decisions.actions()
    assert rig.control.pi.integral <= rig.cfg.min_share + 1e-9  # starts again gently
    assert len(rig.hands.stopped) == 1


def test_no_sensor_is_recorded_once_and_leaves_the_engine_unthrottled() -> None:
    rig = Rig()
    rig.at(80.0)
    rig.at(None)
    rig.at(None)
    assert rig.control.mode is ThermalMode.NO_SENSOR and rig.control.celsius is None
    assert rig.decisions.actions().count("no_sensor") == 1 and rig.control.limits.share == 1.0
    assert rig.control.status_line() == "thermal: no thermal sensor (not throttling)"
    assert rig.control.status_summary() == "no thermal sensor"
    rig.at(60.0)  # a sensor that comes back turns control on again
    assert rig.control.mode is ThermalMode.NORMAL and rig.decisions.actions()[-1] == "sensor"


def test_pinned_means_the_controller_can_do_no_more() -> None:
    rig = Rig()
    rig.at(70.0)
    assert not rig.control.pinned()
    rig.at(84.0)  # 9 °C over: the share falls to its floor
    assert rig.control.mode is ThermalMode.THROTTLING and rig.control.limits.share == rig.cfg.min_share
    assert rig.control.pinned()
    rig.at(90.0)
    assert rig.control.mode is ThermalMode.CRITICAL and rig.control.pinned()


def test_cool_means_below_the_setpoint_by_the_margin() -> None:
    rig = Rig()
    assert not rig.control.cool()  # no reading yet: not known to be cool
    rig.at(70.5)
    assert not rig.control.cool()
    rig.at(69.5)
    assert rig.control.cool()


def test_status_shows_temperature_mode_and_threads() -> None:
    rig = Rig()
    rig.at(84.0)
    line = rig.control.status_line()
    assert line.startswith("thermal: cpu-thermal 84.0 C, setpoint 75 C, critical 85 C; throttling: CPU share 0.10")
    assert "(1 of 4 threads, duty 0.40)" in line
    assert rig.control.status_summary() == "84/75 C throttling share 0.10"


def test_the_integral_does_not_wind_up_while_saturated_or_idle() -> None:
    pi = PIController(setpoint=75.0, kp=0.12, ki=0.0012, u_min=0.1)
    for _ in range(1000):
        assert pi.update(40.0, 1.0) == 1.0  # cold and flat out: saturated high
    assert pi.integral == 0.0
    pi.update(76.0, 10.0, learn=False)  # idle: the temperature does not answer the output
    assert pi.integral == 0.0
    pi.update(76.0, 10.0)
    assert pi.integral == 0.0  # saturated low and still too hot: not integrated further down
    pi.reset(0.5)
    pi.update(74.0, 10.0)
    assert pi.integral == pytest.approx(0.5 + 0.0012 * 1.0 * 10.0)
