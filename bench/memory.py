"""The pre-flight memory estimate (llmos_edge.models.estimate_memory, from the GGUF header alone) against the engine
worker's measured peak RSS, for the project's own models (the default model and the 25M/50M/85M speed models) at
contexts 512 and 2048.

The measurement is bench/models.py's `measure` (the same one the architecture matrix uses): a fresh worker, a
prompt that fills most of the context, the worker's VmHWM after the answer. Target: every estimate within 15% of
the measured peak (TOLERANCE); exits 1 and prints MISSED when the worst is not. tests/integration/test_governor.py
checks the same limit at context 512.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.models import Run, measure
from bench.report import begin
from llmos_edge.models import MIB

CACHE_MODELS = Path.home() / ".cache" / "llmos-edge" / "models"
REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.15
CONTEXTS = (512, 2048)


def default_models() -> list[Path]:
    return [
        REPO / "model" / "llmos-tiny-q8_0.gguf",
        CACHE_MODELS / "speed-25m-q4_k_m.gguf",
        CACHE_MODELS / "speed-50m-q4_k_m.gguf",
        CACHE_MODELS / "speed-85m-q4_k_m.gguf",
    ]


def table(runs: list[Run]) -> str:
    rows = [
        "| model | params | quant | context | prompt tokens | weights + repack | KV | compute | runtime "
        "| estimate | measured peak RSS | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        e, info = r.estimate, r.info
        rows.append(
            f"| {r.model.name} | {info.n_params / 1e6:.1f}M | {info.quantization} | {e.n_ctx} | {r.stats.tokens_in} "
            f"| {(e.weights + e.repacked) / MIB:.1f} MiB | {e.kv_cache / MIB:.1f} MiB | {e.compute / MIB:.1f} MiB "
            f"| {e.runtime / MIB:.0f} MiB | {e.total / MIB:.1f} MiB | {r.peak_rss / MIB:.1f} MiB "
            f"| {r.error * 100:+.1f}% |"
        )
    return "\n".join(rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--model",
        type=Path,
        action="append",
        help="a GGUF file (repeatable); default: the default model and the 25M/50M/85M speed models",
    )
    ap.add_argument("--context", type=int, action="append", help="context (repeatable); default 512 and 2048")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    models = [m for m in (args.model or default_models()) if m.exists()]
    if not models:
        wanted = ", ".join(str(m) for m in args.model or default_models())
        print(f"none of the models exists ({wanted}); `make speed-model` builds the default ones", file=sys.stderr)
        return 2
    report = begin()
    runs = []
    for m in models:
        for ctx in args.context or CONTEXTS:
            r = measure(m, ctx)
            runs.append(r)
            print(
                f"{m.name} ctx {r.estimate.n_ctx}: estimate {r.estimate.total / MIB:.1f} MiB, measured "
                f"{r.peak_rss / MIB:.1f} MiB, error {r.error * 100:+.1f}%",
                flush=True,
            )
    worst = max(runs, key=lambda r: abs(r.error))
    report.verdict(
        f"worst memory estimate error ({worst.model.name} at context {worst.estimate.n_ctx})",
        f"{worst.error * 100:+.1f}%",
        f"within {TOLERANCE:.0%}",
        abs(worst.error) <= TOLERANCE,
    )
    if args.write:
        report.write_section(
            "memory",
            "Memory estimate from the GGUF header vs measured worker RSS",
            "make bench-memory (python bench/memory.py --write)",
            "The estimate (`llmos_edge.models.estimate_memory`) is computed from the header before loading; the "
            "measurement is the engine worker's peak RSS (VmHWM) after it answers a prompt that fills most of the "
            "context. Error = (estimate - measured) / measured.\n\n"
            + table(runs)
            + f"\n**Worst error: {abs(worst.error) * 100:.1f}%** (target: within {TOLERANCE:.0%})\n",
        )
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
