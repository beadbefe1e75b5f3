"""The on-device log: SQLite (through sqlite-utils) in WAL mode, a row per start, per request and per event.

Durability over speed: `synchronous=FULL`, so a row committed before a power cut is there after it. A write that
fails because the disk is full is kept in memory and retried with the next write, so nothing is lost while the
disk recovers. A database that fails its integrity check is moved aside (kept for inspection), never deleted; one
that is only locked or unreadable for another reason is left where it is and reported.

A batch of rows, a migration and its `user_version`: each is one transaction (`transaction()`), committed whole or
not at all.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import secrets
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llmos_edge.errors import UserError
from llmos_edge.ring import Ring, RingUnavailable, Rows, encode, read_records

if "numpy" in sys.modules:
    import sqlite_utils
else:
    # sqlite-utils imports numpy, when installed, only to map numpy's scalar types to column types; the store makes
    # its tables from Python types and never writes a numpy value. numpy was the largest import of the supervisor
    # (a third of it on a PC, seconds on a slow board's boot): hidden while sqlite-utils loads, it is never imported.
    sys.modules["numpy"] = None  # type: ignore[assignment]
    try:
        import sqlite_utils
    finally:
        del sys.modules["numpy"]

log = logging.getLogger(__name__)

PENDING_MAX = 10000  # rows held in memory while the disk is full
# The samples table is pruned when a sixth of keep_samples rows have been written since the last pruning: each pruning
# rewrites the B-tree pages at the table's old end (and the free list), a cost per pruning, not per row deleted.
SAMPLES_PRUNE_PARTS = 6
RECENT_S = 3600.0  # raw samples kept in memory: the status page's hour (status_page.HISTORY_S) at full resolution
RECENT_MAX = 3600  # and at most this many (an hour at a sample a second; the page thins them to 600 points anyway)
HELD_MAX = 2000  # request rows held for the next commit (with request_flush): committed at this count whatever the time


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


def _v5_samples(db: sqlite_utils.Database) -> None:
    """The status page's history (llmos_edge/sampler.py): one row every database.sample_interval seconds."""
    db.table("samples").create(
        {
            "id": int,
            "start_id": int,
            "at": float,
            "celsius": float,  # the governor's controlled zone; NULL without a thermal sensor
            "share": float,  # CPU share the governor granted the engine, 0..1
            "tokens": int,  # tokens generated by the requests that finished in the interval
            "tok_s": float,  # their decode speed (tokens after the first / decode seconds); NULL when none finished
            "queue": int,  # requests waiting, all classes
            "rss_supervisor": int,  # bytes
            "rss_engine": int,  # bytes, 0 while no worker runs
            "mem_available": int,  # bytes (MemAvailable)
        },
        pk="id",
        foreign_keys=[("start_id", "starts", "id")],
    )
    db.table("samples").create_index(["at"])


def _fts(db: sqlite_utils.Database, table: str, columns: tuple[str, ...]) -> None:
    """An external-content FTS5 index over `columns` of `table`, kept in step by triggers (SQL written out here, not
    sqlite-utils' enable_fts, so that a released migration cannot change with a library upgrade)."""
    cols = ", ".join(columns)
    new = ", ".join(f"new.{c}" for c in columns)
    old = ", ".join(f"old.{c}" for c in columns)
    fts = f"{table}_fts"
    db.execute(
        f"CREATE VIRTUAL TABLE [{fts}] USING fts5({cols}, content=[{table}], content_rowid=id, "
        "tokenize='unicode61 remove_diacritics 2')"
    )
    db.execute(
        f"CREATE TRIGGER [{table}_ai] AFTER INSERT ON [{table}] BEGIN "
        f"INSERT INTO [{fts}](rowid, {cols}) VALUES (new.id, {new}); END"
    )
    db.execute(
        f"CREATE TRIGGER [{table}_ad] AFTER DELETE ON [{table}] BEGIN "
        f"INSERT INTO [{fts}]([{fts}], rowid, {cols}) VALUES ('delete', old.id, {old}); END"
    )
    db.execute(
        f"CREATE TRIGGER [{table}_au] AFTER UPDATE ON [{table}] BEGIN "
        f"INSERT INTO [{fts}]([{fts}], rowid, {cols}) VALUES ('delete', old.id, {old}); "
        f"INSERT INTO [{fts}](rowid, {cols}) VALUES (new.id, {new}); END"
    )


