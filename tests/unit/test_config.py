from pathlib import Path

import pytest

from llmos_edge.config import Config, load_file, load_layers, reference
from llmos_edge.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_apply_when_the_file_is_empty(tmp_path: Path) -> None:
    assert load_file(write(tmp_path, "")) == Config()


def test_values_override_defaults_and_ints_are_accepted_for_floats(tmp_path: Path) -> None:
    cfg = load_file(write(tmp_path, "model:\n  threads: 2\n  temperature: 1\nconsole:\n  device: none\n"))
    assert cfg.model.threads == 2 and cfg.model.temperature == 1.0 and cfg.console.device == "none"
    assert cfg.model.context == Config().model.context


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("model:\n  treads: 2\n", "unknown key model.treads"),
        ("modle:\n  threads: 2\n", "unknown section 'modle'"),
        ("model:\n  threads: two\n", "model.threads must be an integer"),
        ("model:\n  threads: true\n", "model.threads must be an integer"),
        ("model:\n  context: 8\n", "model.context is 8, below the minimum 64"),
        ("console:\n  echo: 1\n", "console.echo must be true or false"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("model: 3\n", "section model must be a mapping"),
        ("model:\n  path: [unclosed\n", "invalid YAML at line"),
        ("model:\n  threads: 1\nmodel:\n  context: 256\n", "duplicate key 'model'"),
    ],
)
def test_bad_input_gives_one_line_naming_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_file(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg and e.value.hint


def test_missing_and_binary_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such config file"):
        load_file(tmp_path / "nope.yaml")
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not a text file"):
        load_file(p)


def test_a_broken_override_falls_back_to_the_layers_below(tmp_path: Path) -> None:
    base = write(tmp_path, "model:\n  threads: 3\n", "base.yaml")
    bad = write(tmp_path, "model:\n  threads: lots\n", "override.yaml")
    loaded = load_layers([str(base)], [str(bad), str(tmp_path / "missing.yaml")])
    assert loaded.config.model.threads == 3
    assert "model.threads must be an integer" in loaded.fallback
    assert loaded.sources == ("defaults", str(base))


def test_the_example_config_is_valid() -> None:
    load_file(REPO / "examples" / "dev.yaml")


def test_readme_config_reference_matches_the_schema() -> None:
    assert reference() in (REPO / "README.md").read_text()
