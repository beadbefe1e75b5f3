#!/usr/bin/env python3
"""Update bundles for `llmos update` (docs/updates.md), and the key that signs them.

  bundle.py key --dir DIR                    make the signing key in DIR (once; it stays on the build host, in
                                             $(CACHE), never in the repository) and export its public half to
                                             DIR/update-pubring.gpg, which the image carries
  bundle.py make --image RAW --key-dir DIR --out OUT [--compress xz|gz|none]
                                             from a built image: its root slot's file system (the erofs in the
                                             partition root_<version>, without the zero rest of the slot) and its
                                             UKI, named as systemd-sysupdate's transfers expect, their SHA256SUMS,
                                             and SHA256SUMS.gpg signed with the key; OUT/<version>/

The image and the bundle come from the same build (`make update-bundle IMAGE_VERSION=x` builds the image as
version x, then this), so the UKI names exactly the root slot label the bundle installs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

KEY_NAME = "llmos-edge update key"
PUBRING = "update-pubring.gpg"
ROOT_PREFIX = "root_"


class BundleError(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def gpg(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--yes", "--quiet", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise BundleError(f"gpg {args[0]} failed: {r.stderr.strip().splitlines()[-1:]}", "is gnupg installed?")
    return r


def stop_agent(home: Path) -> None:
    """gpg starts a gpg-agent daemon for the key's home; a build step must not leave it running."""
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True, check=False)


def make_key(key_dir: Path) -> Path:
    """The signing key in key_dir/gnupg (made once), and its public half exported to key_dir/update-pubring.gpg."""
    home = key_dir / "gnupg"
    try:
        if not (home / "pubring.kbx").exists() or not gpg(home, "--list-secret-keys").stdout.strip():
            home.mkdir(parents=True, exist_ok=True)
            os.chmod(home, 0o700)
            # No passphrase: the build host signs unattended (CI too); whoever can read $(CACHE) can sign.
            gpg(home, "--passphrase", "", "--quick-generate-key", KEY_NAME, "ed25519", "sign", "never")
            print(f"bundle: made the update signing key in {home}", file=sys.stderr)
    finally:
        stop_agent(home)
    pub = key_dir / PUBRING
    exported = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--export", KEY_NAME], capture_output=True, check=True
    ).stdout
    if not exported:
        raise BundleError(f"no public key named {KEY_NAME!r} in {home}", f"remove {key_dir} to make a new key")
    if not pub.exists() or pub.read_bytes() != exported:
        pub.write_bytes(exported)
    return pub


def partitions(img: Path) -> dict[str, dict[str, int]]:
    table = json.loads(subprocess.run(["sfdisk", "-J", str(img)], check=True, capture_output=True).stdout)
    sector = int(table["partitiontable"].get("sectorsize", 512))
    return {
        p.get("name", ""): {"start": int(p["start"]) * sector, "size": int(p["size"]) * sector}
        for p in table["partitiontable"]["partitions"]
    }


def image_version(parts: dict[str, dict[str, int]]) -> str:
    roots = [label for label in parts if label.startswith(ROOT_PREFIX)]
    if len(roots) != 1:
        raise BundleError(f"expected one root slot labelled {ROOT_PREFIX}<version> in the image, found {roots}")
    return roots[0].removeprefix(ROOT_PREFIX)


def copy_range(src: Path, start: int, size: int, dest: Path) -> None:
    with src.open("rb") as fin, dest.open("wb") as fout:
        fin.seek(start)
        left = size
        while left:
            chunk = fin.read(min(left, 8 << 20))
            if not chunk:
                raise BundleError(f"{src} ends inside its root partition", "rebuild the image")
            fout.write(chunk)
            left -= len(chunk)


# erofs's superblock (the root slot's file system, mkosi.conf): 1024 bytes in, its magic, then at +12 the block size
# as a power of two and at +36 the file system's size in blocks.
EROFS_MAGIC, EROFS_SB = 0xE0F5E1E2, 1024


