import sqlite3
from pathlib import Path

import pytest

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
