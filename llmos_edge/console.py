"""The serial console: the product's interface on a UART, a pty, a TCP socket or the terminal.

Human mode: the prompt `llmos> `; a typed line is a question whose answer streams token by token; commands start
with `/`. This is not a login shell: nothing typed here reaches a shell. Line noise is expected on serial lines, so
over-long lines, invalid UTF-8, control bytes and bursts are dropped with a (rate-limited) notice, never a crash.

Machine mode: `/json` switches the same port to the JSON-lines envelope of docs/protocol.md (machine.py serves it):
no echo, no prompt, one JSON object per line each way, several requests in flight; `{"op": "exit"}` or `/human`
switches back. A person and a program can so share one serial line.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import select
import termios
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import serial
import serial.serialposix
from serial.urlhandler import protocol_socket

from llmos_edge import factory_reset, protocol
from llmos_edge.errors import UserError
from llmos_edge.learning import Teaching, parse_teach
from llmos_edge.machine import Session
from llmos_edge.memory import Memory
from llmos_edge.protocol import Event
from llmos_edge.scheduler import Refused, Request, Result, Scheduler
from llmos_edge.status import Status
from llmos_edge.status import lines as status_lines

log = logging.getLogger(__name__)

PROMPT = "llmos> "
OUTPUT_QUEUE = 4096  # chunks of output waiting for a slow terminal; beyond that output is dropped and counted
HELP = """\
Type a question and press Enter; the answer streams as it is generated.
Commands:
  /help        this text
  /status      model, speed, memory, temperature, uptime, restarts, queue
  /logs [N]    the last N requests (default 5)
  /cancel      stop the answer being generated (Ctrl-C does the same)
  /model       the installed models; /model install PATH, /model activate NAME, /model rollback,
               /model remove NAME (a model is gated before it becomes active, and rolled back if it fails)
  /teach       /teach QUESTION => ANSWER: from now on QUESTION (and its variants: case, punctuation,
               "please" ...) gets ANSWER; /forget QUESTION undoes it; /taught [WORDS] lists the pairs
  /consolidate put the taught pairs into a new version of the built-in model's weights when no request
               runs (it also happens by itself after learning.consolidate_after idle seconds);
               /consolidate status says how far it is
  /memory      what the conversation memory holds; /memory forget [SOURCE|all] deletes it (this console's
               by default)
  /json        machine mode for programs: JSON lines in and out (docs/protocol.md); /human comes back
  /update PATH    install the signed update bundle in directory PATH (a USB stick: /media/LABEL/...) into
                  the other system slot and restart into it; it rolls back by itself if it does not work
  /factory-reset  erase /var (database, installed models, config overrides) and restart; asks to confirm"""
LEAVE_S = 5.0  # leaving machine mode: how long the cancelled requests' done events are waited for

# What a model generates is printed raw to someone's terminal: strip C0 controls (ESC sequences could restyle or
# rewrite the terminal) except newline and tab.
_UNPRINTABLE = {c: None for c in range(0x20) if c not in (0x09, 0x0A)} | {0x7F: None}

CTRL_C, CTRL_D, BS, DEL, CTRL_U, ESC, CR, LF, TAB = 0x03, 0x04, 0x08, 0x7F, 0x15, 0x1B, 0x0D, 0x0A, 0x09


class Port(Protocol):
    def read(self, size: int) -> bytes: ...
    def write(self, data: bytes) -> int | None: ...
    def close(self) -> None: ...


class FdPort:
    """A console on plain file descriptors: the terminal (stdio) or the master side of a pty we created."""

    def __init__(self, read_fd: int, write_fd: int, raw: bool = False) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        self._saved: list[object] | None = None
        if raw and os.isatty(read_fd):
            self._saved = termios.tcgetattr(read_fd)
            tty.setraw(read_fd)

    def read(self, size: int) -> bytes:
        ready, _, _ = select.select([self.read_fd], [], [], 0.2)
        if not ready:
            return b""
        try:
            data = os.read(self.read_fd, size)
        except OSError:  # a pty master reads EIO while nobody has the other side open: same as no input
            time.sleep(0.2)
            return b""
        if not data:
            raise EOFError("console input closed")
        return data

    def write(self, data: bytes) -> int:
        return write_fd(self.write_fd, data)

    def close(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.read_fd, termios.TCSADRAIN, self._saved)  # type: ignore[arg-type]


WRITE_POLL_S = 0.2
WRITE_STALL_S = 2.0  # a terminal that takes no byte for this long of our waiting on it is not reading
WRITE_CHUNK = 512  # bytes a write; a blocking descriptor (the terminal, stdio) then blocks no longer than that takes


def write_fd(fd: int, data: bytes, stall_s: float = WRITE_STALL_S) -> int:
    """Write `data` to `fd` and return how many bytes went out; fewer only when the other end took nothing for
    `stall_s` while we waited on it. That wait is counted in select() timeouts, not by the clock: a writer thread that
    was not run for seconds (the GIL held by a model loading, a starved guest) must not take its own stall for a
    terminal that stopped reading. pyserial's write_timeout does: it raised after the whole /status had gone out, the
    console dropped the prompt that followed, and a program waiting for `llmos> ` waited forever."""
    view = memoryview(data)
    waited = 0.0
    while view and waited < stall_s:
        _, ready, _ = select.select([], [fd], [], WRITE_POLL_S)
        try:
            n = os.write(fd, view[:WRITE_CHUNK]) if ready else 0
        except (BlockingIOError, InterruptedError):
            n = 0
        if n:
            view, waited = view[n:], 0.0
        else:
            if ready:  # writable, yet it took nothing: do not spin on it
                time.sleep(WRITE_POLL_S)
            waited += WRITE_POLL_S
    return len(data) - len(view)


def port_fd(port: Port) -> int | None:
    """The pyserial port's descriptor to write to directly (write_fd), or None: an FdPort's own write is write_fd
    already, and a port that frames its own bytes (rfc2217://, loop://) keeps pyserial's write and its timeout."""
    if isinstance(port, (serial.serialposix.Serial, protocol_socket.Serial)) and port.is_open:
        return int(port.fileno())
    return None


KERNEL = "kernel"  # console.device: the UART the kernel's own console is on


def kernel_console(sys_root: Path = Path("/sys")) -> str:
    """The serial port under /dev/console: the kernel lists its consoles in /sys/class/tty/console/active, the one
    /dev/console writes to last (the last console= of the command line). Virtual terminals (tty0...) are not serial
    ports and are passed over. So one image finds its UART on every board: ttyS0 on a PC, ttyAMA0 on QEMU's arm64
    virt machine, the Raspberry Pi's GPIO UART; the boot loader's command line says which."""
    path = sys_root / "class/tty/console/active"
    try:
        names = path.read_text().split()
    except OSError as e:
        raise UserError(
            f"console.device is {KERNEL}, but the kernel's consoles are unknown ({path}: {e.strerror})",
            "set console.device to the UART itself, e.g. /dev/ttyS0",
        ) from None
    uarts = [n for n in names if not re.fullmatch(r"tty\d+", n)]
    if not uarts:
        raise UserError(
            f"console.device is {KERNEL}, but the kernel's console is on no serial port ({' '.join(names) or 'none'})",
            "add console=ttyS0,115200 (your UART) to the kernel command line, or set console.device to it",
        )
    return f"/dev/{uarts[-1]}"


def open_port(device: str, baud: int) -> Port:
    """Open the configured console device. `stdio` is the terminal; `kernel` the UART of the kernel's console
    (kernel_console); anything else goes through pyserial (a device path, a pty path, or a URL such as
    socket://127.0.0.1:4321)."""
    if device == "stdio":
        return FdPort(0, 1, raw=True)
    if device == KERNEL:
        device = kernel_console()
    try:
        # write_timeout: for the ports port_fd leaves to pyserial; with nobody reading, writes would block the
        # answer (and so the engine) forever. A device, pty or socket:// port is written by write_fd instead.
        return serial.serial_for_url(device, baudrate=baud, timeout=0.2, write_timeout=2)  # type: ignore[no-any-return]
    except (serial.SerialException, OSError, ValueError) as e:
        raise UserError(
            f"cannot open the console device {device}: {e}",
            "check console.device (a UART like /dev/ttyS0, kernel, a pty, socket://host:port, or none)",
        ) from None


class LineReader:
    """Turns raw bytes into complete lines, with line editing and the dropping of bad input.

    `feed` returns events: ("line", text) | ("interrupt", "") | ("drop", reason) | ("echo", bytes).
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.buf = bytearray()
        self.overflow = False
        self.controls = 0
        self.escape = 0  # 0: none, 1: after ESC, 2: inside a CSI sequence
        self.last_cr = False

    def feed(self, data: bytes) -> list[tuple[str, object]]:
        events: list[tuple[str, object]] = []
        echo = bytearray()

        def flush_echo() -> None:
            if echo:
                events.append(("echo", bytes(echo)))
                echo.clear()

        for b in data:
            was_cr, self.last_cr = self.last_cr, b == CR
            if self.escape == 1:  # ESC x, or the start of ESC [ ...
                self.escape = 2 if b == ord("[") else 0
                continue
            if self.escape == 2:  # arrow keys and friends: swallow until the final byte
                if 0x40 <= b <= 0x7E:
                    self.escape = 0
                continue
            if b == ESC:
                self.escape = 1
                continue
            if b == LF and was_cr:
                continue  # CR LF is one line end
            if b in (CR, LF):
                flush_echo()
                events.append(self._end_line())
                continue
            if b == CTRL_C:
                flush_echo()
                self._reset()
                events.append(("interrupt", ""))
                continue
            if b == CTRL_D and not self.buf:
                flush_echo()
                events.append(("eof", ""))
                continue
            if b in (BS, DEL):
                if self.buf and not self.overflow:
                    while len(self.buf) > 1 and (self.buf[-1] & 0xC0) == 0x80:  # continuation bytes first,
                        del self.buf[-1]
                    del self.buf[-1]  # then the lead byte: one whole UTF-8 character
                    echo += b"\b \b"
                continue
            if b == CTRL_U:
                echo += b"\b \b" * len(self.buf.decode("utf-8", "replace"))
                self.buf.clear()
                continue
            if b == TAB:
                b = 0x20
            if b < 0x20:
                self.controls += 1
                continue
            if len(self.buf) >= self.max_line:
                self.overflow = True
                continue
            self.buf.append(b)
            echo.append(b)
        flush_echo()
        return events

    def _reset(self) -> None:
        self.buf.clear()
        self.overflow = False
        self.controls = 0

    def _end_line(self) -> tuple[str, object]:
        raw, overflow, controls = bytes(self.buf), self.overflow, self.controls
        self._reset()
        if overflow:
            return ("drop", f"line longer than {self.max_line} bytes; dropped")
        if controls:
            return ("drop", f"line held {controls} control byte(s); dropped")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return ("drop", "line is not valid UTF-8; dropped (type plain text)")
        return ("line", text.strip())


class Console:
    """One console session on one port. Runs in its own thread; survives a lost device by reopening it."""

    def __init__(
        self,
        device: str,
        baud: int,
        max_line: int,
        echo: bool,
        scheduler: Scheduler,
        status: Callable[[], Status],
        logs: Callable[[int], list[str]],
        max_tokens: int,
        port: Port | None = None,
        on_eof: Callable[[], None] | None = None,
        model: Callable[[str, Callable[[str], None]], list[str]] | None = None,
        loading: Callable[[], str] = lambda: "",
        teaching: Teaching | None = None,
        memory: Memory | None = None,
        request_reset: Callable[[], str] | None = None,
        request_update: Callable[[str], str] | None = None,
        hotplug: bool = False,
    ) -> None:
        # A port that comes and goes with its peer (console.also: a USB serial gadget's, which exists only on a board
        # with a USB device controller) is waited for with an info line, not an error at every boot; and it stays
        # silent until the peer types: a host's tty echoes what arrives before its terminal program has set it raw,
        # and a banner sent into it came back as a question (seen with a USB gadget in QEMU).
        self.hotplug = hotplug
        self.request_update = request_update  # `/update PATH`: asks for the update, returns what happens next
        self.teaching, self.memory = teaching, memory  # learning (issue 15): /teach, /forget, /taught, /memory
        self.model = model  # `/model ...`: the supervisor's model_command
        # `/factory-reset`, once confirmed: asks for the reset and returns what happens next
        self.request_reset = request_reset
        self._confirming = False  # the next line answers /factory-reset's question
        # "" once a model answers; else what is happening ("loading default, 12 s"): the banner and prompt say it
        self.loading = loading
        self.device, self.baud, self.echo = device, baud, echo
        self.on_eof = on_eof  # Ctrl-D at an empty prompt: only a terminal session may end the supervisor
        self.max_line = max_line
        self.scheduler = scheduler
        self.status, self.logs = status, logs
        self.max_tokens = max_tokens
        self.port = port
        self._wlock = threading.Lock()
        self._stop = threading.Event()
        self.active: Request | None = None
        self.op: threading.Thread | None = None  # a /model command running (installs take a while)
        self._busy_noticed = False
        self._last_notice = 0.0
        self._suppressed = 0
        self.state = "starting"  # for /status: connected | waiting for DEVICE | ...
        self._out: queue.Queue[bytes] = queue.Queue(OUTPUT_QUEUE)
        self._dropped = 0  # bytes of output dropped because the other end stopped reading
        self.machine: Session | None = None  # machine mode (/json): the program's session
        self._thread = threading.Thread(target=self._run, name=f"console {device}", daemon=True)
        self._writer = threading.Thread(target=self._write_out, name=f"console-writer {device}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._writer.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and self._writer.is_alive()

    def restart(self) -> None:
        """The supervisor's remedy for a console thread that died: start the dead thread(s) again."""
        if not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=f"console {self.device}", daemon=True)
            self._thread.start()
        if not self._writer.is_alive():
            self._writer = threading.Thread(target=self._write_out, name=f"console-writer {self.device}", daemon=True)
            self._writer.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        self._writer.join(max(0.0, deadline - time.monotonic()))
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self.port is not None:
            try:
                self.port.close()
            except Exception:
                pass

    # -- output --------------------------------------------------------------------------------------------
    def write(self, text: str) -> None:
        """Never blocks: the writer thread sends it. A terminal that stops reading (a cable unplugged at the other
        end, a terminal closed) costs dropped output, never the console, and never stalls an answer's tokens."""
        self._enqueue(text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8", "replace"))

    def _enqueue(self, data: bytes) -> None:
        try:
            self._out.put_nowait(data)
        except queue.Full:
            self._dropped += len(data)

    def flush(self, timeout: float = 2.0) -> None:
        """Wait until what was written has been sent (or dropped)."""
        deadline = time.monotonic() + timeout
        while self._out.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _write_out(self) -> None:
        while not (self._stop.is_set() and self._out.empty()):
            try:
                data = self._out.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._send(data)
            except Exception:  # a bug here must cost output, never the writer
                log.exception("console output")
            finally:
                self._out.task_done()

    def _send(self, data: bytes) -> None:
        with self._wlock:
            port = self.port
        if port is None:
            self._dropped += len(data)
            return
        if self._dropped:
            if self.machine is not None:
                note = self._event_bytes(
                    protocol.error(
                        f"{self._dropped} bytes of output were dropped: the other end was not reading",
                        "read the port continuously; events of requests in flight may be missing",
                    )
                )
            else:
                note = f"\r\n[{self._dropped} bytes of output dropped: the terminal was not reading]\r\n".encode()
            self._dropped = 0
            data = note + data
        fd = port_fd(port)
        try:
            written = write_fd(fd, data) if fd is not None else port.write(data)
            failure = "" if written is None or written == len(data) else f"it took nothing for {WRITE_STALL_S:.0f} s"
        except (serial.SerialTimeoutException, serial.SerialException, OSError) as e:
            written, failure = 0, str(e) or type(e).__name__
        if failure:
            self._dropped += len(data) - (written or 0)
            log.warning("console write failed (%s); output is dropped until the terminal reads again", failure)
            # Whatever is queued meanwhile would only stall too: drop it now, count it, and say so later.
            while True:
                try:
                    self._dropped += len(self._out.get_nowait())
                    self._out.task_done()
                except queue.Empty:
                    break

    @staticmethod
    def _event_bytes(event: Event) -> bytes:
        # CR LF: JSON ignores the CR, and a person who typed /json into a terminal still sees one event a line.
        return (protocol.encode(event) + "\r\n").encode("utf-8", "replace")

    def send_event(self, event: Event) -> None:
        """Machine mode's output: one event a line, through the same never-blocking queue as the human's."""
        self._enqueue(self._event_bytes(event))

    def announce_shutdown(self) -> None:
        if self.machine is not None:
            self.send_event(protocol.shutdown())
        else:
            self.write("\n[llmos-edge is shutting down]\n")

    def prompt(self) -> str:
        """`llmos> `, or while the model loads a line `[loading default, 12 s]` above it (questions wait meanwhile).
        The prompt itself stays `llmos> ` at the start of a line: programs that drive the console wait for that."""
        loading = self.loading()
        return f"[{loading}]\n{PROMPT}" if loading else PROMPT

    def _notice(self, text: str) -> None:
        """Rate-limited: a burst of line noise gets one notice a second, with a count of what else was dropped."""
        now = time.monotonic()
        if now - self._last_notice < 1.0:
            self._suppressed += 1
            return
        more = f" (and {self._suppressed} more)" if self._suppressed else ""
        self._suppressed = 0
        self._last_notice = now
        self.write(f"\n[{text}{more}]\n")
        if self.active is None:
            self.write(self.prompt())

    # -- input ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        reader = LineReader(self.max_line)
        failed = ""  # the last error opening the device: logged once, and again only when it changes
        while not self._stop.is_set():
            if self.port is None:
                try:
                    self.port = open_port(self.device, self.baud)
                except UserError as e:
                    if str(e) != failed:
                        (log.info if self.hotplug else log.error)("%s; retrying every 2 s", e)
                        failed = str(e)
                    self.state = f"waiting for {self.device}"
                    self._stop.wait(2)
                    continue
                failed = ""
                self.state = "connected"
                log.info("console on %s", getattr(self.port, "port", None) or self.device)
                if self.machine is not None:  # a reopened port in machine mode: say which mode it is in
                    self.send_event(protocol.mode("json"))
                elif not self.hotplug:  # a hotplug port's first word is the prompt its peer's Enter gets
                    self.write(self._banner())
            try:
                data = self.port.read(512)
            except (serial.SerialException, OSError, EOFError) as e:
                # a hotplug port goes when its peer does (a USB cable pulled): news, not an error
                (log.info if self.hotplug else log.error)("console device %s lost (%s); reopening", self.device, e)
                self._close_port()
                self._stop.wait(1)
                continue
            for kind, value in reader.feed(data) if data else []:
                try:
                    self._handle(kind, value)
                except Exception as e:  # one bad line must never end the console (the peer would get silence)
                    log.exception("console: handling %s", kind)
                    if self.machine is not None:
                        self.send_event(protocol.error(f"internal error: {type(e).__name__}: {e}", "see the log"))
                    else:
                        self.write(f"\nerror: internal error: {type(e).__name__}: {e}\n{self.prompt()}")

    def _banner(self) -> str:
        loading = self.loading()
        if loading:
            return (
                f"\nllmos-edge is starting: {loading}. Questions typed now wait until it answers."
                f" Type /help for commands.\n{self.prompt()}"
            )
        return f"\nllmos-edge ready. Type /help for commands.\n{PROMPT}"

    def _close_port(self) -> None:
        with self._wlock:
            port, self.port = self.port, None
        if port is not None:
            try:
                port.close()
            except Exception:
                pass

    def _handle(self, kind: str, value: object) -> None:
        if self.machine is not None:
            self._machine(kind, value)
        elif kind == "echo":
            if self.echo and self.active is None:
                self._enqueue(bytes(value))  # type: ignore[call-overload]
        elif kind == "interrupt":
            if self.active is not None:
                self.active.cancel()
            else:
                self.write(f"^C\n{self.prompt()}")
        elif kind == "eof":
            if self.on_eof is not None and self.active is None:
                self.write("\n")
                self.on_eof()
        elif kind == "drop":
            self._notice(str(value))
        elif kind == "line":
            self._line(str(value))

    def _line(self, line: str) -> None:
        if self.op is not None and self.op.is_alive():
            self._notice("busy: a /model command is running; its result comes next")
            return
        if self.active is not None:
            if line == "/cancel":
                self.active.cancel()
            elif not self._busy_noticed:  # one notice per answer, however much is typed meanwhile
                self._busy_noticed = True
                self._notice("busy: an answer is streaming; Ctrl-C or /cancel stops it")
            return
        self.write("\n")
        if self._confirming:
            self._confirm_factory_reset(line)
        elif not line:
            self.write(self.prompt())
        elif line.startswith("/"):
            self._command(line)
        else:
            self._ask(line)

    def _command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        if name == "/help":
            self.write(HELP + "\n")
        elif name == "/status":
            self.write("\n".join(status_lines(self.status())) + "\n")
        elif name == "/logs":
            try:
                n = int(arg) if arg.strip() else 5
                if not 1 <= n <= 1000:
                    raise ValueError
            except ValueError:
                self.write("error: /logs takes a number from 1 to 1000, e.g. /logs 10\n")
            else:
                self.write("\n".join(self.logs(n) or ["(no requests yet)"]) + "\n")
        elif name == "/cancel":
            self.write("nothing to cancel\n")
        elif name == "/json":
            self._enter_machine_mode()
            return
        elif name == "/human":
            self.write("already in human mode\n")
        elif name in ("/teach", "/forget", "/taught", "/memory") and self.teaching is not None:
            try:
                self.write("\n".join(self._learning(name, arg)) + "\n")
            except UserError as e:
                self.write(f"error: {e.message}" + (f" (hint: {e.hint})" if e.hint else "") + "\n")
        elif name == "/model" and self.model is not None:
            self._model(arg)
            return
        elif name == "/consolidate" and self.model is not None:
            self._model(f"consolidate {arg}".strip())  # the supervisor's model_command runs the job's command
            return
        elif name == "/update" and self.request_update is not None:
            try:
                self.write(self.request_update(arg) + "\n")
            except UserError as e:
                self.write(f"error: {e.message}" + (f" (hint: {e.hint})" if e.hint else "") + "\n")
        elif name == "/factory-reset" and self.request_reset is not None:
            self._confirming = True
            self.write(factory_reset.WARNING + "\n")
        else:
            self.write(f"error: unknown command {name}; type /help for the list\n")
        self.write(self.prompt())

    def _learning(self, name: str, arg: str) -> list[str]:
        teaching, memory = self.teaching, self.memory
        assert teaching is not None and memory is not None
        if name == "/teach":
            pair, replaced = teaching.teach(*parse_teach(arg), "console")
            again = "; it replaces the earlier answer" if replaced else ""
            return [f"taught #{pair.id}: {pair.question!r} => {pair.answer!r}{again}"]
        if name == "/forget":
            pair = teaching.forget(arg)
            return [f"forgot #{pair.id}: {pair.question!r} => {pair.answer!r}"]
        if name == "/taught":
            pairs = teaching.pairs(arg)
            if not pairs:
                return [f"(no taught pair matches {arg.strip()!r})" if arg.strip() else "(nothing taught yet)"]
            return [p.describe() for p in pairs]
        action, _, which = arg.strip().partition(" ")
        if not action:
            return [memory.describe()]
        if action != "forget":
            raise UserError(f"unknown memory command {action!r}", "/memory shows it; /memory forget [SOURCE|all]")
        what, n = memory.forget_source(which, "console")
        return [f"forgot {n} turns of {what}"]

    def _confirm_factory_reset(self, line: str) -> None:
        """The line after /factory-reset: exactly the confirmation word erases, anything else cancels."""
        self._confirming = False
        assert self.request_reset is not None
        if line != factory_reset.CONFIRMATION:
            self.write(f"factory reset cancelled (it needs {factory_reset.CONFIRMATION} typed exactly)\n")
        else:
            try:
                self.write(self.request_reset() + "\n")
            except UserError as e:
                self.write(f"error: {e.message}" + (f" (hint: {e.hint})" if e.hint else "") + "\n")
        self.write(self.prompt())

    # -- machine mode ----------------------------------------------------------------------------------------
    def _enter_machine_mode(self) -> None:
        self.machine = Session(
            self.scheduler,
            self.send_event,
            self.status,
            max_tokens=self.max_tokens,
            source="console",
            priority="interactive",
            model=self.model,
            teaching=self.teaching,
            memory=self.memory,
        )
        log.info("console: machine mode")
        self.send_event(protocol.mode("json"))

    def _leave_machine_mode(self) -> None:
        """Requests still in flight are cancelled and their done events sent first: after the mode event, the
        port is the person's again."""
        session = self.machine
        assert session is not None
        session.close(LEAVE_S)
        self.machine = None
        log.info("console: human mode")
        self.send_event(protocol.mode("human"))
        self.write(self.prompt())

    def _machine(self, kind: str, value: object) -> None:
        """Machine mode's input: every line is answered (a request's events, or one error event); no echo."""
        session = self.machine
        assert session is not None
        if kind == "line":
            line = str(value)
            if line == "/human":
                self._leave_machine_mode()
            elif line == "/json":  # a program that does not know the mode sends /json first: say it again
                self.send_event(protocol.mode("json"))
            elif line and session.handle_line(line):
                self._leave_machine_mode()
        elif kind == "drop":  # the reader's reason, e.g. "line longer than 512 bytes; dropped"
            self.send_event(
                protocol.error(
                    f"the line was dropped: {str(value).split(';')[0]}",
                    f"send one JSON object per line: UTF-8, no control bytes, at most {self.max_line} bytes",
                )
            )
        elif kind in ("interrupt", "eof"):
            key = "Ctrl-C" if kind == "interrupt" else "Ctrl-D"
            self.send_event(
                protocol.error(
                    f"{key} does nothing in machine mode",
                    'stop a request with {"op": "cancel", "id": ID}; leave machine mode with /human',
                )
            )

    def _model(self, arg: str) -> None:
        """In its own thread: an install copies, loads and gates a model, which takes a while; the console meanwhile
        keeps reading (and says busy) instead of stalling."""
        model = self.model
        assert model is not None

        def run() -> None:
            try:
                lines = model(arg, lambda m: self.write(f"[{m}]\n"))
                self.write("\n".join(lines or ["(no models)"]) + "\n")
            except UserError as e:
                self.write(f"error: {e.message}" + (f" (hint: {e.hint})" if e.hint else "") + "\n")
            except Exception as e:  # a bug must cost this command, never the console
                log.exception("/model %s", arg)
                self.write(f"error: /model failed: {type(e).__name__}: {e}\n")
            self.write(self.prompt())

        self.op = threading.Thread(target=run, name="console-model", daemon=True)
        self.op.start()

    def _ask(self, question: str) -> None:
        self._busy_noticed = False
        req = Request(
            prompt=question,
            source="console",
            priority="interactive",
            max_tokens=self.max_tokens,
            on_token=lambda text: self.write(text.translate(_UNPRINTABLE)),
            on_done=self._done,
        )
        self.active = req
        try:
            self.scheduler.submit(req)
        except Refused:
            pass  # _done has already been called with the refusal

    def _done(self, result: Result) -> None:
        if result.outcome == "ok":
            self.write("\n")
        elif result.outcome == "cancelled":
            self.write(" ^C\n[cancelled]\n")
        else:
            self.write(f"\nerror: {result.error}\n")
        self.active = None
        self.write(self.prompt())
