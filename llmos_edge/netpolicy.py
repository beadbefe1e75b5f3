"""The service's network sandbox, from the configuration: none at all unless the HTTP front-end is enabled.

llmos.service ships with no network (PrivateNetwork=yes, IPAddressDeny=any, AF_UNIX only). `llmos net-setup` runs
before it at every start (llmos-net.service) and writes, or removes, a drop-in that opens exactly what `http.*`
needs: the host's network namespace and the IP address families; with a loopback `http.listen` only localhost may
talk to it. The configuration it reads is the one the supervisor will run (the same layers, the same last-good
fallback), so the sandbox and the server cannot disagree.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from llmos_edge.config import Config, is_loopback, split_listen

DROPIN_DIR = Path("/run/systemd/system/llmos.service.d")
DROPIN_NAME = "50-http.conf"


def dropin(cfg: Config) -> str | None:
    """The drop-in for `cfg`, or None: the shipped unit's no-network sandbox stays as it is."""
    if not cfg.http.enabled:
        return None
    hp = split_listen(cfg.http.listen)
    loopback = hp is not None and is_loopback(hp[0])
    lines = [
        "# Written by `llmos net-setup` at start (llmos-net.service) because http.enabled is true; removed when it",
        "# is not. Do not edit: change http.* in the configuration instead.",
        "[Service]",
        "PrivateNetwork=no",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    ]
    if loopback:
        # IPAddressDeny=any stays: only programs on the device reach a loopback listener anyway.
        lines.append("IPAddressAllow=localhost")
    else:
        lines += [
            "IPAddressDeny=",
            f"# listening on {cfg.http.listen}: any address may connect (http.token is required)",
        ]
    return "\n".join(lines) + "\n"


def apply(cfg: Config, directory: Path = DROPIN_DIR, reload: bool = True) -> str:
    """Write or remove the drop-in; reload systemd only when it changed. Returns what was done, for the log."""
    path = directory / DROPIN_NAME
    want = dropin(cfg)
    have = path.read_text() if path.exists() else None
    if want == have:
        return f"network: unchanged ({'HTTP on ' + cfg.http.listen if want else 'none'})"
    if want is None:
        path.unlink()
        said = "network: none (http.enabled is false); drop-in removed"
    else:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(want)
        tmp.replace(path)
        said = f"network: opened for HTTP on {cfg.http.listen}"
    if reload:
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        if want is not None:
            # The device's network comes up only for HTTP (the .network file is in the image; networkd is not
            # enabled). --no-block: this runs inside the boot transaction; waiting on another job here could stall it.
            subprocess.run(["systemctl", "start", "--no-block", "systemd-networkd.service"], check=True)
    return said
