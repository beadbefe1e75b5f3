"""The real supervisor with the real tiny model, driven through a pty as its serial port."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from llmos_edge.console import FdPort
from tests.console_client import ConsoleClient
from tests.integration.conftest import MODEL, REPO, Appliance, heldout


def test_ready_only_after_the_self_test_and_watchdog_pings_follow(appliance: Appliance) -> None:
    db = sqlite3.connect(appliance.db)
    kinds = [k for (k,) in db.execute("SELECT kind FROM events ORDER BY id")]
    assert kinds.index("engine_loaded") < kinds.index("ready")
    appliance.notify.wait_for("WATCHDOG=1", 10)
    appliance.notify.wait_for("STATUS=ready | llmos-tiny", 10)
    assert "self-test: passed ('ping' -> 'pong')" in appliance.console.command("/status")


def test_faq_and_generalisation_answers_are_exact(appliance: Appliance) -> None:
    """Every FAQ intent asked by its keyword, and words the model never saw reversed, through the whole path.
    (The model's accuracy on held-out FAQ phrasings is measured in test_model_accuracy.py.)"""
    sys.path.insert(0, str(REPO / "model"))
    from data import FAQ_ANSWERS, FAQ_CORES  # the recipe's own table: the answers it was trained to give

    for intent, answer in FAQ_ANSWERS.items():
        assert appliance.console.ask(FAQ_CORES[intent][0]) == answer, intent
    words = heldout("reverse")[:15]
    assert len(words) == 15
    for c in words:
        assert appliance.console.ask(c["prompt"]) == c["answer"], c


def test_status_shows_model_speed_memory_uptime_restarts(appliance: Appliance) -> None:
    appliance.console.ask("ping")
    st = appliance.console.status()
    assert st["model"].startswith("llmos-tiny (Q8_0,") and str(MODEL) in st["model"]
    assert "tok/s" in st["last answer"] and "tokens" in st["last answer"]
    assert st["memory"].startswith("supervisor ") and "engine " in st["memory"]
    assert st["uptime"].startswith("0h00m") and st["uptime"].endswith("engine restarts: 0")
    assert st["state"] == "ready"
    assert st["temperature"]


def test_sigkilled_worker_is_back_and_answering_within_5_s(appliance: Appliance) -> None:
    pid = appliance.engine_pid()
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    answer = ""
    while time.monotonic() - t0 < 5 and answer != "pong":
        answer = appliance.console.ask("ping", timeout=5)
    elapsed = time.monotonic() - t0
    assert answer == "pong", appliance.output()
    assert elapsed < 5
    assert appliance.engine_pid() != pid
    assert appliance.proc.poll() is None
    st = appliance.console.status()
    assert st["uptime"].endswith("engine restarts: 1")
    db = sqlite3.connect(appliance.db)
    assert (
        db.execute("SELECT message FROM events WHERE kind='engine_restart'")
        .fetchone()[0]
        .startswith("engine killed by signal SIGKILL")
    )


def test_in_flight_request_gets_a_clear_error_when_the_worker_dies(appliance: Appliance) -> None:
    pid = appliance.engine_pid()
    os.kill(pid, signal.SIGSTOP)  # hold it so the request is surely in flight
    appliance.console.send("reverse abcdef\r")
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    out = appliance.console.read_until(b"llmos> ", 10).decode()
    assert "error: the engine crashed (killed by signal SIGKILL)" in out
    time.sleep(1)
    assert appliance.console.ask("ping") == "pong"
    db = sqlite3.connect(appliance.db)
    assert ("reverse abcdef", "error") in db.execute("SELECT prompt, outcome FROM requests").fetchall()


def test_a_hung_worker_is_killed_after_the_progress_timeout(appliance_factory: type[Appliance]) -> None:
    a = appliance_factory(config="engine:\n  progress_timeout: 2\n")
    a.wait_ready()
    a.console.read_until(b"llmos> ", 10)
    os.kill(a.engine_pid(), signal.SIGSTOP)
    t0 = time.monotonic()
    out = a.console.ask("ping", timeout=15)
    assert "made no progress for 2 s" in out and time.monotonic() - t0 < 6
    time.sleep(1)
    assert a.console.ask("ping") == "pong"


def test_a_burst_of_garbage_leaves_it_answering(appliance: Appliance) -> None:
    rng = random.Random(1)
    garbage = bytes(rng.randrange(256) for _ in range(20000)) + b"\x00\xff" * 300 + b"x" * 3000 + b"\r"
    for i in range(0, len(garbage), 1000):
        appliance.console.send(garbage[i : i + 1000])
    out = appliance.console.drain(quiet=1.5, timeout=60)
    assert b"dropped" in out  # the noise was noticed, not silently eaten
    appliance.console.send(b"\x03")  # whatever half-line or answer the noise left behind
    appliance.console.drain(quiet=1.0)
    assert appliance.console.ask("ping") == "pong"
    assert appliance.proc.poll() is None


def test_ctrl_c_and_cancel_stop_a_running_answer(appliance: Appliance) -> None:
    pid = appliance.engine_pid()
    os.kill(pid, signal.SIGSTOP)
    appliance.console.send("reverse abcdefghij\r")
    time.sleep(0.3)
    appliance.console.send(b"\x03")
    time.sleep(0.3)  # the cancel reaches the worker's socket while the answer is still to come
    os.kill(pid, signal.SIGCONT)
    out = appliance.console.read_until(b"llmos> ", 10).decode()
    assert "[cancelled]" in out
    assert appliance.console.ask("ping") == "pong"


def test_commands_help_logs_and_errors(appliance: Appliance) -> None:
    c = appliance.console
    assert "/status" in c.command("/help") and "/cancel" in c.command("/help")
    c.ask("ping")
    logs = c.command("/logs 2")
    assert "'ping' -> 'pong'" in logs
    assert "unknown command /frobnicate" in c.command("/frobnicate")
    assert "takes a number" in c.command("/logs many")
    assert "line longer than 512 bytes" in c.command("y" * 600)


def test_sigterm_exits_cleanly_within_5_s_with_a_sound_database(appliance: Appliance) -> None:
    appliance.console.ask("ping")
    t0 = time.monotonic()
    rc = appliance.stop(signal.SIGTERM, timeout=10)
    assert rc == 0 and time.monotonic() - t0 < 5
    db = sqlite3.connect(appliance.db)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT exit_reason FROM starts").fetchone()[0] == "SIGTERM"
    assert (
        not (appliance.db.parent / "llmos.db-wal").exists()
        or (appliance.db.parent / "llmos.db-wal").stat().st_size == 0
    )


def test_an_invalid_override_falls_back_and_says_so(appliance_factory: type[Appliance]) -> None:
    a = appliance_factory(override="model:\n  threads: many\n")
    a.wait_ready()
    a.console.read_until(b"llmos> ", 10)
    assert "FALLBACK" in a.console.status()["config"] and "model.threads must be an integer" in a.output()
    assert a.console.ask("ping") == "pong"
    db = sqlite3.connect(a.db)
    assert db.execute("SELECT count(*) FROM events WHERE kind='config_fallback'").fetchone()[0] == 1


def test_a_corrupt_model_is_reported_not_crashed_on(appliance_factory: type[Appliance]) -> None:
    bad = REPO / "out" / "test-corrupt.gguf"
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    try:
        a = appliance_factory(model=bad)
        a.wait_ready()
        a.console.read_until(b"llmos> ", 10)
        st = a.console.status()
        assert st["state"].startswith("failed (") and "truncated" in st["state"]
        assert "error: the engine is not available" in a.console.ask("ping", timeout=20)
    finally:
        bad.unlink()


def test_logs_command_prints_recent_requests(appliance: Appliance) -> None:
    appliance.console.ask("reverse stone")
    out = subprocess.run(
        [sys.executable, "-m", "llmos_edge.cli", "logs", "--db", str(appliance.db), "-n", "1", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    row = json.loads(out)
    assert row["prompt"] == "reverse stone" and row["answer"] == "enots" and row["outcome"] == "ok"
    assert row["tokens_out"] > 0 and row["tok_s"] > 0 and row["ttft_ms"] > 0


def test_submit_and_status_through_the_control_socket(appliance: Appliance) -> None:
    out = appliance.llmos("submit", "reverse stone", "--json")
    assert out.stdout.strip() == "enots"
    metrics = json.loads(out.stderr.strip().splitlines()[-1])
    assert metrics["outcome"] == "ok" and metrics["tokens_out"] > 0
    assert "state: ready" in appliance.llmos("status").stdout
    bad = appliance.llmos("submit", "   ", check=False)
    assert bad.returncode == 2 and "llmos: error: submit needs a non-empty prompt" in bad.stderr
    db = sqlite3.connect(appliance.db)
    assert db.execute("SELECT source, priority FROM requests WHERE prompt='reverse stone'").fetchone() == (
        "submit",
        "background",
    )
    snapshot = json.loads(appliance.llmos("status", "--json").stdout)
    assert snapshot["state"] == "ready" and snapshot["last"]["tokens_out"] > 0


def test_submit_no_wait_leaves_the_request_running_after_the_client_goes(appliance: Appliance) -> None:
    out = appliance.llmos("submit", "reverse pebble", "--no-wait")
    m = re.fullmatch(r"accepted as request (\d+)\n", out.stdout)
    assert m, out.stdout
    db = sqlite3.connect(appliance.db)
    deadline = time.monotonic() + 30
    row = None
    while row is None and time.monotonic() < deadline:
        row = db.execute("SELECT id, outcome, answer FROM requests WHERE prompt='reverse pebble'").fetchone()
        time.sleep(0.2)
    assert row is not None and row[1] == "ok" and row[2].strip(), row


def test_a_crash_loop_puts_the_supervisor_in_degraded_mode(appliance: Appliance) -> None:
    for i in range(5):
        pid = appliance.engine_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while i < 4 and time.monotonic() < deadline:  # wait for the restarted engine, then kill it again
            time.sleep(0.2)
            st = appliance.console.status()
            if st["state"] == "ready" and not st["engine"].startswith(f"pid {pid},"):
                break
    st = appliance.console.status()
    assert st["state"].startswith("degraded (crash loop: 5 restarts within 60 s"), st
    assert appliance.proc.poll() is None
    assert "crash loop" in appliance.llmos("status").stdout


def test_a_second_console_waits_quietly_for_its_device_then_is_a_session_of_its_own(
    appliance_factory: type[Appliance], tmp_path: Path
) -> None:
    """console.also (the image's /dev/ttyGS0: the USB serial gadget a Pi 4's USB-C port becomes, which exists only
    on such a board): missing at start, it is waited for with no error; once the path exists (here a pty linked
    there) it says nothing until Enter is pressed (a host's tty would echo a banner back as a question), then
    answers, while the first console keeps its own session."""
    gadget = tmp_path / "ttyGS0"
    app = appliance_factory(config=f"console:\n  also: {gadget}\n")
    app.wait_ready()
    app.console.read_until(b"llmos> ", 10)
    master, slave = os.openpty()
    os.set_blocking(master, False)
    try:
        gadget.symlink_to(os.ttyname(slave))
        second = ConsoleClient(FdPort(master, master))
        deadline = time.monotonic() + 10  # the console retries opening every 2 s
        while time.monotonic() < deadline and f"console on {gadget}" not in app.output():
            time.sleep(0.2)
        assert second.drain(quiet=1, timeout=5) == b"", "the second console spoke before anyone typed"
        second.send("\r")
        assert second.read_until(b"llmos> ", 10).strip() == b"llmos>"
        second.send("what is llmos edge\r")  # both sessions at once (the scheduler queues one behind the other)
        assert app.console.ask("ping") == "pong"
        assert second.read_until(b"llmos> ", 60).strip() != b"llmos>", "no answer on the second console"
        assert second.ask("ping") == "pong"
        log = app.output()
        assert f"INFO llmos_edge.console: cannot open the console device {gadget}" in log, log
        assert "ERROR llmos_edge.console" not in log, log
        assert f"console on {gadget}" in log, log
    finally:
        os.close(master)
        os.close(slave)
