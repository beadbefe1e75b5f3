"""Speech recognition behind one small interface, so the backend can change without touching the front-end.

- `PocketsphinxRecognizer` (default; the en-US model ships inside the pocketsphinx wheel): a JSGF grammar of the
  appliance's commands and of known questions, checked against free dictation of the same audio (the en-US
  language model) so that speech outside the grammar is not taken for the nearest command; dictation for anything
  else; keyword spotting for the wake word.
- `WhisperRecognizer` (pywhispercpp): used when `voice.whisper_model` names a ggml model file the user supplies.
  It never downloads one (pywhispercpp would, given a bare model name): no network at run time.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from llmos_edge.errors import UserError
from llmos_edge.voice_audio import RATE

log = logging.getLogger(__name__)

# Intent -> the phrases that say it. The first phrase is the one the spoken help names.
COMMANDS: dict[str, list[str]] = {
    "status": ["status", "system status", "what is your status"],
    "temperature": ["temperature", "what is the temperature", "how hot are you"],
    "memory": ["how much memory is free", "memory status"],  # not bare "memory": "banana" was taken for it
    "uptime": ["how long have you been running", "up time"],
    "stop": ["stop", "cancel", "be quiet"],
    "repeat": ["repeat that", "say that again"],  # not bare "repeat": other speech was taken for it
    "help": ["help", "what can you do"],
}

# A grammar forces any speech onto its nearest phrase, so a phrase is accepted only when free dictation of the same
# audio sounds like it too: the phone edit distance between the two, over the phrase's phone count, must be at most
# a limit. Dictation turns one short word into something else entirely more often ("help" -> "delta", "two"), and
# other speech lands farther from a short phrase, so short phrases get more room. Measured offline on espeak-ng
# speech (4 voices x 2 speeds): correct long phrases 0 to 0.83, other speech forced onto a long phrase from 0.87,
# onto a short one from 1.5. Through the whole pipeline these limits recognised 127/144 commands and let 4/80 other
# utterances through (as "repeat" twice, "memory", "what is the temperature"); tighter limits (0.75/1.2) lost
# more commands (110/136) than false accepts (2/80). Bare "repeat" and "memory" are therefore not commands.
MAX_PHONE_DISTANCE = 0.85  # known questions
MAX_COMMAND_DISTANCE = 0.85  # commands of more than SHORT_PHONES phones
MAX_COMMAND_DISTANCE_SHORT = 1.3
SHORT_PHONES = 8

# Keyword-spotting threshold of the wake word. Measured on "computer" alone and before a command, 4 espeak-ng voices
# x 2 speeds: 1e-30 found 6/16, 1e-50 14/16 with 1 false wake in 24 other utterances, 1e-80 14/16 with 2.
WAKE_THRESHOLD = 1e-50
WAKE_WITHIN_FRAMES = 80  # the wake word must start within 0.8 s of the utterance's first sample

PEAK = 2000  # utterances are scaled to this peak: the en-US model decoded loud espeak-ng audio far worse (58% vs 89%)

Kind = Literal["command", "question", "unclear"]


@dataclass
class Heard:
    kind: Kind
    text: str  # what was recognised ("" when nothing was)
    intent: str = ""  # the command's intent, for kind == "command"
    how: str = ""  # grammar | questions | dictation | whisper


class Recognizer(Protocol):
    name: str

    def wake(self, audio: npt.NDArray[np.int16]) -> int | None:
        """Where (in samples) the wake word ends in `audio`, or None when it was not said."""
        ...

    def recognise(self, audio: npt.NDArray[np.int16]) -> Heard: ...


def normalise(text: str) -> str:
    """Lower case, letters, digits, apostrophes and single spaces: the form phrases are compared in."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split())


def command_of(text: str) -> str:
    """The intent whose phrase `text` is exactly (after normalising), or ""."""
    t = normalise(text)
    for intent, phrases in COMMANDS.items():
        if t in phrases:
            return intent
    return ""


def read_questions(path: str) -> list[str]:
    """Known questions, one a line (blank lines and # comments skipped)."""
    if not path:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"cannot read voice.questions {path}: {e}", "give a UTF-8 text file, one question a line"
        ) from None
    return [q for q in (normalise(line) for line in lines if not line.lstrip().startswith("#")) if q]


def _scaled(audio: npt.NDArray[np.int16]) -> bytes:
    peak = int(np.abs(audio.astype(np.int32)).max()) if audio.size else 0
    if peak == 0:
        return audio.tobytes()
    return (audio.astype(np.float32) * (PEAK / peak)).astype(np.int16).tobytes()


