"""Scheduler ordering and refusal, with a scripted engine (the engine is not the thing under test here)."""

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from llmos_edge.engine import EngineError, GenerationStats
from llmos_edge.scheduler import Refused, Request, Result, Scheduler


class ScriptedEngine:
    """Answers each prompt with its reversed text, one character per token; can be held at a gate; keeps the
    progress of a preempted job so that it resumes where it stopped."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.order: list[str] = []
        self.paused: dict[int, GenerationStats] = {}
        self.discarded: list[int] = []
        self.temperatures: list[float] = []
        self.preempt_calls: list[int] = []

    def generate(
        self,
        prompt: str,
        max_tokens: int,
        on_token: Callable[[str], None],
        cancelled: Callable[[], bool],
        temperature: float = 0.0,
        seed: int = 0,
        *,
        job: int = 0,
        resume: bool = False,
        preempt: Callable[[], bool] = lambda: False,
        messages: Sequence[Mapping[str, str]] = (),
        raw: bool = False,
    ) -> GenerationStats:
        self.order.append(prompt + (" (resumed)" if resume else ""))
        self.temperatures.append(temperature)
        if prompt == "crash":
            raise EngineError("the engine crashed (killed by signal SIGKILL)")
        stats = self.paused.pop(job) if resume else GenerationStats(tokens_in=len(prompt), stop="eos")
        for ch in prompt[::-1][stats.tokens_out : max_tokens]:
            if preempt():
                self.paused[job] = stats
                return GenerationStats(tokens_out=stats.tokens_out, stop="preempted", text=stats.text)
            self.gate.wait(5)
            if cancelled():
                stats.stop = "cancelled"
                break
            on_token(ch)
            stats.text += ch
            stats.tokens_out += 1
            time.sleep(0.002)
        else:
            stats.stop = "eos"
        return stats

    def discard(self, job: int) -> None:
        self.discarded.append(job)

    def preempt(self, job: int) -> None:
        self.preempt_calls.append(job)


class Rows:
    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = []

    def record_request(self, row: dict[str, Any], also: Sequence[tuple[str, dict[str, Any]]] = ()) -> None:
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
    # "first" is paused for the interactive ones, then resumes before any other background work
    assert eng.order == ["first", "i1", "i2", "first (resumed)", "b2"]
    assert first.result is not None and first.result.text == "tsrif" and first.preemptions == 1


def test_an_interactive_request_asks_the_engine_to_preempt_at_once(
    setup: tuple[ScriptedEngine, Rows, Scheduler],
) -> None:
    # The engine's own poll of `preempt` may be 50 ms away; the interactive request's first token must not wait.
    eng, _rows, s = setup
    eng.gate.clear()
    bg = s.submit(Request("background", priority="background"))
    time.sleep(0.1)  # running, held at the gate: the engine polls nothing meanwhile
    assert eng.preempt_calls == []
    s.submit(Request("now"))
    assert eng.preempt_calls == [bg.id]
    eng.gate.set()
    assert bg.wait(5) is not None


def test_an_aged_or_interactive_request_is_not_preempted(setup: tuple[ScriptedEngine, Rows, Scheduler]) -> None:
    eng, _rows, s = setup
    eng.gate.clear()
    first = s.submit(Request("first"))
    time.sleep(0.1)
    s.submit(Request("second"))
    eng.gate.set()
    assert first.wait(5) is not None
    assert eng.preempt_calls == []


def test_a_preempted_request_streams_every_token_once_in_order() -> None:
    eng, rows = ScriptedEngine(), Rows()
    s = Scheduler(eng, rows)
    s.start()
    got: list[str] = []
    eng.gate.clear()
    bg = s.submit(Request("abcdefgh", priority="background", on_token=got.append))
    time.sleep(0.1)
    s.submit(Request("xy"))
    eng.gate.set()
    res = bg.wait(5)
    s.stop()
    assert res is not None and res.text == "hgfedcba" and "".join(got) == "hgfedcba"
    assert rows.rows[-1]["preemptions"] == 1


def test_aged_background_work_goes_first_and_is_not_preempted() -> None:
    eng, rows = ScriptedEngine(), Rows()
    s = Scheduler(eng, rows, aging_s=0.2)
    eng.gate.clear()
    s.start()
    s.submit(Request("running"))
    time.sleep(0.1)
    old = s.submit(Request("old", priority="background"))
    time.sleep(0.3)  # "old" is now past the aging limit
    s.submit(Request("new"))
    eng.gate.set()
    assert old.wait(5) is not None
    s.stop()
    assert eng.order[:3] == ["running", "old", "new"] and old.preemptions == 0


def test_a_request_past_its_deadline_is_answered_busy_with_a_retry_hint() -> None:
    eng, rows = ScriptedEngine(), Rows()
    s = Scheduler(eng, rows, deadlines={"interactive": 0.3, "background": 100})
    eng.gate.clear()
    s.start()
    s.submit(Request("long running job"))
    time.sleep(0.05)
    late = s.submit(Request("late"))
    res = late.wait(3)
    eng.gate.set()
    s.stop()
    assert res is not None and res.outcome == "refused"
    assert res.error.startswith("busy: waited 0.") and "(deadline 0.3 s); try again in " in res.error
    assert "late" not in eng.order


def test_cancelling_a_paused_request_discards_its_saved_state() -> None:
    eng, rows = ScriptedEngine(), Rows()
    s = Scheduler(eng, rows)
    s.start()
    bg = s.submit(Request("b" * 2000, priority="background"))
    time.sleep(0.1)
    eng.gate.clear()  # hold the interactive request once it runs, so bg stays paused meanwhile
    s.submit(Request("xy"))
    time.sleep(0.1)
    bg.cancel()
    eng.gate.set()
    res = bg.wait(5)
    s.stop()
    assert res is not None and res.outcome == "cancelled" and eng.discarded == [bg.id]


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


def test_a_request_s_temperature_overrides_the_default() -> None:
    eng, rows = ScriptedEngine(), Rows()
    s = Scheduler(eng, rows, temperature=0.3)
    s.start()
    try:
        s.submit(Request(prompt="default")).wait(5)
        s.submit(Request(prompt="own", temperature=1.2)).wait(5)
        s.submit(Request(prompt="zero", temperature=0.0)).wait(5)
    finally:
        s.stop()
    assert eng.temperatures == [0.3, 1.2, 0.0]


def test_a_prepared_answer_skips_the_engine_and_is_recorded_and_a_failing_prepare_costs_nothing() -> None:
    eng, rows = ScriptedEngine(), Rows()

    def prepare(req: Request) -> str | None:
        if req.prompt == "taught":
            req.taught_id = 7
            return "from the pair"
        if req.prompt == "boom":
            raise RuntimeError("the database went away")
        req.recalled = (1, 2)
        return None

    s = Scheduler(eng, rows, prepare=prepare)
    s.start()
    try:
        got: list[str] = []
        res = s.submit(Request("taught", on_token=got.append)).wait(5)
        assert res is not None and res.outcome == "ok" and res.text == "from the pair" and got == ["from the pair"]
        assert res.stats.tokens_out == 0 and eng.order == []  # the engine never saw it
        assert rows.rows[-1]["taught_id"] == 7 and rows.rows[-1]["answer"] == "from the pair"
        res = s.submit(Request("boom")).wait(5)
        assert res is not None and res.outcome == "ok" and res.text == "moob"
        res = s.submit(Request("abc")).wait(5)
        assert res is not None and res.text == "cba" and rows.rows[-1]["recalled"] == "1,2"
        assert rows.rows[-1]["taught_id"] is None
    finally:
        s.stop()
