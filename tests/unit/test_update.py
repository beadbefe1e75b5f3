"""Update bundles: made by image/bundle.py from a disk image (a small GPT image laid out like the real one), signed
with a real gpg key, and verified by llmos_edge/update.py with gpgv, as the device does before systemd-sysupdate
runs. Tampering, another key, and a bundle that is not one are refused with one clear sentence. Writing to the slot
(systemd-sysupdate) is tested on the image (tests/image)."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmos_edge import update
from llmos_edge.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "image"))
import bundle

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("gpg", "gpgv", "sfdisk", "mkfs.vfat", "mcopy", "xz")),
    reason="needs gnupg, gpgv, fdisk, dosfstools, mtools and xz (make image-deps installs them)",
)

MIB = 1 << 20
ROOT_BYTES = b"erofs? no: a root slot's bytes " * 1000


def small_image(path: Path, version: str) -> Path:
    """esp (vfat, /EFI/Linux/llmos-edge_<version>+3.efi) | root_<version> | _empty | var, like the real layout."""
    with path.open("wb") as f:
        f.truncate(24 * MIB)
    table = (
        "label: gpt\n"
        "start=2048, size=16384, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\n"
        f"size=4096, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root_{version}\n"
        "size=4096, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=_empty\n"
        "size=8192, type=4D21B016-B534-45C2-A9FB-5C16E091FD2D, name=var\n"
    )
    subprocess.run(["sfdisk", "-q", str(path)], input=table, text=True, check=True)
    parts = bundle.partitions(path)
    esp = path.parent / "esp.vfat"
    subprocess.run(["mkfs.vfat", "-C", str(esp), str(parts["esp"]["size"] // 1024)], check=True, capture_output=True)
    uki = path.parent / "uki.efi"
    uki.write_bytes(b"MZ a unified kernel image " + version.encode())
    subprocess.run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/Linux"], check=True)
    subprocess.run(["mcopy", "-i", str(esp), str(uki), f"::/EFI/Linux/llmos-edge_{version}+3.efi"], check=True)
    with path.open("r+b") as f:
        f.seek(parts["esp"]["start"])
        f.write(esp.read_bytes())
        f.seek(parts[f"root_{version}"]["start"])
        f.write(ROOT_BYTES)
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key_dir = tmp_path_factory.mktemp("key")
    bundle.make_key(key_dir)
    return key_dir


@pytest.fixture
def made(keys: Path, tmp_path: Path) -> Path:
    img = small_image(tmp_path / "img.raw", "0.2.0")
    return bundle.make_bundle(img, keys, tmp_path / "out", compress="xz")


def test_the_bundle_holds_the_root_slot_the_uki_and_signed_sums(made: Path) -> None:
    assert made.name == "0.2.0"
    names = sorted(p.name for p in made.iterdir())
    assert names == ["SHA256SUMS", "SHA256SUMS.gpg", "llmos-edge_0.2.0.efi", "llmos-edge_0.2.0.root.raw.xz"]
    root = subprocess.run(["xz", "-dc", str(made / "llmos-edge_0.2.0.root.raw.xz")], capture_output=True, check=True)
    assert root.stdout.startswith(ROOT_BYTES) and len(root.stdout) == 4096 * 512  # the whole slot
    assert (made / "llmos-edge_0.2.0.efi").read_bytes() == b"MZ a unified kernel image 0.2.0"


def test_an_erofs_root_is_carried_without_the_rest_of_its_slot(keys: Path, tmp_path: Path) -> None:
    """The image's root slot holds an erofs (mkosi.conf): the bundle carries that file system, gzip'd here, not the
    zeros after it, and the device accepts the .gz name."""
    tree = tmp_path / "tree"
    (tree / "usr").mkdir(parents=True)
    (tree / "usr" / "os-release").write_text("ID=llmos-edge\n")
    fs = tmp_path / "root.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(fs), str(tree)], check=True, capture_output=True)
    img = small_image(tmp_path / "img.raw", "0.3.0")
    with img.open("r+b") as f:
        f.seek(bundle.partitions(img)["root_0.3.0"]["start"])
        f.write(fs.read_bytes())
    made = bundle.make_bundle(img, keys, tmp_path / "out", compress="gz")
    root = made / "llmos-edge_0.3.0.root.raw.gz"
    assert gzip.decompress(root.read_bytes()) == fs.read_bytes()  # the erofs, to its last block, and no further
    assert update.check_contents(update.parse_sums((made / "SHA256SUMS").read_text())).version == "0.3.0"


def test_a_good_bundle_is_verified_and_staged(made: Path, keys: Path, tmp_path: Path) -> None:
    b = update.stage(made, tmp_path / "staging", keys / bundle.PUBRING)
    assert b.version == "0.2.0"
    verified = tmp_path / "staging" / "verified"
    assert sorted(p.name for p in verified.iterdir()) == ["llmos-edge_0.2.0.efi", "llmos-edge_0.2.0.root.raw.xz"]
    assert (verified / "llmos-edge_0.2.0.efi").read_bytes() == (made / "llmos-edge_0.2.0.efi").read_bytes()
    assert not (tmp_path / "staging" / "incoming").exists()


def test_the_key_is_made_once(keys: Path) -> None:
    before = (keys / bundle.PUBRING).read_bytes()
    bundle.make_key(keys)
    assert (keys / bundle.PUBRING).read_bytes() == before


def test_an_altered_file_is_refused(made: Path, keys: Path, tmp_path: Path) -> None:
    uki = made / "llmos-edge_0.2.0.efi"
    uki.write_bytes(uki.read_bytes() + b"!")
    with pytest.raises(UserError, match=r"llmos-edge_0.2.0.efi does not match its signed SHA-256"):
        update.stage(made, tmp_path / "staging", keys / bundle.PUBRING)
    assert not any((tmp_path / "staging" / "verified").iterdir()), "nothing may be left for sysupdate"


def test_altered_sums_break_the_signature(made: Path, keys: Path, tmp_path: Path) -> None:
    sums = made / "SHA256SUMS"
    sums.write_text(sums.read_text().replace("0", "1", 1))
    with pytest.raises(UserError, match="the bundle's signature does not verify"):
        update.stage(made, tmp_path / "staging", keys / bundle.PUBRING)


def test_a_bundle_signed_by_another_key_is_refused(made: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-key"
    bundle.make_key(other)
    with pytest.raises(UserError, match="the bundle's signature does not verify"):
        update.stage(made, tmp_path / "staging", other / bundle.PUBRING)


def test_a_directory_that_is_no_bundle_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not an update bundle"):
        update.stage(tmp_path, tmp_path / "staging", tmp_path / "none.gpg")


def test_the_signed_list_must_be_one_versions_root_and_uki() -> None:
    h = "a" * 64
    with pytest.raises(UserError, match="not part of an llmos-edge update"):
        update.check_contents({"evil.sh": h, "llmos-edge_1.efi": h})
    with pytest.raises(UserError, match="holds 2 versions"):
        update.check_contents({"llmos-edge_1.efi": h, "llmos-edge_2.root.raw": h})
    with pytest.raises(UserError, match="lacks the UKI"):
        update.check_contents({"llmos-edge_1.root.raw.xz": h})
    assert update.check_contents({"llmos-edge_1.2.efi": h, "llmos-edge_1.2.root.raw": h}).version == "1.2"
    with pytest.raises(UserError, match="line 1 is not"):
        update.parse_sums("deadbeef  llmos-edge_1.efi\n")


def test_status_names_the_running_version_and_the_other_slot(tmp_path: Path) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text('ID=debian\nIMAGE_ID="llmos-edge"\nIMAGE_VERSION="0.1.0"\n')
    labels = tmp_path / "by-partlabel"
    labels.mkdir()
    for name in ("esp", "root_0.1.0", "_empty", "var"):
        (labels / name).symlink_to("../../vda1")
    assert update.system_line(os_release, labels) == "system: version 0.1.0; other slot: empty"
    (labels / "_empty").rename(labels / "root_0.1.1")
    assert update.system_line(os_release, labels) == "system: version 0.1.0; other slot: version 0.1.1"
    assert update.system_line(tmp_path / "missing", labels) == ""  # not the appliance: no line


def test_a_request_names_a_bundle_and_is_taken_once(made: Path, tmp_path: Path) -> None:
    db = tmp_path / "llmos.db"
    path = update.request(db, f" {made} ")
    assert path == tmp_path / "update.request" and path.read_text() == f"{made}\n"
    assert update.take_request(path) == made
    assert not path.exists()  # taken: a bundle that fails is not tried again and again
    with pytest.raises(UserError, match="no update was requested"):
        update.take_request(path)


def test_a_request_for_something_that_is_no_bundle_is_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="holds no update bundle"):
        update.request(tmp_path / "llmos.db", str(tmp_path))
    with pytest.raises(UserError, match="is not an absolute path"):
        update.request(tmp_path / "llmos.db", "media/UPDATE")
    assert not (tmp_path / "update.request").exists()


def test_the_console_update_command_writes_the_request_or_says_why_not(made: Path, tmp_path: Path) -> None:
    """/update PATH on the console: the supervisor's request_update (here update.request on a temporary database)
    answers in one line; a mistake is one error line with a hint, and the console goes on."""
    import threading
    import time

    from llmos_edge.console import Console
    from llmos_edge.scheduler import Scheduler

    db = tmp_path / "llmos.db"
    out = bytearray()
    lock = threading.Lock()
    lines = [f"/update {tmp_path}".encode() + b"\r", f"/update {made}".encode() + b"\r"]

    class Port:
        def read(self, size: int) -> bytes:
            time.sleep(0.02)
            return lines.pop(0) if lines else b""

        def write(self, data: bytes) -> int:
            with lock:
                out.extend(data)
            return len(data)

        def close(self) -> None:
            pass

    def request_update(where: str) -> str:
        return f"requested {update.request(db, where)}"

    sched = Scheduler(engine=None, recorder=None)  # type: ignore[arg-type]  # never started: no question is asked
    console = Console(
        "test", 115200, 512, True, sched, lambda: [], lambda _n: [], 16, port=Port(), request_update=request_update
    )
    console.start()
    deadline = time.monotonic() + 5
    while b"requested " not in out and time.monotonic() < deadline:
        time.sleep(0.02)
    console.stop()
    text = out.decode()
    assert f"error: {tmp_path} holds no update bundle (no SHA256SUMS) (hint: " in text, text
    assert f"requested {tmp_path / 'update.request'}" in text, text
    assert (tmp_path / "update.request").read_text() == f"{made}\n"
