import json
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from llmos_edge import store as store_module
from llmos_edge.errors import UserError
from llmos_edge.store import MIGRATIONS, Store


def test_start_request_and_event_rows_are_written_in_wal_mode(tmp_path: Path) -> None:
    s = Store(tmp_path / "db" / "l.db")
    sid = s.record_start(version="t", config_sources="defaults", config_fallback="", model="m.gguf")
    s.record_request({"prompt": "ping", "answer": "pong", "outcome": "ok", "tokens_out": 1})
    s.event("ready", "self-test passed")
    assert [r["answer"] for r in s.recent_requests()] == ["pong"]
    assert s.recent_requests()[0]["start_id"] == sid
    assert s.recent_events()[0]["kind"] == "ready"
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.record_stop("test")
    s.close()
    conn = sqlite3.connect(tmp_path / "db" / "l.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT exit_reason FROM starts").fetchone()[0] == "test"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_retention_keeps_the_newest_requests(tmp_path: Path) -> None:
    s = Store(tmp_path / "l.db")
    for i in range(30):
        s.record_request({"prompt": str(i)})
    s.close()
    s = Store(tmp_path / "l.db", keep_requests=10)
    rows = s.recent_requests(100)
    assert [r["prompt"] for r in rows] == [str(i) for i in range(20, 30)]


def test_a_corrupt_database_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    p = tmp_path / "l.db"
    p.write_bytes(b"this is not sqlite" * 100)
    s = Store(p)
    assert s.recovered_from and Path(s.recovered_from).read_bytes().startswith(b"this is not sqlite")
    s.record_request({"prompt": "after"})
    assert s.integrity_ok()


def test_rows_survive_a_full_disk_and_are_written_when_space_returns(tmp_path: Path) -> None:
    s = Store(tmp_path / "l.db")
    s.record_request({"prompt": "before"})
    # A real SQLite "database or disk is full": cap the file at its current size in pages.
    pages = s.db.execute("PRAGMA page_count").fetchone()[0]
    s.db.execute(f"PRAGMA max_page_count={pages}")
    for i in range(50):
        s.record_request({"prompt": "x" * 4000 + str(i)})
    assert s.pending > 0
    s.db.execute("PRAGMA max_page_count=1073741823")
    s.record_request({"prompt": "after"})
    assert s.pending == 0
    prompts = [r["prompt"] for r in s.recent_requests(100)]
    assert prompts[0] == "before" and prompts[-1] == "after" and len(prompts) == 52


def test_a_database_from_a_newer_version_is_refused_clearly(tmp_path: Path) -> None:
    p = tmp_path / "l.db"
    conn = sqlite3.connect(p)
    conn.execute("PRAGMA user_version=999")
    conn.close()
    with pytest.raises(UserError, match="newer llmos-edge"):
        Store(p)


def test_an_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot open the database"):
        Store(tmp_path / "file" / "l.db")


def test_a_batch_that_fails_half_way_is_written_once_when_space_returns(tmp_path: Path) -> None:
    s = Store(tmp_path / "l.db")
    s.record_request({"prompt": "before"})
    pages = s.db.execute("PRAGMA page_count").fetchone()[0]
    s.db.execute(f"PRAGMA max_page_count={pages}")  # a real SQLITE_FULL from SQLite's pager
    for i in range(5):
        s.record_request({"prompt": f"{i}" + "x" * 3000})
    assert s.pending >= 4
    # Room for a row or two of the batch, not all of it: each row committed on its own used to stay committed here,
    # and stay pending too, so it was inserted again when space returned.
    s.db.execute(f"PRAGMA max_page_count={pages + 2}")
    s.record_request({"prompt": "5" + "x" * 3000})
    assert s.pending >= 5
    s.db.execute("PRAGMA max_page_count=1073741823")
    s.record_request({"prompt": "after"})
    assert s.pending == 0
    prompts = [r["prompt"][:6] for r in s.recent_requests(100)]
    assert prompts == ["before", *(f"{i}xxxxx" for i in range(6)), "after"]


