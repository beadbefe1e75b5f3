"""Voice activity detection: the silero VAD network (ONNX, run by onnxruntime; no torch) and the endpointer that
turns its per-frame speech probabilities into utterances.

silero_vad.onnx (2.3 MB, MIT licence: data/silero_vad.LICENSE) is copied unchanged from the `silero-vad` wheel
6.2.3 on PyPI (silero_vad/data/silero_vad.onnx, sha256 1a153a22...788e3). It is committed rather than fetched so
the appliance needs no network, and because the wheel itself would pull in torch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from llmos_edge.errors import UserError
from llmos_edge.voice_audio import FRAME, RATE

MODEL = Path(__file__).with_name("data") / "silero_vad.onnx"
CONTEXT = 64  # samples of the previous frame that silero v5 expects in front of each 512-sample frame at 16 kHz
FRAME_S = FRAME / RATE


class SileroVAD:
    """Speech probability of each 32 ms frame. Stateful (an LSTM state and the last 64 samples carry over)."""

    def __init__(self, model: Path = MODEL) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # One thread: the VAD is tiny, and the engine needs the cores; inter-op threads only add wake-ups.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable/invalid files
            raise UserError(
                f"cannot load the VAD model {model}: {e}", "reinstall llmos-edge (the file ships with it)"
            ) from None
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, CONTEXT), dtype=np.float32)
        self._sr = np.array(RATE, dtype=np.int64)

    def __call__(self, frame: npt.NDArray[np.float32]) -> float:
        x = np.concatenate([self._context, frame.reshape(1, -1)], axis=1)
        out, self._state = self.session.run(None, {"input": x, "state": self._state, "sr": self._sr})
        self._context = x[:, -CONTEXT:]
        return float(out[0, 0])


@dataclass
class Utterance:
    audio: npt.NDArray[np.int16]  # 16 kHz mono, with a little audio before and after the speech
    speech_end: float  # monotonic time the last speech frame arrived: "end of speech"
    endpointed: float  # monotonic time the endpointer decided the utterance was over
    vad_s: float  # time spent running the VAD network on this utterance's frames
    start: int = 0  # position of its first sample in the capture stream
    barge_in: bool = False  # it started while the appliance was talking


@dataclass
class Event:
    """What the endpointer reports besides whole utterances: speech that has gone on for `barge_in_ms`."""

    kind: str  # "speech" (sustained speech started) | "utterance"
    utterance: Utterance | None = None


class Endpointer:
    """Cuts a frame stream into utterances: speech starts when the probability crosses `threshold`, and ends after
    `end_silence_ms` below `threshold - 0.15` (hysteresis keeps a word's quiet consonants inside it)."""

    def __init__(
        self,
        vad: SileroVAD,
        *,
        threshold: float = 0.5,
        end_silence_ms: int = 500,
        min_speech_ms: int = 150,
        sustained_ms: int = 300,
        max_utterance_s: float = 15.0,
        preroll_ms: int = 300,
    ) -> None:
        self.vad = vad
        self.threshold = threshold
        self.end_frames = max(1, round(end_silence_ms / 1000 / FRAME_S))
        self.min_frames = max(1, round(min_speech_ms / 1000 / FRAME_S))
        self.sustained_frames = max(1, round(sustained_ms / 1000 / FRAME_S))
        self.max_frames = round(max_utterance_s / FRAME_S)
        self.preroll: deque[npt.NDArray[np.int16]] = deque(maxlen=max(1, round(preroll_ms / 1000 / FRAME_S)))

    def run(self, frames: Iterable[bytes]) -> Iterator[Event]:
        voiced: list[npt.NDArray[np.int16]] = []
        in_speech = False
        speech_frames = silent = 0
        vad_s = 0.0
        speech_end = 0.0
        reported = False
        position = start = 0  # samples read so far; where the current utterance began
        for raw in frames:
            position += FRAME
            arrived = time.monotonic()
            pcm = np.frombuffer(raw, dtype=np.int16)
            t = time.perf_counter()
            p = self.vad(pcm.astype(np.float32) / 32768.0)
            vad_s += time.perf_counter() - t
            if not in_speech:
                self.preroll.append(pcm)
                if p >= self.threshold:
                    in_speech, voiced = True, list(self.preroll)
                    start = position - FRAME * len(voiced)
                    speech_frames, silent, speech_end, reported = 1, 0, arrived, False
                    self.preroll.clear()
                else:
                    vad_s = 0.0  # only the VAD time of the utterance itself counts
                continue
            voiced.append(pcm)
            if p >= self.threshold - 0.15:
                speech_frames += 1
                silent = 0
                speech_end = arrived
                if speech_frames >= self.sustained_frames and not reported:
                    reported = True
                    yield Event("speech")
            else:
                silent += 1
            if silent >= self.end_frames or len(voiced) >= self.max_frames:
                in_speech = False
                if speech_frames >= self.min_frames:
                    audio = np.concatenate(voiced)
                    yield Event("utterance", Utterance(audio, speech_end, time.monotonic(), vad_s, start))
                voiced, vad_s = [], 0.0
