"""The governor in the real supervisor: memory estimate against measured RSS, the memory budget at load, a hot
board (a fake thermal zone), and no OOM under real memory pressure in a memory-limited cgroup."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.memory import CACHE_MODELS, TOLERANCE
from bench.models import measure
from llmos_edge.models import MIB
from tests.fake_sysfs import write_zone
from tests.integration.conftest import MODEL, REPO, Appliance

GGUF_PYTHON = CACHE_MODELS.parent / "gguf-venv" / "bin" / "python"


def speed_model(params: str) -> Path:
    """A random-weight speed model (model/speed.py), built once into the cache."""
    path = CACHE_MODELS / f"speed-{params.lower()}-q4_k_m.gguf"
    if not path.exists():
        if not GGUF_PYTHON.exists():
            pytest.fail(f"{path} is missing and so is {GGUF_PYTHON}; `make speed-model` sets it up")
        subprocess.run(
            [str(GGUF_PYTHON), str(REPO / "model" / "speed.py"), str(path), "--params", params],
            check=True,
            capture_output=True,
        )
    return path


@pytest.mark.parametrize("model", ["default", "25M", "50M"])
def test_memory_estimate_is_within_15_percent_of_measured_rss(model: str) -> None:
    path = MODEL if model == "default" else speed_model(model)
    if not path.exists():
        pytest.fail(f"{path} is missing; `make model` builds it")
    run = measure(path, 512)
    assert abs(run.error) <= TOLERANCE, (
        f"{path.name}: estimate {run.estimate.total / MIB:.1f} MiB ({run.estimate.describe()}), "
        f"measured {run.peak_rss / MIB:.1f} MiB"
    )
    assert run.stats.tokens_in > 256  # the prompt really filled most of the context


def events(app: Appliance, kind: str = "governor") -> list[tuple[str, dict[str, object]]]:
    db = sqlite3.connect(app.db)
    rows = db.execute("SELECT message, data FROM events WHERE kind = ? ORDER BY id", [kind]).fetchall()
    return [(m, json.loads(d)) for m, d in rows]


def governor(root: Path, extra: str = "") -> str:
    return f"governor:\n  sensors_root: {root}\n  interval: 0.2\n{extra}"


def test_a_hot_board_refuses_requests_until_it_cools(appliance_factory: type[Appliance], tmp_path: Path) -> None:
    root = tmp_path / "sys-root"
    write_zone(root, 60.0)
    app = appliance_factory(config=governor(root))
    app.wait_ready()
    app.console.read_until(b"llmos> ", 10)
    status = app.console.status()
    assert status["thermal"].startswith("cpu-thermal 60.0 C, setpoint 75 C, critical 85 C")
    assert "ctx" in status["memory budget"]

    write_zone(root, 91.0)
    time.sleep(1.0)
    answer = app.console.ask("hello")
    assert "refused: the board is too hot (91.0 °C, limit 85 °C)" in answer and "below 80" in answer
    assert "critical" in app.console.status()["thermal"]

    write_zone(root, 82.0)  # below critical, but inside the hysteresis band: still refused
    time.sleep(1.0)
    assert "too hot" in app.console.ask("hello")

    write_zone(root, 70.0)
    time.sleep(1.0)
    answer = app.console.ask("hello")
    assert "refused" not in answer and answer
    actions = [d["action"] for _, d in events(app)]
    assert actions.index("critical_stop") < actions.index("resume")
    app.notify.poll()
    assert any(m.startswith("STATUS=") and "C" in m for m in app.notify.messages)


def test_no_thermal_sensor_is_a_status_not_an_error(appliance_factory: type[Appliance], tmp_path: Path) -> None:
    app = appliance_factory(config=governor(tmp_path / "empty-root"))
    app.wait_ready()
    app.console.read_until(b"llmos> ", 10)
    status = app.console.status()
    assert status["thermal"] == "no thermal sensor (not throttling)"
    assert status["temperature"] == "no thermal sensor"
    assert app.console.ask("hello")


def test_a_small_budget_loads_a_smaller_context(appliance_factory: type[Appliance], tmp_path: Path) -> None:
    from llmos_edge.models import estimate_memory, read_gguf

    info = read_gguf(MODEL)
    budget = (estimate_memory(info, 512).total + estimate_memory(info, 768).total) // 2 // MIB
    app = appliance_factory(
        config=governor(tmp_path / "r", f"  memory_budget_mb: {budget}\n"),
        override=f"model:\n  context: 2048\n  path: {MODEL}\n  threads: 2\n",
    )
    app.wait_ready()
    app.console.read_until(b"llmos> ", 10)
    assert "ctx 512," in app.console.status()["engine"]
    msgs = [m for m, d in events(app) if d["action"] == "preflight"]
    assert msgs and "context 2048 does not fit" in msgs[0] and "loading with 512" in msgs[0]
    assert app.console.ask("hello")


def test_a_model_that_cannot_fit_is_refused_in_one_sentence(appliance_factory: type[Appliance], tmp_path: Path) -> None:
    app = appliance_factory(config=governor(tmp_path / "r", "  memory_budget_mb: 20\n"))
    app.wait_ready()  # READY=1 in a failed state: the console explains instead of a restart loop
    app.console.read_until(b"llmos> ", 10)
    state = app.console.status()["state"]
    assert "failed" in state and "needs" in state and "budget is 20 MiB" in state
    assert "smaller quantization" in state
    assert "refuse_load" in [d["action"] for _, d in events(app)]


# -- real memory pressure ---------------------------------------------------------------------------------------

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


@pytest.fixture
def memory_cgroup(tmp_path: Path) -> Iterator[Path]:
    """A memory cgroup limited to 600 MiB (v1 or v2), or skip where we may not make one."""
    limit = 600 * MIB
    if (CGROUP_V1 / "cgroup.procs").exists():
        d, limit_file = CGROUP_V1 / f"llmos-test-{os.getpid()}", "memory.limit_in_bytes"
    elif "memory" in _read(CGROUP_V2 / "cgroup.subtree_control"):
        d, limit_file = CGROUP_V2 / f"llmos-test-{os.getpid()}", "memory.max"
    else:
        pytest.skip("no memory cgroup controller here")
    try:
        d.mkdir()
        (d / limit_file).write_text(str(limit))
    except OSError as e:
        pytest.skip(f"cannot create a memory cgroup ({e}); run as root on a machine with cgroups")
    yield d
    for pid in (d / "cgroup.procs").read_text().split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    d.rmdir()


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


HOG = """
import sys, time
chunks = []
target = int(sys.argv[1]) * 2**20
while True:
    line = sys.stdin.readline()
    if not line:
        break
    target = int(line) * 2**20
    while sum(len(c) for c in chunks) < target:
        chunks.append(bytearray(16 * 2**20))  # bytearray zero-fills: the pages are really used
    while chunks and sum(len(c) for c in chunks) > target:
        chunks.pop()
    print("ok", flush=True)
