"""The request ring: a durable log of answered requests' rows between two database commits (issue 14, point 5).

Why: a SQLite commit costs the flash 15 to 45 kB (WAL frames of whole pages, the fsync, the FTS5 segment a turn
adds, ext4's journal: measured on an ext4 loop device), so a row committed per request at one request a minute
writes 21 to 65 MB a day. Committed 60 at a time, the same rows cost about 1.9 kB each. But a request answered before
a power cut must keep its row. So each answered request's rows are first written here, as one record of whole
512-byte sectors with O_DIRECT and O_DSYNC into a preallocated file that never changes size (no file system
metadata, no journal, no page cache: the card receives the record's sectors and nothing else, about 0.6 kB for a
typical request), and the database takes them in batches (store.py). At the next start the records the database has
not taken are replayed into it.

Layout: a file of RING_BYTES, written with zeros once. A record starts on a sector boundary with a header (magic,
the database's epoch, a sequence number, the payload's length and CRC-32) followed by the payload (zlib-compressed
JSON), padded to whole sectors. Records are appended after the newest one and wrap to the start of the file; the
store commits its held rows before the ring could wrap onto a record it has not taken. A record torn by a power cut
fails its CRC and is ignored: its write never returned, so its request never got its answer's end.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RING_BYTES = 4 << 20  # ~4000 typical records: hours of requests between commits, whatever the batch setting
MAGIC = b"LLRQ"
HEADER = struct.Struct("<4sQQII")  # magic, epoch, seq, payload length, payload crc32
SECTOR_SIZES = (512, 4096)  # the logical block sizes O_DIRECT may require: 512 (SD, eMMC, virtio), 4096 (4Kn drives)

Rows = list[tuple[str, dict[str, Any]]]


class RingUnavailable(Exception):
    """The file system cannot do unbuffered synchronous writes here (some FUSE and network file systems; tmpfs before
    Linux 6.6)."""


@dataclass(frozen=True)
class Record:
    seq: int
    offset: int
    length: int  # of the payload
    rows: Rows


def encode(rows: Rows) -> bytes:
    return zlib.compress(json.dumps(rows, separators=(",", ":"), ensure_ascii=False).encode(), 6)


def decode(payload: bytes) -> Rows:
    return [(str(t), dict(r)) for t, r in json.loads(zlib.decompress(payload))]


def read_records(path: str | os.PathLike[str], epoch: int, after: int = 0) -> list[Record]:
    """The intact records of `epoch` in the ring file at `path` newer than `after`, oldest first. Also for readers
    in other processes (`llmos logs`): plain reads, no lock, nothing written."""
    with open(path, "rb") as f:
        data = f.read()
    found: list[Record] = []
    off = 0
    step = SECTOR_SIZES[0]  # records start on boundaries of the device's sector, a multiple of this
    while off + HEADER.size <= len(data):
        magic, rec_epoch, seq, length, crc = HEADER.unpack_from(data, off)
        end = off + HEADER.size + length
        if magic == MAGIC and rec_epoch == epoch and end <= len(data):
            payload = data[off + HEADER.size : end]
            if zlib.crc32(payload) == crc:
                try:
                    rows = decode(payload)
                except (ValueError, zlib.error, TypeError):
                    rows = None
                if rows is not None:
                    if seq > after:
                        found.append(Record(seq, off, length, rows))
                    off += -(-(end - off) // step) * step
                    continue
        off += step
    found.sort(key=lambda r: r.seq)
    return found


class Ring:
    def __init__(self, path: str | os.PathLike[str], epoch: int, size: int = RING_BYTES) -> None:
        """Open (creating it when missing or of another size) the ring file for the database whose epoch is `epoch`.
        Raises RingUnavailable when the file system refuses O_DIRECT."""
        self.path = Path(path)
        self.epoch = epoch
        self.size = size
        self._prepare()
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise RingUnavailable(f"{self.path.parent} does not support O_DIRECT") from None
            raise
        self.sector = self._probe_sector()
        self._buf = mmap.mmap(-1, 1 << 16)  # page-aligned, as O_DIRECT requires; grown for a larger record
        self.head = 0  # where the next record goes
        self.next_seq = 1
        self.written_bytes = 0  # bytes sent to the device by appends since open

    def _prepare(self) -> None:
        try:
            if self.path.stat().st_size == self.size:
                return
        except FileNotFoundError:
            pass
        # Real zeros, not a sparse file or fallocate's unwritten extents: a write into those changes the extent tree
        # (file system metadata, the journal), which is what the ring exists to avoid.
        tmp = self.path.with_name(self.path.name + ".new")
        with open(tmp, "wb") as f:
            chunk = b"\0" * (1 << 20)
            for _ in range(self.size // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _probe_sector(self) -> int:
        """The smallest write unit O_DIRECT accepts on this device: a write of it over the file's last sector (zeros
        or an old record's tail, never a live record's header, since records are written from the start)."""
        buf = mmap.mmap(-1, max(SECTOR_SIZES))
        try:
            for size in SECTOR_SIZES:
                try:
                    os.preadv(self.fd, [memoryview(buf)[:size]], self.size - size)
                    os.pwritev(self.fd, [memoryview(buf)[:size]], self.size - size)
                    return size
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
        finally:
            buf.close()
        os.close(self.fd)
        raise RingUnavailable(f"{self.path}: no O_DIRECT write size of {SECTOR_SIZES} is accepted")

    def scan(self) -> list[Record]:
        """Every intact record of this epoch, oldest first; the next append goes after the newest."""
        found = read_records(self.path, self.epoch)
        if found:  # the next record goes after the newest (older ones are all committed, or are about to be)
            last = found[-1]
            self.next_seq = last.seq + 1
            self.head = last.offset + self._sectors(last.length) * self.sector
        return found

    def _sectors(self, length: int) -> int:
        return -(-(HEADER.size + length) // self.sector)

    def fits(self, rows_payload: bytes) -> bool:
        """Whether a record this large may go into the ring at all (at most a quarter of it)."""
        return self._sectors(len(rows_payload)) * self.sector <= self.size // 4

    def append(self, payload: bytes) -> int:
        """Write one record durably (the call returns once the device has it) and return its sequence number."""
        n = self._sectors(len(payload))
        nbytes = n * self.sector
        if self.head + nbytes > self.size:
            self.head = 0
        if len(self._buf) < nbytes:
            self._buf.close()
            self._buf = mmap.mmap(-1, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
        seq = self.next_seq
        self._buf.seek(0)
        self._buf.write(HEADER.pack(MAGIC, self.epoch, seq, len(payload), zlib.crc32(payload)))
        self._buf.write(payload)
        self._buf.write(b"\0" * (nbytes - HEADER.size - len(payload)))
        os.pwritev(self.fd, [memoryview(self._buf)[:nbytes]], self.head)
        self.head += nbytes
        self.next_seq += 1
        self.written_bytes += nbytes
        return seq

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        self._buf.close()
