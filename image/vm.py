#!/usr/bin/env python3
"""Boot the llmos-edge disk image in QEMU: the one command line that `make run` and the image tests share.

UEFI (OVMF) on q35, the image as a virtio disk, the first UART (ttyS0, the product's console) either on this
terminal or on a TCP socket that waits for its client (so a test loses no byte of the boot). KVM is used only when
a probe shows it can run a guest; otherwise software emulation (TCG) with `-cpu max`. Without --sound the machine
has no sound card (the appliance then says `voice: no microphone`); with it, an Intel HD Audio card whose line-in
and line-out go to a QEMU audio backend: `none` (silence in, nothing out) or `alsa` (this host's default devices).

  vm.py run --image build/image/llmos-edge.raw [--cpu Nehalem] [--serial-port 4555] [--snapshot] [--sound none]
  vm.py probe-kvm
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

QEMU = "qemu-system-x86_64"
FIRMWARE_DIRS = [Path("/usr/share/OVMF"), Path("/usr/share/ovmf"), Path("/usr/share/qemu")]
FIRMWARE_PAIRS = [("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd")]


class VMError(Exception):
    """A problem the user can fix (missing QEMU, firmware or image); printed as one line with a hint."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message + (f" (hint: {hint})" if hint else ""))


def find_firmware() -> tuple[Path, Path]:
    for d in FIRMWARE_DIRS:
        for code, vars_ in FIRMWARE_PAIRS:
            if (d / code).is_file() and (d / vars_).is_file():
                return d / code, d / vars_
    raise VMError("no UEFI firmware (OVMF) found", "install it: make image-deps (Debian package ovmf)")


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise VMError(f"{QEMU} is not installed", "install it: make image-deps (Debian package qemu-system-x86)")
    return path


