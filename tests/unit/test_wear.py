"""Flash wear (llmos_edge/wear.py): the database's block device found through mountinfo, its written sectors read
from sysfs, and the bytes sorted into idle and per-request. The /proc and /sys trees are files in the kernel's own
formats (proc(5), the kernel's Documentation/block/stat.rst); the image test reads the real ones."""

from __future__ import annotations

import os
from pathlib import Path

from llmos_edge.wear import SETTLE_S, WearMeter, device_of, lifetime_bytes, written_bytes

MOUNTINFO = """\
22 1 254:2 / / ro,relatime shared:1 - erofs /dev/vda2 ro,user_xattr
25 22 0:22 / /tmp rw,nosuid,nodev shared:5 - tmpfs tmpfs rw
30 22 254:3 / /var rw,relatime shared:7 - ext4 /dev/vda3 rw
41 30 254:3 /lib/llmos /var/lib/llmos rw,nosuid,nodev,noexec,relatime shared:7 - ext4 /dev/vda3 rw
"""


def fake_machine(tmp_path: Path, sectors: int) -> tuple[Path, Path]:
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(MOUNTINFO)
    dev = sys / "devices" / "pci0000:00" / "virtio2" / "block" / "vda" / "vda3"
    dev.mkdir(parents=True)
    (sys / "dev" / "block").mkdir(parents=True)
    os.symlink(dev, sys / "dev" / "block" / "254:3")
    set_sectors(sys, sectors)
    (sys / "fs" / "ext4" / "vda3").mkdir(parents=True)
    (sys / "fs" / "ext4" / "vda3" / "lifetime_write_kbytes").write_text("48828\n")
    return proc, sys


def set_sectors(sys: Path, sectors: int) -> None:
    # read I/Os, merges, sectors, ticks; write I/Os, merges, SECTORS, ticks; in flight, io ticks, queue...
    line = f"  1200  30  96000  500  {sectors // 8}  10  {sectors}  900  0  1300  1400  0  0  0  0  0  0\n"
    (sys / "dev" / "block" / "254:3" / "stat").write_text(line)


def test_the_database_partition_is_found_through_the_longest_mount(tmp_path: Path) -> None:
    proc, sys = fake_machine(tmp_path, 2000)
    dev = device_of("/var/lib/llmos/llmos.db", proc, sys)
    assert dev is not None
    assert (dev.mount, dev.fstype, dev.major_minor, dev.name) == ("/var/lib/llmos", "ext4", "254:3", "vda3")
    assert written_bytes(dev, sys) == 2000 * 512
    assert lifetime_bytes(dev, sys) == 48828 * 1024
    assert device_of("/tmp/x", proc, sys) is None  # a tmpfs: no block device to wear


def set_uptime(proc: Path, seconds: float) -> None:
    (proc / "uptime").write_text(f"{seconds:.2f} {2 * seconds:.2f}\n")


def test_idle_and_request_bytes_are_told_apart(tmp_path: Path) -> None:
    proc, sys = fake_machine(tmp_path, 0)
    m = WearMeter("/var/lib/llmos", proc_root=proc, sys_root=sys)
    assert "idle rate not measured yet" in m.line()
    written, up = 0, 3600.0  # a supervisor started an hour after the boot
    for _ in range(6):  # an idle hour in 10-minute ticks: 200 sectors (102.4 kB) each
        written, up = written + 200, up + 600
        set_sectors(sys, written)
        set_uptime(proc, up)
        m.tick(600, 0)
    for _ in range(2):  # two busy ticks of 10 minutes with 5 requests each: idle's 200 sectors + 5 x 80
        written, up = written + 200 + 5 * 80, up + 600
        set_sectors(sys, written)
        set_uptime(proc, up)
        m.tick(600, 5)
    assert m.idle_per_hour() == 1200 * 512
    assert m.per_request() == 80 * 512
    day = m.a_day()
    assert day is not None and round(day) == 1200 * 512 * 24 + 80 * 512 * 1440
    line = m.line()
    assert "idle 614.4 kB/h" in line and "41.0 kB a request" in line and "in the file system's life" in line, line


def test_without_a_block_device_the_line_says_so(tmp_path: Path) -> None:
    proc, sys = fake_machine(tmp_path, 0)
    m = WearMeter("/tmp", proc_root=proc, sys_root=sys)
    m.tick(10, 1)  # nothing to read: no failure
    assert m.line() == "flash: no block device under the database (nothing to count)"


def test_the_boots_own_writes_are_not_taken_for_the_idle_rate(tmp_path: Path) -> None:
    """The first SETTLE_S of uptime (the boot's writes, its one-off timers) count in the total only."""
    proc, sys = fake_machine(tmp_path, 0)
    m = WearMeter("/var/lib/llmos", proc_root=proc, sys_root=sys)
    written, up = 0, 30.0  # the supervisor starts 30 s into the boot
    while up < SETTLE_S + 600:  # ticks of 60 s: a 20 MB burst at the start and one at 15 minutes, else 10 sectors
        up += 60
        written += (40000 if up in (90, 900 + 30) else 0) + 10
        set_sectors(sys, written)
        set_uptime(proc, up)
        m.tick(60, 0)
    assert m.idle_per_hour() == 10 * 512 * 60  # the quiet ticks' rate, not the bursts
    assert "41.1 MB written to /var/lib/llmos (vda3) since start" in m.line(), m.line()


def test_a_supervisor_restarted_long_after_the_boot_measures_at_once(tmp_path: Path) -> None:
    proc, sys = fake_machine(tmp_path, 0)
    set_uptime(proc, 86400)
    m = WearMeter("/var/lib/llmos", proc_root=proc, sys_root=sys)
    set_sectors(sys, 100)
    set_uptime(proc, 86460)
    m.tick(60, 0)
    assert m.idle_per_hour() == 100 * 512 * 60
