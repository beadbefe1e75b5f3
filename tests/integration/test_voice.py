"""Voice with real audio and no microphone: espeak-ng renders the phrases, an ALSA `file` device is the microphone
(arecord reads it like a sound card), another is the speaker (aplay writes a WAV)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from llmos_edge.config import VoiceConfig
from llmos_edge.scheduler import Request, Result
from llmos_edge.voice import Interaction, Voice
from llmos_edge.voice_asr import COMMANDS, PocketsphinxRecognizer
from tests.integration.conftest import HELDOUT, Appliance, heldout
from tests.voice_fixtures import (
    RATE,
    SPEEDS,
    VOICES,
    alsa_devices,
    read_wav,
    render,
    resample,
    silence,
    status_snapshot,
)

pytestmark = pytest.mark.integration

OUT_OF_GRAMMAR = [
    "open the garage door",
    "play some music",
    "the weather is nice today",
    "call my mother",
    "what is the capital of france",
    "turn on the lights",
    "banana",
    "seven eight nine",
    "tell me a joke",
    "set a timer for five minutes",
]


class AnsweringScheduler:
    """Stands in for the scheduler when only recognition is under test: answers every question at once."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def submit(self, req: Request) -> Request:
        self.prompts.append(req.prompt)
        req.on_token("Fine.")
        req.on_done(Result("ok", text="Fine."))
        return req


class Rows:
    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = []

    def record_voice(self, row: dict[str, object]) -> None:
        self.rows.append(row)


def run_pipeline(tmp: Path, clips: list[np.ndarray], **cfg: object) -> list[Interaction]:
    """Feed `clips` (each padded with silence) through the real pipeline; return the interactions in order."""
    mic, speaker = tmp / "mic.raw", tmp / "speaker.wav"
    audio = np.concatenate([silence(0.5)] + [np.concatenate([c, silence(1.0)]) for c in clips])
    mic.write_bytes(audio.tobytes())
    env = alsa_devices(tmp, mic, speaker)
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
    try:
        settings = {"capture": "mic", "playback": "speaker", "wake_word": "", **cfg}
        voice = Voice(
            VoiceConfig(**settings),  # type: ignore[arg-type]
            AnsweringScheduler(),  # type: ignore[arg-type]
            Rows(),
            lambda: status_snapshot(temperatures=(("cpu-thermal", 41.0),)),
            32,
            realtime=False,
            capture_samples=len(audio),
        )
        got: list[Interaction] = []
        voice.on_interaction = got.append
        assert voice.start(), voice.state
        voice.join(1800)
    finally:
        mp.undo()
    return got


def spans(clips: list[np.ndarray]) -> list[tuple[int, int]]:
    out, pos = [], int(0.5 * RATE)
    for c in clips:
        out.append((pos, pos + len(c)))
        pos += len(c) + RATE
    return out


def by_clip(clips: list[np.ndarray], got: list[Interaction]) -> list[list[Interaction]]:
    """The interactions whose utterance overlaps each clip."""
    result: list[list[Interaction]] = [[] for _ in clips]
    for it in got:
        u0, u1 = it.utterance.start, it.utterance.start + len(it.utterance.audio)
        for i, (c0, c1) in enumerate(spans(clips)):
            if u0 < c1 and c0 < u1:
                result[i].append(it)
    return result


