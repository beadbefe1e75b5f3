#!/usr/bin/env python3
"""Make a "USB stick" for the VM: a raw FAT image with a volume label, holding the given files.

Built with dosfstools and mtools (host packages from `make image-deps`): no loop device, no mount, no root. Plug it
in with `image/vm.py run --usb-stick FILE` (or `make run STICK=FILE`); the guest mounts it read-only at
/media/<LABEL>, where `/model install /media/<LABEL>/<name>.gguf` finds it.

  usbstick.py --out build/stick.raw [--label MODELS] model.gguf [NAME=path ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

# FAT's own overhead (boot sector, two FATs, the root directory) and cluster slack, with room to spare.
SLACK_BYTES = 2 << 20


class StickError(Exception):
    """A problem the user can fix; printed as one line with a hint."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message + (f" (hint: {hint})" if hint else ""))


def _tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/sbin/{name}", f"/usr/sbin/{name}") if os.access(p, os.X_OK)), "")
    if not path:
        raise StickError(f"{name} is not installed", "make image-deps installs dosfstools and mtools")
    return path


def make_stick(out: Path, files: Mapping[str, Path | bytes], label: str = "MODELS") -> Path:
    """Write `out`: a FAT file system labelled `label` whose root holds `files` (name on the stick -> a host file
    or the bytes themselves). Returns `out`."""
    if not re.fullmatch(r"[A-Z0-9_-]{1,11}", label):
        raise StickError(f"bad volume label {label!r}", "FAT labels are 1-11 characters: A-Z, 0-9, _ and -")
    mkfs, mcopy = _tool("mkfs.vfat"), _tool("mcopy")
    with tempfile.TemporaryDirectory(prefix="llmos-stick-") as tmp:
        sources: dict[str, Path] = {}
        for name, content in files.items():
            if isinstance(content, bytes):
                sources[name] = Path(tmp) / name
                sources[name].write_bytes(content)
            elif content.is_file():
                sources[name] = content
            else:
                raise StickError(f"no file at {content}", "name an existing file")
        data = sum(p.stat().st_size + 4096 for p in sources.values())
        # FAT32 (mkfs picks it for large sticks) keeps two allocation tables of about 0.1 % of the size each
        size = SLACK_BYTES + data + data // 256
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        # -C creates the image file; its size is given in KiB. FAT16 from 16 MiB up, FAT12 below: both plain vfat.
        subprocess.run([mkfs, "-C", "-n", label, str(out), str(size // 1024 + 1)], check=True, capture_output=True)
        for name, src in sources.items():
            subprocess.run([mcopy, "-i", str(out), str(src), f"::/{name}"], check=True, capture_output=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the stick image to write")
    parser.add_argument("--label", default="MODELS", help="the volume label: the guest mounts it at /media/LABEL")
    parser.add_argument("files", nargs="+", help="files to put on it: PATH, or NAME=PATH to rename")
    args = parser.parse_args(argv)
    files: dict[str, Path | bytes] = {}
    for spec in args.files:
        name, sep, path = spec.partition("=")
        files[name if sep else Path(spec).name] = Path(path if sep else spec)
    try:
        make_stick(args.out, files, args.label)
    except StickError as e:
        print(f"usbstick: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"usbstick: {e.cmd[0]} failed: {e.stderr.decode(errors='replace').strip()}", file=sys.stderr)
        return 1
    print(f"usbstick: {args.out} ({args.label}): {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
