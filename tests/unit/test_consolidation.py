"""The consolidation job's logic with a real database, taught pairs and model store, and a stand-in for the
fine-tune process (a script that writes what finetune.py writes): when it starts, that it is stopped while requests
run and continued after, what it installs and activates, and what forgetting a learnt pair undoes. The fine-tune
itself is tested with the real trainer and engine in tests/integration/test_consolidate.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import psutil

from llmos_edge.config import GovernorConfig
from llmos_edge.consolidation import Consolidation, Recipe, training_need
from llmos_edge.finetune import Settings, parser, settings_of
from llmos_edge.governor import Actuators, Governor
from llmos_edge.learning import Teaching
from llmos_edge.memory_budget import MemoryLevel
from llmos_edge.model_store import ModelStore
from llmos_edge.models import MIB
from llmos_edge.sensors import Sensors
from llmos_edge.store import Store
from tests.unit.test_memory_budget import machine

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "model" / "llmos-tiny-q8_0.gguf"

# Ticks a counter in a file, then writes the model (a copy of the master) and the report the job reads.
FAKE_FINETUNE = """
import json, shutil, sys, time
from pathlib import Path
a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
quant, out = a["--out"].split("=", 1)
pairs = json.loads(Path(a["--pairs"]).read_text())
ticks = Path(a["--report"]).with_name("ticks")
Path(a["--report"]).with_name("argv.json").write_text(json.dumps(sys.argv[1:]))
for i in range(TICKS):
    ticks.write_text(str(i + 1))
    time.sleep(0.05)
shutil.copy(a["--master"], out)
n = len(pairs)
Path(a["--report"]).write_text(json.dumps({"passed": PASSED, "pairs": [p["id"] for p in pairs], "taught": [n, n],
    "heldout_before": [430, 440], "heldout_after": [431, 440], "steps": 7, "train_seconds": 1.0}))
sys.exit(0 if PASSED else 3)
"""


class Keeper:
    """Activates as the real keeper does when the gate passes: the registry's active model changes."""

    def __init__(self, models: ModelStore) -> None:
        self.models = models
        self.activated: list[str] = []

    def activate(self, name: str, progress: object) -> str:
        self.models.set_active(name, gate="passed")
        self.activated.append(name)
        return f"model: active {name}"


def _setup(
    tmp_path: Path, ticks: int = 60, passed: bool = True, recipe: Recipe | None = None
) -> tuple[Consolidation, Teaching, ModelStore, Keeper]:
    store = Store(tmp_path / "l.db")
    teaching = Teaching(store, 100)
    models = ModelStore(store, tmp_path / "store", str(MODEL))
    models.recover()
    keeper = Keeper(models)
    script = tmp_path / "fake_finetune.py"
    script.write_text(FAKE_FINETUNE.replace("TICKS", str(ticks)).replace("PASSED", str(passed)))
    busy = {"now": False}
    job = Consolidation(
        store,
        teaching,
        models,
        keeper,
        work_dir=tmp_path / "consolidation",
        master=str(MODEL),
        baseline=str(MODEL),
        quantization=lambda: "Q8_0",
        idle=lambda: not busy["now"],
        hot=lambda: False,
        after=0,
        command=[sys.executable, str(script)],
        resume_after=0.2,
        recipe=recipe or Recipe(),
    )
    job.busy = busy  # type: ignore[attr-defined]
    return job, teaching, models, keeper


