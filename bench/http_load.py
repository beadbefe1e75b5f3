"""The HTTP front-end under load (issue 13, items 5 and 7): 64 concurrent streaming clients for 60 s against the real
supervisor with the default model, and what the front-end adds to the supervisor's memory.

    python bench/http_load.py [--write]

The supervisor is a subprocess (as systemd runs it) with `http.enabled`, `scheduler.queue_size` QUEUE_SIZE; the
clients run in this process (a separate one, as a device's clients are): asyncio streams and a minimal HTTP/1.1
client that reads the SSE stream and its chunked framing byte by byte, so that nothing a client library tolerates
goes unseen. Each client loops: POST a streaming chat completion (temperature 0, stream_options.include_usage), read
it to `data: [DONE]`, repeat; on a 503 it waits the Retry-After it was given, as a well-behaved client does.
CLIENTS_INTERACTIVE of them ask at interactive priority, the rest at background. The questions are held-out prompts
of the default model's two tasks.

A stream is correct when: it is 200 with Content-Type text/event-stream; its body is valid UTF-8; every event is one
`data: ` line; every event before the last parses as a JSON chat.completion.chunk of the request's id (or the usage
chunk), none is an error; the last is `data: [DONE]`; and its concatenated content equals, exactly, what the same
question returned non-streamed (asked one at a time before the load). Decoding is greedy, so the answer is fixed:
equality catches a lost, repeated or reordered piece, or a preempted background request resumed wrongly, which
"non-empty and valid UTF-8" would not.

The queue bound: /metrics is scraped every METRICS_EVERY_S during the run; llmos_queue_depth (summed over the
classes) must never exceed QUEUE_SIZE, every refusal must be a 503 with Retry-After saying the queue is full, and no
other 5xx (nor a transport error) may appear. Time to first token of interactive requests is reported at p50/p99 as
the clients measured it (request sent to first content chunk received) and from the server's own histogram.

Memory (item 7): the supervisor's own process (not the engine worker), /proc/PID/status. Idle: VmRSS 2 s after
READY, with http.enabled false and true, IDLE_ROUNDS alternating starts each, medians. Peak: VmHWM of the HTTP-on
supervisor at the end of the load, against VmHWM of the HTTP-off one idle; this charges to the front-end everything
the supervisor grows by under load (the scheduler's and the store's work too), so it is an upper bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import Report, begin
from tests.integration.conftest import HELDOUT, MODEL, Appliance

# Fixed before any result was seen.
CLIENTS = 64
CLIENTS_INTERACTIVE = 48  # the rest (16) ask at background priority
DURATION_S = 60.0  # clients start new requests for this long; those in flight then are read to the end
DRAIN_S = 180.0  # longest wait for the requests in flight at the end (a background one may wait for the queue)
QUEUE_SIZE = 16  # scheduler.queue_size (the default)
MAX_TOKENS = 64
QUESTIONS = 16  # held-out prompts, alternating the two tasks
METRICS_EVERY_S = 0.2
IDLE_ROUNDS = 3
SETTLE_S = 2.0
RSS_BUDGET_MIB = 15.0
TOKEN = "bench-token-0123456789"
MIB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time (user + system) of the supervisor, of its engine worker, and of this process (the clients)."""
    sup = psutil.Process(pid)
    engine = sum(sum(c.cpu_times()[:2]) for c in sup.children() if "llmos_edge.engine" in " ".join(c.cmdline()))
    return {"supervisor": sum(sup.cpu_times()[:2]), "engine": engine, "clients": sum(psutil.Process().cpu_times()[:2])}


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def questions() -> list[str]:
    by_task: dict[str, list[str]] = {}
    for row in map(json.loads, HELDOUT.read_text().splitlines()):
        by_task.setdefault(row["task"], []).append(row["prompt"])
    tasks = sorted(by_task)
    return [by_task[tasks[i % len(tasks)]][i // len(tasks)] for i in range(QUESTIONS)]


def http_config(port: int, enabled: bool) -> str:
    return (
        f"http:\n  enabled: {'true' if enabled else 'false'}\n  listen: 127.0.0.1:{port}\n  token: {TOKEN}\n"
        f"model:\n  path: {MODEL}\n  threads: 2\n  max_tokens: {MAX_TOKENS}\n"
        f"scheduler:\n  queue_size: {QUEUE_SIZE}\n"
    )


def start(tmp: Path, enabled: bool) -> tuple[Appliance, int]:
    port = free_port()
    app = Appliance(tmp, override=http_config(port, enabled))
    app.wait_ready(120)
    threading.Thread(target=drain, args=(app.master,), daemon=True).start()
    return app, port


def drain(fd: int) -> None:
    """Read the console (a pty) so that the supervisor never blocks writing to a full one."""
    while True:
        try:
            select.select([fd], [], [], 1.0)
            os.read(fd, 65536)
        except BlockingIOError:
            continue
        except OSError:
            return


def body(question: str, priority: str, stream: bool) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": "llmos-tiny",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "priority": priority,
        "stream": stream,
    }
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


@dataclass
class Stream:
    """One request as a client saw it."""

    priority: str
    question: str
    status: int = 0
    outcome: str = ""  # ok, garbled, mismatch, refused, error-5xx, http-other, transport
    detail: str = ""
    ttft_s: float = 0.0
    tokens: int = 0
    retry_after: float = 0.0
    sent: float = 0.0  # monotonic time the request was sent


@dataclass
class Run:
    streams: list[Stream] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds over the load, by process
    sequential: tuple[int, float] = (0, 0.0)  # tokens and seconds of the reference answers, one at a time


def check_stream(raw: bytes, want: str) -> tuple[str, str, int]:
    """(outcome, detail, completion tokens) of a whole 200 SSE body."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return "garbled", f"not UTF-8: {e}", 0
    if not text.endswith("\n\n"):
        return "garbled", "the body does not end with a blank line", 0
    events = text[:-2].split("\n\n")
    if events[-1] != "data: [DONE]":
        return "garbled", f"the last event is {events[-1][:80]!r}, not data: [DONE]", 0
    ids, pieces, tokens, finish = set(), [], 0, None
    for ev in events[:-1]:
        if not ev.startswith("data: ") or "\n" in ev:
            return "garbled", f"not one data line: {ev[:80]!r}", 0
        try:
            obj = json.loads(ev[6:])
        except ValueError:
            return "garbled", f"not JSON: {ev[:80]!r}", 0
        if "error" in obj:
            return "error-in-stream", json.dumps(obj["error"])[:200], 0
        if obj.get("object") != "chat.completion.chunk":
            return "garbled", f"object {obj.get('object')!r}", 0
        ids.add(obj.get("id"))
        if obj.get("usage"):
            tokens = int(obj["usage"]["completion_tokens"])
        for choice in obj.get("choices", []):
            pieces.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
    if len(ids) != 1:
        return "garbled", f"chunks of {len(ids)} ids", 0
    if finish is None:
        return "garbled", "no finish_reason", 0
    got = "".join(pieces)
    if got != want:
        return "mismatch", f"{got[:60]!r} != {want[:60]!r}", tokens
    return "ok", "", tokens


class Http:
    """A minimal HTTP/1.1 client on asyncio streams, a connection per request: it sees every byte the server sends
    (the chunked framing too), where a client library would hide or tolerate a fault."""

    def __init__(self, port: int) -> None:
        self.port = port

    @contextlib.asynccontextmanager
    async def request(self, method: str, path: str, payload: Any = None) -> AsyncIterator[Response]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            data = b"" if payload is None else json.dumps(payload).encode()
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + data)
            await writer.drain()
            yield await Response.read(reader)
        finally:
            writer.close()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader

    @classmethod
    async def read(cls, reader: asyncio.StreamReader) -> Response:
        line = await reader.readline()
        parts = line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise Garbled(f"status line {line[:80]!r}")
        headers = {}
        while (h := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        return cls(int(parts[1]), headers, reader)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: chunked transfer coding decoded strictly, else Content-Length bytes."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await self.reader.readline()
                try:
                    size = int(size_line.strip(), 16)
                except ValueError:
                    raise Garbled(f"chunk size line {size_line[:40]!r}") from None
                data = await self.reader.readexactly(size + 2)
                if data[-2:] != b"\r\n":
                    raise Garbled("a chunk not ended by CRLF")
                if size == 0:
                    return
                yield data[:-2]
        else:
            yield await self.reader.readexactly(int(self.headers.get("content-length", "0")))

    async def body(self) -> bytes:
        return b"".join([c async for c in self.chunks()])


class Garbled(Exception):
    """The HTTP framing itself is broken."""


def first_text(raw: bytes) -> bool:
    """Whether the complete events in `raw` include one that carries text (the first is the role chunk)."""
    for ev in raw.split(b"\n\n")[:-1]:
        if ev.startswith(b"data: {"):
            with contextlib.suppress(ValueError, KeyError, IndexError):
                if json.loads(ev[6:])["choices"][0]["delta"].get("content"):
                    return True
    return False


async def one_request(http: Http, s: Stream, want: str) -> None:
    t0 = s.sent = time.monotonic()
    try:
        async with http.request("POST", "/v1/chat/completions", body(s.question, s.priority, True)) as r:
            s.status = r.status
            if r.status != 200:
                text = (await r.body()).decode(errors="replace")
                s.retry_after = float(r.headers.get("retry-after", "0") or 0)
                full = f"queue is full ({QUEUE_SIZE} requests)" in text  # the scheduler's words at its bound
                if r.status == 503 and r.headers.get("retry-after") and full:
                    s.outcome = "refused"
                elif r.status == 503:
                    s.outcome = "503-other"
                else:
                    s.outcome = "error-5xx" if r.status >= 500 else "http-other"
                s.detail = text[:200]
                return
            if not r.headers.get("content-type", "").startswith("text/event-stream"):
                s.outcome, s.detail = "garbled", f"Content-Type {r.headers.get('content-type')}"
                return
            raw = b""
            async for chunk in r.chunks():
                raw += chunk
                if not s.ttft_s and first_text(raw):
                    s.ttft_s = time.monotonic() - t0
        s.outcome, s.detail, s.tokens = check_stream(raw, want)
    except Garbled as e:
        s.outcome, s.detail = "garbled", str(e)
    except (OSError, asyncio.IncompleteReadError) as e:
        s.outcome, s.detail = "transport", f"{type(e).__name__}: {e}"


async def client(http: Http, i: int, qs: list[str], answers: dict[str, str], run: Run, end: float) -> None:
    priority = "interactive" if i < CLIENTS_INTERACTIVE else "background"
    n = 0
    while time.monotonic() < end:
        q = qs[(i + n) % len(qs)]
        n += 1
        s = Stream(priority, q)
        run.streams.append(s)
        await one_request(http, s, answers[q])
        if s.outcome in ("refused", "503-other"):
            await asyncio.sleep(s.retry_after)


def metric_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


async def scrape(http: Http) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with http.request("GET", "/metrics") as r:
        text = (await r.body()).decode()
    if r.status != 200:
        raise RuntimeError(f"/metrics answered {r.status}")
    return metric_samples(text)


async def watch(http: Http, pid: int, run: Run, stop: asyncio.Event) -> None:
    while not stop.is_set():
        m = await scrape(http)
        run.depths.append(int(sum(v for _labels, v in m["llmos_queue_depth"])))
        run.rss.append(proc_status(pid)["VmRSS"])
        try:
            await asyncio.wait_for(stop.wait(), METRICS_EVERY_S)
        except TimeoutError:
            pass


def ttft_buckets(m: dict[str, list[tuple[dict[str, str], float]]], priority: str) -> list[tuple[float, float]]:
    return sorted(
        (float(lab["le"]), v)
        for lab, v in m.get("llmos_time_to_first_token_seconds_bucket", [])
        if lab.get("priority") == priority
    )


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile: linear interpolation within the bucket holding the quantile."""
    total = buckets[-1][1]
    if total == 0:
        return math.nan
    rank, lo_bound, lo_count = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lo_bound
            return lo_bound + (bound - lo_bound) * (rank - lo_count) / max(count - lo_count, 1e-12)
        lo_bound, lo_count = bound, count
    return lo_bound


def histogram_bucket(q: float, buckets: list[tuple[float, float]]) -> str:
    """The bucket the quantile falls in, `(lo, hi] s`: all a histogram knows for sure."""
    rank, lo = q * buckets[-1][1], 0.0
    for bound, count in buckets:
        if count >= rank:
            return f"({lo:g}, {bound:g}] s"
        lo = bound
    return f"({lo:g}, inf] s"


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return math.nan
    return xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)]


