"""Conversation memory (llmos_edge/memory.py): recall by relevance within a budget, retention, per-source forget."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llmos_edge.memory import TURN_OVERHEAD, Memory
from llmos_edge.store import Store


def _memory(
    tmp_path: Path, keep_turns: int = 100, keep_days: float = 30.0, recall_turns: int = 4, prune_every: int = 1
) -> tuple[Store, Memory]:
    store = Store(tmp_path / "l.db")
    memory = Memory(
        store,
        keep_turns=keep_turns,
        keep_days=keep_days,
        recall_turns=recall_turns,
        recall_tokens=4096,
        prune_every=prune_every,
    )
    return store, memory


def test_a_follow_up_recalls_the_relevant_turns_of_its_own_source_oldest_first(tmp_path: Path) -> None:
    store, m = _memory(tmp_path)
    m.remember("console", "my dog is called Rex", "Nice name.")
    m.remember("console", "what is the weather", "I cannot see outside.")
    m.remember("console", "Rex likes bones", "Most dogs do.")
    m.remember("http", "my dog is called Bello", "Nice name.")
    recalled = m.recall("console", "what is my dog called?", 4096)
    assert [t.question for t in recalled] == ["my dog is called Rex"]
    recalled = m.recall("console", "does Rex like the dog park", 4096)
    assert [t.question for t in recalled] == ["my dog is called Rex", "Rex likes bones"]
    assert [t.question for t in m.recall("http", "my dog", 4096)] == ["my dog is called Bello"]
    assert m.recall("console", "what is it", 4096) == []  # nothing but common words: nothing is relevant
    store.close()


def test_recall_stays_within_the_budget_and_the_turn_limit(tmp_path: Path) -> None:
    store, m = _memory(tmp_path, recall_turns=2)
    for i in range(5):
        m.remember("console", f"apple fact {i}", "x" * 50)
    one = len(b"apple fact 0") + 50 + 2 * TURN_OVERHEAD
    assert len(m.recall("console", "apple", 10 * one)) == 2  # recall_turns
    assert len(m.recall("console", "apple", one)) == 1
    assert m.recall("console", "apple", one - 1) == []
    store.close()


def test_retention_keeps_the_newest_turns_per_source_and_drops_old_ones(tmp_path: Path) -> None:
    store, m = _memory(tmp_path, keep_turns=3, keep_days=1.0)
    for i in range(5):
        m.remember("console", f"banana {i}", "ok")
    m.remember("voice", "banana voice", "ok")
    assert m.counts() == {"console": 3, "voice": 1}
    assert [t.question for t in m.recall("console", "banana", 4096)] == ["banana 2", "banana 3", "banana 4"]
    with store.locked(write=True) as db:
        db.execute("UPDATE turns SET at = ? WHERE source = 'voice'", [time.time() - 2 * 86400])
    assert m.recall("voice", "banana", 4096) == []  # too old to recall, and deleted with the next write
    m.remember("console", "banana 5", "ok")
    assert m.counts() == {"console": 3}
    store.close()


@pytest.mark.parametrize(("source", "left"), [("console", {"http": 1}), ("", {})])
def test_forget_is_per_source_or_everything(tmp_path: Path, source: str, left: dict[str, int]) -> None:
    store, m = _memory(tmp_path)
    m.remember("console", "cherry one", "ok")
    m.remember("console", "cherry two", "ok")
    m.remember("http", "cherry three", "ok")
    assert m.forget(source) == 3 - sum(left.values())
    assert m.counts() == left
    assert m.recall("console", "cherry", 4096) == []
    assert store.recent_events(1, ("memory_forgotten",))
    store.close()


def test_a_turn_is_committed_with_its_request_row_and_limits_apply_every_few_turns(tmp_path: Path) -> None:
    store, m = _memory(tmp_path, keep_turns=2, prune_every=3)
    commits: list[str] = []
    store.db.conn.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    for i in range(3):
        store.record_request({"source": "console", "prompt": f"grape {i}"}, [m.turn_row("console", f"grape {i}", "ok")])
        if i < 2:
            m.prune_when_due()
            assert m.counts() == {"console": i + 1}  # not pruned yet: nothing to prune, and not due
    assert len(commits) == 3  # one commit per answer: its request row and its turn together
    assert m.counts() == {"console": 3}  # the limit (2) waits for the third turn's prune
    m.prune_when_due()
    assert m.counts() == {"console": 2}
    assert len(commits) == 4
    assert [r["prompt"] for r in store.recent_requests()] == ["grape 0", "grape 1", "grape 2"]
    store.close()
