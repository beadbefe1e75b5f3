"""The arm64 image (issue 17) in QEMU's virt machine with UEFI (AAVMF), a Cortex-A76 under software emulation:
the same product as on x86-64, checked where an architecture can break it.

- It boots to the prompt on the PL011 UART (ttyAMA0), the model answers `ping` with `pong`, and /status names the
  ARM CPU variant that llama.cpp's runtime dispatch chose (armv8.2_2 on a Cortex-A76: dotprod and fp16).
- systemd's watchdog restarts a SIGSTOPped supervisor (llmos-test-sigstop.service, switched on by an SMBIOS
  credential, as in test_configured.py; the card's UKI is blessed first so the health gate does not count it).
- A power cut on the disk whose unflushed writes are lost (nbdkit, image/volatiledisk.py), while an answer streams:
  the next boot reaches READY and answers; read off the disk after a clean power-off, the database passes
  integrity_check and keeps every request answered before the cut.
- The console on the USB serial gadget (a Pi 4's USB-C port): in the boot after the cut, llmos-test-gadget.service
  loads dummy_hcd, a USB device controller and host in software; g_serial binds to it, the supervisor opens
  /dev/ttyGS0 (console.also) and a client on the host side's /dev/ttyACM0 (cdc_acm) asks a question there.
Two boots in all: under emulation a boot is the expensive part.

The same image is the Raspberry Pi's SD card (issue 17, point 3): its ESP carries the Pi firmware, config.txt, U-Boot
and the Pis' device trees; the firmware starts U-Boot, whose UEFI runs systemd-boot and the UKI. What can be checked
without a Pi is checked on the image file: the partition table, those files, config.txt and the kernel command line.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    GADGET_CREDENTIAL,
    GADGET_QUESTION,
    SIGSTOP_CREDENTIAL,
    Boot,
    bless,
    boot,
    built_image,
    card,
    copy_from_var,
    esp_files,
    image_version,
    journal,
    measure,
    partitions,
    uki_cmdline,
    wait_ready,
)

ROOT_ARM64 = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"  # arm64 root (the Discoverable Partitions Specification)
PI_FIRMWARE = {"bootcode.bin", "start.elf", "fixup.dat", "start4.elf", "fixup4.dat"}  # Pi 3; Pi 4
PI_TREES = {"bcm2711-rpi-4-b.dtb", "bcm2711-rpi-400.dtb", "bcm2711-rpi-cm4-io.dtb", "bcm2837-rpi-3-b.dtb",
            "bcm2837-rpi-3-b-plus.dtb"}  # fmt: skip

ARCH = "arm64"
VARIANT = "armv8.2_2"  # QEMU's cortex-a76 (vm.py's default under TCG): dotprod and fp16
ASKED = ["ping", "what is llmos edge"]
BOOTS: list[Boot] = []
BLESSED: list[str] = []


@pytest.fixture(scope="module")
def arm64_image(serial_url: str) -> Path:
    if serial_url:
        pytest.skip("testing a real device through LLMOS_SERIAL_URL: no image file")
    return built_image("LLMOS_IMAGE_ARM64", "build/image-novoice-arm64/llmos-edge.raw", "ARCH=arm64", "VOICE=0")


def test_the_partition_table_is_the_x86_64_layout_with_arm64_roots(arm64_image: Path) -> None:
    """GPT (a Pi 4's boot EEPROM reads it; a Pi 3's boot ROM would need a hybrid MBR): the ESP first, in FAT, which
    the Pi firmware boots from, then the two root slots with arm64's root type, then var."""
    table = json.loads(subprocess.run(["sfdisk", "-J", str(arm64_image)], check=True, capture_output=True).stdout)
    parts = table["partitiontable"]["partitions"]
    assert table["partitiontable"]["label"] == "gpt"
    assert [p.get("name") for p in parts] == ["esp", f"root_{image_version(arm64_image)}", "_empty", "var"], parts
    assert parts[1]["type"] == parts[2]["type"] == ROOT_ARM64, parts
    esp = subprocess.run(["minfo", "-i", f"{arm64_image}@@{int(parts[0]['start']) * 512}", "::"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    assert "FAT32" in esp or "fat32" in esp.lower(), esp


def test_the_esp_boots_a_raspberry_pi_through_u_boot_and_systemd_boot(arm64_image: Path, tmp_path: Path) -> None:
    top = set(esp_files(arm64_image, "/"))
    assert top >= PI_FIRMWARE | PI_TREES | {"config.txt", "u-boot.bin"}, sorted(top)
    assert esp_files(arm64_image, "/EFI/BOOT") == ["BOOTAA64.EFI"]
    offset = partitions(arm64_image)["esp"]["start"]
    config = subprocess.run(["mtype", "-i", f"{arm64_image}@@{offset}", "::/config.txt"],
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    settings = [line.strip() for line in config.splitlines() if line.strip() and not line.startswith("#")]
    assert settings == ["[all]", "arm_64bit=1", "kernel=u-boot.bin", "enable_uart=1", "upstream_kernel=1"], config
    uboot = tmp_path / "u-boot.bin"
    subprocess.run(["mcopy", "-i", f"{arm64_image}@@{offset}", "::/u-boot.bin", str(uboot)], check=True)
    code = uboot.read_bytes()
    # Debian's U-Boot, 64-bit: its first instruction is an AArch64 branch (opcode 0b000101 in the top bits)
    assert b"U-Boot 20" in code and code[3] >> 2 == 0b000101, code[:8]


def test_the_kernel_command_line_names_virts_uart_and_the_pis(arm64_image: Path) -> None:
    """The UKI's command line: QEMU virt's PL011 (ttyAMA0), then a Pi's GPIO UART (ttyS1), the last console there
    is; console.device `kernel` follows it."""
    cmdline = uki_cmdline(arm64_image.with_suffix(".efi"))
    consoles = [w for w in cmdline.split() if w.startswith("console=")]
    assert consoles == ["console=tty0", "console=ttyAMA0,115200", "console=ttyS1,115200"], cmdline
    assert f"root=PARTLABEL=root_{image_version(arm64_image)}" in cmdline.split()


@pytest.mark.raspi3b
def test_the_same_card_boots_in_qemus_raspberry_pi_3b_through_u_boot(arm64_image: Path, tmp_path: Path) -> None:
    """A Pi's boot path without a Pi: QEMU's raspi3b (4 Cortex-A53, 1 GiB) starts what the Pi firmware would, U-Boot
    and the board's device tree from the ESP; U-Boot's UEFI runs systemd-boot, which boots the UKI; the initrd loads
    the Pi's SD drivers and finds the root on the card; the product takes the GPIO UART (ttyS1). A Cortex-A53 has
    neither dotprod nor fp16: llama.cpp's armv8.0_1, a Pi 3's and a Pi 4's variant. The governor controls on the
    SoC's sensor (bcm2835_thermal, which QEMU emulates), the zone the Pi's device tree calls cpu-thermal, with no
    setting (governor.thermal_zone is empty: the hottest zone, the only one on a Pi)."""
    disk = card(arm64_image, tmp_path / "sd.raw")  # 4 GiB: QEMU wants an SD card's size to be a power of 2
    b = boot(disk, "raspi3b", arch=ARCH, board="raspi3b")
    try:
        measure("arm64_raspi3b_boot_wall_s_to_ready", round(b.wall_s, 1))
        assert "cpu armv8.0_1" in b.ready_status, b.ready_status
        assert "thermal: cpu-thermal " in b.ready_status, b.ready_status
        assert b.console.ask("ping") == "pong"
    finally:
        b.console.close()
        if b.vm is not None:
            b.vm.close()


@pytest.fixture(scope="module")
def arm64_disk(arm64_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    disk = card(arm64_image, tmp_path_factory.mktemp("arm64") / "disk.raw")
    BLESSED.append(bless(disk))
    return disk


@pytest.fixture(scope="module")
def arm64(arm64_disk: Path) -> Iterator[Boot]:
    b = boot(arm64_disk, "arm64", arch=ARCH, volatile_cache=True, extra=SIGSTOP_CREDENTIAL)
    BOOTS.append(b)
    measure("arm64_boot_wall_s_to_ready", round(b.wall_s, 1))
    yield b
    for running in BOOTS:  # a test failed half-way: stop its QEMU (by PID)
        if running.vm is not None:
            running.vm.close()


def test_boots_to_the_prompt_and_names_an_arm_cpu_variant(arm64: Boot) -> None:
    assert "state: ready" in arm64.ready_status
    assert f"cpu {VARIANT}" in arm64.ready_status, arm64.ready_status


def test_a_sigstopped_supervisor_is_restarted_by_the_watchdog(arm64: Boot) -> None:
    """WatchdogSec=30 after the fault unit stopped it, systemd kills the supervisor and starts another (the
    database's starts rows, read at the end, prove it was restarted)."""
    time.sleep(45)
    arm64.console.read_some(1)
    wait_ready(arm64.console, 600)
    for prompt in ASKED:
        answer = arm64.console.ask(prompt, timeout=300)
        assert answer, f"no answer to {prompt!r}"
    assert arm64.console.ask("ping") == "pong"


def test_a_power_cut_while_an_answer_streams_loses_no_answered_request(arm64: Boot, arm64_disk: Path) -> None:
    arm64.console.send_line("tell me everything about llmos edge and the serial console")
    arm64.console.read_until(b"\r\n", 60)
    assert arm64.console.read_some(60), "no answer started streaming"
    arm64.power_cut()
    second = boot(arm64_disk, "arm64-after-cut", arch=ARCH, volatile_cache=True, extra=GADGET_CREDENTIAL)
    BOOTS.append(second)
    measure("arm64_boot_wall_s_to_ready_after_cut", round(second.wall_s, 1))
    assert second.console.ask("ping") == "pong"


def test_a_usb_host_is_answered_on_the_usb_serial_gadget(arm64_disk: Path) -> None:
    """llmos-test-gadget.service's question on /dev/ttyACM0 reaches the supervisor through the gadget's /dev/ttyGS0:
    the console on the UART lists it among the last requests (its transcript is read off the disk below)."""
    if len(BOOTS) < 2:
        pytest.skip("the power cut test did not boot the disk again")
    deadline = time.monotonic() + 600
    logs = ""
    while GADGET_QUESTION not in logs and time.monotonic() < deadline:
        logs = BOOTS[1].console.ask("/logs 5", timeout=60)
        time.sleep(5)
    assert GADGET_QUESTION in logs, logs
    time.sleep(5)  # the client writes its transcript once it has read the prompt after the answer


def test_the_disk_keeps_every_answered_request_and_both_restarts(arm64_disk: Path, tmp_path: Path) -> None:
    if len(BOOTS) < 2:
        pytest.skip("the power cut test did not boot the disk again")
    BOOTS[1].shutdown()
    state = copy_from_var(arm64_disk, "/lib/llmos", tmp_path / "var")  # /var/lib/llmos
    conn = sqlite3.connect(state / "llmos.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    prompts = {row[0] for row in conn.execute("SELECT prompt FROM requests")}
    assert set(ASKED) <= prompts, f"answered before the cut, gone after it: {set(ASKED) - prompts}"
    assert GADGET_QUESTION in prompts, "the USB gadget's question is not in the database"
    echoed = [p for p in prompts if p.startswith("llmos-edge")]
    assert not echoed, f"the console's own words came back as questions (a host tty echoing them): {echoed}"
    starts = conn.execute("SELECT stopped_at, exit_reason FROM starts ORDER BY id").fetchall()
    conn.close()
    # the SIGSTOPped supervisor, the one the watchdog started (cut), the clean one after the cut
    assert len(starts) == 3, starts
    assert starts[0][0] is None and starts[1][0] is None, "neither could record a stop"
    assert starts[2][1] == "SIGTERM", starts
    assert BLESSED[0] in esp_files(arm64_disk), "no reboot by the health gate"
    log = journal(arm64_disk, tmp_path / "journal", "-u", "llmos")
    assert "Watchdog timeout" in log, log[-2000:]
    assert "console on /dev/ttyGS0" in log, log[-2000:]
    transcript = (state / "test-gadget.log").read_text(errors="replace")
    assert transcript.endswith("\nanswered\n") and GADGET_QUESTION in transcript, transcript