async def load(port: int, pid: int, qs: list[str], duration: float) -> tuple[Run, dict[str, str], Any, Any, float]:
    http = Http(port)
    answers = {}
    ref_tokens, ref0 = 0, time.monotonic()
    for q in qs:  # the reference answers, one at a time, before the load
        async with http.request("POST", "/v1/chat/completions", body(q, "interactive", False)) as r:
            reply = await r.body()
        if r.status != 200:
            raise RuntimeError(f"the reference answer to {q!r} failed: {r.status} {reply[:200]!r}")
        answers[q] = json.loads(reply)["choices"][0]["message"]["content"]
        ref_tokens += json.loads(reply)["usage"]["completion_tokens"]
    ref_s = time.monotonic() - ref0
    before = await scrape(http)
    run = Run(sequential=(ref_tokens, ref_s))
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch(http, pid, run, stop))
    cpu0 = cpu_seconds(pid)
    t0 = time.monotonic()
    end = t0 + duration
    tasks = [asyncio.create_task(client(http, i, qs, answers, run, end)) for i in range(CLIENTS)]
    await asyncio.wait_for(asyncio.gather(*tasks), duration + DRAIN_S)
    took = time.monotonic() - t0
    run.cpu_s = {k: v - cpu0[k] for k, v in cpu_seconds(pid).items()}
    stop.set()
    await watcher
    after = await scrape(http)
    return run, answers, before, after, took


