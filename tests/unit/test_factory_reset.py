"""Factory reset's first two steps (factory_reset.py): the confirmed request, and arming it as the EFI variable that
systemd-repart reads in the initrd. The third step (repart erasing var) is tested on the image
(tests/image/test_factory_reset.py)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest

from llmos_edge import cli, factory_reset
from llmos_edge.console import Console
from llmos_edge.errors import UserError
from llmos_edge.scheduler import Scheduler


def test_a_request_is_written_beside_the_database(tmp_path: Path) -> None:
    db = tmp_path / "llmos.db"
    path = factory_reset.request(db, "console")
    assert path == tmp_path / "factory-reset.request"
    assert path.read_text() == "requested by console\n"
    assert factory_reset.requested(db)


def test_a_request_into_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot write the factory reset request"):
        factory_reset.request(tmp_path / "gone" / "llmos.db", "console")


def test_arming_writes_the_efi_variable_systemd_reads_and_removes_the_request(tmp_path: Path) -> None:
    db, efivars = tmp_path / "llmos.db", tmp_path / "efivars"
    efivars.mkdir()
    factory_reset.request(db, "cli")
    line = factory_reset.arm(db, efivars)
    assert "requested by cli" in line
    value = (efivars / "FactoryReset-8cf2644b-4b0b-428f-9387-6d876050dc67").read_bytes()
    # efivarfs: attributes (non-volatile | boot service | run time, little-endian u32), then "yes" as UTF-16LE
    assert value == b"\x07\x00\x00\x00y\x00e\x00s\x00\x00\x00"
    assert not factory_reset.requested(db)


def test_arming_replaces_an_earlier_value(tmp_path: Path) -> None:
    db, efivars = tmp_path / "llmos.db", tmp_path / "efivars"
    efivars.mkdir()
    (efivars / factory_reset.EFI_VARIABLE).write_bytes(factory_reset.efi_value("no, not at all"))
    factory_reset.request(db, "cli")
    factory_reset.arm(db, efivars)
    assert (efivars / factory_reset.EFI_VARIABLE).read_bytes() == factory_reset.efi_value("yes")


def test_arming_without_a_request_refuses(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no factory reset was requested"):
        factory_reset.arm(tmp_path / "llmos.db", tmp_path)


def test_arming_without_efi_variables_says_so_and_drops_the_request(tmp_path: Path) -> None:
    """Otherwise the path unit would start the arming again and again."""
    db = tmp_path / "llmos.db"
    factory_reset.request(db, "console")
    with pytest.raises(UserError, match="no EFI variables"):
        factory_reset.arm(db, tmp_path / "no-efivars")
    assert not factory_reset.requested(db)


class ScriptedPort:
    """A console port that types the given lines, one per read, and keeps what the console writes."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = [line.encode() + b"\r" for line in lines]
        self.out = bytearray()
        self.lock = threading.Lock()

    def read(self, size: int) -> bytes:
        time.sleep(0.02)
        return self.lines.pop(0) if self.lines else b""

    def write(self, data: bytes) -> int:
        with self.lock:
            self.out += data
        return len(data)

    def close(self) -> None:
        pass

    def text(self) -> str:
        with self.lock:
            return self.out.decode()


def console_session(lines: list[str], until: str) -> tuple[str, list[str]]:
    calls: list[str] = []

    def request_reset() -> str:
        calls.append("reset")
        return "factory reset requested (test)"

    port = ScriptedPort(lines)
    sched = Scheduler(engine=None, recorder=None)  # type: ignore[arg-type]  # never started: no question is asked
    console = Console(
        "test", 115200, 512, True, sched, lambda: [], lambda _n: [], 16, port=port, request_reset=request_reset
    )
    console.start()
    deadline = time.monotonic() + 5
    while until not in port.text() and time.monotonic() < deadline:
        time.sleep(0.02)
    console.stop()
    return port.text(), calls


def test_the_console_erases_only_after_the_typed_confirmation() -> None:
    out, calls = console_session(["/factory-reset", "ERASE"], "factory reset requested (test)")
    assert "Type ERASE to erase and restart now" in out
    assert calls == ["reset"]


@pytest.mark.parametrize("answer", ["erase", "yes", "", "ERASE please"])
def test_the_console_cancels_on_anything_but_the_confirmation(answer: str) -> None:
    out, calls = console_session(["/factory-reset", answer, "/factory-reset"], "cancelled")
    assert "factory reset cancelled (it needs ERASE typed exactly)" in out
    assert calls == []


def test_the_cli_asks_for_the_confirmation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "llmos.db"
    monkeypatch.setattr("sys.stdin", io.StringIO("no\n"))
    assert cli.main(["factory-reset", "--db", str(db)]) == 1
    assert not factory_reset.requested(db)
    monkeypatch.setattr("sys.stdin", io.StringIO("ERASE\n"))
    assert cli.main(["factory-reset", "--db", str(db)]) == 0
    assert factory_reset.request_path(db).read_text() == "requested by cli\n"


def test_the_cli_arms_what_was_requested(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, efivars = tmp_path / "llmos.db", tmp_path / "efivars"
    efivars.mkdir()
    assert cli.main(["factory-reset", "--db", str(db), "--yes"]) == 0
    assert cli.main(["factory-reset", "--db", str(db), "--arm", "--efivars", str(efivars)]) == 0
    assert "factory reset armed (requested by cli)" in capsys.readouterr().out
    assert (efivars / factory_reset.EFI_VARIABLE).read_bytes() == factory_reset.efi_value("yes")
    assert cli.main(["factory-reset", "--db", str(db), "--arm", "--efivars", str(efivars)]) == 2
    assert "no factory reset was requested" in capsys.readouterr().err
