"""The bounded GGUF reader against `gguf` (gguf-py, the reader maintained with llama.cpp): the same type tables,
and the same keys and values from llama.cpp's 19 vocab-only GGUFs (LLMOS_VOCAB_DIR, made by `make vocab`)."""

from __future__ import annotations

import ctypes
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from llmos_edge.errors import UserError
from llmos_edge.models import (
    ARRAY_KEEP,
    FILE_TYPES,
    GGML_TYPES,
    GGUF_VALUE_TYPES,
    LLAMA_ARCHITECTURES,
    NON_GENERATIVE,
    NUMBERS_KEEP,
    _ArrayLen,
    read_gguf,
)
from tests.gguf_blocks import compact, vocab_files

# gguf 0.19.0 on PyPI is older than the ggml that llama-cpp-python 0.3.36 vendors (whose own gguf-py, also labelled
# 0.19.0, agrees with the table): Q8_1's block became two halves (36 bytes, was two floats: 40), and Q2_0 is new.
NEWER_THAN_GGUF = {"Q8_1": (32, 36)}
ONLY_IN_GGML = {42: "Q2_0"}
ONLY_IN_LLAMA_FTYPE = {41: "Q2_0"}


def test_value_types_match_gguf() -> None:
    assert {k: name for k, (name, _) in GGUF_VALUE_TYPES.items()} == {t.value: t.name for t in GGUFValueType}
    for t, np_type in GGUFReader.gguf_scalar_to_np.items():
        assert struct.calcsize(GGUF_VALUE_TYPES[t.value][1]) == np_type().itemsize, t.name


def test_tensor_types_match_gguf_with_block_and_type_sizes() -> None:
    theirs = {t.value: (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType}
    for type_id, (name, block, size) in theirs.items():
        assert GGML_TYPES[type_id] == (name, *NEWER_THAN_GGUF.get(name, (block, size))), name
    assert {k: v[0] for k, v in GGML_TYPES.items() if k not in theirs} == ONLY_IN_GGML


def test_tensor_types_match_the_bundled_ggml() -> None:
    """Every type the engine's own ggml library knows, with its block and type size, asked through ctypes."""
    import llama_cpp

    assert llama_cpp.__version__ == "0.3.36"  # GGML_TYPE_COUNT below is this version's (ggml.h)
    ggml_type_count = 43
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_blck_size.restype, lib.ggml_blck_size.argtypes = ctypes.c_int64, [ctypes.c_int]
    lib.ggml_type_size.restype, lib.ggml_type_size.argtypes = ctypes.c_size_t, [ctypes.c_int]
    lib.ggml_type_name.restype, lib.ggml_type_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    theirs = {
        t: (lib.ggml_type_name(t).decode().upper(), lib.ggml_blck_size(t), lib.ggml_type_size(t))
        for t in range(ggml_type_count)
        if lib.ggml_blck_size(t) > 0  # removed types have block size 0
    }
    assert theirs == GGML_TYPES


def test_file_types_match_gguf() -> None:
    theirs = {
        t.value: t.name.removeprefix("MOSTLY_").removeprefix("ALL_") for t in LlamaFileType if t.name != "GUESSED"
    }
    assert {k: v for k, v in FILE_TYPES.items() if k in theirs} == theirs
    assert {k: v for k, v in FILE_TYPES.items() if k not in theirs} == ONLY_IN_LLAMA_FTYPE


def test_architectures_include_every_one_gguf_names() -> None:
    """The list is llama-arch.cpp's of the pinned llama.cpp, which is newer than gguf 0.19.0: a superset of its."""
    assert set(MODEL_ARCH_NAMES.values()) <= LLAMA_ARCHITECTURES
    assert set(NON_GENERATIVE) <= LLAMA_ARCHITECTURES


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, float) and isinstance(theirs, float) and math.isnan(ours):
        return math.isnan(theirs)
    return bool(ours == theirs)


def _flat(v: Any) -> list[Any]:
    """gguf flattens arrays of arrays; so does this, to compare."""
    return [x for item in v for x in _flat(item)] if isinstance(v, list) else [v]


