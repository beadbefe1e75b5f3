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
    def n_vocab(self) -> int:
        """Vocabulary size: `<arch>.vocab_size`, else the token list's length, else the token embedding's rows."""
        v = self.arch("vocab_size")
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, (list, _ArrayLen)):
            n = int(tokens) if isinstance(tokens, _ArrayLen) else len(tokens)
            if n > 0:
                return n
        for t in self.tensors:
            if t.name == "token_embd.weight" and len(t.shape) == 2:
                return t.shape[1]
        return 0

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


# ---------------------------------------------------------------------------------------------------------------
# Memory estimate: what the engine worker will hold in RAM for a model and context, from the header alone.

MIB = 2**20
# The worker before any model: Python, llama-cpp-python and the ggml CPU backend libraries (measured: 48 MiB on
# x86-64 Debian 12, Python 3.11), plus small allocations outside llama.cpp's buffers (thread stacks, tokenizer,
# llama-cpp-python's arrays).
RUNTIME_BYTES = 50 * MIB
# llama.cpp's tokenizer, built from the header while the model loads: each token is held as a string several times
# (the GGUF metadata, id_to_token with its score, token_to_id's hash map, the piece cache), each BPE merge as a pair
# of strings in a hash map and once more in the metadata. Fitted on the architecture matrix's 14 llama.cpp vocab
# files (32k-262k tokens, 0-515k merges; bench/models.py): within 4% of every peak there.
VOCAB_TOKEN_BYTES = 204
VOCAB_MERGE_BYTES = 124
KV_TYPES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
}
N_UBATCH = 512  # llama-cpp-python's default n_batch (and llama.cpp's n_ubatch)
CTX_PAD = 256  # llama.cpp rounds the KV cache up to a multiple of this
MIN_CONTEXT = 256

# Tensor types ggml's CPU backend repacks into an interleaved copy at load time ("CPU_REPACK" buffer), by CPU feature
# (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type): the file's pages are read to make the copy, so both
# count in the worker's resident memory. (row multiple, types)
_REPACK_X86_AVX2 = (8, {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})
_REPACK_X86_AVX512 = (8, {"Q2_K"})
_REPACK_ARM_DOTPROD = (4, {"Q4_0", "IQ4_NL", "MXFP4", "Q8_0", "Q4_K", "Q5_K", "Q6_K"})


@dataclass(frozen=True)
class MemoryEstimate:
    n_ctx: int  # as llama.cpp will allocate it (rounded up to 256)
    kv_type: str
    runtime: int
    weights: int  # the file's tensors, mapped and read
    repacked: int  # copies the CPU backend makes of some weights
    kv_cache: int
    compute: int  # what a full batch at this context touches of llama.cpp's compute buffer, and the CPU work buffer
    vocab: int = 0  # the tokenizer llama.cpp builds from the header
    file: int = 0  # the whole file, mapped while loading

    @property
    def serving(self) -> int:
        """After a prompt that fills the context."""
        return self.runtime + self.weights + self.repacked + self.kv_cache + self.compute + self.vocab

    @property
    def loading(self) -> int:
        """While the model loads, llama.cpp maps and reads the whole file, header included (it unmaps the header
        afterwards): with a large vocabulary and small weights, this is the peak."""
        return self.runtime + self.file + self.repacked + self.vocab

    @property
    def total(self) -> int:
        return max(self.serving, self.loading)

    def describe(self) -> str:
        when = ", while loading" if self.loading > self.serving else ""
        parts = [
            f"weights {(self.weights + self.repacked) / MIB:.0f}",
            f"KV cache {self.kv_cache / MIB:.0f} {self.kv_type}",
            f"compute {self.compute / MIB:.0f}",
            f"vocabulary {self.vocab / MIB:.0f}",
            f"runtime {self.runtime / MIB:.0f}",
        ]
        return f"{self.total / MIB:.0f} MiB at context {self.n_ctx}{when} ({', '.join(parts)})"


