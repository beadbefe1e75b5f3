"""The appliance image, booted in QEMU and driven over its serial console like a person at a terminal.

The tests share boots (each costs 1-2 minutes under software emulation) and run in file order: first boot and
questions (a machine without a sound card, with a "USB stick" of models plugged in), models installed from the
stick, a pair taught, then a power cut while an answer streams (the first boot's disk is served through nbdkit's
writeback cache, so the cut loses what was not flushed: see test_power_cut.py), a second boot (in a CPU without AVX2)
that answers the taught question and consolidates it into a new version of the model's weights, a clean shutdown,
and checks of the disk from the host; last, the same card in another machine (a CPU without AVX2, with a sound
card), with the taught-answer lookup switched off in its config override: the taught answer now comes from the
weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import (
    ANSWER_END,
    DISK_OVERRIDE,
    ROOT,
    STICK,
    VOICE_NOT_INSTALLED,
    Boot,
    boot,
    copy_from_var,
    esp_files,
    extract_root,
    heldout,
    host_answers,
    image_version,
    journal,
    measure,
    partitions,
    root_digest,
    root_label,
    write_to_var,
)
from powercut import seed

from llmos_edge import netpolicy
from llmos_edge.config import Config, HttpConfig

# Variants without AVX2 in the llama.cpp wheel's runtime dispatch (everything else uses AVX2 or more).
NO_AVX2_VARIANTS = {"x64", "sse42", "sandybridge", "ivybridge", "piledriver"}


def status(console_boot: Boot) -> str:
    return console_boot.console.ask("/status", timeout=60)


def cpu_variant(status_text: str) -> str:
    m = re.search(r"\bcpu ([\w-]+)", status_text)
    assert m, f"/status names no CPU variant:\n{status_text}"
    return m.group(1)


def voice_line(b: Boot, timeout: float = 300) -> str:
    """The /status voice line once the front-end has started or given up (it starts after READY)."""
    deadline = time.monotonic() + timeout
    while True:
        text = status(b)
        m = re.search(r"^voice: .*$", text, re.M)
        assert m, f"/status has no voice line:\n{text}"
        if m.group(0) != "voice: starting" or time.monotonic() > deadline:
            return m.group(0)
        time.sleep(5)


def sample_heldout(per_task: int = 4) -> list[dict[str, str]]:
    """A seeded random sample, stratified: FAQ prompts from `per_task` different intents (answers) and reverse
    prompts of `per_task` different word lengths. The seed is the commit under test, so a rerun asks the same, and
    over the commits every intent and length is asked (each answer costs seconds under software emulation)."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    rng = random.Random(int(head[:8] or "0", 16))
    strata: dict[tuple[str, object], list[dict[str, str]]] = {}
    for row in heldout():
        key = (row["task"], row["answer"] if row["task"] == "faq" else len(row["answer"]))
        strata.setdefault(key, []).append(row)
    picked = []
    for task in sorted({t for t, _ in strata}):
        keys = sorted((k for k in strata if k[0] == task), key=str)
        for key in rng.sample(keys, min(per_task, len(keys))):
            picked.append(rng.choice(strata[key]))
    return picked


ASKED: list[str] = []  # prompts answered before the power cut: their rows must survive it


def test_boots_to_the_llmos_prompt(device: Boot) -> None:
    assert device.wall_s > 0
    assert device.console.ask("/help").startswith("Type a question")


def test_ping_answers_pong(device: Boot) -> None:
    assert device.console.ask("ping") == "pong"
    ASKED.append("ping")


