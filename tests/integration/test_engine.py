"""The engine worker with the real model: streaming, cancel, preemption with exact resume, actuators."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.thermal_sim import CpuProbe
from llmos_edge.engine import Engine, EngineSettings
from tests.integration.conftest import MODEL

SPEED_MODEL = Path(
    os.environ.get("LLMOS_SPEED_MODEL", Path.home() / ".cache" / "llmos-edge" / "models" / "speed-50m-q4_k_m.gguf")
)


@pytest.fixture
def engine() -> Iterator[Engine]:
    e = Engine(EngineSettings(str(MODEL), n_ctx=512, n_threads=2))
    e.start()
    yield e
    e.stop()


def run(e: Engine, prompt: str, job: int, max_tokens: int = 64, stop_after: int = 0, resume: bool = False) -> str:
    got: list[str] = []
    stats = e.generate(
        prompt,
        max_tokens,
        got.append,
        lambda: False,
        job=job,
        resume=resume,
        preempt=lambda: bool(stop_after) and len("".join(got)) >= stop_after,
    )
    assert "".join(got) == stats.text[len(stats.text) - len("".join(got)) :]
    return "".join(got) + ("|" if stats.stop == "preempted" else "")


def test_preempted_generation_resumes_exactly(engine: Engine) -> None:
    whole = run(engine, "reverse abcdefghij", job=1)
    assert whole == "jihgfedcba"
    engine.set_limits(duty=0.1)  # slow enough that the preemption lands mid-answer, not after it
    first = run(engine, "reverse abcdefghij", job=2, stop_after=1)
    engine.set_limits(duty=1.0)
    assert first.endswith("|") and 1 <= len(first) - 1 < len(whole)
    assert run(engine, "ping", job=3) == "pong"  # another request runs on the same context meanwhile
    rest = run(engine, "reverse abcdefghij", job=2, resume=True)
    assert first[:-1] + rest == whole


def test_preempt_from_another_thread_stops_the_job_at_once_and_it_resumes_exactly(engine: Engine) -> None:
    # The scheduler's path: it calls preempt(job) when an interactive request arrives; the `preempt` callable that
    # generate() polls never says yes here, so only preempt() can have stopped it.
    whole = run(engine, "reverse abcdefghij", job=1)
    engine.set_limits(duty=0.1)
    first_token = threading.Event()
    asker = threading.Thread(target=lambda: first_token.wait(10) and engine.preempt(2))
    asker.start()
    got: list[str] = []
    stats = engine.generate(
        "reverse abcdefghij", 64, lambda t: (got.append(t), first_token.set()), lambda: False, job=2
    )
    asker.join()
    engine.set_limits(duty=1.0)
    assert stats.stop == "preempted" and 1 <= len(stats.text) < len(whole)
    engine.preempt(2)  # no longer running: nothing is sent, the resume below is not cut short
    rest = run(engine, "reverse abcdefghij", job=2, resume=True)
    assert stats.text + rest == whole


@pytest.mark.skipif(not SPEED_MODEL.exists(), reason="make speed-model builds it (the integration target does)")
def test_long_generation_resumes_exactly_after_two_preemptions() -> None:
    e = Engine(EngineSettings(str(SPEED_MODEL), n_ctx=512, n_threads=2))
    e.start()
    try:
        whole = run(e, "reverse benchmark", job=1, max_tokens=200)
        a = run(e, "reverse benchmark", job=2, max_tokens=200, stop_after=40)
        run(e, "hello", job=3, max_tokens=20)
        b = run(e, "reverse benchmark", job=2, resume=True, stop_after=50)
        run(e, "other", job=4, max_tokens=20)
        c = run(e, "reverse benchmark", job=2, resume=True)
        assert a.endswith("|") and b.endswith("|")
        assert a[:-1] + b[:-1] + c == whole and len(whole) > 100
    finally:
        e.stop()


def test_resuming_a_job_the_worker_lost_is_a_clear_error(engine: Engine) -> None:
    from llmos_edge.engine import EngineError

    with pytest.raises(EngineError, match="paused generation was lost"):
        run(engine, "reverse abc", job=9, resume=True)
    assert run(engine, "ping", job=10) == "pong"


def test_duty_cycle_and_threads_keep_the_answer_the_same(engine: Engine) -> None:
    engine.set_limits(threads=1, duty=0.3)
    assert run(engine, "reverse stone", job=1) == "enots"
    engine.set_limits(threads=2, duty=1.0)
    assert run(engine, "reverse stone", job=2) == "enots"


@pytest.mark.skipif(not SPEED_MODEL.exists(), reason="make speed-model builds it (the integration target does)")
def test_pacing_rests_the_cpu_and_the_token_count_is_exact() -> None:
    """Duty 0.25 on two threads must cost about a quarter of the CPU: OpenMP threads that spin through the rests
    (libgomp's default) used well over half of it. CPU time, not wall time, so a busy machine changes little."""
    e = Engine(EngineSettings(str(SPEED_MODEL), n_ctx=512, n_threads=2))
    e.start()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            e.generate("the quick brown fox", 200, lambda _t: None, stop.is_set)

    t = threading.Thread(target=work, daemon=True)
    try:
        probe = CpuProbe(lambda: e.pid, 1.0)
        t.start()
        cpu = {}
        for duty in (1.0, 0.25):
            e.set_limits(threads=2, duty=duty)
            time.sleep(0.5)
            probe.sample_cores()
            time.sleep(3.0)
            cpu[duty] = probe.sample_cores()[0]
        print("worker CPU use (cores) by duty:", cpu)
        assert cpu[0.25] < 0.45 * cpu[1.0], cpu
    finally:
        stop.set()
        t.join(30)
    # The coalesced stream still counts every token: a whole answer of known length.
    before = e.tokens_total
    stats = e.generate("the quick brown fox", 50, lambda _t: None, lambda: False)
    assert e.tokens_total - before == stats.tokens_out
    e.stop()


def test_a_prestarted_worker_is_the_one_that_loads_the_model() -> None:
    """`llmos run` starts the worker before it imports the supervisor (boot time): the first start hands that very
    process its model, and a worker nobody took is closed."""
    from llmos_edge import engine as engine_mod

    # A CPU variant that dies with SIGILL here (a host that advertises instructions it cannot run) would take the
    # prestarted worker with it, rightly; learn this machine's exclusions first, as the supervisor's first start does.
    probe = Engine(EngineSettings(str(MODEL), n_ctx=512, n_threads=2))
    try:
        probe.start()
    finally:
        probe.stop()
    engine_mod.prestart_worker()
    spare = engine_mod._spare
    assert spare is not None
    e = Engine(EngineSettings(str(MODEL), n_ctx=512, n_threads=2, exclude_cpu=tuple(probe.bad_cpu)))
    try:
        info = e.start()
        assert info.pid == spare[0].pid and engine_mod._spare is None
        assert run(e, "ping", job=1) == "pong"
    finally:
        e.stop()
    engine_mod.prestart_worker()
    unused = engine_mod._spare
    assert unused is not None
    engine_mod.discard_prestarted()
    assert unused[0].poll() is not None and engine_mod._spare is None
