"""The console's output path on a real pty: a terminal that stops reading costs dropped output, and a writer thread
that is merely not run for a while (the GIL held by voice's models loading, a starved guest) loses nothing.

The second is the failure a CI run showed: pyserial's write_timeout measured the clock, so a stall of the writer
thread after the whole /status had gone out raised "Write timeout"; the console dropped the prompt behind it and the
test waiting for `llmos> ` waited 811 s."""

from __future__ import annotations

import os
import pty
import subprocess
import threading
import time
from pathlib import Path

import pytest

from llmos_edge.console import kernel_console, open_port, port_fd, write_fd
from llmos_edge.errors import UserError

STALL_S = 1.0


def _pty() -> tuple[int, str]:
    master, slave = pty.openpty()
    name = os.ttyname(slave)
    os.close(slave)  # the console opens it by name, as it opens /dev/ttyS0
    return master, name


def _hold_gil(seconds: float) -> float:
    """Hold the GIL for at least `seconds` in one C call (sum over a range never returns to the eval loop, so no
    other thread runs meanwhile); returns how long it held it."""
    per_million = 1.0
    for _ in range(5):  # the fastest of a few: a calibration run that was preempted would shorten the hold
        t0 = time.perf_counter()
        sum(range(10**6))
        per_million = min(per_million, max(time.perf_counter() - t0, 1e-4))
    t0 = time.perf_counter()
    sum(range(int(seconds / per_million * 1.5 * 10**6)))
    return time.perf_counter() - t0


def test_a_writer_thread_that_is_not_run_for_longer_than_the_stall_limit_still_writes_everything(
    tmp_path: Path,
) -> None:
    master, name = _pty()
    port = open_port(name, 115200)
    fd = port_fd(port)
    assert fd is not None
    payload = bytes(range(256)) * 1024  # 256 KiB: far more than a pty buffers, so the writer must wait for a reader
    result: list[int] = []
    writer = threading.Thread(target=lambda: result.append(write_fd(fd, payload, stall_s=STALL_S)))
    writer.start()
    time.sleep(STALL_S / 4)  # the writer fills the buffer and waits on select(), well inside the stall limit
    out = tmp_path / "out"
    with out.open("wb") as sink:
        reader = subprocess.Popen(["cat"], stdin=master, stdout=sink)  # drains it while this thread holds the GIL
    try:
        held = _hold_gil(3 * STALL_S)
        assert held > 2 * STALL_S  # the writer was not run for longer than its stall limit
        writer.join(30)
        assert result == [len(payload)]
        deadline = time.monotonic() + 10
        while out.stat().st_size < len(payload) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.read_bytes() == payload
    finally:
        reader.kill()
        reader.wait()
        port.close()
        os.close(master)


def test_a_terminal_that_takes_nothing_is_given_up_on_after_the_stall_limit_and_written_to_again_later() -> None:
    master, name = _pty()
    port = open_port(name, 115200)
    fd = port_fd(port)
    assert fd is not None
    try:
        t0 = time.monotonic()
        written = write_fd(fd, b"x" * (1 << 20), stall_s=STALL_S)  # nobody reads the master side
        took = time.monotonic() - t0
        assert 0 < written < 1 << 20
        assert STALL_S <= took < STALL_S + 5
        drained = 0
        while drained < written:  # the terminal reads again: what was taken is there, and new output goes out
            drained += len(os.read(master, 65536))
        assert drained == written
        assert write_fd(fd, b"llmos> ", stall_s=STALL_S) == 7
        assert os.read(master, 64) == b"llmos> "
    finally:
        port.close()
        os.close(master)


def _consoles(tmp_path: Path, active: str) -> Path:
    """A sysfs tree whose /sys/class/tty/console/active lists `active`, as the kernel writes it."""
    f = tmp_path / "class/tty/console/active"
    f.parent.mkdir(parents=True)
    f.write_text(active + "\n")
    return tmp_path


def test_the_kernel_console_is_the_last_serial_port_the_kernel_writes_its_console_to(tmp_path: Path) -> None:
    # console=tty0 console=ttyS0,115200 on a PC; console=tty0 console=ttyAMA0,115200 on QEMU's arm64 virt machine
    assert kernel_console(_consoles(tmp_path / "pc", "tty0 ttyS0")) == "/dev/ttyS0"
    assert kernel_console(_consoles(tmp_path / "virt", "tty0 ttyAMA0")) == "/dev/ttyAMA0"
    assert kernel_console(_consoles(tmp_path / "vt-last", "ttyS1 tty1")) == "/dev/ttyS1"


def test_a_kernel_console_on_no_serial_port_is_one_error_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        kernel_console(_consoles(tmp_path, "tty0"))
    assert e.value.message == "console.device is kernel, but the kernel's console is on no serial port (tty0)"
    assert "console=ttyS0,115200" in e.value.hint
    with pytest.raises(UserError, match="the kernel's consoles are unknown"):
        kernel_console(tmp_path / "no-sysfs")
