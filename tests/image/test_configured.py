"""A device configured through its writable override, booted once for every check that needs a configuration:

- the governor: QEMU has no thermal sensor (the status says so); a fake hot thermal zone given through the override
  is throttled, visibly in /status and in the log. The fake zone is a sysfs-like tree written by
  tests/fake_sysfs.py into the var partition of a copy of the disk (debugfs, no mount), with the override
  /var/lib/llmos/llmos.yaml pointing governor.sensors_root at it;
- the HTTP API: the override enables it on every interface with a token; the VM has a network card on QEMU's
  restricted user-mode network, its port 8080 forwarded to the host's loopback. The official `openai` package
  streams a chat completion from the host; /health and /metrics are read;
- systemd's watchdog (issue 5): a SIGSTOPped supervisor sends no WATCHDOG=1, so systemd kills it after WatchdogSec=
  and starts it again; the database's `starts` rows show it. The stop is done inside the guest by
  llmos-test-sigstop.service, which runs only when QEMU passes its credential over SMBIOS. The card is one whose
  version was already accepted (its UKI blessed): on a new version's first boot the health gate would rightly count
  the watchdog's restart against it and reboot (tests/image/test_update.py covers the gate).
One boot for all three: under software emulation a boot is the expensive part of an image test.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import (
    ROOT,
    SIGSTOP_CREDENTIAL,
    Boot,
    bless,
    boot,
    card,
    copy_from_var,
    esp_files,
    journal,
    measure,
    vmlib,
    wait_ready,
    write_to_var,
)

sys.path.insert(0, str(ROOT))
from tests.fake_sysfs import write_zone

TOKEN = "image-test-token-4f1c"
HTTP_PORT = vmlib.free_port()
HOT = 77.0  # above the 75 °C setpoint, below the 85 °C critical limit: throttled, still answering
SIM_ROOT = "/lib/llmos-thermal-sim"  # in the var partition, i.e. /var/lib/llmos-thermal-sim on the device
BLESSED: list[str] = []  # the card's UKI, renamed as accepted before the boot


@pytest.fixture(scope="module")
def hot_device(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Boot, Path]]:
    work = tmp_path_factory.mktemp("governor")
    disk = work / "disk.raw"
    card(image, disk)
    local = work / "tree"
    zone = write_zone(local, HOT)
    override = work / "llmos.yaml"
    override.write_text(
        f"governor:\n  sensors_root: /var{SIM_ROOT}\n  interval: 0.5\n"
        f"http:\n  enabled: true\n  listen: 0.0.0.0:8080\n  token: {TOKEN}\n"
    )
    files = {f"{SIM_ROOT}/sys/class/thermal/thermal_zone0/{f.name}": f for f in sorted(zone.iterdir())}
    files["/lib/llmos/llmos.yaml"] = override
    write_to_var(disk, work, files)
    BLESSED.append(bless(disk))
    b = boot(disk, "configured", http_port=HTTP_PORT, extra=SIGSTOP_CREDENTIAL)
    yield b, disk
    if b.vm is not None:  # still running when the test failed half-way: stop it (by PID)
        b.vm.close()


def get(path: str, token: str | None = TOKEN) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{HTTP_PORT}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_sigstopped_supervisor_is_restarted_by_systemd(hot_device: tuple[Boot, Path]) -> None:
    """First, so the other checks run on the restarted supervisor. The fault unit stops the supervisor right after
    READY; WatchdogSec=30 later systemd kills it and starts a new one. boot() may already have waited through that
    (it polls /status until ready); if not, give the watchdog its 30 s plus the restart delay, then wait for the new
    supervisor. The database read after the power-off (the last test) proves which supervisor answered."""
    b, _ = hot_device
    time.sleep(45)
    b.console.read_some(1)  # answers to /status lines typed while it was stopped
    wait_ready(b.console, 300)
    assert b.console.ask("ping") == "pong"


def test_the_http_api_answers_the_host_with_its_token(hot_device: tuple[Boot, Path]) -> None:
    deadline = time.monotonic() + 120  # networkd starts when llmos-net.service sees http.enabled; DHCP takes a moment
    while True:
        try:
            code, body = get("/health", token=None)
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert time.monotonic() < deadline, "the guest's HTTP API never answered on the forwarded port"
            time.sleep(1)
    assert (code, json.loads(body)) == (200, {"status": "ok"})
    assert get("/v1/models", token=None)[0] == 401
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key=TOKEN, max_retries=0, timeout=300)
    t0 = time.monotonic()
    pieces = []
    for chunk in client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "ping"}], stream=True
    ):
        pieces += [c.delta.content or "" for c in chunk.choices]
    measure("http_stream_ping_s", round(time.monotonic() - t0, 2))
    assert "".join(pieces) == "pong"
    code, metrics = get("/metrics")
    assert code == 200 and "llmos_ready 1.0" in metrics
    assert 'llmos_requests_total{outcome="ok",source="http"} 1.0' in metrics


def test_a_fake_hot_zone_is_throttled_in_status_and_log(hot_device: tuple[Boot, Path], tmp_path: Path) -> None:
    b, disk = hot_device
    text = b.console.ask("/status")
    assert f"thermal: cpu-thermal {HOT:.1f} C, setpoint 75 C, critical 85 C; throttling" in text, text
    assert b.console.ask("ping") == "pong"  # throttled, not stopped
    b.shutdown()
    db = copy_from_var(disk, "/lib/llmos", tmp_path / "var") / "llmos.db"
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT message, data FROM events WHERE kind = 'governor'").fetchall()
    actions = [json.loads(d)["action"] for _, d in rows]
    assert "throttle" in actions, rows
    starts = conn.execute("SELECT id, stopped_at, exit_reason FROM starts ORDER BY id").fetchall()
    conn.close()
    assert len(starts) == 2, f"the watchdog's restart: {starts}"
    assert starts[0][1] is None, "the stopped supervisor cannot have recorded a clean stop"
    assert starts[1][2] == "SIGTERM", "the restarted supervisor stopped cleanly at power-off"
    assert BLESSED[0] in esp_files(disk), "one boot, no reboot by the health gate"
    log = journal(disk, tmp_path / "journal", "-u", "llmos", "-u", "llmos-net")
    assert "event governor:" in log
    assert "network: opened for HTTP on 0.0.0.0:8080" in log and "http: listening on 0.0.0.0:8080" in log, log
