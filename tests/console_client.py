"""Drive the llmos console as a person would, over any transport: a pty master (host tests) or a pyserial URL
(socket://127.0.0.1:N for QEMU's UART, /dev/ttyUSB0 for a real board). Shared by host and image tests."""

from __future__ import annotations

import re
import time
from typing import Protocol

PROMPT = b"llmos> "


class Transport(Protocol):
    def read(self, size: int) -> bytes: ...
    def write(self, data: bytes) -> int | None: ...


class ConsoleClient:
    def __init__(self, port: Transport) -> None:
        self.port = port
        self.buf = bytearray()
        self.transcript = bytearray()  # everything read, for failure messages

    def read_until(self, marker: bytes, timeout: float) -> bytes:
        """Return everything up to and including `marker`; raise TimeoutError with what was seen."""
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {marker!r} within {timeout} s; last output: {bytes(self.transcript[-600:])!r}")
            chunk = self.port.read(4096)
            if chunk:
                self.buf += chunk
                self.transcript += chunk
        end = self.buf.index(marker) + len(marker)
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    def drain(self, quiet: float = 0.5, timeout: float = 10.0) -> bytes:
        """Read until nothing arrives for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() - last < quiet and time.monotonic() < deadline:
            chunk = self.port.read(4096)
            if chunk:
                self.buf += chunk
                self.transcript += chunk
                last = time.monotonic()
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def send(self, text: str | bytes) -> None:
        self.port.write(text.encode() if isinstance(text, str) else text)

    def command(self, line: str, timeout: float = 30.0) -> str:
        """Type a line and Enter; return what it printed before the next prompt (without the echoed line)."""
        self.send(line + "\r")
        raw = self.read_until(PROMPT, timeout)[: -len(PROMPT)].decode("utf-8", "replace")
        text = raw.replace("\r\n", "\n")
        echo, _, rest = text.partition("\n")
        if line not in echo:  # no echo line (echo off): the whole text is the reply
            rest = text
        return rest.strip("\n")

    def ask(self, question: str, timeout: float = 30.0) -> str:
        return self.command(question, timeout).strip()

    def status(self) -> dict[str, str]:
        out = self.command("/status")
        return dict(re.findall(r"^([\w -]+): (.*)$", out, flags=re.M))
