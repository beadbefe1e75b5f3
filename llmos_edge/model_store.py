"""The model store: models installed on /var, their registry in SQLite, and which one is active.

Install is crash-safe by construction. The file is hashed while it is copied to a hidden `.NAME.part` file, fsynced,
read back and hashed again, its header checked, and only then renamed into place (an atomic rename, then an fsync
of the directory). The registry row is written after that, in one transaction. So a kill -9 at any point leaves
either no trace (a `.part` file or an unregistered file, both removed by `recover()` at the next start) or a
complete, verified file with its row. The active model changes only in one transaction (`set_active`), after the
new model has passed its gate (keeper.py), so there is always exactly one active model: the old one or the new one.

The built-in model (`model.path`, read-only in the image) is registered as `default` without being copied: it is
always there, and it is the last rung of the degradation ladder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from llmos_edge.errors import UserError
from llmos_edge.models import GGUFInfo, check_loadable, read_gguf
from llmos_edge.store import Store

log = logging.getLogger(__name__)

DEFAULT = "default"
GOLDEN_SUFFIX = ".golden.jsonl"
GOLDEN_MAX_BYTES = 1 << 20
CHUNK = 1 << 20
_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class State(StrEnum):
    INSTALLED = "installed"
    ACTIVE = "active"
    FAILED = "failed"
    REMOVED = "removed"


@dataclass(frozen=True)
class ModelEntry:
    id: int
    name: str
    path: str
    sha256: str
    source: str
    size: int
    architecture: str
    quantization: str
    n_params: int
    state: State
    good: bool
    gate: str
    installed_at: float
    activated_at: float

    @property
    def builtin(self) -> bool:
        return self.name == DEFAULT

    @property
    def golden_path(self) -> Path:
        return golden_path_for(Path(self.path))

    def describe(self) -> str:
        flags = [self.state.value]
        if self.good and self.state is not State.ACTIVE:
            flags.append("good")
        size = f"{self.size / 2**20:.1f} MiB" if self.size else "size unknown"
        where = "built in" if self.builtin else f"sha256 {self.sha256[:12]}"
        gate = f"; gate: {self.gate}" if self.gate else ""
        return (
            f"{self.name}: {', '.join(flags)}; {self.architecture}, {self.quantization}, "
            f"{self.n_params / 1e6:.2f}M params, {size}, {where}{gate}"
        )

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ModelEntry:
        return cls(
            id=int(row["id"]),
            name=str(row["name"]),
            path=str(row["path"]),
            sha256=str(row.get("sha256") or ""),
            source=str(row.get("source") or ""),
            size=int(row.get("size") or 0),
            architecture=str(row.get("architecture") or "unknown"),
            quantization=str(row.get("quantization") or "unknown"),
            n_params=int(row.get("n_params") or 0),
            state=State(row["state"]),
            good=bool(row.get("good")),
            gate=str(row.get("gate") or ""),
            installed_at=float(row.get("installed_at") or 0.0),
            activated_at=float(row.get("activated_at") or 0.0),
        )


@dataclass(frozen=True)
class Golden:
    """One golden prompt of a model's gate: the exact answer it must give."""

    prompt: str
    answer: str


def golden_path_for(model: Path) -> Path:
    """`good.gguf` -> `good.golden.jsonl` beside it."""
    return model.with_name(model.stem + GOLDEN_SUFFIX)


def read_golden(path: Path) -> list[Golden]:
    """A user's golden prompts: one JSON object a line, {"prompt": "...", "answer": "..."}."""
    try:
        if path.stat().st_size > GOLDEN_MAX_BYTES:
            raise UserError(f"{path} is larger than 1 MiB", "a golden file holds a few prompts and their answers")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text", "write it as JSON lines") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}", "check the file and its permissions") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not (isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("answer"), str)):
            raise UserError(
                f"{path.name} line {n} is not a golden prompt",
                'write one JSON object a line: {"prompt": "ping", "answer": "pong"}',
            )
        if not obj["prompt"].strip():
            raise UserError(f"{path.name} line {n} has an empty prompt", "every golden prompt needs a question")
        out.append(Golden(obj["prompt"], obj["answer"].strip()))
    if not out:
        raise UserError(f"{path.name} holds no golden prompts", 'add lines like {"prompt": "ping", "answer": "pong"}')
    return out


