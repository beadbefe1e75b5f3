"""The voice front-end's text handling: what is said aloud, how phrases compare, what commands answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos_edge.config import VoiceConfig, load_file
from llmos_edge.errors import UserError
from llmos_edge.status import lines as status_lines
from llmos_edge.voice import help_text, spoken_status
from llmos_edge.voice_asr import (
    COMMANDS,
    CommandMatcher,
    collapse_repeats,
    command_of,
    detokenize,
    normalise,
    phonemes,
    prompt_tokens,
    read_questions,
)
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


def test_a_phrase_whisper_repeats_is_read_once() -> None:
    assert collapse_repeats("status status status status") == "status"
    assert collapse_repeats("what can you do what can you") == "what can you do"
    assert collapse_repeats("system status system status system") == "system status"
    assert collapse_repeats("how long have you been running") == "how long have you been running"
    assert collapse_repeats("stop") == "stop" and collapse_repeats("") == ""


def test_whisper_tokens_are_decoded_to_text() -> None:
    # byte-level BPE: "Ġ" is the space, special tokens are dropped, UTF-8 survives being split across tokens
    assert detokenize(["<|startoftranscript|>", "ĠHow", "Ġhot", "Ġare", "Ġyou", "?", "<|endoftext|>"]) == (
        " How hot are you?"
    )
    assert detokenize(["ĠcafÃ", "©"]) == " café"


def test_a_prompt_is_spelled_in_the_models_tokens_longest_first() -> None:
    vocabulary = {t: i for i, t in enumerate(["S", "t", "a", "u", "s", "Ġ", "ĠStat", "ĠStatus", "us", ".", "Ã", "©"])}
    assert prompt_tokens(" Status.", vocabulary) == ["ĠStatus", "."]
    assert prompt_tokens(" Stats", vocabulary) == ["ĠStat", "s"]
    assert prompt_tokens("é", vocabulary) == ["Ã", "©"]  # bytes, as the tokenizer's alphabet spells them
    with pytest.raises(ValueError, match="'x' is not in the vocabulary"):
        prompt_tokens("x", vocabulary)


def test_commands_are_matched_by_phonemes_one_edit_in_five() -> None:
    matcher = CommandMatcher({p: intent for intent, ps in COMMANDS.items() for p in ps} | {"what model is this": ""})
    assert phonemes("up time") == phonemes("uptime")  # word boundaries do not count
    assert matcher.match(["status"]) == ("status", "status")
    assert matcher.match(["council"]) == ("cancel", "stop")  # one vowel in five phonemes
    assert matcher.match(["memories status"]) == ("memory status", "memory")
    assert matcher.match(["what model is it"]) == ("what model is this", "")  # a known question, one edit away
    # a minimal pair of a short command is another word, and so is everything else
    for other in ["top", "step", "start", "statue", "mystery", "how are you", "open the window", ""]:
        assert matcher.match([other]) is None, other
    assert matcher.match(["open the window", "stop"]) == ("stop", "stop")  # any hypothesis may match


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