def recognition_rates(
    tmp: Path, voices: list[str], speeds: list[int], other: list[str]
) -> tuple[dict[str, list[int]], list[tuple[str, int, str, list[str]]]]:
    """Every command phrase and every phrase of `other`, in each voice and speed, through the real pipeline.
    Returns per "voice@speed" [commands recognised, commands said], and the other phrases taken for a command."""
    phrases = [(intent, p) for intent, ps in COMMANDS.items() for p in ps]
    cases = [(v, s, intent, p) for v in voices for s in speeds for intent, p in phrases]
    cases += [(v, s, "", p) for v in voices for s in speeds for p in other]
    clips = [render(p, v, s) for v, s, _, p in cases]
    got = by_clip(clips, run_pipeline(tmp, clips))
    per_voice: dict[str, list[int]] = {f"{v}@{s}": [0, 0] for v in voices for s in speeds}
    false_accepts = []
    for (v, s, intent, phrase), its in zip(cases, got, strict=True):
        intents = [it.heard.intent for it in its if it.heard is not None and it.heard.kind == "command"]
        if intent:
            per_voice[f"{v}@{s}"][0] += intents == [intent]
            per_voice[f"{v}@{s}"][1] += 1
        elif intents:
            false_accepts.append((v, s, phrase, intents))
    return per_voice, false_accepts


# Issue 16's targets, judged on this set (tests/voice_fixtures.py: 4 espeak-ng voices x 2 speeds, the 19 command
# phrases and the 10 other sentences above): at least 95% of commands recognised, no other utterance taken for a
# command. The recogniser's rule and limits (llmos_edge/voice_asr.py) were fixed on a separate development set
# (bench/voice_devset.py: other base voices, variants, speeds and other phrases) before this set was run. Rendering
# is deterministic (sox -D) and so is the recogniser (beam search), so every run on one machine gives the same
# figures. Measured on 2026-12-05 after the hearing in context (voice_asr.CONTEXT) was chosen on the development set
# (130/152 and 0/320 there): 151/152 commands (99%), 0/80 other utterances. Before it: 143/152 (94%).
def test_commands_are_recognised_and_other_speech_is_never_a_command(tmp_path: Path) -> None:
    per_voice, false_accepts = recognition_rates(tmp_path, VOICES, SPEEDS, OUT_OF_GRAMMAR)
    total = sum(ok for ok, _ in per_voice.values()), sum(n for _, n in per_voice.values())
    report = {k: f"{ok}/{n}" for k, (ok, n) in per_voice.items()}
    print(f"\ncommands recognised: {total[0]}/{total[1]} per voice {json.dumps(report)}")
    print(f"out-of-grammar accepted as a command: {len(false_accepts)}/{len(OUT_OF_GRAMMAR) * len(VOICES) * 2}")
    (tmp_path.parent / "voice-rates.json").write_text(json.dumps({"per_voice": report, "false": false_accepts}))
    assert not false_accepts
    assert total[0] >= 0.95 * total[1], report


def faq_answer(word: str) -> str:
    """The model's answer to the FAQ intent whose held-out prompts mention `word` (the spoken question itself,
    a bare core phrase, is training data, so it is not among the held-out prompts)."""
    answers = {r["answer"] for r in heldout("faq") if word in r["prompt"].lower()}
    assert len(answers) == 1, (word, answers, HELDOUT)
    return answers.pop()


def recognise_among(audio: np.ndarray, sentences: list[str]) -> str:
    """Which of `sentences` the audio is, by a grammar holding just them (free dictation of synthetic speech is
    too weak to judge an answer by)."""
    from llmos_edge.voice_asr import conditioned, normalise
    from llmos_edge.voice_tts import speakable

    rec = PocketsphinxRecognizer(wake_word="")
    forms = {normalise(speakable(s)): s for s in sentences}
    forms = {f: s for f, s in forms.items() if rec._known(f)}
    grammar = f"#JSGF V1.0;\ngrammar a;\npublic <a> = {' | '.join(forms)};\n"
    rec.d.add_jsgf_string("answers", grammar)
    hyp = rec._decode("answers", conditioned(audio))
    return forms.get(hyp.hypstr if hyp is not None else "", "")


def wait_for_rows(db: Path, n: int, timeout: float) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    rows: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        try:
            con = sqlite3.connect(db)
            con.row_factory = sqlite3.Row
            rows = [dict(r) for r in con.execute("SELECT * FROM voice ORDER BY id")]
            con.close()
        except sqlite3.OperationalError:
            rows = []
        if len(rows) >= n:
            return rows
        time.sleep(0.5)
    raise TimeoutError(f"{len(rows)} voice rows after {timeout} s: {rows}")


