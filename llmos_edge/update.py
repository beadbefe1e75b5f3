"""Updates from a signed bundle: verify it, then let systemd-sysupdate write it to the other slot (docs/updates.md).

Like a factory reset, in steps each done by the part allowed to: the supervisor (unprivileged) writes a request
naming the bundle (`/update PATH` on the console, `request()`); llmos-update.path (root) sees it and
llmos-update.service runs `llmos update --request FILE`: `stage()`, `install()`, then it waits until no request is
being answered and the unit reboots into the new version (SuccessAction=reboot), where boot counting and the health
gate decide whether it stays.

A bundle (`make update-bundle`, image/bundle.py) is a directory, on a USB stick or on /var:
  llmos-edge_<version>.root.raw[.xz|.gz]  the root file system (erofs), for the other root slot
  llmos-edge_<version>.efi             the UKI, whose command line names root_<version>
  SHA256SUMS                           their SHA-256 sums, as sha256sum writes them
  SHA256SUMS.gpg                       a detached signature of SHA256SUMS by the build host's update key
systemd-sysupdate verifies signatures only for downloads (url-file sources), so this module does it for a local
bundle: the signature is checked with gpgv against the public key the image carries, and every file is copied to
/var/lib/llmos-update/verified and hashed as it is copied, so what sysupdate reads is exactly what was verified
(the stick may be pulled or swapped meanwhile). Only then does `systemd-sysupdate update` run, with the transfer
definitions in /usr/lib/sysupdate.d (root into the slot not running, the UKI onto the ESP with 3 tries).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos_edge.durable import remove, write_atomically
from llmos_edge.errors import UserError

REQUEST_NAME = "update.request"  # beside the database: the one directory on var the supervisor may write
KEYRING = Path("/usr/share/llmos/update-pubring.gpg")
STAGING = Path("/var/lib/llmos-update")
SUMS, SIGNATURE = "SHA256SUMS", "SHA256SUMS.gpg"
# The image id and what sysupdate's MatchPattern= accepts (rootfs-overlay/usr/lib/sysupdate.d/)
FILE_PATTERN = re.compile(r"llmos-edge_(?P<version>[0-9][0-9A-Za-z.~^-]*?)\.(?P<kind>root\.raw(?:\.xz|\.gz)?|efi)")
CHUNK = 4 << 20
ROOT_PREFIX, EMPTY_SLOT = "root_", "_empty"  # root slot labels (image/repart/): root_<version>, or empty


@dataclass(frozen=True)
class Bundle:
    version: str
    files: dict[str, str]  # file name -> sha256, as signed


def parse_sums(text: str) -> dict[str, str]:
    """sha256sum's output ('HEX  NAME' or 'HEX *NAME') as name -> hex."""
    sums: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](\S+)", line.strip())
        if not m or "/" in m.group(2):
            raise UserError(
                f"{SUMS} line {n} is not 'SHA256  FILE': {line[:80]!r}", "make the bundle with make update-bundle"
            )
        sums[m.group(2)] = m.group(1)
    return sums


def check_contents(sums: dict[str, str]) -> Bundle:
    """The signed list must name one version's root image and UKI, nothing else."""
    versions: set[str] = set()
    kinds: set[str] = set()
    for name in sums:
        m = FILE_PATTERN.fullmatch(name)
        if not m:
            raise UserError(
                f"the bundle lists {name!r}, which is not part of an llmos-edge update", "make update-bundle"
            )
        versions.add(m.group("version"))
        kinds.add("root" if m.group("kind").startswith("root") else "efi")
    if len(versions) != 1:
        raise UserError(f"the bundle holds {len(versions)} versions ({', '.join(sorted(versions))}), not one")
    if kinds != {"root", "efi"}:
        raise UserError("the bundle lacks " + ("the UKI (.efi)" if "efi" not in kinds else "the root image"))
    return Bundle(versions.pop(), sums)


