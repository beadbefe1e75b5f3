#!/usr/bin/env python3
"""Boot the llmos-edge disk image in QEMU: the one command line that `make run` and the image tests share.

UEFI (OVMF) on q35 for x86-64, or (--arch arm64) UEFI (AAVMF) on the virt machine; the image as a virtio disk; the
first UART (the product's console: ttyS0, or ttyAMA0 on arm64) either on this terminal or on a TCP socket that waits
for its client (so a test loses no byte of the boot). KVM is used only when a probe shows it can run a guest (never
for another architecture); otherwise software emulation (TCG) with `-cpu max` (x86-64) or a Cortex-A76 (arm64).
Without --sound the machine has no sound card (the appliance then says `voice: no microphone`); with it, an Intel HD
Audio card whose line-in and line-out go to a QEMU audio backend: `none` (silence in, nothing out) or `alsa` (this
host's default devices). With --usb-stick, a raw file system image (see image/usbstick.py) is plugged in as a
read-only USB mass-storage stick on an xHCI controller; the guest mounts it at /media/<its label>. With --http-port,
a network card on QEMU's restricted user-mode network forwards 127.0.0.1:PORT to the guest's HTTP API (http.enabled
in the guest's config). With --board raspi3b, an arm64 image is the SD card of QEMU's Raspberry Pi 3B instead
(raspi3b_command).

When standard input is not a terminal, `run` plays it as a script instead of handing over the console: it waits
for the product's prompt and for the model (`/status` until `state: ready`), types one line at a time (the next
only once the previous answer's prompt is back, so nothing is lost while the guest boots or answers), copies the
console to standard output, and at the end of the script presses the ACPI power button and waits for a clean
power-off. That is how CI runs `make run`.

  vm.py run --image build/image/llmos-edge.raw [--arch arm64] [--cpu Nehalem] [--serial-port 4555] [--snapshot]
            [--sound none] [--usb-stick stick.raw] [--http-port 8080]
  printf 'ping\n/status\n' | vm.py run --image build/image/llmos-edge.raw
  vm.py probe-kvm
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

# beside this file: the script's directory, or image/ on the importer's path
from bundle import partitions
from volatiledisk import VolatileDisk


@dataclass(frozen=True)
class Arch:
    """What differs between the image's architectures (mkosi's names, image/arch/): QEMU, machine, UEFI firmware."""

    qemu: str
    qemu_package: str  # the Debian package with `qemu`
    machine: str
    tcg_cpu: str  # the CPU model under emulation (--cpu overrides it)
    firmware_dirs: tuple[Path, ...]
    firmware_pairs: tuple[tuple[str, str], ...]  # (code, variable store template)
    firmware_package: str
    host_machine: str  # platform.machine() of a host that can run it with KVM


ARCHES = {
    "x86-64": Arch(
        "qemu-system-x86_64", "qemu-system-x86", "q35", "max",
        (Path("/usr/share/OVMF"), Path("/usr/share/ovmf"), Path("/usr/share/qemu")),
        (("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd")),
        "ovmf", "x86_64",
    ),
    # virt: a PL011 UART (ttyAMA0) and PCI for the same virtio, USB and sound devices. Cortex-A76 is a Raspberry Pi 5's
    # core (dotprod and fp16: llama.cpp's armv8.2_2 variant); `-cpu max` would add SVE, slow under emulation.
    "arm64": Arch(
        "qemu-system-aarch64", "qemu-system-arm", "virt", "cortex-a76",
        (Path("/usr/share/AAVMF"),),
        (("AAVMF_CODE.fd", "AAVMF_VARS.fd"),),
        "qemu-efi-aarch64", "aarch64",
    ),
}  # fmt: skip
PROMPT = b"llmos> "  # the product's console prompt (llmos_edge/console.py)
ANSWER_END = b"\r\n" + PROMPT  # every answer, command output or empty line ends with a fresh prompt
# /status's first line once the model answers (degraded: it runs, but its self-test answer was wrong)
ANSWERING = re.compile(rb"^state: (ready|degraded)\b", re.M)
STATE = re.compile(rb"^state: .*?$", re.M)


class VMError(Exception):
    """A problem the user can fix (missing QEMU, firmware or image); printed as one line with a hint."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message + (f" (hint: {hint})" if hint else ""))


def _install_hint(arch: str, package: str) -> str:
    return f"install it: make image-deps{'' if arch == 'x86-64' else ' ARCH=' + arch} (Debian package {package})"


