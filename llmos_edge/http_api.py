"""The HTTP front-end (off by default, `http.enabled`): an OpenAI-compatible API, /health, /metrics, the status page.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models      (streaming with SSE, or not)
    POST /v1/teach              GET /v1/teach          POST /v1/forget     (taught answers: learning.py)
    GET /health                 GET /metrics           GET /               GET /openapi.json

It follows llama.cpp's server where OpenAI leaves room: errors are `{"error": {"code", "message", "type"}}`; a
stream is `data: {...}` lines and a final `data: [DONE]`; /health says only whether the device can answer (200), or
why not (503), never how busy it is (a 503 under load gets healthy containers restarted). Like every front-end it
reaches the engine only through the scheduler: each request has a priority and a deadline, and a client that goes
away cancels its request. A full queue, and every /v1 endpoint while no model can answer, give 503 with
Retry-After. With `http.token` set, every endpoint but /health needs `Authorization: Bearer TOKEN` (or the token as
the password of HTTP basic auth, for a browser on the status page).

The server is the standard library's ThreadingHTTPServer, a thread per connection: under 64 streaming clients the
supervisor's peak RSS grew 2.6 MiB (bench/http_load.py; bench/http_stack.py compared the candidates; docs/http.md
says why).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import queue
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from llmos_edge.config import HttpConfig, split_listen
from llmos_edge.errors import UserError
from llmos_edge.learning import Pair, Teaching, check_pair
from llmos_edge.memory import Memory
from llmos_edge.metrics import CONTENT_TYPE as METRICS_TYPE
from llmos_edge.metrics import Metrics
from llmos_edge.scheduler import CLASSES, Priority, Refused, Request, Result, Scheduler
from llmos_edge.status import Status

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # bytes of a request body: a prompt far beyond any context this device holds
LINGER_BYTES = 16 << 20  # of a refused request's body, read and dropped so that the client reads the refusal
LINGER_S = 5.0  # and for at most this long
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
IO_TIMEOUT_S = 60.0  # a client that sends nothing (or reads nothing) this long is dropped: a slow-loris bound
LOADING_RETRY_S = 5  # Retry-After while a model loads
FAILED_RETRY_S = 30  # Retry-After while no model can run without a person (see /health's reason)
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there
ROLES = ("system", "user", "assistant")
TAUGHT_LIST = 1000  # pairs GET /v1/teach lists, the newest first


class ApiError(Exception):
    """An answer other than 200, in llama.cpp's error shape."""

    def __init__(self, code: int, message: str, kind: str = "invalid_request_error", retry_after: int = 0) -> None:
        super().__init__(message)
        self.code, self.message, self.kind, self.retry_after = code, message, kind, retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "type": self.kind}}


@dataclass(frozen=True)
class Generation:
    """What a /v1 request asks for, validated."""

    prompt: str  # what the request row records: the last user message, or the completion's prompt
    messages: tuple[dict[str, str], ...]  # chat: the conversation, given to the model's chat template
    raw: bool  # completion: the prompt as it is, no template
    max_tokens: int
    temperature: float | None
    seed: int | None
    stop: tuple[str, ...]
    priority: Priority
    stream: bool
    include_usage: bool


