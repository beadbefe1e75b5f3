"""`make bench-wear-host` (issue 14, point 5): what the status page's samples cost the card in an idle hour, on this
machine's kernel, without an image (root: it makes a loop device).

The idle appliance's own writes are its samples (llmos_edge/sampler.py): one every database.sample_interval seconds,
held in memory and committed database.sample_flush seconds at a time. Each pattern below runs on a fresh ext4 on a
loop device (256 MB like the image's var, 4 kB blocks, mounted `noatime,lazytime` as rootfs-overlay/etc/fstab mounts
var), with the real Store and Sampler: the table first filled to keep_samples rows (a device up for days, so commits
also prune), then `--hours` simulated hours of samples, the sampler's `sample()` called directly for each tick
(the clock accelerated: an hour's samples in a moment). After each simulated hour the bench waits `--pause`
seconds, longer than ext4's 5 s journal commit interval, so that each hour's commit gets its own journal commit as
on a device; the window ends with a WAL checkpoint (the database must take the WAL's pages some time) and a sync.
The bytes written are the loop device's sectors written (/sys/block/loopN/stat, the 7th field) across the window.

Patterns: `before`, the store as it was (a row per sample, the index on samples(at), the table pruned every 100
rows); `row per sample`, today's store with database.sample_row at the sample interval; `image`, the image's
configuration (rootfs-overlay/etc/llmos/llmos.yaml: samples averaged into a row every sample_row seconds). Target:
the image's pattern at most 5 MB a day (llmos_edge/wear.py's TARGET_DAY_BYTES, the whole device's budget).

  sudo bench/wear_host.py [--hours 24] [--pause 5.5] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import begin  # noqa: E402
from llmos_edge.config import Config, DatabaseConfig, load_file  # noqa: E402
from llmos_edge.sampler import Sampler  # noqa: E402
from llmos_edge.status import GovernorStatus, MemoryStatus, Status, StoreStatus  # noqa: E402
from llmos_edge.store import Store, transaction  # noqa: E402
from llmos_edge.wear import DAY_S, TARGET_DAY_BYTES, size  # noqa: E402

IMAGE_CONFIG = REPO / "rootfs-overlay/etc/llmos/llmos.yaml"
VAR_BYTES = 256 << 20  # the image's var partition before it grows into the card (image/repart/20-var.conf)
MOUNT_OPTIONS = "noatime,lazytime"  # rootfs-overlay/etc/fstab's options for var
OLD_PRUNE_EVERY = 100  # the store before issue 14's sample rows: pruned every 100 samples written
HOUR_S = 3600.0


@dataclass(frozen=True)
class Pattern:
    name: str
    db: DatabaseConfig
    at_index: bool = False  # the samples(at) index that migration 9 drops
    prune_every: int = 0  # 0: the store's own cadence (a sixth of keep_samples)


@dataclass(frozen=True)
class Result:
    pattern: Pattern
    written: int  # bytes over the window
    hours: int
    rows: int  # sample rows in the database at the end
    commits: int

    @property
    def per_hour(self) -> float:
        return self.written / self.hours

    @property
    def per_day(self) -> float:
        return self.per_hour * DAY_S / HOUR_S


class OldStore(Store):
    """The store's pruning as it was: every OLD_PRUNE_EVERY sample rows."""

    @property
    def prune_every(self) -> int:
        return OLD_PRUNE_EVERY


def idle_status(tick: int) -> Status:
    """An idle appliance's status as the sampler reads it, the temperature wandering a little."""
    return Status(
        state="ready",
        reason="",
        serving=True,
        model_file="default.gguf",
        model=None,
        store=StoreStatus("default", "", False, 0, "/var/lib/llmos/models", ""),
        engine=None,
        self_test="passed",
        last=None,
        memory=MemoryStatus(41_000_000 + tick % 7 * 4096, 62_000_000, 1_100_000_000 - tick % 13 * 65536, 2 << 30),
        temperatures=(("cpu-thermal", 45.0),),
        governor=GovernorStatus(True, 45.0 + (tick % 17) * 0.05, 70.0, "normal", 1.0, 0, (), ""),
        voice="voice: off",
        uptime_s=tick,
        restarts=0,
    )


