"""bench/report.py: the verdicts, the commit and the load average every benchmark records with its figures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench.report import HEADER, begin, busy_machine, commit, load_average


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A real git repository with one commit holding code and a BENCHMARKS.md."""
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "bench@example.invalid")
    git(tmp_path, "config", "user.name", "bench")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "BENCHMARKS.md").write_text(HEADER)
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_commit_is_the_short_head_of_a_clean_tree(repo: Path) -> None:
    assert commit(repo) == git(repo, "rev-parse", "--short", "HEAD")


def test_commit_is_dirty_when_tracked_code_changed(repo: Path) -> None:
    (repo / "code.py").write_text("x = 2\n")
    assert commit(repo) == git(repo, "rev-parse", "--short", "HEAD") + "-dirty"


def test_a_staged_change_is_dirty_too(repo: Path) -> None:
    (repo / "code.py").write_text("x = 3\n")
    git(repo, "add", "code.py")
    assert commit(repo).endswith("-dirty")


def test_the_benchmarks_own_outputs_do_not_make_the_tree_dirty(repo: Path) -> None:
    # `make bench` runs one benchmark after another; each writes BENCHMARKS.md (and thermal a plot).
    (repo / "BENCHMARKS.md").write_text(HEADER + "\nfigures\n")
    (repo / "bench").mkdir()
    (repo / "bench" / "thermal.png").write_bytes(b"png")
    (repo / "notes.txt").write_text("untracked files are not part of any commit\n")
    assert commit(repo) == git(repo, "rev-parse", "--short", "HEAD")


def test_commit_outside_a_git_checkout_says_so(tmp_path: Path) -> None:
    assert commit(tmp_path) == "unknown (not a git checkout)"


def test_load_average_is_the_kernels() -> None:
    # getloadavg(3) gives the kernel's fixed-point figures in full; /proc/loadavg rounds them to two decimals. The
    # kernel updates them every 5 s, so at most one update falls between the reads: ours is the one before or after.
    before = os.getloadavg()
    ours = load_average()
    after = os.getloadavg()

    def same(precise: tuple[float, float, float]) -> bool:
        return all(abs(a - b) <= 0.0051 for a, b in zip(ours, precise, strict=True))

    assert len(ours) == 3 and (same(before) or same(after)), (ours, before, after)
    assert all(x >= 0 for x in ours)


def test_a_met_target_prints_met_and_exits_zero(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = begin(repo)
    assert report.verdict("decode ratio", "0.990", ">= 0.97", True) is True
    assert capsys.readouterr().out == "met decode ratio: 0.990 (target >= 0.97)\n"
    assert report.exit_code() == 0


def test_one_missed_target_prints_missed_and_exits_one(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = begin(repo)
    report.verdict("p50", "900 ms", "<= 1200 ms", True)
    assert report.verdict("p95", "1600 ms", "<= 1500 ms", False) is False
    report.verdict("answered", "10 of 10", "all", True)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "met p50: 900 ms (target <= 1200 ms)",
        "MISSED p95: 1600 ms (target <= 1500 ms)",
        "met answered: 10 of 10 (target all)",
    ]
    assert report.exit_code() == 1


def test_the_section_records_commit_load_averages_and_verdicts(repo: Path) -> None:
    report = begin(repo)
    report.verdict("ratio", "2.10x", "<= 1.5x", False)
    path = repo / "BENCHMARKS.md"
    report.write_section("scheduling", "Time to first token", "make bench-scheduling", "| a | b |\n", path)
    text = path.read_text()
    section = text[text.index("<!-- bench:scheduling -->") : text.index("<!-- /bench:scheduling -->")]
    assert f"Commit: {git(repo, 'rev-parse', '--short', 'HEAD')}  \n" in section
    start = " / ".join(f"{x:.2f}" for x in report.load_start)
    assert f"Load average (1 / 5 / 15 min): {start} at the start, " in section
    end = section.split(" at the start, ", 1)[1].split(" at the end", 1)[0]
    assert len([float(x) for x in end.split(" / ")]) == 3
    assert "- MISSED ratio: 2.10x (target <= 1.5x)\n" in section
    assert section.index("| a | b |") < section.index("MISSED")


def test_rewriting_a_section_replaces_it_and_keeps_the_others(repo: Path) -> None:
    path = repo / "BENCHMARKS.md"
    first = begin(repo)
    first.verdict("ratio", "0.90", ">= 0.97", False)
    first.write_section("decode", "Decode", "make bench-decode", "old figures", path)
    begin(repo).write_section("voice-devset", "Devset", "make bench-voice-devset", "recognised 1/2", path)
    second = begin(repo)
    second.verdict("ratio", "0.99", ">= 0.97", True)
    second.write_section("decode", "Decode", "make bench-decode", "new figures", path)
    text = path.read_text()
    assert text.startswith(HEADER)
    assert text.count("<!-- bench:decode -->") == 1 and "old figures" not in text
    decode = text[text.index("<!-- bench:decode -->") : text.index("<!-- /bench:decode -->")]
    assert "new figures" in decode and "- met ratio: 0.99 (target >= 0.97)" in decode and "MISSED" not in decode
    assert "recognised 1/2" in text and "- no target (report only)" in text


def test_a_section_measured_on_a_busy_machine_says_so() -> None:
    cpus = os.cpu_count() or 1
    assert busy_machine(cpus * 0.5) == ""
    note = busy_machine(cpus + 2.5)
    assert "Busy machine" in note and f"{cpus + 2.5:.2f} on {cpus} CPUs" in note
