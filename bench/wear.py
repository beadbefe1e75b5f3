"""`make bench-wear` (issue 14, point 5): the bytes the appliance writes to its card in an hour at one request a minute.

The image boots in QEMU (image/vm.py) from a fresh copy with its own configuration. A minute after READY (the
first boot's own work done), QEMU's count of the bytes the guest wrote to its disks (QMP `query-blockstats`,
`wr_bytes`: what a card would receive; root is read-only and the ESP unmounted, so it is var) is read; then a
question is asked over the serial console every SPACING_S seconds for WINDOW_S seconds, and the count is read again.
The image commits request rows and samples an hour at a time (database.request_flush and sample_flush, 3600 s; each
answer goes at once to the request ring): a window shorter than an hour would miss the commit it owes, so the window
is an hour and holds one of each, and a day at one request a minute is 24 such windows. The device's own `/status`
`flash:` line (wear.py, from the guest kernel's counters) is shown beside it. Target: at most 5 MB a day.

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
WINDOW_S = 3600  # one commit period of the image's configuration (see the docstring)
SPACING_S = 60  # one request a minute: the target's rate
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
        print(f"a question every {SPACING_S} s for {WINDOW_S} s...", flush=True)
        asked = 0
        while time.monotonic() - t0 < WINDOW_S:
            b.console.ask(QUESTIONS[asked % len(QUESTIONS)], timeout=300)
            asked += 1
            time.sleep(max(0.0, t0 + asked * SPACING_S - time.monotonic()))
        w1, t1 = written(b.vm), time.monotonic()
        flash = re.search(r"^flash: .*$", b.console.ask("/status", timeout=120), re.M)
        b.shutdown()
    finally:
        b.vm.close()
    day = (w1 - w0) / (t1 - t0) * 86400
    body = "\n".join(
        [
            f"The image booted in QEMU (TCG) from a fresh copy, its own configuration (request rows and samples "
            f"committed hourly, each answer written at once to the request ring); QEMU's `wr_bytes` of the guest's "
            f"disks {SETTLE_S} s after READY and after {t1 - t0:.0f} s of one question every {SPACING_S} s "
            f"({asked} questions).",
            "",
            f"- written in the window: {size(w1 - w0)} = **{size((w1 - w0) / asked)} a request**, idle writes included",
            f"- a day at one request a minute: **{size(day)}**",
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