def find_firmware(arch: str = "x86-64") -> tuple[Path, Path]:
    a = ARCHES[arch]
    for d in a.firmware_dirs:
        for code, vars_ in a.firmware_pairs:
            if (d / code).is_file() and (d / vars_).is_file():
                return d / code, d / vars_
    raise VMError(f"no UEFI firmware for {arch} found", _install_hint(arch, a.firmware_package))


def qemu_binary(arch: str = "x86-64") -> str:
    a = ARCHES[arch]
    path = shutil.which(a.qemu)
    if path is None:
        raise VMError(f"{a.qemu} is not installed", _install_hint(arch, a.qemu_package))
    return path


def kvm_usable(arch: str = "x86-64", timeout: float = 4.0) -> bool:
    """Whether KVM can really run a guest here. /dev/kvm may exist and still fail (a nested or paravirtual KVM
    that dies on the firmware's first instructions), so boot the firmware for a few seconds and watch. Another
    architecture's guest never runs under KVM."""
    forced = os.environ.get("LLMOS_QEMU_ACCEL", "")
    if forced:
        return forced == "kvm"
    if ARCHES[arch].host_machine != platform.machine():
        return False
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    code, vars_template = find_firmware(arch)
    with tempfile.TemporaryDirectory(prefix="llmos-kvm-probe-") as tmp:
        vars_copy = Path(tmp) / "vars.fd"
        shutil.copyfile(vars_template, vars_copy)
        cmd = [
            qemu_binary(arch),
            "-accel", "kvm",
            "-cpu", "host",
            "-machine", ARCHES[arch].machine,
            "-m", "128",
            "-nodefaults",
            "-display", "none",
            "-no-reboot",
            "-drive", f"if=pflash,format=raw,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,file={vars_copy}",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=timeout)
            return False  # exited early: KVM refused the CPU model or the guest
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate()
        # QEMU pauses (does not exit) on "KVM internal error": read what it said.
        return "error" not in err.lower()


@dataclass
class VMConfig:
    image: Path
    arch: str = "x86-64"  # the image's architecture (mkosi's name): x86-64 or arm64
    cpu: str = ""  # empty: "host" under KVM, the architecture's tcg_cpu under TCG
    mem_mib: int = 1024
    smp: int = 2
    serial_port: int = 0  # 0: serial console on this terminal (stdio, with QEMU's monitor on Ctrl-A C)
    snapshot: bool = False  # writes go to a temporary overlay; the image file stays as it was
    accel: str = ""  # empty: probe
    qmp_socket: Path | None = None  # QEMU's control socket, for a clean ACPI power-off
    # QEMU -audiodev backend (and its options) of an emulated sound card, e.g. "none" or "alsa,in.dev=mic";
    # empty: no sound card
    sound: str = ""
    usb_stick: Path | None = None  # a raw disk image, plugged in as a read-only USB stick
    http_port: int = 0  # >0: a network card whose guest port 8080 is 127.0.0.1:http_port on the host
    # The UEFI variable store, kept between boots like a board's NVRAM (made from OVMF's template when missing);
    # None: a fresh copy for this VM only. A factory reset is armed through an EFI variable (FactoryReset).
    efi_vars: Path | None = None
    # The disk through nbdkit's writeback cache (volatiledisk.py): a power cut loses the writes not yet flushed,
    # as a real disk's volatile cache does. False: a file, whose writes QEMU hands to the host's page cache at once.
    volatile_cache: bool = False
    board: str = ""  # "raspi3b": QEMU's Raspberry Pi 3B (raspi3b_command), an arm64 image only
    extra: list[str] = field(default_factory=list)


def sound_card(audiodev: str) -> list[str]:
    """An ICH9 HD Audio controller (q35's own) with a duplex codec: line-in is the guest's microphone, line-out its
    speaker; the guest's snd-hda-intel and snd-hda-codec-generic drive them."""
    return [
        "-audiodev", f"{audiodev},id=snd0",
        "-device", "ich9-intel-hda",
        "-device", "hda-duplex,audiodev=snd0",
    ]  # fmt: skip


def usb_stick(image: Path) -> list[str]:
    """An xHCI controller with a USB mass-storage device on it: the guest sees a removable SCSI disk (sda) through
    xhci_hcd and usb-storage, as it would a real stick. Read-only, so one image serves any number of boots."""
    return [
        "-device", "qemu-xhci,id=xhci",
        "-drive", f"if=none,id=stick,format=raw,readonly=on,file={image}",
        "-device", "usb-storage,bus=xhci.0,drive=stick,removable=on",
    ]  # fmt: skip


