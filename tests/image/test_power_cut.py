"""Power cuts that lose the disk's write cache (issue 14): the image's disk is served by nbdkit through its cache
filter in writeback mode (image/volatiledisk.py), so a cut loses every write the guest has not flushed, as a real
card or SSD with a volatile cache would. Killing QEMU on an ordinary disk is only a crash: QEMU's writes are then
already in the host's page cache.

First, on the host, that the disk really loses what was not flushed. Then four cuts at random moments of one disk's
life (while it boots, while an answer streams, while a model installs from a USB stick, right after an answer); with
test_image.py's cut (its first boot is on the same kind of disk) `make test` cuts five times. After each the device
boots again, and at the end the database passes `integrity_check`, holds every request that was answered before a
cut (an answer's row is committed with synchronous=FULL, so flushed, before its prompt comes back), and the model
store holds no half-done install: every registered file has its sha256, and no file is left that is not registered.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ANSWER_END,
    BOOT_TIMEOUT,
    PROMPT,
    ROOT,
    STICK,
    TEST_DISK_BYTES,
    Boot,
    boot,
    copy_from_var,
    measure,
    root_digest,
    start,
)
from volatiledisk import NbdClient, VolatileDisk

WORDS = ["stone", "river", "cloud", "apple", "table", "green", "light", "ocean", "tiger", "piano", "maple", "frost"]


def seed() -> int:
    """The commit under test seeds the cut moments (a rerun cuts at the same moments); LLMOS_POWERCUT_SEED
    overrides it."""
    if os.environ.get("LLMOS_POWERCUT_SEED"):
        return int(os.environ["LLMOS_POWERCUT_SEED"])
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    return int(head[:8] or "0", 16)


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


def ask_unique(b: Boot, rng: random.Random, answered: list[str]) -> None:
    prompt = f"reverse {rng.choice(WORDS)}{len(answered)}"  # unique, so its row can be found
    b.console.ask(prompt, timeout=300)
    answered.append(prompt)


def cut_after(disk: Path, name: str, action: Callable[[Boot], str], **options: Any) -> str:
    """Boot to READY on the volatile disk, do `action`, cut the power. Returns what `action` says was cut."""
    b = boot(disk, name, volatile_cache=True, **options)
    try:
        what = action(b)
        b.power_cut()
        return what
    finally:
        b.console.close()
        assert b.vm is not None
        b.vm.close()


@pytest.fixture(scope="module")
def cut_disk(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    disk = tmp_path_factory.mktemp("powercut") / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(image), str(disk)], check=True)
    os.truncate(disk, max(TEST_DISK_BYTES, disk.stat().st_size))
    return disk


def test_power_cuts_at_random_moments_keep_every_answered_request(
    cut_disk: Path, models_stick: Path, tmp_path: Path
) -> None:
    rng = random.Random(seed())
    answered: list[str] = []
    cuts: list[str] = []
    root_before = root_digest(cut_disk)
    started = time.monotonic()

    # 1. While it boots: at a random moment between QEMU's start and the first prompt (30-150 s under TCG).
    vm, console = start(cut_disk, "cut-1-booting", volatile_cache=True)
    try:
        at = rng.uniform(15, 90)
        try:
            console.read_until(PROMPT, at)
            cuts.append(f"booting, after the prompt ({at:.0f} s)")
        except TimeoutError:
            cuts.append(f"booting ({at:.0f} s)")
        vm.power_cut()
    finally:
        console.close()
        vm.close()

    # 2. While an answer streams, after a few were answered (and so flushed).
    def streaming(b: Boot) -> str:
        for _ in range(2):
            ask_unique(b, rng, answered)
        b.console.send_line("tell me everything about llmos edge and the serial console and the database")
        b.console.read_until(b"\r\n", 30)  # the echo; the answer streams after it
        time.sleep(rng.uniform(0.0, 3.0))
        streamed = b.console.read_some(5)
        return "streaming" if ANSWER_END not in streamed else "streaming (the answer had ended)"

    cuts.append(cut_after(cut_disk, "cut-2-streaming", streaming))

    # 3. While a model installs from the USB stick (copy, hash, fsync, rename, register, gate), after an answer.
    def installing(b: Boot) -> str:
        ask_unique(b, rng, answered)
        b.console.send_line(f"/model install {STICK}/good.gguf")
        at = rng.uniform(0.0, 15.0)
        try:
            b.console.read_until(PROMPT, at)
            return f"after the install had ended ({at:.1f} s)"
        except TimeoutError:
            return f"installing ({at:.1f} s in)"

    cuts.append(cut_after(cut_disk, "cut-3-installing", installing, usb_stick=models_stick))

    # 4. Right after an answer: its row has just been committed.
    def after_answer(b: Boot) -> str:
        ask_unique(b, rng, answered)
        return "right after an answer"

    cuts.append(cut_after(cut_disk, "cut-4-after-answer", after_answer))

    # The device comes up again, answers, and powers off cleanly.
    last = boot(cut_disk, "cut-final", volatile_cache=True)
    try:
        assert last.console.ask("ping") == "pong"
        last.shutdown(timeout=BOOT_TIMEOUT)
    finally:
        assert last.vm is not None
        last.vm.close()
    measure("power_cuts_volatile_cache", {"cuts": cuts, "seconds": round(time.monotonic() - started)})

    db = sqlite3.connect(copy_from_var(cut_disk, "/lib/llmos", tmp_path / "var") / "llmos.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    prompts = {r[0] for r in db.execute("SELECT prompt FROM requests")}
    missing = [p for p in answered if p not in prompts]
    assert not missing, f"requests answered before a cut are gone: {missing} (cuts: {cuts})"
    starts = db.execute("SELECT COUNT(*) FROM starts").fetchone()[0]
    assert starts >= 4, f"the boots after the cuts are not all recorded ({starts} starts)"
    assert root_digest(cut_disk) == root_before, "the read-only root partition changed"

    # No install left half done: the final boot's recovery removed what the cut left, and what is registered is whole.
    rows = db.execute("SELECT path, sha256, state FROM models WHERE state != 'removed' AND sha256 != ''").fetchall()
    registered = {Path(path).name: (sha, state) for path, sha, state in rows}  # the built-in model has no sha256
    files = copy_from_var(cut_disk, "/lib/llmos/models", tmp_path / "models")
    present = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files.iterdir()} if files.is_dir() else {}
    present = {name: sha for name, sha in present.items() if not name.endswith(".golden.jsonl")}
    store = f"files {present}, registered {registered} (cuts: {cuts})"
    assert all(registered.get(name, ("",))[0] == sha for name, sha in present.items()), store
    assert all(name in present for name, (_, state) in registered.items() if state != "failed"), store
