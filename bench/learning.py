"""make bench-learning: consolidating 10 and 50 taught pairs into the default model (issue 15, point 4).

For each count, one consolidation run as the appliance's background job runs it (`python -m llmos_edge.finetune`,
a process of its own): fine-tune the built-in Q8_0 model on the pairs (bench/learning_pairs.py) plus replay,
quantize the result to Q8_0 and Q4_K_M, and ask each file, through the engine's worker process, every taught
question (with no taught-answer lookup: the weights alone) and the held-out set (model/heldout.jsonl), beside the
built-in file of the same type. Time, CPU-seconds and peak RSS are the training's (the validation engine's RSS is
shown apart).

Tune the recipe (finetune.Settings) on the development set, which shares nothing with what this bench judges:
bench/learning_dev.py teaches learning_pairs.dev_pairs (the same ten question shapes, fillers of their own) and
asks a dev split drawn from the default model's training distribution with a seed of its own (no held-out prompt
or word), left out of the replay. Settings.keep_margin was chosen there; the rate and the taught share are older
and were measured on the held-out set itself (docs/learning.md), so this bench is not blind to them.

    python bench/learning.py [--counts 10 50] [--threads 1] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_pairs import pairs as bench_pairs
from report import REPO, begin

MODEL_DIR = REPO / "model"
MASTER = MODEL_DIR / "llmos-tiny-q8_0.gguf"
BUILT_IN = {"Q8_0": MASTER, "Q4_K_M": MODEL_DIR / "llmos-tiny-q4_k_m.gguf"}
MAX_HELDOUT_DROP = 1.0  # points
MAX_PEAK_RSS_MIB = 400  # training on a 1 GiB board beside the engine and the supervisor
MAX_CPU_S_PER_PAIR = 30  # at most: 50 pairs in 25 CPU-minutes


def consolidate(n: int, threads: int, work: Path) -> dict[str, Any]:
    pairs_file = work / f"pairs-{n}.json"
    pairs_file.write_text(
        json.dumps([{"id": i + 1, "question": q, "answer": a} for i, (q, a) in enumerate(bench_pairs(n))])
    )
    report = work / f"report-{n}.json"
    cmd = [sys.executable, "-m", "llmos_edge.finetune", "--master", str(MASTER), "--pairs", str(pairs_file)]
    for quantization, built_in in BUILT_IN.items():
        cmd += ["--out", f"{quantization}={work / f'taught-{n}-{quantization}.gguf'}"]
        cmd += ["--baseline", f"{quantization}={built_in}"]
    cmd += ["--report", str(report), "--threads", str(threads)]
    env = os.environ | {"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    t0 = time.monotonic()
    with (work / f"log-{n}.txt").open("w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if not report.exists():
        sys.exit(f"consolidating {n} pairs failed (exit {rc}); see {work / f'log-{n}.txt'}")
    result: dict[str, Any] = json.loads(report.read_text())
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps({k: v for k, v in result.items() if k != "results"}), flush=True)
    return result


def pct(v: list[int]) -> str:
    return f"{v[0]}/{v[1]} = {100 * v[0] / max(v[1], 1):.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--threads", type=int, default=1, help="training threads (OpenBLAS)")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    ap.add_argument("--keep", type=Path, default=None, help="keep the models and reports in this directory")
    args = ap.parse_args()
    report = begin()
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = {n: consolidate(n, args.threads, work) for n in args.counts}
    rows = [
        "| pairs | steps | training time | CPU-seconds | peak RSS (training) | peak RSS (validating engine) |",
        "|---|---|---|---|---|---|",
    ]
    acc = [
        "| pairs | file | change kept | taught, before (built-in, no lookup) | taught, after | held-out, before "
        "| held-out, after |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in runs.items():
        rows.append(
            f"| {n} | {r['steps']} | {r['train_seconds']:.0f} s | {r['train_cpu_seconds']:.0f} | "
            f"{r['train_peak_rss_mib']:.0f} MiB | {r['engine_peak_rss_mib']:.0f} MiB |"
        )
        for quantization, q in r["results"].items():
            acc.append(
                f"| {n} | {quantization} | {r['kept'][quantization]:.2f} | {pct(q['taught_before'])} | "
                f"{pct(q['taught'])} | "
                f"{pct(q['heldout_before'])} | {pct(q['heldout_after'])} |"
            )
            report.verdict(
                f"{n} pairs, {quantization}: taught pairs answered exactly from the weights",
                pct(q["taught"]),
                "all",
                q["taught"][0] == q["taught"][1],
            )
            before = 100 * q["heldout_before"][0] / q["heldout_before"][1]
            after = 100 * q["heldout_after"][0] / q["heldout_after"][1]
            report.verdict(
                f"{n} pairs, {quantization}: held-out change",
                f"{after - before:+.1f} points",
                f">= -{MAX_HELDOUT_DROP:.0f} point",
                after >= before - MAX_HELDOUT_DROP,
            )
        report.verdict(
            f"{n} pairs: peak RSS of training",
            f"{r['train_peak_rss_mib']:.0f} MiB",
            f"<= {MAX_PEAK_RSS_MIB} MiB",
            r["train_peak_rss_mib"] <= MAX_PEAK_RSS_MIB,
        )
        report.verdict(
            f"{n} pairs: CPU-seconds of training",
            f"{r['train_cpu_seconds']:.0f} s ({r['train_cpu_seconds'] / n:.1f} per pair)",
            f"<= {MAX_CPU_S_PER_PAIR} per pair",
            r["train_cpu_seconds"] <= MAX_CPU_S_PER_PAIR * n,
        )
    body = (
        f"Training: numpy (llmos_edge/trainer.py), {args.threads} OpenBLAS thread(s); the "
        "training time and CPU-seconds include quantizing to both types. The pairs are bench/learning_pairs.py's "
        "(ten question shapes, five fillers each: similar questions with different answers). Held-out: "
        "model/heldout.jsonl, 440 prompts (240 FAQ phrasings, 200 reversals), greedy, exact match.\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(acc)
    )
    print(body)
    if args.write:
        report.write_section(
            "learning",
            "Learning: consolidating taught pairs into the default model",
            f"make bench-learning (python bench/learning.py --counts {' '.join(map(str, args.counts))} "
            f"--threads {args.threads} --write)",
            body,
        )
    return report.exit_code()


if __name__ == "__main__":
    raise SystemExit(main())
