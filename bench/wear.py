"""`make bench-wear` (issue 14, point 5): the bytes the appliance writes to its card, idle and per request.

The image boots in QEMU (image/vm.py) from a fresh copy; a minute after READY (the first boot's own work done),
QEMU's count of the bytes the guest wrote to its disks (QMP `query-blockstats`, `wr_bytes`: what a card would
receive; root is read-only and the ESP unmounted, so it is var) is read, then again after IDLE_S seconds of nothing,
then after REQUESTS questions asked over the serial console one every SPACING_S seconds. Idle rate = the idle
interval's bytes per hour; a request = the busy interval's bytes less the idle rate over it, per request; a day at
one request a minute = 24 idle hours + 1440 requests. The device's own `/status` `flash:` line (wear.py, from the
guest kernel's counters) is shown beside it. Target: at most 5 MB a day.

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
from llmos_edge.wear import REQUESTS_A_DAY, TARGET_DAY_BYTES, size  # noqa: E402

SETTLE_S = 60  # after READY, before the first reading: the first boot's own writes (var grown, the journal flushed)
IDLE_S = 1200
REQUESTS = 30
SPACING_S = 20
QUESTIONS = ["what model is this", "reverse lantern", "how hot are you", "ping", "what can you do"]


def written(vm: vmlib.VM) -> int:
    """Bytes the guest has written to all its block devices (QMP query-blockstats)."""
    stats = vm.qmp("query-blockstats")
    return sum(int(d.get("stats", {}).get("wr_bytes", 0)) for d in stats)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, default=REPO / "build/image/llmos-edge.raw")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args()
    report = begin()
    work = Path(tempfile.mkdtemp(prefix="llmos-wear-"))
    disk = work / "disk.raw"
    card(args.image, disk)
    b = boot(disk, "bench-wear")
    assert b.vm is not None
    try:
        time.sleep(SETTLE_S)
        w0, t0 = written(b.vm), time.monotonic()
        print(f"idle for {IDLE_S} s...", flush=True)
        time.sleep(IDLE_S)
        w1, t1 = written(b.vm), time.monotonic()
        for i in range(REQUESTS):
            due = t1 + (i + 1) * SPACING_S
            b.console.ask(QUESTIONS[i % len(QUESTIONS)], timeout=300)
            time.sleep(max(0.0, due - time.monotonic()))
        w2, t2 = written(b.vm), time.monotonic()
        flash = re.search(r"^flash: .*$", b.console.ask("/status", timeout=120), re.M)
        b.shutdown()
    finally:
        b.vm.close()
    idle_h = (w1 - w0) / (t1 - t0) * 3600
    per_request = max(0.0, (w2 - w1) - idle_h / 3600 * (t2 - t1)) / REQUESTS
    day = idle_h * 24 + per_request * REQUESTS_A_DAY
    body = "\n".join(
        [
            f"The image booted in QEMU (TCG) from a fresh copy; QEMU's `wr_bytes` of the guest's disks {SETTLE_S} s "
            f"after READY, after {IDLE_S} s idle, and after {REQUESTS} questions one every {SPACING_S} s "
            f"({t2 - t1:.0f} s).",
            "",
            f"- idle: {size(w1 - w0)} in {t1 - t0:.0f} s = **{size(idle_h)} an hour**",
            f"- busy: {size(w2 - w1)} in {t2 - t1:.0f} s = **{size(per_request)} a request** beyond the idle rate",
            f"- a day at one request a minute: {size(idle_h)} x 24 + {size(per_request)} x {REQUESTS_A_DAY} = "
            f"**{size(day)}**",
            f"- the device's own `/status` at the end: `{flash.group(0) if flash else 'no flash line'}`",
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
