"""The model store: read a GGUF file's header without loading it, and verify the file before the engine does.

llama.cpp reports a wrong or truncated file deep inside native code (or crashes); reading the header here first
lets the supervisor say in one sentence what is wrong with which file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from llmos_edge.errors import UserError

GGUF_MAGIC = b"GGUF"
ARRAY_KEEP = 64  # arrays longer than this (token lists) are kept as their length only

# ggml type id -> (block size in elements, bytes per block); used to check that tensor data fits in the file.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
# general.file_type -> name, as llama.cpp's quantizer writes it
FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int | None:
        t = GGML_TYPES.get(self.type_id)
        return None if t is None else self.n_elements // t[1] * t[2]


@dataclass
class GGUFInfo:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[Tensor] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)

    @property
    def quantization(self) -> str:
        ft = self.metadata.get("general.file_type")
        return FILE_TYPES.get(ft, f"type {ft}") if isinstance(ft, int) else "unknown"

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def arch(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def weights_bytes(self) -> int:
        return sum(t.n_bytes or 0 for t in self.tensors)

    def kv_cache_bytes(self, n_ctx: int, bytes_per_value: float = 2.0) -> int:
        """K and V for every layer at F16 (llama.cpp's default KV type)."""
        n_layer = int(self.arch("block_count", 0))
        n_embd = int(self.arch("embedding_length", 0))
        n_head = int(self.arch("attention.head_count", 1)) or 1
        n_head_kv = int(self.arch("attention.head_count_kv", n_head)) or n_head
        n_embd_kv = n_embd * n_head_kv // n_head
        return int(2 * n_layer * n_ctx * n_embd_kv * bytes_per_value)


class _Reader:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f = f
        self.path = path

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise UserError(
                f"{self.path}: the GGUF header is truncated",
                "the file is incomplete; copy or download it again",
            )
        return b

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > 1 << 24:
            raise UserError(
                f"{self.path}: corrupt GGUF header (a string of {n} bytes)",
                "the file is damaged; copy it again",
            )
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype = self.scalar("<I")
            count = self.scalar("<Q")
            if count > 1 << 28:
                raise UserError(
                    f"{self.path}: corrupt GGUF header (an array of {count} items)",
                    "the file is damaged; copy it again",
                )
            items = [self.value(itype) for _ in range(count)]
            return items if count <= ARRAY_KEEP else _ArrayLen(count)
        raise UserError(
            f"{self.path}: corrupt GGUF header (unknown value type {vtype})",
            "the file is damaged, or written by a newer GGUF writer",
        )


class _ArrayLen(int):
    """The length of a long array whose items are not kept."""


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read the header and tensor table; check that every tensor's data lies inside the file."""
    p = Path(path)
    try:
        f = p.open("rb")
    except FileNotFoundError:
        raise UserError(f"no model file at {p}", "set model.path in the config to a .gguf file") from None
    except IsADirectoryError:
        raise UserError(f"{p} is a directory, not a model file", "set model.path to a .gguf file") from None
    except OSError as e:
        raise UserError(f"cannot read the model file {p}: {e.strerror}", "check its permissions") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        r = _Reader(f, p)
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise UserError(
                f"{p} is not a GGUF model file (it starts with {magic!r})",
                "llmos-edge loads GGUF files; convert the model with llama.cpp's convert script",
            )
        version = r.scalar("<I")
        if version not in (2, 3):
            raise UserError(f"{p}: unsupported GGUF version {version}", "use a GGUF v3 file")
        n_tensors = r.scalar("<Q")
        n_kv = r.scalar("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise UserError(f"{p}: corrupt GGUF header", "the file is damaged; copy it again")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.scalar("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<I")
            if n_dims > 8:
                raise UserError(f"{p}: corrupt GGUF tensor table", "the file is damaged; copy it again")
            shape = tuple(r.scalar("<Q") for _ in range(n_dims))
            tensors.append(Tensor(name, shape, r.scalar("<I"), r.scalar("<Q")))
        align = int(metadata.get("general.alignment", 32)) or 32
        data_offset = (f.tell() + align - 1) // align * align
    info = GGUFInfo(p, version, metadata, tensors, data_offset, size)
    for t in tensors:
        nb = t.n_bytes
        if nb is not None and data_offset + t.offset + nb > size:
            raise UserError(
                f"{p} is truncated: tensor {t.name} ends past the end of the file ({size} bytes)",
                "the copy is incomplete; copy the model file again",
            )
    return info
