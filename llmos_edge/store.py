"""The on-device log: SQLite (through sqlite-utils) in WAL mode, a row per start, per request and per event.

Durability over speed: `synchronous=FULL`, so a row committed before a power cut is there after it. A write that
fails because the disk is full is kept in memory and retried with the next write, so nothing is lost while the
disk recovers. A database that fails its integrity check is moved aside (kept for inspection), never deleted.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlite_utils

from llmos_edge.errors import UserError

log = logging.getLogger(__name__)

PENDING_MAX = 10000  # rows held in memory while the disk is full


def _v1(db: sqlite_utils.Database) -> None:
    db.table("starts").create(
        {
            "id": int,
            "started_at": float,
            "stopped_at": float,
            "version": str,
            "pid": int,
            "config_sources": str,
            "config_fallback": str,
            "model": str,
            "exit_reason": str,
        },
        pk="id",
    )
    db.table("requests").create(
        {
            "id": int,
            "start_id": int,
            "source": str,
            "priority": str,
            "prompt": str,
            "answer": str,
            "tokens_in": int,
            "tokens_out": int,
            "queue_wait_ms": float,
            "ttft_ms": float,
            "tok_s": float,
            "outcome": str,
            "error": str,
            "created_at": float,
            "finished_at": float,
            "rss_start_mb": float,
            "rss_end_mb": float,
        },
        pk="id",
        foreign_keys=[("start_id", "starts", "id")],
    )
    db.table("events").create(
        {"id": int, "start_id": int, "at": float, "kind": str, "message": str, "data": str},
        pk="id",
        foreign_keys=[("start_id", "starts", "id")],
    )
    db.table("requests").create_index(["created_at"])
    db.table("events").create_index(["at"])


def _v2_preemptions(db: sqlite_utils.Database) -> None:
    db.table("requests").add_column("preemptions", int)


def _v3_voice(db: sqlite_utils.Database) -> None:
    """One row per spoken interaction (llmos_edge/voice.py): what was heard and how long each stage took."""
    db.table("voice").create(
        {
            "id": int,
            "start_id": int,
            "at": float,
            "heard": str,
            "kind": str,  # command | question | unclear ("" for a bare wake word)
            "intent": str,
            "how": str,  # grammar | questions | dictation | whisper
            "recognizer": str,
            "woke": int,
            "barge_in": int,
            "outcome": str,
            "answer": str,
            "request_id": int,
            "speech_ms": float,
            "vad_ms": float,
            "endpoint_ms": float,
            "asr_ms": float,
            "ttft_ms": float,
            "tts_ms": float,
            "first_audio_ms": float,
            "error": str,
        },
        pk="id",
        foreign_keys=[("start_id", "starts", "id")],
    )
    db.table("voice").create_index(["at"])


def _v4_models(db: sqlite_utils.Database) -> None:
    """The model store's registry (llmos_edge/model_store.py): one row per installed model, `default` included."""
    db.table("models").create(
        {
            "id": int,
            "name": str,
            "path": str,
            "sha256": str,
            "source": str,
            "size": int,
            "architecture": str,
            "quantization": str,
            "n_params": int,
            "state": str,  # installed | active | failed | removed
            "good": int,  # passed its gate at least once: a rung of the degradation ladder
            "gate": str,  # the last gate's result, in words
            "installed_at": float,
            "activated_at": float,
        },
        pk="id",
    )
    db.table("models").create_index(["name"])


# Append-only: a migration, once released, is never edited; user_version counts how many have run.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1, _v2_preemptions, _v3_voice, _v4_models]