def _v6_learning(db: sqlite_utils.Database) -> None:
    """Taught pairs (llmos_edge/learning.py) and conversation memory (llmos_edge/memory.py), both searchable with
    FTS5; and on each request row, the taught pair that answered it and the earlier turns recalled for it."""
    db.execute(
        "CREATE TABLE taught (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, question TEXT NOT NULL, "
        "answer TEXT NOT NULL, source TEXT NOT NULL, taught_at REAL NOT NULL)"
    )
    _fts(db, "taught", ("question", "answer"))
    db.execute(
        "CREATE TABLE turns (id INTEGER PRIMARY KEY, source TEXT NOT NULL, at REAL NOT NULL, "
        "question TEXT NOT NULL, answer TEXT NOT NULL, request_id INTEGER)"
    )
    db.execute("CREATE INDEX turns_source_at ON turns(source, at)")
    _fts(db, "turns", ("question", "answer"))
    db.table("requests").add_column("taught_id", int)
    db.table("requests").add_column("recalled", str)  # ids of the turns recalled into the prompt, comma-separated


def _v7_consolidation(db: sqlite_utils.Database) -> None:
    """Consolidation of taught pairs into the built-in model's weights (consolidation.py): one row per run (its
    outcome, the model version it made, the pairs it trained, its report), and on each taught pair the run whose
    model learnt its answer."""
    db.execute(
        "CREATE TABLE consolidations (id INTEGER PRIMARY KEY, started_at REAL NOT NULL, finished_at REAL, "
        "outcome TEXT, model TEXT, pairs TEXT, report TEXT)"
    )
    db.table("taught").add_column("consolidated", int)


def _v8_ring(db: sqlite_utils.Database) -> None:
    """The request ring (ring.py): this database's epoch, which ring records belong to it (a database moved aside or
    deleted must not take another's records), and the newest record it has taken."""
    db.execute(
        "CREATE TABLE ring (id INTEGER PRIMARY KEY CHECK (id = 1), epoch INTEGER NOT NULL, applied INTEGER NOT NULL)"
    )
    db.execute("INSERT INTO ring VALUES (1, ?, 0)", [secrets.randbits(62)])


def _v9_samples_no_at_index(db: sqlite_utils.Database) -> None:
    """Samples are read newest first by primary key (Store.samples_since: ids grow with time, and the last hour is
    in memory anyway), never looked up by `at`: its index only cost every commit and pruning its own page writes."""
    db.execute("DROP INDEX IF EXISTS idx_samples_at")


# Append-only: a migration, once released, is never edited; user_version counts how many have run.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _v1,
    _v2_preemptions,
    _v3_voice,
    _v4_models,
    _v5_samples,
    _v6_learning,
    _v7_consolidation,
    _v8_ring,
    _v9_samples_no_at_index,
]