def idle_rss(tmp: Path, enabled: bool, k: int) -> dict[str, int]:
    app, _port = start(tmp / f"{'on' if enabled else 'off'}{k}", enabled)
    try:
        time.sleep(SETTLE_S)
        return proc_status(app.proc.pid)
    finally:
        app.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    ap.add_argument("--smoke", action="store_true", help="a 5 s run and one idle round, to try the bench (no --write)")
    args = ap.parse_args()
    if args.smoke and args.write:
        ap.error("--smoke runs are too short to write into BENCHMARKS.md")
    duration, idle_rounds = (5.0, 1) if args.smoke else (DURATION_S, IDLE_ROUNDS)
    if not MODEL.exists():
        sys.exit(f"{MODEL} is missing; `make model` builds it")
    report = begin()
    qs = questions()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        off: list[dict[str, int]] = []
        on: list[dict[str, int]] = []
        for k in range(idle_rounds):
            off.append(idle_rss(tmp, False, k))
            on.append(idle_rss(tmp, True, k))
            print(
                f"idle round {k + 1}: supervisor VmRSS off {off[-1]['VmRSS'] / MIB:.1f} MiB, "
                f"on {on[-1]['VmRSS'] / MIB:.1f} MiB",
                flush=True,
            )
        app, port = start(tmp / "load", True)
        try:
            time.sleep(SETTLE_S)
            load_idle = proc_status(app.proc.pid)
            run, answers, before, after, took = asyncio.run(load(port, app.proc.pid, qs, duration))
            peak = proc_status(app.proc.pid)
            engine_restarts = after["llmos_engine_restarts"][0][1]
        finally:
            app.close()
    return summarise(args, report, qs, answers, run, before, after, took, off, on, load_idle, peak, engine_restarts)


