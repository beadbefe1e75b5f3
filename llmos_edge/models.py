"""The model store: read a GGUF file's header without loading it, and verify the file before the engine does.

llama.cpp reports a wrong or truncated file deep inside native code (or crashes); reading the header here first
lets the supervisor say in one sentence what is wrong with which file. The reader is bounded: every count and
length is checked against the bytes left in the file before anything is read or kept, so a damaged header costs
neither time nor memory.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from llmos_edge.errors import UserError

GGUF_MAGIC = b"GGUF"
ARRAY_KEEP = 64  # string arrays (token lists, merges) and arrays of arrays longer than this are kept as their length
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS: its per-layer tables have this many entries
NUMBERS_KEEP = MAX_LAYERS  # numeric arrays up to this long are kept: per-layer hyperparameters (gemma-4)
MAX_NESTING = 8  # arrays of arrays: the format allows any depth, no writer goes past 2, and recursion must end
MAX_KEPT = 1 << 18  # values kept from one header; a header that holds more is refused before it costs memory
MAX_TEXT = 64 << 20  # bytes of strings kept from one header (a chat template is tens of KB)
MAX_KEYS = 1 << 16  # real headers have tens of keys
MAX_TENSORS = 1 << 17  # DeepSeek-V3 with its 256 experts' tensors stored one by one has 47k
MAX_HEADER = 1 << 30  # bytes of metadata and tensor table (a 262k-token vocabulary with its merges takes 16 MB)
GGML_MAX_NAME = 64  # a tensor's name is shorter than this (ggml.h)
GGML_MAX_DIMS = 4

# GGUF metadata value types (gguf.h enum gguf_type): id -> (name as gguf-py spells it, struct format; "" for the two
# variable-length types).
GGUF_VALUE_TYPES: dict[int, tuple[str, str]] = {
    0: ("UINT8", "<B"),
    1: ("INT8", "<b"),
    2: ("UINT16", "<H"),
    3: ("INT16", "<h"),
    4: ("UINT32", "<I"),
    5: ("INT32", "<i"),
    6: ("FLOAT32", "<f"),
    7: ("BOOL", "<?"),
    8: ("STRING", ""),
    9: ("ARRAY", ""),
    10: ("UINT64", "<Q"),
    11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
GGUF_UINT32, GGUF_STRING, GGUF_ARRAY = 4, 8, 9
_SCALARS = {k: fmt for k, (_, fmt) in GGUF_VALUE_TYPES.items() if fmt}
_SCALAR_SIZE = {k: struct.calcsize(fmt) for k, fmt in _SCALARS.items()}
# The fewest bytes one item of each type takes: a count is checked against it before anything is read.
_MIN_SIZE = {**_SCALAR_SIZE, GGUF_STRING: 8, GGUF_ARRAY: 12}

# ggml type id -> (name, block size in elements, bytes per block): every type the pinned llama.cpp (0.3.36's
# vendored ggml: ggml.h enum ggml_type, ggml.c type_traits, ggml-common.h block structs) loads from a file. The
# missing ids (4, 5, 31-33, 36-38) are removed types that llama.cpp refuses.
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
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}
# general.file_type (llama.h enum llama_ftype) -> name, as llama.cpp's quantizer writes it
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
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    41: "Q2_0",
}

# general.architecture values the pinned llama.cpp knows (src/llama-arch.cpp, LLM_ARCH_NAMES)
LLAMA_ARCHITECTURES = frozenset(
    """
    clip llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert modern-bert nomic-bert
    nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom stablelm qwen qwen2 qwen2moe qwen2vl qwen3
    qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35 qwen35moe qwen4exp phi2 phi3 phimoe plamo plamo2 plamo3 codeshell
    orion internlm2 minicpm minicpm3 gemma gemma2 gemma3 gemma3n gemma4 gemma4-assistant gemma-embedding starcoder2
    mamba mamba2 maple jamba falcon-h1 xverse command-r cohere2 cohere2moe dbrx olmo olmo2 olmoe muse-glimmer
    openelm arctic deepseek deepseek2 deepseek2-ocr deepseek32 deepseek4 chatglm glm4 glm4moe glm-dsa bitnet t5
    t5encoder jais jais2 nemotron nemotron_h nemotron_h_moe exaone exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7
    granite granitemoe granitehybrid graniteswitch granite_swa chameleon wavtokenizer-dec plm bailingmoe
    bailingmoe2 bailingmoe3 dots1 dots3note arcee afmoe laguna ernie4_5 ernie4_5-moe hunyuan-moe hunyuan-dense
    hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2 lfm2moe dream smallthinker llada llada-moe seed_oss grovemoe
    apertus minimax-01 hrm_text minimax-m2 minimax-m3 cogvlm rnd1 pangu-embedded mistral3 eagle3 dflash mistral4
    paddleocr mimo2 step35 spark2_5 llama-embed maincoder kimi-linear kimi-k3 glm5-next talkie mellum nanbeige
    qwen3tts pockettts
    """.split()  # noqa: SIM905 (a word list reads better than 153 quoted strings)
)
# Of those, the ones the engine cannot generate text with: encoders that make embeddings (llama.cpp loads them and
# returns vectors), models that need an encoder pass (llama-cpp-python's Llama never calls llama_encode), draft
# heads for speculative decoding, and the parts of multimodal models that are not language models.
NON_GENERATIVE = {
    "bert": "an embedding model (an encoder)",
    "modern-bert": "an embedding model (an encoder)",
    "nomic-bert": "an embedding model (an encoder)",
    "nomic-bert-moe": "an embedding model (an encoder)",
    "neo-bert": "an embedding model (an encoder)",
    "jina-bert-v2": "an embedding model (an encoder)",
    "jina-bert-v3": "an embedding model (an encoder)",
    "eurobert": "an embedding model (an encoder)",
    "gemma-embedding": "an embedding model (an encoder)",
    "llama-embed": "an embedding model",
    "t5encoder": "the encoder half of a T5 model",
    "t5": "an encoder-decoder model",
    "eagle3": "a draft head for speculative decoding",
    "dflash": "a draft head for speculative decoding",
    "clip": "a vision or audio projector (an mmproj file)",
    "wavtokenizer-dec": "an audio decoder",
}
# Sliding-window period by architecture where the GGUF does not give one (llama.cpp's load_swa_pattern calls): in
# each period, every layer but the last attends to the window only.
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4, "gpt-oss": 2, "exaone4": 4, "olmo2": 4}


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


class _ArrayLen(int):
    """The length of a long array whose items are not kept."""


def _count(v: Any) -> int | None:
    """A count-like hyperparameter as a positive integer; None for anything else (missing, zero, negative, a float,
    a string, a boolean, an array)."""
    return v if isinstance(v, int) and not isinstance(v, bool | _ArrayLen) and v > 0 else None


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
        a = self.metadata.get("general.architecture")
        return a if isinstance(a, str) and a else "unknown"

    @property
    def name(self) -> str:
        n = self.metadata.get("general.name")
        return n if isinstance(n, str) and n else self.path.stem

    @property
    def quantization(self) -> str:
        ft = self.metadata.get("general.file_type")
        if isinstance(ft, int) and not isinstance(ft, bool):
            return FILE_TYPES.get(ft, f"type {ft}")
        return "unknown"

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def arch(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def hparam(self, key: str) -> int | None:
        """`<arch>.key` as a positive count, the largest entry of a per-layer array; None when it is missing or no
        positive integer."""
        v = self.arch(key)
        if isinstance(v, list):
            return max((c for c in map(_count, v) if c is not None), default=None)
        return _count(v)

    def layer_values(self, key: str, n_layer: int, default: int) -> list[int]:
        """`<arch>.key` for each of the first `n_layer` layers: a per-layer array's entries (past its end, or where
        an entry is no positive count, its largest), else the one value for every layer, else `default`."""
        v = self.arch(key)
        if not isinstance(v, list):
            return [_count(v) or default] * n_layer
        top = self.hparam(key) or default
        return [(_count(v[i]) if i < len(v) else None) or top for i in range(n_layer)]

    def swa_layers(self, n_layer: int) -> list[bool]:
        """Which layers attend to a sliding window only (and so cache only the window): none unless
        `attention.sliding_window` is set; then the per-layer `attention.sliding_window_pattern`, or its period,
        or the architecture's."""
        if _count(self.arch("attention.sliding_window")) is None:
            return [False] * n_layer
        pattern = self.arch("attention.sliding_window_pattern")
        if isinstance(pattern, list):
            # booleans (gemma-4's converter) or 0/1 (llama.cpp reads either into a uint32 array)
            return [i < len(pattern) and (pattern[i] is True or _count(pattern[i]) is not None) for i in range(n_layer)]
        period = _count(pattern) or _SWA_PERIOD.get(self.architecture, 0)
        return [period > 0 and i % period < period - 1 for i in range(n_layer)]

    @property
    def n_vocab(self) -> int:
        """Vocabulary size: `<arch>.vocab_size`, else the token list's length, else the token embedding's rows."""
        v = _count(self.arch("vocab_size"))
        if v is not None:
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

    def kv_cache_bytes(
        self,
        n_ctx: int,
        bytes_per_value: float = 2.0,
        swa_full: bool = True,
        n_ubatch: int = 512,
    ) -> int:
        """K and V of every layer that has its own cache, as llama.cpp sizes them (llama-hparams.cpp n_embd_k_gqa):
        per layer, its KV heads times its head size, which is `attention.key_length` / `value_length` (their
        `_swa` forms on sliding-window layers) where given (gemma, qwen3) and n_embd / n_head otherwise. The last
        `attention.shared_kv_layers` layers reuse earlier layers' caches (gemma-3n, gemma-4). Sliding-window layers
        cache the whole context too unless `swa_full` is off (llama.cpp's and llama-cpp-python's default is on,
        and the engine keeps it: measured 7.00 MiB for a 7-layer gemma3 at 2048, as computed here); off, they
        cache the window plus a batch."""
        n_layer = _count(self.arch("block_count")) or 0
        n_own = max(0, n_layer - (_count(self.arch("attention.shared_kv_layers")) or 0))
        n = min(n_own, MAX_LAYERS)  # llama.cpp loads no more; past that, scaled (the file is refused anyway)
        n_embd = self.hparam("embedding_length") or 0
        heads = self.layer_values("attention.head_count", n, 1)
        heads_kv = self.layer_values("attention.head_count_kv", n, 0)
        swa = self.swa_layers(n)
        window = min(n_ctx, _pad((_count(self.arch("attention.sliding_window")) or 0) + n_ubatch))
        k_full, v_full = self.hparam("attention.key_length"), self.hparam("attention.value_length")
        k_swa = self.hparam("attention.key_length_swa") or k_full
        v_swa = self.hparam("attention.value_length_swa") or v_full
        values = 0
        for i in range(n):
            head_dim = n_embd // heads[i]
            k, v = (k_swa, v_swa) if swa[i] else (k_full, v_full)
            cells = window if swa[i] and not swa_full else n_ctx
            values += (heads_kv[i] or heads[i]) * ((k or head_dim) + (v or head_dim)) * cells
        if n:
            values = values * n_own // n
        return int(values * bytes_per_value)


