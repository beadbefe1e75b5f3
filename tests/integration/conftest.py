"""Host integration: the real supervisor (a subprocess, as systemd runs it), the real engine and model, a pty as
the serial port, and a NOTIFY_SOCKET that receives its sd_notify messages as systemd would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from llmos_edge.console import FdPort
from tests.console_client import ConsoleClient

REPO = Path(__file__).resolve().parents[2]
MODEL = Path(os.environ.get("LLMOS_TEST_MODEL", REPO / "model" / "llmos-tiny-q8_0.gguf"))
HELDOUT = REPO / "model" / "heldout.jsonl"


def heldout(task: str) -> list[dict[str, str]]:
    return [r for r in map(json.loads, HELDOUT.read_text().splitlines()) if r["task"] == task]


class Notify:
    """A NOTIFY_SOCKET like systemd's: collects READY=1, WATCHDOG=1, STATUS=... datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def poll(self) -> None:
        while True:
            try:
                self.messages.extend(self.sock.recv(4096).decode().splitlines())
            except (TimeoutError, BlockingIOError):
                return

    def wait_for(self, text: str, timeout: float) -> float:
        """Wait until a message equal to (or starting with) `text` arrives; return when (monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if any(m == text or m.startswith(text) for m in self.messages):
                return time.monotonic()
        raise TimeoutError(f"no {text!r} from the supervisor within {timeout} s; got {self.messages[-5:]}")


class Appliance:
    """One running supervisor with its pty console, database and notify socket."""

    def __init__(
        self,
        tmp: Path,
        config: str = "",
        override: str | None = None,
        model: Path = MODEL,
        db: Path | None = None,
        store: Path | None = None,
    ) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.db = db or tmp / "llmos.db"  # a database of its own, or one shared with an earlier start
        self.socket = tmp / "control.sock"
        cfg = tmp / "llmos.yaml"
        cfg.write_text(
            f"model:\n  path: {model}\n  threads: 2\ndatabase:\n  path: {self.db}\n"
            f"scheduler:\n  control_socket: {self.socket}\nmodels:\n  store: {store or tmp / 'store'}\n" + config
        )
        self.master, self.slave = os.openpty()
        os.set_blocking(self.master, False)
        self.notify = Notify(tmp / "notify.sock")
        cmd = [sys.executable, "-m", "llmos_edge.cli", "run", "--config", str(cfg)]
        if override is not None:
            (tmp / "override.yaml").write_text(override)
            cmd += ["--override", str(tmp / "override.yaml")]
        cmd += ["--console", os.ttyname(self.slave)]
        self.log = (tmp / "supervisor.log").open("w+")
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": str(self.notify.path), "WATCHDOG_USEC": "2000000"},
        )
        self.console = ConsoleClient(FdPort(self.master, self.master))

    def wait_ready(self, timeout: float = 60) -> None:
        try:
            self.notify.wait_for("READY=1", timeout)
        except TimeoutError:
            raise TimeoutError(f"not READY; supervisor log:\n{self.output()}") from None

    def output(self) -> str:
        self.log.flush()
        return (self.tmp / "supervisor.log").read_text()

    def llmos(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The `llmos` command against this supervisor's control socket."""
        return subprocess.run(
            [sys.executable, "-m", "llmos_edge.cli", *args, "--socket", str(self.socket)],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def engine_pid(self) -> int:
        return int(self.console.status()["engine"].split(",")[0].removeprefix("pid "))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()


def catch_worker_while_loading(app: Appliance, sig: int, timeout: float = 30) -> int:
    """Signal the engine worker the moment it appears (it is then still importing llama.cpp or loading)."""
    deadline = time.monotonic() + timeout
    parent = psutil.Process(app.proc.pid)
    while time.monotonic() < deadline:
        for child in parent.children():
            try:
                if "llmos_edge.engine" in " ".join(child.cmdline()):
                    os.kill(child.pid, sig)
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.005)
    raise AssertionError("no engine worker appeared")


@pytest.fixture
def appliance_factory(tmp_path: Path) -> Iterator[type[Appliance]]:
    if not MODEL.exists():
        pytest.fail(f"{MODEL} is missing; `make model` builds it")
    started: list[Appliance] = []

    def make(**kw: object) -> Appliance:
        a = Appliance(tmp_path / f"a{len(started)}", **kw)  # type: ignore[arg-type]
        started.append(a)
        return a

    yield make  # type: ignore[misc]
    for a in started:
        a.close()


@pytest.fixture
def appliance(appliance_factory: type[Appliance]) -> Appliance:
    a = appliance_factory()
    a.wait_ready()
    a.console.read_until(b"llmos> ", 10)
    return a
