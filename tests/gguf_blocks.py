"""GGUF headers cut into their key-value and tensor-info blocks, for tests that compare readers and mutate headers.

A second, deliberately plain scanner (not llmos_edge.models' reader), so that the tests do not check the reader
against itself. It trusts its input: give it real files.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


def vocab_dir() -> Path:
    d = Path(os.environ.get("LLMOS_VOCAB_DIR", Path.home() / ".cache/llmos-edge/vocab"))
    files = sorted(d.glob("ggml-vocab-*.gguf"))
    assert len(files) == 19, f"llama.cpp's 19 vocab GGUFs are missing from {d}: run `make vocab` (LLMOS_VOCAB_DIR)"
    return d


def vocab_files() -> list[Path]:
    return sorted(vocab_dir().glob("ggml-vocab-*.gguf"))


def _u32(d: bytes, pos: int) -> int:
    return int(struct.unpack_from("<I", d, pos)[0])


def _u64(d: bytes, pos: int) -> int:
    return int(struct.unpack_from("<Q", d, pos)[0])


def skip_value(d: bytes, pos: int, vtype: int) -> int:
    """The offset just past a value of `vtype` that starts at `pos`."""
    if vtype in SIZES:
        return pos + SIZES[vtype]
    if vtype == STRING:
        return pos + 8 + _u64(d, pos)
    assert vtype == ARRAY, vtype
    itype, n = _u32(d, pos), _u64(d, pos + 4)
    pos += 12
    if itype in SIZES:
        return pos + n * SIZES[itype]
    for _ in range(n):
        pos = skip_value(d, pos, itype)
    return pos


@dataclass
class Header:
    version: int
    kv: list[bytes] = field(default_factory=list)  # each: key, value type, value
    tensors: list[bytes] = field(default_factory=list)  # each: name, n_dims, dims, type, offset
    size: int = 0  # bytes the header took in the file (before alignment)

    def to_bytes(self) -> bytes:
        head = b"GGUF" + struct.pack("<IQQ", self.version, len(self.tensors), len(self.kv))
        return head + b"".join(self.kv) + b"".join(self.tensors)


def split(d: bytes, keep: int | None = None) -> Header:
    """Cut a GGUF header into blocks; with `keep`, arrays longer than that are cut to their first `keep` items."""
    assert d[:4] == b"GGUF"
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", d, 4)
    h = Header(version)
    pos = 24
    for _ in range(n_kv):
        start = pos
        pos += 8 + _u64(d, pos)
        vtype = _u32(d, pos)
        pos += 4
        end = skip_value(d, pos, vtype)
        if vtype == ARRAY and keep is not None and _u64(d, pos + 4) > keep:
            itype, cut = _u32(d, pos), pos + 12
            for _ in range(keep):
                cut = skip_value(d, cut, itype)
            h.kv.append(d[start:pos] + struct.pack("<IQ", itype, keep) + d[pos + 12 : cut])
        else:
            h.kv.append(d[start:end])
        pos = end
    for _ in range(n_tensors):
        start = pos
        pos += 8 + _u64(d, pos)
        n_dims = _u32(d, pos)
        pos += 4 + 8 * n_dims + 4 + 8
        h.tensors.append(d[start:pos])
    h.size = pos
    return h


@functools.cache
def compact(path: Path, keep: int = 100) -> Header:
    """`path`'s header with its long arrays cut to `keep` items (cached: splitting a 262k-token vocabulary takes a
    second)."""
    return split(path.read_bytes(), keep=keep)
