"""`make bench-boot` (issue 14): the appliance's size and boot time against a bare Debian image.

Size: the image file (apparent and on disk), each partition, and `xz -6` of the whole image (what a download would
be; target at most 120 MB). Boot: the appliance and a bare mkosi Debian image with the same kernel, initrd modules
and kernel command line (bench/bare/) boot in turn in the same QEMU (image/vm.py: TCG here, 2 vCPUs, 1 GiB), each
from a fresh copy as a device's first boot. Measured: guest uptime at the appliance's READY (`Started
llmos.service`, from the journal read off the disk after a clean power-off) and at the bare image's
multi-user.target (a unit prints /proc/uptime on the serial port), and host wall time from QEMU's start to each.
Target: the appliance's guest time to READY at most 1.3x the bare image's to multi-user.target.
Where the time went: each boot's `systemd-analyze blame` and critical chain (the appliance's to llmos.service from
its second serial port, written by llmos-boot-analysis.service, which the VM's SMBIOS credential switches on; the
bare image's to multi-user.target on its serial port); the last round's go into the report.

`--image` is the image the targets apply to (`make image VOICE=0`); `--voice-image`, optional, the image with voice
(`make image`, the default), measured the same way: what voice costs in size and boot time.

  bench/boot.py --image build/image-novoice/llmos-edge.raw [--voice-image build/image/llmos-edge.raw]
                --bare build/bare/llmos-bare.raw [--rounds 2] [--write]
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
DISK_BYTES = 4 << 30  # as the image tests (tests/image/conftest.py): var has room to grow at the first boot
BARE_MARK = b"bare-booted uptime="
ANALYSIS_CREDENTIAL = ["-smbios", "type=11,value=io.systemd.credential:llmos.bench.analyze=1"]
ANALYSIS_TIMEOUT = 240.0  # from READY to the end of the guest's systemd-analyze output (slow under TCG and load)


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


def start_vm(
    disk: Path, workdir: Path, name: str, extra: list[str] | None = None
) -> tuple[vmlib.VM, vmlib.ConsoleScript, object]:
    cfg = vmlib.VMConfig(
        image=disk, serial_port=vmlib.free_port(), qmp_socket=workdir / f"{name}.qmp", extra=list(extra or [])
    )
    vm = vmlib.VM(cfg, log_path=workdir / f"{name}.qemu.log")
    vm.start()
    sock = vmlib.connect_serial(vm)
    log = (workdir / f"{name}.serial.log").open("wb")
    return vm, vmlib.ConsoleScript(sock, log), log


def boot_bare(bare: Path, workdir: Path, n: int) -> tuple[float, float, str]:
    """(guest uptime at multi-user.target, host wall from QEMU's start to the mark, systemd-analyze's output)."""
    disk = fresh_copy(bare, workdir, f"bare-{n}")
    vm, script, log = start_vm(disk, workdir, f"bare-{n}")
    try:
        script.wait_for(BARE_MARK, BOOT_TIMEOUT, "bare image's multi-user.target mark")
        wall = time.monotonic() - vm.started_at
        uptime = float(script.wait_for(b"\n", 30, "uptime").strip())
        try:  # where the time went: a bonus, the figures above do not wait for it forever
            script.wait_for(b"bare-analysis-begin", ANALYSIS_TIMEOUT, "bare image's systemd-analyze")
            analysis = script.wait_for(b"bare-analysis-end", 120, "end of the bare image's systemd-analyze")
        except vmlib.ScriptError as e:
            analysis = f"({e})".encode()
    finally:
        vm.close()
        log.close()  # type: ignore[attr-defined]
        disk.unlink()
    return uptime, wall, analysis.decode(errors="replace").replace("\r", "").strip()


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


def boot_appliance(image: Path, workdir: Path, n: int, name: str = "llmos") -> tuple[float, float, str]:
    """(guest uptime at READY, host wall from QEMU's start to /status saying ready, systemd-analyze's output)."""
    disk = fresh_copy(image, workdir, f"{name}-{n}")
    # llmos-boot-analysis.service (on with the credential) writes systemd-analyze's output to the guest's ttyS1.
    analysis_out = workdir / f"{name}-{n}.analysis.txt"
    extra = [*ANALYSIS_CREDENTIAL, "-chardev", f"file,id=analysis,path={analysis_out}", "-serial", "chardev:analysis"]
    vm, script, log = start_vm(disk, workdir, f"{name}-{n}", extra)
    try:
        script.wait_for(vmlib.PROMPT, BOOT_TIMEOUT, "prompt")
        script.wait_answering(BOOT_TIMEOUT, 120, poll_s=1.0)
        wall = time.monotonic() - vm.started_at
        # The analysis waits for the end of the boot (every unit started), which READY may come before.
        deadline = time.monotonic() + ANALYSIS_TIMEOUT
        while "== end" not in analysis_out.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(2)
        analysis = analysis_out.read_text(errors="replace").replace("\r", "").split("== end")[0].strip()
        if not analysis:
            analysis = f"(no systemd-analyze output on ttyS1 within {ANALYSIS_TIMEOUT:.0f} s of READY)"
        vm.powerdown()
        vm.wait(300)
    finally:
        vm.close()
        log.close()  # type: ignore[attr-defined]
    try:
        return journal_ready_uptime(disk, workdir), wall, analysis
    finally:
        disk.unlink()


def blame_and_chain(analysis: str, top: int = 12) -> str:
    """The first `top` lines of blame, the critical chain and the total, from the analysis units' output."""
    sections: dict[str, list[str]] = {}
    current = ""
    for line in analysis.splitlines():
        if line.startswith("== "):
            current = line[3:].strip()
            sections[current] = []
        elif current:
            sections[current].append(line.rstrip())
    if not sections:
        return analysis.strip()
    chain = [x for x in sections.get("critical-chain", []) if x.strip() and not x.startswith("The time")]
    return "\n".join(
        [*sections.get("time", []), "", "blame:", *sections.get("blame", [])[:top], "", "critical chain:", *chain]
    ).strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, required=True, help="the image the targets apply to (without voice)")
    p.add_argument("--voice-image", type=Path, help="the same image with voice: what voice costs")
    p.add_argument("--voice-rounds", type=int, help="boots of the voice image (default: --rounds; 0: its size only)")
    p.add_argument("--bare", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = p.parse_args()
    report = begin()
    work = Path(tempfile.mkdtemp(prefix="llmos-bench-boot-"))
    try:
        bare_runs, llmos_runs, voice_runs = [], [], []
        for n in range(args.rounds):  # in turn, so all see the same machine load
            bare_runs.append(boot_bare(args.bare, work, n))
            print(f"bare {n}: multi-user.target at {bare_runs[-1][0]:.1f} s guest, {bare_runs[-1][1]:.1f} s wall")
            llmos_runs.append(boot_appliance(args.image, work, n))
            print(f"llmos {n}: READY at {llmos_runs[-1][0]:.1f} s guest, {llmos_runs[-1][1]:.1f} s wall", flush=True)
            if args.voice_image and n < (args.rounds if args.voice_rounds is None else args.voice_rounds):
                voice_runs.append(boot_appliance(args.voice_image, work, n, "voice"))
                v = voice_runs[-1]
                print(f"voice {n}: READY at {v[0]:.1f} s guest, {v[1]:.1f} s wall", flush=True)
        size = sizes(args.image, work)  # after the boots: xz takes every CPU for minutes
        voice_size = sizes(args.voice_image, work) if args.voice_image else None
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

    def described(what: str, path: Path, sz: dict[str, float]) -> str:
        parts = ", ".join(f"{k.removeprefix('partition ')} {v:.0f}" for k, v in sz.items() if k.startswith("partition"))
        return (
            f"{what} `{path}`: {sz['apparent']:.0f} MB apparent, {sz['on_disk']:.0f} MB on disk (partitions, MB: "
            f"{parts}); **xz -6: {sz['xz']:.1f} MB** ({sz['xz_seconds']:.0f} s to compress)."
        )

    voice_cols = " appliance with voice guest s | with voice wall s |" if voice_runs else ""

    def voice_cells(n: int) -> str:
        if not voice_runs:
            return ""
        return f" {voice_runs[n][0]:.1f} | {voice_runs[n][1]:.1f} |" if n < len(voice_runs) else " | |"

    runs = "\n".join(
        f"| {n} | {b[0]:.1f} | {b[1]:.1f} | {a[0]:.1f} | {a[1]:.1f} |{voice_cells(n)}"
        for n, (b, a) in enumerate(zip(bare_runs, llmos_runs, strict=True))
    )
    voice_text = ""
    if voice_size is not None:
        voice_text = (
            f"\n\n{described('With voice (`make image`, the default)', args.voice_image, voice_size)} Voice costs "
            f"{voice_size['xz'] - size['xz']:.1f} MB after xz."
        )
        if voice_runs:
            voice_guest = statistics.median(r[0] for r in voice_runs)
            voice_text += (
                f" Guest time to READY with voice (no sound card, so voice itself stays off): {voice_guest:.1f} s "
                f"median of {len(voice_runs)}, {voice_guest / bare_guest:.2f}x the bare image's."
            )
    analyses = (
        "\n\nWhere the time went, last round (`systemd-analyze` in the guest once the boot finished; the appliance's "
        "chain ends at llmos.service, READY):\n\nAppliance:\n\n```\n"
        f"{blame_and_chain(llmos_runs[-1][2]) or '(no analysis in the journal)'}\n```\n\nBare image:\n\n```\n"
        f"{blame_and_chain(bare_runs[-1][2]) or '(no analysis on the serial port)'}\n```"
    )
    body = (
        f"{described('Image without voice (`make image VOICE=0`; the target applies to it)', args.image, size)} "
        f"The bare image (bench/bare/: Debian, kernel, systemd, nothing of the product): {bare_size['xz']:.1f} MB xz."
        f"{voice_text}\n\n"
        f"Boot, each from a fresh copy (a first boot; QEMU {vmlib.QEMU}, `-cpu max`, 2 vCPUs, 1 GiB, TCG unless KVM "
        "works): guest uptime at the bare image's multi-user.target and at the appliance's READY (`Started "
        "llmos.service`), and host wall time from QEMU's start (the appliance's: until `/status` says ready, polled "
        "every second).\n\n"
        f"| round | bare guest s | bare wall s | appliance guest s | appliance wall s |{voice_cols}\n"
        f"|---|---|---|---|---|{'---|---|' if voice_runs else ''}\n"
        f"{runs}\n\nMedians: appliance {llmos_guest:.1f} s, bare {bare_guest:.1f} s: **{ratio:.2f}x**.{analyses}"
    )
    if args.write:
        report.write_section("boot", "Image size and boot time (issue 14)", "make bench-boot", body)
    print(body)
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
