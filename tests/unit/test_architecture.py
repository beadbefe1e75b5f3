"""The module map's rules (docs/architecture.md), checked on the code: no import cycles; the engine imports no
front-end and no governor; the governor never reaches the engine; front-ends reach the engine only through the
scheduler."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "llmos_edge"
FRONT_ENDS = {"console", "control", "machine", "protocol", "http_api", "metrics", "status_page", "sampler", "voice"}
ENGINE = {"engine", "engine_worker", "engine_protocol"}


def imports() -> dict[str, set[str]]:
    """Module -> the llmos_edge modules it imports at run time (module level; not under TYPE_CHECKING)."""
    graph: dict[str, set[str]] = {}
    for f in sorted(PKG.glob("*.py")):
        deps: set[str] = set()
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmos_edge"):
                parts = node.module.split(".")
                deps |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("llmos_edge.")}
        graph[f.stem] = {d for d in deps if (PKG / f"{d}.py").exists()}
    return graph


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    return seen


def test_there_are_no_import_cycles() -> None:
    graph = imports()
    assert len(graph) > 20, "the package was not found"
    cycles = sorted(m for m in graph if m in reach(graph, m))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_the_engine_imports_no_front_end_and_no_governor() -> None:
    graph = imports()
    for m in ENGINE & graph.keys():
        bad = reach(graph, m) & (FRONT_ENDS | {"governor", "thermal", "memory_budget", "scheduler", "supervisor"})
        assert not bad, f"{m} reaches {sorted(bad)}"


def test_the_governor_never_reaches_the_engine() -> None:
    graph = imports()
    for m in ("governor", "thermal", "memory_budget"):
        assert not reach(graph, m) & (ENGINE | {"scheduler", "keeper"}), f"{m} reaches the engine"


def test_front_ends_reach_the_engine_only_through_the_scheduler() -> None:
    graph = imports()
    for m in FRONT_ENDS & graph.keys():
        direct = graph[m] & (ENGINE | {"keeper", "supervisor", "governor"})
        assert not direct, f"{m} imports {sorted(direct)} directly"
