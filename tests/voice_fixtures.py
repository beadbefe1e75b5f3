"""Real audio without a microphone: phrases spoken by espeak-ng, and ALSA `file` devices as microphone and speaker."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from llmos_edge.status import MIB, GovernorStatus, MemoryStatus, ModelStatus, Status, StoreStatus

RATE = 16000
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-x-rp+m3"]
SPEEDS = [140, 175]


def render(text: str, voice: str = "en-us", speed: int = 160, rate: int = RATE) -> npt.NDArray[np.int16]:
    """`text` spoken by espeak-ng, as 16-bit mono at `rate` (sox resamples espeak-ng's 22,050 Hz).

    sox -D: sox dithers when it resamples, with new random noise on every run, so the same phrase came out as
    slightly different audio each time and recognition near a threshold changed from run to run."""
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True, check=True
    )
    raw = subprocess.run(
        ["sox", "-D", "-t", "wav", "-", *_raw_args(rate)],
        input=wav.stdout,
        capture_output=True,
        check=True,
    )
    return np.frombuffer(raw.stdout, dtype=np.int16)


def silence(seconds: float) -> npt.NDArray[np.int16]:
    return np.zeros(int(seconds * RATE), dtype=np.int16)


def alsa_devices(home: Path, mic: Path, speaker: Path) -> dict[str, str]:
    """Write an asoundrc defining `mic` (reads raw 16 kHz audio from `mic`) and `speaker` (writes a WAV file),
    and return the environment under which ALSA tools find it."""
    (home / "alsa").mkdir(parents=True, exist_ok=True)
    (home / "alsa" / "asoundrc").write_text(
        f"""pcm.mic {{
  type file
  slave.pcm null
  file /dev/null
  infile "{mic}"
  format raw
}}
pcm.speaker {{
  type file
  slave.pcm null
  file "{speaker}"
  format wav
}}
"""
    )
    return {**os.environ, "XDG_CONFIG_HOME": str(home)}


def read_wav(path: Path) -> tuple[int, npt.NDArray[np.int16]]:
    """Sample rate and samples of a 16-bit mono WAV (as ALSA's file plugin writes it)."""
    import wave

    with wave.open(str(path)) as w:
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)


def _raw_args(rate: int) -> list[str]:
    return ["-t", "raw", "-r", str(rate), "-c", "1", "-b", "16", "-e", "signed-integer", "-"]


def resample(audio: npt.NDArray[np.int16], rate: int, to: int = RATE) -> npt.NDArray[np.int16]:
    raw = subprocess.run(
        ["sox", "-D", *_raw_args(rate), *_raw_args(to)],
        input=audio.tobytes(),
        capture_output=True,
        check=True,
    )
    return np.frombuffer(raw.stdout, dtype=np.int16)


def status_snapshot(**changes: object) -> Status:
    """A ready appliance's Status, as the supervisor would take it, with `changes` applied."""
    s = Status(
        state="ready",
        reason="",
        serving=True,
        model_file="llmos-tiny.gguf",
        model=ModelStatus("llmos-tiny", "Q8_0", 1_480_000, 1_600_000, "/x.gguf"),
        store=StoreStatus("llmos-tiny", "", False, 0, "/var/lib/llmos-edge/models", ""),
        engine=None,
        self_test="passed",
        last=None,
        memory=MemoryStatus(40 * MIB, 60 * MIB, int(1024.4 * MIB), 2048 * MIB),
        temperatures=(("cpu-thermal", 52.5), ("gpu", 40.0)),
        governor=GovernorStatus(True, 52.5, 70.0, "normal", 1.0, 0, (), ""),
        voice="voice: off",
        uptime_s=3723,
        restarts=0,
    )
    return replace(s, **changes)  # type: ignore[arg-type]


def heard_replies(audio: npt.NDArray[np.int16]) -> list[str]:
    """What a speaker said, as Whisper hears it: `audio` (16 kHz mono) cut into utterances by the front-end's VAD,
    each transcribed (normalised). For checking what a reply said, not only that some audio came out."""
    from llmos_edge.voice_asr import WhisperRecognizer
    from llmos_edge.voice_vad import Endpointer, SileroVAD

    padded = np.concatenate([audio, silence(1.0)])
    frames = [padded[i : i + 512].tobytes() for i in range(0, len(padded) - 511, 512)]
    whisper = WhisperRecognizer(wake_word="")
    cuts = [e.utterance for e in Endpointer(SileroVAD()).run(frames) if e.utterance is not None]
    return [t for u in cuts for t in whisper.transcribe(u.audio)[:1]]


def said_in(expected: str, heard: str, limit: float = 0.4) -> bool:
    """Whether `heard` (a transcript) has `expected` somewhere in it, as sounds: the phonemes of `expected` against
    the best-matching stretch of `heard`'s, within `limit` edits a phoneme. Whisper tiny.en on espeak-ng's speech
    writes near words ("they're ready" for "state ready"); a different reply is much further."""
    from llmos_edge.voice_asr import phonemes

    a, b = phonemes(expected), phonemes(heard)
    row = [0] * (len(b) + 1)  # the stretch of `heard` may start anywhere...
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return bool(a) and min(row) <= limit * len(a)  # ...and end anywhere


def to_mono_16k(path: Path) -> npt.NDArray[np.int16]:
    """A 16-bit PCM WAV with a 44-byte header (any rate, mono or stereo: QEMU's line-out is stereo) as 16 kHz mono.
    The header's lengths are not trusted (QEMU fixes them up only when it exits cleanly): the data is the rest."""
    import struct

    raw = path.read_bytes()
    channels, rate = struct.unpack("<HI", raw[22:28])
    data = np.frombuffer(raw[44 : 44 + (len(raw) - 44) // (2 * channels) * 2 * channels], dtype=np.int16)
    mono = data.reshape(-1, channels).mean(axis=1).astype(np.int16) if channels > 1 else data
    return resample(mono, rate)
