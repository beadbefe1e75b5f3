"""Flash wear (issue 14, point 5): how many bytes the device writes to the partition that holds the database.

An SD card or USB stick wears out by the bytes written to it, not by the bytes the database holds. The kernel counts
the sectors written to every block device (`/sys/dev/block/MAJ:MIN/stat`, the 7th field, in 512-byte units: what the
card itself received, file system metadata and journal included), and ext4 counts its whole life's writes
(`/sys/fs/ext4/DEV/lifetime_write_kbytes`, kept across boots in the superblock).

The meter reads the counter at each of the sampler's ticks and sorts the interval by whether requests finished in it:
idle intervals give the write rate of a device doing nothing (the samples, the journal), busy ones, less that idle
rate, the bytes a request costs. From the two, the bytes a day at one request a minute (the issue's target: 5 MB).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
DAY_S = 86400.0
TARGET_DAY_BYTES = 5_000_000  # issue 14: at most 5 MB a day at one request a minute
REQUESTS_A_DAY = 1440  # one a minute
# Intervals before the system has been up this long are counted in the total only: a boot's own writes (the journal
# flushed to /var, the database opened and pruned, the first model check: 20 to 30 MB an hour in the first minutes
# under QEMU) and its one-off timers (systemd-tmpfiles-clean.timer's first run at 15 minutes of uptime; after that it
# runs daily, and is then part of the idle rate) would otherwise pass for the idle rate of a device that has been up
# for hours. With 2 minutes, `make bench-wear` (2026-12-03) had the device say 314.6 kB an idle hour and 7.5 MB a
# day at 72 minutes of uptime while the same hour's steady writes were 133 kB and 3.5 MB a day. Uptime, not the
# supervisor's own time: a supervisor restarted after days has nothing of the boot's to wait out.
SETTLE_S = 17 * 60.0


@dataclass(frozen=True)
class Device:
    mount: str  # the mount point that holds the path (/var on the appliance)
    fstype: str
    major_minor: str  # "254:3"
    name: str  # the kernel's name of the device: "vda3", "nbd0p3", "mmcblk0p3"


def device_of(path: str | Path, proc_root: str | Path = "/proc", sys_root: str | Path = "/sys") -> Device | None:
    """The block device of the file system that holds `path` (the longest mount point above it), or None when it is
    not on a block device (a tmpfs, an overlay) or /proc cannot be read."""
    target = os.path.realpath(path)
    try:
        text = (Path(proc_root) / "self" / "mountinfo").read_text()
    except OSError:
        return None
    best: Device | None = None
    for line in text.splitlines():
        # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue" (proc(5))
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 5 or not rest:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best.mount)):
            majmin = fields[2]
            name = os.path.basename(os.path.realpath(Path(sys_root) / "dev" / "block" / majmin))
            best = Device(mount, rest[0], majmin, name)
    if best is None or not (Path(sys_root) / "dev" / "block" / best.major_minor / "stat").exists():
        return None
    return best


def written_bytes(device: Device, sys_root: str | Path = "/sys") -> int | None:
    """Bytes written to `device` since the kernel started (block(5)'s stat: write sectors, the 7th field)."""
    try:
        fields = (Path(sys_root) / "dev" / "block" / device.major_minor / "stat").read_text().split()
        return int(fields[6]) * SECTOR
    except (OSError, IndexError, ValueError):
        return None


def lifetime_bytes(device: Device, sys_root: str | Path = "/sys") -> int | None:
    """ext4's count of every byte written to the file system in its life (across boots), or None."""
    try:
        return int((Path(sys_root) / "fs" / "ext4" / device.name / "lifetime_write_kbytes").read_text()) * 1024
    except (OSError, ValueError):
        return None


def size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


class WearMeter:
    """Written bytes of the database's partition, split into idle and per-request (see the module's docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        proc_root: str | Path = "/proc",
        sys_root: str | Path = "/sys",
        settle_s: float = SETTLE_S,
    ) -> None:
        self.sys_root = sys_root
        self.uptime_path = Path(proc_root) / "uptime"
        self.settle_s = settle_s
        self.elapsed = 0.0  # seconds of ticks so far
        self.device = device_of(path, proc_root, sys_root)
        self._lock = threading.Lock()
        self.first = self._read()
        self._last = self.first
        self.idle_bytes = self.idle_s = 0.0
        self.busy_bytes = self.busy_s = 0.0
        self.requests = 0

    def _read(self) -> int | None:
        return None if self.device is None else written_bytes(self.device, self.sys_root)

    def tick(self, seconds: float, requests: int) -> None:
        """One interval of `seconds` that ended now, in which `requests` requests finished."""
        now = self._read()
        with self._lock:
            if now is None or self._last is None:
                self._last = now
                return
            delta, self._last = max(0, now - self._last), now
            self.elapsed += seconds
            if self._uptime() - seconds < self.settle_s:  # the interval began before the system had settled
                return
            if requests:
                self.busy_bytes += delta
                self.busy_s += seconds
                self.requests += requests
            else:
                self.idle_bytes += delta
                self.idle_s += seconds

    def _uptime(self) -> float:
        """Seconds since boot (proc(5)'s uptime), or the meter's own ticks where there is no /proc."""
        try:
            return float(self.uptime_path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return self.elapsed

    def idle_per_hour(self) -> float | None:
        return self.idle_bytes / self.idle_s * 3600 if self.idle_s > 0 else None

    def per_request(self) -> float | None:
        """A request's bytes: a busy interval's writes less what the idle rate would have written in it."""
        if not self.requests:
            return None
        idle = (self.idle_per_hour() or 0.0) / 3600 * self.busy_s
        return max(0.0, self.busy_bytes - idle) / self.requests

    def a_day(self) -> float | None:
        """Bytes a day at one request a minute, from the two rates; None until both have been seen."""
        hourly, each = self.idle_per_hour(), self.per_request()
        if hourly is None or each is None:
            return None
        return hourly * 24 + each * REQUESTS_A_DAY

    def line(self) -> str:
        if self.device is None or self.first is None:
            return "flash: no block device under the database (nothing to count)"
        with self._lock:
            since = (self._last or self.first) - self.first
            hourly, each, day = self.idle_per_hour(), self.per_request(), self.a_day()
        parts = [f"flash: {size(since)} written to {self.device.mount} ({self.device.name}) since start"]
        parts.append(f"idle {size(hourly)}/h" if hourly is not None else "idle rate not measured yet")
        parts.append(f"{size(each)} a request" if each is not None else "no request measured yet")
        if day is not None:
            parts.append(f"{size(day)} a day at one request a minute (target {size(TARGET_DAY_BYTES)})")
        life = lifetime_bytes(self.device, self.sys_root)
        if life is not None:
            parts.append(f"{size(life)} in the file system's life")
        return "; ".join(parts)
