"""Factory reset: erase the writable var partition at the next boot, keep the read-only root (and so the installed
version). The database, installed models, config overrides and the journal go; the device then starts as it came.

Three steps, each by the part of the system allowed to do it:
  1. the person confirms (console `/factory-reset`, or `llmos factory-reset`): `request()` writes a request file
     beside the database. The supervisor runs unprivileged and sandboxed, so that is all it can do.
  2. llmos-factory-reset.path (root) sees the file; llmos-factory-reset.service runs `llmos factory-reset --arm`:
     `arm()` sets the `FactoryReset` EFI variable, removes the request, and the unit reboots the machine.
  3. in the initrd, before var is mounted, llmos-factory-reset-var.service runs systemd-repart with a var definition
     marked `FactoryReset=yes`: repart sees the EFI variable, deletes var, creates and formats it anew (filling the
     same space), and unsets the variable. The supervisor then creates a new database on the empty var.

A request survives a power cut at any point: the request file is on var (step 2 runs again at the next boot), the EFI
variable is in the firmware's non-volatile store (step 3 runs again until repart unsets it).
"""

from __future__ import annotations

import os
from pathlib import Path

from llmos_edge.durable import write_atomically
from llmos_edge.errors import UserError

# What a person types to confirm; a word nobody types by accident.
CONFIRMATION = "ERASE"
REQUEST_NAME = "factory-reset.request"
# systemd's vendor GUID for its EFI variables; systemd-repart reads FactoryReset there (systemd 252 and later).
EFI_VARIABLE = "FactoryReset-8cf2644b-4b0b-428f-9387-6d876050dc67"
EFIVARS = Path("/sys/firmware/efi/efivars")
# efivarfs file contents: 4 bytes of attributes (non-volatile, boot-service and run-time access), then the value,
# which systemd reads as NUL-terminated UTF-16LE text.
_ATTRIBUTES = (0x1 | 0x2 | 0x4).to_bytes(4, "little")
FS_IMMUTABLE_FL = 0x10
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602

WARNING = (
    "Factory reset erases everything on /var at the next boot: the database (requests, events, taught pairs), "
    "installed models and config overrides. The system and its built-in model stay as installed.\n"
    f"Type {CONFIRMATION} to erase and restart now; anything else cancels."
)


def request_path(database: str | os.PathLike[str]) -> Path:
    """The request file lives beside the database: the one directory on var the supervisor may write."""
    return Path(database).parent / REQUEST_NAME


def request(database: str | os.PathLike[str], source: str) -> Path:
    """Ask for a factory reset (step 1). `source` (console, cli) goes into the file, for the journal."""
    path = request_path(database)
    try:
        write_atomically(path, f"requested by {source}\n")
    except OSError as e:
        raise UserError(
            f"cannot write the factory reset request {path}: {e.strerror}",
            "the database directory must be writable (is var mounted?)",
        ) from None
    return path


def requested(database: str | os.PathLike[str]) -> bool:
    return request_path(database).exists()


def efi_value(text: str) -> bytes:
    """What efivarfs takes for a variable holding `text`: attributes, then UTF-16LE with a NUL at the end, as
    systemd's own efi_set_variable_string() writes it."""
    return _ATTRIBUTES + (text + "\0").encode("utf-16-le")


def _clear_immutable(path: Path) -> None:
    """efivarfs marks existing variables immutable so that a stray `rm -rf` cannot brick firmware; unset it."""
    import fcntl
    import struct

    fd = os.open(path, os.O_RDONLY)
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0))
        flags = struct.unpack("i", buf)[0]
        if flags & FS_IMMUTABLE_FL:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags & ~FS_IMMUTABLE_FL))
    except OSError:  # a plain directory (tests, or a file system without the flag): nothing to clear
        pass
    finally:
        os.close(fd)


def arm(database: str | os.PathLike[str], efivars: Path = EFIVARS) -> str:
    """Step 2, as root: set the FactoryReset EFI variable that systemd-repart reads in the initrd, then remove the
    request. Returns a line for the journal. The variable is written in one write(), as efivarfs requires."""
    req = request_path(database)
    if not req.exists():
        raise UserError(f"no factory reset was requested ({req} does not exist)", "request one with /factory-reset")
    # The request goes first: should arming fail, the path unit must not start this again and again.
    who = req.read_text(errors="replace").strip()
    req.unlink()
    if not efivars.is_dir():
        raise UserError(
            f"this machine has no EFI variables ({efivars}): the factory reset ({who}) cannot be armed",
            "the image boots with UEFI only; is efivarfs mounted?",
        )
    var = efivars / EFI_VARIABLE
    if var.exists():  # an earlier value: remove it, then write ours (efivarfs does not truncate)
        _clear_immutable(var)
        var.unlink()
    fd = os.open(var, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, efi_value("yes"))
    finally:
        os.close(fd)
    return f"factory reset armed ({who}): var is erased at the next boot"