"""


def cgroup_room_mib(d: Path) -> int:
    """What the cgroup still has room for (its limit less its usage, reclaimable cache not counted), in MiB."""
    from llmos_edge.sensors import _active

    v1 = (d / "memory.usage_in_bytes").exists()
    limit = int(_read(d / ("memory.limit_in_bytes" if v1 else "memory.max")))
    usage = int(_read(d / ("memory.usage_in_bytes" if v1 else "memory.current")))
    active = _active(usage, d, "total_inactive_file" if v1 else "inactive_file") or usage
    return (limit - active) // MIB


def grow(hog: subprocess.Popen[str], mib: int) -> None:
    assert hog.stdin is not None and hog.stdout is not None
    hog.stdin.write(f"{mib}\n")
    hog.stdin.flush()
    assert hog.stdout.readline().strip() == "ok", f"the hog was killed growing to {mib} MiB"


def test_no_oom_under_memory_pressure(appliance_factory: type[Appliance], tmp_path: Path, memory_cgroup: Path) -> None:
    """The appliance and a memory hog share a 600 MiB cgroup. As the hog grows, the governor sheds work and then
    unloads the model before the kernel has to kill anything; requests get answers or clear refusals; when the hog
    lets go, the model comes back."""
    app = appliance_factory(
        config=governor(tmp_path / "r", "  min_available_mb: 120\n  calm: 2.0\n  memory_reserve_mb: 64\n"),
    )
    (memory_cgroup / "cgroup.procs").write_text(str(app.proc.pid))  # before it starts the worker
    app.wait_ready()
    app.console.read_until(b"llmos> ", 10)
    worker = app.engine_pid()
    procs = (memory_cgroup / "cgroup.procs").read_text().split()
    assert str(app.proc.pid) in procs and str(worker) in procs
    assert app.console.ask("hello")

    hog = subprocess.Popen([sys.executable, "-c", HOG, "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    (memory_cgroup / "cgroup.procs").write_text(str(hog.pid))
    answers = []
    hog_mib = 0
    try:
        # Grow the hog until the room left in the cgroup is 200, 150, 100 and 40 MiB (the governor's floor is 120
        # and its unload point 60), asking a question at each step.
        for room in (200, 150, 100, 40):
            hog_mib += max(0, cgroup_room_mib(memory_cgroup) - room)
            grow(hog, hog_mib)
            time.sleep(1.5)
            answers.append(app.console.ask("hello", timeout=60))
        status = app.console.status()
        assert "unloaded" in status["state"], status
        # Now the hog takes what the unload freed, leaving 20 MiB: had the worker stayed, the cgroup would be over
        # its limit and the kernel would have to kill something.
        time.sleep(1.0)
        freed = cgroup_room_mib(memory_cgroup) - 40
        # The worker's own memory (its page cache of the model and libraries stays cached, and inactive file pages
        # are not counted as used): 18-25 MiB here with the tiny model.
        assert freed > 10, f"unloading freed only {freed} MiB"
        hog_mib += freed + 20
        grow(hog, hog_mib)
        time.sleep(1.0)
        refusal = app.console.ask("hello")
        assert "refused: the model is unloaded because memory is short" in refusal
        # Let go: the governor steps back after `calm` seconds and the model reloads.
        grow(hog, 0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "ready" not in app.console.status()["state"]:
            time.sleep(1)
        assert "ready" in app.console.status()["state"]
        assert "refused" not in app.console.ask("hello")
    finally:
        hog.kill()
    assert app.proc.poll() is None, "the supervisor died"
    for a in answers:  # every request got an answer or a clear reason, never silence
        assert a and ("refused" in a or "error" not in a), answers
    actions = [d["action"] for _, d in events(app)]
    assert "unload" in actions and "memory_step_back" in actions
    assert actions.index("shed_background") < actions.index("unload")
    restarts = events(app, "engine_restart")
    assert not restarts, f"the worker was killed, not unloaded: {restarts}"
    log_text = app.output()
    assert "SIGKILL" not in log_text, log_text[-2000:]


def test_a_board_that_boots_hot_waits_to_cool_before_its_self_test(
    appliance_factory: type[Appliance], tmp_path: Path
) -> None:
    root = tmp_path / "sys-root"
    write_zone(root, 92.0)
    app = appliance_factory(config=governor(root))
    # Not ready while hot: systemd is asked for more time instead, and the console says why.
    app.notify.wait_for("EXTEND_TIMEOUT_USEC=", 60)
    app.console.read_until(b"llmos> ", 10)
    status = app.console.status()
    assert status["state"] == "starting" and status["self-test"] == "waiting for the board to cool", status
    assert "refused: the board is too hot (92.0 °C" in app.console.ask("hello")
    app.notify.poll()
    assert "READY=1" not in app.notify.messages
    write_zone(root, 70.0)
    app.wait_ready()
    assert app.console.status()["self-test"].startswith("passed"), app.console.status()
    kinds = [k for (k,) in sqlite3.connect(app.db).execute("SELECT kind FROM events ORDER BY id")]
    assert kinds.index("self_test_waiting") < kinds.index("ready")
