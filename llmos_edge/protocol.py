"""The JSON-lines envelope that programs use: the console's machine mode (`/json`) and the control socket speak it.

One JSON object per line each way (docs/protocol.md). A request line is parsed into one typed command, or into one
`ProtocolError` (a sentence and a hint, with the request's id when it could be read): a malformed line is answered,
never ignored. Events are plain dicts built here, so both transports say the same thing the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, cast

from llmos_edge.errors import UserError
from llmos_edge.learning import Pair, check_pair
from llmos_edge.scheduler import CLASSES, Priority, Request, Result
from llmos_edge.status import Status
from llmos_edge.status import lines as status_lines

RequestId = str | int
MAX_ID_CHARS = 64
MAX_ID_INT = 2**53 - 1  # what a JavaScript or C double still holds exactly
MAX_TOKENS = 65536
MAX_TEMPERATURE = 2.0
OPS = ("submit", "cancel", "status", "model", "teach", "forget", "taught", "exit")
_FIELDS: dict[str, frozenset[str]] = {
    "submit": frozenset({"op", "id", "prompt", "priority", "max_tokens", "temperature"}),
    "cancel": frozenset({"op", "id"}),
    "status": frozenset({"op", "id"}),
    "model": frozenset({"op", "id", "args"}),
    "teach": frozenset({"op", "id", "question", "answer"}),
    "forget": frozenset({"op", "id", "question", "memory"}),
    "taught": frozenset({"op", "id", "search"}),
    "exit": frozenset({"op"}),
}


@dataclass(frozen=True)
class Submit:
    id: RequestId
    prompt: str
    priority: Priority | None = None  # None: the transport's default (serial interactive, socket background)
    max_tokens: int | None = None  # None: model.max_tokens
    temperature: float | None = None  # None: model.temperature


@dataclass(frozen=True)
class Cancel:
    id: RequestId


@dataclass(frozen=True)
class StatusQuery:
    id: RequestId | None = None


@dataclass(frozen=True)
class ModelCommand:
    args: str
    id: RequestId | None = None


@dataclass(frozen=True)
class Teach:
    question: str
    answer: str
    id: RequestId | None = None


@dataclass(frozen=True)
class Forget:
    """A taught pair (`question`), or a conversation's memory (`memory`: a source, "all", or "" for the session's
    own source)."""

    question: str = ""
    memory: str | None = None
    id: RequestId | None = None


@dataclass(frozen=True)
class Taught:
    search: str = ""
    id: RequestId | None = None


@dataclass(frozen=True)
class Exit:
    pass


Command = Submit | Cancel | StatusQuery | ModelCommand | Teach | Forget | Taught | Exit


class ProtocolError(UserError):
    """A line that is not a valid request; answered with one error event carrying `id` when it could be read."""

    def __init__(self, message: str, hint: str = "", id: RequestId | None = None) -> None:
        super().__init__(message, hint)
        self.id = id


def _id(value: object, required: bool) -> RequestId | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ProtocolError(
            "id must be a string or an integer",
            f'choose one per request, e.g. "id": 1 or "id": "q1" (at most {MAX_ID_CHARS} characters)',
        )
    if isinstance(value, int) and not 0 <= value <= MAX_ID_INT:
        raise ProtocolError("an integer id must be from 0 to 2^53-1", 'use a smaller number or a string, e.g. "q1"')
    if isinstance(value, str) and not (0 < len(value) <= MAX_ID_CHARS and value.isprintable()):
        raise ProtocolError(
            f"a string id must be 1 to {MAX_ID_CHARS} printable characters",
            'e.g. "id": "q1"',
        )
    return value


def parse(line: str | bytes) -> Command:
    """One request line -> one command; anything else raises ProtocolError (never another exception)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("the line is not valid UTF-8", "send one JSON object per line, UTF-8 encoded") from None
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):
        raise ProtocolError(
            "the line is not valid JSON",
            'send one JSON object per line, e.g. {"op": "submit", "id": 1, "prompt": "ping"}',
        ) from None
    if not isinstance(msg, dict):
        raise ProtocolError("the line is not a JSON object", '{"op": ...} with one of: ' + ", ".join(OPS))
    msg = cast(dict[str, Any], msg)
    op = msg.get("op")
    # The id is read first, so that every later complaint about this line names the request it is about.
    raw_id = msg.get("id")
    try:
        rid = _id(raw_id, required=False)
    except ProtocolError:
        rid = None
        if op in ("submit", "cancel", "status", "model", "teach", "forget", "taught"):
            raise
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(
            f"unknown op {op!r}" if op is not None else "the object has no op",
            "op is one of: " + ", ".join(OPS),
            rid,
        )
    extra = sorted(set(msg) - _FIELDS[op])
    if extra:
        raise ProtocolError(
            f"{op} does not take {', '.join(extra)}",
            f"{op} takes: {', '.join(sorted(_FIELDS[op] - {'op'}))}"
            if len(_FIELDS[op]) > 1
            else f"{op} takes no field",
            rid,
        )
    if op == "exit":
        return Exit()
    if op == "status":
        return StatusQuery(rid)
    if op == "model":
        args = msg.get("args", "")
        if not isinstance(args, str):
            raise ProtocolError("model needs args as a string", 'e.g. "args": "install /media/MODELS/x.gguf"', rid)
        return ModelCommand(args, rid)
    if op in ("teach", "forget", "taught"):
        return _learning(op, msg, rid)
    if rid is None:
        raise ProtocolError(f"{op} needs an id", 'the id you choose for the request, e.g. "id": 1')
    if op == "cancel":
        return Cancel(rid)
    return _submit(msg, rid)


