"""Held-out accuracy of the committed llmos-tiny files, measured through llama.cpp as the engine runs them:
greedy, BOS + prompt + "\\n", stop at EOS. The numbers this prints are the ones model/README.md reports."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

MODEL_DIR = Path(__file__).resolve().parents[2] / "model"
QUANTS = ["llmos-tiny-q8_0.gguf", "llmos-tiny-q4_k_m.gguf"]
MIN_ACCURACY = 0.95
_loaded = False


_PROBE = """
import ctypes, sys
import llama_cpp
lib = llama_cpp.llama_cpp._lib
if sys.argv[2]:
    lib.ggml_backend_load.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load.restype = ctypes.c_void_p
    lib.ggml_backend_load(sys.argv[2].encode())
else:
    lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load_all_from_path(sys.argv[3].encode())
llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, verbose=False)
llm.create_completion("ping", max_tokens=4, temperature=0)
"""
# Best first, as ggml itself ranks them; probed only when the automatic choice crashes.
_FALLBACK = ["icelake", "cooperlake", "cascadelake", "skylakex", "zen4", "alderlake", "haswell", "sse42", "x64"]


def _bin_dir() -> Path:
    return Path(llama_cpp.__file__).parent.parent / "bin"


def _runs(variant_lib: str) -> bool:
    model = str(MODEL_DIR / QUANTS[0])
    r = subprocess.run([sys.executable, "-c", _PROBE, model, variant_lib, str(_bin_dir())], capture_output=True)
    return r.returncode == 0


def _load_backends() -> None:
    """The wheel is built with GGML_BACKEND_DL: its CPU variants live in site-packages/bin, where ggml does not
    look, and must be registered through llama_cpp's own copy of ggml before any model loads.

    Measured on the build machine (a VM advertising AMX and AVX512-FP16): ggml picks the sapphirerapids variant,
    which dies with SIGILL on the first quantized (Q8_0, Q4_K_M) matmul while f32 works. So probe the automatic
    choice in a child process, and if it crashes load the best variant that runs instead."""
    global _loaded
    if _loaded:
        return
    lib = llama_cpp.llama_cpp._lib
    if _runs(""):
        lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        lib.ggml_backend_load_all_from_path.restype = None
        lib.ggml_backend_load_all_from_path(str(_bin_dir()).encode())
    else:
        for name in _FALLBACK:
            path = _bin_dir() / f"libggml-cpu-{name}.so"
            if path.exists() and _runs(str(path)):
                print(f"automatic CPU variant crashed; using {path.name}")
                lib.ggml_backend_load.argtypes = [ctypes.c_char_p]
                lib.ggml_backend_load.restype = ctypes.c_void_p
                lib.ggml_backend_load(str(path).encode())
                break
        else:
            pytest.fail("no ggml CPU variant runs the model")
    _loaded = True


def _heldout() -> list[dict[str, str]]:
    return [json.loads(line) for line in (MODEL_DIR / "heldout.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=QUANTS)
def llm(request: pytest.FixtureRequest) -> Iterator[llama_cpp.Llama]:
    path = MODEL_DIR / request.param
    if not path.exists():
        pytest.fail(f"{path} is missing; `make model` builds it")
    _load_backends()
    model = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, n_batch=256, seed=0, verbose=False)
    yield model
    model.close()


def _answer(llm: llama_cpp.Llama, prompt: str) -> str:
    tokens = llm.tokenize((prompt + "\n").encode(), add_bos=True, special=False)
    llm.reset()
    out: list[int] = []
    for tok in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
        if tok == llm.token_eos() or len(out) >= 80:
            break
        out.append(tok)
    return llm.detokenize(out).decode("utf-8", errors="replace")


def test_metadata_and_tokenizer(llm: llama_cpp.Llama) -> None:
    meta = llm.metadata
    assert meta["general.name"] == "llmos-tiny"
    assert meta["llmos.prompt_template"] == "{prompt}\n"
    assert meta["llmos.self_test.prompt"] == "ping"
    assert meta["llmos.self_test.answer"] == "pong"
    # BOS is added by llama.cpp, no space prefix, the newline is a byte token: what training saw.
    assert llm.tokenize(b"ping\n", add_bos=True) == [1, *[ord(c) - 0x21 + 260 for c in "ping"], 3 + 0x0A]


def test_self_test(llm: llama_cpp.Llama) -> None:
    assert _answer(llm, "ping") == "pong"


def test_heldout_accuracy(llm: llama_cpp.Llama) -> None:
    rows = _heldout()
    score: dict[str, list[int]] = {}
    misses: list[str] = []
    for r in rows:
        got = _answer(llm, r["prompt"])
        s = score.setdefault(r["task"], [0, 0])
        s[0] += got == r["answer"]
        s[1] += 1
        if got != r["answer"] and len(misses) < 10:
            misses.append(f"  {r['prompt']!r}: want {r['answer']!r}, got {got!r}")
    name = Path(llm.model_path).name
    for task, (ok, n) in sorted(score.items()):
        print(f"{name} {task}: {ok}/{n} = {ok / n:.1%} exact")
    if misses:
        print("first misses:\n" + "\n".join(misses))
    assert set(score) == {"faq", "reverse"}
    for task, (ok, n) in score.items():
        assert ok / n >= MIN_ACCURACY, f"{name} {task}: {ok}/{n} exact, below {MIN_ACCURACY:.0%}"
