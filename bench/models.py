"""The architecture matrix (model/arch_matrix.py's tiny models, each with a real tokenizer and chat template) through
the real engine: load time, decode speed, and the header's memory estimate against the worker's peak RSS.

    python bench/models.py [--models-dir DIR] [--context N ...] [--write]

Each model is loaded once per context size in the engine's worker process (as the supervisor runs it) and given a
prompt, formatted by the model's chat template, that fills most of the context, so llama.cpp touches its whole KV
cache and compute buffer. The peak is the worker's VmHWM (the kernel's high-water mark of its resident memory), read
after the answer. Target: every estimate within 10% of the peak; exits 1 and prints MISSED when the worst is not.
tests/integration/test_architectures.py uses `measure` with the same limit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import begin
from llmos_edge.engine import Engine, EngineSettings, GenerationStats
from llmos_edge.models import MIB, GGUFInfo, MemoryEstimate, estimate_memory, read_gguf

CONTEXTS = (256, 1024)
TOLERANCE = 0.10
ENV = "LLMOS_ARCH_MODELS"  # the directory `make arch-models` writes
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank. "
# The long prompt opens differently from the probes: llama-cpp-python reuses the cached prefix a prompt shares with
# the one before, and then only the new tail goes through the compute buffer (the peak measured 9% low that way).
OPENING = "Every morning a lazy dog sleeps by the river bank, far from the quick fox. "
ANSWER_TOKENS = 32


def models_dir() -> Path:
    """The matrix's directory from $LLMOS_ARCH_MODELS (the Makefile sets it), else the cache's default."""
    return Path(os.environ.get(ENV, Path.home() / ".cache" / "llmos-edge" / "models" / "archs"))


@dataclass
class Run:
    model: Path
    info: GGUFInfo
    estimate: MemoryEstimate
    peak_rss: int
    load_s: float
    probe: GenerationStats  # a one-sentence prompt: how many tokens the template made of it
    stats: GenerationStats  # the prompt that fills the context

    @property
    def error(self) -> float:
        return (self.estimate.total - self.peak_rss) / self.peak_rss


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def _ask(engine: Engine, prompt: str, max_tokens: int) -> GenerationStats:
    return engine.generate(prompt, max_tokens, lambda _t: None, lambda: False)


def measure(model: Path, n_ctx: int, threads: int = 2, info: GGUFInfo | None = None) -> Run:
    """Load `model` at context `n_ctx` in a fresh worker, fill the context, answer, and read the worker's peak.
    `info`: the model's header, if already read (reading a 262k-token vocabulary takes seconds)."""
    info = info or read_gguf(model)
    estimate = estimate_memory(info, n_ctx)
    engine = Engine(EngineSettings(str(model), n_ctx=n_ctx, n_threads=threads), load_timeout=300, progress_timeout=300)
    t0 = time.monotonic()
    engine.start()
    load_s = time.monotonic() - t0
    try:
        # Two short prompts tell how many tokens the template adds and how many one sentence costs in this
        # tokenizer; the real prompt then fills the context but for the answer and a margin.
        probe = _ask(engine, SENTENCE, 1)
        five = _ask(engine, SENTENCE * 5, 1).tokens_in
        per_sentence = max(1.0, (five - probe.tokens_in) / 4)
        room = estimate.n_ctx - ANSWER_TOKENS - 16 - (probe.tokens_in - per_sentence)
        stats = _ask(engine, OPENING + SENTENCE * max(0, int(room / per_sentence) - 1), ANSWER_TOKENS)
        peak = peak_rss(engine.pid or 0)
    finally:
        engine.stop()
    return Run(model, info, estimate, peak, load_s, probe, stats)


def table(runs: list[Run]) -> str:
    rows = [
        "| architecture | model | parameters | quantization | context | prompt tokens | estimate | peak RSS | error "
        "| load time | tok/s (answer tokens) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        rows.append(
            f"| {r.info.architecture} | {r.model.stem} | {r.info.n_params / 1e6:.1f}M | {r.info.quantization} "
            f"| {r.estimate.n_ctx} | {r.stats.tokens_in} | {r.estimate.total / MIB:.1f} MiB "
            f"| {r.peak_rss / MIB:.1f} MiB | {r.error * 100:+.1f}% | {r.load_s:.2f} s "
            f"| {r.stats.decode_tok_s:.0f} ({r.stats.tokens_out}) |"
        )
    return "\n".join(rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=None, help=f"default ${ENV} or the cache's models/archs")
    ap.add_argument("--context", type=int, action="append", help="context (repeatable); default 256 and 1024")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    directory = args.models_dir or models_dir()
    models = sorted(directory.glob("*.gguf"))
    if not models:
        print(f"no models in {directory}; `make arch-models` builds them", file=sys.stderr)
        return 2
    report = begin()
    runs = []
    for m in models:
        info = read_gguf(m)
        for ctx in args.context or CONTEXTS:
            r = measure(m, ctx, args.threads, info)
            runs.append(r)
            print(
                f"{m.stem:<11} ctx {r.estimate.n_ctx:>5}: {r.stats.tokens_in:>4} prompt tokens, estimate "
                f"{r.estimate.total / MIB:6.1f} MiB, peak {r.peak_rss / MIB:6.1f} MiB, error {r.error * 100:+5.1f}%,"
                f" load {r.load_s:.2f} s, {r.stats.decode_tok_s:.0f} tok/s over {r.stats.tokens_out} tokens",
                flush=True,
            )
    worst = max(runs, key=lambda r: abs(r.error))
    beyond = sum(abs(r.error) > TOLERANCE for r in runs)
    report.verdict(
        f"worst memory estimate error ({worst.model.stem} at context {worst.estimate.n_ctx})",
        f"{worst.error * 100:+.1f}% ({worst.estimate.describe()}); {beyond} of {len(runs)} runs beyond the target",
        f"within {TOLERANCE:.0%}",
        abs(worst.error) <= TOLERANCE,
    )
    if args.write:
        report.write_section(
            "models",
            "Architecture matrix: real tokenizers, memory estimate vs peak RSS",
            "make bench-models (python bench/models.py --write)",
            "Random-weight models from `model/arch_matrix.py`, each with the tokenizer and chat template of a "
            "llama.cpp vocab file. Estimate: `llmos_edge.models.estimate_memory` from the header; peak RSS: the "
            "engine worker's VmHWM after a templated prompt that fills most of the context and a "
            f"{ANSWER_TOKENS}-token answer. Error = (estimate - peak) / peak. Load time: worker start to model "
            "loaded (Python, llama.cpp and the model). tok/s: decoding after the long prompt (2 threads), over the "
            "answer's tokens (random weights may say EOS early).\n\n"
            + table(runs)
            + f"\n**Worst error: {abs(worst.error) * 100:.1f}%** (target: within {TOLERANCE:.0%})\n",
        )
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
