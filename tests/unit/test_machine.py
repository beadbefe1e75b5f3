"""A machine session (machine.py) with the real scheduler and a scripted engine (the engine is not under test):
requests by the client's ids, concurrent requests, cancel by id, duplicate ids, exit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from llmos_edge.machine import Session
from llmos_edge.protocol import Event
from llmos_edge.scheduler import Scheduler
from tests.unit.test_scheduler import Rows, ScriptedEngine
from tests.voice_fixtures import status_snapshot


class Events:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[Event] = []

    def __call__(self, event: Event) -> None:
        with self.lock:
            self.items.append(event)

    def wait(self, n_done: int, timeout: float = 5.0) -> list[Event]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if sum(e["event"] == "done" for e in self.items) >= n_done:
                    return list(self.items)
            time.sleep(0.01)
        raise TimeoutError(f"no {n_done} done events: {self.items}")


@pytest.fixture
def parts() -> Iterator[tuple[ScriptedEngine, Scheduler, Events, Session]]:
    eng = ScriptedEngine()
    sched = Scheduler(eng, Rows(), queue_size=8)
    sched.start()
    events = Events()
    session = Session(sched, events, status_snapshot, max_tokens=64, source="test", priority="interactive", model=None)
    yield eng, sched, events, session
    eng.gate.set()
    sched.stop()


def test_two_requests_stream_under_their_own_ids(parts: tuple[ScriptedEngine, Scheduler, Events, Session]) -> None:
    _eng, _s, events, session = parts
    session.handle_line('{"op":"submit","id":"a","prompt":"abc"}')
    session.handle_line('{"op":"submit","id":2,"prompt":"xyz","priority":"background","max_tokens":2}')
    got = events.wait(2)
    text = {rid: "".join(e["text"] for e in got if e["event"] == "token" and e["id"] == rid) for rid in ("a", 2)}
    assert text == {"a": "cba", 2: "zy"}
    for rid in ("a", 2):
        kinds = [e["event"] for e in got if e.get("id") == rid]
        assert kinds[0] == "accepted" and kinds[-1] == "done" and set(kinds[1:-1]) == {"token"}
    assert {e["id"]: e["outcome"] for e in got if e["event"] == "done"} == {"a": "ok", 2: "ok"}
    assert session.in_flight == {}


def test_cancel_by_id_and_the_errors_of_ids(parts: tuple[ScriptedEngine, Scheduler, Events, Session]) -> None:
    eng, _s, events, session = parts
    eng.gate.clear()  # the first request holds the engine
    session.handle_line('{"op":"submit","id":1,"prompt":"long"}')
    session.handle_line('{"op":"submit","id":1,"prompt":"again"}')
    session.handle_line('{"op":"cancel","id":"nope"}')
    session.handle_line('{"op":"cancel","id":1}')
    eng.gate.set()
    got = events.wait(1)
    errors = [e for e in got if e["event"] == "error"]
    assert [(e["id"], e["message"]) for e in errors] == [
        (1, "request 1 is already in flight"),
        ("nope", "no request 'nope' is in flight"),
    ]
    assert [e["outcome"] for e in got if e["event"] == "done"] == ["cancelled"]
    session.handle_line('{"op":"submit","id":1,"prompt":"ok"}')  # a finished request's id is free again
    assert events.wait(2)[-1]["outcome"] == "ok"


def test_status_garbage_and_exit(parts: tuple[ScriptedEngine, Scheduler, Events, Session]) -> None:
    eng, _s, events, session = parts
    assert session.handle_line('{"op":"status","id":"s"}') is False
    assert session.handle_line(b"\xff garbage") is False
    assert session.handle_line('{"op":"model","args":"list"}') is False
    status, garbage, model = events.items
    assert status["event"] == "status" and status["id"] == "s" and status["status"]["state"] == "ready"
    assert garbage == {
        "event": "error",
        "id": None,
        "message": "the line is not valid UTF-8",
        "hint": "send one JSON object per line, UTF-8 encoded",
    }
    assert model["event"] == "error" and model["message"] == "model commands are not available here"
    eng.gate.clear()
    session.handle_line('{"op":"submit","id":"x","prompt":"held"}')
    assert session.handle_line('{"op":"exit"}') is True
    threading.Timer(0.2, eng.gate.set).start()
    session.close(5.0)  # cancels what is in flight and sends its done event before it returns
    assert events.items[-1]["event"] == "done" and events.items[-1]["outcome"] == "cancelled"
    n = len(events.items)
    session.handle_line('{"op":"status"}')
    assert len(events.items) == n  # a closed session sends nothing more
