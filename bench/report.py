"""What every benchmark shares: its verdict on each target (a `MISSED` line and a failing exit code when it misses),
and its section of BENCHMARKS.md with the command, the machine, the commit and the load average around the run.

    report = begin()  # first thing: the commit measured and the load average at the start
    ...measure...
    report.verdict("decode ratio llmos / raw", f"{ratio:.3f}", ">= 0.97", ratio >= 0.97)
    report.write_section("decode", "Decode throughput", "make bench-decode", body)
    return report.exit_code()
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\nWritten by `make bench`; every figure below was measured by the command shown with it, at the "
    "commit and\nload average shown with it, and each section ends with its verdicts (`MISSED` when a target was "
    "missed).\n"
)
# What the benchmarks themselves write: `make bench` runs one after another, and the first one's section must not
# make the next one's commit look modified.
OUTPUTS = ("BENCHMARKS.md", "bench/*.png")

LoadAverage = tuple[float, float, float]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def commit(repo: Path = REPO) -> str:
    """The checked-out commit, short, with `-dirty` when tracked files other than the benchmarks' own outputs
    differ from it (so the figures were measured on code no commit holds)."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    changes = git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in OUTPUTS))
    return head.stdout.strip() + ("-dirty" if changes.stdout.strip() else "")


def load_average() -> LoadAverage:
    """The kernel's 1, 5 and 15 minute load averages: on a shared machine, how much else was running."""
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def busy_machine(load_1min: float) -> str:
    """A sentence for a section measured while other work kept more threads runnable than there are CPUs (the
    inference threads then wait for each other at every step), or "" on a machine quiet enough."""
    cpus = os.cpu_count() or 1
    if load_1min <= cpus:
        return ""
    return (
        f"\n**Busy machine:** the 1-minute load average was {load_1min:.2f} on {cpus} CPUs at the start; other "
        "processes' threads interleaved with the inference threads, so these figures measure that contention more "
        "than llmos. Rerun on a quiet machine before reading the ratio.\n"
    )


def _load(load: LoadAverage) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def verdict_line(name: str, measured: str, target: str, ok: bool) -> str:
    return f"{'met' if ok else 'MISSED'} {name}: {measured} (target {target})"


@dataclass
class Report:
    """One benchmark run: the commit and load average at its start, and its verdicts so far."""

    commit: str
    load_start: LoadAverage
    verdicts: list[str] = field(default_factory=list)
    missed: int = 0

    def verdict(self, name: str, measured: str, target: str, ok: bool) -> bool:
        """Print `met ...` or `MISSED ...` for one figure against its target, and remember it for the section and
        the exit code. Returns `ok`."""
        line = verdict_line(name, measured, target, ok)
        print(line, flush=True)
        self.verdicts.append(line)
        self.missed += not ok
        return ok

    def exit_code(self) -> int:
        """The script's exit status: 1 when any target was missed, so `make bench` fails."""
        return 1 if self.missed else 0

    def provenance(self) -> str:
        """Commit and load averages, as written with every section."""
        return (
            f"Commit: {self.commit}  \nLoad average (1 / 5 / 15 min): {_load(self.load_start)} at the start, "
            f"{_load(load_average())} at the end"
        )

    def write_section(self, name: str, title: str, command: str, body: str, path: Path = BENCHMARKS) -> None:
        """Write (or replace) the section `name` of BENCHMARKS.md: command, machine, date, commit, load averages,
        the figures in `body`, then the verdicts."""
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        verdicts = "".join(f"- {line}\n" for line in self.verdicts) if self.verdicts else "- no target (report only)\n"
        section = (
            f"{start}\n## {title}\n\nCommand: `{command}`  \nMachine: {machine()}  \nDate: {date}  \n"
            f"{self.provenance()}\n\n{body.rstrip()}\n\nVerdict:\n\n{verdicts}{end}"
        )
        text = path.read_text() if path.exists() else HEADER
        if start in text:
            text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _m: section, text, flags=re.S)
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
        path.write_text(text)


def begin(repo: Path = REPO) -> Report:
    """Call first, before measuring: the commit and the load average are those the figures were measured under."""
    return Report(commit(repo), load_average())