def test_a_program_asks_over_the_uart_in_machine_mode(device: Boot) -> None:
    """docs/protocol.md over the image's UART: /json, one question as a JSON line, its token and done events under
    the id we chose, then back to the human prompt."""
    con = device.console
    con.send_line("/json")
    con.read_until(b'{"event":"mode","mode":"json"}\r\n', 60)  # after the echo of /json (and any kernel noise)
    con.port.write(b'{"op": "submit", "id": "uart-1", "prompt": "reverse stone"}\n')
    events, noise = [], []
    while not events or events[-1]["event"] != "done":
        line = con.read_until(b"\n", 120).strip()
        if line.startswith(b"{"):
            events.append(json.loads(line))
        else:  # the kernel shares the UART (docs/protocol.md): a program skips what is not an event
            noise.append(line)
    assert events[0]["event"] == "accepted" and {e["id"] for e in events} == {"uart-1"}, (events, noise)
    assert "".join(e["text"] for e in events if e["event"] == "token").strip() == "enots", events
    assert events[-1]["outcome"] == "ok" and events[-1]["tokens_out"] > 0, events
    ASKED.append("reverse stone")
    con.port.write(b'{"op": "exit"}\n')
    out = con.read_until(ANSWER_END, 60)  # the mode event, then the human prompt
    assert b'{"event":"mode","mode":"human"}' in out, out
    assert con.ask("ping") == "pong"


def test_heldout_prompts_are_answered_exactly(device: Boot, image: Path) -> None:
    """Every sampled FAQ and reverse prompt gets the held-out answer exactly, or, where the model itself gets
    it wrong, exactly the answer the same model gives through llama.cpp on the host (the image changes nothing)."""
    rows = sample_heldout()
    if not rows:
        pytest.skip("model/heldout.jsonl is not there yet")
    model = ROOT / "model" / "llmos-tiny-q8_0.gguf"
    reference = host_answers(model, [r["prompt"] for r in rows]) if model.exists() else None
    wrong, right = [], 0
    for i, row in enumerate(rows):
        answer = device.console.ask(row["prompt"])
        ASKED.append(row["prompt"])
        if answer == row["answer"].strip():
            right += 1
        elif reference is None or answer != reference[i]:
            host = f", host llama.cpp {reference[i]!r}" if reference else ""
            wrong.append(f"{row['task']}: {row['prompt']!r} -> {answer!r}, expected {row['answer']!r}{host}")
    measure("heldout_exact_in_image", f"{right}/{len(rows)}")
    assert not wrong, "\n".join(wrong)


def test_status_shows_model_memory_and_a_fast_cpu_variant(device: Boot) -> None:
    text = status(device)
    assert re.search(r"^model: .+default\.gguf", text, re.M), text
    assert re.search(r"^memory: supervisor [\d.]+ ?MiB, engine [\d.]+ ?MiB", text, re.M), text
    # flash wear (issue 14): the database's partition found and its written bytes read from sysfs, in the sandbox
    assert re.search(r"^flash: [\d.]+ (B|kB|MB|GB) written to /var\S* \(\w+\) since start", text, re.M), text
    if device.vm is not None and device.vm.cfg.cpu in ("", "max"):
        # QEMU's `max` CPU has AVX2: runtime dispatch must pick a variant that uses it.
        assert cpu_variant(text) not in NO_AVX2_VARIANTS, text
    measure("status_first_boot", text)
    m = re.search(r"([\d.]+) tok/s", text)
    if m:
        measure("tok_s_guest_cpu_max", float(m.group(1)))


def test_qemu_has_no_thermal_sensor_and_says_so(device: Boot) -> None:
    if device.vm is None:
        pytest.skip("a real device may well have a thermal sensor")
    text = device.console.ask("/status")
    assert "thermal: no thermal sensor (not throttling)" in text
    assert "memory budget: engine" in text and "estimate" in text


def test_without_a_sound_card_voice_says_no_microphone(device: Boot, has_voice: bool) -> None:
    """QEMU's default machine has no sound card: the voice front-end stays off and /status says why (on an image
    built without voice: that it is not installed)."""
    if device.vm is None:
        pytest.skip("a real device may well have a microphone")
    assert voice_line(device) == ("voice: no microphone" if has_voice else VOICE_NOT_INSTALLED)


