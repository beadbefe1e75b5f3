"""The thermal benchmark's plant: the Raspberry Pi 5 power model and the firmware-like throttle it is judged against
(bench/thermal_sim.py, bench/thermal.py). Their figures are the benchmark's; these tests hold the arithmetic to them."""

from __future__ import annotations

import pytest

from bench import thermal
from bench.thermal_sim import BoardModel, Pi5Power, ThermalSim


def test_power_is_idle_plus_c_v2_f_per_active_core() -> None:
    p = Pi5Power()
    assert p.watts(0, 2.4) == pytest.approx(p.idle_w)
    assert p.watts(4, 2.4) == pytest.approx(2.8 + 4 * 1.125)
    # 1.5 GHz at 0.72 V against 2.4 GHz at 0.90 V: (0.72 / 0.90)^2 * 1.5 / 2.4 = 0.4 of the power per core
    assert p.core_watts(1.5) / p.core_watts(2.4) == pytest.approx(0.4)
    assert p.watts(2, 2.4) < p.watts(3, 2.4) < p.watts(4, 2.4)
    assert p.watts(9, 2.4) == p.watts(4, 2.4)  # no more cores than the Pi has


def test_the_board_settles_at_ambient_plus_r_times_power() -> None:
    sim = ThermalSim(BoardModel())
    for _ in range(2000):
        sim.step_watts(5.0, 1.0)
    assert sim.celsius == pytest.approx(25.0 + 9.0 * 5.0, abs=0.01)


def test_firmware_throttle_steps_down_through_its_band() -> None:
    fw = thermal.FirmwareThrottle(limit=85.0)
    assert fw.ghz(60.0) == 2.4 and fw.ghz(80.0) == 2.4
    assert fw.ghz(82.5) == 1.9  # halfway: 1.95 GHz, taken down to its 100 MHz step
    assert fw.ghz(85.0) == 1.5 and fw.ghz(95.0) == 1.5
    clocks = [fw.ghz(80.0 + i / 10) for i in range(60)]
    assert clocks == sorted(clocks, reverse=True)
    assert all(round(c * 10) == pytest.approx(c * 10) for c in clocks)


def test_a_lower_clock_slows_decode_less_than_in_proportion() -> None:
    assert thermal.clock_duty(2.4) == pytest.approx(1.0)
    assert 1.5 / 2.4 < thermal.clock_duty(1.5) < 1.0


def test_the_firmware_limit_chosen_is_the_highest_that_keeps_under_the_ceiling() -> None:
    def peak(limit: int) -> float:
        sim, decide, hottest = ThermalSim(thermal.BOARD), thermal.firmware(limit, 2), 0.0
        for second in range(thermal.DURATION_S):
            _n, _duty, ghz, busy = decide(sim.celsius, float(second))
            hottest = max(hottest, sim.step_watts(thermal.POWER.watts(thermal.PI_CORES * busy, ghz), 1.0))
        return hottest

    limit = thermal.firmware_limit(2)
    assert peak(limit) <= thermal.CEILING_C < peak(limit + 1)
