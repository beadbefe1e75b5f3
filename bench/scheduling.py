"""Time to first token of an interactive (console) request while a background generation runs, against the
same request on an idle appliance, measured in the same run. The background job is preempted (its llama.cpp state
saved) so the interactive one should not wait for it.

Target: the median time to first token during a background job at most MAX_BUSY_MS (100 ms, about where a reply
stops feeling immediate), over rounds fixed before measuring (idle and busy alternate); exits 1 and prints MISSED
when it is more. The busy/idle ratio is reported, but it is not the target: idle is about 10 ms on the speed model,
and preemption costs a fixed amount (the background job's current token, then saving llama.cpp's state), so the
ratio grows as the idle path gets faster while nothing a person can notice changes (10 ms against 25 ms read as 2.5x).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import begin, busy_machine, load_average
from tests.integration.conftest import Appliance

QUESTION = "hello"
MAX_BUSY_MS = 100.0


def ttft(app: Appliance) -> float:
    """Seconds from Enter to the first byte of the answer, as the person at the console sees it."""
    c = app.console
    c.send(QUESTION + "\r")
    c.read_until(QUESTION.encode() + b"\r\n", 30)  # the echo and the newline before the answer
    t0 = time.perf_counter()
    while not (chunk := c.port.read(4096)):
        pass
    t = time.perf_counter() - t0
    c.buf += chunk
    c.read_until(b"llmos> ", 120)
    return t


def breakdown(app: Appliance) -> tuple[float, float]:
    """The last console request's queue wait (submit to the engine starting it: in a busy round, the preemption of
    the background job) and the worker's own time to first token (prefill and the first token), in ms."""
    con = sqlite3.connect(app.db)
    row = con.execute(
        "SELECT queue_wait_ms, ttft_ms FROM requests WHERE source = 'console' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    con.close()
    return float(row[0]), float(row[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds must be at least 3: the figure is a median")
    report = begin()
    with tempfile.TemporaryDirectory() as tmp:
        app = Appliance(
            Path(tmp),
            model=args.model,
            override=f"model:\n  path: {args.model}\n  threads: 2\n  max_tokens: 32\nengine:\n  load_timeout: 300\n",
        )
        try:
            app.wait_ready(300)
            app.console.read_until(b"llmos> ", 30)
            idle, busy = [], []
            parts: dict[str, list[tuple[float, float]]] = {"idle": [], "busy": []}
            for r in range(args.rounds):
                idle.append(ttft(app))
                parts["idle"].append(breakdown(app))
                bg = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "llmos_edge.cli",
                        "submit",
                        "reverse benchmark",
                        "--max-tokens",
                        "400",
                        "--socket",
                        str(app.socket),
                    ],
                    stdout=subprocess.PIPE,
                )
                assert bg.stdout is not None
                bg.stdout.read(1)  # the background generation is streaming
                busy.append(ttft(app))
                bg.wait(300)
                parts["busy"].append(breakdown(app))
                print(
                    f"round {r + 1}: idle {idle[-1] * 1000:.1f} ms, during background {busy[-1] * 1000:.1f} ms "
                    f"(queue wait {parts['busy'][-1][0]:.1f} ms, worker first token {parts['busy'][-1][1]:.1f} ms); "
                    f"load {load_average()[0]:.2f}",
                    flush=True,
                )
        finally:
            app.close()
    ratio = statistics.median(busy) / statistics.median(idle)
    print(
        f"median idle {statistics.median(idle) * 1000:.1f} ms, "
        f"busy {statistics.median(busy) * 1000:.1f} ms, ratio {ratio:.2f}"
    )
    body = (
        f"Model: `{args.model.name}`, 2 threads; the interactive request is `{QUESTION}` typed on the console (pty); "
        "the background request is `llmos submit` of a 400-token generation, started before each busy round. "
        f"{args.rounds} alternating rounds; time from Enter to the first answer byte.\n\n"
        "| condition | median TTFT ms | rounds (ms) |\n|---|---|---|\n"
        f"| idle | {statistics.median(idle) * 1000:.1f} | {', '.join(f'{x * 1000:.0f}' for x in idle)} |\n"
        f"| background job running | {statistics.median(busy) * 1000:.1f} | "
        f"{', '.join(f'{x * 1000:.0f}' for x in busy)} |\n\n"
        f"**Median during a background job: {statistics.median(busy) * 1000:.1f} ms** (target <= {MAX_BUSY_MS:g} ms); "
        f"ratio busy / idle {ratio:.2f}, reported only. Why a bound and not a ratio: a person notices a first token "
        "later than about 100 ms, not one of 10 ms against 25 ms; preemption costs a fixed amount (the background "
        "job finishes its current token, then llama.cpp's state is saved: the busy queue wait below), so a ratio "
        "to a ~10 ms idle path grows as that path gets faster while nothing a person sees changes.\n\n"
        "Where the time goes (medians, ms, from the requests table): the queue wait is submit to the engine starting "
        "the request, which in a busy round includes preempting the background job (the worker stops at its next "
        "token and saves llama.cpp's state); the worker's first token is the prompt's prefill and one sample; the "
        "rest is the pipe, the console and the pty.\n\n"
        "| condition | queue wait | worker first token | pipe, console, pty |\n|---|---|---|---|\n"
        + "".join(
            f"| {name} | {statistics.median(q for q, _ in rows):.1f} | {statistics.median(t for _, t in rows):.1f} | "
            f"{statistics.median(total * 1000 - q - t for total, (q, t) in zip(times, rows, strict=True)):.1f} |\n"
            for name, rows, times in (("idle", parts["idle"], idle), ("background job running", parts["busy"], busy))
        )
        + busy_machine(report.load_start[0])
    )
    report.verdict(
        "time to first token during a background job",
        f"{statistics.median(busy) * 1000:.1f} ms median (idle {statistics.median(idle) * 1000:.1f} ms, "
        f"ratio {ratio:.2f})",
        f"<= {MAX_BUSY_MS:g} ms",
        statistics.median(busy) * 1000 <= MAX_BUSY_MS,
    )
    report.write_section(
        "scheduling",
        "Time to first token: interactive during a background job vs idle",
        f"make bench-scheduling (python bench/scheduling.py --model {args.model.name} --rounds {args.rounds})",
        body,
    )
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