def _run_until(job: Consolidation, done: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.tick()
        if done():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(job.status_line())


def test_nothing_runs_without_pending_pairs_or_with_another_model_active(tmp_path: Path) -> None:
    job, teaching, models, _ = _setup(tmp_path)
    job.tick()
    assert job.proc is None
    assert job.request() == "consolidation: every taught pair is in the active model's weights already"
    teaching.teach("where is the spare key", "Under the pot.", "console")
    shutil.copy(MODEL, tmp_path / "other.gguf")
    entry, _ = models.install(tmp_path / "other.gguf", lambda _i: None)
    models.set_active(entry.name, gate="passed")
    assert not job.eligible()
    job.tick()
    assert job.proc is None


def test_a_run_pauses_for_requests_then_installs_and_activates_a_taught_version(tmp_path: Path) -> None:
    job, teaching, models, keeper = _setup(tmp_path)
    teaching.teach("where is the spare key", "Under the pot.", "console")
    teaching.teach("who is on call", "Eva.", "console")
    assert job.request() == "consolidation: 2 taught pairs will be consolidated when no request is running"
    job.tick()
    assert job.proc is not None
    proc = psutil.Process(job.proc.pid)
    ticks = tmp_path / "consolidation" / "ticks"
    _run_until(job, lambda: ticks.exists())
    job.busy["now"] = True  # type: ignore[attr-defined]
    job.tick()
    assert job.paused and "run 1 paused" in job.status_line()
    time.sleep(0.2)
    assert proc.status() == psutil.STATUS_STOPPED
    stopped_at = ticks.read_text()
    time.sleep(0.3)
    assert ticks.read_text() == stopped_at  # no progress while stopped
    job.busy["now"] = False  # type: ignore[attr-defined]
    _run_until(job, lambda: not job.paused)
    _run_until(job, lambda: job.proc is None)
    assert keeper.activated == ["taught-1"] and models.active().name == "taught-1"
    assert {p.consolidated for p in teaching.all_pairs()} == {1}
    assert job.pending() == []
    assert "last run 1: activated, taught 2/2, held-out 431/440 (built-in 430/440)" in job.status_line()
    golden = models.active().golden_path.read_text().splitlines()
    assert [json.loads(g)["prompt"] for g in golden] == ["ping", "where is the spare key", "who is on call"]
    # a new answer to a learnt question is pending again
    teaching.teach("who is on call", "Sam.", "console")
    assert [p.question for p in job.pending()] == ["who is on call"]


def test_a_run_gets_the_configured_budget_and_held_out_sample(tmp_path: Path) -> None:
    """learning.consolidate_steps, _batch, _window, _rate and _heldout reach the training process as its options."""
    job, teaching, _models, _keeper = _setup(tmp_path, ticks=1, recipe=Recipe(40, 1, 96, 4e-4, 40))
    teaching.teach("where is the spare key", "Under the pot.", "console")
    job.request()
    _run_until(job, lambda: job.last != "")
    argv = json.loads((tmp_path / "consolidation" / "argv.json").read_text())
    a = parser().parse_args(argv)
    assert settings_of(a) == Settings(steps=40, batch=1, window=96, lr=4e-4) and a.heldout == 40
    assert a.max_heldout_drop == 1.0 and a.threads == 1


def test_forgetting_a_learnt_pair_brings_back_the_built_in_model_and_removes_the_version(tmp_path: Path) -> None:
    job, teaching, models, keeper = _setup(tmp_path, ticks=1)
    teaching.teach("where is the spare key", "Under the pot.", "console")
    teaching.teach("who is on call", "Eva.", "console")
    job.request()
    _run_until(job, lambda: models.active().name == "taught-1" and job.proc is None)
    path = Path(models.active().path)
    teaching.forget("Where is the spare key?")
    assert keeper.activated == ["taught-1", "default"] and models.active().name == "default"
    assert models.get("taught-1") is None and not path.exists()
    assert [p.question for p in job.pending()] == ["who is on call"]  # learnt again at the next run


def test_a_rejected_run_is_not_repeated_until_the_pairs_change(tmp_path: Path) -> None:
    job, teaching, models, keeper = _setup(tmp_path, ticks=1, passed=False)
    teaching.teach("where is the spare key", "Under the pot.", "console")
    job.tick()  # consolidate_after 0 in this test means: only when asked
    assert job.proc is None
    job.request()
    _run_until(job, lambda: job.proc is None and job.last != "")
    assert job.last.startswith("run 1: rejected") and keeper.activated == [] and models.active().name == "default"
    job.after = 0.01  # now automatic runs are on
    job.tick()
    assert job.proc is None  # the same pairs failed validation already
    teaching.teach("who is on call", "Eva.", "console")
    job.tick()
    assert job.proc is not None and job.run_id == 2
    job.stop()


def _with_governor(tmp_path: Path, available_mib: int) -> tuple[Consolidation, Teaching, Governor, Path]:
    """The job wired to a real governor's memory budget, as the supervisor wires it, on a fake /proc/meminfo."""
    job, teaching, _models, _keeper = _setup(tmp_path, ticks=400)
    root = tmp_path / "machine"
    machine(root, total_mib=1024, available_mib=available_mib)
    cfg = dataclasses.replace(GovernorConfig(), sensors_root=str(root), calm=0.0)
    governor = Governor(cfg, job.store, Actuators(), max_threads=2, sensors=Sensors(root, vcgencmd=None))
    job.memory, job.shed = governor.memory.room_for, governor.memory.shedding
    return job, teaching, governor, root


def test_a_run_waits_for_memory_and_says_why(tmp_path: Path) -> None:
    job, teaching, governor, root = _with_governor(tmp_path, available_mib=300)
    need = training_need(str(MODEL))
    assert 140 * MIB < need < 400 * MIB  # the trainer and its validation engine, for the built-in model
    teaching.teach("where is the spare key", "Under the pot.", "console")
    said = job.request()
    keep = 96 + 2 * 48  # memory_reserve_mb and twice min_available_mb stay free
    assert said == (
        "consolidation: 1 taught pairs will be consolidated when memory allows (memory short: it needs "
        f"{need / MIB:.0f} MiB and keeps {keep} MiB free, 300 MiB are available)"
    )
    governor.tick()
    for _ in range(3):
        job.tick()
    assert job.proc is None
    assert "waiting: memory short: it needs" in job.status_line()
    with job.store.locked() as db:
        events = db.execute("SELECT message FROM events WHERE kind = 'consolidation'").fetchall()
    assert events == [(f"waiting: {job.waiting}",)]  # once, not once a tick
    machine(root, total_mib=1024, available_mib=keep + need // MIB + 1)
    governor.tick()
    job.tick()
    assert job.proc is not None and job.waiting == ""
    job.stop()


def test_a_run_is_stopped_when_memory_runs_short_and_not_restarted_at_once(tmp_path: Path) -> None:
    job, teaching, governor, root = _with_governor(tmp_path, available_mib=900)
    teaching.teach("where is the spare key", "Under the pot.", "console")
    job.request()
    governor.tick()
    job.tick()
    assert job.proc is not None
    proc = psutil.Process(job.proc.pid)
    machine(root, total_mib=1024, available_mib=80)  # under 2 x min_available_mb: the governor sheds background work
    governor.tick()
    assert governor.memory.level == MemoryLevel.SHED_BACKGROUND
    job.tick()
    assert job.proc is None and not proc.is_running()  # killed: a stopped process would keep its memory
    with job.store.locked() as db:
        outcome = db.execute("SELECT outcome FROM consolidations WHERE id = 1").fetchone()[0]
    assert outcome == "stopped (memory is short (80 MiB available): background work is shed)"
    assert job.last == "run 1: stopped (memory is short (80 MiB available): background work is shed)"
    machine(root, total_mib=1024, available_mib=900)
    governor.tick()
    governor.tick()  # calm 0: one step back a tick
    assert governor.memory.shedding() is None
    job.tick()
    assert job.proc is None  # not again at once: a run that ran short may well run short again
    job.request()  # unless asked
    job.tick()
    assert job.proc is not None and job.run_id == 2
    job.stop()
