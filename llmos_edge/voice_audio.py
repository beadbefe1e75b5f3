"""Sound in and out through ALSA, by Debian's own `arecord` and `aplay` (alsa-utils): no compiled binding to keep in
step with libasound, and any ALSA device name works, including plugin devices such as a `file` PCM (how the tests
give the appliance a microphone made of WAV files).

Real sound cards deliver and consume audio at the speed of time. ALSA `file` devices over the `null` PCM do not
(they return a whole file at once), so both directions can pace themselves to the wall clock: with a real card that
changes nothing, with a file device it makes the appliance hear and speak as it would in a room, which the
barge-in and latency measurements need.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from llmos_edge.errors import UserError

log = logging.getLogger(__name__)

RATE = 16000  # what the VAD and the recognisers expect
FRAME = 512  # samples per VAD frame (32 ms): silero's window at 16 kHz
TTS_RATE = 22050  # espeak-ng's native rate; aplay/ALSA plug resamples for the card


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"voice needs `{name}`, which is not installed", "install Debian's alsa-utils package")
    return path


def probe_capture(device: str) -> str:
    """Return "" when `device` can record, else one line saying why not (for /status and the log)."""
    if shutil.which("arecord") is None:
        return "arecord not installed (Debian package alsa-utils)"
    hw = device in ("default", "sysdefault") or device.split(":")[0] in ("hw", "plughw")
    if hw and not _proc_has_capture():
        return "no microphone"
    try:
        cmd = [_tool("arecord"), "-q", "-D", device, "-t", "raw", "-f", "S16_LE", "-r", str(RATE), "-c", "1"]
        p = subprocess.run(
            [*cmd, "-s", "160", "/dev/null"],
            capture_output=True,
            timeout=5,
            text=True,
        )
    except subprocess.TimeoutExpired:
        return f"capture device {device} did not answer within 5 s"
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["arecord failed"])[-1]
        return f"cannot record from {device}: {err}"
    return ""


def _proc_has_capture() -> bool:
    try:
        return any("capture" in line for line in Path("/proc/asound/pcm").read_text().splitlines())
    except OSError:
        return False


class Pacer:
    """Keeps a stream from running ahead of the wall clock by more than `lead` seconds."""

    def __init__(self, rate: int, lead: float) -> None:
        self.rate, self.lead = rate, lead
        self.t0 = 0.0
        self.samples = 0

    def reset(self) -> None:
        self.t0, self.samples = time.monotonic(), 0

    def wait(self, samples: int, stop: threading.Event | None = None) -> None:
        if not self.t0:
            self.reset()
        self.samples += samples
        ahead = self.t0 + self.samples / self.rate - self.lead - time.monotonic()
        if ahead > 0:
            if stop is not None:
                stop.wait(ahead)
            else:
                time.sleep(ahead)


class Capture:
    """16 kHz mono 16-bit frames from an ALSA capture device, through one long-running arecord."""

    def __init__(self, device: str, realtime: bool = True, samples: int = 0) -> None:
        self.device = device
        self.realtime = realtime
        self.samples = samples  # stop after this many samples (tests); 0 means record until stopped
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()

    def frames(self) -> Iterator[bytes]:
        """Yield FRAME-sample chunks of raw S16_LE audio; returns when arecord ends or `stop` is called."""
        cmd = [_tool("arecord"), "-q", "-D", self.device, "-t", "raw", "-f", "S16_LE", "-r", str(RATE), "-c", "1"]
        if self.samples:
            cmd += ["-s", str(self.samples)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self._proc.stdout is not None
        pacer = Pacer(RATE, lead=0.05)
        size = FRAME * 2
        try:
            while not self._stop.is_set():
                chunk = self._proc.stdout.read(size)
                if len(chunk) < size:
                    break
                if self.realtime:
                    pacer.wait(FRAME, self._stop)
                yield chunk
        finally:
            self.close()

    def error(self) -> str:
        """Why arecord ended (its last stderr line), once it has."""
        p = self._proc
        if p is None or p.poll() is None or p.stderr is None:
            return ""
        lines = p.stderr.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else f"arecord exited with status {p.returncode}"

    def stop(self) -> None:
        self._stop.set()
        self.close()

    def close(self) -> None:
        p = self._proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(2)


class Playback:
    """One spoken reply: an aplay process fed 22,050 Hz mono audio in small paced chunks, so that `cancel`
    (barge-in) silences it within about a chunk, not after whatever a pipe and the card had buffered."""

    CHUNK = TTS_RATE // 20  # 50 ms

    def __init__(self, device: str, realtime: bool = True) -> None:
        self.device = device
        self.realtime = realtime
        self.cancelled = threading.Event()
        self.first_audio_at = 0.0  # monotonic time the first sample went to the device
        self._pacer = Pacer(TTS_RATE, lead=0.15)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def _open(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            cmd = [_tool("aplay"), "-q", "-D", self.device, "-t", "raw", "-f", "S16_LE", "-r", str(TTS_RATE), "-c", "1"]
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        return self._proc

    def play(self, pcm: bytes) -> bool:
        """Write audio; returns False once cancelled or when the device failed."""
        with self._lock:
            if self.cancelled.is_set():
                return False
            proc = self._open()
        assert proc.stdin is not None
        view = memoryview(pcm)
        step = self.CHUNK * 2
        for i in range(0, len(view), step):
            if self.cancelled.is_set():
                return False
            if self.realtime:
                self._pacer.wait(len(view[i : i + step]) // 2, self.cancelled)
            try:
                proc.stdin.write(view[i : i + step])
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                log.error("playback on %s failed: %s", self.device, self._stderr())
                return False
            if not self.first_audio_at:
                self.first_audio_at = time.monotonic()
        return True

    def _stderr(self) -> str:
        p = self._proc
        if p is None or p.stderr is None or p.poll() is None:
            return "aplay ended"
        return p.stderr.read().decode("utf-8", "replace").strip() or f"aplay exited with status {p.returncode}"

    def cancel(self) -> None:
        """Barge-in: stop at once, dropping whatever is buffered."""
        self.cancelled.set()
        with self._lock:
            p = self._proc
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(2)

    def finish(self) -> None:
        """Let what was written play out (close aplay's input and wait for it)."""
        with self._lock:
            p = self._proc
        if p is None:
            return
        if p.stdin is not None:
            try:
                p.stdin.close()
            except OSError:
                pass
        while p.poll() is None and not self.cancelled.is_set():
            time.sleep(0.02)
        if p.poll() is None:
            p.kill()
        p.wait(2)