def network(host_port: int, guest_port: int = 8080) -> list[str]:
    """A virtio network card on QEMU's user-mode network: the guest gets an address by DHCP, the host's loopback
    port `host_port` reaches the guest's `guest_port` (the HTTP front-end), and restrict=on keeps the guest from
    reaching anything else (no traffic leaves this machine)."""
    return [
        "-nic",
        f"user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}",
    ]


def console_and_control(cfg: VMConfig) -> list[str]:
    """The next serial port: the product's console, on this terminal or a TCP socket; and QMP's socket."""
    if cfg.serial_port:
        cmd = [
            "-chardev", f"socket,id=ser0,host=127.0.0.1,port={cfg.serial_port},server=on,wait=on",
            "-serial", "chardev:ser0",
        ]  # fmt: skip
    else:
        cmd = ["-serial", "mon:stdio"]
    if cfg.qmp_socket is not None:
        cmd += ["-qmp", f"unix:{cfg.qmp_socket},server=on,wait=off"]
    return cmd


RASPI3B_TREE = "bcm2837-rpi-3-b.dtb"


def raspi3b_command(cfg: VMConfig, boot_dir: Path) -> list[str]:
    """QEMU's Raspberry Pi 3B (board raspi3b; an arm64 image as the SD card). QEMU has no GPU firmware, so it starts
    what the Pi's firmware would (config.txt: kernel=u-boot.bin, and the board's device tree), both read from the
    image's ESP; U-Boot's UEFI then runs systemd-boot and the UKI (docs/arm64.md). The console is the GPIO UART, the
    second serial port: Debian's device tree gives the first, the PL011, to Bluetooth. No ACPI: power-off is a kill."""
    size = cfg.image.stat().st_size
    if size & (size - 1):
        raise VMError(f"{cfg.image} is {size} bytes: QEMU's SD card must be a power of 2", "truncate -s 4G a copy")
    esp = partitions(cfg.image)["esp"]["start"]
    for name in ("u-boot.bin", RASPI3B_TREE):
        r = subprocess.run(["mcopy", "-o", "-i", f"{cfg.image}@@{esp}", f"::/{name}", str(boot_dir / name)],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            raise VMError(f"no {name} on the ESP of {cfg.image}", "boot an arm64 image: make image ARCH=arm64")
    return [
        qemu_binary("arm64"),
        "-machine", "raspi3b",  # 4 Cortex-A53 and 1 GiB, fixed by the board
        "-accel", "tcg",
        "-cpu", "cortex-a53",
        "-m", "1G",
        "-display", "none",
        "-no-reboot",
        "-kernel", str(boot_dir / "u-boot.bin"),
        "-dtb", str(boot_dir / RASPI3B_TREE),
        "-drive", f"if=sd,format=raw,file={cfg.image},cache=writeback",
        "-serial", "null",
        *console_and_control(cfg),
        *cfg.extra,
    ]  # fmt: skip


def command(cfg: VMConfig, vars_file: Path, drive: str = "") -> list[str]:
    """QEMU's command line. `drive`: the disk's -drive value when it is not the image file itself (an NBD disk)."""
    if not cfg.image.is_file():
        raise VMError(f"no image at {cfg.image}", "build it first: make image")
    if cfg.usb_stick is not None and not cfg.usb_stick.is_file():
        raise VMError(f"no USB stick image at {cfg.usb_stick}", "make one with image/usbstick.py")
    code, _ = find_firmware(cfg.arch)
    accel = cfg.accel or ("kvm" if kvm_usable(cfg.arch) else "tcg")
    cpu = cfg.cpu or ("host" if accel == "kvm" else ARCHES[cfg.arch].tcg_cpu)
    if not drive:
        drive = (
            f"file={cfg.image},format=raw,if=none,id=disk,cache=unsafe"
            if cfg.snapshot
            else (f"file={cfg.image},format=raw,if=none,id=disk,cache=writeback")
        )
        if cfg.snapshot:
            drive += ",snapshot=on"
    cmd = [
        qemu_binary(cfg.arch),
        "-machine", ARCHES[cfg.arch].machine,
        "-accel", accel,
        "-cpu", cpu,
        "-m", str(cfg.mem_mib),
        "-smp", str(cfg.smp),
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-drive", f"if=pflash,format=raw,readonly=on,file={code}",
        "-drive", f"if=pflash,format=raw,file={vars_file}",
        "-drive", drive,
        # bootindex: the firmware boots the disk first; without one it tries removable media (a USB stick) first
        # and prints the failure on the product's console.
        "-device", "virtio-blk-pci,drive=disk,bootindex=0",
        # The guest's Python needs entropy early; without a source it can wait at boot under TCG.
        "-device", "virtio-rng-pci",
    ]  # fmt: skip
    cmd += console_and_control(cfg)
    if cfg.sound:
        cmd += sound_card(cfg.sound)
    if cfg.usb_stick is not None:
        cmd += usb_stick(cfg.usb_stick)
    if cfg.http_port:
        cmd += network(cfg.http_port)
    return cmd + cfg.extra


def _die_with_parent() -> None:
    """In the child before exec: a test run that is killed takes its VMs with it instead of leaving them running."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class VM:
    """One QEMU process (started and stopped by its PID), with its own copy of the UEFI variable store (or the one
    VMConfig.efi_vars keeps between boots)."""

    def __init__(self, cfg: VMConfig, log_path: Path | None = None) -> None:
        self.cfg = cfg
        self.log_path = log_path
        self._tmp = tempfile.TemporaryDirectory(prefix="llmos-vm-")
        self.vars_file = cfg.efi_vars or Path(self._tmp.name) / "OVMF_VARS.fd"
        if not self.vars_file.exists() and cfg.board != "raspi3b":  # raspi3b boots U-Boot: no UEFI store to copy
            shutil.copyfile(find_firmware(cfg.arch)[1], self.vars_file)
        self.disk: VolatileDisk | None = None
        if cfg.volatile_cache:
            nbd_log = log_path.with_suffix(".nbdkit.log") if log_path else None
            self.disk = VolatileDisk(cfg.image, Path(self._tmp.name) / "nbd", nbd_log)
        if cfg.board == "raspi3b":
            self.cmd = raspi3b_command(cfg, Path(self._tmp.name))
        else:
            self.cmd = command(cfg, self.vars_file, self.disk.drive() if self.disk else "")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        if self.disk is not None:
            self.disk.start()
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self.started_at = time.monotonic()

    def power_cut(self) -> None:
        """SIGKILL, as pulling the plug: no flush, no shutdown. With a volatile cache, nbdkit goes first, and with it
        every write the guest has not flushed."""
        if self.disk is not None:
            self.disk.cut()
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def powerdown(self) -> None:
        """Press the ACPI power button (through QMP): the guest shuts down cleanly and QEMU exits."""
        self.qmp("system_powerdown")

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on this VM's control socket and return its reply's `return` value."""
        if self.cfg.qmp_socket is None:
            raise VMError("this VM has no QMP socket", "start it with VMConfig(qmp_socket=...)")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(os.fspath(self.cfg.qmp_socket))
            f = s.makefile("rwb")
            f.readline()  # greeting
            reply: dict[str, Any] = {}
            for cmd, args in (("qmp_capabilities", None), (command, arguments)):
                f.write(json.dumps({"execute": cmd, **({"arguments": args} if args else {})}).encode() + b"\n")
                f.flush()
                while True:  # skip asynchronous events until the command's reply
                    reply = json.loads(f.readline())
                    if "return" in reply or "error" in reply:
                        break
                if "error" in reply:
                    raise VMError(f"QMP {cmd} failed: {reply['error']}")
            return reply["return"]

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        self.power_cut()
        self._tmp.cleanup()

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def announce(vm: VM, where: str) -> None:
    cfg = vm.cfg
    accel = vm.cmd[vm.cmd.index("-accel") + 1]
    cpu = vm.cmd[vm.cmd.index("-cpu") + 1]
    card = f", sound card on -audiodev {cfg.sound}" if cfg.sound else ""
    stick = f", USB stick {cfg.usb_stick}" if cfg.usb_stick else ""
    memory = vm.cmd[vm.cmd.index("-m") + 1]  # raspi3b's is fixed by the board, not --mem
    board = f", {cfg.board}" if cfg.board else ""
    what = f"{accel}, -cpu {cpu}, -m {memory}{board}{card}{stick}"
    print(f"== booting {cfg.image} in QEMU ({what}); {where}", file=sys.stderr)
    if accel == "tcg":
        print("   software emulation: the prompt takes about 2-3 minutes", file=sys.stderr)


def run(cfg: VMConfig) -> int:
    vm = VM(cfg)
    if cfg.serial_port:
        announce(vm, f"serial console on 127.0.0.1:{cfg.serial_port} (QEMU waits for a client)")
    else:
        announce(vm, "serial console below. Ctrl-A X quits, Ctrl-A C is QEMU's monitor.")
    try:
        return subprocess.call(vm.cmd)
    finally:
        vm.close()


class ScriptError(Exception):
    """Why a scripted run failed, in one line."""


class ConsoleScript:
    """Types a script into the product's console (a socket to the VM's serial port) and copies everything the
    console prints to `out`. A line is sent only once the prompt that ends the previous answer has come back: the
    console reads nothing while it boots or streams an answer, so typed-ahead text would be dropped or refused."""

    def __init__(self, sock: socket.socket, out: BinaryIO) -> None:
        self.sock = sock
        self.out = out
        self.buf = bytearray()

    def _fill(self, deadline: float) -> bool:
        """Read what arrives before `deadline`; False at end of stream (QEMU has exited)."""
        self.sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return True
        if not data:
            return False
        self.buf += data
        self.out.write(data)
        self.out.flush()
        return True

    def wait_for(self, marker: bytes, timeout: float, what: str) -> bytes:
        """Read until `marker`; returns what came before it."""
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            if time.monotonic() > deadline:
                raise ScriptError(f"no {what} within {timeout:.0f} s")
            if not self._fill(deadline):
                raise ScriptError(f"the console closed (QEMU exited) before the {what}")
        end = self.buf.index(marker)
        before = bytes(self.buf[:end])
        del self.buf[: end + len(marker)]
        return before

    def send(self, line: str) -> None:
        self.buf.clear()  # output from before the line was typed cannot be its answer
        self.sock.sendall(line.encode() + b"\r")

    def wait_answering(self, timeout: float, answer_timeout: float, poll_s: float = 5.0) -> None:
        """The prompt comes up while the model still loads, and a question typed then fails: ask /status, as a
        person would, until the model answers (README: "questions are answered once it says ready")."""
        deadline = time.monotonic() + timeout
        while True:
            self.send("/status")
            text = self.wait_for(ANSWER_END, answer_timeout, "answer to '/status'")
            if ANSWERING.search(text):
                return
            if time.monotonic() > deadline:
                state = STATE.search(text)
                said = state.group(0).decode(errors="replace").strip() if state else "no state line"
                raise ScriptError(f"the model did not come up within {timeout:.0f} s (/status: {said})")
            until = min(deadline, time.monotonic() + poll_s)
            while time.monotonic() < until:
                if not self._fill(until):
                    raise ScriptError("the console closed (QEMU exited) while the model was loading")

    def play(self, lines: Iterator[str], boot_timeout: float, answer_timeout: float, poll_s: float = 5.0) -> int:
        """Wait for the first prompt and for the model, then type each line and wait for its answer. Returns the
        number of lines."""
        start = time.monotonic()
        self.wait_for(PROMPT, boot_timeout, f"{PROMPT.decode()!r} prompt")
        self.wait_answering(boot_timeout - (time.monotonic() - start), answer_timeout, poll_s)
        n = 0
        for line in lines:
            self.send(line)
            self.wait_for(ANSWER_END, answer_timeout, f"answer to {line!r}")
            n += 1
        return n

    def drain(self, timeout: float) -> None:
        """Copy the console's last output until QEMU closes it or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._fill(deadline):
            pass


def script_lines(stream: BinaryIO | None) -> Iterator[str]:
    """The script's lines, read one at a time as they are needed (the script may be a pipe still being written)."""
    if stream is None:
        return
    for raw in stream:
        yield raw.decode("utf-8", "replace").rstrip("\r\n")


def connect_serial(vm: VM, timeout: float = 30) -> socket.socket:
    """QEMU listens on the serial socket a moment after it starts (and runs the guest only once we are there)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", vm.cfg.serial_port), timeout=5)
        except OSError:
            if vm.proc is not None and vm.proc.poll() is not None:
                raise ScriptError(f"QEMU exited with status {vm.proc.returncode} before the console opened") from None
            if time.monotonic() > deadline:
                raise ScriptError(f"QEMU's serial socket did not open within {timeout:.0f} s") from None
            time.sleep(0.2)


def run_script(
    cfg: VMConfig,
    lines: Iterator[str],
    out: BinaryIO,
    boot_timeout: float = 900,
    answer_timeout: float = 600,
    shutdown_timeout: float = 180,
) -> int:
    """Boot, play the script on the console, then power off cleanly (ACPI, through QMP; SIGKILL by PID if the
    guest has not powered off within `shutdown_timeout`). 0 when every line was answered, 1 with a reason if not."""
    with tempfile.TemporaryDirectory(prefix="llmos-script-") as tmp:
        cfg = dataclasses.replace(cfg, serial_port=free_port(), qmp_socket=Path(tmp) / "qmp")
        log = Path(tmp) / "qemu.log"
        with VM(cfg, log_path=log) as vm:
            announce(vm, "standard input is not a terminal: playing it on the console as a script")
            vm.start()
            try:
                with connect_serial(vm) as sock:
                    script = ConsoleScript(sock, out)
                    n = script.play(lines, boot_timeout, answer_timeout)
                    if cfg.board == "raspi3b":  # no ACPI, no power button: pull the plug
                        print(f"\n== script done ({n} lines); raspi3b has no power button: stopping QEMU",
                              file=sys.stderr)  # fmt: skip
                        vm.power_cut()
                        return 0
                    print(f"\n== script done ({n} lines); powering off", file=sys.stderr)
                    vm.powerdown()
                    deadline = time.monotonic() + shutdown_timeout
                    script.drain(shutdown_timeout)
                    try:
                        vm.wait(max(1.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        print(f"vm: no clean power-off within {shutdown_timeout:.0f} s; killed QEMU", file=sys.stderr)
            except (ScriptError, VMError, OSError) as e:
                qemu = log.read_text(errors="replace").strip().splitlines()
                said = f" (QEMU: {qemu[-1]})" if qemu else ""
                print(f"\nvm: {e}{said}", file=sys.stderr)
                return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="boot the image")
    r.add_argument("--image", type=Path, required=True)
    r.add_argument("--arch", choices=sorted(ARCHES), default="x86-64", help="the image's architecture")
    r.add_argument("--board", choices=["raspi3b"], default="", help="arm64: QEMU's Raspberry Pi 3B instead of virt")
    r.add_argument("--cpu", default="", help="QEMU CPU model, e.g. Nehalem (no AVX2), cortex-a72 (arm64) or max")
    r.add_argument("--mem", type=int, default=1024, help="guest RAM in MiB")
    r.add_argument("--smp", type=int, default=2)
    r.add_argument("--serial-port", type=int, default=0, help="serve the first UART on 127.0.0.1:PORT instead")
    r.add_argument("--snapshot", action="store_true", help="leave the image file unchanged")
    r.add_argument("--accel", choices=["kvm", "tcg"], default="")
    r.add_argument(
        "--sound",
        default="",
        metavar="BACKEND",
        help="add a sound card whose audio goes to this QEMU -audiodev backend: none (silence) or alsa (this host)",
    )
    r.add_argument("--usb-stick", type=Path, help="plug in this raw disk image as a read-only USB stick")
    r.add_argument(
        "--http-port",
        type=int,
        default=0,
        help="a network card; the guest's HTTP API (port 8080, with http.enabled) on 127.0.0.1:PORT",
    )
    r.add_argument(
        "--boot-timeout",
        type=float,
        default=900,
        help="scripted run (standard input not a terminal): seconds to wait for the first prompt",
    )
    r.add_argument(
        "--answer-timeout",
        type=float,
        default=600,
        help="scripted run: seconds to wait for each line's answer",
    )
    k = sub.add_parser("probe-kvm", help="say whether KVM can run guests here")
    k.add_argument("--arch", choices=sorted(ARCHES), default="x86-64")
    args = parser.parse_args(argv)
    try:
        if args.command == "probe-kvm":
            ok = kvm_usable(args.arch)
            print("kvm" if ok else "tcg")
            return 0
        cfg = VMConfig(
            image=args.image,
            arch="arm64" if args.board else args.arch,
            board=args.board,
            cpu=args.cpu,
            mem_mib=args.mem,
            smp=args.smp,
            serial_port=args.serial_port,
            snapshot=args.snapshot,
            accel=args.accel,
            sound=args.sound,
            usb_stick=args.usb_stick,
            http_port=args.http_port,
        )
        if not args.serial_port and not (sys.stdin is not None and sys.stdin.isatty()):
            stdin = sys.stdin.buffer if sys.stdin is not None else None
            return run_script(cfg, script_lines(stdin), sys.stdout.buffer, args.boot_timeout, args.answer_timeout)
        return run(cfg)
    except VMError as e:
        print(f"vm: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
