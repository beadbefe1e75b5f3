"""A first-order thermal model of a board, driven by the engine worker's real CPU use, written to a fake thermal zone.

Tests, the thermal benchmark and the image test need a board that heats up when llmos-edge works and cools when it
rests, on machines whose own sensors are absent (QEMU) or unrelated (a CI runner). The model is the simplest one
that shows the behaviour a governor must handle, a lag between power and temperature:

    C · dT/dt = P(load) - (T - T_ambient) / R,      P(load) = P_idle + P_load · load,      tau = R · C

solved exactly over each step (T approaches its steady state T_ss = T_ambient + R · P exponentially with time
constant tau), so a large step is as accurate as many small ones.

The default parameters describe a Raspberry Pi 5 on a desk without heatsink or fan, from public figures rather than
our own measurement: about 2.7-3 W at idle and 7-8 W with all four cores busy; an idle bare board sits near 50 °C in
a 25 °C room and passes the firmware's 80-85 °C limits within a minute or two of full load. R = 9 K/W puts idle at
50 °C and full load at about 90 °C (the board would throttle long before reaching it); tau = 100 s gives that
one-to-two-minute climb.

`load` is the share of the board's CPU the worker uses, 0..1. `CpuProbe` measures it from psutil (user + system
CPU time of the worker process and all its threads, per second of wall time) divided by `full_cores`, the CPU use
that counts as the board at full load (the worker's thread count, or a figure measured on this machine).
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


def write_zone(
    root: str | os.PathLike[str],
    celsius: float,
    zone: str = "thermal_zone0",
    kind: str = "cpu-thermal",
    trips: tuple[tuple[str, float], ...] = (("passive", 80.0), ("critical", 90.0)),
) -> Path:
    """Write a sysfs-like thermal zone (millidegrees, as the kernel does); replaced atomically so a reader never
    sees a half-written number."""
    d = Path(root, "sys/class/thermal", zone)
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "type").exists():
        (d / "type").write_text(kind + "\n")
        for i, (t, c) in enumerate(trips):
            (d / f"trip_point_{i}_type").write_text(t + "\n")
            (d / f"trip_point_{i}_temp").write_text(f"{round(c * 1000)}\n")
    tmp = d / ".temp.tmp"
    tmp.write_text(f"{round(celsius * 1000)}\n")
    tmp.replace(d / "temp")
    return d


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
        prog="python -m llmos_edge.thermal_sim",
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
