"""Machine mode on the serial console (docs/protocol.md), driven by pyserial as a program on the other end of the
cable would: the real supervisor and model, a pty as its UART, and a second pty joined to it like a null-modem cable
(pyserial opens a tty path; the first pty's other end is a master fd, which it cannot open)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import serial

from tests.integration.conftest import REPO, Appliance
from tests.integration.test_governor import speed_model

Event = dict[str, Any]


class NullModem:
    """The appliance's pty joined to a new pty whose tty end a program opens with pyserial."""

    def __init__(self, app: Appliance) -> None:
        self.a = app.master
        self.b, self.b_tty = os.openpty()
        tty.setraw(self.b_tty)  # no echo or line editing between the cable and the program
        self.path = os.ttyname(self.b_tty)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._relay, daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.a, self.b], [], [], 0.1)
            for src in ready:
                dst = self.b if src == self.a else self.a
                try:
                    data = os.read(src, 4096)
                except OSError:  # EIO while nobody has the tty end open: nothing to pass on
                    time.sleep(0.05)
                    continue
                os.write(dst, data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        os.close(self.b)
        os.close(self.b_tty)


class Program:
    """A program on the cable: writes JSON lines, reads lines back (every line in machine mode must be JSON)."""

    def __init__(self, path: str) -> None:
        self.port = serial.Serial(path, 115200, timeout=0.2)
        self.buf = b""
        self.transcript: list[bytes] = []

    def send(self, *lines: str | bytes | Event) -> None:
        """All in one write: several requests on the wire at once."""
        out = b""
        for line in lines:
            raw = json.dumps(line).encode() if isinstance(line, dict) else line
            out += (raw.encode() if isinstance(raw, str) else raw) + b"\n"
        self.port.write(out)

    def line(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no line within {timeout} s; got {self.transcript[-20:]}, then {self.buf!r}")
            self.buf += self.port.read(4096)
        line, self.buf = self.buf.split(b"\n", 1)
        self.transcript.append(line)
        return line

    def event(self, timeout: float = 60) -> Event:
        line = self.line(timeout)
        event = json.loads(line)  # in machine mode every line is one JSON object: no echo, prompt or banner
        assert isinstance(event, dict) and "event" in event, line
        return event

    def until(self, stop: Callable[[Event], bool], timeout: float = 60) -> list[Event]:
        got = [self.event(timeout)]
        while not stop(got[-1]):
            got.append(self.event(timeout))
        return got

    def enter_json_mode(self) -> list[bytes]:
        """What docs/protocol.md tells a program: send /json, skip what is not the mode event."""
        self.port.write(b"\r/json\r")
        skipped = []
        while (line := self.line(30)).strip() != b'{"event":"mode","mode":"json"}':
            skipped.append(line)
        return skipped


@pytest.fixture
def cable(appliance: Appliance) -> Iterator[tuple[Appliance, Program]]:
    modem = NullModem(appliance)
    program = Program(modem.path)
    yield appliance, program
    program.port.close()
    modem.close()


def tokens(events: list[Event], rid: object) -> str:
    return "".join(e["text"] for e in events if e["event"] == "token" and e["id"] == rid)


def test_a_program_asks_two_questions_at_once_and_gets_status_and_errors(
    cable: tuple[Appliance, Program],
) -> None:
    app, prog = cable
    skipped = prog.enter_json_mode()
    assert any(b"/json" in line for line in skipped)  # the human mode's echo of what we typed
    prog.send(
        {"op": "submit", "id": "a", "prompt": "ping"},
        {
            "op": "submit",
            "id": 2,
            "prompt": "reverse stone",
            "priority": "background",
            "max_tokens": 16,
            "temperature": 0,
        },
    )
    got: list[Event] = []
    while sum(e["event"] == "done" for e in got) < 2:
        got.append(prog.event())
    assert [e["id"] for e in got if e["event"] == "accepted"] == ["a", 2]
    assert tokens(got, "a").strip() == "pong" and tokens(got, 2).strip() == "enots"
    done = {e["id"]: e for e in got if e["event"] == "done"}
    assert done["a"]["outcome"] == "ok" and done[2]["outcome"] == "ok" and done[2]["tokens_out"] > 0
    for rid in ("a", 2):  # each request's own events in order: accepted, tokens, done
        kinds = [e["event"] for e in got if e.get("id") == rid]
        assert kinds[0] == "accepted" and kinds[-1] == "done" and set(kinds[1:-1]) == {"token"}, got

    prog.send({"op": "status", "id": "s"})
    status = prog.event(10)
    assert status["event"] == "status" and status["id"] == "s"
    assert status["status"]["state"] == "ready" and status["status"]["model"]["name"] == "llmos-tiny"
    assert status["status"]["last"]["tokens_out"] > 0 and status["lines"][0] == "state: ready"

    # Garbage of every kind: one error event a line, and the session goes on.
    prog.send(b"hello?", b"\xff\xfe", b"{" + b"x" * 600 + b"}", b'{"op":"submit","id":3}', b"[1]")
    prog.port.write(b"\x03")  # Ctrl-C
    errors = [prog.event(10) for _ in range(6)]
    assert [e["event"] for e in errors] == ["error"] * 6
    assert [e["message"] for e in errors] == [
        "the line is not valid JSON",
        "the line was dropped: line is not valid UTF-8",
        "the line was dropped: line longer than 512 bytes",
        "submit needs a non-empty prompt",
        "the line is not a JSON object",
        "Ctrl-C does nothing in machine mode",
    ]
    assert errors[3]["id"] == 3 and all(e["hint"] for e in errors)

    # The control socket serves its own client meanwhile, in the same envelope.
    assert app.llmos("submit", "reverse stone").stdout.strip() == "enots"

    prog.port.write(b"/json\r")  # a program unsure of the mode sends /json: the mode is said again
    assert prog.event(10) == {"event": "mode", "mode": "json"}
    prog.send({"op": "exit"})
    assert prog.event(10) == {"event": "mode", "mode": "human"}
    prog.port.write(b"ping\r")  # the person's prompt is back
    deadline = time.monotonic() + 30
    while b"pong" not in prog.buf and time.monotonic() < deadline:
        prog.buf += prog.port.read(4096)
    assert prog.buf.startswith(b"llmos> ping") and b"pong" in prog.buf, prog.buf


def test_requests_interleave_and_one_is_cancelled_by_its_id(appliance_factory: type[Appliance]) -> None:
    """A long background answer is preempted by an interactive one: their tokens interleave on the line, each under
    its own id; then the long one is cancelled by its id."""
    app = appliance_factory(model=speed_model("25M"), override="model:\n  context: 2048\n")
    app.wait_ready(60)
    app.console.read_until(b"llmos> ", 10)
    modem = NullModem(app)
    prog = Program(modem.path)
    try:
        prog.enter_json_mode()
        prog.send({"op": "submit", "id": "long", "prompt": "tell me a long story", "priority": "background",
                   "max_tokens": 1500})  # fmt: skip
        got = prog.until(lambda e: e["event"] == "token")  # it streams
        prog.send({"op": "submit", "id": "short", "prompt": "hello", "max_tokens": 12})
        got += prog.until(lambda e: e["event"] == "done")
        assert got[-1]["id"] == "short" and got[-1]["outcome"] == "ok" and got[-1]["tokens_out"] > 0, got[-1]
        got += prog.until(lambda e: e["event"] == "token" and e["id"] == "long")  # the long one resumes
        prog.send({"op": "cancel", "id": "long"})
        got += prog.until(lambda e: e["event"] == "done")
        done = got[-1]
        assert done["id"] == "long" and done["outcome"] == "cancelled" and done["preemptions"] >= 1, done
        order = [e["id"] for e in got if e["event"] == "token"]
        first_short, last_short = order.index("short"), len(order) - 1 - order[::-1].index("short")
        assert "long" in order[:first_short] and "long" in order[last_short:], order  # long, short..., long
        prog.send({"op": "cancel", "id": "long"})  # it has finished: its id is unknown now
        late = prog.event(10)
        assert late["event"] == "error" and late["id"] == "long" and "in flight" in late["message"]
        prog.send({"op": "exit"})
        assert prog.event(10) == {"event": "mode", "mode": "human"}
    finally:
        prog.port.close()
        modem.close()


def test_the_documented_example_program_works(cable: tuple[Appliance, Program]) -> None:
    """examples/serial_client.py, as docs/protocol.md shows it, against the appliance."""
    _app, prog = cable
    prog.port.close()  # the example opens the port itself
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "serial_client.py"), prog.port.port, "ping", "reverse stone"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["ping -> pong", "reverse stone -> enots"], out.stdout
