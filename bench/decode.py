"""Decode throughput through the full llmos path (console in, scheduler, engine worker, tokens out on a pty)
against raw llama-cpp-python on the same model, threads and CPU variant, measured in the same run, alternating.

The two sides do the same work. The raw side is one long-lived process, like the worker, with the worker's own
environment (read from /proc/PID/environ, so GOMP_SPINCOUNT and the like are the same); it formats the question with
the engine's own prompt code and decodes greedily with the engine's sampling settings. llama-cpp-python reuses the
prompt prefix it still holds from the previous request, and a prompt evaluated in a different split gives slightly
different logits, so the raw side first replays the requests the appliance answered before the first round (the
readiness self-test), and its cache then holds what the worker's holds. Every round asserts that both produced the
same tokens (prompt tokens, answer tokens and answer text), so the ratio of their rates is the cost of the
supervisor, the worker pipe and the console.

Both rates run from the first answer token to the last: on the llmos side from the first to the last answer byte on
the pty, so the request's row written to SQLite and the prompt printed after the answer are not taken for decoding
(that tail is reported apart). The rounds alternate which side goes first, and the worker must run the thread count
asked for (the governor could choose fewer).

The figure is the median of the per-round ratios: each round pairs one raw and one llmos answer taken back to back,
so a drift in the machine (a neighbour's load, the host's clock) moves both sides of a pair alike. The ratio of the
two sides' medians was used before and swung from 0.84 to 1.08 between runs on a quiet machine, because the raw
rate alone moved 187-234 tok/s from run to run and five short rounds could not average that out. The run length
(ROUNDS rounds of TOKENS tokens) was fixed before measuring with it.

Target: the median per-round ratio at least 0.97 (MIN_RATIO), over at least 3 rounds; exits 1 and prints MISSED
when it is less, or when the two sides produced different tokens.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import begin, busy_machine, load_average
from llmos_edge.engine_worker import load_cpu_backend, prompt_text
from tests.integration.conftest import Appliance

PROMPT = "reverse benchmark"
CONTEXT = 512
MIN_RATIO = 0.97
MIN_ROUNDS = 3
ROUNDS = 15  # about 1.5 s a side at 250 tok/s: 45 s of decoding each side per run
TOKENS = 384  # the prompt (18 tokens) and 384 answer tokens fit the 512-token context


@dataclass
class Side:
    """One side's decode in one round: its rate, and what it produced, to check both did the same work."""

    rate: float
    tokens_in: int
    tokens_out: int
    text: str

    def same_work(self, other: Side) -> bool:
        return (self.tokens_in, self.tokens_out, self.text) == (other.tokens_in, other.tokens_out, other.text)

    def describe(self) -> str:
        return f"{self.tokens_in} prompt tokens, {self.tokens_out} answer tokens, {self.text[:40]!r}"


def rate(tokens: int, seconds: float) -> float:
    """Decode rate: the tokens after the first over the time from the first to the last (prefill excluded)."""
    return (tokens - 1) / seconds if tokens > 1 and seconds > 0 else float("nan")


def raw_decode(llm: Any, prompt: str, max_tokens: int) -> Side:
    """One request on raw llama-cpp-python, as the engine worker drives it (in the child process of `RawSide`)."""
    import llama_cpp

    text, add_bos = prompt_text(llm, prompt)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=not add_bos)
    budget = min(max_tokens, CONTEXT - len(tokens))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    vocab = llm._model.vocab
    parts: list[str] = []
    t_first = t_last = 0.0
    for tok in llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            break
        parts.append(decoder.decode(llm.detokenize([tok])))
        t_last = time.perf_counter()
        if len(parts) == 1:
            t_first = t_last
        if len(parts) >= budget:
            break
    parts.append(decoder.decode(b"", final=True))
    n = len(parts) - 1
    return Side(rate(n, t_last - t_first), len(tokens), n, "".join(parts))


def process_environment(pid: int) -> dict[str, str]:
    """A running process's environment, as the kernel holds it."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (e.decode("utf-8", "surrogateescape").split("=", 1) for e in entries if b"=" in e)
    return {k: v for k, v in pairs}


def raw_serve(model: Path, threads: int, variant: str) -> None:
    """The raw side's process: load the model once, then answer one request per JSON line on stdin."""
    from llama_cpp import Llama

    load_cpu_backend(only=variant)
    llm = Llama(model_path=str(model), n_ctx=CONTEXT, n_threads=threads, n_threads_batch=threads, verbose=False)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(vars(raw_decode(llm, request["prompt"], request["max_tokens"]))), flush=True)


