"""A/B updates on the image (docs/updates.md), over the console like a person with a USB stick, and checked on the
disk afterwards.

The image under test runs version V. Two bundles are built from the same configuration (`make update-bundle`):
V.1, a good update, and V.2, built with IMAGE_BROKEN=1 (its supervisor exits 1 at every start). One disk, one UEFI
variable store kept between boots like a board's NVRAM (boot counting lives in the ESP's file names and systemd-boot's
variables); QEMU runs with -no-reboot, so every reboot of the guest ends a QEMU run and the test starts the next.
  1. V with the good stick: `/update /media/UPDATE`; the device verifies, installs and reboots.
  2. V.1 boots (its UKI counted: +3), passes the health gate, is blessed; /status names V.1 and the other slot V;
     what was asked before the update is still in the database. The broken stick is already plugged in, and this
     boot goes on to step 4 (a boot is the expensive part under TCG), unless step 3 runs.
  3. (`make bench-powercut`, marked soak: its two boots and a third bundle do not fit CI's 90 minutes beside the
     rest) a third stick, V.1.1, and a power cut at a random moment of its install, on a disk whose unflushed writes
     the cut loses (nbdkit's writeback cache): the ESP must name only whole slots, and the next boot comes up on V.1.1
     (installed whole before the cut) or V.1 (the install was cut short), with no half-staged update left.
  4. the broken stick: `/update`; V.2 boots and fails its gate three times (each failure reboots), then systemd-boot
     falls back to V.1 by itself, which answers again; V.2's UKI is left with no tries. What was asked on V and V.1
     is in the database, and the journal has both installs.
Building the two bundles takes a few minutes (warm mkosi cache); the boots 15-25 minutes under TCG.

Environment: LLMOS_MAKE_ARGS, extra `make` arguments for building the bundles the way the image was built (for
example IMAGE_CACHE=... IMAGE_WHEELS=... UPDATE_KEY_DIR=... when the image was built with private caches);
LLMOS_UPDATE_BUNDLES, a directory that keeps the bundles between runs.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import serial
import usbstick
from conftest import (
    ARTIFACTS,
    PROMPT,
    ROOT,
    Boot,
    boot,
    card,
    copy_from_var,
    esp_files,
    image_version,
    journal,
    measure,
    partitions,
    start,
    wait_ready,
)
from powercut import seed

# What the tests so far installed and booted, in order (the last is the version running), and how long the good
# install took: the power-cut test cuts within that time, and the broken-update test starts from what it left.
RAN: list[str] = []
INSTALL_S: list[float] = []
RUNNING: list[Boot] = []  # the good update's boot, left running with the broken stick in for the broken update


def running_or_boot(disk: Path, efi_vars: Path, name: str, **options: Any) -> Boot:
    """The boot the good update left running when there is one and nothing else is asked of it (no stick of its
    own, no volatile disk); else that one is powered off cleanly and the disk booted afresh."""
    if RUNNING:
        b = RUNNING.pop()
        if not options:
            return b
        b.shutdown()
    return boot(disk, name, efi_vars=efi_vars, **options)


INSTALL_TIMEOUT = 1800  # verify the 480 MB erofs, write it to the slot under TCG (148 s measured), then reboot
FAILED_BOOT_TIMEOUT = 900  # a broken boot: up to the gate's failure and the reboot it causes


def bundles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the bundles are built: LLMOS_UPDATE_BUNDLES keeps them between runs (a bundle already there, in
    update/<version>/, is used as it is: remove the directory after changing the image), else a temporary one."""
    kept = os.environ.get("LLMOS_UPDATE_BUNDLES")
    return Path(kept).resolve() if kept else tmp_path_factory.mktemp("bundles")


def build_bundle(version: str, out: Path, broken: bool) -> Path:
    """`make update-bundle` for `version` into a build directory of its own (the image under test stays)."""
    bundle = out / "update" / version
    if (bundle / "SHA256SUMS.gpg").is_file():
        return bundle
    args = [
        "make",
        "-C",
        str(ROOT),
        "update-bundle",
        f"IMAGE_VERSION={version}",
        f"IMAGE_DIR={out / ('image-' + version)}",
        f"UPDATE_DIR={out / 'update'}",
        "COMPRESS=none",  # no minutes of xz on the host, nor of decompression under TCG (docs/updates.md)
        *(["IMAGE_BROKEN=1"] if broken else []),
        *shlex.split(os.environ.get("LLMOS_MAKE_ARGS", "")),
    ]
    start_s = time.monotonic()
    subprocess.run(args, check=True)
    measure(f"update_bundle_build_s_{'broken' if broken else 'good'}", round(time.monotonic() - start_s, 1))
    return bundle


