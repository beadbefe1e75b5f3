from __future__ import annotations

from pathlib import Path

import pytest

from llmos_edge.durable import remove, write_atomically


def test_a_file_is_replaced_whole_and_no_temporary_file_stays(tmp_path: Path) -> None:
    target = tmp_path / "request"
    target.write_text("old\n")
    assert write_atomically(target, "new\n") == target
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["request"]


def test_a_missing_directory_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "no" / "request", "x")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "request"
    target.mkdir()  # a directory where the file should go: the rename fails
    with pytest.raises(OSError):
        write_atomically(target, "x")
    assert target.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["request"]


def test_a_removed_file_is_gone_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    target = write_atomically(tmp_path / "update.request", "/media/UPDATE\n")
    remove(target)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        remove(target)
