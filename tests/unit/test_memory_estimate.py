"""The pre-flight memory estimate, piece by piece, against what llama.cpp itself reports.

The reference sizes below are llama.cpp's own log lines ("CPU compute buffer size", "KV buffer size",
"CPU_REPACK model buffer size") for llama-architecture models of several shapes, loaded by llama-cpp-python 0.3.36
on x86-64 with the zen4 CPU variant. The whole estimate against the worker's measured RSS is checked by
tests/integration/test_governor.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos_edge.errors import UserError
from llmos_edge.models import (
    MIB,
    VOCAB_MERGE_BYTES,
    VOCAB_TOKEN_BYTES,
    GGUFInfo,
    Tensor,
    _ArrayLen,
    compute_buffer_bytes,
    estimate_memory,
    fit_context,
    repacked_bytes,
    vocab_bytes,
)

Q8_0, Q4_K, Q6_K, F32 = 8, 12, 14, 0


def llama(n_embd: int, n_layer: int, n_head: int, n_ff: int, n_vocab: int = 354, wtype: int = Q4_K) -> GGUFInfo:
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": n_embd,
        "llama.block_count": n_layer,
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head,
        "llama.feed_forward_length": n_ff,
        "llama.vocab_size": n_vocab,
    }
    t = [Tensor("token_embd.weight", (n_embd, n_vocab), wtype, 0)]
    for i in range(n_layer):
        t += [Tensor(f"blk.{i}.attn_norm.weight", (n_embd,), F32, 0)]
        t += [Tensor(f"blk.{i}.attn_{x}.weight", (n_embd, n_embd), wtype, 0) for x in ("q", "k", "v", "output")]
        t += [Tensor(f"blk.{i}.ffn_{x}.weight", (n_embd, n_ff), wtype, 0) for x in ("gate", "up")]
        t += [Tensor(f"blk.{i}.ffn_down.weight", (n_ff, n_embd), wtype, 0)]
    t += [Tensor("output.weight", (n_embd, n_vocab), Q6_K, 0)]
    return GGUFInfo(Path("m.gguf"), 3, meta, t)


# (n_embd, n_head, n_ff, context, llama.cpp's compute buffer in MiB)
LLAMA_CPP_COMPUTE = [
    (256, 8, 768, 256, 4.00),
    (256, 8, 768, 512, 12.51),
    (256, 8, 768, 1024, 21.51),
    (256, 8, 768, 2048, 39.51),
    (512, 8, 1536, 256, 7.25),
    (512, 8, 1536, 512, 16.01),
    (512, 8, 1536, 2048, 43.01),
    (768, 12, 2048, 256, 10.00),
    (768, 12, 2048, 512, 23.51),
    (768, 12, 2048, 1024, 36.51),
    (768, 12, 2048, 2048, 62.51),
    (1024, 16, 2816, 256, 13.50),
    (1024, 16, 2816, 512, 31.01),
    (1024, 16, 2816, 2048, 82.01),
]


@pytest.mark.parametrize(("n_embd", "n_head", "n_ff", "ctx", "reported"), LLAMA_CPP_COMPUTE)
def test_compute_buffer_matches_llama_cpp(n_embd: int, n_head: int, n_ff: int, ctx: int, reported: float) -> None:
    info = llama(n_embd, 2, n_head, n_ff)
    assert compute_buffer_bytes(info, ctx) / MIB == pytest.approx(reported, abs=0.3)


def test_kv_cache_matches_llama_cpp_and_scales_with_type() -> None:
    info = llama(768, 7, 12, 2048)  # the 50M speed model: llama.cpp reports 10.50 MiB at 512, 42 MiB at 2048
    assert estimate_memory(info, 512, features=frozenset()).kv_cache / MIB == pytest.approx(10.5)
    assert estimate_memory(info, 2048, features=frozenset()).kv_cache / MIB == pytest.approx(42.0)
    q8 = estimate_memory(info, 2048, kv_type="q8_0", features=frozenset()).kv_cache
    assert q8 / MIB == pytest.approx(42.0 * 34 / 64)
    # llama.cpp rounds the context up to a multiple of 256
    assert estimate_memory(info, 300, features=frozenset()).n_ctx == 512


def test_repacked_weights_depend_on_the_cpu() -> None:
    info = llama(768, 3, 12, 2048, n_vocab=512)
    layer_q4k = sum(t.n_bytes or 0 for t in info.tensors if t.name.startswith("blk.") and t.type_id == Q4_K)
    output = next(t.n_bytes or 0 for t in info.tensors if t.name == "output.weight")
    assert repacked_bytes(info, frozenset({"avx2", "fma"})) == layer_q4k  # not the embedding, not the Q6_K output
    assert repacked_bytes(info, frozenset({"sse4_2"})) == 0
    # arm64 with dot product (a Pi 5's Cortex-A76) also repacks Q6_K (here the output) and Q8_0
    assert repacked_bytes(info, frozenset({"asimd", "asimddp"})) == layer_q4k + output
    # ...but only matrices whose row count is a multiple of the interleave (354 rows is not)
    odd = llama(768, 3, 12, 2048, n_vocab=354)
    assert repacked_bytes(odd, frozenset({"asimddp"})) == repacked_bytes(odd, frozenset({"avx2"}))
    q8 = llama(256, 4, 8, 768, wtype=Q8_0)
    assert repacked_bytes(q8, frozenset({"avx2"})) == 0 and repacked_bytes(q8, frozenset({"asimddp"})) > 0


def test_the_estimate_adds_up() -> None:
    info = llama(768, 3, 12, 2048)
    est = estimate_memory(info, 512, features=frozenset({"avx2"}))
    assert est.kv_cache / MIB == pytest.approx(4.5)  # llama.cpp: 4.50 MiB for the 25M speed model at 512
    assert est.serving == est.runtime + est.weights + est.repacked + est.kv_cache + est.compute + est.vocab
    assert est.loading == est.runtime + est.file + est.repacked + est.vocab
    assert est.total == max(est.serving, est.loading) == est.serving  # a small header: the peak is serving
    assert est.compute > compute_buffer_bytes(info, 512)  # plus the CPU backend's work buffer


def test_a_prompt_touches_one_row_of_logits_of_the_reserved_batch() -> None:
    # llama.cpp reserves logits for a whole batch; with a real vocabulary that dominates what it reports...
    qwen = llama(64, 2, 4, 192, n_vocab=151936, wtype=Q8_0)
    assert compute_buffer_bytes(qwen, 1024) / MIB == pytest.approx(4 * 512 * (151936 + 128) / MIB)
    # ...but a prompt computes the last token's logits only (the measured peak was 121 MiB, not 400)
    assert compute_buffer_bytes(qwen, 1024, n_outputs=1) < 12 * MIB
    # with a small vocabulary the attention scores are the largest part either way
    tiny = llama(256, 2, 8, 768)
    assert compute_buffer_bytes(tiny, 1024, n_outputs=1) == compute_buffer_bytes(tiny, 1024)


def test_the_tokenizer_counts_by_token_and_merge() -> None:
    spm = llama(64, 2, 4, 192, n_vocab=32000)
    bpe = llama(64, 2, 4, 192, n_vocab=32000)
    bpe.metadata["tokenizer.ggml.merges"] = _ArrayLen(30000)  # as the header reader keeps a long array
    assert vocab_bytes(spm) == 32000 * VOCAB_TOKEN_BYTES
    assert vocab_bytes(bpe) == vocab_bytes(spm) + 30000 * VOCAB_MERGE_BYTES


def test_a_large_header_makes_loading_the_peak() -> None:
    # gemma's 262k tokens and 515k merges: a 33 MiB file of which 15 MiB header, 18 MiB weights
    info = llama(64, 2, 4, 192, n_vocab=262144, wtype=Q8_0)
    info.tensors = [t for t in info.tensors if t.name != "output.weight"]  # tied to the embedding
    info.metadata["tokenizer.ggml.merges"] = _ArrayLen(514906)
    info.file_size = 33705504
    est = estimate_memory(info, 256, features=frozenset())
    assert est.total == est.loading > est.serving
    assert "while loading" in est.describe()


def test_fit_context_takes_the_largest_that_fits() -> None:
    info = llama(768, 7, 12, 2048)
    f = frozenset({"avx2"})
    full = estimate_memory(info, 2048, features=f).total
    assert fit_context(info, full, 2048, features=f).n_ctx == 2048
    smaller = fit_context(info, full - 1, 2048, features=f)
    assert smaller.n_ctx == 1792 and smaller.total <= full - 1
    assert fit_context(info, 10**12, 512, features=f).n_ctx == 512  # never more than asked


def test_fit_context_refuses_with_needed_budget_and_what_to_do() -> None:
    info = llama(768, 7, 12, 2048)
    with pytest.raises(UserError) as e:
        fit_context(info, 64 * MIB, 2048, features=frozenset())
    msg = e.value.message
    assert "needs" in msg and "MiB even at context 256" in msg and "budget is 64 MiB" in msg
    assert "\n" not in str(e.value)
    assert "smaller quantization" in e.value.hint and "memory_budget_mb" in e.value.hint
