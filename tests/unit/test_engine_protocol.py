"""The engine's two processes and their protocol: who may import whom, and what crosses the socket."""

from __future__ import annotations

import ast
import dataclasses
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from llmos_edge import engine_protocol as p

PACKAGE = Path(__file__).resolve().parents[2] / "llmos_edge"


def package_imports(module: str) -> set[str]:
    """The llmos_edge modules `module` imports, at any depth of its source (lazy imports included)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmos_edge"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if node.module == "llmos_edge")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("llmos_edge"))
    return {m.removeprefix("llmos_edge.") for m in found if m != "llmos_edge"}


def test_the_worker_imports_only_the_protocol() -> None:
    # ARCHITECTURE.md: the engine imports no front-end and no governor; the worker process loads nothing else.
    assert package_imports("engine_worker") == {"engine_protocol"}
    assert package_imports("engine_protocol") == set()


def test_the_handle_and_the_worker_do_not_import_each_other() -> None:
    assert package_imports("engine") == {"engine_protocol"}


def test_the_worker_process_loads_no_other_module_of_the_package() -> None:
    code = "import sys, llmos_edge.engine_worker; print(sorted(m for m in sys.modules if m.startswith('llmos_edge.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['llmos_edge.engine_protocol', 'llmos_edge.engine_worker']"


def test_callers_import_the_engine_types_from_engine() -> None:
    from llmos_edge import engine

    for name in ("Engine", "EngineSettings", "EngineError", "EngineInfo", "GenerationStats"):
        assert hasattr(engine, name), name
    assert engine.GenerationStats is p.GenerationStats


MESSAGES_TO_WORKER = [
    p.Init(p.EngineSettings("m.gguf", n_ctx=256, exclude_cpu=("zen4",))),
    p.Generate(3, "reverse abc", 64, 0.0, 7),
    p.Resume(3, 0.5),
    p.Cancel(3),
    p.Preempt(3),
    p.Drop(3),
    p.Limits(threads=1),
    p.Limits(duty=0.25),
    p.Shutdown(),
]
MESSAGES_FROM_WORKER = [
    p.CpuVariant("haswell"),
    p.Loaded(p.EngineInfo(model="m", n_ctx=256, self_test={"prompt": "ping", "answer": "pong"})),
    p.LoadFailed("ValueError: no"),
    p.Progress(3, 128),
    p.Tokens(3, "ab", 2),
    p.Done(3, p.GenerationStats(tokens_in=4, tokens_out=2, stop="eos", text="ab")),
    p.Preempted(3, p.GenerationStats(stop="preempted")),
    p.Failed(3, "generation failed: x"),
]


@pytest.fixture
def pair() -> tuple[Connection, Connection]:
    a, b = socket.socketpair()
    return Connection(a.detach()), Connection(b.detach())


def test_every_message_crosses_the_socket_unchanged(pair: tuple[Connection, Connection]) -> None:
    handle, worker = pair
    for msg in MESSAGES_TO_WORKER:
        handle.send(msg)
        assert p.receive_to_worker(worker) == msg
    for reply in MESSAGES_FROM_WORKER:
        worker.send(reply)
        assert p.receive_from_worker(handle) == reply


def test_each_direction_has_a_message_per_kind() -> None:
    to_worker = {type(m) for m in MESSAGES_TO_WORKER}
    from_worker = {type(m) for m in MESSAGES_FROM_WORKER}
    assert to_worker == set(p.ToWorker.__args__)
    assert from_worker == set(p.FromWorker.__args__)
    assert not to_worker & from_worker
    # Messages are values: a receiver cannot change what the sender still holds.
    assert all(dataclasses.is_dataclass(t) and t.__dataclass_params__.frozen for t in to_worker | from_worker)  # type: ignore[attr-defined]


def test_a_message_of_the_wrong_direction_or_an_old_tuple_is_a_protocol_error(
    pair: tuple[Connection, Connection],
) -> None:
    handle, worker = pair
    handle.send(("generate", 1, "hi", 8, 0.0, 0))  # the tuples this protocol replaced
    with pytest.raises(p.ProtocolError, match="not a message of engine_protocol"):
        p.receive_to_worker(worker)
    worker.send(p.Cancel(1))  # a handle -> worker message coming back
    with pytest.raises(p.ProtocolError):
        p.receive_from_worker(handle)
