"""image/foreignwheels.py: the arm64 image's wheel directory made from the host's set (the parts that need no
download: pure wheels, the cross-built llama-cpp-python, and what is no longer wanted). The downloads of compiled
wheels are exercised by `make image ARCH=arm64` (tests/image/test_arm64.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "image" / "foreignwheels.py"


def run(host: Path, llama: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--host-wheels", str(host), "--llama-wheels", str(llama), "--out", str(out)],
        capture_output=True,
        text=True,
    )


def wheel(d: Path, name: str, content: bytes = b"wheel") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(content)
    return d / name


def test_pure_wheels_are_copied_the_cross_built_llama_taken_and_stale_ones_removed(tmp_path: Path) -> None:
    host, llama, out = tmp_path / "host", tmp_path / "llama", tmp_path / "out"
    wheel(host, "pyserial-3.5-py2.py3-none-any.whl", b"serial")
    wheel(host, "llmos_edge-0.1.0-py3-none-any.whl", b"new build")
    wheel(host, "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl")
    wheel(llama, "llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl", b"arm")
    wheel(out, "llmos_edge-0.1.0-py3-none-any.whl", b"old build")  # the project's wheel, rebuilt since
    wheel(out, "tabulate-0.9.0-py3-none-any.whl")  # no longer a requirement
    r = run(host, llama, out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl",
        "llmos_edge-0.1.0-py3-none-any.whl",
        "pyserial-3.5-py2.py3-none-any.whl",
    ]
    assert (out / "llmos_edge-0.1.0-py3-none-any.whl").read_bytes() == b"new build"


def test_a_missing_cross_built_llama_wheel_is_one_line_with_a_hint(tmp_path: Path) -> None:
    host, llama, out = tmp_path / "host", tmp_path / "llama", tmp_path / "out"
    wheel(host, "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl")
    llama.mkdir()
    r = run(host, llama, out)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"foreignwheels: no aarch64 llama-cpp-python 0.3.36 wheel in {llama} (hint: make wheel ARCH=arm64)"
    ]


def test_a_file_that_is_not_a_wheel_is_named(tmp_path: Path) -> None:
    host, llama, out = tmp_path / "host", tmp_path / "llama", tmp_path / "out"
    wheel(host, "notes.whl")
    llama.mkdir()
    r = run(host, llama, out)
    assert r.returncode == 1 and "notes.whl is not a wheel's file name" in r.stderr, r.stderr
