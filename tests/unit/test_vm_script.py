"""image/vm.py's scripted console (how CI runs `make run`), against a console on the other end of a socket that
behaves like the product's: nothing is read while it boots or answers, and each answer ends with a fresh prompt."""

from __future__ import annotations

import io
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "image"))

import vm


class SlowConsole(threading.Thread):
    """Boots for a while (printing firmware noise), shows the prompt, then answers each line slowly, in pieces.
    Records every byte that arrived while it was not at a prompt: a script must not type then."""

    def __init__(
        self, sock: socket.socket, answers: dict[str, str | None], boot_s: float = 0.3, loading: int = 2
    ) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.answers = answers
        self.boot_s = boot_s
        self.loading = loading  # /status says `state: starting` this many times, then `state: ready`
        self.lines: list[str] = []
        self.typed_while_busy = b""

    def _busy(self, seconds: float) -> None:
        """Not reading from the port; anything typed meanwhile is noted."""
        time.sleep(seconds)
        self.sock.setblocking(False)
        try:
            self.typed_while_busy += self.sock.recv(4096)
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def run(self) -> None:
        self.sock.sendall(b"BdsDxe: starting Boot0001\r\n")
        self._busy(self.boot_s)
        self.sock.sendall(b"\r\nllmos-edge ready. Type /help for commands.\r\nllmos> ")
        line = b""
        while True:
            data = self.sock.recv(1)
            if not data:
                return
            if data != b"\r":
                line += data
                self.sock.sendall(data)  # echo
                continue
            text, line = line.decode(), b""
            self.lines.append(text)
            self.sock.sendall(b"\r\n")
            if text == "/status":
                self.loading -= 1
                answer = "state: starting" if self.loading >= 0 else "state: ready"
            else:
                answer = self.answers.get(text, "error: unknown")
            if answer is None:  # hangs: no answer, no prompt
                continue
            for piece in answer.split(" "):
                self.sock.sendall(piece.encode() + b" ")
                self._busy(0.05)
            self.sock.sendall(b"\r\nllmos> ")


def test_each_line_is_typed_at_a_prompt_once_the_model_answers_and_everything_is_copied_out() -> None:
    host, guest = socket.socketpair()
    console = SlowConsole(guest, {"ping": "pong"}, loading=2)
    console.start()
    out = io.BytesIO()
    script = vm.ConsoleScript(host, out)
    n = script.play(iter(["ping", "/help", "ping"]), boot_timeout=30, answer_timeout=10, poll_s=0.1)
    assert n == 3
    assert console.lines == ["/status", "/status", "/status", "ping", "/help", "ping"]
    assert console.typed_while_busy == b""
    text = out.getvalue().decode()
    assert text.startswith("BdsDxe") and text.count("pong") == 2 and text.count("state: starting") == 2
    host.close()  # the console sees the end of the stream and stops
    console.join(5)
    guest.close()


def test_no_prompt_ends_the_script_with_one_line_saying_so() -> None:
    host, guest = socket.socketpair()
    guest.sendall(b"BdsDxe: starting Boot0001\r\n")  # and then nothing: a guest stuck at boot
    with pytest.raises(vm.ScriptError, match=r"^no 'llmos> ' prompt within 0 s$"):
        vm.ConsoleScript(host, io.BytesIO()).play(iter(["ping"]), boot_timeout=0.3, answer_timeout=10)
    host.close()
    guest.close()


def test_an_answer_that_never_ends_is_reported() -> None:
    host, guest = socket.socketpair()
    console = SlowConsole(guest, {"ping": None}, boot_s=0, loading=0)
    console.start()
    with pytest.raises(vm.ScriptError, match=r"^no answer to 'ping' within 0 s$"):
        vm.ConsoleScript(host, io.BytesIO()).play(iter(["ping"]), boot_timeout=5, answer_timeout=0.3)
    host.close()
    console.join(5)
    guest.close()


def test_a_model_that_never_comes_up_is_reported_with_its_state() -> None:
    host, guest = socket.socketpair()
    console = SlowConsole(guest, {}, boot_s=0, loading=1000)
    console.start()
    with pytest.raises(vm.ScriptError, match=r"^the model did not come up within 1 s \(/status: state: starting\)$"):
        vm.ConsoleScript(host, io.BytesIO()).play(iter(["ping"]), boot_timeout=1, answer_timeout=5, poll_s=0.1)
    host.close()
    console.join(5)
    guest.close()


def test_a_console_that_closes_is_reported() -> None:
    host, guest = socket.socketpair()
    guest.sendall(b"BdsDxe")
    guest.close()  # QEMU exited
    with pytest.raises(vm.ScriptError, match=r"^the console closed \(QEMU exited\) before the 'llmos> ' prompt$"):
        vm.ConsoleScript(host, io.BytesIO()).play(iter([]), boot_timeout=5, answer_timeout=5)
    host.close()


def test_script_lines_are_read_one_by_one_without_line_ends() -> None:
    assert list(vm.script_lines(io.BytesIO(b"ping\r\n/status\n\nlast"))) == ["ping", "/status", "", "last"]
    assert list(vm.script_lines(None)) == []