def cpu_features(root: str | os.PathLike[str] = "/") -> frozenset[str]:
    """The CPU flags ggml's repacking depends on, from /proc/cpuinfo (x86 `flags`, arm64 `Features`)."""
    try:
        text = Path(root, "proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def repacked_bytes(info: GGUFInfo, features: frozenset[str]) -> int:
    rules = []
    if "avx2" in features:
        rules.append(_REPACK_X86_AVX2)
    if "avx512f" in features:
        rules.append(_REPACK_X86_AVX512)
    if "asimddp" in features or "i8mm" in features:
        rules.append(_REPACK_ARM_DOTPROD)
    total = 0
    for t in info.tensors:
        # Only matrix weights of matrix multiplications are repacked; the token embedding is read by row lookup.
        if len(t.shape) != 2 or t.name == "token_embd.weight" or not t.name.endswith(".weight"):
            continue
        name = GGML_TYPES.get(t.type_id, ("?", 1, 1))[0]
        if any(name in types and t.shape[1] % rows == 0 for rows, types in rules):
            total += t.n_bytes or 0
    return total


def _pad(n_ctx: int) -> int:
    return max(CTX_PAD, (n_ctx + CTX_PAD - 1) // CTX_PAD * CTX_PAD)


def _shape(info: GGUFInfo) -> tuple[int, int, int, int]:
    n_embd = int(info.arch("embedding_length", 0))
    n_head = int(info.arch("attention.head_count", 1)) or 1
    n_ff = info.arch("feed_forward_length", 4 * n_embd)
    n_ff = int(max(n_ff) if isinstance(n_ff, list) else n_ff)
    return n_embd, n_head, n_ff, info.n_vocab


def compute_buffer_bytes(info: GGUFInfo, n_ctx: int, n_outputs: int | None = None) -> int:
    """llama.cpp's CPU compute buffer (no flash attention), which it sizes for a full batch at the full context.

    Its graph allocator reuses memory, so the buffer is the largest set of tensors alive at one time: during
    attention the scores (heads x context x batch, f32), the mask and about 7 embedding-sized rows per token; in the
    feed-forward block 2 n_ff + 8 n_embd per token; at the output, the logits. Checked against the size llama.cpp
    reports for five shapes (n_embd 256-1024, contexts 256-2048) to within 0.25 MiB (see test_memory_estimate.py).

    llama.cpp reserves logits for every token of the batch (n_outputs None, the size it reports), but a prompt asks
    for the last token's only and the buffer's pages are touched as used: with n_outputs=1 this is what a prompt
    makes resident. With a real vocabulary (150k tokens) the difference is hundreds of MiB.
    """
    n_kv, n_ub = _pad(n_ctx), min(N_UBATCH, _pad(n_ctx))
    n_embd, n_head, n_ff, n_vocab = _shape(info)
    n_out = n_ub if n_outputs is None else min(n_outputs, n_ub)
    attention = n_ub * (n_kv * (n_head + 1) + 7 * n_embd)
    feed_forward = n_ub * (2 * n_ff + 8 * n_embd)
    output = n_out * n_vocab + n_ub * 2 * n_embd
    return 4 * max(attention, feed_forward, output)


def work_buffer_bytes(info: GGUFInfo, n_ctx: int) -> int:
    """The CPU backend's work buffer, allocated outside the compute buffer: the largest operand it converts, which is
    the attention scores in f16 for the multiplication by V (or the feed-forward input quantized to 8 bits)."""
    n_kv, n_ub = _pad(n_ctx), min(N_UBATCH, _pad(n_ctx))
    _, n_head, n_ff, _ = _shape(info)
    return max(2 * n_head * n_kv * n_ub, n_ub * n_ff * 292 // 256)


def _array_len(value: Any) -> int:
    """The length of a header array, kept as a list or (when long) as its length only."""
    if isinstance(value, list):
        return len(value)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def vocab_bytes(info: GGUFInfo) -> int:
    """llama.cpp's tokenizer in memory, from the header's token count and BPE merges."""
    merges = _array_len(info.metadata.get("tokenizer.ggml.merges"))
    return VOCAB_TOKEN_BYTES * info.n_vocab + VOCAB_MERGE_BYTES * merges


def estimate_memory(
    info: GGUFInfo,
    n_ctx: int,
    kv_type: str = "f16",
    features: frozenset[str] | None = None,
) -> MemoryEstimate:
    """The worker's peak resident memory: loading the model, or after a prompt that fills the context, whichever
    is larger."""
    if kv_type not in KV_TYPES:
        raise ValueError(f"unknown KV type {kv_type}")
    ctx = _pad(n_ctx)
    return MemoryEstimate(
        n_ctx=ctx,
        kv_type=kv_type,
        runtime=RUNTIME_BYTES,
        weights=info.weights_bytes,
        repacked=repacked_bytes(info, cpu_features() if features is None else features),
        kv_cache=info.kv_cache_bytes(ctx, KV_TYPES[kv_type]),
        compute=compute_buffer_bytes(info, ctx, n_outputs=1) + work_buffer_bytes(info, ctx),
        vocab=vocab_bytes(info),
        file=info.file_size,
    )


def fit_context(
    info: GGUFInfo,
    budget: int,
    wanted: int,
    kv_type: str = "f16",
    features: frozenset[str] | None = None,
) -> MemoryEstimate:
    """The largest context up to `wanted` (in steps of 256) whose estimate fits `budget` bytes; raise UserError
    in one sentence when even the smallest does not."""
    ctx = max(_pad(wanted), MIN_CONTEXT)
    while True:
        est = estimate_memory(info, ctx, kv_type, features)
        if est.total <= budget:
            return est
        if ctx <= MIN_CONTEXT:
            break
        ctx -= CTX_PAD
    smallest = estimate_memory(info, MIN_CONTEXT, kv_type, features)
    raise UserError(
        f"{info.path.name} needs {smallest.total / MIB:.0f} MiB even at context {MIN_CONTEXT}, but the memory budget "
        f"is {budget / MIB:.0f} MiB ({smallest.describe()})",
        "use a smaller quantization (Q4_K_M) or a smaller model, or raise governor.memory_budget_mb (or the "
        "service's MemoryMax)",
    )
