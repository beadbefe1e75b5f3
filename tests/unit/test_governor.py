"""The governor as a whole (its loop, the sensors, thermal control and the memory budget together): the control law
against the thermal simulator, its critical stop, memory shedding, admission, and the events it writes. Each part on
its own: test_thermal.py, test_memory_budget.py.

Everything runs on simulated time: the simulator's board heats with the CPU share the governor allows (as if the
engine were generating all the time), and `tick(now)` is called once per simulated second.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from bench.thermal_sim import BoardModel, ThermalSim
from llmos_edge.config import GovernorConfig
from llmos_edge.governor import Actuators, Governor
from llmos_edge.sensors import Sensors
from llmos_edge.thermal import ThermalMode
from tests.fake_sysfs import write_zone


class Sink:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, dict[str, Any]]] = []

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        json.dumps(data)  # what the store does with it: it must serialise
        self.rows.append((kind, message, data or {}))

    def actions(self) -> list[str]:
        return [d["action"] for _, _, d in self.rows]


@dataclasses.dataclass
class Req:
    priority: str = "interactive"
    max_tokens: int = 128


class Rig:
    """A simulated board, its fake thermal zone, and a governor acting on it."""

    def __init__(self, tmp: Path, board: BoardModel | None = None, max_threads: int = 4, **cfg: Any) -> None:
        self.root = tmp
        self.cfg = dataclasses.replace(GovernorConfig(), sensors_root=str(tmp), **({"min_available_mb": 0} | cfg))
        self.sim = ThermalSim(board)
        write_zone(tmp, self.sim.celsius)
        self.sink = Sink()
        self.limits = (max_threads, 1.0)
        self.stopped: list[str] = []
        self.unloaded: list[str] = []
        self.reloads = 0
        self.busy = True
        self.gov = Governor(
            self.cfg,
            self.sink,
            Actuators(
                set_limits=self._set_limits,
                stop_generation=self.stopped.append,
                unload=self.unloaded.append,
                reload=self._reload,
                busy=lambda: self.busy,
            ),
            max_threads=max_threads,
            sensors=Sensors(tmp, vcgencmd=None),
        )
        self.max_threads = max_threads
        self.t = 0.0
        self.temps: list[float] = []
        self.work = 0.0  # integral of the CPU share actually used: the work the board did

    def _set_limits(self, threads: int, duty: float) -> None:
        self.limits = (threads, duty)

    def _reload(self) -> None:
        self.reloads += 1

    def load(self) -> float:
        if not self.busy or self.gov.thermal.mode is ThermalMode.CRITICAL:
            return 0.0
        threads, duty = self.limits
        return threads * duty / self.max_threads

    def run(self, seconds: float, dt: float = 1.0) -> None:
        end = self.t + seconds
        while self.t < end:
            self.gov.tick(self.t)
            load = self.load()
            self.work += load * dt
            self.sim.step(load, dt)
            write_zone(self.root, self.sim.celsius)
            self.temps.append(self.sim.celsius)
            self.t += dt


def test_pi_holds_the_setpoint_without_overshoot(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.run(900)
    assert max(rig.temps) <= rig.cfg.setpoint + 1.0
    settled = rig.temps[-300:]
    assert min(settled) >= rig.cfg.setpoint - 0.5 and max(settled) <= rig.cfg.setpoint + 0.5
    # Holding the setpoint is the most work the board can do there: compare with the share that holds it exactly.
    ideal = BoardModel().load_for(rig.cfg.setpoint)
    assert rig.work / rig.t > 0.9 * ideal
    assert "throttle" in rig.sink.actions()


@pytest.mark.parametrize(
    "board",
    [
        BoardModel(tau_s=40),
        BoardModel(tau_s=300),
        BoardModel(r_th=12.0),
        BoardModel(load_w=8.0),
        BoardModel(ambient_c=35.0),
    ],
    ids=["fast", "slow", "poorly-cooled", "power-hungry", "hot-room"],
)
def test_no_overshoot_on_boards_it_was_not_tuned_for(tmp_path: Path, board: BoardModel) -> None:
    rig = Rig(tmp_path, board)
    rig.run(1500)
    assert max(rig.temps) <= rig.cfg.setpoint + 1.0
    assert abs(rig.temps[-1] - rig.cfg.setpoint) < 0.5


def test_without_governor_the_same_board_overheats(tmp_path: Path) -> None:
    # The control case for the tests above: the simulated board does get hot enough to need a governor.
    rig = Rig(tmp_path, enabled=False)
    rig.run(600)
    assert max(rig.temps) > rig.cfg.critical


def test_no_windup_after_an_idle_spell(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.run(600)  # hot, holding the setpoint
    rig.busy = False
    rig.run(600)  # idle: the board cools to near ambient while the controller waits at full share
    assert rig.temps[-1] < 60
    rig.busy = True
    rig.run(600)
    assert max(rig.temps[-600:]) <= rig.cfg.setpoint + 1.0


def test_above_critical_generation_stops_and_requests_are_refused_until_it_cools(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    gov = rig.gov
    write_zone(tmp_path, 86.0)
    gov.tick(0)
    assert rig.stopped and "too hot" in rig.stopped[0]
    msg = gov.admit(Req())
    assert msg is not None and "86.0 °C" in msg and "limit 85" in msg and "below 80" in msg and "\n" not in msg
    assert gov.thermal.mode is ThermalMode.CRITICAL and "critical_stop" in rig.sink.actions()
    write_zone(tmp_path, 82.0)  # below critical, but not cool enough: hysteresis keeps refusing
    gov.tick(1)
    assert gov.admit(Req()) is not None and gov.thermal.mode is ThermalMode.COOLING
    write_zone(tmp_path, 79.5)
    gov.tick(2)
    assert gov.admit(Req()) is None and gov.thermal.mode in (ThermalMode.NORMAL, ThermalMode.THROTTLING)
    assert "resume" in rig.sink.actions()


def test_no_thermal_sensor_is_reported_and_does_not_throttle(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    (tmp_path / "sys/class/thermal/thermal_zone0/temp").unlink()
    rig.gov.tick(0)
    assert rig.gov.thermal.mode is ThermalMode.NO_SENSOR and rig.gov.thermal.celsius is None
    assert rig.gov.thermal.limits.share == 1.0 and rig.gov.admit(Req()) is None
    assert "no thermal sensor" in rig.gov.status_lines()[0]
    assert "no thermal sensor" in rig.gov.status_summary()


def test_every_action_is_an_event_with_inputs_and_before_after(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.run(900)
    write_zone(tmp_path, 90.0)
    rig.gov.tick(rig.t)
    assert rig.sink.rows
    for kind, message, data in rig.sink.rows:
        assert kind == "governor" and message
        assert set(data) == {"action", "inputs", "before", "after"}
        assert data["inputs"]["setpoint"] == 75.0 and "celsius" in data["inputs"]
        assert "budget_mib" in data["inputs"] and "psi_full_avg10" in data["inputs"]  # the memory side too
    # A steady hold is not a stream of rows: a handful of events for 15 minutes of control.
    assert len(rig.sink.rows) < 20


def psi(root: Path, some: float, full: float) -> None:
    p = root / "proc/pressure/memory"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f"some avg10={some:.2f} avg60=0 avg300=0 total=0\nfull avg10={full:.2f} avg60=0 avg300=0 total=0\n")


def test_memory_pressure_sheds_in_order_and_steps_back_when_calm(tmp_path: Path) -> None:
    rig = Rig(tmp_path, calm=10.0)
    gov = rig.gov
    psi(tmp_path, 0, 0)
    gov.tick(0)
    assert gov.memory.level == 0 and gov.admit(Req("background")) is None

    psi(tmp_path, 15, 0)  # some stalls: background work goes first
    gov.tick(1)
    assert gov.memory.level == 1
    refusal = gov.admit(Req("background"))
    assert refusal is not None and "background work is shed" in refusal
    r = Req("interactive", 128)
    assert gov.admit(r) is None and r.max_tokens == 128

    psi(tmp_path, 40, 6)  # full stalls: new requests get shorter answers
    gov.tick(2)
    r = Req("interactive", 128)
    assert gov.memory.level == 2 and gov.admit(r) is None and r.max_tokens == rig.cfg.shrink_tokens

    psi(tmp_path, 80, 20)  # severe: unload
    gov.tick(3)
    assert gov.memory.level == 3 and rig.unloaded and "memory is short" in rig.unloaded[0]
    refusal = gov.admit(Req())
    assert refusal is not None and "unloaded" in refusal and "try again" in refusal
    assert rig.sink.actions()[-3:] == ["shed_background", "shorten_requests", "unload"]

    psi(tmp_path, 0, 0)  # calm: one step back per `calm` seconds, reloading first
    gov.tick(4)
    assert gov.memory.level == 3
    gov.tick(14.5)
    assert gov.memory.level == 2 and rig.reloads == 1
    gov.tick(20)
    assert gov.memory.level == 2
    gov.tick(25)
    gov.tick(36)
    assert gov.memory.level == 0 and gov.admit(Req("background")) is None
    assert rig.sink.actions().count("memory_step_back") == 3


def test_a_jump_to_severe_pressure_logs_each_measure(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    psi(tmp_path, 90, 50)
    rig.gov.tick(0)
    assert rig.sink.actions() == ["sensor", "shed_background", "shorten_requests", "unload"]
    unload = rig.sink.rows[-1][2]["inputs"]
    assert unload["psi_full_avg10"] == 50.0 and unload["celsius"] is not None  # the thermal side too
    assert rig.gov.status_summary().endswith("| engine 0 MiB model unloaded")
    assert len(rig.unloaded) == 1


def test_low_available_memory_escalates(tmp_path: Path) -> None:
    rig = Rig(tmp_path, min_available_mb=100)
    meminfo = tmp_path / "proc/meminfo"
    meminfo.parent.mkdir(parents=True, exist_ok=True)
    meminfo.write_text("MemTotal: 1000000 kB\nMemAvailable: 40000 kB\n")  # 39 MiB: under half the floor
    rig.gov.tick(0)
    assert rig.gov.memory.level == 3 and "39 MiB available" in rig.gov.memory.reason


def test_a_worker_over_its_budget_escalates_with_the_overrun(tmp_path: Path) -> None:
    import os

    import psutil

    rig = Rig(tmp_path)
    rig.gov.act.worker_pid = os.getpid  # this test process stands in for the worker
    rss = psutil.Process().memory_info().rss
    for budget, level in ((rss * 2, 0), (rss / 1.05, 1), (rss / 1.18, 2), (rss / 1.5, 3)):
        rig.gov.memory.budget = int(budget)
        rig.gov.tick(0)
        assert rig.gov.memory.level == level, (budget, level)
    assert "MiB budget" in rig.gov.memory.reason
