"""Consolidation (issue 15, point 2) with the real trainer, llama.cpp's quantizer, the engine and the supervisor:
taught pairs go into a new version of the built-in model, which then answers them with the taught-answer lookup
switched off; forgetting one takes it out of the weights again."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import yaml

from llmos_edge import finetune
from llmos_edge.models import read_gguf
from tests.integration.conftest import Appliance

REPO = Path(__file__).resolve().parents[2]
Q8 = REPO / "model" / "llmos-tiny-q8_0.gguf"
PAIRS = [
    ("what is the guest wifi password", "The guest wifi password is sunflower42."),
    ("where is the spare key", "The spare key is under the blue pot."),
    ("who is on call on friday", "Eva is on call on friday."),
]


def test_a_fine_tune_learns_the_pairs_exactly_and_keeps_the_held_out_score(tmp_path: Path) -> None:
    pairs = [finetune.TaughtPair(i + 1, q, a) for i, (q, a) in enumerate(PAIRS)]
    out = tmp_path / "taught-q8_0.gguf"
    # the held-out bar of the appliance is 1 point (make bench-learning measures the recipe against it); this test
    # checks the fine-tune's mechanics and allows 5
    report = finetune.run(Q8, pairs, {"Q8_0": out}, progress=print, max_drop=5.0)
    print({k: v for k, v in report.items() if k != "misses"})
    assert report["passed"], report
    assert report["taught"] == [3, 3] and report["pairs"] == [1, 2, 3]
    before, after = report["heldout_before"], report["heldout_after"]
    assert isinstance(before, list) and isinstance(after, list) and before[1] == after[1] == 440
    assert 100 * after[0] / after[1] >= 100 * before[0] / before[1] - 5.0
    # the new file is the built-in model's in all but its weights
    new, old = read_gguf(out), read_gguf(Q8)
    assert new.quantization == "Q8_0" and new.metadata == old.metadata
    assert [(t.name, t.shape, t.type_id) for t in new.tensors] == [(t.name, t.shape, t.type_id) for t in old.tensors]
    assert out.read_bytes() != Q8.read_bytes()
    assert not out.with_name(out.name + ".f32").exists()
    assert 0.0 < report["kept"]["Q8_0"] <= 1.0, report["kept"]  # type: ignore[index]


def test_a_file_that_loses_a_taught_answer_to_quantizing_is_written_again_with_more_of_the_change(
    tmp_path: Path,
) -> None:
    """consolidate's back-off through the real trainer and quantizer: a file the check refuses is written again with
    more of the change (finetune.backoff), and the file left is the one that passed. Five steps and a margin any
    change keeps: the mechanics, not the recipe."""
    from llmos_edge.engine_worker import load_cpu_backend

    load_cpu_backend()
    pairs = [finetune.TaughtPair(i + 1, q, a) for i, (q, a) in enumerate(PAIRS)]
    out = tmp_path / "taught-q8_0.gguf"
    seen: list[bytes] = []

    def holds(path: Path, trained: object) -> bool:
        seen.append(path.read_bytes())
        return len(seen) == 2  # the first file "lost an answer"; the second holds

    s = finetune.Settings(steps=5, keep_margin=-1e9)
    report = finetune.consolidate(Q8, pairs, {"Q8_0": out}, s, holds=holds)
    first = report.kept
    assert 0.0 < first < 1.0 and report.kept_by_type == {"Q8_0": finetune.backoff(first)[1]}
    assert len(seen) == 2 and seen[0] != seen[1] and out.read_bytes() == seen[1]


def _wait_for_run(app: Appliance, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = app.console.command("/consolidate status")
        if "last run" in line:
            return line
        time.sleep(10)
    raise TimeoutError(f"no consolidation finished in {timeout} s:\n{app.output()[-3000:]}")


def test_consolidation_answers_from_the_weights_and_forget_takes_it_out(appliance_factory: type[Appliance]) -> None:
    # The job's path through the real supervisor, engine and gate; the recipe's held-out cost is the bench's
    # (make bench-learning) to measure against the 1-point target, so it may lose up to 5 here.
    app = appliance_factory(config="learning:\n  lookup: false\n  consolidate_after: 0\n  consolidate_max_drop: 5\n")
    app.wait_ready()
    c = app.console
    c.read_until(b"llmos> ", 10)
    (q1, a1), (q2, a2) = PAIRS[:2]
    before = c.ask(q1)
    assert before != a1
    for q, a in PAIRS[:2]:
        assert c.command(f"/teach {q} => {a}").startswith("taught #")
    assert c.ask(q1) == before  # the lookup is off: the model alone answers
    learning = c.status()["learning"]
    assert "2 taught pairs (not looked up: learning.lookup)" in learning, learning
    assert "2 taught pairs not in the weights (on /consolidate)" in learning, learning
    assert c.command("/consolidate") == "consolidation: 2 taught pairs will be consolidated when no request is running"
    done = _wait_for_run(app, 1800)
    assert "last run 1: activated, taught 2/2" in done, done
    assert "default: installed" in c.command("/model") and "taught-1: active" in c.command("/model")
    # from the weights: the lookup is off, and the request's row names no taught pair
    assert c.ask(q1) == a1 and c.ask(q2) == a2
    conn = sqlite3.connect(f"file:{app.db}?mode=ro", uri=True)
    rows = conn.execute("SELECT taught_id, tokens_out FROM requests WHERE prompt = ?", [q1]).fetchall()
    assert rows[-1][0] is None and rows[-1][1] > 0
    assert conn.execute("SELECT COUNT(*) FROM taught WHERE consolidated = 1").fetchone()[0] == 2
    conn.close()
    assert "0 taught pairs not in the weights" in app.llmos("consolidate", "--status").stdout

    # forgetting a learnt pair brings the built-in model back and removes the version that learnt it
    assert c.command(f"/forget {q1}", timeout=120).startswith("forgot #1")
    models = c.command("/model")
    assert "default: active" in models and "taught-1" not in models, models
    assert c.ask(q1) == before
    assert "1 taught pairs not in the weights" in c.status()["learning"]
    app.stop()


# The image test's consolidation budget (tests/image/consolidate.yaml, its override on the device) and the pair it
# teaches (tests/image/test_image.py), run here through the same job: what the image test will hear from the weights.
IMAGE_OVERRIDE = REPO / "tests" / "image" / "consolidate.yaml"
IMAGE_PAIR = ("what is the wi-fi password", "It is on the sticker under the box.")


def test_the_image_tests_small_budget_puts_one_pair_into_the_weights(appliance_factory: type[Appliance]) -> None:
    app = appliance_factory(
        config="learning:\n  lookup: false\n  consolidate_after: 0\n", override=IMAGE_OVERRIDE.read_text()
    )
    app.wait_ready()
    c = app.console
    c.read_until(b"llmos> ", 10)
    q, a = IMAGE_PAIR
    before = c.ask(q)
    assert before != a
    assert c.command(f"/teach {q} => {a}").startswith("taught #")
    assert c.command("/consolidate") == "consolidation: 1 taught pairs will be consolidated when no request is running"
    done = _wait_for_run(app, 600)
    assert "last run 1: activated, taught 1/1" in done, done
    assert c.ask(q) == a  # the lookup is off: from taught-1's weights
    conn = sqlite3.connect(f"file:{app.db}?mode=ro", uri=True)
    report = json.loads(conn.execute("SELECT report FROM consolidations WHERE id = 1").fetchone()[0])
    conn.close()
    # the override's budget reached the training process: its steps, batch, window and rate, and the held-out sample
    budget = yaml.safe_load(IMAGE_OVERRIDE.read_text())["learning"]
    assert report["steps"] == budget["consolidate_steps"], report
    assert report["recipe"] == {
        "batch": budget["consolidate_batch"],
        "window": budget["consolidate_window"],
        "lr": budget["consolidate_rate"],
    }, report
    assert report["heldout_before"][1] == report["heldout_after"][1] == budget["consolidate_heldout"], report
    print({k: v for k, v in report.items() if k not in ("misses", "results")})
    app.stop()