def assert_same_as_gguf(path: Path) -> None:
    ours = read_gguf(path)
    theirs = GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields), path.name
    for key, f in fields.items():
        mine = ours.metadata[key]
        if f.types[0] == GGUFValueType.ARRAY:
            limit = NUMBERS_KEEP if f.types[-1] not in (GGUFValueType.STRING, GGUFValueType.ARRAY) else ARRAY_KEEP
            if len(f.data) > limit:
                assert isinstance(mine, _ArrayLen) and mine == len(f.data), (path.name, key)
                continue
            got, want = _flat(mine), f.contents()
            assert len(got) == len(want) and all(map(_same, got, want)), (path.name, key)
        else:
            assert _same(mine, f.contents()), (path.name, key, mine, f.contents())
    assert [(t.name, t.shape, t.type_id) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in theirs.tensors
    ]


@pytest.mark.parametrize("name", [p.name for p in vocab_files()])
def test_both_readers_agree_on_each_vocab_gguf(name: str, tmp_path: Path) -> None:
    """Each file's whole header, with its long arrays (token lists, scores, merges) cut to 100 items: gguf's reader
    takes minutes over the full lists on this machine."""
    short = tmp_path / name
    short.write_bytes(compact(next(p for p in vocab_files() if p.name == name)).to_bytes())
    assert_same_as_gguf(short)


@pytest.mark.parametrize("name", ["ggml-vocab-bert-bge.gguf", "ggml-vocab-phi-3.gguf"])
def test_both_readers_agree_on_whole_vocab_ggufs(name: str) -> None:
    assert_same_as_gguf(next(p for p in vocab_files() if p.name == name))


def test_nested_arrays_and_every_value_type_are_read(tmp_path: Path) -> None:
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x.encode())) + x.encode()

    kv = [s("u8") + struct.pack("<IB", 0, 255), s("i8") + struct.pack("<Ib", 1, -2)]
    kv += [s("u16") + struct.pack("<IH", 2, 65535), s("i16") + struct.pack("<Ih", 3, -3)]
    kv += [s("u32") + struct.pack("<II", 4, 7), s("i32") + struct.pack("<Ii", 5, -4)]
    kv += [s("f32") + struct.pack("<If", 6, 0.5), s("bool") + struct.pack("<IB", 7, 1)]
    kv += [s("str") + struct.pack("<I", 8) + s("é")]
    kv += [s("u64") + struct.pack("<IQ", 10, 2**64 - 1), s("i64") + struct.pack("<Iq", 11, -(2**63))]
    kv += [s("f64") + struct.pack("<Id", 12, -1.25)]
    inner = [struct.pack("<IQ", 8, 2) + s("a") + s("b"), struct.pack("<IQ", 8, 1) + s("c")]
    kv += [s("nested") + struct.pack("<IIQ", 9, 9, 2) + b"".join(inner)]
    p = tmp_path / "types.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv))
    m = read_gguf(p).metadata
    assert m == {
        "u8": 255,
        "i8": -2,
        "u16": 65535,
        "i16": -3,
        "u32": 7,
        "i32": -4,
        "f32": 0.5,
        "bool": True,
        "str": "é",
        "u64": 2**64 - 1,
        "i64": -(2**63),
        "f64": -1.25,
        "nested": [["a", "b"], ["c"]],
    }
    assert_same_as_gguf(p)


def test_absurd_counts_are_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    p = tmp_path / "big.gguf"
    for value in (
        struct.pack("<IIQ", 9, 10, 2**62),  # an array of 2^62 u64
        struct.pack("<IIQ", 9, 8, 2**40),  # an array of 2^40 strings
        struct.pack("<IQ", 8, 2**63),  # a string of 2^63 bytes
        struct.pack("<IIQ", 9, 9, 1) * 20,  # arrays nested 20 deep
    ):
        p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("k") + value + b"\0" * 64)
        with pytest.raises(UserError) as e:
            read_gguf(p)
        assert "\n" not in str(e.value) and ("corrupt" in e.value.message or "truncated" in e.value.message)
    # a million keys or tensors in a file big enough to hold them: refused before any is read
    for counts in ((0, 1 << 20), (1 << 20, 0)):
        with p.open("wb") as f:
            f.write(b"GGUF" + struct.pack("<IQQ", 3, *counts))
            f.truncate(1 << 30)  # sparse
        with pytest.raises(UserError, match="more than the file holds or any model has"):
            read_gguf(p)