def _show(s: str, limit: int = 60) -> str:
    """A name from the file, safe to put in a one-line message: quoted, escaped, cut short."""
    r = ascii(s)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


class _Reader:
    """A cursor over the file, read a chunk at a time: long arrays are stepped over by seeking, and nothing is
    read or kept before its length has been checked against the bytes left. (Not mmap: a file truncated while it
    is mapped kills the reading process with SIGBUS.)"""

    CHUNK = 1 << 20

    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f = f
        self.path = path
        self.size = size
        self.end = min(size, MAX_HEADER)
        self.pos = 0  # in the file
        self.buf = b""
        self.base = 0  # the file offset of buf[0]
        self.kept = 0
        self.text = 0

    def corrupt(self, what: str) -> UserError:
        return UserError(f"{self.path}: corrupt GGUF header ({what})", "the file is damaged; copy it again")

    def truncated(self) -> UserError:
        if self.end < self.size:
            return self.corrupt(f"more than {MAX_HEADER >> 20} MiB of metadata")
        return UserError(
            f"{self.path}: the GGUF header is truncated", "the file is incomplete; copy or download it again"
        )

    def take(self, n: int) -> int:
        """Make the next `n` bytes readable in `buf`; return where they start in it, and step over them."""
        if n > self.end - self.pos:
            raise self.truncated()
        at = self.pos - self.base
        if at < 0 or at + n > len(self.buf):
            try:
                self.f.seek(self.pos)
                self.buf = self.f.read(max(n, self.CHUNK))
            except OSError as e:
                raise UserError(
                    f"cannot read the model file {self.path}: {e.strerror}",
                    "the disk or USB stick may be failing; copy the file again",
                ) from None
            self.base, at = self.pos, 0
            if len(self.buf) < n:  # the file shrank while being read
                raise self.truncated()
        self.pos += n
        return at

    def scalar(self, vtype: int) -> Any:
        at = self.take(_SCALAR_SIZE[vtype])  # before reading self.buf: take() may refill it
        return struct.unpack_from(_SCALARS[vtype], self.buf, at)[0]

    def u32(self) -> int:
        return int(self.scalar(4))

    def u64(self) -> int:
        return int(self.scalar(10))

    def string(self) -> str:
        n = self.u64()
        if n > self.end - self.pos:
            raise self.truncated()
        self.text += n
        if self.text > MAX_TEXT:
            raise self.corrupt(f"more than {MAX_TEXT >> 20} MiB of text")
        at = self.take(n)
        return self.buf[at : at + n].decode("utf-8", errors="replace")

    def array_head(self, depth: int) -> tuple[int, int]:
        if depth >= MAX_NESTING:
            raise self.corrupt(f"arrays nested more than {MAX_NESTING} deep")
        itype, count = self.u32(), self.u64()
        if itype not in _MIN_SIZE:
            raise self.corrupt(f"unknown value type {itype}")
        if count * _MIN_SIZE[itype] > self.end - self.pos:
            raise self.corrupt(f"an array of {count} items, more than the file holds")
        return itype, count

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype)
        if vtype == GGUF_STRING:
            return self.string()
        if vtype != GGUF_ARRAY:
            raise self.corrupt(f"unknown value type {vtype}")
        itype, count = self.array_head(depth)
        if count > (NUMBERS_KEEP if itype in _SCALARS else ARRAY_KEEP):
            self.skip(itype, count, depth + 1)
            return _ArrayLen(count)
        self.kept += count
        if self.kept > MAX_KEPT:
            raise self.corrupt(f"more than {MAX_KEPT} values")
        if itype in _SCALARS:
            at = self.take(count * _SCALAR_SIZE[itype])
            return list(struct.unpack_from(f"<{count}{_SCALARS[itype][1]}", self.buf, at))
        return [self.value(itype, depth + 1) for _ in range(count)]

    def skip(self, itype: int, count: int, depth: int) -> None:
        """Step over `count` items of `itype` without keeping them (array_head checked that they can fit)."""
        if itype in _SCALARS:
            self.pos += count * _SCALAR_SIZE[itype]
        elif itype == GGUF_STRING:
            for _ in range(count):
                at = self.take(8)
                n = int.from_bytes(self.buf[at : at + 8], "little")
                if n > self.end - self.pos:
                    raise self.truncated()
                self.pos += n
        else:
            for _ in range(count):
                sub, n = self.array_head(depth)
                self.skip(sub, n, depth + 1)


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read the header and tensor table; check them as llama.cpp's gguf reader does (unique keys and tensor names,
    known types, shapes that fit, tensors laid out in order at the alignment) and that every tensor's data lies
    inside the file."""
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
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise UserError(
                f"{p} is not a GGUF model file (it starts with {magic!r})",
                "llmos-edge loads GGUF files; convert the model with llama.cpp's convert script",
            )
        return _parse(_Reader(f, p, size))


def kv_spans(path: str | os.PathLike[str]) -> tuple[dict[str, tuple[int, int, int]], int]:
    """Where each metadata value lies in a GGUF file read by read_gguf: key -> (value type, start, end), and the
    offset where the key/value section ends (the tensor table starts). For writers that copy a header and change a
    value in place (trainer.py writes a fine-tuned model with its source's tokenizer and metadata)."""
    p = Path(path)
    with p.open("rb") as f:
        r = _Reader(f, p, os.fstat(f.fileno()).st_size)
        r.pos = 4
        r.u32()
        r.u64()
        n_kv = r.u64()
        spans: dict[str, tuple[int, int, int]] = {}
        for _ in range(n_kv):
            key = r.string()
            vtype = r.u32()
            start = r.pos
            r.value(vtype)
            spans[key] = (vtype, start, r.pos)
        return spans, r.pos


def _parse(r: _Reader) -> GGUFInfo:
    p, size = r.path, r.size
    r.pos = 4
    version = r.u32()
    if version & 0xFFFF == 0 and version:
        raise UserError(f"{p} is a big-endian GGUF file", "use the little-endian file of the model")
    if version not in (2, 3):
        raise UserError(f"{p}: unsupported GGUF version {version}", "use a GGUF v3 file")
    n_tensors, n_kv = r.u64(), r.u64()
    if n_kv * 13 > r.end - r.pos or n_tensors * 24 > r.end - r.pos or n_kv > MAX_KEYS or n_tensors > MAX_TENSORS:
        raise r.corrupt(f"{n_kv} keys and {n_tensors} tensors, more than the file holds or any model has")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        if not key:
            raise r.corrupt("an empty key")
        if key in metadata:
            raise r.corrupt(f"the key {_show(key)} appears twice")
        vtype = r.u32()
        if key == "general.alignment" and vtype != GGUF_UINT32:
            raise r.corrupt("general.alignment is not a 32-bit unsigned integer")
        metadata[key] = r.value(vtype)
    align = metadata.get("general.alignment", 32)
    if align <= 0 or align & (align - 1):
        raise r.corrupt(f"alignment {align} is not a power of 2")
    tensors: list[Tensor] = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = r.string()
        if len(name.encode()) >= GGML_MAX_NAME:
            raise r.corrupt(f"a tensor name of {len(name.encode())} bytes, {_show(name, 30)}")
        if name in names:
            raise r.corrupt(f"the tensor {_show(name)} appears twice")
        names.add(name)
        n_dims = r.u32()
        if n_dims > GGML_MAX_DIMS:
            raise r.corrupt(f"tensor {_show(name)} has {n_dims} dimensions")
        shape = tuple(r.u64() for _ in range(n_dims))
        n = 1
        for d in shape:
            n *= d
        if any(d >= 1 << 63 for d in shape) or n >= 1 << 63:
            raise r.corrupt(f"tensor {_show(name)} has the impossible shape {list(shape)}")
        type_id = r.u32()
        gtype = GGML_TYPES.get(type_id)
        if gtype is None:
            raise UserError(
                f"{p}: tensor {_show(name)} has ggml type {type_id}, which this llama.cpp cannot load",
                "the file was made by a newer llama.cpp, or is damaged; quantize the model to a common type (Q4_K_M)",
            )
        if shape and shape[0] % gtype[1]:
            raise r.corrupt(f"tensor {_show(name)} has rows of {shape[0]}, not whole {gtype[0]} blocks")
        tensors.append(Tensor(name, shape, type_id, r.u64()))
    data_offset = (r.pos + align - 1) // align * align
    expected = 0
    for t in tensors:
        if t.offset != expected:
            raise r.corrupt(f"tensor {_show(t.name)} is at offset {t.offset}, not {expected}")
        nb = t.n_bytes or 0
        if data_offset + t.offset + nb > size:
            raise UserError(
                f"{p} is truncated: tensor {_show(t.name)} ends past the end of the file ({size} bytes)",
                "the copy is incomplete; copy the model file again",
            )
        expected += (nb + align - 1) // align * align
    return GGUFInfo(p, version, metadata, tensors, data_offset, size)


def check_loadable(info: GGUFInfo) -> None:
    """Refuse, in one sentence, a file whose header is sound but which llama.cpp cannot run as a text generator:
    an architecture it does not know, no weights (llama.cpp's vocab-only GGUFs), an embedding encoder or another
    non-generating part, more layers than llama.cpp has room for. The supervisor calls this before loading;
    `llmos model-info` still describes such files."""
    name, arch = info.path.name, info.architecture
    if arch not in LLAMA_ARCHITECTURES:
        raise UserError(
            f"{name} has the architecture {_show(arch)}, which the bundled llama.cpp does not know",
            "use a GGUF of an architecture llama.cpp supports (llama, qwen2, qwen3, phi3, gemma, mistral...)",
        )
    if not info.tensors:
        raise UserError(
            f"{name} holds no weights (a vocab-only GGUF: a tokenizer without a model)",
            "use the full model's GGUF file",
        )
    if arch in NON_GENERATIVE:
        raise UserError(
            f"{name} is {NON_GENERATIVE[arch]} ({arch}): the engine cannot generate text with it",
            "use a text-generation model (an instruct or chat GGUF)",
        )
    n_layer = _count(info.arch("block_count"))
    if n_layer is not None and n_layer > MAX_LAYERS:
        raise UserError(
            f"{name} declares {n_layer} layers, more than llama.cpp's limit of {MAX_LAYERS}",
            "the file is damaged or not a model llama.cpp can run",
        )


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


def _mib(n: int) -> str:
    """Bytes in MiB for a message: whole MiB, or three digits for the absurd sizes a damaged header describes."""
    v = n / MIB
    return f"{v:.0f}" if v < 1e7 else f"{v:.3g}"


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
            f"weights {_mib(self.weights + self.repacked)}",
            f"KV cache {_mib(self.kv_cache)} {self.kv_type}",
            f"compute {_mib(self.compute)}",
            f"vocabulary {_mib(self.vocab)}",
            f"runtime {_mib(self.runtime)}",
        ]
        return f"{_mib(self.total)} MiB at context {self.n_ctx}{when} ({', '.join(parts)})"


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
    """n_embd, n_head, n_ff, n_vocab; per-layer arrays give their largest entry, and a value that is missing or no
    positive integer its default."""
    n_embd = info.hparam("embedding_length") or 0
    n_head = info.hparam("attention.head_count") or 1
    n_ff = info.hparam("feed_forward_length") or 4 * n_embd
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
        kv_cache=info.kv_cache_bytes(ctx, KV_TYPES[kv_type], n_ubatch=N_UBATCH),
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
        f"{info.path.name} needs {_mib(smallest.total)} MiB even at context {MIN_CONTEXT}, but the memory budget "
        f"is {_mib(budget)} MiB ({smallest.describe()})",
        "use a smaller quantization (Q4_K_M) or a smaller model, or raise governor.memory_budget_mb (or the "
        "service's MemoryMax)",
    )


