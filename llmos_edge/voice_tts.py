"""Text to speech with Debian's espeak-ng: about 16 ms a sentence, no model files beyond the package's own."""

from __future__ import annotations

import re
import shutil
import subprocess

from llmos_edge.errors import UserError

# What the console shows for commands reads badly aloud: "/status" becomes "slash status" otherwise.
_SPOKEN = [
    (re.compile(r"(?<!\w)/(\w+)"), r"\1"),
    (re.compile(r"Ctrl-C"), "control C"),
    (re.compile(r"llmos-edge", re.I), "L L M O S edge"),
    (re.compile(r"llmos-tiny", re.I), "L L M O S tiny"),
    (re.compile(r"\bllmos\b", re.I), "L L M O S"),
]
# Clauses, not just sentences: speaking starts at the first comma instead of waiting for the whole sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?;:,])\s+|\n+")


def speakable(text: str) -> str:
    for pattern, repl in _SPOKEN:
        text = pattern.sub(repl, text)
    return text.strip()


def split_sentences(text: str) -> tuple[list[str], str]:
    """Complete sentences in `text`, and the unfinished rest (spoken when more tokens or the end arrive)."""
    parts = _SENTENCE_END.split(text)
    return [p for p in parts[:-1] if p.strip()], parts[-1]


class Synth:
    def __init__(self, voice: str = "en-us", speed: int = 160) -> None:
        self.voice, self.speed = voice, speed
        path = shutil.which("espeak-ng")
        if path is None:
            raise UserError("voice needs espeak-ng, which is not installed", "install Debian's espeak-ng package")
        self.exe = path

    def __call__(self, text: str) -> bytes:
        """Raw S16_LE mono audio at 22,050 Hz (the WAV header espeak-ng writes is cut off)."""
        cmd = [self.exe, "-v", self.voice, "-s", str(self.speed), "--stdout", speakable(text)]
        p = subprocess.run(cmd, capture_output=True, timeout=30)
        if p.returncode != 0:
            err = p.stderr.decode("utf-8", "replace").strip()
            raise UserError(f"espeak-ng failed: {err}", f"check voice.tts_voice ({self.voice}); `espeak-ng --voices`")
        return _wav_data(p.stdout)


def _wav_data(wav: bytes) -> bytes:
    """The samples of a RIFF WAV, found by its `data` chunk (espeak-ng writes a streaming header)."""
    i = wav.find(b"data", 12)
    return wav[i + 8 :] if i >= 0 else wav