def gate_prompts(entry: ModelEntry, info: GGUFInfo | None) -> list[Golden]:
    """What a model must answer to pass its gate: the user's golden file, else the GGUF's own self-test keys
    (`llmos.self_test.prompt` / `.answer`), else nothing (then it must only generate without error)."""
    golden = entry.golden_path
    if golden.exists():
        return read_golden(golden)
    meta = info.metadata if info is not None else {}
    prompt = meta.get("llmos.self_test.prompt")
    if isinstance(prompt, str) and prompt.strip():
        answer = meta.get("llmos.self_test.answer", "")
        return [Golden(prompt, str(answer).strip())]
    return []


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def resolve_source(path: str | os.PathLike[str]) -> Path:
    """A file, or a directory (a USB stick) holding exactly one GGUF."""
    p = Path(path)
    if p.is_dir():
        found = sorted(x for x in p.iterdir() if x.suffix.lower() == ".gguf" and x.is_file())
        if not found:
            raise UserError(f"{p} holds no .gguf file", "copy a GGUF model onto it, or name the file to install")
        if len(found) > 1:
            names = ", ".join(x.name for x in found[:6]) + (", ..." if len(found) > 6 else "")
            raise UserError(f"{p} holds {len(found)} models ({names})", f"name one: install {found[0]}")
        return found[0]
    if not p.exists():
        raise UserError(f"no file at {p}", "give the path of a .gguf file, or of a USB stick's directory holding one")
    if not p.is_file():
        raise UserError(f"{p} is not a regular file", "give the path of a .gguf file")
    return p


