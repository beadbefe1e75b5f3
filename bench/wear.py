"""`make bench-wear` (issue 14, point 5): the bytes the appliance writes to its card in an hour at one request a minute.

The image boots in QEMU (image/vm.py) from a fresh copy with its own configuration. QEMU's count of the bytes the
guest wrote to its disks (QMP `query-blockstats`, `wr_bytes`: what a card would receive; root is read-only and the
ESP unmounted, so it is var) is read a minute after READY (the first boot's own work done) and again once the boot's
one-off timers have run (systemd-tmpfiles-clean.timer: 15 minutes after boot, then daily): what is written between
the two is the boot's, and since that timer runs daily it is counted once in the day. Then a question is asked over
the serial console every SPACING_S seconds for WINDOW_S seconds, and the count is read again.
The image commits request rows and samples an hour at a time (database.request_flush and sample_flush, 3600 s; each
answer goes at once to the request ring): a window shorter than an hour would miss the commit it owes, so the window
is an hour and holds one of each, and a day at one request a minute is 24 such windows plus the boot's part. The
device's own `/status` `flash:` line (wear.py, from the guest kernel's counters) is shown beside it, and so is who
wrote: every 5 minutes the guest's llmos-io-report.service (on with a credential) writes each process's bytes
written to its second serial port, and the difference between the first report of the window and the last is listed
by process. Target: at most 5 MB a day.

  bench/wear.py --image build/image/llmos-edge.raw [--write]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "image"))
sys.path.insert(0, str(REPO / "tests" / "image"))
sys.path.insert(0, str(REPO))

import vm as vmlib  # noqa: E402
from conftest import boot, card  # noqa: E402

from bench.report import begin  # noqa: E402
from llmos_edge.wear import TARGET_DAY_BYTES, size  # noqa: E402

SETTLE_S = 60  # after READY, before the first reading: the first boot's own writes (var grown, the journal flushed)
# Guest uptime at which the window starts: past systemd-tmpfiles-clean.timer's OnBootSec=15min (its daily run, whose
# journal lines cost whole pages of the journal's files) and the run itself.
STEADY_UPTIME_S = 17 * 60
WINDOW_S = 3600  # one commit period of the image's configuration (see the docstring)
SPACING_S = 60  # one request a minute: the target's rate
QUESTIONS = ["what model is this", "reverse lantern", "how hot are you", "ping", "what can you do"]


def written(vm: vmlib.VM) -> int:
    """Bytes the guest has written to all its block devices (QMP query-blockstats)."""
    stats = vm.qmp("query-blockstats")
    return sum(int(d.get("stats", {}).get("wr_bytes", 0)) for d in stats)


IO_CREDENTIAL = ["-smbios", "type=11,value=io.systemd.credential:llmos.bench.io=1"]


def io_reports(text: str) -> list[tuple[float, dict[str, int]]]:
    """The blocks of llmos-io-report (rootfs-overlay/usr/lib/llmos/llmos-io-report): (guest uptime, bytes by writer),
    a writer being "comm[pid]" for a process, "ext4 NAME" or "block DEV" (sectors turned into bytes)."""
    reports: list[tuple[float, dict[str, int]]] = []
    for block in text.replace("\r", "").split("== io uptime=")[1:]:
        if "== end" not in block:
            continue  # the last block may still be being written
        head, _, rest = block.partition("\n")
        counts: dict[str, int] = {}
        for line in rest.split("== end")[0].splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "ext4":
                counts[f"ext4 {parts[1]}"] = int(parts[2]) * 1024
            elif len(parts) == 3 and parts[0] == "block":
                counts[f"block {parts[1]}"] = int(parts[2]) * 512
            elif len(parts) >= 3 and parts[0].isdigit():
                counts[f"{' '.join(parts[2:])}[{parts[1]}]"] = int(parts[0])
        reports.append((float(head.strip()), counts))
    return reports


def writers(reports: list[tuple[float, dict[str, int]]], top: int = 10) -> str:
    """The largest writers between the first report and the last, as Markdown list lines."""
    if len(reports) < 2:
        return "- (fewer than two reports of llmos-io-report on ttyS1: no attribution)"
    (u0, first), (u1, last) = reports[0], reports[-1]
    delta = {k: v - first.get(k, 0) for k, v in last.items() if v - first.get(k, 0) > 0}
    lines = [f"- between guest uptime {u0:.0f} and {u1:.0f} s ({(u1 - u0) / 60:.0f} min), bytes dirtied by process"]
    lines.append("  (a process that exited in between is missing), and the devices' own counts:")
    procs = sorted(((v, k) for k, v in delta.items() if not k.startswith(("ext4 ", "block "))), reverse=True)
    for v, k in procs[:top]:
        lines.append(f"  - `{k}`: {size(v)}")
    for k in sorted(k for k in delta if k.startswith(("ext4 ", "block "))):
        lines.append(f"  - `{k}`: {size(delta[k])}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, default=REPO / "build/image/llmos-edge.raw")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args()
    report = begin()
    work = Path(tempfile.mkdtemp(prefix="llmos-wear-"))
    disk = work / "disk.raw"
    card(args.image, disk)
    io_out = work / "io-report.txt"
    b = boot(
        disk, "bench-wear", extra=[*IO_CREDENTIAL, "-chardev", f"file,id=io,path={io_out}", "-serial", "chardev:io"]
    )
    assert b.vm is not None
    try:
        time.sleep(SETTLE_S)
        wb = written(b.vm)
        time.sleep(max(0.0, b.vm.started_at + STEADY_UPTIME_S - time.monotonic()))
        w0, t0 = written(b.vm), time.monotonic()
        boot_s = t0 - b.vm.started_at
        print(f"a question every {SPACING_S} s for {WINDOW_S} s...", flush=True)
        asked = 0
        while time.monotonic() - t0 < WINDOW_S:
            b.console.ask(QUESTIONS[asked % len(QUESTIONS)], timeout=300)
            asked += 1
            time.sleep(max(0.0, t0 + asked * SPACING_S - time.monotonic()))
        w1, t1 = written(b.vm), time.monotonic()
        # the window's first report is the one taken at or after its start (guest uptime ~ QEMU's run time)
        start_uptime = t0 - b.vm.started_at
        reports = [r for r in io_reports(io_out.read_text(errors="replace")) if r[0] >= start_uptime - 10]
        flash = re.search(r"^flash: .*$", b.console.ask("/status", timeout=120), re.M)
        b.shutdown()
    finally:
        b.vm.close()
    boot_part = w0 - wb  # the boot's one-offs and the daily timer's run: counted once a day
    day = (w1 - w0) / (t1 - t0) * 86400 + boot_part
    body = "\n".join(
        [
            f"The image booted in QEMU (TCG) from a fresh copy, its own configuration (request rows and samples "
            f"committed hourly, each answer written at once to the request ring); QEMU's `wr_bytes` of the guest's "
            f"disks {SETTLE_S} s after READY, at {boot_s:.0f} s of QEMU's run (past the boot's one-off timers), "
            f"and after {t1 - t0:.0f} s of one question every {SPACING_S} s ({asked} questions).",
            "",
            f"- written between READY + {SETTLE_S} s and the window: {size(boot_part)} (the boot's one-offs and the "
            f"first run of the daily systemd-tmpfiles-clean; counted once in the day)",
            f"- written in the window: {size(w1 - w0)} = **{size((w1 - w0) / asked)} a request**, idle writes included",
            f"- a day at one request a minute: **{size(day)}** (24 windows and the boot's part once)",
            f"- the device's own `/status` at the end: `{flash.group(0) if flash else 'no flash line'}`",
            writers(reports),
        ]
    )
    print(body)
    report.verdict(
        "bytes a day at one request a minute", size(day), f"<= {size(TARGET_DAY_BYTES)}", day <= TARGET_DAY_BYTES
    )
    if args.write:
        report.write_section("wear", "Flash wear (issue 14)", "make bench-wear", body)
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