def describe(info: GGUFInfo, features: frozenset[str] | None = None) -> dict[str, Any]:
    """What `llmos model-info` shows: the header's facts, whether llama.cpp can run the file (or the one-sentence
    reason it cannot), and the memory estimate at context 512 and, if different, at min(trained context, 4096)."""
    trained = _count(info.arch("context_length"))
    try:
        check_loadable(info)
        refused = None
    except UserError as e:
        refused = e.message
    contexts = sorted({512, min(trained or 512, 4096)})
    return {
        "path": str(info.path),
        "name": info.name,
        "architecture": info.architecture,
        "quantization": info.quantization,
        "parameters": info.n_params,
        "tensors": len(info.tensors),
        "vocab_size": info.n_vocab,
        "file_bytes": info.file_size,
        "context_trained": trained,
        "loadable": refused is None,
        "refused": refused,
        "memory_mib": {
            str(ctx): round(estimate_memory(info, ctx, features=features).total / MIB, 1) for ctx in contexts
        },
        "self_test": {
            k.removeprefix("llmos.self_test."): _plain(v)
            for k, v in info.metadata.items()
            if k.startswith("llmos.self_test.")
        },
    }


def _plain(v: Any) -> Any:
    """A metadata value as strict JSON can hold it: NaN and infinities as text, a long array as its length."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return int(v) if isinstance(v, _ArrayLen) else v