def test_spoken_question_gets_the_models_answer_spoken(
    appliance_factory: type[Appliance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    question = "what model is this"
    expected = faq_answer("model")
    mic, speaker = tmp_path / "mic.raw", tmp_path / "speaker.wav"
    # Wake word alone, then the question: the appliance answers "Yes?", then the model's answer.
    audio = np.concatenate([silence(1.0), render("computer"), silence(1.5), render(question), silence(12.0)])
    mic.write_bytes(audio.tobytes())
    monkeypatch.setenv("XDG_CONFIG_HOME", alsa_devices(tmp_path, mic, speaker)["XDG_CONFIG_HOME"])
    questions = tmp_path / "questions.txt"
    questions.write_text(f"{question}\nwho are you\nping\n")
    app = appliance_factory(
        config=f"voice:\n  capture: mic\n  playback: speaker\n  questions: {questions}\n  end_silence_ms: 400\n"
    )
    app.wait_ready()
    # the models loaded before READY (while the engine loaded), not under systemd's watchdog (Voice.load)
    assert "voice: models loaded in" in app.output(), app.output()
    rows = wait_for_rows(app.db, 2, 60)
    print("voice rows:", rows)
    assert [r["outcome"] for r in rows[:2]] == ["wake", "ok"], rows
    wake, asked = rows[0], rows[1]
    assert wake["woke"] == 1 and wake["answer"] == "Yes?"
    assert asked["heard"] == question and asked["kind"] == "question" and asked["how"] == "questions"
    assert asked["answer"] == expected
    for key in ("vad_ms", "asr_ms", "ttft_ms", "tts_ms", "first_audio_ms"):
        assert asked[key] is not None and float(asked[key]) > 0, (key, asked)
    req = sqlite3.connect(app.db).execute(
        "SELECT source, priority, prompt, answer FROM requests WHERE id = ?", [asked["request_id"]]
    )
    assert req.fetchone() == ("voice", "interactive", question, expected)
    time.sleep(1.0)  # aplay closes the WAV when the answer has played out
    rate, spoken = read_wav(speaker)
    assert len(spoken) > rate  # a real answer, more than a second of it
    distractors = [r["answer"] for r in heldout("faq") if r["answer"] != expected]
    choices = [expected, *sorted(set(distractors))[:6]]
    assert recognise_among(resample(spoken, rate), choices) == expected
    app.console.read_until(b"llmos> ", 10)
    assert "voice: listening on mic (wake word 'computer', whisper); 2 interactions" in app.console.command("/status")


def test_a_microphone_plugged_in_later_starts_voice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # no asoundrc yet: the device "mic" does not exist
    mic, speaker = tmp_path / "mic.raw", tmp_path / "speaker.wav"
    audio = np.concatenate([silence(0.5), render("stop"), silence(1.0)])
    voice = Voice(
        VoiceConfig(capture="mic", playback="speaker", wake_word=""),
        AnsweringScheduler(),  # type: ignore[arg-type]
        Rows(),
        status_snapshot,
        32,
        realtime=False,
        capture_samples=len(audio),
    )
    voice.mic_poll_s = 0.2
    got: list[Interaction] = []
    voice.on_interaction = got.append
    looking = threading.Thread(target=voice.start_when_present, daemon=True)
    looking.start()
    deadline = time.monotonic() + 10
    while not voice.state.startswith("cannot record from mic") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert voice.state.startswith("cannot record from mic") and voice.device_missing, voice.state
    assert looking.is_alive()  # still looking
    mic.write_bytes(audio.tobytes())
    alsa_devices(tmp_path, mic, speaker)  # plugged in
    looking.join(10)
    assert not looking.is_alive() and not voice.device_missing, voice.state
    voice.join(120)
    voice.stop()
    assert [it.heard.intent for it in got if it.heard is not None] == ["stop"]
