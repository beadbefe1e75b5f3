"""The request ring (llmos_edge/ring.py) and the store's batches through it (store.py, database.request_flush)."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from llmos_edge.ring import HEADER, Ring, encode, read_records
from llmos_edge.store import Store, open_readonly, uncommitted


def row(i: int, **kw: Any) -> dict[str, Any]:
    return {
        "source": "console",
        "prompt": f"question {i}",
        "answer": f"answer {i}",
        "tokens_out": 5,
        "tok_s": 10.0,
        **kw,
    }


def turn(i: int) -> tuple[str, dict[str, Any]]:
    return "turns", {"source": "console", "at": time.time(), "question": f"question {i}", "answer": f"answer {i}"}


def committed(db: Path, table: str = "requests") -> list[str]:
    """What another process reads: the requests' prompts, or the turns' questions, in id order."""
    column = "prompt" if table == "requests" else "question"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [str(r[0]) for r in conn.execute(f"SELECT {column} FROM [{table}] ORDER BY id")]
    finally:
        conn.close()


def test_records_come_back_in_order_and_torn_or_foreign_ones_do_not(tmp_path: Path) -> None:
    ring = Ring(tmp_path / "r.ring", epoch=7, size=64 * 1024)
    assert (tmp_path / "r.ring").stat().st_size == 64 * 1024 and ring.sector == 512
    seqs = [ring.append(encode([("requests", row(i))])) for i in range(3)]
    assert seqs == [1, 2, 3] and ring.written_bytes == 3 * 512  # a small request: one sector, nothing else
    assert [r.rows[0][1]["prompt"] for r in read_records(tmp_path / "r.ring", 7)] == [
        "question 0",
        "question 1",
        "question 2",
    ]
    assert read_records(tmp_path / "r.ring", 8) == []  # another database's epoch
    assert [r.seq for r in read_records(tmp_path / "r.ring", 7, after=2)] == [3]
    ring.close()
    # A torn record (a power cut inside its write): one byte of its payload differs, so its CRC fails.
    data = bytearray((tmp_path / "r.ring").read_bytes())
    data[512 + HEADER.size + 3] ^= 0xFF
    (tmp_path / "r.ring").write_bytes(bytes(data))
    again = Ring(tmp_path / "r.ring", epoch=7, size=64 * 1024)
    assert [r.seq for r in again.scan()] == [1, 3]
    assert again.append(encode([("requests", row(3))])) == 4 and again.head == 4 * 512  # after the newest
    again.close()


def test_the_ring_wraps_and_keeps_the_newest_records(tmp_path: Path) -> None:
    ring = Ring(tmp_path / "r.ring", epoch=1, size=16 * 1024)  # 32 sectors
    big = encode([("requests", row(0, answer=os.urandom(700).hex()))])  # hex compresses to about 890 bytes: 2 sectors
    for _ in range(25):
        ring.append(big)
    found = ring.scan()
    assert [r.seq for r in found] == sorted(r.seq for r in found) and found[-1].seq == 25
    assert len(found) == 16  # 32 sectors hold 16 records; the older ones were written over
    assert all(r.rows[0][1]["answer"] == found[0].rows[0][1]["answer"] for r in found)
    ring.close()


def test_a_request_too_large_for_the_ring_is_committed_on_its_own(tmp_path: Path) -> None:
    s = Store(tmp_path / "l.db", request_flush=3600)
    assert s.ring is not None
    s.record_request(row(1, answer=os.urandom(s.ring.size // 3).hex()))  # incompressible beyond a quarter of the ring
    assert committed(tmp_path / "l.db") == ["question 1"] and s.held("requests") == []
    s.record_request(row(2))
    assert s.held("requests")[0]["id"] == 2  # the next one is held again, with the id after it
    s.close()


def _answer_and_die(db: str, n: int) -> None:
    """A supervisor that records n answered requests (each with its turn) and is then killed: no close, no commit."""
    s = Store(db, request_flush=3600)
    for i in range(n):
        s.record_request(row(i), [turn(i)])
    os._exit(0)


def test_rows_are_held_until_the_batch_and_a_kill_loses_none(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    s = Store(db, request_flush=3600)
    assert s.ring is not None and s.ring.sector == 512
    s.record_request(row(0), [turn(0)])
    s.record_request(row(1), [turn(1)])
    # Held: not in the database yet, but every reader of this process and `llmos logs` sees them.
    assert committed(db) == [] and s.ring_line() == "ring: 2 requests held, committed every 3600 s"
    assert [r["prompt"] for r in s.recent_requests(5)] == ["question 0", "question 1"]
    assert s.finished_since(0)[0] == 2 and s.finished_since(0)[1] == 10 and s.last_request_id() == 2
    assert [r["prompt"] for r in uncommitted(open_readonly(db), db, "requests")] == ["question 0", "question 1"]
    # One commit takes them all, and the ring's progress with them.
    commits: list[str] = []
    s.db.conn.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    s.flush()
    assert len(commits) == 1 and committed(db) == ["question 0", "question 1"]
    assert committed(db, "turns") == ["question 0", "question 1"]
    assert uncommitted(open_readonly(db), db, "requests") == []
    s.close()

    # A kill after three more answers: nothing committed them; the next open takes them from the ring, once.
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_answer_and_die, args=(str(db), 3))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert committed(db) == ["question 0", "question 1"]
    assert len(uncommitted(open_readonly(db), db, "requests")) == 3
    s = Store(db, request_flush=3600)
    assert s.replayed == 3
    assert committed(db) == ["question 0", "question 1", "question 0", "question 1", "question 2"]
    assert len(committed(db, "turns")) == 5
    s.close()
    s = Store(db, request_flush=3600)
    assert s.replayed == 0 and len(committed(db)) == 5  # taken once
    # And it goes on after the newest record, with ids after the newest row.
    s.record_request(row(9))
    assert s.held("requests")[0]["id"] == 6
    s.close()
    assert committed(db)[-1] == "question 9"


def test_the_batch_is_committed_when_due_and_at_the_sampler_tick(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    s = Store(db, request_flush=0.2, samples_per_commit=1000)
    s.record_request(row(0))
    assert committed(db) == []
    time.sleep(0.3)
    s.record_sample({"at": time.time(), "celsius": 40.0})  # the tick of a quiet device commits what is due
    assert committed(db) == ["question 0"]
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 1  # samples go with them
    s.close()


def test_a_database_moved_aside_does_not_take_the_rings_old_records(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_answer_and_die, args=(str(db), 2))
    p.start()
    p.join(30)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)  # a person deletes the database, not the ring
    s = Store(db, request_flush=3600)
    assert s.replayed == 0 and committed(db) == []  # a new epoch: the old records are not this database's
    s.close()
