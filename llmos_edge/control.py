"""The local control socket: `llmos submit` and `llmos status` talk to the running supervisor through it.

A Unix socket (never a network port), one JSON object per line each way:

  -> {"op": "status"}                                   <- {"status": ["state: ready", ...]}
  -> {"op": "submit", "prompt": "...", "priority": "background", "max_tokens": 128, "wait": true}
                                                        <- {"accepted": ID}, then with wait:
                                                           {"token": "..."} ... {"done": {"outcome": ..., ...}}
  -> {"op": "cancel", "id": ID}                         <- {"cancelled": true|false}
  -> {"op": "model", "args": "install /media/MODELS/x.gguf"}
                                                        <- {"progress": "..."} ..., then {"done": {"lines": [...]}}
  any error                                             <- {"error": "one sentence"}

Like the console it is a front-end: it reaches the engine only through the scheduler.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmos_edge.errors import UserError
from llmos_edge.scheduler import CLASSES, Refused, Request, Result, Scheduler

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20


class ControlServer:
    def __init__(
        self,
        path: str,
        scheduler: Scheduler,
        status: Callable[[], list[str]],
        max_tokens: int,
        model: Callable[[str, Callable[[str], None]], list[str]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.model = model
        self.scheduler = scheduler
        self.status = status
        self.max_tokens = max_tokens
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a stale socket from an earlier run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(self.path))
            os.chmod(self.path, 0o660)
            sock.listen(8)
        except OSError as e:
            raise UserError(
                f"cannot create the control socket {self.path}: {e.strerror}",
                "set scheduler.control_socket to a writable path, or none",
            ) from None
        sock.settimeout(0.5)
        self._sock = sock
        self.restart()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def restart(self) -> None:
        """Start (again) the thread that accepts clients; the socket stays the same."""
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="control-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:

            def send(obj: dict[str, Any]) -> None:
                f.write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")
                f.flush()

            try:
                line = f.readline(MAX_REQUEST_BYTES)
                try:
                    msg = json.loads(line)
                    if not isinstance(msg, dict):
                        raise ValueError
                except ValueError:
                    send({"error": "not a JSON object on one line"})
                    return
                self._handle(msg, send)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; a submitted request still runs and is logged
            except Exception as e:  # one client's bad luck must not go unanswered, nor reach the other clients
                log.exception("control request failed")
                with contextlib.suppress(OSError):
                    send({"error": f"internal error: {type(e).__name__}: {e}"})

    def _handle(self, msg: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> None:
        op = msg.get("op")
        if op == "status":
            send({"status": self.status()})
        elif op == "cancel":
            rid = msg.get("id")
            if not isinstance(rid, int) or isinstance(rid, bool):
                send({"error": "cancel needs the request's id, an integer"})
                return
            req = self.scheduler.find(rid)
            if req is not None:
                req.cancel()
            send({"cancelled": req is not None})
        elif op == "submit":
            self._submit(msg, send)
        elif op == "model" and self.model is not None:
            args = msg.get("args", "")
            if not isinstance(args, str):
                send({"error": 'model needs args as a string, e.g. "install /media/MODELS/x.gguf"'})
                return
            try:
                lines = self.model(args, lambda m: send({"progress": m}))
            except UserError as e:
                send({"error": str(e)})
                return
            send({"done": {"lines": lines}})
        else:
            send({"error": f"unknown op {op!r}; use status, submit, cancel or model"})

    def _submit(self, msg: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> None:
        prompt, priority = msg.get("prompt"), msg.get("priority", "background")
        max_tokens = msg.get("max_tokens", self.max_tokens)
        if not isinstance(prompt, str) or not prompt.strip():
            send({"error": "submit needs a non-empty prompt"})
            return
        if priority not in CLASSES:
            send({"error": f"priority must be one of {', '.join(CLASSES)}"})
            return
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 65536:
            send({"error": "max_tokens must be an integer from 1 to 65536"})
            return
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        req = Request(
            prompt=prompt,
            source="submit",
            priority=priority,
            max_tokens=max_tokens,
            on_token=lambda t: events.put(("token", t)),
            on_done=lambda r: events.put(("done", r)),
        )
        try:
            self.scheduler.submit(req)
        except Refused as e:
            send({"error": str(e)})
            return
        send({"accepted": req.id})
        if not msg.get("wait", True):
            return
        while True:
            kind, value = events.get()
            if kind == "token":
                send({"token": value})
            else:
                r: Result = value
                s = r.stats
                send(
                    {
                        "done": {
                            "id": req.id,
                            "outcome": r.outcome,
                            "error": r.error,
                            "text": r.text,
                            "tokens_out": s.tokens_out,
                            "tok_s": round(s.decode_tok_s, 2),
                            "ttft_ms": round(s.ttft_s * 1000, 2),
                            "queue_wait_ms": round(r.queue_wait_s * 1000, 2),
                            "preemptions": req.preemptions,
                        }
                    }
                )
                return


def call(path: str, msg: dict[str, Any], timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """Send one request to a running supervisor and yield its replies."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise UserError(
            f"no llmos supervisor is listening on {path}",
            "is `llmos run` running? pass --socket PATH (scheduler.control_socket of its config)",
        ) from None
    except PermissionError:
        sock.close()
        raise UserError(f"not allowed to use {path}", "run as root or as a member of the socket's group") from None
    with sock, sock.makefile("rwb") as f:
        f.write(json.dumps(msg).encode() + b"\n")
        f.flush()
        for line in f:
            reply: dict[str, Any] = json.loads(line)
            if "error" in reply:
                raise UserError(reply["error"], "")
            yield reply
