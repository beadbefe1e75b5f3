"""A front-end thread that dies is started again and recorded; the watchdog waits for what cannot be restarted."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from llmos_edge.console import Console
from llmos_edge.readiness import ThreadWatch
from llmos_edge.scheduler import Scheduler


class Events:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.rows.append((kind, message))


class BrokenOnce:
    """A port whose first read raises an error nobody expects (a driver bug), then behaves."""

    def __init__(self) -> None:
        self.reads = 0
        self.written = bytearray()

    def read(self, size: int) -> bytes:
        self.reads += 1
        if self.reads == 1:
            raise RuntimeError("driver bug")
        time.sleep(0.05)
        return b""

    def write(self, data: bytes) -> int:
        self.written += data
        return len(data)

    def close(self) -> None:
        pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the test
def test_a_console_thread_that_dies_is_started_again_and_recorded() -> None:
    port = BrokenOnce()
    sched = Scheduler(engine=None, recorder=None)  # type: ignore[arg-type]  # never started: the console only submits
    console = Console("test", 115200, 512, True, sched, lambda: [], lambda _n: [], 16, port=port)
    console.start()
    deadline = time.monotonic() + 5
    while console.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not console.alive(), "the injected fault did not end the console thread"
    events = Events()
    watch = ThreadWatch(events)
    watch.add("console", console.alive, console.restart)
    assert watch.check() == []
    assert console.alive() and port.reads >= 1
    assert events.rows == [("thread_restarted", "the console thread died and was started again")]
    time.sleep(0.2)
    assert console.alive() and port.reads > 1  # reading again
    console.stop()


def test_a_dead_thread_that_cannot_be_restarted_withholds_the_watchdog() -> None:
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    watch = ThreadWatch(Events())
    watch.add("scheduler", t.is_alive)
    assert watch.check() == ["scheduler"]
