"""The model's data generator: deterministic, and the held-out set is really held out. Plus the committed files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

MODEL_DIR = Path(__file__).resolve().parents[2] / "model"


def _load_data() -> ModuleType:
    # model/ is build tooling, not a package of the product: load data.py by path.
    spec = importlib.util.spec_from_file_location("llmos_model_data", MODEL_DIR / "data.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


data = _load_data()


def test_generation_is_deterministic() -> None:
    assert data.heldout_examples() == data.heldout_examples()
    assert data.training_examples(2000) == data.training_examples(2000)
    assert data.packed_window(data.TrainingStream(), 256) == data.packed_window(data.TrainingStream(), 256)
    assert data.training_examples(200, seed=1) != data.training_examples(200, seed=2)


def test_heldout_shape() -> None:
    held = data.heldout_examples()
    faq = [e for e in held if e.task == "faq"]
    rev = [e for e in held if e.task == "reverse"]
    assert len(faq) == data.HELDOUT_FAQ_PER_INTENT * len(data.FAQ_ANSWERS)
    assert len(rev) == data.HELDOUT_REVERSE_PER_LENGTH * len(data.WORD_LENGTHS)
    assert {e.answer for e in faq} == set(data.FAQ_ANSWERS.values())
    for e in rev:
        word = e.prompt.removeprefix("reverse ")
        assert word.isalpha() and word.islower() and 3 <= len(word) <= 10
        assert e.answer == word[::-1]
    assert len({e.prompt for e in held}) == len(held)


def test_heldout_never_in_training() -> None:
    held = data.heldout_examples()
    held_faq = {e.prompt.lower() for e in held if e.task == "faq"}
    held_words = {e.prompt for e in held if e.task == "reverse"}
    # Structurally: no held-out (prefix, core, suffix) combination is in the training pool, in any casing.
    stream = data.TrainingStream()
    pool = {(p + c + s).lower() for (p, c, s), _ in stream.faq}
    assert not pool & held_faq
    # And in a large sample of what training actually sees.
    for e in data.training_examples(100_000):
        if e.task == "faq":
            assert e.prompt.lower() not in held_faq
        else:
            assert e.prompt not in held_words


def test_self_test_prompt_is_trained() -> None:
    stream = data.TrainingStream()
    assert (("", "ping", ""), "ping") in stream.faq
    assert data.FAQ_ANSWERS["ping"] == "pong"


def test_training_window_shape() -> None:
    ids, mask = data.packed_window(data.TrainingStream(), 256)
    assert len(ids) == len(mask) == 256
    assert ids[0] == data.BOS and ids.count(data.BOS) >= 2
    # The loss sees answers and their EOS, never the prompts.
    assert mask[0] == 0 and mask[ids.index(data.EOS)] == 1


def test_tokenizer_round_trip() -> None:
    text = "reverse hello\nI am llmos-tiny, a small llama model running offline.\u00e9"
    ids = data.encode(text)
    assert data.decode(ids) == text
    # The newline and non-ASCII text fall back to byte tokens, as in llama.cpp.
    assert data.encode("\n") == [3 + 0x0A]
    assert len(data.encode("\u00e9")) == 2


def test_committed_heldout_matches_generator() -> None:
    rows = [json.loads(line) for line in (MODEL_DIR / "heldout.jsonl").read_text().splitlines()]
    expected = [{"task": e.task, "prompt": e.prompt, "answer": e.answer} for e in data.heldout_examples()]
    assert rows == expected


def test_sha256sums_match_committed_models() -> None:
    lines = (MODEL_DIR / "SHA256SUMS").read_text().splitlines()
    names = {line.split()[1] for line in lines}
    assert names == {"llmos-tiny-q8_0.gguf", "llmos-tiny-q4_k_m.gguf"}
    for line in lines:
        digest, name = line.split()
        path = MODEL_DIR / name
        if not path.exists():
            pytest.fail(f"{path} is missing; `make model` builds it")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
