"""The service's network sandbox follows http.*: none unless HTTP is on, localhost only for a loopback listener."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llmos_edge.config import Config, load_file
from llmos_edge.netpolicy import DROPIN_NAME, apply, dropin


def config(tmp: Path, text: str) -> Config:
    f = tmp / "llmos.yaml"
    f.write_text(text)
    return load_file(str(f))


def test_no_http_keeps_the_shipped_no_network_sandbox(tmp_path: Path) -> None:
    assert dropin(Config()) is None
    d = tmp_path / "llmos.service.d"
    d.mkdir()
    (d / DROPIN_NAME).write_text("stale from an earlier start\n")
    assert "removed" in apply(Config(), d, reload=False)
    assert not (d / DROPIN_NAME).exists()
    assert "unchanged" in apply(Config(), d, reload=False)


def test_a_loopback_listener_gets_the_network_but_only_localhost(tmp_path: Path) -> None:
    text = dropin(config(tmp_path, "http:\n  enabled: true\n  listen: 127.0.0.1:8080\n"))
    assert text is not None
    lines = text.splitlines()
    assert "PrivateNetwork=no" in lines and "IPAddressAllow=localhost" in lines
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in lines
    assert "IPAddressDeny=" not in lines  # the unit's IPAddressDeny=any still holds for everyone else


def test_listening_beyond_loopback_opens_addresses_and_the_file_is_rewritten_only_on_change(tmp_path: Path) -> None:
    cfg = config(tmp_path, "http:\n  enabled: true\n  listen: 0.0.0.0:8080\n  token: secret\n")
    text = dropin(cfg)
    assert text is not None and "IPAddressDeny=" in text.splitlines() and "IPAddressAllow" not in text
    d = tmp_path / "run" / "llmos.service.d"
    assert "opened for HTTP on 0.0.0.0:8080" in apply(cfg, d, reload=False)
    assert (d / DROPIN_NAME).read_text() == text
    assert "unchanged" in apply(cfg, d, reload=False)


def test_net_setup_reads_the_layers_the_supervisor_runs(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(f"database:\n  path: {tmp_path / 'llmos.db'}\n")
    override = tmp_path / "override.yaml"
    override.write_text("http:\n  enabled: true\n")
    d = tmp_path / "dropins"
    cmd = [sys.executable, "-m", "llmos_edge.cli", "net-setup", "--config", str(base), "--override", str(override)]
    out = subprocess.run([*cmd, "--dir", str(d), "--no-reload"], capture_output=True, text=True, check=True)
    assert "opened for HTTP on 127.0.0.1:8080" in out.stdout
    # A broken override is skipped, as `llmos run` skips it: the sandbox closes again.
    override.write_text("http:\n  enabled: maybe\n")
    out = subprocess.run([*cmd, "--dir", str(d), "--no-reload"], capture_output=True, text=True, check=True)
    assert "drop-in removed" in out.stdout and not (d / DROPIN_NAME).exists()
