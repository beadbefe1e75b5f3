"""What the engine handle (engine.py, in the supervisor) and its worker process (engine_worker.py) say to each other.

One frozen dataclass per message kind, pickled over a socketpair wrapped as a multiprocessing Connection. Both sides
import this module and nothing of each other, so neither can reach into the other's state, and a message the other
side does not know is a type error (mypy checks every `match` over `ToWorker` and `FromWorker`).

  handle -> worker: Init first, then Generate | Resume | Cancel | Preempt | Drop | Limits | Shutdown
  worker -> handle: CpuVariant, then Loaded | LoadFailed; per request Progress* Tokens* then Done | Preempted | Failed

This module imports nothing of the package: the worker process must stay free of front-ends and the governor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from multiprocessing.connection import Connection


@dataclass(frozen=True)
class EngineSettings:
    model_path: str
    n_ctx: int = 512
    n_threads: int = 0  # 0: one per CPU this process may run on
    exclude_cpu: tuple[str, ...] = ()  # CPU variants that died with SIGILL on this machine
    report_every: float = 5.0  # seconds of prefill between progress messages (the handle sets a sixth of its timeout)


@dataclass
class GenerationStats:
    tokens_in: int = 0
    tokens_out: int = 0
    ttft_s: float = 0.0  # from the request reaching the worker to its first token
    decode_tok_s: float = 0.0  # tokens after the first, per second of decoding
    stop: str = ""  # eos | length | cancelled | preempted
    text: str = ""


@dataclass
class EngineInfo:
    model: str = ""
    n_ctx: int = 0
    n_threads: int = 0
    cpu_backend: str = ""  # the ggml CPU variant runtime dispatch picked (x64, sse42, haswell, zen4...)
    pid: int = 0
    self_test: dict[str, str] = field(default_factory=dict)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) or 1


# --- handle -> worker ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Init:
    """The first message: what to load and how."""

    settings: EngineSettings


@dataclass(frozen=True)
class Generate:
    rid: int
    prompt: str
    max_tokens: int
    temperature: float
    seed: int
    # A chat: (role, content) pairs for the model's chat template; `prompt` is then its last user message.
    messages: tuple[tuple[str, str], ...] = ()
    raw: bool = False  # the prompt as it is, no template (a text completion)


@dataclass(frozen=True)
class Resume:
    """Continue preempted request `rid` exactly where it stopped."""

    rid: int
    temperature: float


@dataclass(frozen=True)
class Cancel:
    rid: int


@dataclass(frozen=True)
class Preempt:
    """Stop request `rid` at its next token and keep its state for a Resume."""

    rid: int


@dataclass(frozen=True)
class Drop:
    """Forget preempted request `rid` (it will not be resumed)."""

    rid: int


@dataclass(frozen=True)
class Limits:
    """The governor's actuators; None leaves a limit as it is."""

    threads: int | None = None
    duty: float | None = None  # the fraction of time spent computing (the worker rests between tokens)


@dataclass(frozen=True)
class Shutdown:
    pass


ToWorker = Init | Generate | Resume | Cancel | Preempt | Drop | Limits | Shutdown


# --- worker -> handle ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuVariant:
    """Sent before loading, so the handle knows which ggml CPU variant to blame for a SIGILL."""

    name: str


@dataclass(frozen=True)
class Loaded:
    info: EngineInfo


@dataclass(frozen=True)
class LoadFailed:
    message: str


@dataclass(frozen=True)
class Progress:
    """Prefill of a long prompt: `prompt_tokens_read` so far (progress for the watchdog before the first token)."""

    rid: int
    prompt_tokens_read: int


@dataclass(frozen=True)
class Tokens:
    """`n_tokens` generated tokens, decoded to `text` (coalesced: one message per STREAM_INTERVAL at most)."""

    rid: int
    text: str
    n_tokens: int


@dataclass(frozen=True)
class Done:
    rid: int
    stats: GenerationStats


@dataclass(frozen=True)
class Preempted:
    """The request stopped at a Preempt; `stats.text` is everything generated so far."""

    rid: int
    stats: GenerationStats


@dataclass(frozen=True)
class Failed:
    rid: int
    message: str
    # The request itself is at fault (longer than the context, refused by the model's chat template): another
    # request would do; the worker and the model are fine.
    bad_request: bool = False


FromWorker = CpuVariant | Loaded | LoadFailed | Progress | Tokens | Done | Preempted | Failed


class ProtocolError(Exception):
    """The other side sent something that is not one of this module's messages (a version mismatch, a bug)."""


def receive_to_worker(conn: Connection) -> ToWorker:
    msg = conn.recv()
    if not isinstance(msg, ToWorker):
        raise ProtocolError(f"the worker got {type(msg).__name__}, not a message of engine_protocol")
    return msg


def receive_from_worker(conn: Connection) -> FromWorker:
    msg = conn.recv()
    if not isinstance(msg, FromWorker):
        raise ProtocolError(f"the handle got {type(msg).__name__}, not a message of engine_protocol")
    return msg