INSTALL_TIMEOUT = 900  # copy, hash, load and gate a model under software emulation, with margin


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no output"
    return lines[-1]


def test_a_model_from_the_usb_stick_installs_and_answers(device: Boot) -> None:
    """good.gguf passes its gate (the GGUF's own ping -> pong self-test) and becomes the active model."""
    out = device.console.ask(f"/model install {STICK}/good.gguf", timeout=INSTALL_TIMEOUT)
    assert last_line(out).startswith("model: active good"), out
    assert device.console.ask("ping") == "pong"
    assert re.search(r"^good\b[^;\n]*\bactive\b", device.console.ask("/model"), re.M)


def test_a_model_that_fails_its_gate_is_rolled_back(device: Boot) -> None:
    """bad.gguf comes with a sidecar of golden prompts (bad.golden.jsonl) whose answer it never gives: the store
    rolls back to the model that was active, which goes on answering."""
    out = device.console.ask(f"/model install {STICK}/bad.gguf", timeout=INSTALL_TIMEOUT)
    final = last_line(out)
    assert final.startswith("model: bad failed its gate") and "rolled back to good" in final, out
    assert device.console.ask("ping") == "pong"
    listing = device.console.ask("/model")
    assert re.search(r"^good\b[^;\n]*\bactive\b", listing, re.M), listing
    assert re.search(r"^bad\b[^;\n]*\bfailed\b", listing, re.M), listing


def test_the_default_model_can_be_activated_again(device: Boot) -> None:
    """Back to the built-in model, for the tests below (and the second boot) that expect it."""
    out = device.console.ask("/model activate default", timeout=INSTALL_TIMEOUT)
    assert last_line(out).startswith("model: active default"), out
    assert re.search(r"^model: .+default\.gguf", status(device), re.M)
    assert device.console.ask("ping") == "pong"


TAUGHT_QUESTION = "what is the wi-fi password"
TAUGHT_ANSWER = "It is on the sticker under the box."
# One pair on tests/image/consolidate.yaml's budget in the Nehalem guest: 40 steps and 82 answers took 952 s in a
# fresh-clone CI run (docs/learning.md); this budget is 24 steps and 42 answers. The margin is for busier host cores.
CONSOLIDATE_TIMEOUT = 1500
AFTER_CUT: list[Boot] = []  # the boot after the power cut, running until the clean shutdown below
ROOT_BEFORE: list[str] = []  # the root partition's digest before the first boot's power cut


def test_power_cut_while_streaming_keeps_the_database(device: Boot, disk: Path) -> None:
    if device.vm is None:
        pytest.skip("a real device: no power switch to pull from here")
    # Let everything asked so far be committed (synchronous=FULL commits before the prompt comes back).
    root_before = root_digest(disk)
    console = device.console
    # Issue 15: a pair taught over the serial console is committed before its reply, so it survives the cut
    taught = console.ask(f"/teach {TAUGHT_QUESTION} => {TAUGHT_ANSWER}")
    assert last_line(taught).startswith("taught #"), taught
    console.send_line("tell me everything about llmos edge and the serial console and the database")
    console.read_until(b"\r\n", 30)  # the echo of the question; the answer starts after it
    streamed = console.read_some(30)
    assert streamed, "no answer started streaming"
    # The plug is pulled (SIGKILL by PID, the disk's unflushed writes lost) at a random moment of the answer's first
    # seconds, seeded by the commit under test like the other cuts (powercut.py): one of make test's five random cuts.
    at = random.Random(seed()).uniform(0.0, 2.0)
    time.sleep(at)
    streamed += console.read_some(0.1)
    device.power_cut()
    measure("power_cut_mid_answer", {"after_first_tokens_s": round(at, 2), "answer_ended": b"llmos> " in streamed})

    ROOT_BEFORE.append(root_before)
    # The card boots again in a CPU without AVX2 (Nehalem), where the test below consolidates: under QEMU's software
    # emulation its SSE kernels run faster than the AVX2 ones `-cpu max` gets: OpenBLAS's about 3.5 times (training),
    # llama.cpp's sse42 variant about 9 times (validation's answers); measured with qemu-user, docs/learning.md.
    second = boot(disk, "after-power-cut", cpu="Nehalem")
    AFTER_CUT.append(second)  # shut down cleanly by the test after the next, whatever happens here
    measure("boot_wall_s_to_ready_after_power_cut", round(second.wall_s, 1))
    assert second.console.ask("ping") == "pong"
    # a variant of the taught question (case, punctuation, politeness) gets the taught answer after the reboot
    assert second.console.ask("Hey llmos, what is the Wi-Fi password?") == TAUGHT_ANSWER
    text = status(second)
    measure("status_after_power_cut", text)


