"""Tuning consolidation's recipe without the held-out set (issue 15): what a change of finetune.Settings does to the
taught pairs and to a dev split, never to model/heldout.jsonl (that is make bench-learning's to measure).

The pairs are bench/learning_pairs.py's, but not the ones the bench teaches: pairs 11-20 (the second filler of each
question shape), or the first N of them. The dev split is drawn from the default model's own training distribution
(recipe.TrainingStream with a seed of its own, which never yields a held-out prompt or word): FAQ phrasings and
reversals of new random words, both left out of the fine-tune's replay. Each run fine-tunes the built-in Q8_0 model,
quantizes the result to Q8_0 and asks it, through the engine's worker process, the taught questions and the dev
split, beside the built-in model.

    python bench/learning_dev.py [--pairs 10] [--set lr=1e-4 --set taught_fraction=0.25 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_pairs import pairs as bench_pairs
from report import REPO

from llmos_edge import finetune
from llmos_edge.engine_worker import load_cpu_backend
from llmos_edge.recipe import TrainingStream

MASTER = REPO / "model" / "llmos-tiny-q8_0.gguf"
DEV_SEED = 4242  # not recipe.SEED (the model's training stream) nor finetune's replay seed
DEV_SIZE = 440  # as many as the held-out set


def dev_rows() -> list[dict[str, str]]:
    stream, seen, rows = TrainingStream(DEV_SEED, reverse_fraction=200 / 440), set(), []
    while len(rows) < DEV_SIZE:
        e = next(stream)
        if e.prompt not in seen:
            seen.add(e.prompt)
            rows.append({"task": e.task, "prompt": e.prompt, "answer": e.answer})
    return rows


class ReplayWithoutDev(TrainingStream):
    """The replay stream with the dev split left out as well (as the held-out set is), so that the dev split
    measures what the model keeps of its own training, not what the replay teaches it again."""

    def __init__(self, seed: int = 0, reverse_fraction: float = 0.6, bare_fraction: float = 0.0) -> None:
        super().__init__(seed, reverse_fraction, bare_fraction)
        rows = dev_rows()
        self.heldout_faq_lower |= {r["prompt"].lower() for r in rows if r["task"] == "faq"}
        self.heldout_words |= {r["prompt"].split(" ", 1)[1] for r in rows if r["task"] == "reverse"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=10, help="how many of the dev pairs (bench pairs 11-20) to teach")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a finetune.Settings field")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    fields = {f.name: f for f in dataclasses.fields(finetune.Settings)}
    changes: dict[str, object] = {}
    for item in a.set:
        name, _, value = item.partition("=")
        if name not in fields:
            sys.exit(f"error: finetune.Settings has no field {name!r} (hint: one of {', '.join(fields)})")
        changes[name] = None if value == "None" else type(getattr(finetune.Settings(), name) or 0.0)(value)
    s = dataclasses.replace(finetune.Settings(), **changes)  # type: ignore[arg-type]
    chosen = bench_pairs(20)[10 : 10 + a.pairs]
    pairs = [finetune.TaughtPair(i + 1, q, ans) for i, (q, ans) in enumerate(chosen)]
    load_cpu_backend()
    rows = dev_rows()
    finetune.TrainingStream = ReplayWithoutDev  # type: ignore[misc]  # what finetune.mixed_stream replays
    with tempfile.TemporaryDirectory(prefix="learning-dev-") as tmp:
        out = Path(tmp) / "taught.gguf"
        t0 = time.monotonic()
        report = finetune.consolidate(MASTER, pairs, {"Q8_0": out}, s, threads=a.threads)
        seconds = time.monotonic() - t0
        before = finetune.validate(MASTER, pairs, rows, a.threads)
        after = finetune.validate(out, pairs, rows, a.threads)
    result = {
        "pairs": a.pairs,
        "settings": changes,
        "steps": report.steps,
        "train_seconds": round(seconds),
        "min_margin": round(report.min_margin, 2),
        "taught": list(after.taught),
        "dev_before": list(before.heldout),
        "dev_after": list(after.heldout),
        "dev_change_points": round(100 * (after.heldout[0] - before.heldout[0]) / len(rows), 2),
        "dev_tasks_before": before.tasks,
        "dev_tasks_after": after.tasks,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
