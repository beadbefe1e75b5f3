#!/usr/bin/env python3
"""Write the llmos-edge image to an SD card or USB stick, refusing the mistakes that destroy a system.

Refuses: a partition instead of a whole disk, a disk with anything mounted (or used as swap), the disk the running
system lives on, a disk smaller than the image. Asks before writing unless --yes. Writes with bmaptool (only the
blocks that hold data, checked against the image's .bmap checksums) when a .bmap file sits beside the image,
otherwise copies every block. The target may also be a plain file (to try it out without a card).

  flash.py --image build/image/llmos-edge.raw --device /dev/sdX [--yes]
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path


class FlashError(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def sysfs_block(dev: Path) -> Path:
    """/sys/class/block/<name> of a block device node."""
    st = dev.stat()
    return Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}").resolve()


def whole_disk_of(devnum: int) -> str:
    """Kernel name of the whole disk that holds block device `devnum` (itself when it is a disk)."""
    p = Path(f"/sys/dev/block/{os.major(devnum)}:{os.minor(devnum)}").resolve()
    if (p / "partition").exists():
        p = p.parent
    return p.name


def disks_under(name: str) -> set[str]:
    """The disk itself and every disk it is built from (device-mapper and md stacks, through sysfs slaves/)."""
    seen = {name}
    todo = [name]
    while todo:
        slaves = Path("/sys/class/block") / todo.pop() / "slaves"
        for slave in slaves.iterdir() if slaves.is_dir() else []:
            node = slave.resolve()
            disk = node.parent.name if (node / "partition").exists() else node.name
            if disk not in seen:
                seen.add(disk)
                todo.append(disk)
    return seen


def host_disks() -> set[str]:
    """Disks that hold the running system: /, /usr, /boot, /var (and whatever device-mapper stacks under them)."""
    result: set[str] = set()
    for mp in ("/", "/usr", "/boot", "/boot/efi", "/efi", "/var"):
        try:
            st = os.stat(mp)
        except FileNotFoundError:
            continue
        if os.major(st.st_dev) == 0:  # overlay, tmpfs, network: look at the mount source instead
            src = mount_source(mp)
            if src and Path(src).exists() and stat.S_ISBLK(os.stat(src).st_mode):
                result |= disks_under(whole_disk_of(os.stat(src).st_rdev))
            continue
        if Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").exists():
            result |= disks_under(whole_disk_of(st.st_dev))
    return result


def mount_source(mountpoint: str) -> str:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] == mountpoint:
            return fields[0]
    return ""


def busy_partitions(disk: str) -> list[str]:
    """Mounted filesystems or active swap on `disk` or any of its partitions."""
    names = {disk} | {p.name for p in (Path("/sys/class/block") / disk).glob(f"{disk}*") if p.is_dir()}
    nums: dict[int, str] = {}
    for n in names:
        dev_file = Path("/sys/class/block") / n / "dev"
        if dev_file.exists():
            major, minor = dev_file.read_text().strip().split(":")
            nums[os.makedev(int(major), int(minor))] = n
    busy = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        major, minor = fields[2].split(":")
        devnum = os.makedev(int(major), int(minor))
        if devnum in nums:
            busy.append(f"/dev/{nums[devnum]} mounted on {fields[4]}")
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        src = line.split()[0]
        if Path(src).exists() and stat.S_ISBLK(os.stat(src).st_mode) and os.stat(src).st_rdev in nums:
            busy.append(f"{src} used as swap")
    return busy


def device_size(dev: Path) -> int:
    with dev.open("rb") as f:
        return f.seek(0, os.SEEK_END)


def check_target(image: Path, device: Path) -> str:
    """Return 'disk' or 'file' after every refusal check; raise FlashError otherwise."""
    if not image.is_file():
        raise FlashError(f"no image at {image}", "build it first: make image")
    if not device.exists():
        if device.parent == Path("/dev"):
            raise FlashError(f"{device} does not exist", "plug the card in; lsblk lists the disks")
        return "file"
    st = device.stat()
    if stat.S_ISREG(st.st_mode):
        return "file"
    if not stat.S_ISBLK(st.st_mode):
        raise FlashError(f"{device} is neither a block device nor a regular file", "pass a disk such as /dev/sdb")
    sys_dir = sysfs_block(device)
    if (sys_dir / "partition").exists():
        raise FlashError(
            f"{device} is a partition, not a whole disk",
            f"write the whole disk: DEVICE=/dev/{sys_dir.parent.name}",
        )
    disk = sys_dir.name
    if disk in host_disks():
        raise FlashError(f"{device} holds the running system", "pick the card or stick, not the host's disk")
    busy = busy_partitions(disk)
    if busy:
        raise FlashError(
            f"{device} is in use: {'; '.join(busy)}",
            f"unmount it first (umount /dev/{disk}?*) and try again",
        )
    if (sys_dir / "ro").exists() and (sys_dir / "ro").read_text().strip() == "1":
        raise FlashError(f"{device} is read-only", "check the card's lock switch")
    size = device_size(device)
    if size < image.stat().st_size:
        raise FlashError(
            f"{device} holds {size / 2**30:.1f} GiB, less than the image's {image.stat().st_size / 2**30:.1f} GiB",
            "use a larger card or stick",
        )
    return "disk"


def describe(device: Path, kind: str) -> str:
    if kind == "file":
        return f"the file {device}"
    name = sysfs_block(device).name
    model = ""
    for f in ("device/model", "device/name"):
        p = Path("/sys/class/block") / name / f
        if p.exists():
            model = p.read_text().strip()
            break
    return f"{device} ({device_size(device) / 2**30:.1f} GiB{', ' + model if model else ''})"


def confirm(what: str) -> bool:
    if not sys.stdin.isatty():
        raise FlashError(f"not asking on a non-interactive input before erasing {what}", "add FORCE=1 to write")
    answer = input(f"Erase {what} and write the llmos-edge image? Type yes: ")
    return answer.strip().lower() == "yes"


def copy_plain(image: Path, device: Path) -> None:
    """Every block, with progress; fsync at the end so a pulled stick holds the whole image."""
    total = image.stat().st_size
    done = 0
    last = 0.0
    chunk = 4 << 20
    flags = os.O_WRONLY | (os.O_CREAT if not device.exists() else 0)
    fd = os.open(device, flags, 0o644)
    try:
        with image.open("rb") as src:
            while True:
                buf = src.read(chunk)
                if not buf:
                    break
                os.write(fd, buf)
                done += len(buf)
                if time.monotonic() - last > 1 or done == total:
                    last = time.monotonic()
                    print(f"\r  {done * 100 // total:3d}%  {done >> 20} / {total >> 20} MiB", end="", flush=True)
        os.fsync(fd)
    finally:
        os.close(fd)
    print()


def write(image: Path, device: Path) -> None:
    bmap = image.with_name(image.name + ".bmap")
    bmaptool = shutil.which("bmaptool")
    if bmap.is_file() and bmaptool:
        # bmaptool writes only the mapped blocks and verifies their checksums.
        subprocess.run([bmaptool, "copy", "--bmap", str(bmap), str(image), str(device)], check=True)
    else:
        print(f"  (no {bmap.name} or no bmaptool: copying every block)")
        copy_plain(image, device)
    subprocess.run(["sync"], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--device", type=Path, required=True, help="whole disk (/dev/sdX, /dev/mmcblk0) or a file")
    parser.add_argument("--yes", action="store_true", help="do not ask before erasing the device")
    parser.add_argument("--check-only", action="store_true", help="run the refusal checks, write nothing")
    args = parser.parse_args(argv)
    try:
        kind = check_target(args.image, args.device)
        what = describe(args.device, kind)
        if args.check_only:
            print(f"flash: {what} can take the image")
            return 0
        if not args.yes and not confirm(what):
            print("flash: nothing written")
            return 1
        print(f"== writing {args.image} to {what}")
        start = time.monotonic()
        write(args.image, args.device)
        print(f"== done in {time.monotonic() - start:.0f} s; remove the card and boot the device from it")
        return 0
    except FlashError as e:
        print(f"flash: {e.message}" + (f" (hint: {e.hint})" if e.hint else ""), file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"flash: writing failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nflash: interrupted; the device holds a partial image", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