def used_size(img: Path, start: int, size: int) -> int:
    """How much of the partition at `start` its file system uses: an erofs's own size, else the whole partition.
    The rest of a slot is zeros in a built image, and a slot's later bytes are never read by the erofs in front of
    them, so a bundle carries the file system alone (half of the 1 GiB slot today) and sysupdate writes just that."""
    with img.open("rb") as f:
        f.seek(start + EROFS_SB)
        sb = f.read(40)
    if len(sb) < 40 or int.from_bytes(sb[0:4], "little") != EROFS_MAGIC:
        return size
    used = int.from_bytes(sb[36:40], "little") << sb[12]
    return used if 0 < used <= size else size


# How the root image may be compressed: what systemd-import (sysupdate's writer) of systemd 254 decompresses
# (xz, gzip; not zstd) and what rootfs-overlay/usr/lib/sysupdate.d/10-root.conf matches. xz is the smallest to
# carry; gzip takes seconds to make; none costs the device no decompression, which under QEMU's emulation is the
# fastest install (the image tests use it; docs/updates.md has the measurements).
COMPRESSORS = {"xz": ["xz", "-T0", "-6", "-f"], "gz": ["gzip", "-1", "-f"], "none": []}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_bundle(image: Path, key_dir: Path, out: Path, compress: str = "xz") -> Path:
    parts = partitions(image)
    version = image_version(parts)
    dest = out / version
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    # The root slot's file system as it is in the image (not the zero rest of the fixed-size slot).
    root = dest / f"llmos-edge_{version}.root.raw"
    part = parts[f"{ROOT_PREFIX}{version}"]
    copy_range(image, part["start"], used_size(image, part["start"], part["size"]), root)
    if COMPRESSORS[compress]:
        subprocess.run([*COMPRESSORS[compress], str(root)], check=True)
        root = root.with_name(f"{root.name}.{compress}")
    # The UKI from the image's ESP, without its boot counter: sysupdate gives the installed copy its tries.
    esp = f"{image}@@{parts['esp']['start']}"
    listing = subprocess.run(
        ["mdir", "-b", "-i", esp, "::/EFI/Linux"], check=True, capture_output=True, text=True
    ).stdout.split()
    ukis = [Path(p).name for p in listing if Path(p).name.startswith(f"llmos-edge_{version}")]
    if len(ukis) != 1:
        raise BundleError(f"expected one UKI of version {version} on the image's ESP, found {ukis}")
    uki = dest / f"llmos-edge_{version}.efi"
    subprocess.run(["mcopy", "-n", "-i", esp, f"::/EFI/Linux/{ukis[0]}", str(uki)], check=True)
    sums = dest / "SHA256SUMS"
    sums.write_text("".join(f"{sha256(p)}  {p.name}\n" for p in sorted((root, uki))))
    home = key_dir / "gnupg"
    make_key(key_dir)
    try:
        gpg(home, "--local-user", KEY_NAME, "--output", str(dest / "SHA256SUMS.gpg"), "--detach-sign", str(sums))
    finally:
        stop_agent(home)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("key")
    k.add_argument("--dir", type=Path, required=True)
    m = sub.add_parser("make")
    m.add_argument("--image", type=Path, required=True)
    m.add_argument("--key-dir", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument(
        "--compress",
        choices=sorted(COMPRESSORS),
        default="xz",
        help="the root image's compression: xz (smallest, the default), gz (seconds to make), none",
    )
    args = p.parse_args(argv)
    try:
        if args.command == "key":
            print(make_key(args.dir))
        else:
            dest = make_bundle(args.image, args.key_dir, args.out, compress=args.compress)
            for f in sorted(dest.iterdir()):
                print(f"{f}  {f.stat().st_size} bytes")
    except BundleError as e:
        print(f"bundle: {e.message}" + (f" (hint: {e.hint})" if e.hint else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
