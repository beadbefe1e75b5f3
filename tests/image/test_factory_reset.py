"""Voice, then a factory reset, on one device over the console: spoken to, it answers aloud through its sound card;
then asked to reset, the data written on var before is gone after, the device starts with the default config and a
new database, the root (the installed version) is untouched. One device for both: a boot is the expensive part of an
image test under TCG, and the reset wipes the voice set-up off var, so no later boot carries it.

Voice (issue 6): QEMU cannot feed a guest microphone at the speed of time (its alsa backend reads a host `file`
device many times faster than real time, so the guest hears shreds), so the microphone lives in the guest: an ALSA
`file` device defined in the llmos user's ~/.asoundrc on var (written with debugfs before the boot, with the override
setting voice.capture to it), which arecord reads and the front-end paces to the wall clock. It says "computer"
every few seconds, every other time followed by "what is your status". The answers go to the emulated HD Audio card
(voice.playback stays `default`), whose line-out QEMU writes to a WAV file on this host. This boot gets a CPU without
AVX (Nehalem), as does the boot in test_image.py that tests capture from the card itself. An image built with
VOICE=0 gets the same override and no voice checks.

Three boots of a disk of its own, with a UEFI variable store kept between them like a board's NVRAM (the reset is
armed through the FactoryReset EFI variable): the first writes data and asks for the reset, the reboot it causes
ends that QEMU (-no-reboot); the second boot's initrd erases var (systemd-repart, image/initrd/) and restarts once
(repart 254's partition table reread takes the root device away from under sysroot.mount: see docs/updates.md), so
that QEMU exits too; the third is an ordinary boot on the new var.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import serial
from conftest import (
    ARTIFACTS,
    BOOT_TIMEOUT,
    ROOT,
    Boot,
    boot,
    card,
    copy_from_var,
    journal,
    measure,
    partitions,
    root_digest,
    start,
    write_to_var,
)

sys.path.insert(0, str(ROOT))
from llmos_edge.voice import VOICE_MEMORY_MB
from llmos_edge.voice_asr import normalise
from llmos_edge.voice_tts import speakable
from tests.voice_fixtures import RATE, heard_replies, render, said_in, silence, to_mono_16k

# A config override on var: /status names it among the config sources. voice.capture: the microphone below.
OVERRIDE = "model:\n  max_tokens: 48\nvoice:\n  capture: mic\n"
OVERRIDE_PATH = "/var/lib/llmos/llmos.yaml"
REBOOT_TIMEOUT = 300  # the guest stops the supervisor and reboots; QEMU (-no-reboot) then exits
RESET_MARKER = b"llmos-factory-reset: done; restarting once"  # the initrd's reset script, on the serial console


@dataclass
class ResetDisk:
    disk: Path
    efi_vars: Path
    root_digest: str


def part_uuid(disk: Path, label: str) -> str:
    table = json.loads(subprocess.run(["sfdisk", "-J", str(disk)], check=True, capture_output=True).stdout)
    return next(p["uuid"] for p in table["partitiontable"]["partitions"] if p.get("name") == label)


WAKE_EVERY_S = 8.0
VAR = "/lib/llmos"  # /var/lib/llmos on the device: the llmos user's home and state directory
MIC = "/var/lib/llmos/voice-test-mic.raw"
ASOUNDRC = f"""pcm.mic {{
  type file
  slave.pcm null
  file /dev/null
  infile "{MIC}"
  format raw
}}
"""
LINE_OUT = ARTIFACTS / "voice-line-out.wav"


@pytest.fixture(scope="module")
def reset_disk(image: Path, tmp_path_factory: pytest.TempPathFactory) -> ResetDisk:
    """A fresh copy of the image with a config override, the microphone's ALSA device and what it will hear written
    onto its var partition from the host."""
    tmp = tmp_path_factory.mktemp("reset")
    disk = tmp / "disk.raw"
    card(image, disk)
    override = tmp / "llmos.yaml"
    override.write_text(OVERRIDE)
    word = render("computer")
    asked = np.concatenate([word, silence(0.1), render("what is your status")])
    # 2 s of silence, then every WAKE_EVERY_S "computer" alone or with a command, for 4 minutes; silence after
    mic = tmp / "mic.raw"
    cycle = np.concatenate(
        [word, silence(WAKE_EVERY_S - len(word) / RATE), asked, silence(WAKE_EVERY_S - len(asked) / RATE)]
    )
    mic.write_bytes(np.concatenate([silence(2.0), np.tile(cycle, int(240 / WAKE_EVERY_S / 2))]).tobytes())
    (tmp / "asoundrc").write_text(ASOUNDRC)
    files = {f"{VAR}/llmos.yaml": override, f"{VAR}/.asoundrc": tmp / "asoundrc"}
    files[VAR + MIC.removeprefix("/var/lib/llmos")] = mic
    write_to_var(disk, tmp, files)
    return ResetDisk(disk, tmp / "efi-vars.fd", root_digest(disk))


@pytest.fixture(scope="module")
def before_reset(reset_disk: ResetDisk) -> Iterator[Boot]:
    LINE_OUT.unlink(missing_ok=True)
    # A CPU without AVX (Nehalem): under QEMU's software emulation CTranslate2's SSE kernels run Whisper several
    # times faster than the AVX ones `-cpu max` gets (docs/voice.md, "Under QEMU")
    b = boot(reset_disk.disk, "reset-before", efi_vars=reset_disk.efi_vars, sound=f"wav,path={LINE_OUT}", cpu="Nehalem")
    yield b
    if b.vm is not None:  # still running when a test failed half-way: stop it (by PID)
        b.vm.close()
    b.console.close()


def test_before_the_reset_the_override_is_used_and_requests_are_recorded(before_reset: Boot) -> None:
    text = before_reset.console.ask("/status")
    assert re.search(rf"^config: .*{OVERRIDE_PATH}", text, re.M), text
    assert before_reset.console.ask("ping") == "pong"
    assert before_reset.console.ask("reverse stone") == "enots"


LISTENING = re.compile(r"^voice: listening on mic \(wake word 'computer', whisper\); (\d+) interactions$", re.M)


def test_the_wake_word_is_answered_aloud_through_the_sound_card(before_reset: Boot, has_voice: bool) -> None:
    """The wake word wakes it and its spoken reply (espeak-ng, aplay, ALSA dmix on the card) comes out of the
    line-out: the whole pipeline runs inside llmos.service's sandbox, with onnxruntime's VAD, pocketsphinx and
    Whisper. The database's rows, the line-out and the journal are read after the reset's reboot
    (test_the_voice_interactions_are_in_the_database_and_nothing_failed). The supervisor's memory once voice has
    recognised a few utterances is measured for the voice reserve (llmos_edge/voice.py: VOICE_MEMORY_MB)."""
    if not has_voice:  # test_image.py checks what such an image says instead
        pytest.skip("the image was built without voice (make image VOICE=0)")
    deadline = time.monotonic() + 300
    while True:
        text = before_reset.console.ask("/status", timeout=60)
        m = LISTENING.search(text)
        if (m and int(m.group(1)) >= 3) or time.monotonic() > deadline:
            break
        assert m or "voice: starting" in text, text
        time.sleep(WAKE_EVERY_S / 2)
    assert m and int(m.group(1)) >= 3, text
    measure("voice_status_spoken_to", m.group(0))
    rss = re.search(r"^memory: supervisor ([\d.]+) ?MiB", text, re.M)
    assert rss, text
    measure("supervisor_rss_mib_voice_listening", float(rss.group(1)))
    # Voice stays within what the governor keeps back for it (the supervisor alone is 35-46 MiB in the guest); with
    # the kernel's transparent huge pages left at "always" it took about twice that (llmos-memory.conf)
    assert float(rss.group(1)) <= 50 + VOICE_MEMORY_MB, text
    assert before_reset.console.ask("ping") == "pong"


def test_anything_but_the_typed_confirmation_cancels(before_reset: Boot) -> None:
    warning = before_reset.console.ask("/factory-reset")
    assert "Type ERASE to erase and restart now" in warning, warning
    assert before_reset.console.ask("erase") == "factory reset cancelled (it needs ERASE typed exactly)"
    assert before_reset.console.ask("ping") == "pong"


def test_the_confirmed_reset_restarts_the_device(before_reset: Boot, reset_disk: ResetDisk, tmp_path: Path) -> None:
    assert before_reset.vm is not None
    before_reset.console.ask("/factory-reset")
    said = before_reset.console.ask("ERASE")
    assert said == "factory reset requested: the device restarts now and erases /var as it boots", said
    start = time.monotonic()
    before_reset.vm.wait(REBOOT_TIMEOUT)  # the guest rebooted: QEMU runs with -no-reboot
    measure("factory_reset_request_to_reboot_s", round(time.monotonic() - start, 1))
    before_reset.console.close()
    before_reset.vm.close()
    # What the reset must erase is on the disk now: the override and the requests (read without booting).
    var = copy_from_var(reset_disk.disk, "/lib/llmos", tmp_path / "var")
    assert (var / "llmos.yaml").read_text() == OVERRIDE
    prompts = {r[0] for r in sqlite3.connect(var / "llmos.db").execute("SELECT prompt FROM requests")}
    assert {"ping", "reverse stone"} <= prompts, prompts
    assert not (var / "factory-reset.request").exists(), "the request was not armed (llmos-factory-reset.service)"
    # (uuid, start) of var before the reset: the initrd recreates the partition
    (ARTIFACTS / "factory-reset-var-before.json").write_text(
        json.dumps([part_uuid(reset_disk.disk, "var"), partitions(reset_disk.disk)["var"]])
    )


def test_the_voice_interactions_are_in_the_database_and_nothing_failed(
    reset_disk: ResetDisk, has_voice: bool, tmp_path: Path
) -> None:
    """Read off the disk between the reset's request and the reset boot. Every interaction is a row with its
    timings; asleep, speech without the wake word leaves no row, so the first row means "computer" was heard. What the
    replies say is checked twice: the database's rows ("Yes?" to the wake word, the status sentence to "what is your
    status") and the line-out itself, transcribed on this host. They must have been spoken, without an error. The
    supervisor was never restarted (by the watchdog, say) until the reset's reboot stopped it; the journal has no voice
    errors."""
    if not has_voice:
        pytest.skip("the image was built without voice (make image VOICE=0)")
    db = sqlite3.connect(copy_from_var(reset_disk.disk, "/lib/llmos", tmp_path / "var") / "llmos.db")
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute("SELECT * FROM voice ORDER BY id")]
    timings = ("outcome", "vad_ms", "asr_ms", "tts_ms", "first_audio_ms")
    measure("voice_rows_spoken_to", [{k: r[k] for k in timings} for r in rows])
    assert rows and all(r["error"] == "" and r["outcome"] != "error" for r in rows), rows
    assert any(r["outcome"] == "wake" and r["answer"] == "Yes?" for r in rows), rows
    status = [r for r in rows if r["kind"] == "command" and r["heard"] == "what is your status"]
    assert status and all(r["answer"].startswith("State ready.") for r in status), rows
    assert any(r["first_audio_ms"] is not None for r in rows), f"no reply was spoken: {rows}"
    starts = db.execute("SELECT exit_reason FROM starts").fetchall()
    assert [tuple(s) for s in starts] == [("SIGTERM",)], "the supervisor was restarted (by the watchdog?)"

    # QEMU's wav backend writes 16-bit stereo; skip the 44-byte header (its lengths are fixed up when QEMU exits)
    played = np.frombuffer(LINE_OUT.read_bytes()[44:], dtype=np.int16)
    assert played.size and np.abs(played.astype(np.int32)).max() > 1000, "nothing audible came out of the line-out"
    replies = heard_replies(to_mono_16k(LINE_OUT))
    measure("voice_line_out_heard", replies)
    assert any(said_in("yes", r, 0.0) for r in replies), replies
    # the status sentence's first words as spoken ("State ready. Model ..."), in the line-out as a whole: QEMU's wav
    # backend writes only what the card played, so the silence between replies is not in the file and the VAD cuts
    # where it finds a pause, not per reply (a CI run heard "yes stay ready", "model ...": "Yes?" and "State ready."
    # ran together, and the status sentence was cut at its full stop)
    first_words = " ".join(normalise(speakable(status[0]["answer"])).split()[:3])
    assert said_in(first_words, " ".join(replies)), (first_words, replies)

    log = journal(reset_disk.disk, tmp_path / "j", "-u", "llmos.service", "-o", "cat")
    errors = [x for x in log.splitlines() if re.search(r"ERROR llmos_edge\.voice|arecord|aplay|espeak-ng", x)]
    assert not errors, "\n".join(errors)
    measure("voice_whisper_reset_before", re.findall(r"voice: Whisper model .*", log))


def test_the_reset_boot_erases_var_in_the_initrd_and_restarts_once(reset_disk: ResetDisk) -> None:
    """The initrd's journal is gone with the restart (it lives in /run), so the serial console is the record."""
    vm, console = start(reset_disk.disk, "reset", efi_vars=reset_disk.efi_vars)
    try:
        out = console.read_until(RESET_MARKER, BOOT_TIMEOUT)
        measure("factory_reset_boot_to_restart_s", round(time.monotonic() - vm.started_at, 1))
        deadline = time.monotonic() + REBOOT_TIMEOUT
        assert vm.proc is not None
        while vm.proc.poll() is None:  # keep reading the console until QEMU exits (-no-reboot)
            try:
                out += console.read_some(1.0)
            except serial.SerialException:  # QEMU closes the console's socket as it exits
                vm.wait(max(1.0, deadline - time.monotonic()))
            assert time.monotonic() < deadline, "the reset boot did not restart"
    finally:
        console.close()
        vm.close()
    text = out.decode("utf-8", "replace")
    assert "llmos-factory-reset: erasing var" in text, text[-2000:]
    assert "Successfully unset EFI variable FactoryReset." in text, "repart left the reset armed: " + text[-2000:]
    assert "emergency mode" not in text, text[-2000:]


