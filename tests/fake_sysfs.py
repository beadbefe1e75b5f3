"""A sysfs-like fake thermal zone, for tests and benchmarks that point `governor.sensors_root` at a directory.

The governor reads `sys/class/thermal/thermal_zone*/{type,temp,trip_point_*}` under its sensors root, so a test can
make the board as hot as it needs by writing those files, on machines whose own sensors are absent (QEMU) or
unrelated (a CI runner).
"""

from __future__ import annotations

import os
from pathlib import Path


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