def kvm_usable(timeout: float = 4.0) -> bool:
    """Whether KVM can really run a guest here. /dev/kvm may exist and still fail (a nested or paravirtual KVM
    that dies on the firmware's first instructions), so boot the firmware for a few seconds and watch."""
    forced = os.environ.get("LLMOS_QEMU_ACCEL", "")
    if forced:
        return forced == "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    code, vars_template = find_firmware()
    with tempfile.TemporaryDirectory(prefix="llmos-kvm-probe-") as tmp:
        vars_copy = Path(tmp) / "vars.fd"
        shutil.copyfile(vars_template, vars_copy)
        cmd = [
            qemu_binary(),
            "-accel", "kvm",
            "-cpu", "host",
            "-machine", "q35",
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
    cpu: str = ""  # empty: "host" under KVM, "max" under TCG
    mem_mib: int = 1024
    smp: int = 2
    serial_port: int = 0  # 0: serial console on this terminal (stdio, with QEMU's monitor on Ctrl-A C)
    snapshot: bool = False  # writes go to a temporary overlay; the image file stays as it was
    accel: str = ""  # empty: probe
    qmp_socket: Path | None = None  # QEMU's control socket, for a clean ACPI power-off
    # QEMU -audiodev backend (and its options) of an emulated sound card, e.g. "none" or "alsa,in.dev=mic";
    # empty: no sound card
    sound: str = ""
    extra: list[str] = field(default_factory=list)


def sound_card(audiodev: str) -> list[str]:
    """An ICH9 HD Audio controller (q35's own) with a duplex codec: line-in is the guest's microphone, line-out its
    speaker; the guest's snd-hda-intel and snd-hda-codec-generic drive them."""
    return [
        "-audiodev", f"{audiodev},id=snd0",
        "-device", "ich9-intel-hda",
        "-device", "hda-duplex,audiodev=snd0",
    ]  # fmt: skip


def command(cfg: VMConfig, vars_file: Path) -> list[str]:
    if not cfg.image.is_file():
        raise VMError(f"no image at {cfg.image}", "build it first: make image")
    code, _ = find_firmware()
    accel = cfg.accel or ("kvm" if kvm_usable() else "tcg")
    cpu = cfg.cpu or ("host" if accel == "kvm" else "max")
    drive = (
        f"file={cfg.image},format=raw,if=virtio,cache=unsafe"
        if cfg.snapshot
        else (f"file={cfg.image},format=raw,if=virtio,cache=writeback")
    )
    if cfg.snapshot:
        drive += ",snapshot=on"
    cmd = [
        qemu_binary(),
        "-machine", "q35",
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
        # The guest's Python needs entropy early; without a source it can wait at boot under TCG.
        "-device", "virtio-rng-pci",
    ]  # fmt: skip
    if cfg.serial_port:
        cmd += [
            "-chardev", f"socket,id=ser0,host=127.0.0.1,port={cfg.serial_port},server=on,wait=on",
            "-serial", "chardev:ser0",
        ]  # fmt: skip
    else:
        cmd += ["-serial", "mon:stdio"]
    if cfg.qmp_socket is not None:
        cmd += ["-qmp", f"unix:{cfg.qmp_socket},server=on,wait=off"]
    if cfg.sound:
        cmd += sound_card(cfg.sound)
    return cmd + cfg.extra


def _die_with_parent() -> None:
    """In the child before exec: a test run that is killed takes its VMs with it instead of leaving them running."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class VM:
    """One QEMU process (started and stopped by its PID), with its own copy of the UEFI variable store."""

    def __init__(self, cfg: VMConfig, log_path: Path | None = None) -> None:
        self.cfg = cfg
        self.log_path = log_path
        self._tmp = tempfile.TemporaryDirectory(prefix="llmos-vm-")
        self.vars_file = Path(self._tmp.name) / "OVMF_VARS.fd"
        shutil.copyfile(find_firmware()[1], self.vars_file)
        self.cmd = command(cfg, self.vars_file)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
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
        """SIGKILL, as pulling the plug: no flush, no shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def powerdown(self) -> None:
        """Press the ACPI power button (through QMP): the guest shuts down cleanly and QEMU exits."""
        if self.cfg.qmp_socket is None:
            raise VMError("this VM has no QMP socket", "start it with VMConfig(qmp_socket=...)")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(os.fspath(self.cfg.qmp_socket))
            f = s.makefile("rwb")
            f.readline()  # greeting
            for cmd in ("qmp_capabilities", "system_powerdown"):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while True:  # skip asynchronous events until the command's reply
                    reply = json.loads(f.readline())
                    if "return" in reply or "error" in reply:
                        break
                if "error" in reply:
                    raise VMError(f"QMP {cmd} failed: {reply['error']}")

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


def run(cfg: VMConfig) -> int:
    vm = VM(cfg)
    accel = vm.cmd[vm.cmd.index("-accel") + 1]
    cpu = vm.cmd[vm.cmd.index("-cpu") + 1]
    card = f", sound card on -audiodev {cfg.sound}" if cfg.sound else ""
    print(f"== booting {cfg.image} in QEMU ({accel}, -cpu {cpu}, {cfg.mem_mib} MiB{card}); ", end="", file=sys.stderr)
    if cfg.serial_port:
        print(f"serial console on 127.0.0.1:{cfg.serial_port} (QEMU waits for a client)", file=sys.stderr)
    else:
        print("serial console below. Ctrl-A X quits, Ctrl-A C is QEMU's monitor.", file=sys.stderr)
        if accel == "tcg":
            print("   software emulation: the prompt takes about 2-3 minutes", file=sys.stderr)
    try:
        return subprocess.call(vm.cmd)
    finally:
        vm.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="boot the image")
    r.add_argument("--image", type=Path, required=True)
    r.add_argument("--cpu", default="", help="QEMU CPU model, e.g. Nehalem (no AVX2) or max")
    r.add_argument("--mem", type=int, default=1024, help="guest RAM in MiB")
    r.add_argument("--smp", type=int, default=2)
    r.add_argument("--serial-port", type=int, default=0, help="serve ttyS0 on 127.0.0.1:PORT instead")
    r.add_argument("--snapshot", action="store_true", help="leave the image file unchanged")
    r.add_argument("--accel", choices=["kvm", "tcg"], default="")
    r.add_argument(
        "--sound",
        default="",
        metavar="BACKEND",
        help="add a sound card whose audio goes to this QEMU -audiodev backend: none (silence) or alsa (this host)",
    )
    sub.add_parser("probe-kvm", help="say whether KVM can run guests here")
    args = parser.parse_args(argv)
    try:
        if args.command == "probe-kvm":
            ok = kvm_usable()
            print("kvm" if ok else "tcg")
            return 0
        cfg = VMConfig(
            image=args.image,
            cpu=args.cpu,
            mem_mib=args.mem,
            smp=args.smp,
            serial_port=args.serial_port,
            snapshot=args.snapshot,
            accel=args.accel,
            sound=args.sound,
        )
        return run(cfg)
    except VMError as e:
        print(f"vm: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
