"""Reading the machine: thermal zones (and, with the governor, cpufreq, memory and pressure) under a root that
tests and QEMU can point at a fake sysfs tree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ThermalZone:
    name: str
    type: str
    celsius: float


def thermal_zones(root: str | Path = "/") -> list[ThermalZone]:
    """Every readable thermal zone; an empty list means the machine has no thermal sensor (QEMU has none)."""
    zones = []
    for z in sorted(Path(root, "sys/class/thermal").glob("thermal_zone*")):
        try:
            zones.append(ThermalZone(z.name, (z / "type").read_text().strip(), int((z / "temp").read_text()) / 1000))
        except (OSError, ValueError):
            continue  # a zone that cannot be read right now is skipped, not an error
    return zones
