"""Consolidation's training data: taught variants are the ones the lookup accepts, windows mix taught and replay,
and the loss sees only answers."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from llmos_edge import trainer, weights
from llmos_edge.config import LearningConfig
from llmos_edge.consolidation import Recipe
from llmos_edge.finetune import (
    Settings,
    TaughtPair,
    _batch,
    backoff,
    heldout_rows,
    heldout_sample,
    margins,
    mixed_stream,
    parser,
    scaled,
    settings_of,
    shrink,
    variants,
)
from llmos_edge.learning import key
from llmos_edge.recipe import BOS, EOS, Example, encode


def test_every_variant_is_the_taught_question_for_the_lookup() -> None:
    for question in ("what is the wifi password", "Who made you?", "where is the Manual"):
        vs = variants(question)
        assert vs[0] == question and len(set(vs)) > 500
        assert {key(v) for v in vs} == {key(question)}


def test_the_stream_mixes_taught_pairs_and_the_default_models_data() -> None:
    pairs = [TaughtPair(1, "what is the wifi password", "On the sticker."), TaughtPair(2, "who made you", "Us.")]
    seen = list(itertools.islice(mixed_stream(pairs, Settings()), 400))
    tasks = {t: sum(e.task == t for e in seen) for t in ("taught", "faq", "reverse")}
    assert 200 < tasks["taught"] < 280 and tasks["faq"] > 20 and tasks["reverse"] > 20, tasks
    taught = [e for e in seen if e.task == "taught"]
    assert {e.answer for e in taught} == {"On the sticker.", "Us."}
    assert sum(e.prompt in ("what is the wifi password", "who made you") for e in taught) > 40  # as taught
    # the same seed gives the same data
    assert seen == list(itertools.islice(mixed_stream(pairs, Settings()), 400))


def test_the_loss_mask_covers_the_answer_and_eos_only() -> None:
    ids, targets, mask = _batch([Example("taught", "hi", "yo"), Example("taught", "abc", "d")])
    assert ids[0].tolist()[:4] == [BOS, *encode("hi\n")]
    # targets are the inputs shifted by one; the mask marks the targets that are answer tokens or EOS
    assert [t for t, m in zip(targets[0].tolist(), mask[0].tolist(), strict=True) if m] == [*encode("yo"), EOS]
    assert [t for t, m in zip(targets[1].tolist(), mask[1].tolist(), strict=True) if m] == [*encode("d"), EOS]


def test_a_held_out_sample_is_fixed_balanced_and_asks_every_kind_of_question() -> None:
    rows = heldout_rows()
    assert heldout_sample(rows, 0) == rows and heldout_sample(rows, 10_000) == rows
    sample = heldout_sample(rows, 40)
    assert len(sample) == 40 and len({r["prompt"] for r in sample}) == 40 and all(r in rows for r in sample)
    assert sample == heldout_sample(rows, 40)  # the same prompts for the built-in model and the result, every run
    tasks = {t: [r for r in sample if r["task"] == t] for t in ("faq", "reverse")}
    assert len(tasks["faq"]) == len(tasks["reverse"]) == 20
    # every FAQ answer (intent) and every reversed word length of the full set is asked
    assert {r["answer"] for r in tasks["faq"]} == {r["answer"] for r in rows if r["task"] == "faq"}
    assert {len(r["answer"]) for r in tasks["reverse"]} == {len(r["answer"]) for r in rows if r["task"] == "reverse"}
    # a larger sample holds the smaller one's prompts: raising the setting only adds questions
    assert all(r in heldout_sample(rows, 100) for r in sample)
    assert len(heldout_sample(rows, 7)) == 7


def test_the_settings_defaults_are_the_recipe_the_bench_measures() -> None:
    """learning.consolidate_* (config), the job's Recipe and the training process's options default alike, so a
    device without those settings runs finetune.Settings' recipe."""
    c, r, s = LearningConfig(), Recipe(), Settings()
    assert (c.consolidate_steps, c.consolidate_batch, c.consolidate_window) == (s.steps, s.batch, s.window)
    assert (r.steps, r.batch, r.window, r.rate) == (s.steps, s.batch, s.window, s.lr) and c.consolidate_rate == s.lr
    assert c.consolidate_heldout == r.heldout == 0
    common = ["--master", "m", "--pairs", "p", "--out", "Q8_0=o", "--report", "r"]
    assert settings_of(parser().parse_args(common)) == s
    a = parser().parse_args(common + Recipe(steps=40, batch=1, window=96, rate=4e-4, heldout=40).args())
    assert settings_of(a) == Settings(steps=40, batch=1, window=96, lr=4e-4) and a.heldout == 40


def test_shrink_finds_the_least_of_the_change_that_holds_the_margin() -> None:
    # The built-in model as the trained weights, zero as the weights before training: the whole model is the
    # "change", and with none of it every logit is 0, so no answer leads.
    info, w = weights.load(Path(__file__).resolve().parents[2] / "model" / "llmos-tiny-q8_0.gguf")
    shape = trainer.Shape.of(info)
    base = {n: np.zeros_like(v) for n, v in w.items()}
    known = [Example("faq", "ping", "pong"), Example("faq", "hello", "Hello! Ask me a question.")]
    full = min(margins(w, shape, known))
    assert full > 2.0
    kept, low = shrink(w, base, shape, known, keep_margin=2.0, steps=20)
    assert 0.0 < kept < 1.0 and low >= 2.0
    assert min(margins(w, shape, known)) == full  # w itself is left whole
    assert min(margins(scaled(w, base, kept), shape, known)) == low
    # the grid's next smaller point falls short: nothing less would do
    assert min(margins(scaled(w, base, kept - 0.05), shape, known)) < 2.0
    # a margin the whole change does not reach keeps all of it
    assert shrink(w, base, shape, known, keep_margin=full + 1.0, steps=20) == (1.0, full)


def test_a_file_that_loses_a_taught_answer_to_quantizing_takes_more_of_the_change() -> None:
    assert backoff(0.9) == [0.9, 0.95, 1.0]
    assert backoff(0.5) == [0.5, 0.75, 1.0]
    assert backoff(1.0) == [1.0]