def sectors_written(dev: str) -> int:
    return int(Path(f"/sys/block/{os.path.basename(dev)}/stat").read_text().split()[6])


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def loop_ext4(work: Path) -> Iterator[tuple[str, Path]]:
    """A fresh ext4 on a loop device, mounted like the image's var: (the device, the mount point)."""
    backing, mount = work / "var.img", work / "var"
    with backing.open("wb") as f:
        f.truncate(VAR_BYTES)
    mount.mkdir()
    dev = run("losetup", "--find", "--show", str(backing))
    try:
        # Inode tables and the journal zeroed now: ext4's lazy init would write them (megabytes) during the window.
        run("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-L", "var", dev)
        run("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, dev, str(mount))
        try:
            yield dev, mount
        finally:
            run("umount", str(mount))
    finally:
        run("losetup", "--detach", dev)
        backing.unlink()
        mount.rmdir()


def store_for(pattern: Pattern, path: Path) -> Store:
    c = pattern.db
    cls = OldStore if pattern.prune_every else Store
    return cls(
        path,
        keep_samples=c.keep_samples,
        samples_per_commit=round(c.sample_flush / c.sample_interval),  # as supervisor.py computes them
        samples_per_row=round(c.sample_row / c.sample_interval),
    )


def measure(pattern: Pattern, work: Path, hours: int, pause: float) -> Result:
    c = pattern.db
    ticks = round(HOUR_S / c.sample_interval)
    with loop_ext4(work) as (dev, mount):
        path = mount / "llmos.db"
        store = store_for(pattern, path)
        store.record_start(version="bench", config_sources="bench", config_fallback="", model="default.gguf")
        # A device up for days: the table already full (its rows as this pattern writes them), so commits prune.
        with transaction(store.db):
            if pattern.at_index:
                store.db.execute("CREATE INDEX idx_samples_at ON samples(at)")
            t0 = time.time() - c.keep_samples * max(c.sample_row, c.sample_interval)
            store.db["samples"].insert_all(
                {"start_id": store.start_id, "at": t0 + i, "celsius": 45.0, "share": 1.0, "tokens": 0, "queue": 0}
                for i in range(c.keep_samples)
            )
        store.close()
        store = store_for(pattern, path)  # a start: the pruning at open and the migration happen before the window
        store.record_start(version="bench", config_sources="bench", config_fallback="", model="default.gguf")
        commits = 0

        def count(sql: str) -> None:
            nonlocal commits
            commits += sql.strip().upper() == "COMMIT"

        tick = 0
        sampler = Sampler(store, lambda: idle_status(tick), c.sample_interval)
        sampler._last_id = store.last_request_id()  # as start() does, without its thread
        run("sync", "-f", str(mount))
        time.sleep(pause)
        before = sectors_written(dev)
        store.db.conn.set_trace_callback(count)
        for _ in range(hours):
            for _ in range(ticks):
                sampler.sample()
                tick += 1
            time.sleep(pause)  # an hour's commit is alone in its ext4 journal commit, as on a device
        store.db.conn.set_trace_callback(None)
        store.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        run("sync", "-f", str(mount))
        after = sectors_written(dev)
        rows = int(store.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])
        store.close()
    return Result(pattern, (after - before) * 512, hours, rows, commits)


def patterns(image: Config) -> list[Pattern]:
    db = image.database
    per_sample = dataclasses.replace(db, sample_row=db.sample_interval)
    return [
        Pattern("before (a row per sample, index on at, pruned every 100 rows)", per_sample, True, OLD_PRUNE_EVERY),
        Pattern("a row per sample (sample_row = sample_interval)", per_sample),
        Pattern(f"the image's (sample_row {db.sample_row:g} s)", db),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=int, default=24, help="simulated idle hours per pattern")
    ap.add_argument("--pause", type=float, default=5.5, help="seconds waited after each simulated hour")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench-wear-host needs root (losetup, mkfs.ext4, mount)", file=sys.stderr)
        return 2
    report = begin()
    image = load_file(IMAGE_CONFIG)
    results = []
    with tempfile.TemporaryDirectory(prefix="llmos-wear-host-") as tmp:
        for p in patterns(image):
            print(f"{p.name}: {args.hours} simulated hours...", flush=True)
            results.append(measure(p, Path(tmp), args.hours, args.pause))
            r = results[-1]
            print(f"  {size(r.per_hour)} an idle hour, {size(r.per_day)} a day ({r.commits} commits)", flush=True)
    db = image.database
    lines = [
        f"The image's sample settings (rootfs-overlay/etc/llmos/llmos.yaml: a sample every {db.sample_interval:g} s, "
        f"committed every {db.sample_flush:g} s, {db.keep_samples} rows kept) run by the real Store and Sampler on a "
        f"fresh {VAR_BYTES >> 20} MB ext4 loop device mounted `{MOUNT_OPTIONS}`, the table already full; "
        f"{args.hours} simulated idle hours per pattern, a {args.pause:g} s pause after each (its own ext4 journal "
        "commit), a WAL checkpoint and a sync at the end; bytes from the loop device's sectors written.",
        "",
        "| pattern | rows an hour | commits | written an idle hour | a day |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        per_row = max(1, round(r.pattern.db.sample_row / r.pattern.db.sample_interval))
        rows_an_hour = HOUR_S / r.pattern.db.sample_interval / per_row
        lines.append(
            f"| {r.pattern.name} | {rows_an_hour:g} | {r.commits} | {size(r.per_hour)} | **{size(r.per_day)}** |"
        )
    body = "\n".join(lines)
    print(body)
    new = results[-1]
    report.verdict(
        "the samples' bytes a day, idle, image settings",
        size(new.per_day),
        f"<= {size(TARGET_DAY_BYTES)}",
        new.per_day <= TARGET_DAY_BYTES,
    )
    if args.write:
        report.write_section(
            "wear-host", "Flash wear of the samples on a host ext4 (issue 14)", "make bench-wear-host", body
        )
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