# -- validation: every mistake is one sentence, and a 400 -----------------------------------------------------------
def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _int(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # JSON has one number type: 16.0 is the integer 16 to JSON Schema, and to us
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(f"{key} must be an integer from {lo} to {hi}")
    return v


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are supported."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise _bad(f"{where}: only text content parts are supported (no images or audio)")
            parts.append(p["text"])
        return "".join(parts)
    raise _bad(f"{where}: content must be a string or a list of text parts")


def parse_generation(body: Any, *, chat: bool, max_tokens: int, priority: str) -> Generation:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    if not isinstance(body.get("model", ""), str):
        raise _bad("model must be a string (any name: the device serves the model it has loaded)")
    for key, why in (("tools", "tool calls"), ("functions", "function calls")):
        if body.get(key):
            raise _bad(f"{why} are not supported by this server")
    if body.get("n", 1) not in (1, 1.0, None) or body.get("n") is True:
        raise _bad("n must be 1: this server makes one answer per request")
    if body.get("logprobs") not in (None, False, 0):
        raise _bad("logprobs are not supported by this server")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in ("text", None)):
        raise _bad("response_format other than text is not supported by this server")
    messages: tuple[dict[str, str], ...] = ()
    if chat:
        raw_messages = body.get("messages")
        if not isinstance(raw_messages, list) or not raw_messages:
            raise _bad("messages must be a non-empty list of {role, content} objects")
        out = []
        for i, m in enumerate(raw_messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise _bad(f"{where} must be an object with role and content")
            role = m.get("role")
            if role == "developer":  # OpenAI's newer name for system
                role = "system"
            if role not in ROLES:
                raise _bad(f"{where}: role must be one of {', '.join(ROLES)}")
            out.append({"role": role, "content": _text_of(m.get("content"), where)})
        if not any(m["role"] == "user" for m in out):
            raise _bad("messages must hold at least one user message")
        messages = tuple(out)
        prompt = next(m["content"] for m in reversed(out) if m["role"] == "user")  # may be empty: a chat goes on
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if not isinstance(p, str):
            raise _bad("prompt must be a string (one prompt per request)")
        if not p:
            raise _bad("the prompt is empty")
        prompt = p
    older = _int(body, "max_tokens", max_tokens, 1, 65536)
    n = _int(body, "max_completion_tokens", older, 1, 65536)  # OpenAI's newer name wins when both are given
    temperature = body.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, int | float) or isinstance(temperature, bool) or not 0 <= temperature <= 2
    ):
        raise _bad("temperature must be a number from 0 to 2")
    seed = body.get("seed")
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31):
        raise _bad("seed must be an integer from 0 to 2147483647")
    stop = body.get("stop")
    stops: tuple[str, ...] = ()
    if isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    elif stop is not None:
        raise _bad("stop must be a string or a list of strings")
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise _bad(f"stop takes at most {MAX_STOP} non-empty strings")
    prio = body.get("priority", priority)
    if prio not in CLASSES:
        raise _bad(f"priority must be one of {', '.join(CLASSES)}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false")
    opts = {} if body.get("stream_options") is None else body["stream_options"]
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise _bad("stream_options must be an object, its include_usage true or false")
    return Generation(
        prompt=prompt,
        messages=messages,
        raw=not chat,
        max_tokens=n,
        temperature=None if temperature is None else float(temperature),
        seed=seed,
        stop=stops,
        priority=prio,
        stream=stream,
        include_usage=bool(opts.get("include_usage")),
    )


