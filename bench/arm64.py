"""`make bench-arm64` (issue 17, point 5): the arm64 image's size, and decoding speed in its guest.

Size: the image file and `xz -6` of it, as bench/boot.py measures the x86-64 one. Speed: one boot of a fresh copy in
QEMU's virt machine (Cortex-A76, llama.cpp's armv8.2_2 variant) under software emulation, then the first PROMPTS
prompts of model/heldout.jsonl asked over the console, each answer's tokens per second read from /status's `last
answer:` line (the engine's own count). Emulated ARM on an x86-64 host says nothing of a real board's speed: it is a
functional figure, that the arm64 engine runs and at what rate here. The x86-64 guest's rate on the same prompts, in
the same run, is beside it for scale.

  bench/arm64.py --image build/image-arm64/llmos-edge.raw --x86-image build/image/llmos-edge.raw [--write]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "image"))
sys.path.insert(0, str(REPO / "tests" / "image"))
sys.path.insert(0, str(REPO))

from conftest import boot, card  # noqa: E402

from bench.boot import sizes  # noqa: E402
from bench.report import begin  # noqa: E402

PROMPTS = 8  # fixed before any result was seen
LAST_ANSWER = re.compile(r"^last answer: (\d+) tokens, ([\d.]+) tok/s", re.M)


def rates(image: Path, arch: str, work: Path) -> tuple[list[float], float, str]:
    """Tokens per second of each prompt's answer in one boot of `image`, the boot's seconds to READY, the variant."""
    disk = card(image, work / f"{arch}.raw")
    b = boot(disk, f"bench-{arch}", arch=arch)
    try:
        variant = re.search(r"\bcpu ([\w.-]+)", b.ready_status)
        out = []
        prompts = [json.loads(line)["prompt"] for line in (REPO / "model/heldout.jsonl").read_text().splitlines()]
        for prompt in prompts[:PROMPTS]:
            b.console.ask(prompt, timeout=600)
            m = LAST_ANSWER.search(b.console.ask("/status", timeout=120))
            if m and int(m.group(1)) > 0:
                out.append(float(m.group(2)))
        return out, b.wall_s, variant.group(1) if variant else "unknown"
    finally:
        if b.vm is not None:
            b.vm.close()
        disk.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, default=REPO / "build/image-arm64/llmos-edge.raw")
    ap.add_argument("--x86-image", type=Path, default=REPO / "build/image/llmos-edge.raw")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args()
    report = begin()
    work = Path(tempfile.mkdtemp(prefix="llmos-bench-arm64-"))
    try:
        arm, arm_boot, arm_variant = rates(args.image, "arm64", work)
        print(f"arm64 ({arm_variant}): {arm} tok/s; READY after {arm_boot:.0f} s", flush=True)
        x86, x86_boot, x86_variant = rates(args.x86_image, "x86-64", work)
        print(f"x86-64 ({x86_variant}): {x86} tok/s; READY after {x86_boot:.0f} s", flush=True)
        size = sizes(args.image, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    answered = len(arm) == PROMPTS
    report.verdict("arm64 guest answers every prompt", f"{len(arm)}/{PROMPTS}", f"{PROMPTS}/{PROMPTS}", answered)
    body = (
        f"Image `{args.image.relative_to(REPO) if args.image.is_relative_to(REPO) else args.image}`: "
        f"{size['apparent']:.0f} MB apparent, {size['on_disk']:.0f} MB on disk, **{size['xz']:.1f} MB after xz -6** "
        f"({size['xz_seconds']:.0f} s to compress).\n\n"
        f"Decoding in the guest under QEMU's software emulation (TCG; a functional figure, not a board's speed), the "
        f"first {PROMPTS} prompts of model/heldout.jsonl, tokens per second of each answer from /status, median "
        f"(min-max):\n\n"
        "| guest | llama.cpp variant | tok/s | answers | seconds to READY |\n|---|---|---|---|---|\n"
        f"| arm64, virt, Cortex-A76 | {arm_variant} | {statistics.median(arm) if arm else 0:.1f} "
        f"({min(arm, default=0):.1f}-{max(arm, default=0):.1f}) | {len(arm)}/{PROMPTS} | {arm_boot:.0f} |\n"
        f"| x86-64, q35, `-cpu max` | {x86_variant} | {statistics.median(x86) if x86 else 0:.1f} "
        f"({min(x86, default=0):.1f}-{max(x86, default=0):.1f}) | {len(x86)}/{PROMPTS} | {x86_boot:.0f} |\n"
    )
    if args.write:
        title = "arm64: image size and decoding in the guest (issue 17)"
        report.write_section("arm64", title, "make bench-arm64", body)
    print(body)
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
