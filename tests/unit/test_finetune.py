"""Consolidation's training data: taught variants are the ones the lookup accepts, windows mix taught and replay,
and the loss sees only answers."""

from __future__ import annotations

import itertools

from llmos_edge.finetune import Settings, TaughtPair, _batch, mixed_stream, variants
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
