"""Power cuts that lose the disk's write cache (issue 14; the cuts themselves: powercut.py).

First, on the host, that the disk really loses what was not flushed. Then a cut of each kind at a random moment of
one disk's life (while it boots, while an answer streams, while a model installs from a USB stick, right after an
answer); with test_image.py's cut (its first boot is on the same kind of disk) `make test` cuts five times. After
the cuts the device boots, answers and powers off, and its disk holds every request answered before a cut, passes
`integrity_check`, holds no half-done install, and its read-only root is unchanged. `make bench-powercut` cuts a
hundred times.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from conftest import card, measure, root_digest
from powercut import KINDS, Cuts, seed
from volatiledisk import NbdClient, VolatileDisk


def test_the_disk_loses_writes_not_flushed_and_keeps_flushed_ones(tmp_path: Path) -> None:
    """The same nbdkit command line the VM's disk uses, driven by a minimal NBD client: a flushed write is in the
    file after the cut, a later write that was acknowledged but not flushed is not, though the server served it."""
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * (4 << 20))
    disk = VolatileDisk(image, tmp_path / "nbd", tmp_path / "nbdkit.log")
    disk.start()
    try:
        client = NbdClient(disk.socket)
        client.write(0, b"F" * 4096)
        client.flush()
        client.write(1 << 20, b"U" * 4096)  # acknowledged by the server, not flushed
        assert client.read(1 << 20, 4096) == b"U" * 4096  # the guest would see it until the cut
        disk.cut()
    finally:
        disk.cut()
    data = image.read_bytes()
    assert data[:4096] == b"F" * 4096, "a flushed write was lost"
    assert data[1 << 20 : (1 << 20) + 4096] == b"\0" * 4096, "a write nobody flushed reached the disk"


@pytest.fixture(scope="module")
def cut_disk(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    disk = tmp_path_factory.mktemp("powercut") / "disk.raw"
    card(image, disk)
    return disk


def test_power_cuts_at_random_moments_keep_every_answered_request(
    cut_disk: Path, models_stick: Path, tmp_path: Path
) -> None:
    cuts = Cuts(cut_disk, random.Random(seed()), models_stick)
    root_before = root_digest(cut_disk)
    started = time.monotonic()
    for n, kind in enumerate(KINDS, 1):
        cuts.cut(kind, f"cut-{n}-{kind.replace(' ', '-')}")
    cuts.final_boot("cut-final")
    measure("power_cuts_volatile_cache", {"cuts": cuts.done, "seconds": round(time.monotonic() - started)})
    problems = cuts.problems(tmp_path)
    assert not problems, f"{problems} (cuts: {cuts.done})"
    starts = cuts.starts(tmp_path)
    assert starts >= len(KINDS), f"the boots after the cuts are not all recorded ({starts} starts)"
    assert root_digest(cut_disk) == root_before, "the read-only root partition changed"