def _prune(db: sqlite_utils.Database, keep: dict[str, int]) -> None:
    """Delete all but the newest `keep[table]` rows of each table (ids grow with time), inside the caller's
    transaction."""
    for table, n in keep.items():
        db.execute(f"DELETE FROM [{table}] WHERE id <= (SELECT MAX(id) FROM [{table}]) - ?", [n])


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """One transaction: everything in the block is committed, or none of it.

    Not `with db.conn:`: sqlite3's connection context manager begins nothing (it only commits on exit), so each
    sqlite-utils call inside it ran in its own transaction, committed before the next one started: a batch that failed
    half-way was half in the database (and inserted again on the retry), and a migration could be committed without
    its user_version. Inside this block sqlite-utils' own `atomic()` nests as a savepoint. BEGIN IMMEDIATE, unlike
    `db.atomic()`'s BEGIN, takes the write lock before anything is read, so a writer in another process is waited for
    (up to the busy timeout) instead of failing at once when the transaction, having read, tries to write.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.rollback()  # a no-op when SQLite has already rolled back by itself (a full disk, an I/O error)
        raise


def _disk_trouble(e: sqlite3.Error) -> bool:
    """A full disk or a failing write: the rows are kept in memory and written when the disk recovers."""
    return getattr(e, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)


def _corrupt(e: sqlite3.Error) -> bool:
    """The file is not a database, or its image is malformed: the only errors that move a database aside."""
    return getattr(e, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _locked(e: sqlite3.Error) -> bool:
    return getattr(e, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class Store:
    def __init__(
        self,
        path: str | os.PathLike[str],
        keep_requests: int = 100000,
        *,
        keep_events: int = 100000,
        keep_voice: int = 100000,
        keep_samples: int = 8640,
        samples_per_commit: int = 1,
        samples_per_row: int = 1,
        request_flush: float = 0.0,
        lock_timeout: float = 10.0,
    ) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._disk_full_logged = False
        self.start_id = 0
        self.recovered_from = ""  # path of a corrupt database moved aside at open
        self.degraded = ""  # why the database is locked to this process (a full disk at open), for /status
        self._lock_timeout = lock_timeout
        self.keep_samples = keep_samples
        self._samples_written = 0  # sample rows committed by this process
        self._samples_pruned = 0  # _samples_written at the last pruning
        # Samples wait in memory and are committed this many at a time: each commit costs the flash about 15 kB
        # (measured on ext4: WAL frames, fsync, the file system's journal), and a sample every 10 s committed alone
        # would write about 125 MB a day to an idle device. A power cut loses the samples still held: a gap in a plot.
        self.samples_per_commit = max(1, samples_per_commit)
        # And this many consecutive samples are averaged into one row (database.sample_row): fewer rows, fewer pages
        # written per commit and fewer prunings. The raw samples of the last hour stay in memory for the status page.
        self.samples_per_row = max(1, samples_per_row)
        self._row_samples: list[dict[str, Any]] = []  # samples of the row being filled
        self._held_samples: list[dict[str, Any]] = []  # rows (averaged) waiting for their commit
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_MAX)
        # Request rows (with their turns) held for one commit every `request_flush` seconds, each made durable at once
        # in the request ring (ring.py); 0: each request committed on its own, no ring.
        self.request_flush = request_flush
        self.ring: Ring | None = None
        self.ring_off = ""  # why request rows are committed one by one although request_flush asks for batches
        self.replayed = 0  # ring records taken into the database at open: rows a power cut left uncommitted
        self._held: Rows = []
        self._held_since = 0.0  # time.monotonic() of the oldest held row
        self._held_seq = 0  # the ring record of the newest held row
        self._ring_mark = 0  # ring.written_bytes at the last commit of held rows
        self._ids: dict[str, int] = {}  # the last id given to a held row of each table
        self.db = self._open()
        try:
            self._migrate()
            self._sample_blank = {c: None for c in self.db["samples"].columns_dict if c != "id"}
            if request_flush > 0:
                self._open_ring()
            self._retain(
                {"requests": keep_requests, "events": keep_events, "voice": keep_voice, "samples": keep_samples}
            )
        except sqlite3.OperationalError as e:
            self.db.conn.close()
            raise self._open_error(e) from None
        except BaseException:
            self.db.conn.close()
            raise

    # -- opening -------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A lock held by another process is waited for up to lock_timeout seconds.
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=self._lock_timeout)
        except (OSError, sqlite3.OperationalError) as e:
            raise UserError(
                f"cannot open the database {self.path}: {e}",
                "check that database.path is on a writable filesystem",
            ) from None
        return conn

    def _open_error(self, e: sqlite3.Error) -> UserError:
        if _locked(e):
            return UserError(
                f"the database {self.path} is locked by another process (waited {self._lock_timeout:g} s)",
                "is another llmos running on it? stop it (`fuser -v` on the file shows who holds it), or set "
                "database.path",
                passing=True,
            )
        return UserError(
            f"cannot use the database {self.path}: {e}",
            "check that its filesystem is mounted read-write, has free space and is healthy (`dmesg`); the file was "
            "left where it is",
        )

    def _open(self) -> sqlite_utils.Database:
        conn: sqlite3.Connection | None = None
        try:
            conn, ok = self._connect_checked()
        except sqlite3.DatabaseError as e:
            if not _corrupt(e):
                # A lock, an I/O error, a read-only filesystem: the file may be perfectly good. Never move it for that.
                raise self._open_error(e) from None
            ok = False
        if not ok:
            if conn is not None:
                conn.close()
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
            self.recovered_from = str(aside)
            log.error("database %s failed its integrity check; moved it to %s and started a new one", self.path, aside)
            try:
                conn, _ = self._connect_checked()
            except sqlite3.DatabaseError as e:
                raise self._open_error(e) from None
        assert conn is not None
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return sqlite_utils.Database(conn)

    def _connect_checked(self) -> tuple[sqlite3.Connection, bool]:
        """Connect in WAL mode and run quick_check: (connection, whether it passed).

        On a full disk SQLite cannot create the WAL index (the -shm file, removed at a clean close: "disk I/O error",
        SQLITE_IOERR_SHMSIZE) and the database cannot even be read. Exclusive locking mode keeps the index in memory
        instead: the appliance starts, rows wait in memory until there is room, and only other processes (`llmos
        logs`) are locked out until the next start. Better than an appliance that cannot start until someone frees
        space."""
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return conn, conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        except sqlite3.DatabaseError as e:
            conn.close()
            if not _disk_trouble(e):
                raise
            first = e
        conn = self._connect()
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute("PRAGMA journal_mode=WAL")
            ok = conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        except sqlite3.DatabaseError:
            conn.close()
            raise first from None
        self.degraded = f"the disk was full at start ({first}): no other process can read the database until a restart"
        log.error("database %s: %s", self.path, self.degraded)
        return conn, ok

    def _migrate(self) -> None:
        while True:
            with transaction(self.db):  # the migration and its user_version, or neither
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                if version > len(MIGRATIONS):
                    raise UserError(
                        f"the database {self.path} is from a newer llmos-edge (schema {version})",
                        "update llmos-edge, or move the database aside",
                    )
                if version == len(MIGRATIONS):
                    return
                MIGRATIONS[version](self.db)
                self.db.execute(f"PRAGMA user_version={version + 1}")

    def _open_ring(self) -> None:
        """Open the request ring beside the database and take into the database the records it has not taken yet
        (the rows of requests answered before a power cut or a kill, since the last commit)."""
        epoch, applied = self.db.execute("SELECT epoch, applied FROM ring WHERE id = 1").fetchone()
        try:
            self.ring = Ring(self.path.with_name(self.path.name + ".ring"), int(epoch))
            records = [r for r in self.ring.scan() if r.seq > applied]
        except (RingUnavailable, OSError) as e:
            self.ring = None
            self.ring_off = f"no request ring ({e}): each request is committed on its own"
            log.warning("%s", self.ring_off)
            return
        if records:
            rows = [row for rec in records for row in rec.rows]
            with transaction(self.db):
                for t, r in rows:
                    self.db.table(t).insert(r, replace=True)
                self.db.execute("UPDATE ring SET applied = ? WHERE id = 1", [records[-1].seq])
            self.replayed = len(records)
            log.warning("took %d request records from the ring into the database (an unclean stop)", len(records))

    def _retain(self, keep: dict[str, int]) -> None:
        """Delete all but the newest `keep[table]` rows of each table, at start (ids grow with time)."""
        try:
            with transaction(self.db):
                _prune(self.db, keep)
        except sqlite3.OperationalError as e:
            if not _disk_trouble(e):
                raise
            # Deleting needs room in the WAL too: on a full disk start anyway, and prune at the next start.
            log.error("could not prune old rows (%s); the database keeps them until the next start", e)

    # -- writing -------------------------------------------------------------------------------------------
    def _write(self, table: str, row: dict[str, Any], also: Sequence[tuple[str, dict[str, Any]]] = ()) -> int | None:
        """Insert (or upsert by id) a row, and the rows `also` names after it in the same transaction (one commit,
        one fsync, however many tables); on a full disk keep them for the next write. Returns the first row's id."""
        with self._lock:
            return self._write_locked(table, row, also)

    def _write_locked(
        self,
        table: str,
        row: dict[str, Any],
        also: Sequence[tuple[str, dict[str, Any]]],
        keep: dict[str, int] | None = None,
    ) -> int | None:
        """_write, for a caller that holds the lock; `keep` prunes those tables to that many rows in the same
        commit (a prune of its own would cost the flash a second commit)."""
        first = len(self._pending)
        self._pending.append((table, row))
        self._pending.extend(also)
        try:
            ids: list[Any] = []
            # One transaction: on failure none of the batch is committed, and all of it stays pending.
            with transaction(self.db):
                for t, r in self._pending:
                    ids.append(self.db.table(t).insert(r, replace=True).last_pk)
                _prune(self.db, keep or {})
            self._pending.clear()
            self._disk_full_logged = False
            return int(ids[first]) if ids[first] is not None else None
        except sqlite3.OperationalError as e:
            if not _disk_trouble(e):
                # not a disk that will recover: keeping these rows would fail every later write
                del self._pending[first:]
                raise
            if not self._disk_full_logged:
                log.error("database write failed (%s); keeping rows in memory until there is room", e)
                self._disk_full_logged = True
            del self._pending[:-PENDING_MAX]
            return None

    @property
    def pending(self) -> int:
        """Rows held in memory because the disk failed them (not a row whose write is merely under way)."""
        return len(self._pending) if self._disk_full_logged else 0

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

    def record_request(self, row: dict[str, Any], also: Sequence[tuple[str, dict[str, Any]]] = ()) -> None:
        """A finished request's row, with the rows that belong to it (its conversation turn): one commit, or, with
        the ring, one durable ring record now and a place in the next batch commit."""
        first = {"start_id": self.start_id or None, **row}
        if self.ring is None:
            self._write("requests", first, also)
            return
        rows: Rows = [("requests", first), *((t, dict(r)) for t, r in also)]
        with self._lock:
            for t, r in rows:
                if r.get("id") is None:  # ids given now, so a replayed record is the same row (insert or replace)
                    r["id"] = self._ids[t] = self._next_id(t)
            payload = encode(rows)
            try:
                if not self.ring.fits(payload):
                    raise OSError(f"a record of {len(payload)} bytes is too large for the ring")
                seq = self.ring.append(payload)
            except OSError as e:
                log.error("request ring: %s; committing this request on its own", e)
                seq = 0
            if seq:
                self._held.extend(rows)
                self._held_seq = seq
                self._held_since = self._held_since or time.monotonic()
        if not seq:
            self._write(rows[0][0], rows[0][1], rows[1:])
        elif self._commit_due():
            self.flush()

    def _next_id(self, table: str) -> int:
        """The id after the newest of `table`, committed or held. Caller holds the lock."""
        if table not in self._ids:
            self._ids[table] = int(self.db.execute(f"SELECT COALESCE(MAX(id), 0) FROM [{table}]").fetchone()[0])
        return self._ids[table] + 1

    def _commit_due(self) -> bool:
        if not self._held:
            return False
        assert self.ring is not None
        return (
            time.monotonic() - self._held_since >= self.request_flush
            or len(self._held) >= HELD_MAX
            # records past a quarter of the ring since the last commit: commit before the ring could wrap onto them
            or self.ring.written_bytes - self._ring_mark >= self.ring.size // 4
        )

    def _take_held(self) -> Rows:
        """The held request rows and the ring's progress row, to commit together. Caller holds the lock."""
        if not self._held or self.ring is None:
            return []
        rows, self._held = self._held, []
        self._held_since = 0.0
        self._ring_mark = self.ring.written_bytes
        rows.append(("ring", {"id": 1, "epoch": self.ring.epoch, "applied": self._held_seq}))
        return rows

    def ring_line(self) -> str:
        """For /status: where request rows wait for their commit."""
        if self.request_flush <= 0:
            return ""
        if self.ring is None:
            return self.ring_off
        with self._lock:
            n = sum(1 for t, _ in self._held if t == "requests")
        return f"ring: {n} requests held, committed every {self.request_flush:g} s"

    def held(self, table: str) -> list[dict[str, Any]]:
        """Rows of `table` in the ring and not yet committed (with their ids): readers add them to what they read."""
        with self._lock:
            return [dict(r) for t, r in self._held if t == table]

    def flush(self, *, samples: bool = True) -> None:
        """Commit what is held in memory, request rows and (unless told not to) samples, in one transaction."""
        with self._lock:  # taken and written in one hold: no other writer may slip between (their ids are given)
            rows = self._take_held()
            held: list[dict[str, Any]] = []
            if samples:
                held, self._held_samples = self._held_samples, []
            rows += [("samples", r) for r in held]
            self._samples_written += len(held)
            prune = self._samples_written - self._samples_pruned >= self.prune_every
            if prune:
                self._samples_pruned = self._samples_written
            if rows:
                self._write_locked(rows[0][0], rows[0][1], rows[1:], {"samples": self.keep_samples} if prune else None)

    @property
    def prune_every(self) -> int:
        """Sample rows written between two prunings of the samples table: the table holds at most keep_samples and
        this many more."""
        return max(1, self.keep_samples // SAMPLES_PRUNE_PARTS)

    def record_voice(self, row: dict[str, Any]) -> None:
        self._write("voice", {"start_id": self.start_id or None, **row})

    def record_sample(self, row: dict[str, Any]) -> None:
        """A sample of the status page's history. Unlike the other tables, samples arrive at a steady rate for as long
        as the device runs (months between restarts), so they are also pruned as they are written, not only at start.
        Every `samples_per_row` samples are averaged into one row (`average_samples`), and rows are held and
        committed `samples_per_commit` samples' worth at a time (see __init__); the raw samples of the last hour are
        kept in memory for `samples_since`."""
        # every column, as a row read back from the table has them: the status page reads memory and rows alike
        sample = {**self._sample_blank, "start_id": self.start_id or None, **row}
        with self._lock:
            self._recent.append(sample)
            newest = float(sample.get("at") or 0.0)
            while self._recent and float(self._recent[0].get("at") or 0.0) < newest - RECENT_S:
                self._recent.popleft()
            self._row_samples.append(sample)
            if len(self._row_samples) >= self.samples_per_row:
                self._held_samples.append(average_samples(self._row_samples))
                self._row_samples = []
            full = len(self._held_samples) * self.samples_per_row >= self.samples_per_commit
            due = (bool(self._held_samples) and full) or self._commit_due()
        if due:  # held request rows go in the same commit; the sampler's tick is also their clock
            self.flush()

    # -- the model registry (model_store.py) ---------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.db["models"].rows_where(order_by="id")]

    def update_models(self, rows: list[dict[str, Any]]) -> None:
        """Insert or replace registry rows in one transaction: an activation changes two rows, never one of them.
        Unlike request rows these are not held back on a full disk: the caller must know the change failed."""
        with self._lock:
            try:
                with transaction(self.db):
                    for row in rows:
                        self.db.table("models").insert(row, replace=True)
            except sqlite3.Error as e:
                raise UserError(
                    f"cannot update the model registry in {self.path}: {e}",
                    "free space on /var (`/status` shows the database); the model store was left as it was",
                ) from None

    # -- taught pairs and conversation memory (learning.py, memory.py) ---------------------------------------
    @contextlib.contextmanager
    def locked(self, *, write: bool = False, fresh: bool = True) -> Iterator[sqlite_utils.Database]:
        """The database for a few statements of another module, with no other thread's in between; `write`: inside
        one transaction. Unlike request rows, these writes are not held back on a full disk: a person who taught
        the device something must hear at once that it was not kept. `fresh`: commit the held request rows first,
        as a caller that reads or writes among them (turns, by their ids) needs; a caller that only counts passes
        False and adds `held()` itself, so a status page that polls does not commit on every poll."""
        if fresh:
            self.flush(samples=False)
        with self._lock:
            if write:
                try:
                    with transaction(self.db):
                        yield self.db
                finally:
                    self._ids.clear()  # the caller may have inserted rows: ask the database for the next ids again
            else:
                yield self.db

    # -- reading -------------------------------------------------------------------------------------------
    def recent_requests(self, n: int = 10) -> list[dict[str, Any]]:
        with self._lock:
            rows = list(self.db["requests"].rows_where(order_by="id desc", limit=n))
        return (rows[::-1] + self.held("requests"))[-n:]

    def recent_events(self, n: int = 10, kinds: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """The newest `n` events, oldest first; only those of the given kinds when `kinds` names some."""
        where = f"kind IN ({', '.join('?' * len(kinds))})" if kinds else None
        with self._lock:
            rows = list(self.db["events"].rows_where(where, list(kinds), order_by="id desc", limit=n))
        return rows[::-1]

    def recent_starts(self, n: int = 10) -> list[dict[str, Any]]:
        with self._lock:
            rows = list(self.db["starts"].rows_where(order_by="id desc", limit=n))
        return rows[::-1]

    def samples_since(self, at: float) -> list[dict[str, Any]]:
        """Samples taken after `at` (time.time()), oldest first: the raw samples this process keeps in memory (its
        last hour), and before the oldest of them, the rows in the database (averaged; an earlier start's).

        The database is read newest first by primary key, stopping at the first row not after `at`: ids grow with
        time, so no index on `at` is needed (one would cost page writes at every commit)."""
        with self._lock:
            recent = [dict(r) for r in self._recent if float(r.get("at") or 0.0) > at]
            before = float(self._recent[0].get("at") or 0.0) if self._recent else float("inf")
            older: list[dict[str, Any]] = []
            for r in self.db["samples"].rows_where(order_by="id desc"):
                if r["at"] is None or r["at"] <= at:
                    break
                if r["at"] < before:
                    older.append(r)
        return older[::-1] + recent

    def finished_since(self, after_id: int) -> tuple[int, int, int, float, int]:
        """Requests recorded after request `after_id`: (the newest id, tokens generated, tokens decoded after each
        answer's first, seconds spent decoding those, how many requests). Decode seconds are derived from each row's
        tok_s, as /metrics counts them."""
        decoding = "tok_s > 0 AND tokens_out > 1"
        with self._lock:
            row = self.db.execute(
                f"SELECT MAX(id), SUM(tokens_out), SUM(CASE WHEN {decoding} THEN tokens_out - 1 ELSE 0 END), "
                f"SUM(CASE WHEN {decoding} THEN (tokens_out - 1) / tok_s ELSE 0 END), COUNT(*) "
                "FROM requests WHERE id > ?",
                [after_id],
            ).fetchone()
        newest, tokens, decoded, seconds, n = (
            int(row[0] or after_id),
            int(row[1] or 0),
            int(row[2] or 0),
            float(row[3] or 0.0),
            int(row[4]),
        )
        for r in self.held("requests"):
            if r["id"] > after_id:
                out = int(r.get("tokens_out") or 0)
                tok_s = float(r.get("tok_s") or 0.0)
                newest, tokens, n = max(newest, r["id"]), tokens + out, n + 1
                if tok_s > 0 and out > 1:
                    decoded, seconds = decoded + out - 1, seconds + (out - 1) / tok_s
        return newest, tokens, decoded, seconds, n

    def last_request_id(self) -> int:
        with self._lock:
            committed = int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM requests").fetchone()[0])
        return max([committed] + [int(r["id"]) for r in self.held("requests")])

    def integrity_ok(self) -> bool:
        with self._lock:
            return bool(self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok")

    def close(self) -> None:
        with self._lock:  # a row not yet full is written as the average of what it has
            if self._row_samples:
                self._held_samples.append(average_samples(self._row_samples))
                self._row_samples = []
        try:
            self.flush()
        except sqlite3.Error as e:
            log.warning("could not write the held samples and request rows at close: %s", e)
        with self._lock:
            if self.ring is not None:
                self.ring.close()
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("checkpoint at close failed: %s", e)
            self.db.conn.close()


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def average_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row for consecutive samples of one start (sampler.py's columns): the mean time (the middle of the
    interval), the mean of each measurement over the samples that have it (NULL when none has: a plot keeps its
    gap), the tokens summed (they belong to the requests that finished in the whole interval), their decode speed as
    the whole interval's (tokens over the summed decode seconds, each sample's weighted by its tokens), and the queue's
    peak (the status page tells the most that waited at once)."""
    if len(samples) == 1:
        return dict(samples[0])
    row: dict[str, Any] = {"start_id": samples[0].get("start_id")}
    keys = [k for k in dict.fromkeys(k for s in samples for k in s) if k not in ("start_id", "id")]
    for key in keys:
        values = [s[key] for s in samples if s.get(key) is not None]
        if key == "tokens":
            row[key] = sum(int(v) for v in values) if values else None
        elif key == "queue":
            row[key] = max(values) if values else None
        elif key == "tok_s":
            speeds = [(float(s["tok_s"]), int(s.get("tokens") or 0)) for s in samples if s.get("tok_s")]
            tokens = sum(t for _, t in speeds)
            if tokens > 0:
                row[key] = round(tokens / sum(t / v for v, t in speeds), 2)
            else:
                mean = _mean([v for v, _ in speeds])
                row[key] = round(mean, 2) if mean is not None else None
        elif values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            row[key] = round(sum(values) / len(values))
        elif values and all(isinstance(v, (int, float)) for v in values):
            row[key] = round(sum(float(v) for v in values) / len(values), 3)  # a millidegree, a millisecond
        else:
            row[key] = values[-1] if values else None
    return row


def open_readonly(path: str | os.PathLike[str]) -> sqlite_utils.Database:
    """For `llmos logs`: read a live database without taking part in its writes."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"no database at {p}", "run `llmos run` first, or pass --db PATH")
    conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    return sqlite_utils.Database(conn)


def uncommitted(db: sqlite_utils.Database, path: str | os.PathLike[str], table: str) -> list[dict[str, Any]]:
    """For `llmos logs`: rows of `table` that a running (or cut off) supervisor has in its request ring and not yet
    in the database, oldest first."""
    ring = Path(str(path) + ".ring")
    if not db["ring"].exists() or not ring.exists():
        return []
    epoch, applied = db.execute("SELECT epoch, applied FROM ring WHERE id = 1").fetchone()
    committed = int(db.execute(f"SELECT COALESCE(MAX(id), 0) FROM [{table}]").fetchone()[0])
    rows = [r for rec in read_records(ring, int(epoch), int(applied)) for t, r in rec.rows if t == table]
    # a commit may land between the two reads: a row both committed and in the ring is shown once
    return [r for r in rows if int(r.get("id") or 0) > committed]
