"""Write one benchmark's results into its own section of BENCHMARKS.md, with the command and the machine."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nWritten by `make bench`; every figure below was measured by the command shown with it.\n"


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


def write_section(name: str, title: str, command: str, body: str) -> None:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (
        f"{start}\n## {title}\n\nCommand: `{command}`  \nMachine: {machine()}  \nDate: {date}\n\n{body.rstrip()}\n{end}"
    )
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _m: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS.write_text(text)