# Runs in a private mount namespace (unshare), on a tmpfs of 512 KiB that vanishes with the process.
FULL_FILESYSTEM = """
import json, os, sys
from pathlib import Path
from llmos_edge.store import Store

d = Path(sys.argv[1])
s = Store(d / "l.db")
s.record_request({"prompt": "before"})
fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT)
size = 0
try:
    while True:
        size += os.write(fd, bytes(4096))
except OSError:  # ENOSPC: the filesystem is full
    pass
out = {}
for i in range(5):
    s.record_request({"prompt": f"{i}" + "x" * 3000})
out["pending_full"] = s.pending
os.ftruncate(fd, size - 16384)  # room for a row or two (measured: the old code committed one), not six
s.record_request({"prompt": "5" + "x" * 3000})
out["pending_partial"] = s.pending
out["rows_partial"] = s.db.execute("SELECT count(*) FROM requests").fetchone()[0]
os.close(fd)
os.unlink(d / "filler")
s.record_request({"prompt": "after"})
out["pending_after"] = s.pending
out["prompts"] = [r[0][:6] for r in s.db.execute("SELECT prompt FROM requests ORDER BY id")]
out["integrity_ok"] = s.integrity_ok()
print(json.dumps(out))
"""


def _on_a_small_tmpfs(tmp_path: Path, script: str, size: str = "512k") -> dict[str, Any]:
    """Run `script` with a small tmpfs (512 KiB) as its argv[1], in a private mount namespace: the mount vanishes with
    the process, and it works without root where user namespaces are allowed (Debian's default)."""
    unshare = shutil.which("unshare")
    assert unshare, "this test needs unshare (util-linux) to mount a small tmpfs in a private mount namespace"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_and_run = f'mount -t tmpfs -o size={size} llmos-test "$1" && exec "$2" -c "$3" "$1"'
    r = subprocess.run(
        [unshare, "--mount", "--map-root-user", "sh", "-c", mount_and_run, "sh", mnt, sys.executable, script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"the run on a tmpfs failed (user namespaces and tmpfs needed): {r.stderr}"
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_a_full_filesystem_in_the_middle_of_a_batch_loses_and_doubles_no_row(tmp_path: Path) -> None:
    out = _on_a_small_tmpfs(tmp_path, FULL_FILESYSTEM)
    assert out["pending_full"] == 5  # the disk is really full: nothing was written
    assert out["pending_partial"] == 6 and out["rows_partial"] == 1  # nothing of the batch was half-committed
    assert out["pending_after"] == 0 and out["integrity_ok"]
    assert out["prompts"] == ["before", *(f"{i}xxxxx" for i in range(6)), "after"]


FULL_AT_START = """
import json, os, sys
from pathlib import Path
from llmos_edge.store import Store

d = Path(sys.argv[1])
s = Store(d / "l.db")
for i in range(40):
    s.record_request({"prompt": f"{i}"})
s.close()
fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, bytes(4096))
except OSError:  # the filesystem is full before the next start
    pass
s = Store(d / "l.db", keep_requests=10)  # pruning needs room too: it waits for the next start
s.record_request({"prompt": "while full"})
out = {"pending_full": s.pending, "rows_full": s.db.execute("SELECT count(*) FROM requests").fetchone()[0]}
out["degraded"] = s.degraded
os.close(fd)
os.unlink(d / "filler")
s.record_request({"prompt": "after"})
s.close()
s = Store(d / "l.db", keep_requests=10)
out["prompts"] = [r["prompt"] for r in s.recent_requests(100)]
out["degraded_after"] = s.degraded
print(json.dumps(out))
"""


def test_a_full_filesystem_at_start_does_not_stop_the_store(tmp_path: Path) -> None:
    # 1 MiB: the first start's write-ahead log (every migration, the FTS5 tables among them) must fit before the
    # filesystem is filled up on purpose.
    out = _on_a_small_tmpfs(tmp_path, FULL_AT_START, "1m")
    assert out["pending_full"] == 1 and out["rows_full"] == 40  # it opened, kept the row, pruned nothing yet
    assert "the disk was full at start" in out["degraded"] and out["degraded_after"] == ""
    assert out["prompts"] == [*(str(i) for i in range(32, 40)), "while full", "after"]


def test_a_write_error_that_is_not_the_disk_is_raised_and_not_kept(tmp_path: Path) -> None:
    s = Store(tmp_path / "l.db")
    with pytest.raises(sqlite3.OperationalError, match="no column named"):
        s.record_request({"prompt": "x", "no_such_column": 1})
    assert s.pending == 0  # it would fail every later write
    s.record_request({"prompt": "next"})
    assert [r["prompt"] for r in s.recent_requests()] == ["next"]


def _schema(path: Path) -> tuple[int, list[tuple[str, str]]]:
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        return version, conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    finally:
        conn.close()


def test_a_migration_that_fails_half_way_changes_neither_schema_nor_user_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "l.db"
    Store(p).close()
    before = _schema(p)

    def half_done(db: sqlite_utils.Database) -> None:
        db.table("new_table").create({"id": int, "x": str}, pk="id")
        db.table("requests").add_column("new_column", int)
        db.table("new_table").insert({"x": "a row"})
        raise RuntimeError("the migration broke half-way")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, half_done])
    with pytest.raises(RuntimeError, match="half-way"):
        Store(p)
    assert _schema(p) == before

    def whole(db: sqlite_utils.Database) -> None:
        db.table("new_table").create({"id": int, "x": str}, pk="id")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, whole])
    Store(p).close()  # the fixed migration runs from the start: nothing of the broken one is in its way
    version, tables = _schema(p)
    assert version == len(MIGRATIONS) + 1 and "new_table" in [name for name, _ in tables]