def test_after_the_reset_var_is_new_with_the_default_config_and_an_empty_database(
    reset_disk: ResetDisk, tmp_path: Path
) -> None:
    uuid_before, var_before = json.loads((ARTIFACTS / "factory-reset-var-before.json").read_text())
    after = boot(reset_disk.disk, "reset-after", efi_vars=reset_disk.efi_vars)
    try:
        measure("boot_wall_s_to_ready_after_factory_reset", round(after.wall_s, 1))
        text = after.console.ask("/status")
        assert re.search(r"^config: defaults, /etc/llmos/llmos\.yaml$", text, re.M), text  # no override any more
        rss = re.search(r"^memory: supervisor ([\d.]+) ?MiB", text, re.M)  # no microphone: voice never loaded
        assert rss, "/status has no memory line"
        measure("supervisor_rss_mib_no_voice", float(rss.group(1)))
        logs = after.console.ask("/logs 20")  # only this boot's self-test (source gate, which asks ping)
        assert all(" gate " in line for line in logs.splitlines()), logs
        after.shutdown()
    finally:
        if after.vm is not None:
            after.vm.close()
    disk = reset_disk.disk
    var = copy_from_var(disk, "/lib/llmos", tmp_path / "var")
    assert not (var / "llmos.yaml").exists(), "the config override survived the reset"
    db = sqlite3.connect(var / "llmos.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    asked = db.execute("SELECT prompt FROM requests WHERE source != 'gate'").fetchall()  # the self-test's are new
    assert asked == [], asked
    assert db.execute("SELECT COUNT(*) FROM starts").fetchone()[0] == 1, "the database is not new"
    # A new partition in the old one's place, as large (it had grown to fill the disk at the first boot).
    assert part_uuid(disk, "var") != uuid_before
    assert partitions(disk)["var"] == var_before
    assert root_digest(disk) == reset_disk.root_digest, "the read-only root partition changed"
    # The boot after the reset is an ordinary one and the first var has seen: no second reset (the EFI variable
    # was unset), nothing of the reset boot's (it never mounted the root, let alone var).
    boots = journal(disk, tmp_path / "j", "--list-boots", "-q").strip().splitlines()
    assert len(boots) == 1, boots
    log = journal(disk, tmp_path / "j2", "-o", "cat")
    assert "llmos-factory-reset: erasing var" not in log, "the reset ran again at the ordinary boot"