class ModelStore:
    def __init__(self, store: Store, directory: str | os.PathLike[str], default_path: str) -> None:
        self.store = store
        self.dir = Path(directory)
        self.default_path = default_path
        self.installed = 0  # models in the store besides `default`, as of the last read: /status never reads the db

    # -- the registry --------------------------------------------------------------------------------------
    def entries(self, include_removed: bool = False) -> list[ModelEntry]:
        rows = [ModelEntry.from_row(r) for r in self.store.models()]
        self.installed = sum(1 for e in rows if e.state is not State.REMOVED and not e.builtin)
        return [e for e in rows if include_removed or e.state is not State.REMOVED]

    def get(self, name: str) -> ModelEntry | None:
        return next((e for e in self.entries() if e.name == name), None)

    def active(self) -> ModelEntry:
        for e in self.entries():
            if e.state is State.ACTIVE:
                return e
        default = self.get(DEFAULT)
        assert default is not None, "recover() registers the default model"
        return default

    def _row(self, e: ModelEntry, **changes: Any) -> dict[str, Any]:
        row = {
            "id": e.id,
            "name": e.name,
            "path": e.path,
            "sha256": e.sha256,
            "source": e.source,
            "size": e.size,
            "architecture": e.architecture,
            "quantization": e.quantization,
            "n_params": e.n_params,
            "state": e.state.value,
            "good": int(e.good),
            "gate": e.gate,
            "installed_at": e.installed_at,
            "activated_at": e.activated_at,
        }
        row.update({k: (v.value if isinstance(v, State) else v) for k, v in changes.items()})
        return row

    def set_active(self, name: str, gate: str) -> ModelEntry:
        """Make `name` the active model (it passed its gate), in one transaction with the old one's demotion."""
        new = self.get(name)
        if new is None:
            raise UserError(f"no model named {name}", "`/model` lists the installed models")
        rows = [self._row(e, state=State.INSTALLED) for e in self.entries() if e.state is State.ACTIVE]
        rows.append(self._row(new, state=State.ACTIVE, good=1, gate=gate, activated_at=time.time()))
        self.store.update_models(rows)
        return self.get(name) or new

    def mark(self, name: str, *, good: bool | None = None, gate: str | None = None, failed: bool = False) -> None:
        e = self.get(name)
        if e is None:
            return
        changes: dict[str, Any] = {}
        if good is not None:
            changes["good"] = int(good)
        if gate is not None:
            changes["gate"] = gate
        if failed and not e.builtin:  # the built-in model is never taken off the ladder
            changes["state"] = State.FAILED
            changes["good"] = 0
        self.store.update_models([self._row(e, **changes)])

    def previous_good(self, exclude: str) -> ModelEntry:
        """Where a rollback goes: the most recently activated good model other than `exclude`; `default` last."""
        candidates = [
            e
            for e in self.entries()
            if e.name != exclude and e.good and e.state in (State.INSTALLED, State.ACTIVE) and not e.builtin
        ]
        candidates.sort(key=lambda e: e.activated_at, reverse=True)
        return candidates[0] if candidates else self._default()

    def ladder_below(self, current: ModelEntry) -> list[ModelEntry]:
        """Good models smaller than `current` (by file size, which is the weights' memory), largest first, the
        built-in default last whatever its size."""
        rungs = [
            e
            for e in self.entries()
            if e.good
            and e.state in (State.INSTALLED, State.ACTIVE)
            and not e.builtin
            and e.name != current.name
            and e.size < current.size
        ]
        rungs.sort(key=lambda e: e.size, reverse=True)
        if not current.builtin:
            rungs.append(self._default())
        return rungs

    def _default(self) -> ModelEntry:
        d = self.get(DEFAULT)
        assert d is not None
        return d

    # -- start-up ------------------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """At start: register the built-in model, finish what a crash interrupted, and return what was done."""
        done: list[str] = []
        self._register_default()
        entries = self.entries(include_removed=True)
        known = {Path(e.path).name for e in entries if e.state is not State.REMOVED and not e.builtin}
        known |= {golden_path_for(Path(e.path)).name for e in entries if e.state is not State.REMOVED}
        if self.dir.is_dir():
            for f in sorted(self.dir.iterdir()):
                if f.name.startswith(".") and f.name.endswith(".part"):
                    f.unlink(missing_ok=True)
                    done.append(f"removed {f.name}, left by an install that did not finish")
                elif f.is_file() and f.name not in known:
                    f.unlink(missing_ok=True)
                    done.append(f"removed {f.name}: copied by an install that did not finish registering it")
        fixes = []
        for e in self.entries():
            if not e.builtin and not Path(e.path).is_file():
                fixes.append(self._row(e, state=State.FAILED, good=0, gate="the file is missing from the store"))
                done.append(f"{e.name}: its file is missing from the store; marked failed")
        actives = [e for e in self.entries() if e.state is State.ACTIVE]
        if len(actives) > 1:  # cannot happen through set_active; a hand-edited registry is put right
            actives.sort(key=lambda e: e.activated_at)
            fixes += [self._row(e, state=State.INSTALLED) for e in actives[:-1]]
        if fixes:
            self.store.update_models(fixes)
        for message in done:
            log.warning("model store: %s", message)
        return done

    def _register_default(self) -> None:
        try:
            info: GGUFInfo | None = read_gguf(self.default_path)
        except UserError:
            info = None  # the keeper reports why; the default stays registered
        try:
            size = Path(self.default_path).stat().st_size
        except OSError:
            size = 0
        fields = {
            "name": DEFAULT,
            "path": self.default_path,
            "source": "built in (model.path)",
            "size": size,
            "architecture": info.architecture if info else "unknown",
            "quantization": info.quantization if info else "unknown",
            "n_params": info.n_params if info else 0,
        }
        old = self.get(DEFAULT)
        if old is None:
            has_active = any(e.state is State.ACTIVE for e in self.entries())
            state = State.INSTALLED if has_active else State.ACTIVE
            row = {**fields, "sha256": "", "state": state.value, "good": 1, "gate": "", "installed_at": time.time()}
            row["activated_at"] = 0.0
            self.store.update_models([row])
        elif any(old_v != getattr(old, k) for k, old_v in fields.items()):
            self.store.update_models([self._row(old, **fields)])

    # -- install -------------------------------------------------------------------------------------------
    def install(
        self,
        source: str | os.PathLike[str],
        preflight: Callable[[GGUFInfo], None],
        progress: Callable[[str], None] = lambda _m: None,
    ) -> tuple[ModelEntry, bool]:
        """Copy a verified model into the store and register it (not yet active). Returns the entry and whether it
        was new (False: the same file was installed already). Raises UserError in one sentence."""
        src = resolve_source(source)
        name = _NAME.sub("-", src.stem).strip(".-")[:64] or "model"
        if name == DEFAULT:
            raise UserError("`default` is the built-in model's name", "rename the file, e.g. my-default.gguf")
        info = read_gguf(src)  # not a GGUF, truncated, corrupt: refused before a byte is copied
        check_loadable(info)
        golden = golden_path_for(src)
        golden_prompts = read_golden(golden) if golden.exists() else None
        preflight(info)  # does not fit this device's memory: refused before copying
        existing = self.get(name)
        size = src.stat().st_size
        self.dir.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(self.dir)
        free = st.f_bavail * st.f_frsize
        if free < size + 16 * 2**20:
            raise UserError(
                f"not enough space in {self.dir} for {src.name}: it needs {size / 2**20:.0f} MiB, "
                f"{free / 2**20:.0f} MiB are free",
                "remove a model you no longer need (`/model remove NAME`), or free space on /var",
            )
        part = self.dir / f".{name}.part"
        digest = self._copy(src, part, size, progress)
        if existing is not None and existing.state is not State.FAILED:
            part.unlink(missing_ok=True)
            if existing.sha256 == digest:
                progress(f"{name} is installed already (same sha256)")
                return existing, False
            raise UserError(
                f"a different model named {name} is installed",
                f"remove it first (`/model remove {name}`), or rename the file",
            )
        try:
            copied = read_gguf(part)  # the copy, not the source, is what the engine will load
        except UserError as e:
            part.unlink(missing_ok=True)
            raise UserError(
                f"the copy of {src.name} does not read back: {e.message}", "the card may be failing"
            ) from None
        final = self.dir / f"{name}-{digest[:12]}.gguf"
        if golden_prompts is not None:
            gpart = self.dir / f".{name}.golden.part"
            gpart.write_text(
                "".join(json.dumps({"prompt": g.prompt, "answer": g.answer}) + "\n" for g in golden_prompts)
            )
            with gpart.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(gpart, golden_path_for(final))
        os.replace(part, final)
        _fsync_dir(self.dir)
        row = {
            "name": name,
            "path": str(final),
            "sha256": digest,
            "source": str(src),
            "size": size,
            "architecture": copied.architecture,
            "quantization": copied.quantization,
            "n_params": copied.n_params,
            "state": State.INSTALLED.value,
            "good": 0,
            "gate": "",
            "installed_at": time.time(),
            "activated_at": 0.0,
        }
        if existing is not None:  # a failed model of that name is replaced by the new copy
            row["id"] = existing.id
            with contextlib.suppress(OSError):
                if existing.path != str(final):
                    Path(existing.path).unlink()
        self.store.update_models([row])
        self.store.event("model_installed", f"{name} installed from {src}", {"sha256": digest, "size": size})
        entry = self.get(name)
        assert entry is not None
        return entry, True

    def _copy(self, src: Path, part: Path, size: int, progress: Callable[[str], None]) -> str:
        """Copy with the hash computed on the way, fsync, then read the copy back: the hash must match."""
        h = hashlib.sha256()
        done, last = 0, 0.0
        try:
            with src.open("rb") as fin, part.open("wb") as fout:
                while chunk := fin.read(CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if now - last >= 1.0:
                        last = now
                        progress(f"copying {src.name}: {100 * done // max(size, 1)}% of {size / 2**20:.1f} MiB")
                fout.flush()
                os.fsync(fout.fileno())
        except OSError as e:
            part.unlink(missing_ok=True)
            raise UserError(f"copying {src.name} failed: {e.strerror}", "check the stick and the free space") from None
        digest = h.hexdigest()
        if done != size or _sha256(part) != digest:
            part.unlink(missing_ok=True)
            raise UserError(
                f"the copy of {src.name} differs from the original", "copy it again; the medium may be failing"
            )
        progress(f"copied {src.name}: {size / 2**20:.1f} MiB, sha256 {digest[:12]}")
        return digest

    def remove(self, name: str) -> ModelEntry:
        e = self.get(name)
        if e is None:
            raise UserError(f"no model named {name}", "`/model` lists the installed models")
        if e.builtin:
            raise UserError("the built-in model cannot be removed", "it is part of the image and the last fallback")
        if e.state is State.ACTIVE:
            raise UserError(f"{name} is the active model", "activate another one first (`/model activate default`)")
        self.store.update_models([self._row(e, state=State.REMOVED, good=0)])
        for f in (Path(e.path), e.golden_path):
            f.unlink(missing_ok=True)
        self.store.event("model_removed", f"{name} removed")
        return e