def _submit(msg: dict[str, Any], rid: RequestId) -> Submit:
    prompt = msg.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ProtocolError("submit needs a non-empty prompt", '"prompt": "your question"', rid)
    priority = msg.get("priority")
    if priority is not None and priority not in CLASSES:
        raise ProtocolError(f"priority must be one of {', '.join(CLASSES)}", "or leave it out for the default", rid)
    max_tokens = msg.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS
    ):
        raise ProtocolError(f"max_tokens must be an integer from 1 to {MAX_TOKENS}", "or leave it out", rid)
    temperature = msg.get("temperature")
    if temperature is not None:
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not 0.0 <= temperature <= MAX_TEMPERATURE
        ):
            raise ProtocolError(
                f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}",
                "0 answers the same every time; leave it out for model.temperature",
                rid,
            )
        temperature = float(temperature)
    return Submit(rid, prompt, cast(Priority | None, priority), max_tokens, temperature)


def _learning(op: str, msg: dict[str, Any], rid: RequestId | None) -> Teach | Forget | Taught:
    strings = {k: v for k, v in msg.items() if k not in ("op", "id")}
    for name, value in strings.items():
        if not isinstance(value, str) and not (name == "memory" and value is True):
            what = "true or a source (console, submit, http, voice, all)" if name == "memory" else "a string"
            raise ProtocolError(f"{op} needs {name} as {what}", _LEARNING_HINTS[op], rid)
    if op == "taught":
        return Taught(str(msg.get("search", "")), rid)
    if op == "teach":
        try:
            question, answer = check_pair(str(msg.get("question", "")), str(msg.get("answer", "")))
        except UserError as e:
            raise ProtocolError(e.message, e.hint, rid) from None
        return Teach(question, answer, rid)
    memory = msg.get("memory")
    question = str(msg.get("question", ""))
    if (memory is None) == (not question.strip()):
        raise ProtocolError("forget needs either a question or memory", _LEARNING_HINTS["forget"], rid)
    return Forget(question, None if memory is None else "" if memory is True else str(memory), rid)


_LEARNING_HINTS = {
    "teach": '{"op": "teach", "question": "what is the wifi password", "answer": "on the sticker"}',
    "forget": '{"op": "forget", "question": "what is the wifi password"}, or {"op": "forget", "memory": true}',
    "taught": '{"op": "taught"}, or {"op": "taught", "search": "wifi"}',
}


# -- events --------------------------------------------------------------------------------------------------------
Event = dict[str, Any]
Mode = Literal["json", "human"]


def accepted(rid: RequestId, req: Request) -> Event:
    return {"event": "accepted", "id": rid, "request": req.id}


def token(rid: RequestId, text: str) -> Event:
    return {"event": "token", "id": rid, "text": text}


def done(rid: RequestId, req: Request, r: Result) -> Event:
    s = r.stats
    event: Event = {
        "event": "done",
        "id": rid,
        "request": req.id,
        "outcome": r.outcome,
        "tokens_in": s.tokens_in,
        "tokens_out": s.tokens_out,
        "tok_s": round(s.decode_tok_s, 2),
        "ttft_ms": round(s.ttft_s * 1000, 2),
        "queue_wait_ms": round(r.queue_wait_s * 1000, 2),
        "preemptions": req.preemptions,
    }
    if r.error:
        event["error"] = r.error
    return event


def error(message: str, hint: str = "", rid: RequestId | None = None) -> Event:
    return {"event": "error", "id": rid, "message": message, "hint": hint}


def from_error(e: UserError, rid: RequestId | None = None) -> Event:
    return error(e.message, e.hint, e.id if isinstance(e, ProtocolError) else rid)


def status(s: Status, rid: RequestId | None = None) -> Event:
    return {"event": "status", "id": rid, "status": _finite(dataclasses.asdict(s)), "lines": status_lines(s)}


def progress(rid: RequestId | None, text: str) -> Event:
    return {"event": "progress", "id": rid, "text": text}


def model(rid: RequestId | None, lines: list[str]) -> Event:
    return {"event": "model", "id": rid, "lines": lines}


def taught(rid: RequestId | None, pair: Pair, replaced: bool) -> Event:
    return {"event": "taught", "id": rid, **pair.as_dict(), "replaced": replaced}


def forgotten_pair(rid: RequestId | None, pair: Pair) -> Event:
    return {"event": "forgotten", "id": rid, **pair.as_dict()}


def forgotten_memory(rid: RequestId | None, source: str, turns: int) -> Event:
    return {"event": "forgotten", "id": rid, "memory": source, "turns": turns}


def pairs(rid: RequestId | None, found: list[Pair]) -> Event:
    return {"event": "pairs", "id": rid, "pairs": [p.as_dict() for p in found]}


def mode(name: Mode) -> Event:
    return {"event": "mode", "mode": name}


def shutdown() -> Event:
    return {"event": "shutdown", "message": "llmos-edge is shutting down"}


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a sensor's NaN is reported as null rather than as invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode(event: Event) -> str:
    """One event as one line (without its line end): compact, UTF-8 text kept as is, control characters escaped."""
    return json.dumps(event, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