def test_consolidation_puts_the_taught_pair_into_a_new_version_of_the_weights() -> None:
    """Issue 15, point 5: /consolidate fine-tunes the built-in model on the taught pair in the device, validates it
    (the taught pair exact from the weights alone, the held-out sample within the override's bar) and activates it
    as taught-1 through the gate. That the answer then comes from the weights is heard at the next boot, with the
    lookup switched off (the machine with a sound card, below)."""
    if not AFTER_CUT:
        pytest.skip("no boot after the power cut (a real device, or the power cut test failed)")
    c = AFTER_CUT[0].console
    said = c.ask("/consolidate")
    # (or it started by itself, after learning.consolidate_after idle seconds)
    assert said in (
        "consolidation: 1 taught pairs will be consolidated when no request is running",
        "consolidation: run 1 running (1 pairs)",
    ), said
    started = time.monotonic()
    line = c.ask("/consolidate status")
    while "last run" not in line:
        assert time.monotonic() - started < CONSOLIDATE_TIMEOUT, f"no consolidation finished: {line}"
        time.sleep(15)  # a console command, not a request: it does not pause the run
        line = c.ask("/consolidate status")
    measure("consolidation_one_pair_in_image", {"wall_s": round(time.monotonic() - started), "status": line})
    assert "last run 1: activated, taught 1/1" in line, line
    models = c.ask("/model")
    assert re.search(r"^taught-1\b[^;\n]*\bactive\b", models, re.M), models
    assert c.ask(TAUGHT_QUESTION) == TAUGHT_ANSWER


