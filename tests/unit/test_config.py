import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmos_edge.config import (
    LAST_GOOD,
    RULES,
    Config,
    broken_rule,
    last_good_path,
    load_file,
    load_layers,
    reference,
    save_last_good,
)
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


def test_the_documented_config_reference_matches_the_schema() -> None:
    assert reference() in (REPO / "docs" / "configuration.md").read_text()


def test_the_defaults_keep_every_rule_between_keys_and_the_rules_name_real_keys() -> None:
    assert broken_rule(Config()) is None
    assert all(f"| `{key}` |" in reference() for rule in RULES for key in rule.keys)


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        ("model:\n  context: 256\n  max_tokens: 256\n", ["model.max_tokens", "model.context"]),
        ("governor:\n  setpoint: 85\n", ["governor.setpoint", "governor.critical"]),
        ("governor:\n  cool_margin: 20\n", ["governor.critical", "governor.cool_margin", "governor.setpoint"]),
        ("scheduler:\n  aging: 4000\n", ["scheduler.aging", "scheduler.deadline_background"]),
        ("voice:\n  listen_seconds: 0.3\n", ["voice.listen_seconds", "voice.end_silence_ms"]),
        ("console:\n  device: /dev/ttyGS0\n  also: /dev/ttyGS0\n", ["console.also", "console.device"]),
        ("console:\n  also: kernel\n", ["console.also", "console.device"]),
    ],
)
def test_keys_that_contradict_each_other_give_one_line_naming_file_and_keys(
    tmp_path: Path, text: str, keys: list[str]
) -> None:
    p = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_file(p)
    msg = str(e.value)
    assert str(p) in msg and all(k in msg for k in keys) and "\n" not in msg and e.value.hint


def test_rules_that_need_no_check_pass(tmp_path: Path) -> None:
    cfg = load_file(write(tmp_path, "voice:\n  listen_seconds: 0\n  wake_word: computer\n"))
    assert cfg.voice.listen_seconds == 0
    cfg = load_file(write(tmp_path, "voice:\n  listen_seconds: 0.2\n  wake_word: ''\n"))  # no wake word: no window
    assert cfg.voice.listen_seconds == 0.2
    cfg = load_file(write(tmp_path, "console:\n  device: none\n  also: none\n"))  # nothing shared
    assert cfg.console.also == "none"


def test_rules_are_checked_on_the_merged_layers_not_file_by_file(tmp_path: Path) -> None:
    hot = write(tmp_path, "governor:\n  setpoint: 90\n", "base.yaml")  # alone: above the default critical 85
    hotter = write(tmp_path, "governor:\n  critical: 100\n", "override.yaml")
    loaded = load_layers([str(hot)], [str(hotter)])
    assert loaded.fallback == ""
    assert (loaded.config.governor.setpoint, loaded.config.governor.critical) == (90.0, 100.0)


def test_the_file_that_breaks_a_rule_of_the_merged_whole_is_the_one_skipped(tmp_path: Path) -> None:
    base = write(tmp_path, "governor:\n  setpoint: 80\n", "base.yaml")
    override = write(tmp_path, "governor:\n  critical: 78\n  interval: 2\n", "override.yaml")
    loaded = load_layers([str(base)], [str(override)])
    assert loaded.sources == ("defaults", str(base))
    assert loaded.config.governor.setpoint == 80.0 and loaded.config.governor.interval == 1.0
    assert loaded.fallback.startswith(f"{override}: governor.setpoint must be below governor.critical")


def test_the_last_good_configuration_round_trips(tmp_path: Path) -> None:
    cfg = load_file(write(tmp_path, "voice:\n  enabled: 'off'\nconsole:\n  device: none\nmodel:\n  threads: 3\n"))
    p = tmp_path / "var" / LAST_GOOD
    save_last_good(cfg, p)
    assert load_file(p) == cfg
    assert p.read_text().startswith("# The last configuration that loaded and reached READY")
    assert [f.name for f in p.parent.iterdir()] == [LAST_GOOD]  # no temporary file left behind


def test_a_broken_file_falls_back_to_the_last_configuration_that_worked(tmp_path: Path) -> None:
    base = write(tmp_path, "model:\n  threads: 3\n", "base.yaml")
    override = write(tmp_path, "model:\n  max_tokens: 64\n", "override.yaml")
    lg = last_good_path(tmp_path / "var" / "llmos.db")
    good = load_layers([str(base)], [str(override)], last_good=lg)
    assert good.fallback == "" and good.config.model.max_tokens == 64
    save_last_good(good.config, lg)  # what the supervisor does once it is READY

    base.write_text("model:\n  threads: 4\n")  # the layers below change too: they never ran with this override
    override.write_text("model:\n  max_tokens: lots\n")
    loaded = load_layers([str(base)], [str(override)], last_good=lg)
    assert loaded.config == good.config
    assert loaded.sources == ("defaults", str(lg))
    assert "model.max_tokens must be an integer" in loaded.fallback
    assert re.search(
        r"; running the last configuration that worked \(saved \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)$", loaded.fallback
    )


def test_without_a_usable_last_good_configuration_the_layers_below_run(tmp_path: Path) -> None:
    base = write(tmp_path, "model:\n  threads: 3\n", "base.yaml")
    override = write(tmp_path, "model:\n  threads: lots\n", "override.yaml")
    missing = load_layers([str(base)], [str(override)], last_good=tmp_path / "none" / LAST_GOOD)
    assert missing.config.model.threads == 3 and missing.sources == ("defaults", str(base))
    broken = write(tmp_path, "governor:\n  setpoint: 99\n", LAST_GOOD)  # from an older schema, say
    loaded = load_layers([str(base)], [str(override)], last_good=broken)
    assert loaded.config.model.threads == 3 and loaded.sources == ("defaults", str(base))
    assert "could not be used either" in loaded.fallback and "governor.setpoint" in loaded.fallback


# In a child process: RLIMIT_FSIZE makes any write past 1000 bytes fail (EFBIG), as a full disk would mid-file.
SAVE_ON_A_FULL_DISK = """
import resource, signal, sys
from llmos_edge.config import Config, save_last_good
from llmos_edge.errors import UserError

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    save_last_good(Config(), sys.argv[1])
except UserError as e:
    print(e)
"""


def test_a_save_that_fails_half_way_keeps_the_previous_file_whole(tmp_path: Path) -> None:
    lg = tmp_path / LAST_GOOD
    save_last_good(Config(), lg)
    before = lg.read_bytes()
    r = subprocess.run(
        [sys.executable, "-c", SAVE_ON_A_FULL_DISK, lg], capture_output=True, text=True, timeout=60, check=True
    )
    assert r.stdout.startswith(f"cannot save the last good configuration to {lg}")
    assert lg.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == [LAST_GOOD]
