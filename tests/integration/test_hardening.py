"""Faults a review found (issue 12), each injected into the real supervisor: a terminal that stops reading, a
question typed while the model loads, garbage on the control socket, a prefill slower than the hang timeout,
shutdown while busy, and the reason a run ended."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import time
from pathlib import Path

from tests.integration.conftest import Appliance, catch_worker_while_loading
from tests.integration.test_governor import speed_model


def test_a_terminal_that_stops_reading_costs_output_not_the_console(appliance: Appliance) -> None:
    """The seeded serial fuzz that once killed the console thread: noisy lines (each answered with a notice and
    echoed) and questions, typed into a pty whose other end does not read, until its buffer is long full."""
    rng = random.Random(144)
    for i in range(400):
        noise = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(10, 200)))
        appliance.console.send(noise.replace(b"\x03", b"").replace(b"\x04", b"") + b"\r")
        if i % 50 == 0:
            appliance.console.send(b"reverse abcdefghijklmnopqrstuvwxyz\r")
        time.sleep(0.005)
    time.sleep(3)  # longer than the port's write timeout: the old console died here
    appliance.console.drain(quiet=1.0, timeout=30)
    appliance.console.send(b"\x03")
    appliance.console.drain(quiet=1.0)
    assert appliance.console.ask("ping") == "pong", appliance.output()
    assert appliance.console.status()["state"] == "ready"
    assert "Traceback" not in appliance.output()


def test_a_question_typed_while_the_model_loads_waits_for_it(appliance_factory: type[Appliance]) -> None:
    app = appliance_factory()
    pid = catch_worker_while_loading(app, signal.SIGSTOP)
    banner = app.console.read_until(b"llmos> ", 20).decode()
    assert "llmos-edge is starting: loading default" in banner, banner
    assert "Questions typed now wait until it answers" in banner
    assert "\r\n[loading default, " in banner and banner.endswith("]\r\nllmos> ")  # the prompt says so too
    app.console.send("ping\r")
    time.sleep(12)  # longer than the 10 s after which a question used to fail
    os.kill(pid, signal.SIGCONT)
    out = app.console.read_until(b"llmos> ", 60).decode()
    assert "pong" in out and "error" not in out, out
    app.wait_ready(30)


def test_garbage_on_the_control_socket_gets_answers_and_no_harm(appliance: Appliance) -> None:
    rng = random.Random(7)
    messages: list[bytes] = [
        b'{"op": "cancel", "id": "seven"}',
        b'{"op": "cancel", "id": 1.5}',
        b'{"op": "cancel", "id": true}',
        b'{"op": "cancel"}',
        b'{"op": "submit", "prompt": 5}',
        b'{"op": "submit", "prompt": "x", "max_tokens": "many"}',
        b'{"op": "model", "args": 5}',
        b'{"op": "model", "args": "frobnicate"}',
        b'{"op": "model", "args": "install /nonexistent.gguf"}',
        b"[1, 2, 3]",
        b'"op"',
        b"\xff\xfe\x00",
        b"{" * 5000,
    ]
    keys, values = ["op", "id", "prompt", "args", "x"], [None, 1, -1, 2**70, "status", "cancel", "model", [], {}]
    for _ in range(300):
        msg = {rng.choice(keys): rng.choice(values) for _ in range(rng.randrange(1, 4))}
        messages.append(json.dumps(msg).encode())
    for raw in messages:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(appliance.socket))
            s.sendall(raw + b"\n")
            reply = s.makefile("rb").readline()
        obj = json.loads(reply)
        assert isinstance(obj, dict) and obj.get("event") in ("status", "error", "model", "progress"), (raw, reply)
        if obj["event"] == "error":
            assert "\n" not in obj["message"] and "Traceback" not in obj["message"] and obj["hint"], obj
    assert "state: ready" in appliance.llmos("status").stdout
    assert appliance.console.ask("ping") == "pong"


def test_a_prefill_longer_than_the_hang_timeout_is_progress(appliance_factory: type[Appliance]) -> None:
    big = speed_model("50M")
    app = appliance_factory(
        model=big,
        config="engine:\n  progress_timeout: 3\n",
        override="model:\n  context: 8192\n  threads: 1\n",
    )
    app.wait_ready(60)
    app.console.read_until(b"llmos> ", 10)
    prompt = " ".join(f"w{i}" for i in range(1250))  # about 7000 tokens: many seconds of prefill on one thread
    t0 = time.monotonic()
    out = app.llmos("submit", prompt, "--max-tokens", "4", "--json", check=False)
    took = time.monotonic() - t0
    done = json.loads(out.stderr.strip().splitlines()[-1])
    assert done["outcome"] == "ok", (done, app.output())
    assert done["ttft_ms"] > 3000, f"the prefill took {done['ttft_ms']} ms: too short to test the timeout"
    assert app.console.status()["uptime"].endswith("engine restarts: 0"), took


def test_shutdown_while_an_answer_streams_takes_under_5_s(appliance_factory: type[Appliance]) -> None:
    app = appliance_factory(model=speed_model("25M"), override="model:\n  max_tokens: 4000\n  context: 4096\n")
    app.wait_ready(60)
    app.console.read_until(b"llmos> ", 10)
    app.console.send("tell me a long story\r")
    time.sleep(1.0)
    t0 = time.monotonic()
    rc = app.stop(signal.SIGTERM, timeout=15)
    took = time.monotonic() - t0
    assert rc == 0 and took < 5, took
    db = sqlite3.connect(app.db)
    assert db.execute("SELECT exit_reason FROM starts").fetchone()[0] == "SIGTERM"


def test_the_exit_reason_names_the_signal(appliance_factory: type[Appliance]) -> None:
    for sig in (signal.SIGINT, signal.SIGHUP):
        app = appliance_factory()
        app.wait_ready()
        assert app.stop(sig) == 0
        db = sqlite3.connect(Path(app.db))
        assert db.execute("SELECT exit_reason FROM starts").fetchone()[0] == signal.Signals(sig).name


def test_a_broken_edit_falls_back_to_the_last_configuration_that_ran(
    appliance_factory: type[Appliance], tmp_path: Path
) -> None:
    good = appliance_factory(override="model:\n  max_tokens: 40\n")
    good.wait_ready()
    good.console.read_until(b"llmos> ", 10)
    saved = good.db.parent / "last-good.yaml"
    assert saved.exists() and "max_tokens: 40" in saved.read_text()
    assert good.stop() == 0
    # The same device after an edit that breaks the override: it runs what ran before, not the layers below.
    again = appliance_factory(override="model:\n  max_tokens: lots\n", db=good.db)
    again.wait_ready()
    again.console.read_until(b"llmos> ", 10)
    config = again.console.status()["config"]
    assert "FALLBACK" in config and "model.max_tokens must be an integer" in config, config
    assert "running the last configuration that worked (saved " in config, config
    assert again.console.ask("ping") == "pong"
