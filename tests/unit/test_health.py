"""The boot's health gate (health.py): its verdict on what systemd and the supervisor say, its waiting, and the
control socket it reads. The gate in the image (llmos-health.service, boot counting) is tested in tests/image."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

from llmos_edge import cli, health

RUNNING = {"ActiveState": "active", "SubState": "running", "NRestarts": "0", "Result": "success"}
READY = {"state": "ready", "reason": "", "serving": True, "self_test": "ok (pong in 0.4 s)"}


def test_ready_and_serving_without_a_restart_is_healthy() -> None:
    v = health.verdict(RUNNING, READY)
    assert (v.done, v.healthy) == (True, True)
    assert "self-test ok" in v.reason


def test_a_restart_is_unhealthy_even_when_ready_again() -> None:
    v = health.verdict({**RUNNING, "NRestarts": "1", "Result": "exit-code"}, READY)
    assert (v.done, v.healthy) == (True, False)
    assert v.reason == "llmos.service was restarted 1 time(s) (result exit-code)"


def test_an_exit_waiting_for_its_restart_is_unhealthy() -> None:
    restarting = {**RUNNING, "ActiveState": "activating", "SubState": "auto-restart", "Result": "exit-code"}
    v = health.verdict(restarting, None)
    assert (v.done, v.healthy) == (True, False)
    assert v.reason == "llmos.service exited and is being restarted (result exit-code)"


def test_a_failed_unit_or_a_failed_supervisor_is_final() -> None:
    assert health.verdict({**RUNNING, "ActiveState": "failed", "Result": "start-limit-hit"}, None) == health.Verdict(
        True, False, "llmos.service failed (result start-limit-hit)"
    )
    v = health.verdict(RUNNING, {**READY, "state": "failed", "serving": False, "reason": "no model"})
    assert (v.done, v.healthy, v.reason) == (True, False, "the supervisor says failed: no model")


def test_starting_or_not_yet_listening_means_look_again() -> None:
    assert health.verdict({**RUNNING, "ActiveState": "activating"}, None).done is False
    v = health.verdict(RUNNING, {**READY, "state": "loading", "serving": False, "reason": "default.gguf"})
    assert (v.done, v.reason) == (False, "the supervisor is loading (default.gguf)")
    # ready but not serving (a model that failed its self-test) is not good enough
    assert health.verdict(RUNNING, {**READY, "serving": False}).done is False


def test_wait_looks_until_ready() -> None:
    answers = iter([None, {**READY, "state": "loading", "serving": False}, READY])
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    v = health.wait(
        "/nowhere", 60, service=lambda: RUNNING, status=lambda: next(answers), clock=lambda: now[0], sleep=sleep
    )
    assert v.healthy and slept == [2.0, 2.0]


def test_wait_gives_up_at_the_timeout_with_the_last_reason() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    v = health.wait("/nowhere", 10, service=lambda: RUNNING, status=lambda: None, clock=lambda: now[0], sleep=sleep)
    assert (v.done, v.healthy) == (True, False)
    assert v.reason == "not healthy within 10 s: llmos.service is active: no answer on its control socket"


def serve_status(path: Path, status: dict[str, Any]) -> threading.Thread:
    """A Unix socket that answers one status request the way the supervisor does (protocol.py)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            request = json.loads(conn.makefile("rb").readline())
            assert request["op"] == "status"
            conn.sendall(json.dumps({"event": "status", "id": None, "status": status, "lines": []}).encode() + b"\n")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_the_status_comes_from_the_control_socket(tmp_path: Path) -> None:
    sock = tmp_path / "control.sock"
    t = serve_status(sock, READY)
    assert health.supervisor_status(str(sock)) == READY
    t.join(5)
    assert health.supervisor_status(str(tmp_path / "missing.sock")) is None


def test_the_command_says_why_and_exits_non_zero_when_nothing_listens(tmp_path: Path, capsys: Any) -> None:
    rc = cli.main(["health", "--socket", str(tmp_path / "missing.sock"), "--unit", "llmos-no-such-unit.service"])
    err = capsys.readouterr().err
    if Path("/run/systemd/system").is_dir():  # systemd runs here: an unknown unit is inactive, nothing listens
        assert rc == 1, err
        assert (
            err == "llmos health: bad: not healthy within 0 s: llmos-no-such-unit.service is inactive: "
            "no answer on its control socket\n"
        ), err
    else:  # a container without systemd: systemctl's own failure, in one line with a hint
        assert rc == 2, err
        assert err.startswith("llmos: error: systemctl "), err