def verify_signature(sums: Path, signature: Path, keyring: Path) -> None:
    """gpgv: the signature must be good and made by a key in `keyring` (the image's update key)."""
    if not keyring.is_file():
        raise UserError(f"no update key at {keyring}", "this image was built without one: rebuild it with make image")
    r = subprocess.run(
        ["gpgv", "--keyring", str(keyring), str(signature), str(sums)], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        said = next((line for line in r.stderr.splitlines() if "BAD signature" in line or "Can't check" in line), "")
        raise UserError(
            f"the bundle's signature does not verify{': ' + said.removeprefix('gpgv: ') if said else ''}",
            "use a bundle made by make update-bundle on the host that built this image",
        )


def copy_hashed(src: Path, dest: Path) -> str:
    """Copy src to dest (synced) and return the SHA-256 of the bytes written."""
    h = hashlib.sha256()
    with src.open("rb") as fin, dest.open("wb") as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


def stage(bundle_dir: Path, staging: Path = STAGING, keyring: Path = KEYRING) -> Bundle:
    """Verify the bundle in `bundle_dir` and leave its files, verified, in `staging`/verified."""
    if not (bundle_dir / SUMS).is_file() or not (bundle_dir / SIGNATURE).is_file():
        raise UserError(f"{bundle_dir} is not an update bundle (no {SUMS} and {SIGNATURE})", "make update-bundle")
    incoming, verified = staging / "incoming", staging / "verified"
    for d in (incoming, verified):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    # The list and its signature are copied first and verified as copied: the files are then checked against them.
    copy_hashed(bundle_dir / SUMS, incoming / SUMS)
    copy_hashed(bundle_dir / SIGNATURE, incoming / SIGNATURE)
    verify_signature(incoming / SUMS, incoming / SIGNATURE, keyring)
    bundle = check_contents(parse_sums((incoming / SUMS).read_text(encoding="utf-8", errors="replace")))
    for name, want in bundle.files.items():
        if not (bundle_dir / name).is_file():
            raise UserError(f"the bundle lists {name} but it is not in {bundle_dir}", "copy the whole bundle")
        got = copy_hashed(bundle_dir / name, incoming / name)
        if got != want:
            raise UserError(f"{name} does not match its signed SHA-256 (damaged or altered)", "copy the bundle again")
    for name in bundle.files:
        (incoming / name).rename(verified / name)
    shutil.rmtree(incoming)
    return bundle


def install(definitions: Path | None = None) -> str:
    """systemd-sysupdate writes the verified files to the other slot and the ESP; returns what it said."""
    cmd = ["/usr/lib/systemd/systemd-sysupdate", "--no-pager"]
    if definitions is not None:
        cmd.append(f"--definitions={definitions}")
    r = subprocess.run([*cmd, "update"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"systemd-sysupdate failed: {last}", "the journal of llmos-update.service has the whole output")
    return (r.stdout + r.stderr).strip()


def request_path(database: str | os.PathLike[str]) -> Path:
    return Path(database).parent / REQUEST_NAME


def request(database: str | os.PathLike[str], bundle_dir: str) -> Path:
    """Ask for an update from `bundle_dir` (step 1, by the supervisor). The directory must be a bundle."""
    where = Path(bundle_dir.strip() or ".")
    if not where.is_absolute():
        raise UserError(f"{bundle_dir!r} is not an absolute path", "e.g. /update /media/UPDATE/0.2.0")
    if not (where / SUMS).is_file():
        raise UserError(
            f"{where} holds no update bundle (no {SUMS})", "a bundle is a directory made by make update-bundle"
        )
    path = request_path(database)
    try:
        write_atomically(path, f"{where}\n")
    except OSError as e:
        raise UserError(f"cannot write the update request {path}: {e.strerror}", "is var mounted?") from None
    return path


def take_request(request_file: Path) -> Path:
    """Step 2, as root: the bundle directory a request names; the request is removed first, and durably, so a bundle
    that fails is not tried again and again by the path unit, and a power cut during the update does not start it
    again at the next boot (the half-staged files are removed at boot by tmpfiles, llmos-update.conf)."""
    if not request_file.exists():
        raise UserError(f"no update was requested ({request_file} does not exist)", "request one with /update PATH")
    where = Path(request_file.read_text(errors="replace").strip())
    remove(request_file)
    return where


def wait_idle(status: Callable[[], dict[str, Any] | None], timeout: float, interval: float = 2.0) -> bool:
    """Wait (up to `timeout` s) until the supervisor answers no request; True if it did (or is not running)."""
    deadline = time.monotonic() + timeout
    while True:
        s = status()
        if s is None or s.get("idle", True):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def os_release_version(os_release: Path = Path("/etc/os-release")) -> str:
    """IMAGE_VERSION of the running system (mkosi writes it), or "" off the appliance."""
    try:
        text = os_release.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "IMAGE_VERSION":
            return value.strip().strip("'\"")
    return ""


def system_line(os_release: Path = Path("/etc/os-release"), by_partlabel: Path = Path("/dev/disk/by-partlabel")) -> str:
    """/status's line: the running version and what the other root slot holds (empty, or a version), from the GPT
    labels udev lists; "" where this is not the appliance (no IMAGE_VERSION)."""
    running = os_release_version(os_release)
    if not running:
        return ""
    try:
        labels = sorted(p.name for p in by_partlabel.iterdir())
    except OSError:
        labels = []
    others = [label.removeprefix(ROOT_PREFIX) for label in labels if label.startswith(ROOT_PREFIX)]
    others = [v for v in others if v != running]
    if others:
        other = f"version {', '.join(others)}"
    elif EMPTY_SLOT in labels:
        other = "empty"
    else:
        other = "unknown"
    return f"system: version {running}; other slot: {other}"
