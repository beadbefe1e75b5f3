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