class StopFilter:
    """Cuts the streamed text at the first stop sequence, holding back only what could be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = 0  # the longest tail that is a prefix of a stop sequence
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class HttpApi:
    def __init__(
        self,
        cfg: HttpConfig,
        scheduler: Scheduler,
        status: Callable[[], Status],
        metrics: Metrics,
        *,
        max_tokens: int,
        page: Callable[[], str] | None = None,
        teaching: Teaching | None = None,
        memory: Memory | None = None,
    ) -> None:
        self.teaching, self.memory = teaching, memory  # learning (issue 15): /v1/teach, /v1/forget
        self.cfg = cfg
        self.scheduler = scheduler
        self.status = status
        self.metrics = metrics
        self.max_tokens = max_tokens
        self.page = page
        self.openapi = resources.files("llmos_edge").joinpath("data/openapi.json").read_bytes()
        # /v1/teach and /v1/forget check their strings by the document's own rules (lengths, patterns), so that what
        # the document calls valid is taken and what it calls invalid is refused, exactly.
        schemas = json.loads(self.openapi)["components"]["schemas"]
        self.text_rules: dict[str, dict[str, Any]] = {
            "teach." + k: v for k, v in schemas["TeachRequest"]["properties"].items()
        } | {"forget.question": schemas["ForgetRequest"]["oneOf"][0]["properties"]["question"]}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.address = ""  # host:port actually bound (port 0 picks a free one)

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        hp = split_listen(self.cfg.listen)
        if hp is None:
            raise UserError(f"http.listen {self.cfg.listen!r} is not HOST:PORT", "for example 127.0.0.1:8080")
        host, port = hp
        api = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Handler(_Handler):
            pass

        Handler.api = api
        try:
            self._server = Server((host, port), Handler)
        except OSError as e:
            raise UserError(
                f"cannot listen on {self.cfg.listen} for HTTP: {e.strerror}",
                "pick a free port in http.listen, or set http.enabled to false",
            ) from None
        bound = self._server.server_address
        self.address = f"{host}:{bound[1]}" if ":" not in host else f"[{host}]:{bound[1]}"
        log.info("http: listening on %s%s", self.address, "" if self.cfg.token else " (no token: loopback only)")
        self.restart()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def restart(self) -> None:
        assert self._server is not None
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.25,), name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- what the handlers ask ---------------------------------------------------------------------------------------
    def authorised(self, header: str) -> bool:
        if not self.cfg.token:
            return True
        scheme, _, value = header.strip().partition(" ")
        given = ""
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        return hmac.compare_digest(given.encode(), self.cfg.token.encode())

    def serving(self) -> Status:
        """The status, if a model can answer; else the 503 that says why."""
        s = self.status()
        if s.serving:
            return s
        if s.state in ("failed", "degraded"):
            raise ApiError(
                503, f"no model can answer: {s.reason or s.state}; see /health", "unavailable_error", FAILED_RETRY_S
            )
        raise ApiError(
            503,
            f"the model is loading ({s.reason or s.state}); try again shortly",
            "unavailable_error",
            LOADING_RETRY_S,
        )


@dataclass
class _Run:
    """One /v1 request on its way through the scheduler."""

    req: Request
    events: queue.Queue[tuple[str, Any]]  # ("token", text) ... then ("done", Result)


class _Handler(BaseHTTPRequestHandler):
    api: HttpApi
    protocol_version = "HTTP/1.1"
    server_version = "llmos-edge"
    timeout = IO_TIMEOUT_S
    allow = ""  # a 405's Allow header
    body_read = False  # an answer before the body was read must close the connection: the body is not a request

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.client_address[0], *args)

    # -- plumbing ----------------------------------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(obj, ensure_ascii=False).encode(), "application/json", headers)

    def _error(self, e: ApiError) -> None:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after else {}
        if e.code == 405:
            headers["Allow"] = self.allow
        if e.code == 401:
            headers["WWW-Authenticate"] = 'Basic realm="llmos-edge"' if self.path == "/" else "Bearer"
        self._json(e.code, e.body(), headers)

    def _body(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "send the body with a Content-Length", "invalid_request_error")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise _bad("Content-Length is not a number") from None
        if n > MAX_BODY:
            raise ApiError(413, f"the body is larger than {MAX_BODY} bytes", "invalid_request_error")
        raw = self.rfile.read(n) if n > 0 else b""
        self.body_read = True
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _bad("the body is not valid JSON") from None

    def _linger(self) -> None:
        """Read and drop the body of a request refused before its body was read (too large, not authorised...), for
        a bounded time, before the connection closes: closing on a client still sending makes its kernel reset the
        connection, and the client then sees a broken pipe instead of the refusal it was sent (what web servers call
        a lingering close)."""
        try:
            left = min(int(self.headers.get("Content-Length", "0")), LINGER_BYTES)
        except ValueError:
            return
        deadline = time.monotonic() + LINGER_S
        with contextlib.suppress(OSError, ValueError):
            self.wfile.flush()
            self.connection.settimeout(LINGER_S)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        self.body_read = False
        try:
            if path != "/health" and not self.api.authorised(self.headers.get("Authorization", "")):
                raise ApiError(401, "a valid token is needed: Authorization: Bearer TOKEN", "authentication_error")
            handler = ROUTES.get((method, path))
            if handler is None:
                allowed = sorted(m for m, p in ROUTES if p == path)
                if allowed:
                    self.allow = ", ".join(allowed + (["HEAD"] if "GET" in allowed else []))
                    raise ApiError(405, f"{method} is not allowed on {path}; use {self.allow}", "invalid_request_error")
                raise ApiError(404, f"no such endpoint: {path}", "not_found_error")
            handler(self)
        except ApiError as e:
            unread = not self.body_read and self.headers.get("Content-Length", "0") not in ("", "0")
            if unread:
                self.close_connection = True
            self._error(e)
            if unread:
                self._linger()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # one request's bad luck must not take the server down
            log.exception("http %s %s failed", method, path)
            with contextlib.suppress(OSError):
                self._error(ApiError(500, f"internal error: {type(e).__name__}", "server_error"))

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def __getattr__(self, name: str) -> Callable[[], None]:
        # Any other method (PUT, PATCH, QUERY ...) is answered 405 with the methods the path allows, where the base
        # class would say 501 Not Implemented (a server error) for a client's choice.
        if name.startswith("do_"):
            return lambda: self._route(name[3:])
        raise AttributeError(name)

    # -- endpoints ---------------------------------------------------------------------------------------------------
    def health(self) -> None:
        s = self.api.status()
        if s.ready:
            self._json(200, {"status": "ok"})
            return
        retry = LOADING_RETRY_S if s.state in ("starting", "loading") else FAILED_RETRY_S
        self._json(503, {"status": s.state, "reason": s.reason}, {"Retry-After": str(retry)})

    def metrics(self) -> None:
        self._send(200, self.api.metrics.render(), METRICS_TYPE)

    def openapi(self) -> None:
        self._send(200, self.api.openapi, "application/json")

    def index(self) -> None:
        if self.api.page is None:
            raise ApiError(404, "no status page", "not_found_error")
        self._send(200, self.api.page().encode(), "text/html; charset=utf-8", {"Cache-Control": "no-store"})

    def models(self) -> None:
        s = self.api.serving()
        self._json(200, {"object": "list", "data": [_model_card(s)]})

    def chat_completions(self) -> None:
        self._generate(chat=True)

    def completions(self) -> None:
        self._generate(chat=False)

    # -- teaching (issue 15): what HTTP teaches, every front-end's next request gets ----------------------------------
    def _learning(self) -> tuple[Teaching, Memory]:
        if self.api.teaching is None or self.api.memory is None:
            raise ApiError(404, "teaching is not available here", "not_found_error")
        return self.api.teaching, self.api.memory

    def _object(self, fields: frozenset[str], example: str) -> dict[str, Any]:
        body = self._body()
        if not isinstance(body, dict):
            raise _bad(f"the body must be a JSON object, e.g. {example}")
        extra = sorted(set(body) - fields)
        if extra:
            raise _bad(f"unknown field {extra[0]!r}; the fields are {', '.join(sorted(fields))}")
        return body

    def teach_list(self) -> None:
        teaching, _ = self._learning()
        self._json(200, {"object": "list", "data": [_pair(p) for p in teaching.pairs(limit=TAUGHT_LIST)]})

    def _text(self, body: dict[str, Any], rule: str) -> str:
        """A string field checked by the OpenAPI document's rule for it (re.search, as JSON Schema validators do)."""
        name = rule.partition(".")[2]
        spec = self.api.text_rules[rule]
        value = body.get(name)
        if not isinstance(value, str):
            raise _bad(f"{name} must be a string")
        if not spec.get("minLength", 0) <= len(value) <= spec.get("maxLength", MAX_BODY):
            raise _bad(f"{name} must be {spec.get('minLength', 0)} to {spec.get('maxLength', MAX_BODY)} characters")
        if "pattern" in spec and not re.search(spec["pattern"], value):
            what = {
                "teach.question": "a letter or digit, and no control character",
                "teach.answer": "more than spaces, and no control character but newlines",
                "forget.question": "more than spaces",
            }[rule]
            raise _bad(f"{name} needs {what}")
        return value

    def teach(self) -> None:
        teaching, _ = self._learning()
        body = self._object(
            frozenset({"question", "answer"}), '{"question": "what is the wifi password", "answer": "on the sticker"}'
        )
        question, answer = self._text(body, "teach.question"), self._text(body, "teach.answer")
        try:
            check_pair(question, answer)
        except UserError as e:
            raise _bad(f"{e.message} ({e.hint})") from None
        try:
            pair, replaced = teaching.teach(question, answer, "http")
        except UserError as e:
            raise ApiError(409, f"{e.message} ({e.hint})", "conflict_error") from None
        self._json(200, {"object": "taught_pair", **_pair(pair), "replaced": replaced})

    def forget(self) -> None:
        teaching, memory = self._learning()
        body = self._object(frozenset({"question", "memory"}), '{"question": "what is the wifi password"}')
        if ("question" in body) == ("memory" in body):
            raise _bad('give either question (a taught question) or "memory": true (this API\'s conversation)')
        if "memory" in body:
            if body["memory"] is not True:
                raise _bad('memory must be true: "memory": true forgets the conversation of HTTP requests')
            try:
                _, n = memory.forget_source("http", "http")
            except UserError as e:
                raise ApiError(409, f"{e.message} ({e.hint})", "conflict_error") from None
            self._json(200, {"object": "forgotten_memory", "source": "http", "turns": n})
            return
        question = self._text(body, "forget.question")
        try:
            pair = teaching.forget(question)
        except UserError as e:  # nothing taught for it (404), or the database cannot be written (409)
            code = 409 if e.message.startswith("cannot store") else 404
            kind = "conflict_error" if code == 409 else "not_found_error"
            raise ApiError(code, f"{e.message} ({e.hint})", kind) from None
        self._json(200, {"object": "forgotten_pair", **_pair(pair)})

    # -- generation --------------------------------------------------------------------------------------------------
    def _generate(self, chat: bool) -> None:
        body = self._body()
        g = parse_generation(body, chat=chat, max_tokens=self.api.max_tokens, priority=self.api.cfg.priority)
        s = self.api.serving()
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        req = Request(
            prompt=g.prompt,
            source="http",
            priority=g.priority,
            max_tokens=g.max_tokens,
            temperature=g.temperature,
            seed=g.seed,
            messages=g.messages,
            raw=g.raw,
            on_token=lambda t: events.put(("token", t)),
            on_done=lambda r: events.put(("done", r)),
        )
        try:
            self.api.scheduler.submit(req)
        except Refused as e:
            raise ApiError(503, str(e), "unavailable_error", e.retry_after_s or LOADING_RETRY_S) from None
        run = _Run(req, events)
        first = self._first_event(run)  # nothing is sent before it: a refusal is still a plain 503
        if first[0] == "done" and first[1].outcome != "ok":  # done at once and "ok": an empty answer (EOS first)
            self._refusal(first[1])
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{req.id}", "created": int(time.time()), "model": _name(s)}
        if g.stream:
            self._stream(run, first, g, chat, meta)
        else:
            self._whole(run, first, g, chat, meta)

    def _first_event(self, run: _Run) -> tuple[str, Any]:
        while True:
            try:
                return run.events.get(timeout=DISCONNECT_POLL_S)
            except queue.Empty:
                if self._client_gone():
                    run.req.cancel()
                    raise ConnectionResetError("the client went away while its request waited") from None

    def _client_gone(self) -> bool:
        """A client that closed its end: its socket reads as end-of-file (it sends nothing more after its body)."""
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _refusal(self, result: Result) -> None:
        if result.outcome == "refused":
            raise ApiError(503, result.error, "unavailable_error", result.retry_after_s or LOADING_RETRY_S)
        if result.outcome == "cancelled":
            raise ApiError(503, result.error or "cancelled", "unavailable_error", LOADING_RETRY_S)
        if result.bad_request:
            raise ApiError(400, result.error, "invalid_request_error")
        raise ApiError(500, result.error or "the engine failed", "server_error")

    def _collect(self, run: _Run, first: tuple[str, Any], stops: StopFilter, emit: Callable[[str], None]) -> Result:
        """Feed tokens through the stop filter to `emit` until the request is done; return its Result."""
        event = first
        while True:
            kind, value = event
            if kind == "done":
                tail = stops.flush()
                if tail:
                    emit(tail)
                return value  # type: ignore[no-any-return]
            piece = stops.feed(value)
            if piece:
                emit(piece)
            if stops.stopped and not run.req.cancelled:
                run.req.cancel()  # a stop sequence: no more tokens are needed
            event = self._first_event(run)

    def _whole(self, run: _Run, first: tuple[str, Any], g: Generation, chat: bool, meta: dict[str, Any]) -> None:
        stops = StopFilter(g.stop)
        parts: list[str] = []
        result = self._collect(run, first, stops, parts.append)
        if result.outcome not in ("ok", "cancelled") or (result.outcome == "cancelled" and not stops.stopped):
            self._refusal(result)
        text = "".join(parts)
        reason = _finish_reason(result, stops)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            obj = "chat.completion"
        else:
            choice |= {"text": text, "logprobs": None}
            obj = "text_completion"
        self._json(200, {**meta, "object": obj, "choices": [choice], "usage": _usage(result)})

    def _stream(self, run: _Run, first: tuple[str, Any], g: Generation, chat: bool, meta: dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def send(data: str) -> None:
            raw = f"data: {data}\n\n".encode()
            try:
                self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
                self.wfile.flush()
            except OSError:
                run.req.cancel()  # the client went away: its request stops at the next token
                raise

        def chunk(content: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
                if content is not None:
                    delta["content"] = content
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": content or "", "finish_reason": reason, "logprobs": None}
            return json.dumps({**meta, "object": obj, "choices": [choice]}, ensure_ascii=False)

        if chat:
            send(chunk(None, None, role=True))
        stops = StopFilter(g.stop)
        result = self._collect(run, first, stops, lambda piece: send(chunk(piece, None)))
        if result.outcome in ("ok", "cancelled") and (result.outcome == "ok" or stops.stopped):
            send(chunk(None, _finish_reason(result, stops)))
            if g.include_usage:
                send(json.dumps({**meta, "object": obj, "choices": [], "usage": _usage(result)}))
        else:  # headers are gone: the error goes in the stream, as llama.cpp's server sends it
            code = 503 if result.outcome in ("refused", "cancelled") else 500
            kind = "unavailable_error" if code == 503 else "server_error"
            send(json.dumps(ApiError(code, result.error or result.outcome, kind).body()))
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _pair(p: Pair) -> dict[str, Any]:
    return {"id": p.id, "question": p.question, "answer": p.answer, "source": p.source, "taught_at": p.taught_at}


def _name(s: Status) -> str:
    return s.model.name if s.model is not None else s.model_file


def _model_card(s: Status) -> dict[str, Any]:
    card: dict[str, Any] = {"id": _name(s), "object": "model", "created": 0, "owned_by": "llmos-edge"}
    if s.model is not None:
        card["meta"] = {
            "quantization": s.model.quantization,
            "n_params": s.model.n_params,
            "size": s.model.file_size,
            "n_ctx": s.engine.n_ctx if s.engine else 0,
        }
    return card


def _finish_reason(result: Result, stops: StopFilter) -> str:
    if stops.stopped:
        return "stop"
    return "length" if result.stats.stop == "length" else "stop"


def _usage(result: Result) -> dict[str, int]:
    s = result.stats
    return {"prompt_tokens": s.tokens_in, "completion_tokens": s.tokens_out, "total_tokens": s.tokens_in + s.tokens_out}


ROUTES: dict[tuple[str, str], Callable[[_Handler], None]] = {
    ("GET", "/health"): _Handler.health,
    ("GET", "/metrics"): _Handler.metrics,
    ("GET", "/openapi.json"): _Handler.openapi,
    ("GET", "/"): _Handler.index,
    ("GET", "/v1/models"): _Handler.models,
    ("POST", "/v1/chat/completions"): _Handler.chat_completions,
    ("POST", "/v1/completions"): _Handler.completions,
    ("GET", "/v1/teach"): _Handler.teach_list,
    ("POST", "/v1/teach"): _Handler.teach,
    ("POST", "/v1/forget"): _Handler.forget,
}