def _lock(path: Path, journal_mode: str) -> sqlite3.Connection:
    """Another process's exclusive lock on a healthy database (a second connection stands in for it)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA journal_mode={journal_mode}")
    conn.execute("BEGIN EXCLUSIVE")
    conn.execute("INSERT INTO events (kind, message) VALUES ('other', 'the other process')")
    return conn


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_a_locked_database_is_reported_in_one_sentence_and_never_moved_aside(tmp_path: Path, journal_mode: str) -> None:
    p = tmp_path / "l.db"
    s = Store(p)
    s.record_request({"prompt": "kept"})
    s.close()
    other = _lock(p, journal_mode)
    try:
        with pytest.raises(UserError) as e:
            Store(p, lock_timeout=0.3)
    finally:
        other.rollback()
        other.close()
    assert "locked by another process" in str(e.value) and "\n" not in str(e.value) and e.value.hint
    assert sorted(f.name for f in tmp_path.iterdir() if ".corrupt-" in f.name) == []
    s = Store(p)
    assert not s.recovered_from and [r["prompt"] for r in s.recent_requests()] == ["kept"]


READ_ONLY_FILESYSTEM = """
import json, subprocess, sys
from pathlib import Path
from llmos_edge.errors import UserError
from llmos_edge.store import Store

d = Path(sys.argv[1])
s = Store(d / "l.db")
s.record_request({"prompt": "kept"})
s.close()
subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)  # an I/O fault at open: the file cannot be written
try:
    Store(d / "l.db")
    error = ""
except UserError as e:
    error = str(e)
