"""A disk whose write cache is lost at a power cut, for QEMU: a raw image served over NBD by nbdkit through its cache
filter in writeback mode.

Killing QEMU alone is a crash, not a power cut: every write QEMU has issued sits in the host's page cache and reaches
the file anyway. Here the guest's writes are held in nbdkit's cache (a temporary file, unlinked at once) and reach
the image file only when the guest flushes (NBD_CMD_FLUSH: fsync, fdatasync, a journal commit, a FUA write through
QEMU). SIGKILL of nbdkit then loses exactly what a disk with a volatile write cache would lose: every write not yet
flushed.

  disk = VolatileDisk(image, workdir); disk.start()      # then QEMU with -drive {disk.drive()}
  disk.cut()                                             # the power cut: unflushed writes are gone
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

NBDKIT = "nbdkit"


class VolatileDiskError(Exception):
    """nbdkit is missing or did not start; one sentence and a hint."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message + (f" (hint: {hint})" if hint else ""))


class VolatileDisk:
    """nbdkit serving `image` on a Unix socket in `workdir`, writes held in memory-backed cache until a flush."""

    def __init__(self, image: Path, workdir: Path, log_path: Path | None = None) -> None:
        self.image = image
        self.workdir = workdir
        self.socket = workdir / "nbd.sock"
        self.pidfile = workdir / "nbdkit.pid"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        path = shutil.which(NBDKIT)
        if path is None:
            raise VolatileDiskError("nbdkit is not installed", "install it: make image-deps (Debian package nbdkit)")
        return [
            path,
            "--foreground",
            "--exit-with-parent",  # a test run that dies takes its disks with it
            "--pidfile", os.fspath(self.pidfile),  # written once nbdkit listens
            "--unix", os.fspath(self.socket),
            "--filter=cache",
            "file", f"file={self.image}",
            "cache=writeback",  # the cache filter's: writes reach the file only on a flush
        ]  # fmt: skip

    def start(self, timeout: float = 30) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)
        cache_dir = self.workdir / "cache"  # the cache filter's temporary file (unlinked as soon as it is made)
        cache_dir.mkdir(exist_ok=True)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TMPDIR": os.fspath(cache_dir)},
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise VolatileDiskError(f"nbdkit exited with status {self.proc.returncode} at start", "see its log")
            if self.pidfile.exists() and self.pidfile.read_text().strip():
                return
            if time.monotonic() > deadline:
                self.cut()
                raise VolatileDiskError(f"nbdkit did not listen on {self.socket} within {timeout:.0f} s")
            time.sleep(0.05)

    def drive(self) -> str:
        """QEMU's -drive value (no bootindex: the device is added by the caller). cache=writeback makes QEMU pass
        the guest's flushes on as NBD flushes."""
        return f"file=nbd+unix:///?socket={self.socket},format=raw,if=none,id=disk,cache=writeback"

    def cut(self) -> None:
        """SIGKILL by PID: what the cache held is gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# -- a minimal NBD client (fixed newstyle handshake, simple replies), for checking the disk itself --------------
NBD_OPT_EXPORT_NAME = 1
NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES = 1, 2
NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC, NBD_CMD_FLUSH = 0, 1, 2, 3


class NbdClient:
    """Enough of the NBD protocol to write, read and flush: to show that the disk loses what was not flushed."""

    def __init__(self, socket_path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(os.fspath(socket_path))
        self.handle = 0
        magic, opt_magic, flags = struct.unpack(">8s8sH", self._read(18))
        if magic != b"NBDMAGIC" or opt_magic != b"IHAVEOPT":
            raise VolatileDiskError("not an NBD server (no newstyle greeting)")
        no_zeroes = bool(flags & 2)
        self.sock.sendall(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | (NBD_FLAG_C_NO_ZEROES if no_zeroes else 0)))
        self.sock.sendall(b"IHAVEOPT" + struct.pack(">II", NBD_OPT_EXPORT_NAME, 0))
        self.size, _tflags = struct.unpack(">QH", self._read(10))
        if not no_zeroes:
            self._read(124)

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise VolatileDiskError("the NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def _request(self, kind: int, offset: int = 0, length: int = 0, data: bytes = b"") -> bytes:
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, kind, self.handle, offset, length) + data)
        magic, error, handle = struct.unpack(">IIQ", self._read(16))
        if magic != NBD_SIMPLE_REPLY_MAGIC or handle != self.handle:
            raise VolatileDiskError(f"unexpected NBD reply (magic {magic:#x}, handle {handle})")
        if error:
            raise VolatileDiskError(f"NBD request {kind} failed with error {error}")
        return self._read(length) if kind == NBD_CMD_READ else b""

    def write(self, offset: int, data: bytes) -> None:
        self._request(NBD_CMD_WRITE, offset, len(data), data)

    def read(self, offset: int, length: int) -> bytes:
        return self._request(NBD_CMD_READ, offset, length)

    def flush(self) -> None:
        self._request(NBD_CMD_FLUSH)

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()
