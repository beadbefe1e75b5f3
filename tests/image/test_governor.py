"""The governor in the booted image: QEMU has no thermal sensor (the status says so), and a fake hot thermal zone
given through the config override is throttled, visibly in /status and in the log.

The fake zone is a sysfs-like tree written by tests/fake_sysfs.py into the var partition of a copy of the disk
(debugfs, no mount), with an override /var/lib/llmos/llmos.yaml pointing governor.sensors_root at it.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, TEST_DISK_BYTES, Boot, boot, copy_from_var, journal, write_to_var

sys.path.insert(0, str(ROOT))
from tests.fake_sysfs import write_zone

HOT = 77.0  # above the 75 °C setpoint, below the 85 °C critical limit: throttled, still answering
SIM_ROOT = "/lib/llmos-thermal-sim"  # in the var partition, i.e. /var/lib/llmos-thermal-sim on the device


@pytest.fixture(scope="module")
def hot_device(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Boot, Path]]:
    work = tmp_path_factory.mktemp("governor")
    disk = work / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(image), str(disk)], check=True)
    subprocess.run(["truncate", "-s", str(max(TEST_DISK_BYTES, disk.stat().st_size)), str(disk)], check=True)
    local = work / "tree"
    zone = write_zone(local, HOT)
    override = work / "llmos.yaml"
    override.write_text(f"governor:\n  sensors_root: /var{SIM_ROOT}\n  interval: 0.5\n")
    files = {f"{SIM_ROOT}/sys/class/thermal/thermal_zone0/{f.name}": f for f in sorted(zone.iterdir())}
    files["/lib/llmos/llmos.yaml"] = override
    write_to_var(disk, work, files)
    b = boot(disk, "governor-hot")
    yield b, disk
    if b.vm is not None:  # still running when the test failed half-way: stop it (by PID)
        b.vm.close()


def test_qemu_has_no_thermal_sensor_and_says_so(device: Boot) -> None:
    if device.vm is None:
        pytest.skip("a real device may well have a thermal sensor")
    text = device.console.ask("/status")
    assert "thermal: no thermal sensor (not throttling)" in text
    assert "memory budget: engine" in text and "estimate" in text


def test_a_fake_hot_zone_is_throttled_in_status_and_log(hot_device: tuple[Boot, Path], tmp_path: Path) -> None:
    b, disk = hot_device
    text = b.console.ask("/status")
    assert f"thermal: cpu-thermal {HOT:.1f} C, setpoint 75 C, critical 85 C; throttling" in text, text
    assert b.console.ask("ping") == "pong"  # throttled, not stopped
    b.shutdown()
    db = copy_from_var(disk, "/lib/llmos", tmp_path / "var") / "llmos.db"
    rows = sqlite3.connect(db).execute("SELECT message, data FROM events WHERE kind = 'governor'").fetchall()
    actions = [json.loads(d)["action"] for _, d in rows]
    assert "throttle" in actions, rows
    assert "event governor:" in journal(disk, tmp_path / "journal", "-u", "llmos")
