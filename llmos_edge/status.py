"""One snapshot of the appliance's state, taken by the supervisor and rendered by every front-end.

The console's and the control socket's `/status` lines, systemd's one-line `STATUS=`, the voice front-end's spoken
answers (and later HTTP's /health and /metrics) all read the same `Status`: a front-end never parses another's
text. The governor still renders its own thermal and memory lines (they change with its modes); the figures a
program needs from it (temperature, mode, CPU share, budget) are fields here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 2**20


@dataclass(frozen=True)
class ModelStatus:
    name: str
    quantization: str
    n_params: int
    file_size: int
    path: str


@dataclass(frozen=True)
class EngineStatus:
    pid: int
    n_ctx: int
    n_threads: int
    cpu_backend: str


@dataclass(frozen=True)
class LastAnswer:
    tokens_out: int
    decode_tok_s: float
    ttft_s: float


@dataclass(frozen=True)
class MemoryStatus:
    supervisor_rss: int
    engine_rss: int
    available: int
    total: int


@dataclass(frozen=True)
class StoreStatus:
    active: str
    fallback: str  # why another model serves instead of the active one ("running X instead of Y: ..."); "" when none
    trial: bool  # a newly activated model's gate is running
    installed: int
    directory: str
    last_change: str


@dataclass(frozen=True)
class GovernorStatus:
    enabled: bool
    celsius: float | None  # the controlled zone; None without a sensor
    setpoint: float
    mode: str  # normal, throttling, critical, cooling, no thermal sensor
    share: float  # CPU share granted to the engine, 0..1
    budget: int  # the engine's memory budget in bytes, 0 when none
    lines: tuple[str, ...]  # the governor's own /status lines
    summary: str  # its part of STATUS=


@dataclass(frozen=True)
class Status:
    state: str  # starting, loading, ready, degraded, failed ... (what a person is told)
    reason: str
    serving: bool  # a model is loaded and has passed its self-test: requests are answered now
    model_file: str  # what the engine loaded, or the configured file's name before it has loaded
    model: ModelStatus | None
    store: StoreStatus
    engine: EngineStatus | None
    self_test: str
    last: LastAnswer | None
    memory: MemoryStatus
    temperatures: tuple[tuple[str, float], ...]  # (zone type, Celsius) for every thermal zone
    governor: GovernorStatus
    voice: str  # the voice front-end's own line
    uptime_s: float
    restarts: int
    queue: dict[str, int] = field(default_factory=dict)
    config_sources: tuple[str, ...] = ()
    config_fallback: str = ""
    database: str = ""
    database_pending: int = 0
    database_degraded: str = ""
    database_ring: str = ""  # the request ring's state (store.py), when request rows are committed in batches
    learning: str = ""  # taught pairs and conversation memory, in a line (learning.py, memory.py)
    flash: str = ""  # bytes written to the database's partition (wear.py), in a line
    idle: bool = False  # no request running or waiting: an installed update may reboot now (update.py)
    system: str = ""  # the running version and the other root slot's (update.py), in a line

    @property
    def ready(self) -> bool:
        return self.state == "ready"


def duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def summary(s: Status) -> str:
    """The one line of `STATUS=` (systemctl status) and of the log's "ready:" line."""
    speed = f"{s.last.decode_tok_s:.0f} tok/s" if s.last and s.last.decode_tok_s else "- tok/s"
    head = f"{s.state}: {s.reason}" if s.reason else s.state
    return (
        f"{head} | {s.model_file} | {speed} | mem {mib(s.memory.supervisor_rss + s.memory.engine_rss)} | "
        f"up {duration(s.uptime_s)} | restarts {s.restarts} | queue {sum(s.queue.values())} | {s.governor.summary}"
    )


def lines(s: Status) -> list[str]:
    """The console's and `llmos status`'s /status."""
    out = [f"state: {s.state}" + (f" ({s.reason})" if s.reason else "")]
    if s.model is not None:
        m = s.model
        out.append(f"model: {m.name} ({m.quantization}, {m.n_params / 1e6:.2f}M params, {mib(m.file_size)}) {m.path}")
    out.append(_store_line(s.store))
    if s.engine is not None:
        e = s.engine
        out.append(f"engine: pid {e.pid}, ctx {e.n_ctx}, {e.n_threads} threads, cpu {e.cpu_backend}")
    out.append(f"self-test: {s.self_test}")
    if s.last is not None:
        out.append(
            f"last answer: {s.last.tokens_out} tokens, {s.last.decode_tok_s:.1f} tok/s, "
            f"first token {s.last.ttft_s * 1000:.1f} ms"
        )
    else:
        out.append("last answer: none yet")
    mem = s.memory
    out.append(
        f"memory: supervisor {mib(mem.supervisor_rss)}, engine {mib(mem.engine_rss)}; "
        f"available {mib(mem.available)} of {mib(mem.total)}"
    )
    out.append(
        "temperature: "
        + (", ".join(f"{name} {c:.1f} C" for name, c in s.temperatures) if s.temperatures else "no thermal sensor")
    )
    out += s.governor.lines
    out.append(s.voice)
    if s.learning:
        out.append(s.learning)
    if s.system:
        out.append(s.system)
    out.append(f"uptime: {duration(s.uptime_s)}; engine restarts: {s.restarts}")
    out.append("queue: " + ", ".join(f"{k} {v}" for k, v in s.queue.items()))
    out.append(
        f"config: {', '.join(s.config_sources)}" + (f" (FALLBACK: {s.config_fallback})" if s.config_fallback else "")
    )
    out.append(
        f"database: {s.database}"
        + (f" ({s.database_pending} rows waiting for disk space)" if s.database_pending else "")
        + (f" (degraded: {s.database_degraded})" if s.database_degraded else "")
        + (f"; {s.database_ring}" if s.database_ring else "")
    )
    if s.flash:
        out.append(s.flash)
    return out


def _store_line(st: StoreStatus) -> str:
    line = f"models: active {st.active}"
    if st.fallback:
        line += f"; FALLBACK {st.fallback}"
    elif st.trial:
        line += " (trying it: gate running)"
    line += f"; {st.installed} installed in {st.directory} (`/model` lists them)"
    return line + (f"; last change: {st.last_change}" if st.last_change else "")
