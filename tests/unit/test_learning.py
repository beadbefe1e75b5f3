"""Taught pairs (llmos_edge/learning.py): the nearness rule, bad input, and the SQLite store (real SQLite, FTS5)."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from pathlib import Path
from types import ModuleType

import pytest

from llmos_edge.errors import UserError
from llmos_edge.learning import MAX_ANSWER, MAX_QUESTION, Teaching, key, parse_teach
from llmos_edge.store import Store

MODEL_DIR = Path(__file__).resolve().parents[2] / "model"


def _model_data() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llmos_model_data_for_learning", MODEL_DIR / "data.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_prefix_suffix_and_casing_of_the_faq_recipe_keeps_the_key() -> None:
    data = _model_data()
    question = "what is the wifi password"
    for prefix in data.FAQ_PREFIXES:
        for suffix in data.FAQ_SUFFIXES:
            for casing in data.CASINGS:
                variant = data._apply_case(prefix + question + suffix, casing)
                assert key(variant) == question, variant


def test_stacked_politeness_accents_and_spacing_are_folded() -> None:
    assert key("Hey llmos, please tell me: what is the Wi-Fi PASSWORD?? thanks") == "what is the wi fi password"
    assert key("  Où   est le café ?! ") == "ou est le cafe"
    assert key("please") == "please"  # a question made only of politeness keeps its last word


def test_different_words_or_symbols_make_different_questions() -> None:
    assert key("what is my name") != key("what is your name")
    assert key("what is 2+2") != key("what is 2*2")
    assert key("name is what") != key("what is name")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("what is the wifi password", "separated by =>"),
        ("=> it is on the sticker", "question to teach is empty"),
        ("?!. => it is on the sticker", "question to teach is empty"),
        ("what is the wifi password =>   ", "answer to teach is empty"),
        ("q" * (MAX_QUESTION + 1) + " => a", f"at most {MAX_QUESTION}"),
        ("q => " + "a" * (MAX_ANSWER + 1), f"at most {MAX_ANSWER}"),
    ],
)
def test_bad_teach_input_is_one_sentence_with_a_hint(text: str, says: str) -> None:
    with pytest.raises(UserError) as e:
        parse_teach(text)
    assert says in e.value.message and e.value.hint


def test_an_answer_may_contain_the_separator() -> None:
    assert parse_teach("how do I write an arrow => type => like this") == (
        "how do I write an arrow",
        "type => like this",
    )


def test_taught_pairs_are_looked_up_replaced_searched_and_forgotten(tmp_path: Path) -> None:
    store = Store(tmp_path / "l.db")
    t = Teaching(store, max_pairs=10)
    pair, replaced = t.teach("What is the wifi password?", "It is on the sticker.", "console")
    assert not replaced
    found = t.lookup("hey llmos, WHAT IS THE WIFI PASSWORD please")
    assert found is not None and found.answer == "It is on the sticker." and found.id == pair.id
    assert t.lookup("what is the wifi name") is None
    again, replaced = t.teach("what is the wifi password", "Ask the owner.", "http")
    assert replaced and again.id == pair.id and t.count() == 1
    t.teach("who built you", "The llmos-edge project.", "console")
    assert [p.question for p in t.pairs("sticker")] == []  # the replaced answer is gone from the search index too
    assert [p.question for p in t.pairs("owner")] == ["what is the wifi password"]
    assert [p.question for p in t.pairs()] == ["who built you", "what is the wifi password"]
    gone = t.forget("What is the WiFi password?")
    assert gone.answer == "Ask the owner." and t.lookup("what is the wifi password") is None
    assert [p.question for p in t.pairs("owner")] == []
    with pytest.raises(UserError, match="nothing is taught"):
        t.forget("what is the wifi password")
    kinds = [e["kind"] for e in store.recent_events(10)]
    assert kinds.count("taught") == 3 and kinds.count("forgot") == 1
    store.close()


def test_taught_pairs_survive_a_restart_of_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "l.db")
    Teaching(store, 10).teach("ping", "taught pong", "console")
    store.close()
    store = Store(tmp_path / "l.db")
    found = Teaching(store, 10).lookup("Ping!")
    assert found is not None and found.answer == "taught pong"
    store.close()


def test_teaching_beyond_max_pairs_is_refused_with_a_hint(tmp_path: Path) -> None:
    store = Store(tmp_path / "l.db")
    t = Teaching(store, max_pairs=2)
    t.teach("one", "1", "console")
    t.teach("two", "2", "console")
    t.teach("two", "II", "console")  # replacing is not one more
    with pytest.raises(UserError, match="2 pairs are taught already") as e:
        t.teach("three", "3", "console")
    assert "learning.max_pairs" in e.value.hint
    assert t.count() == 2
    store.close()


def test_a_pair_the_database_cannot_take_is_a_clear_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "l.db")
    store.db.execute("CREATE TRIGGER no_teaching BEFORE INSERT ON taught BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(UserError, match="cannot store the change") as e:
        Teaching(store, 10).teach("q", "a", "console")
    assert "nothing was changed" in e.value.hint
    store.close()
    assert sqlite3.connect(tmp_path / "l.db").execute("SELECT COUNT(*) FROM taught").fetchone()[0] == 0


def test_with_teaching_off_pairs_are_kept_but_neither_used_nor_taken(tmp_path: Path) -> None:
    store = Store(tmp_path / "l.db")
    Teaching(store, 10).teach("ping", "taught pong", "console")
    off = Teaching(store, 10, enabled=False)
    assert off.lookup("ping") is None
    with pytest.raises(UserError, match="teaching is off") as e:
        off.teach("pong", "ping", "console")
    assert e.value.hint == "set learning.teach: true"
    assert [p.question for p in off.pairs()] == ["ping"]
    assert off.forget("ping").answer == "taught pong"  # undoing still works
    store.close()
