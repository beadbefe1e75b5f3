"""Power cuts that lose the disk's write cache (issue 14), shared by test_power_cut.py (four cuts in `make test`;
test_image.py's cut of a streaming answer is a fifth) and bench/powercut.py (`make bench-powercut`, a hundred).

The disk is served by nbdkit through its cache filter in writeback mode (image/volatiledisk.py), so a cut loses every
write the guest has not flushed, as a real card or SSD with a volatile cache would. A cut comes at a random moment of
one of four kinds: while the device boots, while an answer streams, while a model installs from a USB stick, right
after an answer. After the cuts the disk must hold every request answered before a cut (a row is committed with
synchronous=FULL, so flushed, before its prompt comes back), pass `integrity_check`, and hold no half-done install.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import ANSWER_END, BOOT_TIMEOUT, PROMPT, ROOT, STICK, Boot, boot, copy_from_var, start

KINDS = ("booting", "streaming", "installing", "after an answer")


def seed() -> int:
    """The commit under test seeds the cut moments (a rerun cuts at the same moments); LLMOS_POWERCUT_SEED
    overrides it."""
    if os.environ.get("LLMOS_POWERCUT_SEED"):
        return int(os.environ["LLMOS_POWERCUT_SEED"])
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    return int(head[:8] or "0", 16)


WORDS = ["stone", "river", "cloud", "apple", "table", "green", "light", "ocean", "tiger", "piano", "maple", "frost"]


@dataclass
class Cuts:
    disk: Path
    rng: random.Random
    stick: Path
    answered: list[str] = field(default_factory=list)  # prompts answered before some cut: their rows must survive
    done: list[str] = field(default_factory=list)  # what each cut interrupted

    def ask_unique(self, b: Boot) -> None:
        prompt = f"reverse {self.rng.choice(WORDS)}{len(self.answered)}"  # unique, so its row can be found
        b.console.ask(prompt, timeout=300)
        self.answered.append(prompt)

    def cut(self, kind: str, name: str) -> str:
        """Boot, do what `kind` says, and cut the power at a random moment of it; returns what was cut. A boot that
        does not come up raises (TimeoutError): the previous cut was not survived."""
        if kind == "booting":  # between QEMU's start and the first prompt (30-150 s under TCG), or just after it
            vm, console = start(self.disk, name, volatile_cache=True)
            try:
                at = self.rng.uniform(15, 90)
                try:
                    console.read_until(PROMPT, at)
                    what = f"booting, after the prompt ({at:.0f} s)"
                except TimeoutError:
                    what = f"booting ({at:.0f} s)"
                vm.power_cut()
            finally:
                console.close()
                vm.close()
            self.done.append(what)
            return what
        b = boot(self.disk, name, volatile_cache=True, usb_stick=self.stick if kind == "installing" else None)
        try:
            what = self._act(kind, b)
            b.power_cut()
        finally:
            b.console.close()
            assert b.vm is not None
            b.vm.close()
        self.done.append(what)
        return what

    def _act(self, kind: str, b: Boot) -> str:
        if kind == "streaming":  # after a few answers (so flushed), while a long one streams
            for _ in range(2):
                self.ask_unique(b)
            b.console.send_line("tell me everything about llmos edge and the serial console and the database")
            b.console.read_until(b"\r\n", 30)  # the echo; the answer streams after it
            time.sleep(self.rng.uniform(0.0, 3.0))
            streamed = b.console.read_some(5)
            return "streaming" if ANSWER_END not in streamed else "streaming (the answer had ended)"
        if kind == "installing":  # copy, hash, fsync, rename, register, gate; after an answer
            self.ask_unique(b)
            b.console.send_line(f"/model install {STICK}/good.gguf")
            at = self.rng.uniform(0.0, 15.0)
            try:
                b.console.read_until(PROMPT, at)
                return f"after the install had ended ({at:.1f} s)"
            except TimeoutError:
                return f"installing ({at:.1f} s in)"
        assert kind == "after an answer", kind  # its row has just been committed
        self.ask_unique(b)
        return "right after an answer"

    def final_boot(self, name: str) -> None:
        """The device comes up again, answers, and powers off cleanly."""
        last = boot(self.disk, name, volatile_cache=True)
        try:
            assert last.console.ask("ping") == "pong"
            last.shutdown(timeout=BOOT_TIMEOUT)
        finally:
            assert last.vm is not None
            last.vm.close()

    def problems(self, workdir: Path) -> list[str]:
        """What the disk, read on the host after a clean power-off, holds that it must not (empty: all well)."""
        found: list[str] = []
        db = sqlite3.connect(copy_from_var(self.disk, "/lib/llmos", workdir / "var") / "llmos.db")
        check = db.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            found.append(f"integrity_check: {check}")
        prompts = {r[0] for r in db.execute("SELECT prompt FROM requests")}
        missing = [p for p in self.answered if p not in prompts]
        if missing:
            found.append(f"requests answered before a cut are gone: {missing}")
        # The image commits request rows an hour at a time (database.request_flush): an answer before a cut is kept
        # by the request ring alone, and the boot after the cut takes it into the database. Show that it did.
        replayed = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'ring_replayed'").fetchone()[0]
        if self.answered and not replayed:
            found.append("answers came before cuts, yet no boot took request rows from the request ring")
        # No install left half done: the last boot's recovery removed what a cut left, and what is registered is
        # whole (the built-in model, on the read-only root, has no sha256).
        rows = db.execute("SELECT path, sha256, state FROM models WHERE state != 'removed' AND sha256 != ''")
        registered = {Path(path).name: (sha, state) for path, sha, state in rows}
        files = copy_from_var(self.disk, "/lib/llmos/models", workdir / "models")
        present = (
            {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files.iterdir()} if files.is_dir() else {}
        )
        present = {name: sha for name, sha in present.items() if not name.endswith(".golden.jsonl")}
        if any(registered.get(name, ("",))[0] != sha for name, sha in present.items()) or any(
            name not in present for name, (_, state) in registered.items() if state != "failed"
        ):
            found.append(f"the model store: files {present}, registered {registered}")
        db.close()
        return found

    def starts(self, workdir: Path) -> int:
        db = sqlite3.connect(workdir / "var" / "llmos" / "llmos.db")
        try:
            return int(db.execute("SELECT COUNT(*) FROM starts").fetchone()[0])
        finally:
            db.close()