print(json.dumps({"error": error, "files": sorted(f.name for f in d.iterdir())}))
"""


def test_a_database_that_cannot_be_written_is_reported_and_left_where_it_is(tmp_path: Path) -> None:
    out = _on_a_small_tmpfs(tmp_path, READ_ONLY_FILESYSTEM)
    assert out["error"].startswith(f"cannot use the database {tmp_path / 'mnt' / 'l.db'}")
    assert out["files"] == ["l.db"]  # not renamed to l.db.corrupt-* (the old code tried, and failed on EROFS)


def test_a_lock_released_while_opening_is_waited_for(tmp_path: Path) -> None:
    p = tmp_path / "l.db"
    Store(p).close()
    other = _lock(p, "delete")
    release = threading.Timer(0.5, other.rollback)
    release.start()
    try:
        s = Store(p, lock_timeout=60)  # waits for the other process, however slow this machine is
    finally:
        release.join()
        other.close()
    assert not s.recovered_from and s.integrity_ok()


def test_a_malformed_database_is_moved_aside(tmp_path: Path) -> None:
    p = tmp_path / "l.db"
    s = Store(p)
    for i in range(200):
        s.record_request({"prompt": f"row {i}" * 20})
    s.close()
    data = bytearray(p.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[4 * page : 6 * page] = b"\xa5" * (2 * page)  # two pages of a table overwritten: a malformed image
    p.write_bytes(bytes(data))
    s = Store(p)
    assert s.recovered_from and Path(s.recovered_from).read_bytes() == bytes(data)
    assert s.recent_requests() == [] and s.integrity_ok()


def test_events_and_voice_rows_are_pruned_at_start_like_requests(tmp_path: Path) -> None:
    p = tmp_path / "l.db"
    s = Store(p)
    for i in range(30):
        s.event("tick", str(i))
        s.record_voice({"heard": str(i)})
        s.record_request({"prompt": str(i)})
    s.close()
    s = Store(p, keep_requests=20, keep_events=10, keep_voice=5)
    assert [r["message"] for r in s.recent_events(100)] == [str(i) for i in range(20, 30)]
    assert [r["heard"] for r in s.db["voice"].rows_where(order_by="id")] == [str(i) for i in range(25, 30)]
    assert len(s.recent_requests(100)) == 20


def test_samples_are_pruned_when_a_sixth_of_keep_samples_has_been_written_and_at_start(tmp_path: Path) -> None:
    p = tmp_path / "l.db"
    s = Store(p, keep_samples=60)
    assert s.prune_every == 10
    deletes: list[str] = []
    s.db.conn.set_trace_callback(lambda sql: deletes.append(sql) if "DELETE FROM [samples]" in sql else None)
    counts = []
    for i in range(85):
        s.record_sample({"at": float(i), "celsius": 50.0})
        counts.append(s.db["samples"].count)
    assert len(deletes) == 8  # after rows 10, 20, ... 80: not at every commit
    assert max(counts) == 69  # keep_samples and at most prune_every - 1 more before the next pruning
    assert s.db["samples"].count == 65  # pruned to 60 at row 80, then 5 more
    s.close()
    s = Store(p, keep_samples=60)
    assert [r["at"] for r in s.samples_since(-1)] == [float(i) for i in range(25, 85)]
    s.close()


def test_samples_are_averaged_into_rows_and_the_last_hour_stays_in_memory(tmp_path: Path) -> None:
    p = tmp_path / "l.db"
    s = Store(p, samples_per_row=3, samples_per_commit=6)
    raw = [
        {"at": 10.0, "celsius": 50.0, "share": 1.0, "tokens": 30, "tok_s": 100.0, "queue": 0, "rss_engine": 10},
        {"at": 20.0, "celsius": None, "share": 0.5, "tokens": 0, "tok_s": None, "queue": 3, "rss_engine": 11},
        {"at": 30.0, "celsius": 53.0, "share": 0.6, "tokens": 10, "tok_s": 25.0, "queue": 1, "rss_engine": 11},
        {"at": 40.0, "celsius": None, "share": 1.0, "tokens": 0, "tok_s": None, "queue": 0, "rss_engine": 0},
    ]
    for r in raw[:3]:
        s.record_sample(r)
    assert s.db["samples"].count == 0  # one row held: half of samples_per_commit
    s.record_sample(raw[3])
    assert [r["at"] for r in s.samples_since(-1)] == [10.0, 20.0, 30.0, 40.0]  # raw, from memory
    assert [r["celsius"] for r in s.samples_since(25.0)] == [53.0, None]
    s.close()  # the held row and the part-filled one are written
    s = Store(p)
    rows = s.samples_since(-1)  # a new start: nothing in memory, the averaged rows from the database
    assert len(rows) == 2
    first = rows[0]
    assert first["at"] == 20.0 and first["celsius"] == 51.5  # the mean time; the mean of the samples that have one
    assert first["share"] == 0.7 and first["queue"] == 3  # the queue's peak, not its mean
    assert first["tokens"] == 40  # summed: the requests of the whole interval
    assert first["tok_s"] == 57.14  # 40 tokens in 0.3 s + 0.4 s, not the mean of 100 and 25
    assert first["rss_engine"] == 11  # integers stay integers
    assert rows[1]["at"] == 40.0 and rows[1]["celsius"] is None and rows[1]["tok_s"] is None  # gaps stay gaps
    s.close()


def test_memory_keeps_an_hour_of_samples_and_older_rows_come_from_the_database(tmp_path: Path) -> None:
    p = tmp_path / "l.db"
    s = Store(p)
    s.record_sample({"at": 100.0, "celsius": 40.0})  # an earlier start's row
    s.close()
    s = Store(p, samples_per_row=10, samples_per_commit=10)
    for i in range(400):  # 4000 s at 10 s: 40 rows in the database, the last hour's 361 samples in memory
        s.record_sample({"at": 1000.0 + i * 10, "celsius": 50.0})
    assert s.db["samples"].count == 41
    got = [r["at"] for r in s.samples_since(0)]
    newest = 1000.0 + 399 * 10
    recent = [1000.0 + i * 10 for i in range(400) if 1000.0 + i * 10 >= newest - store_module.RECENT_S]
    assert len(recent) == 361 and got[-361:] == recent  # the hour at full resolution
    older = got[:-361]
    assert older[0] == 100.0 and all(a < recent[0] for a in older)  # before it, the averaged rows
    # the earlier start's row, and the rows (of 10 samples) whose mean time comes before the hour in memory
    assert older == [100.0, 1045.0, 1145.0, 1245.0, 1345.0]
    assert [r["at"] for r in s.samples_since(newest - 15)] == [newest - 10, newest]
    s.close()


def test_migration_9_drops_the_samples_index_and_keeps_the_rows(tmp_path: Path) -> None:
    db = sqlite_utils.Database(tmp_path / "l.db")
    for migration in MIGRATIONS[:8]:
        migration(db)
    db.execute("PRAGMA user_version=8")
    db["samples"].insert({"at": 5.0, "celsius": 41.0})
    db.conn.commit()
    assert "idx_samples_at" in {i.name for i in db["samples"].indexes}
    db.conn.close()
    s = Store(tmp_path / "l.db")
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert MIGRATIONS[8] is store_module._v9_samples_no_at_index
    assert "idx_samples_at" not in {i.name for i in s.db["samples"].indexes}
    assert [r["celsius"] for r in s.samples_since(0)] == [41.0]
    s.close()


def test_events_can_be_read_by_kind(tmp_path: Path) -> None:
    s = Store(tmp_path / "l.db")
    for kind in ("governor", "ready", "engine_restart", "governor"):
        s.event(kind, kind)
    assert [r["kind"] for r in s.recent_events(10, ("governor", "engine_restart"))] == [
        "governor",
        "engine_restart",
        "governor",
    ]
    assert [r["kind"] for r in s.recent_events(1, ("governor",))] == ["governor"]
    assert len(s.recent_events(10)) == 4


def test_a_database_of_schema_5_gains_the_learning_tables_and_keeps_its_rows(tmp_path: Path) -> None:
    db = sqlite_utils.Database(tmp_path / "l.db")
    for migration in MIGRATIONS[:5]:
        migration(db)
    db.execute("PRAGMA user_version=5")
    db["requests"].insert({"prompt": "from before", "outcome": "ok"})
    db.conn.commit()
    db.conn.close()
    s = Store(tmp_path / "l.db")
    assert [r["prompt"] for r in s.recent_requests()] == ["from before"]
    s.record_request({"prompt": "taught", "outcome": "ok", "taught_id": 3, "recalled": "1,2"})
    assert s.recent_requests()[-1]["taught_id"] == 3
    with s.locked(write=True) as d:
        d.execute("INSERT INTO turns (source, at, question, answer) VALUES ('console', 0, 'kiwi fruit', 'green')")
        assert d.execute("SELECT rowid FROM turns_fts WHERE turns_fts MATCH 'kiwi'").fetchall() == [(1,)]
    s.close()


def test_samples_are_held_and_committed_together_and_at_close(tmp_path: Path) -> None:
    p = tmp_path / "l.db"
    s = Store(p, samples_per_commit=3)
    commits: list[str] = []
    s.db.conn.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    for i in range(4):
        s.record_sample({"at": float(i), "celsius": 50.0})
    assert len(commits) == 1  # the first three in one commit; the fourth is held
    assert s.db["samples"].count == 3
    assert [r["at"] for r in s.samples_since(-1)] == [0.0, 1.0, 2.0, 3.0]  # the held one is shown too
    assert [r["at"] for r in s.samples_since(2.5)] == [3.0]
    s.close()
    s = Store(p)
    assert [r["at"] for r in s.samples_since(-1)] == [0.0, 1.0, 2.0, 3.0]  # written at close
    s.close()
