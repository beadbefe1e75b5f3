"""The pre-flight memory estimate (llmos_edge.models.estimate_memory, from the GGUF header alone) against the engine
worker's measured peak RSS, for several models and contexts.

Each case starts the real engine worker (the same process the supervisor runs), sends a prompt that nearly fills
the context (so llama.cpp touches its whole KV cache and compute buffer, the peak of normal use), and samples the
worker's RSS with psutil while it answers. Target: every estimate within 15% of the measured peak (TOLERANCE); exits 1
and prints MISSED when the worst is not. The integration test tests/integration/test_governor.py uses `measure` with
the same limit.
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import begin
from llmos_edge.engine import Engine, EngineSettings
from llmos_edge.models import MIB, MemoryEstimate, estimate_memory, read_gguf

CACHE_MODELS = Path.home() / ".cache" / "llmos-edge" / "models"
REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.15


@dataclass
class Case:
    model: Path
    n_ctx: int
    estimate: MemoryEstimate
    rss: int
    tokens_in: int

    @property
    def error(self) -> float:
        return (self.estimate.total - self.rss) / self.rss


def measure(model: Path, n_ctx: int, threads: int = 2) -> Case:
    info = read_gguf(model)
    est = estimate_memory(info, n_ctx)
    engine = Engine(
        EngineSettings(model_path=str(model), n_ctx=n_ctx, n_threads=threads), load_timeout=300, progress_timeout=600
    )
    engine.start()
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            try:
                peak = max(peak, psutil.Process(engine.pid or 0).memory_info().rss)
            except psutil.Error:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # Most of the context: character-level text is about one token per character for these models.
        n_chars = est.n_ctx - 48
        prompt = ("the quick brown fox jumps over the lazy dog " * (n_chars // 40 + 1))[:n_chars]
        stats = engine.generate(prompt, 8, lambda _t: None, lambda: False)
        peak = max(peak, psutil.Process(engine.pid or 0).memory_info().rss)
    finally:
        done.set()
        sampler.join()
        engine.stop()
    return Case(model, n_ctx, est, peak, stats.tokens_in)


def default_models() -> list[Path]:
    return [
        REPO / "model" / "llmos-tiny-q8_0.gguf",
        CACHE_MODELS / "speed-25m-q4_k_m.gguf",
        CACHE_MODELS / "speed-50m-q4_k_m.gguf",
        CACHE_MODELS / "speed-85m-q4_k_m.gguf",
    ]


def table(cases: list[Case]) -> str:
    rows = [
        "| model | params | quant | context | prompt tokens | weights + repack | KV | compute | runtime "
        "| estimate | measured peak RSS | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        e, info = c.estimate, read_gguf(c.model)
        rows.append(
            f"| {c.model.name} | {info.n_params / 1e6:.1f}M | {info.quantization} | {e.n_ctx} | {c.tokens_in} "
            f"| {(e.weights + e.repacked) / MIB:.1f} MiB | {e.kv_cache / MIB:.1f} MiB | {e.compute / MIB:.1f} MiB "
            f"| {e.runtime / MIB:.0f} MiB | {e.total / MIB:.1f} MiB | {c.rss / MIB:.1f} MiB | {c.error * 100:+.1f}% |"
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
    cases = []
    for m in models:
        for ctx in args.context or [512, 2048]:
            c = measure(m, ctx)
            cases.append(c)
            print(
                f"{m.name} ctx {c.estimate.n_ctx}: estimate {c.estimate.total / MIB:.1f} MiB, measured "
                f"{c.rss / MIB:.1f} MiB, error {c.error * 100:+.1f}%",
                flush=True,
            )
    worst = max(cases, key=lambda c: abs(c.error))
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
            "measurement is the engine worker's peak RSS (psutil) while it answers a prompt that nearly fills the "
            "context. Error = (estimate - measured) / measured.\n\n"
            + table(cases)
            + f"\n**Worst error: {abs(worst.error) * 100:.1f}%** (target: within {TOLERANCE:.0%})\n",
        )
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
