"""Reading the machine: thermal zones, cpufreq, memory, pressure stall information and the Raspberry Pi's throttle
flags, all under a root directory that tests and QEMU can point at a fake sysfs/procfs tree.

Nothing here raises for a missing sensor: a machine without thermal zones (QEMU), without PSI (older kernels) or
without `vcgencmd` (anything but a Pi) is a state the status reports, not an error. A file that exists but cannot
be parsed right now (a zone mid-update) is skipped for this reading.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63

# Bits of `vcgencmd get_throttled` (Raspberry Pi documentation, "vcgencmd get_throttled").
THROTTLE_BITS = {
    0: "under-voltage",
    1: "arm frequency capped",
    2: "throttled",
    3: "soft temperature limit",
    16: "under-voltage has occurred",
    17: "arm frequency capping has occurred",
    18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}


@dataclass(frozen=True)
class TripPoint:
    type: str  # passive | active | hot | critical
    celsius: float


@dataclass(frozen=True)
class ThermalZone:
    name: str
    type: str
    celsius: float
    trips: tuple[TripPoint, ...] = ()


@dataclass(frozen=True)
class CpuFreq:
    cpu: str
    cur_khz: int
    max_khz: int


@dataclass(frozen=True)
class Pressure:
    """One /proc/pressure file: the share of time (percent) some or all tasks stalled waiting for the resource."""

    some_avg10: float = 0.0
    some_avg60: float = 0.0
    full_avg10: float = 0.0
    full_avg60: float = 0.0


@dataclass(frozen=True)
class Memory:
    total: int
    available: int
    cgroup_limit: int | None = None  # memory.max of this process's cgroup; None when unlimited or unknown
    cgroup_current: int | None = None

    @property
    def headroom(self) -> int:
        """What can still be allocated: the machine's available memory, or the cgroup's room if that is less."""
        if self.cgroup_limit is not None and self.cgroup_current is not None:
            return min(self.available, max(0, self.cgroup_limit - self.cgroup_current))
        return self.available


@dataclass(frozen=True)
class Throttle:
    raw: int
    flags: tuple[str, ...]

    @property
    def now(self) -> tuple[str, ...]:
        return tuple(f for f in self.flags if "occurred" not in f)


@dataclass(frozen=True)
class Reading:
    at: float
    zones: tuple[ThermalZone, ...] = ()
    cpufreq: tuple[CpuFreq, ...] = ()
    memory: Memory | None = None
    psi_memory: Pressure | None = None  # None: the kernel has no PSI (or it is disabled)
    psi_cpu: Pressure | None = None
    throttle: Throttle | None = None  # None: not a Raspberry Pi (no vcgencmd)
    errors: tuple[str, ...] = field(default=())

    def zone(self, wanted: str = "") -> ThermalZone | None:
        """The zone named or typed `wanted`; with no name, the hottest (the one that limits the board)."""
        if wanted:
            return next((z for z in self.zones if wanted in (z.name, z.type)), None)
        return max(self.zones, key=lambda z: z.celsius, default=None)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def thermal_zones(root: str | Path = "/") -> list[ThermalZone]:
    """Every readable thermal zone with its trip points; an empty list means the machine has no thermal sensor
    (QEMU has none)."""
    zones = []
    for z in sorted(Path(root, "sys/class/thermal").glob("thermal_zone*"), key=lambda p: _zone_number(p.name)):
        milli = _int(z / "temp")
        if milli is None:
            continue  # a zone that cannot be read right now is skipped, not an error
        trips = []
        for t in sorted(z.glob("trip_point_*_temp")):
            n = t.name.removeprefix("trip_point_").removesuffix("_temp")
            temp = _int(t)
            if temp is not None:
                trips.append(TripPoint(_read(z / f"trip_point_{n}_type") or "unknown", temp / 1000))
        zones.append(ThermalZone(z.name, _read(z / "type") or "unknown", milli / 1000, tuple(trips)))
    return zones


def _zone_number(name: str) -> int:
    digits = name.removeprefix("thermal_zone")
    return int(digits) if digits.isdigit() else 0


def cpufreq(root: str | Path = "/") -> list[CpuFreq]:
    out = []
    for c in sorted(Path(root, "sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq")):
        cur = _int(c / "scaling_cur_freq")
        mx = _int(c / "cpuinfo_max_freq") or _int(c / "scaling_max_freq")
        if cur is not None and mx:
            out.append(CpuFreq(c.parent.name, cur, mx))
    return out


def pressure(root: str | Path, resource: str) -> Pressure | None:
    """/proc/pressure/RESOURCE, e.g. `some avg10=0.00 avg60=0.00 avg300=0.00 total=0`; None when absent."""
    text = _read(Path(root, "proc/pressure", resource))
    if text is None:
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        for pair in pairs:
            key, _, v = pair.partition("=")
            if key in ("avg10", "avg60"):
                try:
                    values[f"{kind}_{key}"] = float(v)
                except ValueError:
                    pass
    return Pressure(**{k: values[k] for k in values if k in Pressure.__dataclass_fields__})


def _cgroup_memory(root: Path) -> tuple[int | None, int | None]:
    """(limit, current) of this process's memory cgroup, v2 or v1; (None, None) when unlimited or unknown."""
    text = _read(root / "proc/self/cgroup") or ""
    for line in text.splitlines():
        hid, controllers, path = [*line.split(":", 2), "", ""][:3]
        rel = path.lstrip("/")
        if hid == "0" and controllers == "":  # v2: one unified hierarchy
            d = root / "sys/fs/cgroup" / rel
            limit_text = _read(d / "memory.max")
            if limit_text is not None:
                limit = None if limit_text == "max" or not limit_text.isdigit() else int(limit_text)
                return _limited(limit), _active(_int(d / "memory.current"), d, "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            d = root / "sys/fs/cgroup/memory" / rel
            usage = _active(_int(d / "memory.usage_in_bytes"), d, "total_inactive_file")
            return _limited(_int(d / "memory.limit_in_bytes")), usage
    return None, None


def _active(usage: int | None, d: Path, inactive_key: str) -> int | None:
    """A cgroup's usage counts the page cache; its inactive file pages are the first thing the kernel reclaims, so
    they are not counted as used (as `docker stats` does)."""
    if usage is None:
        return None
    for line in (_read(d / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == inactive_key and value.strip().isdigit():
            return max(0, usage - int(value))
    return usage


def _limited(limit: int | None) -> int | None:
    return limit if limit is not None and limit < UNLIMITED else None


def memory(root: str | Path = "/") -> Memory:
    """psutil on the real machine; /proc/meminfo and the cgroup under a fake root when the tree provides them (a
    tree with only thermal zones, as the image test uses, still reads the real machine's memory)."""
    r = Path(root)
    limit, current = _cgroup_memory(r if (r / "proc/self/cgroup").exists() else Path("/"))
    meminfo = r / "proc/meminfo"
    if r.resolve() != Path("/") and meminfo.exists():
        fields: dict[str, int] = {}
        for line in (_read(meminfo) or "").splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0]) * 1024
        return Memory(fields.get("MemTotal", 0), fields.get("MemAvailable", 0), limit, current)
    vm = psutil.virtual_memory()
    return Memory(int(vm.total), int(vm.available), limit, current)


def throttle_flags(vcgencmd: str | None) -> Throttle | None:
    """`vcgencmd get_throttled` (prints `throttled=0x50005`); None when there is no vcgencmd or it fails."""
    if not vcgencmd:
        return None
    try:
        out = subprocess.run(
            [vcgencmd, "get_throttled"], capture_output=True, text=True, timeout=2, check=True
        ).stdout.strip()
        raw = int(out.partition("=")[2], 16)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return Throttle(raw, tuple(name for bit, name in THROTTLE_BITS.items() if raw >> bit & 1))


class Sensors:
    """Everything the governor reads, in one `read()`. `vcgencmd` defaults to the one on PATH when reading the real
    machine (root /); tests pass a fake script."""

    def __init__(self, root: str | os.PathLike[str] = "/", vcgencmd: str | None = "") -> None:
        self.root = Path(root)
        if vcgencmd == "":
            vcgencmd = shutil.which("vcgencmd") if self.root.resolve() == Path("/") else None
        self.vcgencmd = vcgencmd

    def read(self) -> Reading:
        errors = []
        try:
            mem: Memory | None = memory(self.root)
        except (OSError, ValueError) as e:  # psutil cannot read /proc (a sandbox); the governor goes on without it
            mem, errors = None, [f"memory: {e}"]
        return Reading(
            at=time.time(),
            zones=tuple(thermal_zones(self.root)),
            cpufreq=tuple(cpufreq(self.root)),
            memory=mem,
            psi_memory=pressure(self.root, "memory"),
            psi_cpu=pressure(self.root, "cpu"),
            throttle=throttle_flags(self.vcgencmd),
            errors=tuple(errors),
        )
