"""The numpy trainer's forward pass against llama.cpp itself, and the f32 master's round trip: the default model's
Q8_0 file, dequantized (weights.load), written as an f32 GGUF (weights.write_f32) and quantized again by llama.cpp,
gives back the committed file byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmos_edge import trainer, weights
from llmos_edge.engine_worker import load_cpu_backend
from llmos_edge.models import read_gguf
from llmos_edge.recipe import BOS, encode

REPO = Path(__file__).resolve().parents[2]
Q8 = REPO / "model" / "llmos-tiny-q8_0.gguf"
PROMPTS = ["ping\n", "reverse hello\nolleh", "Hey llmos, what is your name?\n", "what can you do\nI can"]


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    load_cpu_backend()
    info, w = weights.load(Q8)
    f32 = tmp_path_factory.mktemp("master") / "llmos-tiny-f32.gguf"
    weights.write_f32(info, w, f32)
    return f32


def test_logits_match_llama_cpp_on_the_f32_file(master: Path) -> None:
    import llama_cpp

    info, w = weights.load(master)
    shape = trainer.Shape.of(info)
    assert (shape.n_embd, shape.n_layer, shape.n_head, shape.n_ff, shape.n_vocab) == (256, 3, 8, 512, 354)
    # f32 KV cache (type 0): llama.cpp's default F16 cache would differ from f32 arithmetic by ~1e-3
    llm = llama_cpp.Llama(str(master), n_ctx=256, n_threads=1, logits_all=True, type_k=0, type_v=0, verbose=False)
    try:
        for prompt in PROMPTS:
            ids = [BOS, *encode(prompt)]
            llm.reset()
            llm.eval(ids)
            ref = np.array(llm.scores[: len(ids)])
            mine, _ = trainer.forward(w, shape, np.array([ids]))
            assert np.abs(mine[0] - ref).max() < 1e-4 * np.abs(ref).max(), prompt
            assert (mine[0].argmax(-1) == ref.argmax(-1)).all(), prompt
    finally:
        llm.close()


def test_the_f32_master_keeps_the_header_and_requantizes_to_the_same_bytes(master: Path, tmp_path: Path) -> None:
    src, f32 = read_gguf(Q8), read_gguf(master)
    assert f32.quantization == "F32"
    assert {k: v for k, v in f32.metadata.items() if k != "general.file_type"} == {
        k: v for k, v in src.metadata.items() if k != "general.file_type"
    }
    assert [(t.name, t.shape) for t in f32.tensors] == [(t.name, t.shape) for t in src.tensors]
    out = tmp_path / "again-q8_0.gguf"
    weights.quantize(master, out, "Q8_0")
    assert out.read_bytes() == Q8.read_bytes()
