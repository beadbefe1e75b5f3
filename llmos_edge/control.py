"""The local control socket: `llmos submit`, `status`, `model`, `teach` and `forget` reach the supervisor here.

A Unix socket (never a network port) speaking the JSON-lines envelope of docs/protocol.md, the same one as the
console's machine mode: a connection is one session, with as many requests in flight as the client likes, each under
the id the client chose. A client that half-closes (shuts down its sending side) gets the events of what it asked,
then the connection closes; a client that goes away leaves its requests running (and logged).

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

from llmos_edge import protocol
from llmos_edge.errors import UserError
from llmos_edge.learning import Teaching
from llmos_edge.machine import ModelCommandFn, Session
from llmos_edge.memory import Memory
from llmos_edge.protocol import Event
from llmos_edge.scheduler import Scheduler
from llmos_edge.status import Status

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20  # one request line; a longer one is answered with an error and skipped
OUTPUT_EVENTS = 4096  # events waiting for a client that reads slowly; beyond that the client is dropped


class ControlServer:
    def __init__(
        self,
        path: str,
        scheduler: Scheduler,
        status: Callable[[], Status],
        max_tokens: int,
        model: ModelCommandFn | None = None,
        teaching: Teaching | None = None,
        memory: Memory | None = None,
    ) -> None:
        self.teaching, self.memory = teaching, memory
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
        out: queue.Queue[bytes | None] = queue.Queue(OUTPUT_EVENTS)
        gone = threading.Event()  # the client stopped reading or went away: its events are dropped

        def send(event: Event) -> None:  # called from the scheduler's thread: never blocks
            if gone.is_set():
                return
            try:
                out.put_nowait(protocol.encode(event).encode("utf-8", "replace") + b"\n")
            except queue.Full:
                log.warning("control client does not read its events; dropping them")
                gone.set()

        def write() -> None:
            while (data := out.get()) is not None:
                if gone.is_set():
                    continue
                try:
                    conn.sendall(data)
                except OSError:  # the client went away; a submitted request still runs and is logged
                    gone.set()

        writer = threading.Thread(target=write, name="control-writer", daemon=True)
        writer.start()
        session = Session(
            self.scheduler,
            send,
            self.status,
            max_tokens=self.max_tokens,
            source="submit",
            priority="background",
            model=self.model,
            teaching=self.teaching,
            memory=self.memory,
        )
        try:
            with conn.makefile("rb") as f:
                for line in _lines(f):
                    if line is None:
                        send(protocol.error(f"the line is longer than {MAX_REQUEST_BYTES} bytes", "send less"))
                    elif line.strip() and session.handle_line(line):
                        session.close(5.0)
                        break
                else:
                    session.wait_idle()  # the client half-closed: it still reads what it asked for
        except OSError:
            pass  # the client went away; a submitted request still runs and is logged
        except Exception as e:  # one client's bad luck must not go unanswered, nor reach the other clients
            log.exception("control request failed")
            send(protocol.error(f"internal error: {type(e).__name__}: {e}", "see the log"))
        finally:
            out.put(None)
            writer.join(5.0)
            conn.close()


def _lines(f: Any) -> Iterator[bytes | None]:
    """The request lines of a connection; None for a line over the bound (the rest of it is skipped)."""
    while True:
        line: bytes = f.readline(MAX_REQUEST_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_REQUEST_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(MAX_REQUEST_BYTES)
            yield None
        else:
            yield line


def call(path: str, msg: dict[str, Any], timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """Send one request to a running supervisor and yield its events; an error event raises UserError."""
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
    with sock, sock.makefile("rb") as f:
        sock.sendall(json.dumps(msg).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)  # that is all we ask: the supervisor closes once it has answered
        for line in f:
            event: dict[str, Any] = json.loads(line)
            if event.get("event") == "error":
                raise UserError(event["message"], event.get("hint", ""))
            yield event
