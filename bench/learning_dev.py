"""Tuning consolidation's recipe without the held-out set (issue 15): what a change of finetune.Settings does to the
taught pairs and to a dev split, never to model/heldout.jsonl (that is make bench-learning's to measure).

The pairs are bench/learning_pairs.py's dev_pairs, none of which the bench teaches (the ten question shapes with
fillers of their own), or the first N of them. The dev split is drawn from the default model's own training distribution
(recipe.TrainingStream with a seed of its own, which never yields a held-out prompt or word): FAQ phrasings and
reversals of new random words, both left out of the fine-tune's replay. Each run fine-tunes the built-in Q8_0 model,
quantizes the result to Q8_0 and asks it, through the engine's worker process, the taught questions and the dev
split, beside the built-in model.

    python bench/learning_dev.py [--pairs 10] [--set lr=1e-4 --set taught_fraction=0.25 ...]
    python bench/learning_dev.py --keep-margins None 1 2 3   # one training, its change shrunk for each margin

With --keep-margins the run trains once with the whole change kept, then for each margin (finetune.shrink; None:
the whole change) quantizes the weights to Q8_0 and Q4_K_M and asks both the taught questions, and the Q8_0 file the
dev split. The FAQ half of the dev split are phrasings the default model was trained on (every FAQ combination
outside the held-out set's is), so it measures how much of its training the model keeps, the reversals how much of
its generalisation; `dev_changed` counts the dev answers that differ from the built-in model's.
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

from learning_pairs import dev_pairs
from report import REPO

from llmos_edge import finetune, trainer, weights
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
    ap.add_argument("--pairs", type=int, default=10, help="how many of the dev pairs to teach")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a finetune.Settings field")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep-margins", nargs="+", default=None, metavar="MARGIN", help="see above (None: keep all)")
    a = ap.parse_args()
    fields = {f.name: f for f in dataclasses.fields(finetune.Settings)}
    changes: dict[str, object] = {}
    for item in a.set:
        name, _, value = item.partition("=")
        if name not in fields:
            sys.exit(f"error: finetune.Settings has no field {name!r} (hint: one of {', '.join(fields)})")
        changes[name] = None if value == "None" else type(getattr(finetune.Settings(), name) or 0.0)(value)
    s = dataclasses.replace(finetune.Settings(), **changes)  # type: ignore[arg-type]
    chosen = dev_pairs()[: a.pairs]
    pairs = [finetune.TaughtPair(i + 1, q, ans) for i, (q, ans) in enumerate(chosen)]
    load_cpu_backend()
    rows = dev_rows()
    finetune.TrainingStream = ReplayWithoutDev  # type: ignore[misc]  # what finetune.mixed_stream replays
    if a.keep_margins is not None:
        return by_margin(pairs, rows, s, [None if m == "None" else float(m) for m in a.keep_margins], a.threads)
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


def answers(model: Path, rows: list[dict[str, str]], threads: int) -> list[str]:
    return finetune.validate(model, [], rows, threads).answers


def by_margin(
    pairs: list[finetune.TaughtPair],
    rows: list[dict[str, str]],
    s: finetune.Settings,
    keep_margins: list[float | None],
    threads: int,
) -> int:
    info, w = weights.load(MASTER)
    base = {n: v.copy() for n, v in w.items()}
    shape = trainer.Shape.of(info)
    t0 = time.monotonic()
    report = finetune.fine_tune(w, shape, pairs, dataclasses.replace(s, keep_margin=None))
    seconds = time.monotonic() - t0
    as_taught = [finetune.Example("taught", p.question, p.answer) for p in pairs]
    built_in = answers(MASTER, rows, threads)
    before = sum(g == r["answer"] for g, r in zip(built_in, rows, strict=True))
    with tempfile.TemporaryDirectory(prefix="learning-dev-") as tmp:
        for margin in keep_margins:
            v = {n: x.copy() for n, x in w.items()}
            kept, low = (1.0, min(finetune.margins(v, shape, as_taught)))
            if margin is not None:
                kept, low = finetune.shrink(v, base, shape, as_taught, margin, s.shrink_steps)
                v = finetune.scaled(v, base, kept)
            f32 = Path(tmp) / "taught.f32.gguf"
            weights.write_f32(info, v, f32)
            taught = {}
            for quantization in ("Q8_0", "Q4_K_M"):
                out = Path(tmp) / f"taught-{quantization}.gguf"
                weights.quantize(f32, out, quantization, threads)
                taught[quantization] = list(finetune.validate(out, pairs, [], threads).taught)
            got = answers(Path(tmp) / "taught-Q8_0.gguf", rows, threads)
            after = sum(g == r["answer"] for g, r in zip(got, rows, strict=True))
            result = {
                "pairs": len(pairs),
                "steps": report.steps,
                "train_seconds": round(seconds),
                "keep_margin": margin,
                "kept": kept,
                "min_margin": round(low, 2),
                "taught": taught,
                "dev_before": before,
                "dev_after": after,
                "dev_change_points": round(100 * (after - before) / len(rows), 2),
                "dev_changed": sum(g != b for g, b in zip(got, built_in, strict=True)),
            }
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
