"""Spoken-command recognition on the development set: the voices, speeds and other phrases that the recogniser's
limits (llmos_edge/voice_asr.py) were chosen on. The tests judge on a different set (tests/integration/test_voice.py);
keep the two apart, or the test stops measuring anything.

Same pipeline as the test: espeak-ng speech into an ALSA file device -> VAD -> recogniser. Report only: the
targets are judged on the held-out set, by the test, so this has none and exits 0 whatever it measures.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import begin
from llmos_edge.voice_asr import COMMANDS
from tests.integration.test_voice import recognition_rates

# No base voice, variant or speed of the tests' set (tests/voice_fixtures.py: en-us, en-gb, en-us+f3,
# en-gb-x-rp+m3 at 140 and 175 wpm), and none of its other phrases.
VOICES = ["en-gb-scotland+m1", "en-us-nyc+f2", "en-029+m4", "en-gb-x-gbclan+f4"]
SPEEDS = [150, 190]
# Everyday speech and near-homophones of the commands ("top", "statue", "temper", "how are you").
OTHER = [
    "go",
    "shop",
    "top",
    "hello",
    "yes",
    "no",
    "okay",
    "start",
    "the lights",
    "lock the door",
    "good morning",
    "how are you",
    "turn it off",
    "next song",
    "volume up",
    "what time is it",
    "open the window",
    "i am hungry",
    "thank you",
    "remind me tomorrow",
    "weather",
    "pause",
    "hot dog",
    "mystery",
    "help me with my homework",
    "step",
    "lemon",
    "temper",
    "statue",
    "again",
    "switch off the radio",
    "where are my keys",
    "make me a sandwich",
    "i would like some coffee",
    "send a message to john",
    "how far is the moon",
    "close the curtains",
    "is it going to rain",
    "turn the volume down",
    "who won the game",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="write the result to BENCHMARKS.md")
    args = ap.parse_args()
    report = begin()
    n = len(VOICES) * len(SPEEDS) * (sum(map(len, COMMANDS.values())) + len(OTHER))
    print(f"rendering {n} utterances and running them through the pipeline (a few minutes)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        per_voice, false_accepts = recognition_rates(Path(tmp), VOICES, SPEEDS, OTHER)
    false = collections.Counter(f"{phrase} -> {intents[0]}" for _, _, phrase, intents in false_accepts)
    n_cmd = sum(n for _, n in per_voice.values())
    n_other = len(OTHER) * len(VOICES) * len(SPEEDS)
    lines = [
        f"Commands recognised: **{sum(ok for ok, _ in per_voice.values())}/{n_cmd}**; other utterances taken for a "
        f"command: **{len(false_accepts)}/{n_other}**.",
        "",
        "| voice@wpm | commands |",
        "|---|---|",
        *(f"| {k} | {ok}/{n} |" for k, (ok, n) in per_voice.items()),
        "",
        "False accepts: " + (", ".join(f"{k} ({n})" for k, n in false.most_common()) or "none") + ".",
    ]
    print("\n".join(lines))
    print("no target: report only (the held-out set is judged by tests/integration/test_voice.py)")
    if args.write:
        report.write_section(
            "voice-devset",
            "Voice: command recognition on the development set",
            "make bench-voice-devset",
            "\n".join(lines),
        )
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
