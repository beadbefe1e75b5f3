"""What a real GGUF becomes before any loading: described (architecture, vocabulary, memory estimate) or refused
in one sentence. The files are llama.cpp's 19 vocab-only GGUFs (LLMOS_VOCAB_DIR, made by `make vocab`) and the
repo's own model."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from llmos_edge.cli import main
from llmos_edge.errors import UserError
from llmos_edge.models import (
    MIB,
    GGUFInfo,
    Tensor,
    check_loadable,
    describe,
    estimate_memory,
    fit_context,
    read_gguf,
)
from tests.gguf_blocks import vocab_files

MODEL = Path(__file__).resolve().parents[2] / "model" / "llmos-tiny-q8_0.gguf"
NO_REPACK = frozenset[str]()

# What each vocab GGUF's header says: architecture and vocabulary size (from its token list; only the llama-bpe,
# llama-spm and deepseek files carry <arch>.vocab_size).
VOCABS = {
    "aquila": ("llama", 100008),
    "baichuan": ("baichuan", 64000),
    "bert-bge": ("bert", 30522),
    "command-r": ("command-r", 256000),
    "deepseek-coder": ("llama", 32256),
    "deepseek-llm": ("llama", 102400),
    "falcon": ("falcon", 65024),
    "gemma-4": ("gemma4", 262144),
    "gpt-2": ("gpt2", 50257),
    "gpt-neox": ("gptneox", 50432),
    "llama-bpe": ("llama", 128256),
    "llama-spm": ("llama", 32000),
    "mpt": ("mpt", 50432),
    "nomic-bert-moe": ("nomic-bert-moe", 250048),
    "phi-3": ("phi3", 32064),
    "qwen2": ("qwen2", 151936),
    "qwen35": ("qwen2", 151936),
    "refact": ("refact", 49216),
    "starcoder": ("starcoder2", 49152),
}


def test_every_vocab_gguf_is_described_and_refused_in_one_sentence() -> None:
    files = vocab_files()
    assert sorted(p.name.removeprefix("ggml-vocab-").removesuffix(".gguf") for p in files) == sorted(VOCABS)
    for p in files:
        info = read_gguf(p)
        d = describe(info, features=NO_REPACK)
        arch, n_vocab = VOCABS[p.name.removeprefix("ggml-vocab-").removesuffix(".gguf")]
        assert (d["architecture"], d["vocab_size"], d["tensors"], d["loadable"]) == (arch, n_vocab, 0, False), p.name
        assert d["refused"] == f"{p.name} holds no weights (a vocab-only GGUF: a tokenizer without a model)"
        assert "512" in d["memory_mib"] and all(v > 0 for v in d["memory_mib"].values()), p.name
        json.dumps(d, allow_nan=False)
        with pytest.raises(UserError) as e:
            check_loadable(info)
        assert e.value.message == d["refused"] and e.value.hint


def with_weights(arch: str, extra: dict[str, Any]) -> GGUFInfo:
    meta = {"general.architecture": arch, f"{arch}.block_count": 2, **extra}
    return GGUFInfo(Path(f"{arch}.gguf"), 3, meta, [Tensor("token_embd.weight", (64, 100), 0, 0)])


def test_loadable_architectures_pass_and_others_are_refused_by_name() -> None:
    check_loadable(with_weights("qwen2", {}))
    check_loadable(read_gguf(MODEL))
    for arch, needle in [
        ("bert", "bert.gguf is an embedding model (an encoder) (bert): the engine cannot generate text with it"),
        ("t5", "an encoder-decoder model"),
        ("nomic-bert", "an embedding model"),
        ("clip", "projector"),
        ("mamba9", "has the architecture 'mamba9', which the bundled llama.cpp does not know"),
    ]:
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            check_loadable(with_weights(arch, {}))
    with pytest.raises(UserError, match="declares 100000 layers"):
        check_loadable(with_weights("llama", {"llama.block_count": 100000}))


# Keys the estimate reads, and values a damaged or unusual header may hold in them.
KEYS = [
    "block_count",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.key_length_swa",
    "attention.value_length_swa",
    "attention.sliding_window",
    "attention.sliding_window_pattern",
    "attention.shared_kv_layers",
    "vocab_size",
    "context_length",
]
BAD = [None, 0, -1, -(2**63), 2**64 - 1, 1.5, float("nan"), "32", True, [], [0], [8, -1, "x"], [[4]], [2**64 - 1] * 3]


@pytest.mark.parametrize("key", KEYS)
def test_every_key_the_estimate_reads_tolerates_any_value(key: str) -> None:
    base = {
        "llama.embedding_length": 256,
        "llama.attention.head_count": 4,
        "llama.feed_forward_length": 512,
        "llama.context_length": 2048,
        "llama.attention.sliding_window": 128,
    }
    for value in BAD:
        meta = {**base, f"llama.{key}": value} if value is not None else {k: v for k, v in base.items() if k != key}
        info = with_weights("llama", meta)
        for ctx in (256, 4096):
            assert estimate_memory(info, ctx, features=NO_REPACK).total > 0
        json.dumps(describe(info, features=NO_REPACK), allow_nan=False)
        try:
            fit_context(info, 256 * MIB, 2048, features=NO_REPACK)
        except UserError as e:
            assert "\n" not in str(e) and len(e.message) < 300, (key, value, e.message)


def test_absurd_sizes_still_make_a_short_sentence() -> None:
    huge = 2**64 - 1
    keys = [k for k in KEYS if k != "attention.sliding_window_pattern"]
    info = with_weights("llama", {f"llama.{k}": huge for k in keys} | {"llmos.self_test.answer": float("nan")})
    info.tensors *= 1000
    json.dumps(describe(info, features=NO_REPACK), allow_nan=False)
    with pytest.raises(UserError) as e:
        fit_context(info, 64 * MIB, 2048, features=NO_REPACK)
    assert len(e.value.message) < 300 and "e+" in e.value.message, e.value.message


def test_kv_cache_uses_head_dims_per_layer_heads_and_sliding_windows() -> None:
    # qwen3-like: 16 query heads of 128 over n_embd 1024 (not 1024/16 = 64), 8 KV heads
    qwen3 = with_weights(
        "qwen3",
        {
            "qwen3.embedding_length": 1024,
            "qwen3.attention.head_count": 16,
            "qwen3.attention.head_count_kv": 8,
            "qwen3.attention.key_length": 128,
            "qwen3.attention.value_length": 128,
        },
    )
    assert qwen3.kv_cache_bytes(512) == 2 * (8 * 128 + 8 * 128) * 512 * 2
    # per-layer KV heads are summed layer by layer, not the largest times the layers
    per_layer = with_weights(
        "llama",
        {"llama.embedding_length": 256, "llama.attention.head_count": 4, "llama.attention.head_count_kv": [4, 1]},
    )
    assert per_layer.kv_cache_bytes(512) == (4 + 1) * 64 * 2 * 512 * 2
    # gemma-4's header: 30 layers, every sixth attends to the whole context with 2 KV heads of 512, the others to a
    # 1024-token window with 8 KV heads of 256. The engine keeps llama.cpp's full-size window caches (swa_full)...
    gemma4 = read_gguf(next(p for p in vocab_files() if p.name == "ggml-vocab-gemma-4.gguf"))
    full = 5 * 2 * (2 * 512) * 8192
    assert gemma4.kv_cache_bytes(8192) == (full + 25 * 8 * (2 * 256) * 8192) * 2
    # ...without them, the window layers hold 1024 + 512 cells
    assert gemma4.kv_cache_bytes(8192, swa_full=False) == (full + 25 * 8 * (2 * 256) * 1536) * 2


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_kv_cache_matches_llama_cpp_for_head_dims_unlike_n_embd_over_n_head(arch: str) -> None:
    """llama.cpp's "KV buffer size" lines for random-weight 7-layer models (n_embd 128, 4 heads of 64, 2 KV heads;
    gemma3 with a 128-token window on 6 of its 7 layers), loaded by llama-cpp-python 0.3.36 as the engine loads:
    1.75 MiB at 512 and 7.00 MiB at 2048 for both (n_embd / n_head would give half)."""
    extra = {"attention.sliding_window": 128} if arch == "gemma3" else {}
    keys = {"embedding_length": 128, "attention.head_count": 4, "attention.head_count_kv": 2} | extra
    keys |= {"attention.key_length": 64, "attention.value_length": 64, "block_count": 7}
    info = with_weights(arch, {f"{arch}.{k}": v for k, v in keys.items()})
    assert (info.kv_cache_bytes(512) / MIB, info.kv_cache_bytes(2048) / MIB) == (1.75, 7.0)


def test_model_info_describes_a_vocab_gguf_and_refuses_a_broken_file_in_two_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vocab = next(p for p in vocab_files() if p.name == "ggml-vocab-qwen2.gguf")
    assert main(["model-info", str(vocab)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["vocab_size"] == 151936 and d["loadable"] is False and set(d["memory_mib"]) == {"512", "4096"}
    assert main(["model-info", str(MODEL)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["loadable"] is True and d["refused"] is None and d["vocab_size"] == 354
    assert d["memory_mib"]["512"] > d["memory_mib"]["256"] > 0  # trained at 256: shown at 256 and 512
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(MODEL.read_bytes()[:24] + struct.pack("<Q", 2**40))
    assert main(["model-info", str(bad)]) == 2
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert out.out == "" and len(lines) == 2
    assert lines[0].startswith("llmos: error: ") and lines[1].startswith("llmos: hint: ")
