"""Decode throughput through the full llmos path (console in, scheduler, engine worker, tokens out on a pty)
against raw llama-cpp-python on the same model, threads and prompt, measured in the same run, alternating.

Both decode greedily from the same prompt, so both produce the same tokens; the ratio of their rates is the
cost of the supervisor, the worker pipe and the console.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_section
from llmos_edge.engine import load_cpu_backend
from tests.integration.conftest import Appliance

PROMPT = "reverse benchmark"


_loaded_variant = ""


def raw_rate(model: Path, threads: int, ctx: int, max_tokens: int, variant: str) -> tuple[float, int]:
    global _loaded_variant
    from llama_cpp import Llama

    if not _loaded_variant:
        _loaded_variant = load_cpu_backend(only=variant)
    llm = Llama(model_path=str(model), n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = llm.tokenize((PROMPT + "\n").encode(), add_bos=True)
    t_first = t_last = 0.0
    n = 0
    for tok in llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
        if tok == llm.token_eos():
            break
        llm.detokenize([tok])
        t_last = time.perf_counter()
        if n == 0:
            t_first = t_last
        n += 1
        if n >= max_tokens:
            break
    del llm
    return (n - 1) / (t_last - t_first), n


def full_rate(app: Appliance) -> tuple[float, int]:
    c = app.console
    c.send(PROMPT + "\r")
    c.read_until(b"\r\n", 30)  # the echoed line
    first = b""
    while not first:
        first = c.port.read(4096)
    t_first = time.perf_counter()
    c.buf += first
    c.read_until(b"llmos> ", 120)
    t_end = time.perf_counter()
    n = sqlite3.connect(app.db).execute("SELECT tokens_out FROM requests ORDER BY id DESC LIMIT 1").fetchone()[0]
    return (n - 1) / (t_end - t_first), n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    ctx = 512
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        app = Appliance(
            run,
            model=args.model,
            override=f"model:\n  path: {args.model}\n  threads: {args.threads}\n  context: {ctx}\n"
            f"  max_tokens: {args.tokens}\nengine:\n  load_timeout: 300\n",
        )
        app.wait_ready(300)
        app.console.read_until(b"llmos> ", 30)
        variant = app.console.status()["engine"].rsplit("cpu ", 1)[1]
        raw, full = [], []
        for r in range(args.rounds):
            rr, n_raw = raw_rate(args.model, args.threads, ctx, args.tokens, variant)
            fr, n_full = full_rate(app)
            raw.append(rr)
            full.append(fr)
            print(f"round {r + 1}: raw {rr:.1f} tok/s ({n_raw} tokens), llmos {fr:.1f} tok/s ({n_full} tokens)")
        app.close()
    ratio = statistics.median(full) / statistics.median(raw)
    print(
        f"median raw {statistics.median(raw):.1f} tok/s, llmos {statistics.median(full):.1f} tok/s, ratio {ratio:.3f}"
    )
    from llmos_edge.models import read_gguf

    info = read_gguf(args.model)
    body = (
        f"Model: `{args.model.name}` ({info.n_params / 1e6:.1f}M parameters, {info.quantization}, random weights), "
        f"{args.threads} threads, CPU variant {variant}, context {ctx}, greedy, {args.tokens} tokens, "
        f"{args.rounds} alternating rounds.\n\n"
        "| path | median decode tok/s | rounds |\n|---|---|---|\n"
        f"| raw llama-cpp-python | {statistics.median(raw):.1f} | {', '.join(f'{x:.0f}' for x in raw)} |\n"
        f"| llmos console -> scheduler -> worker -> pty | {statistics.median(full):.1f} | "
        f"{', '.join(f'{x:.0f}' for x in full)} |\n\n"
        f"**Ratio llmos / raw: {ratio:.3f}** (targets: >= 0.95 for the full path, >= 0.97 through the scheduler; "
        "this path includes the scheduler)\n"
    )
    write_section(
        "decode",
        "Decode throughput: full path vs raw llama-cpp-python",
        f"make bench-decode (python bench/decode.py --model {args.model.name} --threads {args.threads})",
        body,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