def summarise(
    args: argparse.Namespace,
    report: Report,
    qs: list[str],
    answers: dict[str, str],
    run: Run,
    before: Any,
    after: Any,
    took: float,
    off: list[dict[str, int]],
    on: list[dict[str, int]],
    load_idle: dict[str, int],
    peak: dict[str, int],
    engine_restarts: float,
) -> int:
    streams = run.streams
    by = Counter((s.priority, s.outcome) for s in streams)
    outcomes = sorted({s.outcome for s in streams})
    ok = [s for s in streams if s.outcome == "ok"]
    bad = [s for s in streams if s.status == 200 and s.outcome != "ok"]
    other_5xx = [s for s in streams if s.status >= 500 and s.outcome != "refused"]
    transport = [s for s in streams if s.outcome == "transport"]
    unexpected = [s for s in streams if s.outcome not in ("ok", "refused")]
    inter = [s.ttft_s for s in ok if s.priority == "interactive"]
    tokens = sum(s.tokens for s in ok)
    for s in unexpected[:5]:
        print(f"  {s.priority} {s.status} {s.outcome}: {s.detail}", flush=True)

    def diff(priority: str) -> list[tuple[float, float]]:
        b = dict(ttft_buckets(before, priority))
        return [(le, v - b.get(le, 0.0)) for le, v in ttft_buckets(after, priority)]

    server = diff("interactive")
    s50, s99 = histogram_quantile(0.5, server), histogram_quantile(0.99, server)
    c50, c99 = quantile(inter, 0.5), quantile(inter, 0.99)
    max_depth = max(run.depths)
    print(
        f"{len(streams)} requests in {took:.1f} s: "
        + ", ".join(f"{o} {sum(1 for s in streams if s.outcome == o)}" for o in outcomes),
        flush=True,
    )
    print(
        f"interactive TTFT client p50 {c50 * 1000:.0f} ms p99 {c99 * 1000:.0f} ms; "
        f"server histogram p50 {s50 * 1000:.0f} ms p99 {s99 * 1000:.0f} ms; {tokens / took:.1f} tok/s; "
        f"queue depth max {max_depth} of {len(run.depths)} samples",
        flush=True,
    )

    med = {k: statistics.median(r[k] for r in off) for k in ("VmRSS", "VmHWM")}
    med_on = {k: statistics.median(r[k] for r in on) for k in ("VmRSS", "VmHWM")}
    idle_added = (med_on["VmRSS"] - med["VmRSS"]) / MIB
    peak_added = (peak["VmHWM"] - med["VmHWM"]) / MIB
    print(
        f"supervisor RSS idle off {med['VmRSS'] / MIB:.1f} MiB, on {med_on['VmRSS'] / MIB:.1f} MiB "
        f"(+{idle_added:.1f}); VmHWM off idle {med['VmHWM'] / MIB:.1f} MiB, on at the end of the load "
        f"{peak['VmHWM'] / MIB:.1f} MiB (+{peak_added:.1f})",
        flush=True,
    )

    report.verdict(
        "streams that got 200: well-formed SSE, [DONE], the non-streamed answer exactly",
        f"{len(ok)} of {len(ok) + len(bad)} ({len(bad)} not)",
        "all, and at least one per class",
        not bad and by[("interactive", "ok")] > 0 and by[("background", "ok")] > 0,
    )
    report.verdict(
        "lost requests (transport errors) and 5xx other than the queue-full 503",
        f"{len(transport)} lost, {len(other_5xx)} other 5xx",
        "0 and 0",
        not transport and not other_5xx,
    )
    report.verdict(
        "queue depth in /metrics during the run; refusals",
        f"max {max_depth} in {len(run.depths)} samples; {sum(s.outcome == 'refused' for s in streams)} "
        "503s with Retry-After, queue full",
        f"at most {QUEUE_SIZE} (scheduler.queue_size), and the bound reached (some 503s)",
        max_depth <= QUEUE_SIZE and any(s.outcome == "refused" for s in streams),
    )
    report.verdict("engine restarts during the run", f"{engine_restarts:.0f}", "0", engine_restarts == 0)
    report.verdict(
        "supervisor RSS added by the HTTP front-end, idle after READY (medians)",
        f"+{idle_added:.1f} MiB",
        f"at most {RSS_BUDGET_MIB:g} MiB",
        idle_added <= RSS_BUDGET_MIB,
    )
    report.verdict(
        "supervisor peak RSS (VmHWM) under the load, above the HTTP-off supervisor's idle VmHWM",
        f"+{peak_added:.1f} MiB",
        f"at most {RSS_BUDGET_MIB:g} MiB",
        peak_added <= RSS_BUDGET_MIB,
    )

    rows = ["| priority | outcome | requests |", "|---|---|---|"]
    rows += [f"| {p} | {o} | {n} |" for (p, o), n in sorted(by.items())]
    mem_rows = [
        "| supervisor process | HTTP off | HTTP on | added |",
        "|---|---|---|---|",
        f"| VmRSS 2 s after READY (median of {IDLE_ROUNDS}) | {med['VmRSS'] / MIB:.1f} MiB | "
        f"{med_on['VmRSS'] / MIB:.1f} MiB | {idle_added:+.1f} MiB |",
        f"| VmHWM idle / at the end of the load | {med['VmHWM'] / MIB:.1f} MiB | {peak['VmHWM'] / MIB:.1f} MiB | "
        f"{peak_added:+.1f} MiB |",
        f"| VmRSS during the load (max of the samples) | | {max(run.rss) / MIB:.1f} MiB | |",
    ]
    text = (
        f"The real supervisor (`{MODEL.name}`, 2 threads, `scheduler.queue_size: {QUEUE_SIZE}`, max_tokens "
        f"{MAX_TOKENS}) with `http.enabled`; {CLIENTS} asyncio clients (raw HTTP/1.1 on sockets) in the bench process, "
        f"{CLIENTS_INTERACTIVE} interactive and {CLIENTS - CLIENTS_INTERACTIVE} background, each looping a "
        f"streaming chat completion (temperature 0) of one of {len(qs)} held-out questions for {DURATION_S:g} s "
        f"(then the ones in flight read to the end: {took:.1f} s in all); a 503 waits its Retry-After. A stream "
        "counts as ok when it is well-formed SSE whose every chunk is JSON, ends with `data: [DONE]`, and whose text "
        "equals the same question's non-streamed answer (greedy decoding makes it fixed). Background requests wait "
        "behind interactive ones until they have waited `scheduler.aging` (30 s), hence their few answers.\n\n"
        + "\n".join(rows)
        + "\n\n"
        f"- Throughput: {tokens} tokens in the ok streams, **{tokens / took:.1f} tok/s** overall\n"
        f"- CPU time over the {took:.0f} s (2 CPUs, shared with other work: see the load average): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in run.cpu_s.items())
        + "\n"
        f"- For scale, the {len(qs)} reference answers one at a time just before: {run.sequential[0]} tokens in "
        f"{run.sequential[1]:.1f} s, {run.sequential[0] / run.sequential[1]:.1f} tok/s end to end\n"
        f"- Time to first token, interactive, client-measured (request sent to first text chunk, {len(inter)} "
        f"streams): **p50 {c50 * 1000:.0f} ms, p99 {c99 * 1000:.0f} ms**\n"
        f"- The server's histogram (`llmos_time_to_first_token_seconds`, arrival to first token, interpolated "
        f"within buckets, so no finer than its buckets): p50 {s50 * 1000:.0f} ms in {histogram_bucket(0.5, server)}, "
        f"p99 {s99 * 1000:.0f} ms in {histogram_bucket(0.99, server)}\n"
        f"- `llmos_queue_depth` (both classes) sampled every {METRICS_EVERY_S:g} s: max {max_depth}, median "
        f"{statistics.median(run.depths):.0f}, {len(run.depths)} samples\n\n"
        "Memory (issue 13 item 7), the supervisor process alone (`/proc/PID/status`; the engine worker is "
        "another process). The peak row charges to the front-end all the supervisor grows by under load, so it "
        "is an upper bound on what HTTP adds.\n\n" + "\n".join(mem_rows) + "\n"
    )
    print(text, flush=True)
    if args.write:
        report.write_section(
            "http-load",
            "HTTP front-end: 64 streaming clients for 60 s, and its memory",
            "make bench-http (python bench/http_load.py --write)",
            text,
        )
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
