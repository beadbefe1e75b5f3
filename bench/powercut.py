"""`make bench-powercut` (issue 14, point 4): a hundred power cuts that lose the disk's write cache, at random
moments of one disk's life, and how many the device survived.

Each cut is of a random kind (tests/image/powercut.py: while it boots, while an answer streams, while a model
installs from a USB stick, right after an answer) at a random moment, on the image's disk served through nbdkit's
writeback cache (image/volatiledisk.py). A cut is survived when the device's next full boot reaches READY (a cut
while booting is judged with the cut before it, by the next boot that runs to READY). After the last cut the device
boots, answers `ping` and powers off, and the disk read on the host must pass `integrity_check`, hold every request
answered before a cut, and hold no half-done install. About 100 s a cut under TCG: close to three hours.

  bench/powercut.py --image build/image/llmos-edge.raw [--cuts 100] [--seed N] [--write]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "image"))
sys.path.insert(0, str(REPO / "tests" / "image"))
sys.path.insert(0, str(REPO))

from conftest import card, make_models_stick  # noqa: E402
from powercut import KINDS, Cuts  # noqa: E402

from bench.report import begin  # noqa: E402

CUTS = 100  # the count; fewer with --cuts is a smoke run, never written as the benchmark


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, default=REPO / "build/image/llmos-edge.raw")
    ap.add_argument("--cuts", type=int, default=CUTS)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md (only with 100 cuts)")
    args = ap.parse_args()
    report = begin()
    work = Path(tempfile.mkdtemp(prefix="llmos-powercut-"))
    disk = work / "disk.raw"
    card(args.image, disk)
    stick = make_models_stick(work / "stick.raw")
    rng = random.Random(args.seed)
    cuts = Cuts(disk, rng, stick)
    survived = lost = pending = 0
    kinds: dict[str, int] = {}
    started = time.monotonic()
    for i in range(args.cuts):
        kind = rng.choice(KINDS)
        kinds[kind] = kinds.get(kind, 0) + 1
        try:
            cuts.cut(kind, f"bench-cut-{i}")
            if kind != "booting":  # this boot ran to READY: the cuts before it were survived
                survived, pending = survived + pending, 0
        except Exception as e:  # the boot did not come up: the cuts since the last READY were not survived
            print(f"cut {i} ({kind}): the device did not come up: {e}", flush=True)
            lost, pending = lost + pending, 0
        pending += 1
        print(f"cut {i + 1}/{args.cuts}: {cuts.done[-1] if cuts.done else kind}", flush=True)
    try:
        cuts.final_boot("bench-cut-final")
        survived += pending
    except Exception as e:
        print(f"final boot: the device did not come up: {e}", flush=True)
        lost += pending
    problems = cuts.problems(work)
    minutes = (time.monotonic() - started) / 60
    body = [
        f"Image `{args.image.relative_to(REPO) if args.image.is_relative_to(REPO) else args.image}`, its disk served "
        "through nbdkit's writeback cache (image/volatiledisk.py): a cut loses every write not flushed. Cuts at random "
        f"moments (seed {args.seed}) of these kinds: "
        + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        + f"; {len(cuts.answered)} requests answered before some cut; {minutes:.0f} min.",
        "",
        f"Survived: **{survived} of {args.cuts}** (the next full boot reached READY); after the last: "
        + (
            "the database passed integrity_check, every answered request's row was there, no half-done install."
            if not problems
            else "; ".join(problems)
        ),
    ]
    print("\n".join(body))
    report.verdict("cuts survived", f"{survived}/{args.cuts}", f"{args.cuts}/{args.cuts}", survived == args.cuts)
    report.verdict("the disk after the cuts", "clean" if not problems else "; ".join(problems), "clean", not problems)
    if args.write:
        if args.cuts != CUTS:
            print(f"not written: the benchmark is {CUTS} cuts", file=sys.stderr)
            return 2
        report.write_section("powercut", "Power cuts (issue 14)", "make bench-powercut", "\n".join(body))
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
