import struct
from pathlib import Path

import pytest

from llmos_edge.errors import UserError
from llmos_edge.models import read_gguf


def gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write_gguf(path: Path, *, truncate: int = 0) -> None:
    """A minimal, valid GGUF v3: metadata and one 256x4 F32 tensor."""
    kv = [
        gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama"),
        gguf_string("general.name") + struct.pack("<I", 8) + gguf_string("tiny-test"),
        gguf_string("general.file_type") + struct.pack("<I", 4) + struct.pack("<I", 7),
        gguf_string("llama.block_count") + struct.pack("<I", 4) + struct.pack("<I", 2),
        gguf_string("llama.embedding_length") + struct.pack("<I", 4) + struct.pack("<I", 256),
        gguf_string("llama.attention.head_count") + struct.pack("<I", 4) + struct.pack("<I", 4),
        gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + b"".join(gguf_string(t) for t in "abc"),
    ]
    tensor = gguf_string("w") + struct.pack("<I", 2) + struct.pack("<QQ", 256, 4) + struct.pack("<IQ", 0, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kv)) + b"".join(kv) + tensor
    head += b"\0" * (-len(head) % 32)
    data = head + b"\0" * (256 * 4 * 4)
    path.write_bytes(data[: len(data) - truncate] if truncate else data)


def test_reads_metadata_tensors_and_estimates(tmp_path: Path) -> None:
    p = tmp_path / "m.gguf"
    write_gguf(p)
    info = read_gguf(p)
    assert info.name == "tiny-test" and info.architecture == "llama" and info.quantization == "Q8_0"
    assert info.n_params == 1024 and info.weights_bytes == 4096
    assert info.metadata["tokenizer.ggml.tokens"] == ["a", "b", "c"]
    assert info.kv_cache_bytes(512) == 2 * 2 * 512 * 256 * 2


def test_truncated_file_is_named_as_truncated(tmp_path: Path) -> None:
    p = tmp_path / "m.gguf"
    write_gguf(p, truncate=100)
    with pytest.raises(UserError, match="truncated"):
        read_gguf(p)


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"PK\x03\x04zipfile", "not a GGUF model file"), (b"GGUF\x03\x00", "truncated"), (b"", "not a GGUF")],
)
def test_wrong_files_get_one_clear_sentence(tmp_path: Path, content: bytes, needle: str) -> None:
    p = tmp_path / "m.gguf"
    p.write_bytes(content)
    with pytest.raises(UserError, match=needle) as e:
        read_gguf(p)
    assert e.value.hint


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no model file"):
        read_gguf(tmp_path / "none.gguf")
    with pytest.raises(UserError, match="is a directory"):
        read_gguf(tmp_path)