def test_after_the_power_cut_the_disk_keeps_the_database_and_the_root(disk: Path, tmp_path: Path) -> None:
    """After the second boot's clean shutdown, read off the disk: what the first boot answered before the cut."""
    if not AFTER_CUT:
        pytest.skip("no boot after the power cut (a real device, or the power cut test failed)")
    AFTER_CUT[0].shutdown()
    db_dir = copy_from_var(disk, "/lib/llmos", tmp_path / "var")
    conn = sqlite3.connect(db_dir / "llmos.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    prompts = {row[0] for row in conn.execute("SELECT prompt FROM requests")}
    missing = [p for p in ASKED if p not in prompts]
    assert not missing, f"requests answered before the power cut are gone: {missing}"
    starts = conn.execute("SELECT COUNT(*) FROM starts").fetchone()[0]
    assert starts >= 2, "the second boot's start is not recorded"
    assert root_digest(disk) == ROOT_BEFORE[0], "the read-only root partition changed"


def test_the_models_outcomes_are_in_the_database_on_the_disk(disk: Path, tmp_path: Path) -> None:
    """Read off the disk after the clean shutdown: the registry (table models) and the events of both installs."""
    db = sqlite3.connect(copy_from_var(disk, "/lib/llmos", tmp_path / "var") / "llmos.db")
    db.row_factory = sqlite3.Row
    models = {r["name"]: dict(r) for r in db.execute("SELECT * FROM models")}
    assert {"default", "good", "bad"} <= set(models), models
    good, bad = models["good"], models["bad"]
    assert good["sha256"] == sha256_file(ROOT / "model" / "llmos-tiny-q4_k_m.gguf"), good
    assert bad["sha256"] == sha256_file(ROOT / "model" / "llmos-tiny-q8_0.gguf"), bad
    assert good["source"].endswith("good.gguf") and bad["source"].endswith("bad.gguf"), (good, bad)
    assert models["taught-1"]["state"] == "active", models  # the consolidated version of the built-in model
    assert models["default"]["state"] in ("installed", "previous"), models
    assert good["state"] in ("installed", "previous"), good  # passed its gate; no longer active
    assert bad["state"] == "failed" and bad["gate"], bad
    events = [(r["kind"], f"{r['message']} {r['data']}") for r in db.execute("SELECT kind, message, data FROM events")]

    def said(kind: str, name: str) -> bool:
        return any(k == kind and re.search(rf"\b{name}\b", text) for k, text in events)

    model_events = [e for e in events if e[0].startswith("model_")]
    assert said("model_installed", "good") and said("model_activated", "good"), model_events
    assert said("model_gate_failed", "bad") and said("model_rolled_back", "good"), model_events
    assert said("model_activated", "default") and said("model_activated", "taught-1"), model_events
    runs = db.execute("SELECT outcome, model, pairs, report FROM consolidations").fetchall()
    assert [(r["outcome"], r["model"], json.loads(r["pairs"])) for r in runs] == [("activated", "taught-1", [1])], runs
    report = json.loads(runs[0]["report"])
    assert report["passed"] and report["taught"] == [1, 1], report
    # the override's budget and held-out sample, not the default recipe
    budget = yaml.safe_load(DISK_OVERRIDE)["learning"]
    assert report["steps"] == budget["consolidate_steps"], report
    assert report["heldout_before"][1] == budget["consolidate_heldout"], report
    measure("consolidation_report_in_image", {k: v for k, v in report.items() if k not in ("misses", "results")})
    measure("models_in_registry", {name: row["state"] for name, row in models.items()})


def test_the_usb_stick_was_mounted_read_only(disk: Path, tmp_path: Path) -> None:
    """The udev rule's transient mount unit, from the journal on the disk."""
    log = journal(disk, tmp_path / "j", "-u", "media-MODELS.mount", "-o", "cat")
    assert re.search(r"Mounted .*/media/MODELS", log), log


def test_root_is_read_only_and_var_grew_at_first_boot(disk: Path, tmp_path: Path) -> None:
    parts = partitions(disk)
    # var is the last partition: grown, it ends where the disk does (but for the backup GPT's last MiB)
    var_end = parts["var"]["start"] + parts["var"]["size"]
    assert var_end > disk.stat().st_size - (2 << 20), f"var did not grow: {parts['var']['size'] >> 20} MiB"
    log = journal(disk, tmp_path / "j", "-u", "llmos-var.service", "-o", "cat")
    grown = re.findall(r"/var is\s+(\d+) MiB \(was\s+(\d+) MiB\)", log)
    assert grown, log
    first_after, first_before = map(int, grown[0])
    # the file system fills the grown partition (ext4 keeps a few % for itself), at the first boot
    assert first_before < 300 and first_after > 0.9 * (parts["var"]["size"] >> 20), log
    roots = re.findall(r"llmos-var: root (\S+)\s+(\S+)\s+(\S+);", log)
    assert roots, log
    for _source, fstype, options in roots:
        assert fstype == "erofs" and "ro" in options.split(","), log
    measure("var_mib_after_first_boot", first_after)


def test_the_first_boot_was_counted_and_blessed(image: Path, disk: Path, tmp_path: Path) -> None:
    """The image's UKI carries 3 tries (llmos-edge_<version>+3.efi); the first boot's health gate passed, so
    systemd-bless-boot renamed it to the plain name: a good boot (docs/updates.md)."""
    version = image_version(image)
    assert f"llmos-edge_{version}+3.efi" in esp_files(image), esp_files(image)
    assert esp_files(disk) == [f"llmos-edge_{version}.efi"], esp_files(disk)
    log = journal(disk, tmp_path / "j", "-u", "llmos-health.service", "-u", "systemd-bless-boot.service", "-o", "cat")
    assert "llmos health: good: ready and serving" in log, log
    assert re.search(r"Finished .*Mark the Current Boot Loader Entry as Good", log), log


def test_boot_time_to_ready_in_the_guest(disk: Path, tmp_path: Path) -> None:
    """Guest uptime at READY=1 (systemd logs 'Started' for a Type=notify unit when READY arrives), for every
    boot whose journal reached the disk (the power-cut boot's may not have)."""
    log = journal(disk, tmp_path / "j", "-u", "llmos.service", "-o", "short-monotonic")
    ready = [float(t) for t in re.findall(r"^\[\s*([\d.]+)\].*Started llmos", log, re.M)]
    assert ready, log
    measure("boot_guest_uptime_at_ready_s", ready)


def test_two_root_slots_of_one_size_with_var_last(image: Path) -> None:
    """esp | root_<version> | _empty | var: slot B is as large as slot A, so any update fits, and var stays last to
    grow. The UKI boots its own slot by label."""
    table = json.loads(subprocess.run(["sfdisk", "-J", str(image)], check=True, capture_output=True).stdout)
    parts = table["partitiontable"]["partitions"]
    version = image_version(image)
    assert [p.get("name") for p in parts] == ["esp", f"root_{version}", "_empty", "var"], parts
    root_type = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # x86-64 root (the Discoverable Partitions Specification)
    assert parts[1]["type"] == parts[2]["type"] == root_type, parts
    assert parts[1]["size"] == parts[2]["size"], parts


def test_systemd_254_with_sysupdate_in_the_image(image: Path, tmp_path: Path) -> None:
    """systemd from bookworm-backports (254): mkosi's manifest of the image, and its own systemd-sysupdate run."""
    manifest = json.loads(image.with_suffix(".manifest").read_text())
    versions = {p["name"]: p["version"] for p in manifest["packages"]}
    for name in ("systemd", "udev", "libsystemd0", "systemd-container", "systemd-boot", "systemd-boot-efi"):
        assert versions.get(name, "").startswith("254."), (name, versions.get(name))
    root = extract_root(image, root_label(image), tmp_path / "root")
    out = subprocess.run(
        ["chroot", str(root), "/usr/lib/systemd/systemd-sysupdate", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("systemd 254 "), (out.returncode, out.stdout, out.stderr)
    measure("image_systemd", out.stdout.splitlines()[0])


def exposure(root: Path) -> float:
    out = subprocess.run(
        ["systemd-analyze", "security", "--no-pager", "--offline=true", f"--root={root}", "llmos.service"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"Overall exposure level for llmos.service: ([\d.]+)", out)
    assert m, out
    return float(m.group(1))


def test_the_service_sandbox_with_and_without_http(image: Path, tmp_path: Path) -> None:
    """systemd-analyze security over the image's own root: the shipped unit (no network) and the unit with the
    drop-in `llmos net-setup` writes for HTTP on every interface (the most open case)."""
    root = extract_root(image, root_label(image), tmp_path / "root")
    closed = exposure(root)
    cfg = dataclasses.replace(Config(), http=HttpConfig(enabled=True, listen="0.0.0.0:8080", token="t"))
    dropins = root / "etc/systemd/system/llmos.service.d"
    dropins.mkdir(parents=True)
    (dropins / "50-http.conf").write_text(netpolicy.dropin(cfg) or "")
    opened = exposure(root)
    measure("systemd_exposure", {"no_http": closed, "http_any_address": opened})
    assert closed <= 1.0 and opened <= 2.0 and opened > closed, (closed, opened)


# The override for the card's boot in the other machine: the taught-answer lookup switched off (issue 15, point 5).
NO_LOOKUP_OVERRIDE = yaml.safe_dump({"learning": {**yaml.safe_load(DISK_OVERRIDE)["learning"], "lookup": False}})


@dataclasses.dataclass
class Moved:
    boot: Boot
    disk: Path
    starts_before: int  # rows of the starts table the card held before this boot


@pytest.fixture(scope="module")
def nehalem_with_sound(disk: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moved]:
    """The test disk's card moved to a second machine, booted once for the tests below: a CPU without AVX2, and an
    HD Audio sound card (QEMU's `none` audio backend: its line-in is silent). Its config override (written from the
    host after the clean shutdown above) switches the taught-answer lookup off."""
    work = tmp_path_factory.mktemp("nehalem")
    db = sqlite3.connect(copy_from_var(disk, "/lib/llmos", work / "var") / "llmos.db")
    starts_before = db.execute("SELECT COUNT(*) FROM starts").fetchone()[0]
    db.close()
    (work / "llmos.yaml").write_text(NO_LOOKUP_OVERRIDE)
    write_to_var(disk, work, {"/lib/llmos/llmos.yaml": work / "llmos.yaml"})
    b = boot(disk, "nehalem", cpu="Nehalem", sound="none")
    measure("boot_wall_s_to_ready_nehalem", round(b.wall_s, 1))
    yield Moved(b, disk, starts_before)
    if b.vm is not None:  # still running when a test failed half-way: stop it (by PID)
        b.vm.close()
    b.console.close()


def test_a_cpu_without_avx2_runs_the_model(nehalem_with_sound: Moved) -> None:
    """Nehalem has SSE4.2 but no AVX: llama.cpp must pick a baseline variant instead of dying with SIGILL."""
    b = nehalem_with_sound.boot
    assert b.console.ask("ping") == "pong"
    text = status(b)
    assert cpu_variant(text) in NO_AVX2_VARIANTS, text
    measure("status_nehalem", text)


def test_with_the_lookup_off_the_taught_answer_comes_from_the_weights(nehalem_with_sound: Moved) -> None:
    """Issue 15, point 5: consolidated, rebooted, the lookup switched off: the taught question still gets the taught
    answer, generated by taught-1 (the database after the shutdown says so: the last test)."""
    b = nehalem_with_sound.boot
    learning = next((x for x in status(b).splitlines() if x.startswith("learning: ")), "")
    assert "1 taught pairs (not looked up: learning.lookup)" in learning, learning
    consolidation = b.console.ask("/consolidate status")
    assert consolidation.startswith("consolidation: 0 taught pairs not in the weights"), consolidation
    models = b.console.ask("/model")
    assert re.search(r"^taught-1\b[^;\n]*\bactive\b", models, re.M), models
    assert b.console.ask(TAUGHT_QUESTION) == TAUGHT_ANSWER


LISTENING = "voice: listening on default (wake word 'computer', whisper); 0 interactions"


def test_with_a_sound_card_voice_listens_on_the_microphone(nehalem_with_sound: Moved, has_voice: bool) -> None:
    """The voice front-end starts after READY when the capture device can record: arecord on the emulated card (its
    driver loaded from the root's modules, its device nodes allowed by llmos.service's sandbox), the silero VAD
    through onnxruntime, pocketsphinx and CTranslate2 loaded, on a CPU without AVX. It keeps listening; silence is
    no speech.
    An image built without voice says so, sound card or not."""
    b = nehalem_with_sound.boot
    expected = LISTENING if has_voice else VOICE_NOT_INSTALLED
    line = voice_line(b)
    assert line == expected, line
    measure("voice_status_nehalem", line)
    time.sleep(20)  # a capture that fails says so in /status (and retries)
    rss = re.search(r"^memory: supervisor ([\d.]+) ?MiB", status(b), re.M)
    assert rss, "/status has no memory line"
    measure("supervisor_rss_mib_voice_loaded_nehalem", float(rss.group(1)))
    assert voice_line(b) == expected
    assert b.console.ask("ping") == "pong"


def test_with_a_sound_card_the_journal_shows_no_voice_errors(
    nehalem_with_sound: Moved, tmp_path: Path, has_voice: bool
) -> None:
    """After a clean power-off, read off the disk: the card's codec driver was bound, the front-end logged no errors
    (arecord's failures are logged with its own message), and starting it did not trip the watchdog. The journal of
    this boot only (-b: the card booted before, in the machine without a sound card)."""
    b, disk = nehalem_with_sound.boot, nehalem_with_sound.disk
    b.shutdown()
    log = journal(disk, tmp_path / "j", "-b", "-u", "llmos.service", "-o", "short-monotonic")
    errors = [x for x in log.splitlines() if re.search(r"ERROR llmos_edge\.voice|arecord|overrun", x)]
    assert not errors, "\n".join(errors)
    ready = re.search(r"^\[\s*([\d.]+)\].* llmos_edge\.readiness: ready: ", log, re.M)
    if has_voice:
        started = re.search(r"^\[\s*([\d.]+)\].* voice: listening on default$", log, re.M)
        assert ready and started, log
        measure("voice_guest_s_from_ready_to_listening_nehalem", round(float(started[1]) - float(ready[1]), 1))
        whisper = re.search(r"voice: Whisper model .*", log)
        assert whisper, log
        measure("voice_whisper_nehalem", whisper.group(0))
    else:
        assert ready and re.search(r"voice: not installed \(onnxruntime, pocketsphinx, ctranslate2", log), log
    kernel = journal(disk, tmp_path / "k", "-k", "-o", "cat")  # -k: this boot's
    assert re.search(r"snd_hda_codec_generic hdaudioC\d+D\d+: autoconfig", kernel), "no HD Audio codec driver bound"
    # The modules llmos.service's DeviceAllow= needs at its start (llmos-sound.conf, llmos-serial.conf) were loaded:
    # snd by the codec line above; the USB serial cores (no such device here, so only systemd-modules-load can have
    # loaded them) by their registration lines. The kernel log, not systemd-modules-load's: its lines did not
    # always reach the journal on disk.
    for driver in ("usbserial_generic", "cdc_acm"):
        assert f"registered new interface driver {driver}" in kernel, f"{driver} not loaded at boot"
    db = sqlite3.connect(copy_from_var(disk, "/lib/llmos", tmp_path / "var") / "llmos.db")
    starts = db.execute("SELECT exit_reason FROM starts ORDER BY id").fetchall()[nehalem_with_sound.starts_before :]
    assert starts == [("SIGTERM",)], f"the supervisor was restarted (by the watchdog?): {starts}"


def test_the_database_says_the_taught_answer_came_from_the_weights(nehalem_with_sound: Moved, tmp_path: Path) -> None:
    """After the shutdown above: the taught question's last request was generated (tokens out, no taught pair
    named), by the consolidated model that the registry still has active."""
    db = sqlite3.connect(copy_from_var(nehalem_with_sound.disk, "/lib/llmos", tmp_path / "var") / "llmos.db")
    query = "SELECT taught_id, tokens_out, answer FROM requests WHERE prompt = ? ORDER BY id"
    last = db.execute(query, [TAUGHT_QUESTION]).fetchall()[-1]
    assert last[0] is None and last[1] > 0 and last[2] == TAUGHT_ANSWER, last
    active = db.execute("SELECT name FROM models WHERE state = 'active'").fetchall()
    assert active == [("taught-1",)], active
    taught = db.execute("SELECT question, consolidated FROM taught").fetchall()
    assert taught == [(TAUGHT_QUESTION, 1)], taught


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
