"""The voice front-end's text handling: what is said aloud, how phrases compare, what commands answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos_edge.config import VoiceConfig, load_file
from llmos_edge.errors import UserError
from llmos_edge.status import lines as status_lines
from llmos_edge.voice import help_text, spoken_status
from llmos_edge.voice_asr import COMMANDS, command_of, normalise, read_questions
from llmos_edge.voice_tts import speakable, split_sentences
from tests.voice_fixtures import status_snapshot


def test_answers_are_cut_at_clauses_so_speech_starts_before_the_answer_ends() -> None:
    assert split_sentences("I am llmos-tiny, a small llama") == (["I am llmos-tiny,"], "a small llama")
    assert split_sentences("Hello! Ask me a question.") == (["Hello!"], "Ask me a question.")
    assert split_sentences("pong") == ([], "pong")


def test_console_notation_is_spoken_as_words() -> None:
    assert speakable("Type /status to see it, or press Ctrl-C.") == "Type status to see it, or press control C."
    assert "L L M O S tiny" in speakable("I am llmos-tiny.")


def test_phrases_compare_without_case_or_punctuation() -> None:
    assert normalise("  What is the Temperature?! ") == "what is the temperature"
    assert command_of("Say that again.") == "repeat"
    assert command_of("what is the temperature outside") == ""


def test_every_command_is_in_the_spoken_help() -> None:
    text = help_text("computer")
    assert text.startswith("Say computer, then a command")
    for phrases in COMMANDS.values():
        assert phrases[0] in text


def test_status_commands_speak_the_status_the_console_shows() -> None:
    s = status_snapshot()
    assert spoken_status("status", s) == "State ready. Model llmos-tiny."
    assert spoken_status("temperature", s) == "Temperature: cpu-thermal 52.5 degrees, gpu 40.0 degrees."
    assert spoken_status("memory", s) == "1024 megabytes free of 2048."
    assert spoken_status("uptime", s) == "I have been running for 1 hours 2 minutes."
    assert spoken_status("uptime", status_snapshot(uptime_s=42)) == "I have been running for 42 seconds."
    assert spoken_status("temperature", status_snapshot(temperatures=())) == "I have no temperature sensor."
    assert spoken_status("status", status_snapshot(state="degraded", reason="too hot", model=None)) == (
        "State degraded, too hot."
    )
    # The console's lines come from the same snapshot: what voice says is what /status shows.
    shown = status_lines(s)
    assert "temperature: cpu-thermal 52.5 C, gpu 40.0 C" in shown
    assert "memory: supervisor 40.0 MiB, engine 60.0 MiB; available 1024.4 MiB of 2048.0 MiB" in shown
    assert "uptime: 1h02m03s; engine restarts: 0" in shown


def test_questions_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "q.txt"
    f.write_text("# FAQ\nWhat model is this?\n\nwho are you\n")
    assert read_questions(str(f)) == ["what model is this", "who are you"]
    with pytest.raises(UserError, match=r"cannot read voice\.questions") as e:
        read_questions(str(tmp_path / "missing.txt"))
    assert e.value.hint and "\n" not in str(e.value)


def test_voice_config_defaults_and_validation(tmp_path: Path) -> None:
    assert VoiceConfig().enabled == "auto" and VoiceConfig().wake_word == "computer"
    f = tmp_path / "c.yaml"
    f.write_text("voice:\n  enabled: maybe\n")
    with pytest.raises(UserError, match=r"voice\.enabled is 'maybe', not one of auto, on, off"):
        load_file(f)
    f.write_text("voice:\n  capture: mic\n  wake_word: ''\n  end_silence_ms: 300\n")
    cfg = load_file(f).voice
    assert (cfg.capture, cfg.wake_word, cfg.end_silence_ms) == ("mic", "", 300)
