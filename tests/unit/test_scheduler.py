"""Scheduler ordering and refusal, with a scripted engine (the engine is not the thing under test here)."""

import threading
import time
from collections.abc import Callable

import pytest

from llmos_edge.engine import EngineError, GenerationStats
from llmos_edge.scheduler import Refused, Request, Result, Scheduler


class ScriptedEngine:
    """Answers each prompt with its reversed text, one character per token; can be held at a gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.order: list[str] = []

    def generate(self, prompt: str, max_tokens: int, on_token: Callable[[str], None],
                 cancelled: Callable[[], bool], temperature: float = 0.0, seed: int = 0) -> GenerationStats:
        self.order.append(prompt)
        if prompt == "crash":
            raise EngineError("the engine crashed (killed by signal SIGKILL)")
        stats = GenerationStats(tokens_in=len(prompt), stop="eos")
        for ch in prompt[::-1][:max_tokens]:
            self.gate.wait(5)
            if cancelled():
                stats.stop = "cancelled"
                break
            on_token(ch)
            stats.text += ch
            stats.tokens_out += 1
            time.sleep(0.002)
        return stats


class Rows:
    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = []

    def record_request(self, row: dict[str, object]) -> None:
        self.rows.append(row)


@pytest.fixture
def setup() -> tuple[ScriptedEngine, Rows, Scheduler]:
    eng, rows = ScriptedEngine(), Rows()
    s = Scheduler(eng, rows, queue_size=3)
    s.start()
    yield eng, rows, s
    eng.gate.set()
    s.stop()


def test_answers_stream_and_are_recorded(setup: tuple[ScriptedEngine, Rows, Scheduler]) -> None:
    _eng, rows, s = setup
    got: list[str] = []
    req = s.submit(Request("abc", on_token=got.append))
    res = req.wait(5)
    assert res is not None and res.outcome == "ok" and res.text == "cba" and got == ["c", "b", "a"]
    assert rows.rows[-1]["answer"] == "cba" and rows.rows[-1]["outcome"] == "ok"


def test_interactive_goes_before_background_and_fifo_within_a_class(
    setup: tuple[ScriptedEngine, Rows, Scheduler],
) -> None:
    eng, _rows, s = setup
    eng.gate.clear()
    first = s.submit(Request("first", priority="background"))
    time.sleep(0.1)  # "first" is running, held at the gate
    b2 = s.submit(Request("b2", priority="background"))
    i1 = s.submit(Request("i1"))
    i2 = s.submit(Request("i2"))
    eng.gate.set()
    for r in (first, b2, i1, i2):
        assert r.wait(5) is not None
    assert eng.order == ["first", "i1", "i2", "b2"]


def test_a_full_queue_refuses_at_once_with_a_reason(setup: tuple[ScriptedEngine, Rows, Scheduler]) -> None:
    eng, rows, s = setup
    eng.gate.clear()
    s.submit(Request("running"))
    time.sleep(0.1)
    for i in range(3):
        s.submit(Request(f"q{i}"))
    done: list[Result] = []
    with pytest.raises(Refused, match="queue is full"):
        s.submit(Request("one too many", on_done=done.append))
    assert done and done[0].outcome == "refused"
    assert rows.rows[-1]["outcome"] == "refused"


def test_cancel_mid_stream_and_while_queued(setup: tuple[ScriptedEngine, Rows, Scheduler]) -> None:
    eng, _rows, s = setup
    eng.gate.clear()
    running = s.submit(Request("abcdefgh"))
    queued = s.submit(Request("later"))
    time.sleep(0.1)
    running.cancel()
    queued.cancel()
    eng.gate.set()
    r1, r2 = running.wait(5), queued.wait(5)
    assert r1 is not None and r1.outcome == "cancelled" and len(r1.text) < 8
    assert r2 is not None and r2.outcome == "cancelled" and "later" not in eng.order


def test_an_engine_error_becomes_a_clear_error_and_the_next_request_runs(
    setup: tuple[ScriptedEngine, Rows, Scheduler],
) -> None:
    _eng, _rows, s = setup
    bad = s.submit(Request("crash")).wait(5)
    assert bad is not None and bad.outcome == "error" and "SIGKILL" in bad.error
    good = s.submit(Request("ok")).wait(5)
    assert good is not None and good.text == "ko"
