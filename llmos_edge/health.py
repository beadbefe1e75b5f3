"""The boot's health gate: is this version of the appliance good enough to keep?

llmos-health.service runs `llmos health --wait` before boot-complete.target (docs/updates.md). On a boot from a
UKI that still counts its tries (`name+N-M.efi`, a new update), systemd-bless-boot marks the UKI good once that
target is reached; a failed gate reboots (the unit's FailureAction=), and after three failed boots systemd-boot
falls back to the previous version's UKI, which names the previous root slot. So the gate says "good" only when the
product really works:
  - the supervisor reached READY: it loaded the model and the model answered its self-test prompt (the supervisor
    sends READY=1 only then, see readiness.py), and its /status says ready and serving;
  - it did so without systemd having to restart it (NRestarts 0): a supervisor that crashes and comes back is not
    healthy, whatever it says afterwards;
  - within the time given (a large model on a slow card may take minutes).
A supervisor that exits at once (a broken update) fails the gate at its first restart, without waiting the full time.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmos_edge.errors import UserError

UNIT = "llmos.service"
SERVICE_PROPERTIES = ("ActiveState", "SubState", "NRestarts", "Result")


@dataclass(frozen=True)
class Verdict:
    done: bool  # no need to look again: `healthy` is final
    healthy: bool
    reason: str


def verdict(service: dict[str, str], status: dict[str, Any] | None, unit: str = UNIT) -> Verdict:
    """One look at the service (`systemctl show` properties) and the supervisor's /status (None: no answer on the
    control socket yet)."""
    restarts = int(service.get("NRestarts", "0") or 0)
    if restarts > 0:
        return Verdict(True, False, f"{unit} was restarted {restarts} time(s) (result {service.get('Result', '?')})")
    if service.get("SubState") == "auto-restart":  # it exited and systemd is about to start it again
        return Verdict(True, False, f"{unit} exited and is being restarted (result {service.get('Result', '?')})")
    if service.get("ActiveState") == "failed":
        return Verdict(True, False, f"{unit} failed (result {service.get('Result', '?')})")
    if status is None:
        return Verdict(False, False, f"{unit} is {service.get('ActiveState', '?')}: no answer on its control socket")
    state = str(status.get("state", ""))
    if state == "failed":
        return Verdict(True, False, f"the supervisor says failed: {status.get('reason', '')}")
    if state == "ready" and status.get("serving"):
        return Verdict(True, True, f"ready and serving, self-test {status.get('self_test', '?')}")
    reason = f" ({status['reason']})" if status.get("reason") else ""
    return Verdict(False, False, f"the supervisor is {state or '?'}{reason}")


def service_properties(unit: str = UNIT) -> dict[str, str]:
    """systemd's view of the unit (systemctl show)."""
    try:
        out = subprocess.run(
            ["systemctl", "show", unit, *(f"--property={p}" for p in SERVICE_PROPERTIES)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise UserError("systemctl is not installed", "the health gate runs on the device (systemd)") from None
    if out.returncode != 0:
        raise UserError(f"systemctl show {unit} failed: {out.stderr.strip()}", "is this a systemd system?")
    props: dict[str, str] = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        props[key] = value
    return props


def supervisor_status(socket_path: str) -> dict[str, Any] | None:
    """The supervisor's structured /status, or None while nothing answers on its control socket."""
    from llmos_edge.control import call

    try:
        for event in call(socket_path, {"op": "status"}, timeout=10):
            if "status" in event:
                status: dict[str, Any] = event["status"]
                return status
    except (UserError, OSError, ValueError):  # not listening yet, or it went away mid-answer
        return None
    return None


def wait(
    socket_path: str,
    timeout: float,
    *,
    unit: str = UNIT,
    interval: float = 2.0,
    service: Callable[[], dict[str, str]] | None = None,
    status: Callable[[], dict[str, Any] | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Verdict:
    """Look every `interval` seconds until the verdict is final or `timeout` seconds have passed."""
    get_service = service or (lambda: service_properties(unit))
    get_status = status or (lambda: supervisor_status(socket_path))
    deadline = clock() + timeout
    while True:
        v = verdict(get_service(), get_status(), unit)
        if v.done:
            return v
        if clock() >= deadline:
            return Verdict(True, False, f"not healthy within {timeout:.0f} s: {v.reason}")
        sleep(interval)
