"""`make bench-boot` (issue 14): the appliance's size and boot time against a bare Debian image.

Size: the image file (apparent and on disk), each partition, and `xz -6` of the whole image (what a download would
be; target at most 120 MB). Boot: the appliance and a bare mkosi Debian image with the same kernel, initrd modules
and kernel command line (bench/bare/) boot in turn in the same QEMU (image/vm.py: TCG here, 2 vCPUs, 1 GiB), each
from a fresh copy as a device's first boot. Measured: guest uptime at the appliance's READY (`Started
llmos.service`, from the journal read off the disk after a clean power-off) and at the bare image's
multi-user.target (a unit prints /proc/uptime on the serial port), and host wall time from QEMU's start to each.
Target: the appliance's guest time to READY at most 1.3x the bare image's to multi-user.target.

  bench/boot.py --image build/image/llmos-edge.raw --bare build/bare/llmos-bare.raw [--rounds 2] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "image"))
sys.path.insert(0, str(REPO))

import vm as vmlib  # noqa: E402

from bench.report import begin  # noqa: E402

XZ_TARGET_MB = 120.0
BOOT_RATIO_TARGET = 1.3
BOOT_TIMEOUT = 900.0
DISK_BYTES = 2 << 30  # as the image tests: var has room to grow at the first boot
BARE_MARK = b"bare-booted uptime="


def partitions(img: Path) -> dict[str, dict[str, int]]:
    table = json.loads(subprocess.run(["sfdisk", "-J", str(img)], check=True, capture_output=True).stdout)
    sector = int(table["partitiontable"].get("sectorsize", 512))
    return {
        p.get("name", "") or p["node"]: {"start": int(p["start"]) * sector, "size": int(p["size"]) * sector}
        for p in table["partitiontable"]["partitions"]
    }


def sizes(image: Path, workdir: Path) -> dict[str, float]:
    """MB (10^6 bytes) of the image: apparent, on disk, partitions, and xz -6 (all threads) of the whole file."""
    mb = 1e6
    out: dict[str, float] = {
        "apparent": image.stat().st_size / mb,
        "on_disk": image.stat().st_blocks * 512 / mb,
    }
    for name, p in partitions(image).items():
        out[f"partition {name}"] = p["size"] / mb
    xz = workdir / "image.raw.xz"
    start = time.monotonic()
    with image.open("rb") as src, xz.open("wb") as dst:
        subprocess.run(["xz", "-6", "-T0", "-c"], stdin=src, stdout=dst, check=True)
    out["xz"] = xz.stat().st_size / mb
    out["xz_seconds"] = time.monotonic() - start
    xz.unlink()
    return out


def fresh_copy(image: Path, workdir: Path, name: str) -> Path:
    disk = workdir / f"{name}.raw"
    subprocess.run(["cp", "--sparse=always", str(image), str(disk)], check=True)
    os.truncate(disk, max(DISK_BYTES, disk.stat().st_size))
    return disk


def start_vm(disk: Path, workdir: Path, name: str) -> tuple[vmlib.VM, vmlib.ConsoleScript, object]:
    cfg = vmlib.VMConfig(image=disk, serial_port=vmlib.free_port(), qmp_socket=workdir / f"{name}.qmp")
    vm = vmlib.VM(cfg, log_path=workdir / f"{name}.qemu.log")
    vm.start()
    sock = vmlib.connect_serial(vm)
    log = (workdir / f"{name}.serial.log").open("wb")
    return vm, vmlib.ConsoleScript(sock, log), log


def boot_bare(bare: Path, workdir: Path, n: int) -> tuple[float, float]:
    """(guest uptime at multi-user.target, host wall from QEMU's start to the mark), in seconds."""
    disk = fresh_copy(bare, workdir, f"bare-{n}")
    vm, script, log = start_vm(disk, workdir, f"bare-{n}")
    try:
        script.wait_for(BARE_MARK, BOOT_TIMEOUT, "bare image's multi-user.target mark")
        wall = time.monotonic() - vm.started_at
        uptime = float(script.wait_for(b"\n", 30, "uptime").strip())
    finally:
        vm.close()
        log.close()  # type: ignore[attr-defined]
        disk.unlink()
    return uptime, wall


def journal_ready_uptime(disk: Path, workdir: Path) -> float:
    """Guest uptime at `Started llmos.service` (READY=1 of a Type=notify unit), from the journal on var."""
    offset = partitions(disk)["var"]["start"]
    out = workdir / "journal"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump /log/journal {out}", f"{disk}?offset={offset}"], capture_output=True)
    log = subprocess.run(
        ["journalctl", "--no-pager", "-D", str(out / "journal"), "-u", "llmos.service", "-o", "short-monotonic"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"^\[\s*([\d.]+)\].*Started llmos", log, re.M)
    if not m:
        raise RuntimeError(f"no 'Started llmos.service' in the journal on {disk}")
    return float(m.group(1))


def boot_appliance(image: Path, workdir: Path, n: int) -> tuple[float, float]:
    """(guest uptime at READY, host wall from QEMU's start to /status saying ready), in seconds."""
    disk = fresh_copy(image, workdir, f"llmos-{n}")
    vm, script, log = start_vm(disk, workdir, f"llmos-{n}")
    try:
        script.wait_for(vmlib.PROMPT, BOOT_TIMEOUT, "prompt")
        script.wait_answering(BOOT_TIMEOUT, 120, poll_s=1.0)
        wall = time.monotonic() - vm.started_at
        vm.powerdown()
        vm.wait(300)
    finally:
        vm.close()
        log.close()  # type: ignore[attr-defined]
    try:
        return journal_ready_uptime(disk, workdir), wall
    finally:
        disk.unlink()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--bare", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = p.parse_args()
    report = begin()
    work = Path(tempfile.mkdtemp(prefix="llmos-bench-boot-"))
    try:
        bare_runs, llmos_runs = [], []
        for n in range(args.rounds):  # in turn, so both see the same machine load
            bare_runs.append(boot_bare(args.bare, work, n))
            print(f"bare {n}: multi-user.target at {bare_runs[-1][0]:.1f} s guest, {bare_runs[-1][1]:.1f} s wall")
            llmos_runs.append(boot_appliance(args.image, work, n))
            print(f"llmos {n}: READY at {llmos_runs[-1][0]:.1f} s guest, {llmos_runs[-1][1]:.1f} s wall", flush=True)
        size = sizes(args.image, work)  # after the boots: xz takes every CPU for minutes
        bare_size = sizes(args.bare, work)
        print(f"image {size['xz']:.1f} MB xz (bare {bare_size['xz']:.1f} MB)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bare_guest = statistics.median(r[0] for r in bare_runs)
    llmos_guest = statistics.median(r[0] for r in llmos_runs)
    ratio = llmos_guest / bare_guest
    report.verdict("image size, xz -6", f"{size['xz']:.1f} MB", f"<= {XZ_TARGET_MB:.0f} MB", size["xz"] <= XZ_TARGET_MB)
    report.verdict(
        "boot to READY / bare boot to multi-user.target (guest uptime, medians)",
        f"{llmos_guest:.1f} s / {bare_guest:.1f} s = {ratio:.2f}x",
        f"<= {BOOT_RATIO_TARGET}x",
        ratio <= BOOT_RATIO_TARGET,
    )
    parts = ", ".join(f"{k.removeprefix('partition ')} {v:.0f}" for k, v in size.items() if k.startswith("partition"))
    runs = "\n".join(
        f"| {n} | {b[0]:.1f} | {b[1]:.1f} | {a[0]:.1f} | {a[1]:.1f} |"
        for n, (b, a) in enumerate(zip(bare_runs, llmos_runs, strict=True))
    )
    body = (
        f"Image `{args.image}`: {size['apparent']:.0f} MB apparent, {size['on_disk']:.0f} MB on disk (partitions, MB: "
        f"{parts}); **xz -6: {size['xz']:.1f} MB** ({size['xz_seconds']:.0f} s to compress). The bare image "
        f"(bench/bare/: Debian, kernel, systemd, nothing of the product): {bare_size['xz']:.1f} MB xz.\n\n"
        f"Boot, each from a fresh copy (a first boot; QEMU {vmlib.QEMU}, `-cpu max`, 2 vCPUs, 1 GiB, TCG unless KVM "
        "works): guest uptime at the bare image's multi-user.target and at the appliance's READY (`Started "
        "llmos.service`), and host wall time from QEMU's start (the appliance's: until `/status` says ready, polled "
        "every second).\n\n"
        "| round | bare guest s | bare wall s | appliance guest s | appliance wall s |\n|---|---|---|---|---|\n"
        f"{runs}\n\nMedians: appliance {llmos_guest:.1f} s, bare {bare_guest:.1f} s: **{ratio:.2f}x**."
    )
    if args.write:
        report.write_section("boot", "Image size and boot time (issue 14)", "make bench-boot", body)
    print(body)
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