class PocketsphinxRecognizer:
    name = "pocketsphinx"

    def __init__(self, wake_word: str = "computer", questions: list[str] | None = None) -> None:
        from pocketsphinx import Decoder

        # dither: digital silence (exact zeros, as synthetic or gated audio has) gives log(0) features otherwise.
        self.d = Decoder(samprate=RATE, loglevel="FATAL", dither=True, kws_threshold=WAKE_THRESHOLD)
        self.questions = [q for q in questions or [] if self._known(q)]
        self.phrases = {p for ps in COMMANDS.values() for p in ps}
        alternatives = sorted(self.phrases | set(self.questions))
        grammar = f"#JSGF V1.0;\ngrammar llmos;\npublic <utterance> = {' | '.join(alternatives)};\n"
        self.d.add_jsgf_string("known", grammar)
        self.wake_word = normalise(wake_word)
        if self.wake_word:
            if not all(self._known(w) for w in self.wake_word.split()):
                raise UserError(
                    f"the wake word {wake_word!r} is not in the recogniser's dictionary",
                    "pick an English word such as computer",
                )
            self.d.add_keyphrase("wake", self.wake_word)

    def _known(self, phrase: str) -> bool:
        missing = [w for w in phrase.split() if self.d.lookup_word(w) is None]
        if missing:
            log.warning("voice: %r skipped: %s not in the pronunciation dictionary", phrase, ", ".join(missing))
        return not missing

    def _decode(self, search: str, audio: bytes) -> Any:
        self.d.activate_search(search)
        self.d.start_utt()
        self.d.process_raw(audio, full_utt=True)
        self.d.end_utt()
        return self.d.hyp()

    def phones(self, text: str) -> list[str]:
        out: list[str] = []
        for w in text.split():
            out += (self.d.lookup_word(w) or "").split()
        return out

    def distance(self, phrase: str, said: str) -> float:
        """Phone edit distance from `phrase` to `said`, over the phrase's phone count."""
        a, b = self.phones(phrase), self.phones(said)
        return _edit_distance(a, b) / max(1, len(a))

    def wake(self, audio: npt.NDArray[np.int16]) -> int | None:
        if not self.wake_word:
            return 0
        hyp = self._decode("wake", _scaled(audio))
        if hyp is None or not hyp.hypstr:
            return None
        # The wake word opens the utterance (after the VAD's 0.3 s pre-roll): a hit later on is the spotter firing
        # inside other words ("temperature" sounds like "computer" to it), not someone waking the appliance.
        hits = sorted((s.start_frame, s.end_frame) for s in self.d.seg() if s.word == self.wake_word)
        hits = [h for h in hits if h[0] <= WAKE_WITHIN_FRAMES]
        if not hits:
            return None
        frame = int(hits[0][1])
        return min(len(audio), (frame + 1) * RATE // 100)  # 100 frames a second

    def recognise(self, audio: npt.NDArray[np.int16]) -> Heard:
        pcm = _scaled(audio)
        hyp = self._decode("known", pcm)
        text = hyp.hypstr if hyp is not None else ""
        hyp = self._decode("_default", pcm)
        said = normalise(hyp.hypstr) if hyp is not None else ""
        if text in self.phrases:
            short = len(self.phones(text)) <= SHORT_PHONES
            if self.distance(text, said) <= (MAX_COMMAND_DISTANCE_SHORT if short else MAX_COMMAND_DISTANCE):
                return Heard("command", text, command_of(text), "grammar")
        elif text in self.questions and self.distance(text, said) <= MAX_PHONE_DISTANCE:
            return Heard("question", text, "", "questions")
        # Dictation of one or two words is mostly noise turned into words: ask again rather than answer it.
        if len(said.split()) < 3:
            return Heard("unclear", said, "", "dictation")
        return Heard("question", said, "", "dictation")


def _edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


class WhisperRecognizer:
    """whisper.cpp through pywhispercpp, with a model file the user supplies (e.g. ggml-base.en.bin).

    Not exercised by this repository's tests: no model file can be fetched here. Commands are matched exactly on
    the normalised transcript; everything else is a question."""

    name = "whisper"

    def __init__(self, model_path: str, wake_word: str = "computer", threads: int = 2) -> None:
        p = Path(model_path)
        if not p.is_file():
            raise UserError(
                f"voice.whisper_model {model_path}: no such file",
                "copy a whisper.cpp ggml model (e.g. ggml-base.en.bin) there, or set voice.recognizer: pocketsphinx",
            )
        try:
            from pywhispercpp.model import Model
        except ImportError:
            raise UserError(
                "voice.recognizer is whisper but pywhispercpp is not installed", "pip install pywhispercpp"
            ) from None
        try:
            self.model = Model(str(p), n_threads=threads, print_progress=False, print_realtime=False)
        except Exception as e:  # pywhispercpp reports a bad file as whatever whisper.cpp raised
            raise UserError(
                f"cannot load the whisper model {p}: {e}", "check that it is a whisper.cpp ggml file"
            ) from None
        self.wake_word = normalise(wake_word)

    def _text(self, audio: npt.NDArray[np.int16]) -> str:
        segments = self.model.transcribe(audio.astype(np.float32) / 32768.0)
        return normalise(" ".join(s.text for s in segments))

    def wake(self, audio: npt.NDArray[np.int16]) -> int | None:
        if not self.wake_word:
            return 0
        text = self._text(audio)
        if not text.startswith(self.wake_word):
            return None
        # No word times here: with more than the wake word said, the whole audio is recognised and `recognise`
        # drops the wake word from the transcript.
        return len(audio) if text == self.wake_word else 0

    def recognise(self, audio: npt.NDArray[np.int16]) -> Heard:
        text = self._text(audio)
        if self.wake_word and text.startswith(self.wake_word + " "):
            text = text[len(self.wake_word) + 1 :]
        if not text:
            return Heard("unclear", "", "", "whisper")
        intent = command_of(text)
        return Heard("command" if intent else "question", text, intent, "whisper")
