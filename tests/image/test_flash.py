"""The flash tool on loop devices and plain files: it writes what it should and refuses what it must.

These use a small GPT image of their own, not the built appliance image, so they take seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLASH = [sys.executable, str(ROOT / "image" / "flash.py")]


def flash(image: Path, device: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FLASH, "--image", str(image), "--device", str(device), *extra],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )


@pytest.fixture
def small_image(tmp_path: Path) -> Path:
    img = tmp_path / "small.raw"
    with img.open("wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["sfdisk", "-q", str(img)], input="label: gpt\n,4M,L\n", text=True, check=True)
    with img.open("r+b") as f:
        f.seek(2 << 20)
        f.write(b"llmos-edge test payload" * 1000)
    subprocess.run(["bmaptool", "create", "-o", f"{img}.bmap", str(img)], check=True, capture_output=True)
    return img


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[str]:
    if os.geteuid() != 0 or not Path("/dev/loop-control").exists():
        pytest.skip("loop devices need root and /dev/loop-control")
    backing = tmp_path / "card.img"
    with backing.open("wb") as f:
        f.truncate(16 << 20)
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--partscan", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    yield dev
    subprocess.run(["umount", "-q", f"{tmp_path}/mnt"], check=False)
    subprocess.run(["losetup", "-d", dev], check=False)


def test_writes_the_image_into_a_plain_file(small_image: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.raw"
    r = flash(small_image, target, "--yes")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes()[: small_image.stat().st_size] == small_image.read_bytes()


def test_writes_the_image_onto_a_loop_device(small_image: Path, loop: str) -> None:
    r = flash(small_image, loop, "--yes")
    assert r.returncode == 0, r.stderr
    with open(loop, "rb") as f:
        assert f.read(small_image.stat().st_size) == small_image.read_bytes()


def test_refuses_without_asking_when_nobody_can_answer(small_image: Path, loop: str) -> None:
    r = flash(small_image, loop)
    assert r.returncode == 1
    assert "FORCE=1" in r.stderr


def test_refuses_a_mounted_disk(small_image: Path, loop: str, tmp_path: Path) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True)
    (tmp_path / "mnt").mkdir()
    subprocess.run(["mount", loop, str(tmp_path / "mnt")], check=True)
    r = flash(small_image, loop, "--yes")
    assert r.returncode == 1
    assert "in use" in r.stderr and "mounted on" in r.stderr, r.stderr


def test_refuses_a_partition(small_image: Path, loop: str) -> None:
    subprocess.run(["sfdisk", "-q", loop], input="label: gpt\n,8M,L\n", text=True, check=True)
    subprocess.run(["partx", "-u", loop], check=False)
    part = f"{loop}p1"
    if not Path(part).exists():
        pytest.skip("the kernel made no partition node for the loop device")
    r = flash(small_image, part, "--yes")
    assert r.returncode == 1
    assert "partition" in r.stderr, r.stderr


def test_refuses_the_disk_the_host_runs_from(small_image: Path) -> None:
    source = subprocess.run(["findmnt", "-no", "SOURCE", "/"], capture_output=True, text=True).stdout.strip()
    if not source.startswith("/dev/"):
        pytest.skip(f"the root filesystem is not on a block device here ({source})")
    disk = subprocess.run(["lsblk", "-no", "PKNAME", source], capture_output=True, text=True).stdout.strip()
    device = f"/dev/{disk.splitlines()[0]}" if disk else source
    r = flash(small_image, device, "--yes", "--check-only")
    assert r.returncode == 1
    assert "running system" in r.stderr, r.stderr


def test_refuses_a_disk_smaller_than_the_image(tmp_path: Path, loop: str) -> None:
    big = tmp_path / "big.raw"
    with big.open("wb") as f:
        f.truncate(32 << 20)
    r = flash(big, loop, "--yes")
    assert r.returncode == 1
    assert "less than the image" in r.stderr, r.stderr


def test_a_missing_image_says_how_to_build_it(tmp_path: Path) -> None:
    r = flash(tmp_path / "nope.raw", tmp_path / "out.raw", "--yes")
    assert r.returncode == 1
    assert "make image" in r.stderr