class RawSide:
    """Raw llama-cpp-python in a process of its own with environment `env` (the worker's), as the worker runs."""

    def __init__(self, model: Path, threads: int, variant: str, env: dict[str, str]) -> None:
        cmd = [sys.executable, __file__, "--model", str(model), "--threads", str(threads), "--raw-side", variant]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, prompt: str, max_tokens: int) -> Side:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"prompt": prompt, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the raw llama-cpp-python process ended ({self.proc.wait(10)}); see its output above")
        return Side(**json.loads(line))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # its loop ends at the end of its input
        self.proc.wait(60)


def full_rate(app: Appliance) -> tuple[Side, float]:
    """One request through the console, and the time from its last answer byte to the prompt (s).

    The rate is the raw side's: from the first answer byte to the last. What follows the last token (the request's
    row written to SQLite, then the newline and the prompt) is not decoding; it is returned apart, as the tail."""
    c = app.console
    c.send(PROMPT + "\r")
    c.read_until(PROMPT.encode() + b"\r\n", 30)  # the echoed line
    arrivals: list[tuple[float, int]] = []  # (arrival time, bytes received by then)
    received = bytearray(c.buf)
    c.buf.clear()
    if received:  # the first answer bytes came with the echo: they arrived by now (the conservative side)
        arrivals.append((time.perf_counter(), len(received)))
    while b"llmos> " not in received:
        if chunk := c.port.read(4096):
            received += chunk
            arrivals.append((time.perf_counter(), len(received)))
    t_first = arrivals[0][0]
    answer_end = received.rindex(b"\r\nllmos> ")  # the console ends an answer with a newline, then the prompt
    t_last = next(t for t, n in arrivals if n >= answer_end)
    t_prompt = arrivals[-1][0]
    con = sqlite3.connect(app.db)
    tokens_in, n, text = con.execute(
        "SELECT tokens_in, tokens_out, answer FROM requests ORDER BY id DESC LIMIT 1"
    ).fetchone()
    con.close()
    return Side(rate(n, t_last - t_first), tokens_in, n, text), t_prompt - t_last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=TOKENS)
    ap.add_argument("--rounds", type=int, default=ROUNDS, help=f"alternating rounds, at least {MIN_ROUNDS}")
    ap.add_argument("--raw-side", metavar="VARIANT", help=argparse.SUPPRESS)  # the child process of RawSide
    args = ap.parse_args()
    if args.raw_side:
        raw_serve(args.model, args.threads, args.raw_side)
        return 0
    if args.rounds < MIN_ROUNDS:
        ap.error(f"--rounds must be at least {MIN_ROUNDS}: the figure is a median")
    report = begin()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        app = Appliance(
            run,
            model=args.model,
            override=f"model:\n  path: {args.model}\n  threads: {args.threads}\n  context: {CONTEXT}\n"
            f"  max_tokens: {args.tokens}\n  temperature: 0.0\nengine:\n  load_timeout: 300\n",
        )
        raw_side: RawSide | None = None
        try:
            app.wait_ready(300)
            app.console.read_until(b"llmos> ", 30)
            engine_line = app.console.status()["engine"]  # pid P, ctx N, T threads, cpu V
            variant = engine_line.rsplit("cpu ", 1)[1]
            threads = int(engine_line.split(" threads")[0].rsplit(" ", 1)[1])
            if threads != args.threads:  # the governor chose fewer: the sides would not do the same work
                raise SystemExit(f"the engine runs {threads} threads, not {args.threads}: {engine_line}")
            env = process_environment(app.engine_pid())
            raw_side = RawSide(args.model, args.threads, variant, env)
            con = sqlite3.connect(app.db)
            history = list(con.execute("SELECT prompt, tokens_out FROM requests ORDER BY id"))
            con.close()
            for prompt, tokens_out in history:  # what the worker answered before: its cache holds the last one
                raw_side.ask(prompt, tokens_out)
            raw: list[Side] = []
            full: list[Side] = []
            tails: list[float] = []
            loads: list[float] = []
            for r in range(args.rounds):
                # Alternate which side goes first, so a drift in the machine's load favours neither.
                if r % 2 == 0:
                    raw.append(raw_side.ask(PROMPT, args.tokens))
                full_side, tail = full_rate(app)
                full.append(full_side)
                tails.append(tail)
                if r % 2 == 1:
                    raw.append(raw_side.ask(PROMPT, args.tokens))
                loads.append(load_average()[0])
                print(
                    f"round {r + 1}: raw {raw[-1].rate:.1f} tok/s ({raw[-1].tokens_out} tokens), "
                    f"llmos {full[-1].rate:.1f} tok/s ({full[-1].tokens_out} tokens), "
                    f"last answer byte to prompt {tail * 1000:.1f} ms, load {loads[-1]:.2f}",
                    flush=True,
                )
                if not full[-1].same_work(raw[-1]):
                    report.verdict(
                        f"decode: both sides produce the same tokens (round {r + 1})",
                        f"raw {raw[-1].describe()}; llmos {full[-1].describe()}",
                        "identical",
                        False,
                    )
                    return report.exit_code()  # the rates would compare different work: nothing to write
            governor = app.console.status().get("thermal", "unknown")  # throttling would slow the llmos side only
        finally:
            if raw_side is not None:
                raw_side.close()
            app.close()
    raw_median, full_median = statistics.median(s.rate for s in raw), statistics.median(s.rate for s in full)
    ratios = [f.rate / r.rate for f, r in zip(full, raw, strict=True)]
    ratio = statistics.median(ratios)
    quartiles = statistics.quantiles(ratios, n=4)
    print(
        f"median raw {raw_median:.1f} tok/s, llmos {full_median:.1f} tok/s, "
        f"median per-round ratio {ratio:.3f} (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})"
    )
    report.verdict(
        f"decode: both sides produce the same tokens ({args.rounds} rounds)",
        f"{raw[0].tokens_in} prompt tokens, {raw[0].tokens_out} answer tokens, the same text",
        "identical",
        True,
    )
    report.verdict(
        "decode throughput llmos / raw llama-cpp-python",
        f"{ratio:.3f} (median of {args.rounds} per-round ratios, quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}; "
        f"median rates {full_median:.1f} / {raw_median:.1f} tok/s)",
        f">= {MIN_RATIO:g}",
        ratio >= MIN_RATIO,
    )
    from llmos_edge.models import read_gguf

    info = read_gguf(args.model)
    spin = env.get("GOMP_SPINCOUNT", "unset")
    body = (
        f"Model: `{args.model.name}` ({info.n_params / 1e6:.1f}M parameters, {info.quantization}, random weights), "
        f"{args.threads} threads, CPU variant {variant}, context {CONTEXT}, greedy, up to {args.tokens} tokens, "
        f"{args.rounds} alternating rounds (raw first in odd rounds, llmos first in even ones). "
        f"Both sides: the prompt `{PROMPT}` as the engine formats it "
        f"({raw[0].tokens_in} tokens), the worker's environment (GOMP_SPINCOUNT {spin}), and the same "
        f"{raw[0].tokens_out} answer tokens, checked every round.\n\n"
        "| path | median decode tok/s | rounds |\n|---|---|---|\n"
        f"| raw llama-cpp-python | {raw_median:.1f} | {', '.join(f'{s.rate:.0f}' for s in raw)} |\n"
        f"| llmos console -> scheduler -> worker -> pty | {full_median:.1f} | "
        f"{', '.join(f'{s.rate:.0f}' for s in full)} |\n\n"
        f"**Ratio llmos / raw, the median of the per-round ratios: {ratio:.3f}** (quartiles {quartiles[0]:.3f} to "
        f"{quartiles[2]:.3f}; target >= {MIN_RATIO:g}). Each round pairs a raw and an llmos answer back to back, so "
        "a drift in the machine moves both sides of a pair alike.\n\n"
        "Both rates run from the first answer token to the last (on the llmos side, first to last answer byte on the "
        "pty). After the last token the llmos side also writes the request's row to SQLite and prints the prompt: "
        f"median {statistics.median(tails) * 1000:.1f} ms from the last answer byte to the prompt, not counted as "
        "decoding. Per round: ratio "
        + ", ".join(f"{f.rate / r.rate:.3f}" for f, r in zip(full, raw, strict=True))
        + "; 1-minute load average "
        + ", ".join(f"{x:.2f}" for x in loads)
        + f". The governor at the end: thermal: {governor}.\n"
        + busy_machine(report.load_start[0])
    )
    report.write_section(
        "decode",
        "Decode throughput: full path vs raw llama-cpp-python",
        f"make bench-decode (python bench/decode.py --model {args.model.name} --threads {args.threads} "
        f"--tokens {args.tokens} --rounds {args.rounds})",
        body,
    )
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
