"""A simulated board for the thermal benchmark and the governor's tests: a first-order thermal model, heated either
by a share of full load (the tests) or by watts from a power model of a Raspberry Pi 5 (the benchmark), and a fake
thermal zone the governor reads.

Tests, the thermal benchmark and the image test need a board that heats up when llmos-edge works and cools when it
rests, on machines whose own sensors are absent (QEMU) or unrelated (a CI runner). The thermal model is the simplest
one that shows the behaviour a governor must handle, a lag between power and temperature:

    C · dT/dt = P - (T - T_ambient) / R,      tau = R · C

solved exactly over each step (T approaches its steady state T_ss = T_ambient + R · P exponentially with time
constant tau), so a large step is as accurate as many small ones.

The defaults describe a Raspberry Pi 5 (BCM2712, 4x Cortex-A76 at 2.4 GHz) on a desk without heatsink or fan. Public
figures (sources in BENCHMARKS.md, "Thermal"): idle at the wall 2.4 W (Compute Module 5) to 3.1 W (Pi 500), same SoC;
stress-ng --matrix on all four cores 8.5-9 W, i.e. about 1.5 W per core at 2.4 GHz; VDD_CORE about 0.90 V under load;
a bare Pi 5 idles near 50 °C and averaged 81 °C (peak 89 °C, throttled) through a benchmark suite. Assumed: 25 °C
room; idle 2.8 W; R = 9 K/W (idle at 50 °C); tau = 100 s (the climb to the firmware's 80 °C in one to two minutes
that reviews describe); a decoding core draws 3/4 of a stress-ng core (1.125 W: decode waits on DRAM about half the
time), so the four cores add 4.5 W; the voltage falls linearly with the clock to 0.72 V at 1.5 GHz.

`load` (tests) is the share of the board's CPU in use, 0..1: P = P_idle + P_load · load. `Pi5Power.watts` (the
benchmark) is the board's power with `active_cores` cores decoding at `ghz`: P_idle + active_cores · P_core(f), with
P_core(f) = P_core(2.4 GHz) · (V(f) / V(2.4 GHz))^2 · f / 2.4 GHz (dynamic power C·V²·f; the static power of the
board and of idle cores is in P_idle). `CpuProbe` measures a process's real CPU use (psutil); `SimulatedZone` turns
it into a zone for the image test's and the integration tests' rigs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.fake_sysfs import write_zone


@dataclass(frozen=True)
class BoardModel:
    name: str = "Raspberry Pi 5, bare board (no heatsink, no fan)"
    ambient_c: float = 25.0
    r_th: float = 9.0  # K/W, SoC to room air through the board
    tau_s: float = 100.0  # s, R·C
    idle_w: float = 2.8  # W with the CPU idle
    load_w: float = 4.5  # W added with the whole CPU busy

    def power(self, load: float) -> float:
        return self.idle_w + self.load_w * min(1.0, max(0.0, load))

    def steady_state(self, load: float) -> float:
        return self.ambient_c + self.r_th * self.power(load)

    def load_for(self, celsius: float) -> float:
        """The constant load that holds the board at `celsius` (the best a perfect controller can do)."""
        return ((celsius - self.ambient_c) / self.r_th - self.idle_w) / self.load_w


@dataclass(frozen=True)
class Pi5Power:
    """Board power from how many cores decode and at what clock (see the module docstring for the figures)."""

    idle_w: float = 2.8  # W, the board with its cores idle (static power included)
    core_w: float = 1.125  # W, one core decoding at f_max
    cores: int = 4
    f_max_ghz: float = 2.4
    f_min_ghz: float = 1.5  # the firmware's lowest arm clock under thermal throttling (assumed)
    v_max: float = 0.90  # V at f_max
    v_min: float = 0.72  # V at f_min (assumed)

    def volts(self, ghz: float) -> float:
        x = (ghz - self.f_min_ghz) / (self.f_max_ghz - self.f_min_ghz)
        return self.v_min + (self.v_max - self.v_min) * min(1.0, max(0.0, x))

    def core_watts(self, ghz: float) -> float:
        return self.core_w * (self.volts(ghz) / self.v_max) ** 2 * ghz / self.f_max_ghz

    def watts(self, active_cores: float, ghz: float) -> float:
        return self.idle_w + min(float(self.cores), max(0.0, active_cores)) * self.core_watts(ghz)


class ThermalSim:
    def __init__(self, board: BoardModel | None = None, celsius: float | None = None) -> None:
        self.board = board or BoardModel()
        self.celsius = self.board.steady_state(0.0) if celsius is None else celsius
        self.time = 0.0  # simulated seconds

    def step(self, load: float, dt: float) -> float:
        """Advance `dt` simulated seconds at a constant `load`; return the new temperature."""
        target = self.board.steady_state(load)
        self.celsius = target + (self.celsius - target) * math.exp(-dt / self.board.tau_s)
        self.time += dt
        return self.celsius

    def step_watts(self, watts: float, dt: float) -> float:
        """Advance `dt` simulated seconds at a constant power; return the new temperature."""
        target = self.board.ambient_c + self.board.r_th * watts
        self.celsius = target + (self.celsius - target) * math.exp(-dt / self.board.tau_s)
        self.time += dt
        return self.celsius


class CpuProbe:
    """The real CPU use of a process (all its threads), as a share of `full_cores`, between successive samples."""

    def __init__(self, pid: Callable[[], int | None], full_cores: float) -> None:
        self.pid = pid
        self.full_cores = full_cores
        self._last: tuple[int, float, float] | None = None  # pid, cpu seconds, wall time

    def _cpu(self, pid: int) -> float | None:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return None
        return float(t.user + t.system)

    def sample_cores(self) -> tuple[float, float]:
        """(cores in use, wall seconds since the previous sample), uncapped. A new or vanished process reads as
        idle."""
        now = time.monotonic()
        pid = self.pid()
        cpu = self._cpu(pid) if pid else None
        last, self._last = self._last, (pid or 0, cpu or 0.0, now)
        if last is None or cpu is None or last[0] != pid:
            return 0.0, 0.0 if last is None else now - last[2]
        wall = now - last[2]
        if wall <= 0:
            return 0.0, 0.0
        return max(0.0, (cpu - last[1]) / wall), wall

    def sample(self) -> tuple[float, float]:
        """(load 0..1, wall seconds since the previous sample): cores in use as a share of `full_cores`."""
        cores, wall = self.sample_cores()
        return min(1.0, cores / self.full_cores), wall


class SimulatedZone:
    """Probe -> model -> zone file. `time_scale` > 1 runs the board's thermal time faster than the wall clock (the
    benchmark uses it to see minutes of board time in seconds; equivalent to a board with tau / time_scale)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        probe: CpuProbe,
        sim: ThermalSim | None = None,
        time_scale: float = 1.0,
    ) -> None:
        self.root = Path(root)
        self.probe = probe
        self.sim = sim or ThermalSim()
        self.time_scale = time_scale
        self.load = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        write_zone(self.root, self.sim.celsius)

    def update(self) -> float:
        self.load, wall = self.probe.sample()
        celsius = self.sim.step(self.load, wall * self.time_scale)
        write_zone(self.root, celsius)
        return celsius

    def start(self, period: float = 0.05) -> None:
        def loop() -> None:
            while not self._stop.wait(period):
                self.update()

        self._thread = threading.Thread(target=loop, name="thermal-sim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.thermal_sim",
        description="Write a fake thermal zone under ROOT: a constant temperature, or a simulated board heated by "
        "the CPU use of a process.",
    )
    ap.add_argument("--root", required=True, type=Path, help="directory the governor reads as its sensors_root")
    ap.add_argument("--temp", type=float, help="hold this temperature (°C) and exit")
    ap.add_argument("--pid", type=int, help="process whose CPU use heats the board")
    ap.add_argument("--full-cores", type=float, default=float(os.cpu_count() or 1), help="CPU use that is full load")
    ap.add_argument("--time-scale", type=float, default=1.0, help="board seconds per wall second")
    args = ap.parse_args(argv)
    if args.temp is not None:
        write_zone(args.root, args.temp)
        return 0
    if args.pid is None:
        ap.error("give --temp or --pid")
    pid = args.pid
    zone = SimulatedZone(args.root, CpuProbe(lambda: pid, args.full_cores), time_scale=args.time_scale)
    try:
        while psutil.pid_exists(pid):
            time.sleep(0.1)
            print(f"{zone.update():.2f} C load {zone.load:.2f}", flush=True)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