class Store:
    def __init__(self, path: str | os.PathLike[str], keep_requests: int = 100000) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._disk_full_logged = False
        self.start_id = 0
        self.recovered_from = ""  # path of a corrupt database moved aside at open
        self.db = self._open()
        self._migrate()
        self._retain(keep_requests)

    # -- opening -------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        except (OSError, sqlite3.OperationalError) as e:
            raise UserError(
                f"cannot open the database {self.path}: {e}",
                "check that database.path is on a writable filesystem",
            ) from None
        return conn

    def _open(self) -> sqlite_utils.Database:
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            ok = conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        except sqlite3.DatabaseError:  # "file is not a database", "database disk image is malformed"
            ok = False
        if not ok:
            conn.close()
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
            self.recovered_from = str(aside)
            log.error("database %s failed its integrity check; moved it to %s and started a new one", self.path, aside)
            conn = self._connect()
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return sqlite_utils.Database(conn)

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise UserError(
                f"the database {self.path} is from a newer llmos-edge (schema {version})",
                "update llmos-edge, or move the database aside",
            )
        for i in range(version, len(MIGRATIONS)):
            with self.db.conn:
                MIGRATIONS[i](self.db)
                self.db.execute(f"PRAGMA user_version={i + 1}")

    def _retain(self, keep_requests: int) -> None:
        with self.db.conn:
            self.db.execute("DELETE FROM requests WHERE id <= (SELECT MAX(id) FROM requests) - ?", [keep_requests])

    # -- writing -------------------------------------------------------------------------------------------
    def _write(self, table: str, row: dict[str, Any]) -> int | None:
        """Insert (or upsert by id) a row; on a full disk keep it for the next write. Returns the row id."""
        with self._lock:
            self._pending.append((table, row))
            try:
                last = None
                with self.db.conn:  # one transaction: on failure nothing of it is committed, all stays pending
                    for t, r in self._pending:
                        last = self.db.table(t).insert(r, replace=True).last_pk
                self._pending.clear()
                self._disk_full_logged = False
                return int(last) if last is not None else None
            except sqlite3.OperationalError as e:
                if "full" not in str(e) and "disk I/O" not in str(e):
                    raise
                if not self._disk_full_logged:
                    log.error("database write failed (%s); keeping rows in memory until there is room", e)
                    self._disk_full_logged = True
                del self._pending[:-PENDING_MAX]
                return None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def record_start(self, *, version: str, config_sources: str, config_fallback: str, model: str) -> int:
        self.start_id = (
            self._write(
                "starts",
                {
                    "started_at": time.time(),
                    "version": version,
                    "pid": os.getpid(),
                    "config_sources": config_sources,
                    "config_fallback": config_fallback,
                    "model": model,
                },
            )
            or 0
        )
        return self.start_id

    def record_stop(self, reason: str) -> None:
        if self.start_id:
            row = dict(self.db.table("starts").get(self.start_id))
            row.update(stopped_at=time.time(), exit_reason=reason)
            self._write("starts", row)

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        log.info("event %s: %s", kind, message)
        self._write(
            "events",
            {
                "start_id": self.start_id or None,
                "at": time.time(),
                "kind": kind,
                "message": message,
                "data": json.dumps(data or {}, sort_keys=True),
            },
        )

    def record_request(self, row: dict[str, Any]) -> None:
        self._write("requests", {"start_id": self.start_id or None, **row})

    def record_voice(self, row: dict[str, Any]) -> None:
        self._write("voice", {"start_id": self.start_id or None, **row})

    # -- the model registry (model_store.py) ---------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.db["models"].rows_where(order_by="id")]

    def update_models(self, rows: list[dict[str, Any]]) -> None:
        """Insert or replace registry rows in one transaction: an activation changes two rows, never one of them.
        Unlike request rows these are not held back on a full disk: the caller must know the change failed."""
        with self._lock:
            try:
                with self.db.conn:
                    for row in rows:
                        self.db.table("models").insert(row, replace=True)
            except sqlite3.OperationalError as e:
                raise UserError(
                    f"cannot update the model registry in {self.path}: {e}",
                    "free space on /var (`/status` shows the database); the model store was left as it was",
                ) from None

    # -- reading -------------------------------------------------------------------------------------------
    def recent_requests(self, n: int = 10) -> list[dict[str, Any]]:
        with self._lock:
            rows = list(self.db["requests"].rows_where(order_by="id desc", limit=n))
        return rows[::-1]

    def recent_events(self, n: int = 10) -> list[dict[str, Any]]:
        with self._lock:
            rows = list(self.db["events"].rows_where(order_by="id desc", limit=n))
        return rows[::-1]

    def integrity_ok(self) -> bool:
        with self._lock:
            return bool(self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok")

    def close(self) -> None:
        with self._lock:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("checkpoint at close failed: %s", e)
            self.db.conn.close()


def open_readonly(path: str | os.PathLike[str]) -> sqlite_utils.Database:
    """For `llmos logs`: read a live database without taking part in its writes."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"no database at {p}", "run `llmos run` first, or pass --db PATH")
    conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    return sqlite_utils.Database(conn)
