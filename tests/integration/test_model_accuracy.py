"""Held-out accuracy of the committed llmos-tiny files, measured through llama.cpp exactly as the appliance runs
them: the engine's worker process (its CPU-variant choice included), greedy decoding, BOS + prompt + "\\n", stop
at EOS. The numbers this prints are the ones model/README.md reports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos_edge.engine import Engine, EngineSettings
from llmos_edge.models import read_gguf

MODEL_DIR = Path(__file__).resolve().parents[2] / "model"
QUANTS = ["llmos-tiny-q8_0.gguf", "llmos-tiny-q4_k_m.gguf"]
MIN_ACCURACY = 0.95


def _heldout() -> list[dict[str, str]]:
    return [json.loads(line) for line in (MODEL_DIR / "heldout.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=QUANTS)
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    path = MODEL_DIR / request.param
    if not path.exists():
        pytest.fail(f"{path} is missing; `make model` builds it")
    e = Engine(EngineSettings(str(path), n_ctx=256, n_threads=2))
    e.start()
    yield e
    e.stop()


def _answer(e: Engine, prompt: str) -> str:
    return e.generate(prompt, 80, lambda _t: None, lambda: False).text


def test_metadata_carries_the_prompt_format_and_self_test() -> None:
    for name in QUANTS:
        meta = read_gguf(MODEL_DIR / name).metadata
        assert meta["general.name"] == "llmos-tiny"
        assert meta["llmos.prompt_template"] == "{prompt}\n"
        assert (meta["llmos.self_test.prompt"], meta["llmos.self_test.answer"]) == ("ping", "pong")
        assert meta["tokenizer.ggml.add_space_prefix"] is False


def test_self_test(engine: Engine) -> None:
    assert _answer(engine, "ping") == "pong"


def test_heldout_accuracy(engine: Engine) -> None:
    score: dict[str, list[int]] = {}
    misses: list[str] = []
    for r in _heldout():
        got = _answer(engine, r["prompt"])
        s = score.setdefault(r["task"], [0, 0])
        s[0] += got == r["answer"]
        s[1] += 1
        if got != r["answer"] and len(misses) < 10:
            misses.append(f"  {r['prompt']!r}: want {r['answer']!r}, got {got!r}")
    name = Path(engine.settings.model_path).name
    for task, (ok, n) in sorted(score.items()):
        print(f"{name} {task}: {ok}/{n} = {ok / n:.1%} exact (cpu {engine.info.cpu_backend})")
    if misses:
        print("first misses:\n" + "\n".join(misses))
    assert set(score) == {"faq", "reverse"}
    for task, (ok, n) in score.items():
        assert ok / n >= MIN_ACCURACY, f"{name} {task}: {ok}/{n} exact, below {MIN_ACCURACY:.0%}"
