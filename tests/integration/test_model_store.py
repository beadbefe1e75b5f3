"""The model store in the real supervisor: install, gate, activate, roll back, remove; kill -9 during installs;
transient load failures retried; the degradation ladder; vocab-only files settling on a reason."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil

from llmos_edge.models import MIB, estimate_memory, read_gguf
from tests.integration.conftest import MODEL, REPO, Appliance, catch_worker_while_loading
from tests.integration.test_governor import speed_model

Q4 = REPO / "model" / "llmos-tiny-q4_k_m.gguf"
VOCAB = Path(os.environ.get("LLMOS_VOCAB_DIR", Path.home() / ".cache/llmos-edge/vocab"))


def rows(app: Appliance, sql: str, *args: object) -> list[tuple[object, ...]]:
    db = sqlite3.connect(app.db)
    try:
        return db.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # not created yet: the supervisor is still starting
        return []
    finally:
        db.close()


def ready_app(factory: type[Appliance], tmp: Path, config: str = "", **kw: object) -> Appliance:
    app = factory(config=config, store=tmp / "store", **kw)  # type: ignore[call-arg]
    app.wait_ready()
    app.console.read_until(b"llmos> ", 10)
    return app


def test_install_gate_activate_rollback_and_remove(appliance_factory: type[Appliance], tmp_path: Path) -> None:
    app = ready_app(appliance_factory, tmp_path)
    stick = tmp_path / "stick"
    stick.mkdir()
    shutil.copy(Q4, stick / "small.gguf")
    out = app.llmos("model", "install", str(stick))  # a directory holding one model: that one
    assert out.stdout.strip().startswith("model: active small (gate passed ('ping' -> 'pong'))"), out
    assert "copied small.gguf" in out.stderr
    st = app.console.status()
    assert st["model"].startswith("llmos-tiny (Q4_K_M,") and st["models"].startswith("active small;")
    assert app.console.ask("ping") == "pong"
    listing = app.console.command("/model")
    assert "small: active" in listing and "default: installed, good" in listing
    (state, good, sha) = rows(app, "SELECT state, good, sha256 FROM models WHERE name='small'")[0]
    assert (state, good) == ("active", 1) and sha == hashlib.sha256(Q4.read_bytes()).hexdigest()
    stored = Path(str(rows(app, "SELECT path FROM models WHERE name='small'")[0][0]))
    assert stored.parent == tmp_path / "store" and stored.read_bytes() == Q4.read_bytes()

    assert app.llmos("model", "rollback").stdout.startswith("model: active default")
    assert app.console.status()["model"].startswith("llmos-tiny (Q8_0,")
    assert app.llmos("model", "remove", "small").stdout.strip() == "model: removed small"
    assert not stored.exists()
    refused = app.llmos("model", "remove", "default", check=False)
    assert refused.returncode == 2 and "the built-in model cannot be removed" in refused.stderr
    kinds = [k for (k,) in rows(app, "SELECT kind FROM events WHERE kind LIKE 'model_%' ORDER BY id")]
    assert kinds[:2] == ["model_installed", "model_activated"] and "model_removed" in kinds


def test_a_model_that_fails_its_gate_is_rolled_back(appliance_factory: type[Appliance], tmp_path: Path) -> None:
    app = ready_app(appliance_factory, tmp_path)
    stick = tmp_path / "stick"
    stick.mkdir()
    shutil.copy(Q4, stick / "good.gguf")
    shutil.copy(MODEL, stick / "bad.gguf")
    (stick / "bad.golden.jsonl").write_text(json.dumps({"prompt": "ping", "answer": "this is not the answer"}) + "\n")
    installed = app.console.command(f"/model install {stick / 'good.gguf'}")
    assert installed.splitlines()[-1].startswith("model: active good"), installed
    out = app.console.command(f"/model install {stick / 'bad.gguf'}")
    last = out.splitlines()[-1]
    assert last.startswith("model: bad failed its gate (expected 'this is not the answer' for 'ping', got 'pong')")
    assert last.endswith("rolled back to good"), out
    assert app.console.ask("ping") == "pong"
    assert app.console.status()["models"].startswith("active good;")
    states = dict(rows(app, "SELECT name, state FROM models"))  # type: ignore[arg-type]
    assert states == {"default": "installed", "good": "active", "bad": "failed"}
    kinds = [k for (k,) in rows(app, "SELECT kind FROM events WHERE kind LIKE 'model_%' ORDER BY id")]
    assert kinds[-2:] == ["model_gate_failed", "model_rolled_back"]
    # the registry survives a restart: the model rolled back to comes up again, the failed one stays failed
    app.stop()
    again = appliance_factory(store=tmp_path / "store", db=app.db)  # type: ignore[call-arg]
    again.wait_ready()
    again.console.read_until(b"llmos> ", 10)
    assert again.console.status()["models"].startswith("active good;")
    assert again.console.ask("ping") == "pong"


def test_bad_model_files_are_refused_in_one_sentence(appliance_factory: type[Appliance], tmp_path: Path) -> None:
    app = ready_app(appliance_factory, tmp_path)
    d = tmp_path / "in"
    d.mkdir()
    (d / "notes.gguf").write_text("this is not a model\n")
    (d / "half.gguf").write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    two = d / "two"
    two.mkdir()
    shutil.copy(Q4, two / "a.gguf")
    shutil.copy(Q4, two / "b.gguf")
    shutil.copy(Q4, d / "default.gguf")
    (d / "golden-bad.gguf").write_bytes(Q4.read_bytes())
    (d / "golden-bad.golden.jsonl").write_text("{not json\n")
    cases = {
        d / "notes.gguf": "is not a GGUF model file",
        d / "half.gguf": "truncated",
        two: "holds 2 models (a.gguf, b.gguf)",
        d / "missing.gguf": "no file at",
        d / "default.gguf": "`default` is the built-in model's name",
        d / "golden-bad.gguf": "golden-bad.golden.jsonl line 1 is not a golden prompt",
    }
    vocab = sorted(VOCAB.glob("ggml-vocab-*.gguf"))
    assert vocab, f"no vocab-only GGUFs in {VOCAB}; `make vocab` extracts them"
    cases[vocab[0]] = "holds no weights"
    for path, words in cases.items():
        r = app.llmos("model", "install", str(path), check=False)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and words in err[0] and err[0].startswith("llmos: error: "), (path, r.stderr)
        assert "Traceback" not in r.stderr
    assert [n for (n,) in rows(app, "SELECT name FROM models")] == ["default"]
    assert not [p for p in (tmp_path / "store").glob("*") if p.is_file()]
    assert app.console.ask("ping") == "pong"


def _registry_is_whole(db_path: Path, store: Path) -> str:
    """Exactly one active model; every registered file complete (its sha256 matches). Returns the active name."""
    db = sqlite3.connect(db_path)
    try:
        models = db.execute("SELECT name, path, sha256, state FROM models").fetchall()
    finally:
        db.close()
    active = [m for m in models if m[3] == "active"]
    default_active = not active and any(m[0] == "default" for m in models)
    assert len(active) == 1 or default_active or not models, models
    for name, path, sha, state in models:
        if name == "default" or state in ("removed", "failed"):
            continue
        data = Path(path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha, f"{name}: {path} is not the file registered"
    return str(active[0][0]) if active else "default"


def test_kill_9_at_50_random_points_of_an_install(appliance_factory: type[Appliance], tmp_path: Path) -> None:
    """The supervisor is SIGKILLed at a random moment of `llmos model install` (hashing, copying, renaming,
    registering, loading, gating, activating): afterwards the old or the new model is active, never neither, and
    nothing half-written is registered; the next start cleans up what the kill left."""
    rng = random.Random(20261201)
    store = tmp_path / "store"
    db = tmp_path / "llmos.db"
    src = tmp_path / "src"
    src.mkdir()
    outcomes: dict[str, int] = {"old": 0, "new": 0}
    duration = 0.0
    kills = 0
    for i in range(60):
        if kills == 50:
            break
        shutil.copy(Q4 if i % 2 else MODEL, src / f"m{i}.gguf")
        app = Appliance(tmp_path / f"k{i}", store=store, db=db)
        try:
            app.wait_ready()
            assert not list(store.glob(".*.part")), "the start did not clean up an interrupted copy"
            before = _registry_is_whole(db, store)
            t0 = time.monotonic()
            cli = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llmos_edge.cli",
                    "model",
                    "install",
                    str(src / f"m{i}.gguf"),
                    "--socket",
                    str(app.socket),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            if i % 11 == 0:  # every 11th install runs to the end: it measures how long one takes on this machine now
                out, _ = cli.communicate(timeout=120)
                duration = time.monotonic() - t0
                assert out.startswith(f"model: active m{i}"), out
                continue
            time.sleep(rng.uniform(0.0, duration * 1.2))
            app.proc.send_signal(signal.SIGKILL)
            app.proc.wait(10)
            cli.wait(30)
            kills += 1
            after = _registry_is_whole(db, store)
            assert after in (before, f"m{i}"), (before, after)
            outcomes["new" if after == f"m{i}" else "old"] += 1
        finally:
            app.close()
    assert kills == 50
    # both kinds of outcome happened: the kills landed before and after the activation
    assert outcomes["old"] >= 3 and outcomes["new"] >= 3, outcomes
    final = Appliance(tmp_path / "final", store=store, db=db)
    try:
        final.wait_ready()
        registered = {Path(p).name for (p,) in rows(final, "SELECT path FROM models WHERE state != 'removed'")}
        leftovers = [f.name for f in store.iterdir() if f.name not in registered and not f.name.endswith(".jsonl")]
        assert not leftovers, leftovers
    finally:
        final.close()


# -- the keeper: transient failures are retried, never parked ------------------------------------------------------


def test_a_load_timeout_is_retried(appliance_factory: type[Appliance], tmp_path: Path) -> None:
    app = appliance_factory(config="engine:\n  load_timeout: 3\n")
    pid = catch_worker_while_loading(app, signal.SIGSTOP)
    app.wait_ready(60)
    app.console.read_until(b"llmos> ", 10)
    assert app.console.ask("ping") == "pong"
    retries = [m for (m,) in rows(app, "SELECT message FROM events WHERE kind='model_retry'")]
    assert retries and "did not load within 3 s" in retries[0], retries
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_worker_killed_while_loading_is_retried(appliance_factory: type[Appliance]) -> None:
    app = appliance_factory()
    catch_worker_while_loading(app, signal.SIGKILL)
    app.wait_ready(60)
    app.console.read_until(b"llmos> ", 10)
    assert app.console.ask("ping") == "pong"
    retries = [m for (m,) in rows(app, "SELECT message FROM events WHERE kind='model_retry'")]
    assert retries and "killed by signal SIGKILL" in retries[0], retries


def _meminfo(root: Path, available_mib: float, total_mib: int = 4096) -> None:
    d = root / "proc"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "meminfo.tmp"
    tmp.write_text(f"MemTotal: {total_mib * 1024} kB\nMemAvailable: {int(available_mib * 1024)} kB\n")
    tmp.replace(d / "meminfo")


MEMORY_GOVERNOR = "governor:\n  sensors_root: {root}\n  interval: 0.2\n  memory_reserve_mb: 8\n  min_available_mb: 0\n"


def test_memory_briefly_short_is_retried(appliance_factory: type[Appliance], tmp_path: Path) -> None:
    root = tmp_path / "root"
    _meminfo(root, 20)
    app = appliance_factory(config=MEMORY_GOVERNOR.format(root=root))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not rows(app, "SELECT 1 FROM events WHERE kind='model_retry'"):
        time.sleep(0.2)
    app.console.read_until(b"llmos> ", 10)  # the banner's prompt
    # The backoff starts at 0.2 s and doubles: between two tries the state is "loading" again, so a single
    # look can fall on a try. Look until a wait between tries is seen (the waits grow, so one is long enough).
    deadline = time.monotonic() + 20
    state = app.console.status()["state"]
    while not state.startswith("retrying") and time.monotonic() < deadline:
        time.sleep(0.1)
        state = app.console.status()["state"]
    assert state.startswith("retrying (memory is short for now: ") and "trying again in" in state, state
    _meminfo(root, 2048)
    app.wait_ready(60)
    assert app.console.ask("ping") == "pong"


def test_the_ladder_falls_back_when_memory_is_short_and_goes_back(
    appliance_factory: type[Appliance], tmp_path: Path
) -> None:
    big = speed_model("50M")
    need_big = estimate_memory(read_gguf(big), 256).total / MIB  # the pre-flight tries down to context 256
    need_small = estimate_memory(read_gguf(MODEL), 256).total / MIB
    assert need_small + 20 < need_big, (need_small, need_big)
    root = tmp_path / "root"
    _meminfo(root, 4096)
    app = ready_app(
        appliance_factory, tmp_path, MEMORY_GOVERNOR.format(root=root), override="models:\n  recheck: 0.5\n"
    )
    assert app.llmos("model", "install", str(big)).stdout.startswith("model: active speed-50m-q4_k_m")
    # memory becomes short for the big model, and its worker dies: the ladder runs the default meanwhile
    _meminfo(root, need_small + 12)
    os.kill(app.engine_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not app.console.status()["state"].startswith("degraded") and time.monotonic() < deadline:
        time.sleep(0.3)
    st = app.console.status()
    assert "FALLBACK running default instead of speed-50m-q4_k_m: memory is short for now" in st["models"], st
    assert st["state"].startswith("degraded (running default instead of")
    assert app.console.ask("ping") == "pong"
    # STATUS= goes out once per watchdog interval (1 s here): the answer above can come back before the next one.
    app.notify.wait_for("STATUS=degraded: running default instead of", 5)
    _meminfo(root, 4096)  # the cause is gone: back to the model that should run
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "speed-50m" not in app.console.status().get("model", ""):
        time.sleep(0.3)
    st = app.console.status()
    assert "speed-50m" in st["model"] and st["state"] == "ready" and "FALLBACK" not in st["models"], st
    kinds = [k for (k,) in rows(app, "SELECT kind FROM events ORDER BY id")]
    assert kinds.index("model_fallback") < kinds.index("model_fallback_end")


def crash_loop(app: Appliance) -> None:
    """Kill the engine worker five times in a row, each time once a new one serves: a crash loop."""
    for _ in range(5):
        pid = app.engine_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.2)
            st = app.console.status()
            if "engine" in st and not st["engine"].startswith(f"pid {pid},") and st["state"] in ("ready", "degraded"):
                break


def test_a_crash_loop_soon_after_activation_rolls_back(appliance_factory: type[Appliance], tmp_path: Path) -> None:
    app = ready_app(appliance_factory, tmp_path)
    assert app.llmos("model", "install", str(Q4)).stdout.startswith("model: active llmos-tiny-q4_k_m")
    crash_loop(app)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not app.console.status()["models"].startswith("active default"):
        time.sleep(0.3)
    assert app.console.status()["models"].startswith("active default;")
    assert rows(app, "SELECT state FROM models WHERE name='llmos-tiny-q4_k_m'") == [("failed",)]
    assert app.console.ask("ping") == "pong"


# -- real converters' files ---------------------------------------------------------------------------------------


def test_each_vocab_only_gguf_settles_on_one_sentence(tmp_path: Path) -> None:
    """llama.cpp's 19 vocab-only GGUFs (real tokenizers, no weights) as the model: the supervisor settles within
    seconds on a one-sentence reason, never 'starting' with a dead thread, never a traceback."""
    files = sorted(VOCAB.glob("ggml-vocab-*.gguf"))
    assert len(files) >= 19, f"expected llama.cpp's 19 vocab-only GGUFs in {VOCAB}; `make vocab` extracts them"
    for f in files:
        app = Appliance(tmp_path / f.stem, model=f)
        try:
            t0 = time.monotonic()
            app.wait_ready(30)
            settled = time.monotonic() - t0
            app.console.read_until(b"llmos> ", 10)
            state = app.console.status()["state"]
            assert state.startswith("failed ("), (f.name, state)
            reason = state.removeprefix("failed (").removesuffix(")")
            assert "\n" not in reason and len(reason) < 400 and f.name in reason, (f.name, reason)
            assert settled < 15, (f.name, settled)
            assert "Traceback" not in app.output(), app.output()
        finally:
            app.close()


def test_a_database_that_cannot_be_opened_stops_for_good(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "llmos.db").mkdir()  # a directory where the database file should be: no restart can fix it
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmos_edge.cli",
            "run",
            "--console",
            "none",
            "--db",
            str(ro / "llmos.db"),
            "--model",
            str(MODEL),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 78, r
    assert "llmos: error: cannot open the database" in r.stderr and "Traceback" not in r.stderr
    unit = (REPO / "rootfs-overlay/usr/lib/systemd/system/llmos.service").read_text()
    assert "RestartPreventExitStatus=78" in unit


def test_the_ladder_steps_down_when_the_board_stays_too_hot_and_back_when_cool(
    appliance_factory: type[Appliance], tmp_path: Path
) -> None:
    from tests.fake_sysfs import write_zone

    root = tmp_path / "root"
    write_zone(root, 50.0)
    app = ready_app(
        appliance_factory,
        tmp_path,
        f"governor:\n  sensors_root: {root}\n  interval: 0.2\n",
        override="models:\n  recheck: 0.5\n  hot_for: 1.0\n",
    )
    assert app.llmos("model", "install", str(speed_model("25M"))).stdout.startswith("model: active speed-25m")
    write_zone(root, 91.0)  # critical, and staying there
    deadline = time.monotonic() + 30
    while "FALLBACK" not in app.console.status()["models"] and time.monotonic() < deadline:
        time.sleep(0.3)
    st = app.console.status()
    assert "running default instead of speed-25m-q4_k_m: the board stays too hot for it (91.0 °C)" in st["models"]
    write_zone(root, 50.0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "speed-25m" not in app.console.status().get("model", ""):
        time.sleep(0.3)
    st = app.console.status()
    assert "speed-25m" in st["model"] and "FALLBACK" not in st["models"], st
    assert app.console.ask("hello")


def test_a_crash_loop_of_an_established_model_steps_down_the_ladder(
    appliance_factory: type[Appliance], tmp_path: Path
) -> None:
    app = ready_app(appliance_factory, tmp_path)
    assert app.llmos("model", "install", str(Q4)).stdout.startswith("model: active llmos-tiny-q4_k_m")
    db = sqlite3.connect(app.db)
    with db:  # it has served well for an hour: a crash loop now is not the model's fault, it is not rolled back
        db.execute("UPDATE models SET activated_at = activated_at - 3600 WHERE name = 'llmos-tiny-q4_k_m'")
    db.close()
    crash_loop(app)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "FALLBACK" not in app.console.status()["models"]:
        time.sleep(0.3)
    st = app.console.status()
    assert "FALLBACK running default instead of llmos-tiny-q4_k_m: crash loop" in st["models"], st
    assert rows(app, "SELECT state FROM models WHERE name='llmos-tiny-q4_k_m'") == [("active",)]
    assert app.console.ask("ping") == "pong"
