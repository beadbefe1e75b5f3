"""Small files written whole or not at all: a power cut never leaves half of one for the next start to read.

A temporary file beside the target, fsync, rename over the target, then fsync of the directory so the rename itself
survives the cut (without it the directory entry may still name the old file, or none, after the cut)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Replace `path` with `text` durably; raises OSError (the caller words it for the user)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _sync_directory(p.parent)
    return p


def remove(path: str | os.PathLike[str]) -> None:
    """Remove `path` durably: once this returns, a power cut cannot bring the file back (an unlink is, like a rename,
    only a change to the directory, which sits in the page cache until the directory itself is synced)."""
    p = Path(path)
    p.unlink()
    _sync_directory(p.parent)


def _sync_directory(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
