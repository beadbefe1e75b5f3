#!/usr/bin/env python3
"""The image's wheels for another architecture (`make image ARCH=arm64`): the same versions as the host's set.

The host's wheel directory (image/image.mk resolves it once per requirements change) fixes every version. Pure
wheels (`-none-any`) are copied as they are; each compiled one is downloaded again, same name and version, built for
the target (manylinux, CPython of the image's Debian). llama-cpp-python comes from its own cross-built directory
(`make wheel ARCH=arm64`): PyPI has no wheel of it. Files already present are kept, so a second run downloads
nothing.

  foreignwheels.py --host-wheels DIR --llama-wheels DIR --out DIR [--arch arm64] [--python 3.11]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

# pip matches --platform exactly (no manylinux_2_x range, as it does for the running machine): list them all.
# glibc 2.36 is bookworm's; the oldest listed tag is manylinux2014's (glibc 2.17).
MACHINES = {"arm64": "aarch64", "x86-64": "x86_64"}
GLIBC_MINORS = range(17, 37)
WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>.+)\.whl$")


class WheelError(Exception):
    pass


def platforms(machine: str) -> list[str]:
    tags = [f"manylinux_2_{m}_{machine}" for m in GLIBC_MINORS]
    return [*tags, f"manylinux2014_{machine}", f"linux_{machine}"]


def parse(path: Path) -> tuple[str, str, bool]:
    """(name, version, pure) of a wheel file."""
    m = WHEEL.match(path.name)
    if m is None:
        raise WheelError(f"{path} is not a wheel's file name")
    return m["name"].lower(), m["version"], m["plat"] == "any"


def download(name: str, version: str, machine: str, python: str, out: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp",
           "--abi", f"cp{python.replace('.', '')}", "--abi", "abi3", "--abi", "none", "-d", str(out)]  # fmt: skip
    for p in platforms(machine):
        cmd += ["--platform", p]
    r = subprocess.run([*cmd, f"{name}=={version}"], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise WheelError(f"no {machine} wheel of {name} {version} for CPython {python}: {last}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host-wheels", type=Path, required=True)
    ap.add_argument("--llama-wheels", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="arm64", choices=sorted(MACHINES))
    ap.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    args = ap.parse_args()
    machine = MACHINES[args.arch]
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        have = {parse(p)[0]: p for p in args.out.glob("*.whl")}
        wanted = set()
        for src in sorted(args.host_wheels.glob("*.whl")):
            name, version, is_pure = parse(src)
            wanted.add(name)
            old = have.get(name)
            if old is not None and parse(old)[1] == version:
                if not is_pure or old.read_bytes() == src.read_bytes():
                    continue
            if old is not None:
                old.unlink()  # another version, or the project's wheel rebuilt
            if name == "llama_cpp_python":
                built = sorted(args.llama_wheels.glob(f"llama_cpp_python-{version}-*{machine}.whl"))
                if not built:
                    raise WheelError(f"no {machine} llama-cpp-python {version} wheel in {args.llama_wheels} "
                                     f"(hint: make wheel ARCH={args.arch})")  # fmt: skip
                shutil.copy2(built[-1], args.out)
            elif is_pure:
                shutil.copy2(src, args.out)
            else:
                print(f"foreignwheels: {src.name.split('-')[0]} {version} for {machine}", flush=True)
                download(name, version, machine, args.python, args.out)
        for name, old in have.items():
            if name not in wanted:  # no longer a requirement: pip must not find it
                old.unlink()
    except WheelError as e:
        print(f"foreignwheels: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
