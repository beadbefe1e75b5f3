"""systemd's watchdog in the image (issue 5): a SIGSTOPped supervisor sends no WATCHDOG=1, so systemd kills it
after WatchdogSec= and starts it again; the database's `starts` rows show it. The stop is done inside the guest
by llmos-test-sigstop.service, which runs only when QEMU passes its credential over SMBIOS. The card is one whose
version was already accepted (its UKI blessed): on a new version's first boot the health gate would rightly count
the watchdog's restart against it and reboot (tests/image/test_update.py covers the gate)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from conftest import Boot, bless, boot, card, copy_from_var, esp_files, wait_ready

CREDENTIAL = ["-smbios", "type=11,value=io.systemd.credential:llmos.test.sigstop=1"]


def test_a_sigstopped_supervisor_is_restarted_by_systemd(image: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    card(image, disk)
    blessed = bless(disk)
    b: Boot = boot(disk, "watchdog", extra=CREDENTIAL)
    try:
        # The fault unit stops the supervisor right after READY; WatchdogSec=30 later systemd kills it and starts a
        # new one. boot() may already have waited through that (it polls /status until ready); if not, give the
        # watchdog its 30 s plus the restart delay, then wait for the new supervisor. The database proves which.
        time.sleep(45)
        b.console.read_some(1)  # answers to /status lines typed while it was stopped
        wait_ready(b.console, 300)
        assert b.console.ask("ping") == "pong"
        b.shutdown()
    except BaseException:
        if b.vm is not None:
            b.vm.close()
        raise
    db = sqlite3.connect(copy_from_var(disk, "/lib/llmos", tmp_path / "var") / "llmos.db")
    starts = db.execute("SELECT id, stopped_at, exit_reason FROM starts ORDER BY id").fetchall()
    assert len(starts) == 2, starts
    assert starts[0][1] is None, "the stopped supervisor cannot have recorded a clean stop"
    assert starts[1][2] == "SIGTERM", "the restarted supervisor stopped cleanly at power-off"
    assert blessed in esp_files(disk), "one boot, no reboot by the health gate"


@pytest.fixture(autouse=True)
def _only_in_qemu(serial_url: str) -> None:
    if serial_url:
        pytest.skip("needs the VM's SMBIOS credential")
