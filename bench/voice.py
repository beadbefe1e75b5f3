"""Voice reply latency: from the end of a spoken question to the first audio of the answer on the speaker.

The real supervisor and model, with ALSA `file` devices as microphone and speaker, paced in real time as a sound
card would be. The questions are spoken by espeak-ng; each is followed by silence long enough for the answer.
"End of speech" is when the last speech frame reached the VAD; "first audio" is when the first sample of the
answer went to aplay. Both are stamped in the supervisor and stored per interaction in the `voice` table.

Targets: every question answered with audio, p50 <= 1.2 s and p95 <= 1.5 s; exits 1 and prints MISSED otherwise.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import begin
from tests.integration.conftest import MODEL, Appliance
from tests.voice_fixtures import alsa_devices, render, silence

QUESTIONS = ["what model is this", "who are you", "what is this device"]
P50_MS, P95_MS = 1200, 1500


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    report = begin()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        mic, speaker = tmp / "mic.raw", tmp / "speaker.wav"
        clips = [silence(1.0)]
        for i in range(args.rounds):
            clips += [render(QUESTIONS[i % len(QUESTIONS)]), silence(12.0)]  # longer than any answer: no barge-in
        mic.write_bytes(np.concatenate(clips).tobytes())
        os.environ["XDG_CONFIG_HOME"] = alsa_devices(tmp, mic, speaker)["XDG_CONFIG_HOME"]
        (tmp / "q.txt").write_text("\n".join(QUESTIONS) + "\n")
        (tmp / "a").mkdir()
        app = Appliance(
            tmp / "a",
            config=f"console:\n  echo: false\nvoice:\n  capture: mic\n  playback: speaker\n  wake_word: ''\n"
            f"  questions: {tmp / 'q.txt'}\n",
            model=MODEL,
        )
        try:
            app.wait_ready(120)
            deadline = time.monotonic() + 14.0 * args.rounds + 60
            rows: list[sqlite3.Row] = []
            while time.monotonic() < deadline:
                con = sqlite3.connect(app.db)
                con.row_factory = sqlite3.Row
                rows = list(con.execute("SELECT * FROM voice WHERE kind = 'question' ORDER BY id"))
                con.close()
                if len(rows) >= args.rounds:
                    break
                time.sleep(1)
        finally:
            app.close()
    for r in rows:
        print(
            f"heard {r['heard']!r} ({r['how']}) {r['outcome']}: endpoint {r['endpoint_ms']} asr {r['asr_ms']} "
            f"ttft {r['ttft_ms']} tts {r['tts_ms']} first audio {r['first_audio_ms']} ms; said {r['answer']!r}"
        )
    lat = [r["first_audio_ms"] for r in rows if r["first_audio_ms"] is not None and r["outcome"] == "ok"]
    heard_ok = sum(1 for i, r in enumerate(rows) if r["heard"] == QUESTIONS[i % len(QUESTIONS)])
    parts = {
        k: pct([float(r[k]) for r in rows if r[k] is not None], 50)
        for k in ("endpoint_ms", "asr_ms", "ttft_ms", "tts_ms")
    }
    body = (
        f"{args.rounds} spoken questions ({', '.join(repr(q) for q in QUESTIONS)}; espeak-ng en-us), "
        f"{len(rows)} answered, {heard_ok} heard exactly; model {MODEL.name}, 2 threads.\n\n"
        "| end of speech -> first audio of the answer | p50 | p95 |\n|---|---|---|\n"
        f"| ms | {pct(lat, 50):.0f} | {pct(lat, 95):.0f} |\n| target | <= {P50_MS} | <= {P95_MS} |\n\n"
        "Medians of the parts (ms): "
        + ", ".join(f"{k.removesuffix('_ms')} {v:.0f}" for k, v in parts.items())
        + ". endpoint = the silence that ends an utterance (voice.end_silence_ms) plus VAD time; asr = the "
        "recogniser (Whisper and the phoneme match); ttft = submit to first token; tts = espeak-ng for the first "
        "clause.\n"
    )
    print(body)
    report.verdict("questions answered with audio", f"{len(lat)} of {args.rounds}", "all", len(lat) == args.rounds)
    p50, p95 = pct(lat, 50), pct(lat, 95)
    report.verdict("voice reply latency p50", f"{p50:.0f} ms", f"<= {P50_MS} ms", p50 <= P50_MS)
    report.verdict("voice reply latency p95", f"{p95:.0f} ms", f"<= {P95_MS} ms", p95 <= P95_MS)
    if args.write:
        report.write_section("voice", "Voice reply latency", "make bench-voice", body)
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
