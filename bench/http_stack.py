"""Which HTTP server stack for the HTTP front-end: what each adds to a process's memory while it streams.

    python bench/http_stack.py [--clients 64] [--chunks 200] [--write]

Each candidate runs in a fresh Python process that first imports what the supervisor imports anyway (psutil,
sqlite-utils, yaml, pyserial), then records its RSS, imports the stack and prometheus_client (for /metrics), serves
an SSE endpoint on loopback, and is driven by `--clients` concurrent streaming clients (each reading `--chunks`
chunks of an OpenAI-like `data: {...}` line). The figure is the server process's peak RSS above the recorded
baseline (VmHWM - RSS before). Target (issue 13): the HTTP front-end adds at most 15 MiB (BUDGET_MIB); the candidate
that meets it with the fewest dependencies is picked. Candidates that are not installed in the interpreter running
this are reported as such (`make bench-http-stack` makes a venv holding all of them).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import begin

BUDGET_MIB = 15.0
CANDIDATES = ("stdlib", "aiohttp", "starlette+uvicorn")

_SERVER = r"""
import os, sys, json, time
import psutil, sqlite_utils, yaml, serial  # what the supervisor has loaded anyway
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = vm("VmRSS:")
import prometheus_client  # /metrics: part of every candidate front-end
import prometheus_client  # /metrics: part of every candidate front-end
stack, port, chunks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
CHUNK = "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": [
    {"index": 0, "delta": {"content": "tok"}, "finish_reason": None}]}) + "\n\n"
def report():
    print(json.dumps({"base": base, "hwm": vm("VmHWM:")}), flush=True)
if stack == "stdlib":
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def do_GET(self):
            if self.path == "/report":
                report(); body = b"ok"
                self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
                self.wfile.write(body); return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream"); self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(chunks):
                self.wfile.write(CHUNK.encode()); self.wfile.flush(); time.sleep(0.005)
            self.wfile.write(b"data: [DONE]\n\n"); self.wfile.flush()
            self.close_connection = True
    srv = ThreadingHTTPServer(("127.0.0.1", port), H); srv.daemon_threads = True
    print("up", flush=True); srv.serve_forever()
elif stack == "aiohttp":
    import asyncio
    from aiohttp import web
    async def stream(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(chunks):
            await resp.write(CHUNK.encode()); await asyncio.sleep(0.005)
        await resp.write(b"data: [DONE]\n\n"); await resp.write_eof(); return resp
    async def rep(request):
        report(); return web.Response(text="ok")
    app = web.Application(); app.router.add_get("/report", rep); app.router.add_get("/s", stream)
    print("up", flush=True); web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
else:
    import asyncio, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route
    async def gen():
        for _ in range(chunks):
            yield CHUNK; await asyncio.sleep(0.005)
        yield "data: [DONE]\n\n"
    async def stream(request):
        return StreamingResponse(gen(), media_type="text/event-stream")
    async def rep(request):
        report(); return PlainTextResponse("ok")
    app = Starlette(routes=[Route("/report", rep), Route("/s", stream)])
    print("up", flush=True); uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def measure(stack: str, clients: int, chunks: int) -> dict[str, float] | str:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, stack, str(port), str(chunks)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if first.strip() != "up":
            err = proc.stderr.read() if proc.stderr else ""
            return "not installed" if "ModuleNotFoundError" in err else f"failed: {err.strip()[-200:]}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        got: list[int] = []
        lock = threading.Lock()

        def client() -> None:
            body = _get(port, "/s")
            with lock:
                got.append(body.count(b"data: "))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        _get(port, "/report")
        fig = json.loads(proc.stdout.readline())
        complete = sum(n == chunks + 1 for n in got)
        return {
            "added_mib": (fig["hwm"] - fig["base"]) / 2**20,
            "complete": complete,
            "clients": clients,
            "seconds": took,
        }
    finally:
        proc.terminate()
        proc.wait(5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    report = begin()
    rows = ["| stack | streams complete | peak RSS added | wall time |", "|---|---|---|---|"]
    results: dict[str, dict[str, float] | str] = {}
    for stack in CANDIDATES:
        r = measure(stack, args.clients, args.chunks)
        results[stack] = r
        if isinstance(r, str):
            print(f"{stack}: {r}", flush=True)
            rows.append(f"| {stack} | {r} | | |")
            continue
        print(
            f"{stack}: {r['complete']:.0f}/{r['clients']:.0f} streams complete, +{r['added_mib']:.1f} MiB, "
            f"{r['seconds']:.1f} s",
            flush=True,
        )
        rows.append(
            f"| {stack} | {r['complete']:.0f} of {r['clients']:.0f} | {r['added_mib']:.1f} MiB | {r['seconds']:.1f} s |"
        )
    chosen = results["stdlib"]
    ok = isinstance(chosen, dict) and chosen["added_mib"] <= BUDGET_MIB and chosen["complete"] == chosen["clients"]
    report.verdict(
        "the chosen stack (stdlib ThreadingHTTPServer) while streaming",
        chosen if isinstance(chosen, str) else f"+{chosen['added_mib']:.1f} MiB",
        f"at most {BUDGET_MIB:g} MiB, every stream complete",
        ok,
    )
    if args.write:
        report.write_section(
            "http-stack",
            "HTTP server stack: memory added while streaming",
            "make bench-http-stack (python bench/http_stack.py --write)",
            f"{args.clients} concurrent clients, each streaming {args.chunks} SSE chunks, against a bare server of "
            "each stack in a fresh process that has already imported what the supervisor imports. Peak RSS added: "
            "the process's VmHWM minus its RSS before importing the stack.\n\n" + "\n".join(rows) + "\n",
        )
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
