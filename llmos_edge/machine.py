"""One machine session: a program's requests in the JSON-lines envelope (protocol.py), over any line transport.

The console's machine mode and each control-socket connection run one `Session`. It keeps the requests in flight by
the ids the program chose (so one line can start a request while others stream, and `cancel` names one), hands them
to the scheduler, and sends their events through `send`, which must never block (it is called from the scheduler's
thread while tokens stream).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from llmos_edge import protocol
from llmos_edge.errors import UserError
from llmos_edge.learning import Teaching
from llmos_edge.memory import Memory
from llmos_edge.protocol import Event, RequestId
from llmos_edge.scheduler import Priority, Refused, Request, Result, Scheduler
from llmos_edge.status import Status

log = logging.getLogger(__name__)

ModelCommandFn = Callable[[str, Callable[[str], None]], list[str]]


class Session:
    def __init__(
        self,
        scheduler: Scheduler,
        send: Callable[[Event], None],
        status: Callable[[], Status],
        *,
        max_tokens: int,
        source: str,
        priority: Priority,
        model: ModelCommandFn | None = None,
        teaching: Teaching | None = None,
        memory: Memory | None = None,
    ) -> None:
        self.teaching, self.memory = teaching, memory  # learning (issue 15): teach, forget, taught
        self.scheduler = scheduler
        self._send = send
        self.status = status
        self.max_tokens = max_tokens
        self.source = source  # the requests table's `source` column
        self.priority = priority  # when a submit names none
        self.model = model
        self._cond = threading.Condition()
        self.in_flight: dict[RequestId, Request] = {}
        self._ops = 0  # model commands running
        self.closed = False

    def send(self, event: Event) -> None:
        if not self.closed:  # a request cancelled by close() may still finish later: its events go nowhere
            self._send(event)

    def handle_line(self, line: str | bytes) -> bool:
        """Answer one request line; True when it was `exit` (the transport then calls close())."""
        try:
            cmd = protocol.parse(line)
        except protocol.ProtocolError as e:
            self.send(protocol.from_error(e))
            return False
        return self.handle(cmd)

    def handle(self, cmd: protocol.Command) -> bool:
        if isinstance(cmd, protocol.Exit):
            return True
        if isinstance(cmd, protocol.Submit):
            self._submit(cmd)
        elif isinstance(cmd, protocol.Cancel):
            with self._cond:
                req = self.in_flight.get(cmd.id)
            if req is None:
                self.send(protocol.error(f"no request {cmd.id!r} is in flight", "it may have finished already", cmd.id))
            else:
                req.cancel()  # its done event (outcome cancelled) answers this
        elif isinstance(cmd, protocol.StatusQuery):
            self.send(protocol.status(self.status(), cmd.id))
        elif isinstance(cmd, protocol.ModelCommand):
            self._model(cmd)
        elif isinstance(cmd, (protocol.Teach, protocol.Forget, protocol.Taught)):
            try:
                self.send(self._learning(cmd))
            except UserError as e:
                self.send(protocol.from_error(e, cmd.id))
        return False

    def _learning(self, cmd: protocol.Teach | protocol.Forget | protocol.Taught) -> Event:
        if self.teaching is None or self.memory is None:
            raise UserError("teaching is not available here", "use the device's console")
        if isinstance(cmd, protocol.Teach):
            pair, replaced = self.teaching.teach(cmd.question, cmd.answer, self.source)
            return protocol.taught(cmd.id, pair, replaced)
        if isinstance(cmd, protocol.Taught):
            return protocol.pairs(cmd.id, self.teaching.pairs(cmd.search))
        if cmd.memory is None:
            return protocol.forgotten_pair(cmd.id, self.teaching.forget(cmd.question))
        what, n = self.memory.forget_source(cmd.memory, self.source)
        return protocol.forgotten_memory(cmd.id, what, n)

    def _submit(self, cmd: protocol.Submit) -> None:
        rid = cmd.id
        with self._cond:
            if rid in self.in_flight:
                self.send(
                    protocol.error(
                        f"request {rid!r} is already in flight",
                        "choose a new id for each request (an id is free again after its done event)",
                        rid,
                    )
                )
                return
            req = Request(
                prompt=cmd.prompt,
                source=self.source,
                priority=cmd.priority or self.priority,
                max_tokens=cmd.max_tokens or self.max_tokens,
                temperature=cmd.temperature,
                on_token=lambda text: self.send(protocol.token(rid, text)),
                on_done=lambda r: self._done(rid, req, r),
            )
            self.in_flight[rid] = req
        # Sent before the scheduler sees it, so that no token can overtake it; a refusal then comes as done.
        self.send(protocol.accepted(rid, req))
        try:
            self.scheduler.submit(req)
        except Refused:
            pass  # on_done has been called with the refusal

    def _done(self, rid: RequestId, req: Request, r: Result) -> None:
        self.send(protocol.done(rid, req, r))
        with self._cond:
            if self.in_flight.get(rid) is req:
                del self.in_flight[rid]
            self._cond.notify_all()

    def _model(self, cmd: protocol.ModelCommand) -> None:
        """In its own thread: an install takes a while, and the session keeps reading (and streaming) meanwhile."""
        if self.model is None:
            self.send(protocol.error("model commands are not available here", "use the device's console", cmd.id))
            return
        model = self.model

        def run() -> None:
            try:
                lines = model(cmd.args, lambda m: self.send(protocol.progress(cmd.id, m)))
                self.send(protocol.model(cmd.id, lines))
            except UserError as e:
                self.send(protocol.from_error(e, cmd.id))
            except Exception as e:  # a bug must cost this command, never the session
                log.exception("model %s", cmd.args)
                self.send(protocol.error(f"model failed: {type(e).__name__}: {e}", "see the log", cmd.id))
            finally:
                with self._cond:
                    self._ops -= 1
                    self._cond.notify_all()

        with self._cond:
            self._ops += 1
        threading.Thread(target=run, name="session-model", daemon=True).start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request and no model command is in flight; False if the timeout came first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.in_flight or self._ops:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float) -> None:
        """End the session: cancel what is in flight, send the done events that come within `timeout`, then
        nothing more."""
        with self._cond:
            for req in self.in_flight.values():
                req.cancel()
        self.wait_idle(timeout)
        self.closed = True
