"""The architecture matrix (issue 11): tiny random-weight models of many llama.cpp architectures, each with the real
tokenizer and chat template of a llama.cpp vocab file (model/arch_matrix.py, `make arch-models`), through the real
engine. Each loads at two context sizes, answers a prompt formatted by its chat template, and its memory estimate
from the header alone is within 10% of the worker's measured peak RSS (bench/models.py measures; `make
bench-models` writes the same figures to BENCHMARKS.md)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from bench.models import CONTEXTS, ENV, SENTENCE, TOLERANCE, measure, models_dir
from llmos_edge.engine_worker import load_cpu_backend
from llmos_edge.models import MIB, GGUFInfo, read_gguf

MIN_ARCHITECTURES = 8
DIR = models_dir()
MODELS = sorted(p.stem for p in DIR.glob("*.gguf"))


def _path(name: str) -> Path:
    path = DIR / f"{name}.gguf"
    if not path.exists():
        pytest.fail(f"{path} is missing; `make arch-models` builds the matrix (the Makefile sets ${ENV})")
    return path


@functools.cache
def _info(name: str) -> GGUFInfo:
    return read_gguf(_path(name))  # seconds for a 262k-token vocabulary: once per model


def templated_tokens(path: Path, prompt: str) -> tuple[int, int]:
    """(tokens of `prompt` formatted by the model's chat template, tokens of the bare prompt), counted here with the
    model's own tokenizer loaded vocabulary-only, independently of the engine."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    load_cpu_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = LlamaModel(path_model=str(path), params=params, verbose=False)
    try:
        bos = model.detokenize([model.token_bos()], special=True).decode("utf-8", "replace")
        eos = model.detokenize([model.token_eos()], special=True).decode("utf-8", "replace")
        chat = Jinja2ChatFormatter(model.metadata()["tokenizer.chat_template"], eos_token=eos, bos_token=bos)
        text = chat(messages=[{"role": "user", "content": prompt}]).prompt
        templated = len(model.tokenize(text.encode(), add_bos=False, special=True))
        bare = len(model.tokenize(prompt.encode(), add_bos=True, special=False))
    finally:
        model.close()
    return templated, bare


def test_the_matrix_covers_at_least_8_architectures() -> None:
    if not MODELS:
        pytest.fail(f"no models in {DIR}; `make arch-models` builds them (the Makefile sets ${ENV})")
    archs = {_info(m).architecture for m in MODELS}
    assert len(archs) >= MIN_ARCHITECTURES, f"only {sorted(archs)} in {DIR}"


@pytest.mark.parametrize("name", MODELS or ["(none built)"])
def test_model_answers_with_its_template_within_its_memory_estimate(name: str) -> None:
    path, info = _path(name), _info(name)
    has_template = bool(info.metadata.get("tokenizer.chat_template"))
    expected = templated_tokens(path, SENTENCE) if has_template else None
    for n_ctx in CONTEXTS:
        run = measure(path, n_ctx, info=info)
        assert run.stats.stop in ("eos", "length"), f"{name} at {n_ctx}: stopped with {run.stats.stop!r}"
        # The long prompt really filled most of the context (the peak is measured there).
        assert run.stats.tokens_in > 0.75 * run.estimate.n_ctx, f"{name}: only {run.stats.tokens_in} prompt tokens"
        if expected is not None:
            templated, bare = expected
            assert templated > bare  # the template adds its own tokens around the question...
            assert run.probe.tokens_in == templated  # ...and the engine gave the model exactly those
        assert abs(run.error) <= TOLERANCE, (
            f"{name} ({info.architecture}) at context {run.estimate.n_ctx}: estimate {run.estimate.total / MIB:.1f} "
            f"MiB ({run.estimate.describe()}), measured peak {run.peak_rss / MIB:.1f} MiB, {run.error * 100:+.1f}%"
        )