def stick_of(bundle_dir: Path, out: Path) -> Path:
    return usbstick.make_stick(out, {p.name: p for p in sorted(bundle_dir.iterdir())}, label="UPDATE")


@pytest.fixture(scope="module")
def versions(image: Path) -> tuple[str, str, str]:
    v = image_version(image)
    return v, f"{v}.1", f"{v}.2"  # later versions sort higher (systemd's version comparison)


@pytest.fixture(scope="module")
def good_stick(versions: tuple[str, str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = bundles_dir(tmp_path_factory)
    return stick_of(build_bundle(versions[1], out, broken=False), tmp_path_factory.mktemp("sticks") / "good.raw")


@pytest.fixture(scope="module")
def cut_bundle(versions: tuple[str, str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    # V.1.1 sorts after V.1 and before V.2 (systemd's version comparison), so the broken V.2 is still the newest
    return build_bundle(f"{versions[1]}.1", bundles_dir(tmp_path_factory), broken=False)


@pytest.fixture(scope="module")
def broken_stick(versions: tuple[str, str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = bundles_dir(tmp_path_factory)
    return stick_of(build_bundle(versions[2], out, broken=True), tmp_path_factory.mktemp("sticks") / "broken.raw")


@pytest.fixture(scope="module")
def device(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("ab")
    yield card(image, tmp / "disk.raw"), tmp / "efi-vars.fd"
    for b in RUNNING:  # a test failed before taking it over: stop its QEMU (by PID)
        b.console.close()
        if b.vm is not None:
            b.vm.close()


def system_line(b: Boot) -> str:
    text = b.console.ask("/status", timeout=60)
    m = re.search(r"^system: .*$", text, re.M)
    assert m, text
    return m.group(0)


def wait_blessed(disk: Path, uki: str, timeout: float = 300) -> None:
    """Wait until the running boot's UKI is renamed to `uki` (no counter): the health gate passed and
    systemd-bless-boot wrote the ESP, which the host reads from the disk file while the guest runs."""
    deadline = time.monotonic() + timeout
    files: list[str] = []
    while uki not in files:
        if time.monotonic() > deadline:
            raise AssertionError(f"{uki} was not blessed within {timeout:.0f} s; the ESP has {files}")
        time.sleep(5)
        try:
            files = esp_files(disk)
        except subprocess.CalledProcessError:  # caught mid-write: look again
            files = []


def update_and_wait_for_the_reboot(b: Boot, stick_path: str = "/media/UPDATE") -> float:
    said = b.console.ask(f"/update {stick_path}")
    assert said.startswith(f"update requested from {stick_path}"), said
    assert b.vm is not None
    start_s = time.monotonic()
    b.vm.wait(INSTALL_TIMEOUT)  # the guest rebooted after installing: QEMU runs with -no-reboot
    b.console.close()
    b.vm.close()
    return time.monotonic() - start_s


def test_a_good_update_installs_and_is_kept(
    device: tuple[Path, Path], good_stick: Path, broken_stick: Path, versions: tuple[str, str, str]
) -> None:
    disk, efi_vars = device
    old, new, _ = versions
    first = boot(disk, "update-first", efi_vars=efi_vars, usb_stick=good_stick)
    try:
        assert system_line(first) == f"system: version {old}; other slot: empty"
        assert first.console.ask("reverse before") == "erofeb"  # a request that must survive the update
        INSTALL_S.append(update_and_wait_for_the_reboot(first))
        measure("update_install_to_reboot_s", round(INSTALL_S[-1], 1))
    finally:
        if first.vm is not None:
            first.vm.close()
    # The broken update's stick is in already: this boot goes on to test_a_broken_update_rolls_back_by_itself.
    second = boot(disk, "update-second", efi_vars=efi_vars, usb_stick=broken_stick)
    try:
        measure("update_boot_wall_s_to_ready", round(second.wall_s, 1))
        assert system_line(second) == f"system: version {new}; other slot: version {old}"
        assert second.console.ask("ping") == "pong"
        # asked on V before the update: the database came through it (the disk is read again after the last test)
        logs = second.console.ask("/logs 10")
        assert "'reverse before' -> 'erofeb'" in logs, logs
        wait_blessed(disk, f"llmos-edge_{new}.efi")  # a power-off before that would spend one of its tries
        RAN.append(new)
        labels = list(partitions(disk))
        assert labels == ["esp", f"root_{old}", f"root_{new}", "var"], labels
        # the new UKI passed its health gate and was blessed (no counter left); the old one stays for a rollback
        assert esp_files(disk) == sorted([f"llmos-edge_{old}.efi", f"llmos-edge_{new}.efi"]), esp_files(disk)
        RUNNING.append(second)
    finally:
        if not RUNNING and second.vm is not None:
            second.vm.close()


def slot_holds(disk: Path, label: str, root_raw: Path) -> bool:
    """Whether the slot labelled `label` begins with exactly the bytes of the bundle's root image (its erofs)."""
    part = partitions(disk)[label]
    if root_raw.stat().st_size > part["size"]:
        return False
    with disk.open("rb") as slot, root_raw.open("rb") as want:
        slot.seek(part["start"])
        while chunk := want.read(8 << 20):
            if slot.read(len(chunk)) != chunk:
                return False
    return True


def on_var(disk: Path, path_in_var: str) -> bool:
    """Whether a path exists on the disk's var partition (debugfs, no mount)."""
    offset = partitions(disk)["var"]["start"]
    r = subprocess.run(
        ["debugfs", "-R", f"stat {path_in_var}", f"{disk}?offset={offset}"], capture_output=True, text=True
    )
    return "File not found" not in r.stdout + r.stderr


@pytest.mark.soak
def test_a_power_cut_during_an_update_leaves_a_whole_version_to_boot(
    device: tuple[Path, Path], cut_bundle: Path, tmp_path: Path
) -> None:
    """Issue 14, point 4, for updates: the power goes at a random moment between `/update` and the reboot (while
    the bundle is verified and staged, while systemd-sysupdate writes the slot or the UKI), on a disk that loses what
    was not flushed. No UKI may then name a slot that is not whole, and the next boot comes up by itself."""
    assert RAN and INSTALL_S, "runs after test_a_good_update_installs_and_is_kept (same module, same disk)"
    disk, efi_vars = device
    running, cut_version = RAN[-1], cut_bundle.name
    stick = stick_of(cut_bundle, tmp_path / "stick.raw")
    rng = random.Random(seed())  # the commit under test seeds the moment, as the other power cuts (powercut.py)
    at = rng.uniform(5, 0.8 * INSTALL_S[-1])
    b = running_or_boot(disk, efi_vars, "update-cut", usb_stick=stick, volatile_cache=True)
    try:
        said = b.console.ask("/update /media/UPDATE")
        assert said.startswith("update requested from /media/UPDATE"), said
        assert b.vm is not None
        try:
            b.vm.wait(at)
            raise AssertionError(f"the install of {cut_version} ended before the cut at {at:.0f} s")
        except subprocess.TimeoutExpired:
            pass
        b.power_cut()
    finally:
        if b.vm is not None:
            b.vm.close()
    measure("update_cut_at_s", round(at, 1))
    labels = partitions(disk)
    ukis = esp_files(disk)
    measure("update_cut_disk", {"ukis": ukis, "slots": [x for x in labels if x.startswith("root")]})
    for uki in ukis:  # a UKI's command line names root_<its version> (image/bundle.py)
        version = re.sub(r"(\+\d+(-\d+)?)?\.efi$", "", uki).removeprefix("llmos-edge_")
        assert f"root_{version}" in labels, f"{uki} names a slot that is not there: {list(labels)}"
    assert f"llmos-edge_{running}.efi" in ukis, f"the running version's UKI was touched: {ukis}"
    if any(u.startswith(f"llmos-edge_{cut_version}") for u in ukis):
        root_raw = cut_bundle / f"llmos-edge_{cut_version}.root.raw"
        assert slot_holds(disk, f"root_{cut_version}", root_raw), f"{cut_version}'s UKI is there, its slot not whole"
    after = boot(disk, "update-after-cut", efi_vars=efi_vars)
    try:
        line = system_line(after)
        booted = cut_version if line.startswith(f"system: version {cut_version};") else running
        assert line.startswith(f"system: version {booted};"), line
        assert after.console.ask("ping") == "pong"
        if booted == cut_version:  # installed whole before the cut: it must pass its gate like any update
            wait_blessed(disk, f"llmos-edge_{cut_version}.efi")
            RAN.append(cut_version)
        measure("update_cut_booted", booted)
        after.shutdown()
    finally:
        if after.vm is not None:
            after.vm.close()
    # Nothing half done is left, and the cut update does not start again by itself: its request was removed
    # durably before staging began (llmos_edge/update.py), and tmpfiles removed the half-staged files at boot.
    assert not on_var(disk, "/lib/llmos-update"), "a half-staged update was left on var"
    assert not on_var(disk, "/lib/llmos/update.request"), "the cut update's request is still there"
    log = journal(disk, tmp_path / "j", "-b", "-u", "llmos-update.service", "-o", "cat")
    assert "verifying" not in log, log


def test_a_broken_update_rolls_back_by_itself(
    device: tuple[Path, Path], broken_stick: Path, versions: tuple[str, str, str], tmp_path: Path
) -> None:
    disk, efi_vars = device
    _, _, broken = versions
    assert RAN, "runs after test_a_good_update_installs_and_is_kept (same module, same disk)"
    good = RAN[-1]
    if RUNNING:  # the good update's boot, with this stick in
        b = running_or_boot(disk, efi_vars, "rollback-request")
    else:
        b = boot(disk, "rollback-request", efi_vars=efi_vars, usb_stick=broken_stick)
    try:
        assert system_line(b).startswith(f"system: version {good};")
        update_and_wait_for_the_reboot(b)
    finally:
        if b.vm is not None:
            b.vm.close()
    # The broken version boots, its gate fails, it reboots: QEMU exits each time, with no prompt answering. The
    # boot that reaches the prompt is the fallback.
    failed = 0
    started = time.monotonic()
    while True:
        vm, console = start(disk, f"rollback-boot-{failed + 1}", efi_vars=efi_vars)
        seen = bytearray()
        deadline = time.monotonic() + FAILED_BOOT_TIMEOUT
        try:
            while vm.proc is not None and vm.proc.poll() is None and PROMPT not in seen:
                if time.monotonic() > deadline:
                    raise AssertionError(f"boot {failed + 1} neither rebooted nor reached the prompt")
                try:
                    seen += console.read_some(1)
                except serial.SerialException:  # QEMU closes the console's socket as it exits (the reboot)
                    vm.wait(max(1.0, deadline - time.monotonic()))
        except BaseException:
            console.close()
            vm.close()
            raise
        if PROMPT in seen:
            break
        console.close()
        vm.close()
        failed += 1
        assert failed <= 3, "more than 3 failed boots: the broken UKI was tried past its tries"
    measure("rollback_failed_boots", failed)
    measure("rollback_s_to_the_good_boot", round(time.monotonic() - started, 1))
    try:
        assert failed == 3, f"{failed} failed boots before the fallback (3 tries expected)"
        wait_ready(console, 900)
        back = Boot(vm, console, time.monotonic() - vm.started_at)
        assert system_line(back) == f"system: version {good}; other slot: version {broken}"
        assert back.console.ask("ping") == "pong"
        back.shutdown()
    finally:
        console.close()
        vm.close()
    files = esp_files(disk)
    assert f"llmos-edge_{good}.efi" in files and f"llmos-edge_{broken}+0-3.efi" in files, files
    log = journal(disk, tmp_path / "j", "-u", "llmos-health.service", "-o", "cat")
    assert log.count("llmos health: bad: llmos.service") >= 3, log
    (ARTIFACTS / "rollback-esp.txt").write_text("\n".join(files) + "\n")
    # Two updates later, what was asked on V before the first and on V.1 is in the database; both installs logged.
    db = sqlite3.connect(copy_from_var(disk, "/lib/llmos", tmp_path / "var") / "llmos.db")
    prompts = {r[0] for r in db.execute("SELECT prompt FROM requests")}
    assert {"reverse before", "ping"} <= prompts, prompts
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    log = journal(disk, tmp_path / "j2", "-u", "llmos-update.service", "-o", "cat")
    for v in [*RAN[:1], broken]:
        assert f"llmos update: version {v} verified" in log and f"version {v} installed" in log, log
