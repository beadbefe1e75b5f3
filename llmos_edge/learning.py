"""Teaching the device new answers (issue 15, point 1): taught question/answer pairs in SQLite.

`/teach QUESTION => ANSWER` (console, machine mode, `llmos teach`, HTTP's POST /v1/teach) stores a pair; from the
next request on, that question and its everyday variants are answered with the taught text, through the scheduler
like any request and recorded like one (its row's `taught_id` names the pair). `/forget QUESTION` removes it.

Why a lookup and not retrieval into the prompt: the default model (model/README.md) was trained on one bare
question per prompt and has a 256-token training context with one token per character; it was never trained to
use facts placed before a question, so it would ignore or garble them. Teaching it that "facts ... question" format
means retraining it (phase 1 alone took 35 minutes on this project's 2-core build machine, model/README.md) and
changing the committed model files, and it would still hold only a handful of facts in its context. A lookup is
exact for any model, costs no tokens, and survives a model switch. Consolidation into the weights (issue 15,
point 2) is what will make the model itself know the pairs.

The nearness rule (`key`): two questions are the same when their words are equal after
  * Unicode compatibility folding, accents removed, case folded;
  * punctuation dropped (arithmetic symbols + - * / = < > ^ % are kept as words of their own, except a hyphen
    between letters);
  * the politeness prefixes and suffixes of the default model's FAQ recipe (model/data.py) removed from the start
    and the end, as often as they occur ("hey llmos, please tell me X, thanks" is "X").
Word order and every other word count: "what is my name" and "what is your name" stay different.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from llmos_edge.errors import UserError
from llmos_edge.store import Store

log = logging.getLogger(__name__)

# The sources whose questions taught answers and the conversation memory serve: people and their programs, not the
# model gate's own test requests (source "gate"), which must hear the model itself.
SOURCES = ("console", "submit", "http", "voice")
MAX_QUESTION = 200  # characters of a taught question
MAX_ANSWER = 1000  # characters of a taught answer
SEPARATOR = "=>"
TEACH_HINT = "e.g. /teach what is the wifi password => it is on the sticker under the box"

# model/data.py's FAQ_PREFIXES and FAQ_SUFFIXES, as words (tests/unit/test_learning.py checks that every one of
# them is covered). Longest first, so "hey llmos" goes before "hey".
PREFIXES: tuple[tuple[str, ...], ...] = tuple(
    sorted(
        (
            tuple(p.split())
            for p in (
                "hey llmos",
                "hi llmos",
                "ok llmos",
                "yo llmos",
                "llmos",
                "please",
                "can you tell me",
                "could you tell me",
                "tell me",
                "excuse me",
                "quick question",
                "question",
                "so",
                "um",
                "hey",
                "i wonder",
            )
        ),
        key=len,
        reverse=True,
    )
)
SUFFIXES: tuple[tuple[str, ...], ...] = (("thank", "you"), ("please",), ("thanks",))
_SYMBOLS = "+-*/=<>^%"
_HYPHEN = re.compile(r"(?<=[^\W\d_])-(?=[^\W\d_])")  # wi-fi is wi fi; 2-1 keeps its minus
_TOKEN = re.compile(rf"[^\W_]+|[{re.escape(_SYMBOLS)}]")


def words(text: str) -> list[str]:
    """The words of `text` as the nearness rule sees them (folded, accents and punctuation gone)."""
    folded = unicodedata.normalize("NFKD", text)
    folded = "".join(c for c in folded if not unicodedata.combining(c)).casefold()
    return _TOKEN.findall(_HYPHEN.sub(" ", folded))


def key(question: str) -> str:
    """The normalised form of a question: equal keys get the same taught answer (the module's doc string)."""
    w = words(question)
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if len(w) > len(p) and tuple(w[: len(p)]) == p:  # never strip a question down to nothing
                w, changed = w[len(p) :], True
                break
        for s in SUFFIXES:
            if len(w) > len(s) and tuple(w[-len(s) :]) == s:
                w, changed = w[: -len(s)], True
                break
    return " ".join(w)


def parse_teach(text: str) -> tuple[str, str]:
    """`QUESTION => ANSWER` as (question, answer); anything else is a UserError with a hint."""
    question, sep, answer = text.partition(SEPARATOR)
    question, answer = question.strip(), answer.strip()
    if not sep:
        raise UserError(f"teach needs a question and an answer separated by {SEPARATOR}", TEACH_HINT)
    return check_pair(question, answer)


def check_pair(question: str, answer: str) -> tuple[str, str]:
    question, answer = question.strip(), answer.strip()
    if not question or not key(question):
        raise UserError("the question to teach is empty (it needs a word or a number)", TEACH_HINT)
    if not answer:
        raise UserError("the answer to teach is empty", TEACH_HINT)
    if len(question) > MAX_QUESTION:
        raise UserError(
            f"the question is {len(question)} characters; at most {MAX_QUESTION} can be taught",
            "teach the short question people will ask",
        )
    if len(answer) > MAX_ANSWER:
        raise UserError(
            f"the answer is {len(answer)} characters; at most {MAX_ANSWER} can be taught",
            "shorten it, or split it over several questions",
        )
    if "\n" in question or any(unicodedata.category(c) == "Cc" and c != "\n" for c in question + answer):
        raise UserError("a taught pair cannot hold control characters", "type plain text (a newline only in answers)")
    return question, answer


@dataclass(frozen=True)
class Pair:
    id: int
    question: str
    answer: str
    source: str  # who taught it: console, submit (llmos teach), http
    taught_at: float
    consolidated: int | None = None  # the consolidation run whose model version learnt this answer

    def describe(self) -> str:
        return f"#{self.id} {self.question!r} => {self.answer!r} (taught on {self.source})"

    def as_dict(self) -> dict[str, object]:
        return {"pair": self.id, "question": self.question, "answer": self.answer, "source": self.source}


def _pair(row: sqlite3.Row | tuple[object, ...]) -> Pair:
    i, question, answer, source, at, run = row
    consolidated = None if run is None else int(run)  # type: ignore[arg-type]
    return Pair(int(i), str(question), str(answer), str(source), float(at), consolidated)  # type: ignore[arg-type]


_COLUMNS = "id, question, answer, source, taught_at, consolidated"


class Teaching:
    """The taught pairs: teach, forget, look up, list. Thread-safe (through the store's lock)."""

    def __init__(self, store: Store, max_pairs: int, enabled: bool = True) -> None:
        self.store = store
        self.max_pairs = max_pairs
        self.enabled = enabled  # learning.teach: false keeps the pairs but neither uses nor takes new ones
        self.on_forget: list[Callable[[Pair], None]] = []

    def _write_error(self, e: sqlite3.Error) -> UserError:
        return UserError(
            f"cannot store the change in {self.store.path}: {e}",
            "free space on /var (`/status` shows the database); nothing was changed",
        )

    def teach(self, question: str, answer: str, source: str) -> tuple[Pair, bool]:
        """Store a pair (a pair for the same question is replaced): (the pair, whether it replaced one)."""
        if not self.enabled:
            raise UserError("teaching is off on this device (learning.teach is false)", "set learning.teach: true")
        question, answer = check_pair(question, answer)
        k = key(question)
        try:
            with self.store.locked(write=True) as db:
                old = db.execute("SELECT id FROM taught WHERE key = ?", [k]).fetchone()
                if old is None:
                    n = db.execute("SELECT COUNT(*) FROM taught").fetchone()[0]
                    if n >= self.max_pairs:
                        raise UserError(
                            f"{n} pairs are taught already, the most learning.max_pairs allows",
                            "forget some (/taught lists them), or raise learning.max_pairs",
                        )
                    cur = db.execute(
                        "INSERT INTO taught (key, question, answer, source, taught_at) VALUES (?, ?, ?, ?, ?)",
                        [k, question, answer, source, time.time()],
                    )
                    pid = int(cur.lastrowid or 0)
                else:
                    pid = int(old[0])
                    # a new answer is not in any model's weights yet: consolidated again at the next run
                    db.execute(
                        "UPDATE taught SET question = ?, answer = ?, source = ?, taught_at = ?, consolidated = NULL "
                        "WHERE id = ?",
                        [question, answer, source, time.time(), pid],
                    )
                row = db.execute(f"SELECT {_COLUMNS} FROM taught WHERE id = ?", [pid]).fetchone()
        except sqlite3.Error as e:
            raise self._write_error(e) from None
        pair = _pair(row)
        self.store.event("taught", f"{source} taught {pair.question!r}", {"pair": pair.id, "replaced": old is not None})
        return pair, old is not None

    def forget(self, question: str) -> Pair:
        """Remove the pair that `question` would get (the same nearness rule as asking)."""
        k = key(question)
        if not k:
            raise UserError("forget needs the taught question", "e.g. /forget what is the wifi password")
        try:
            with self.store.locked(write=True) as db:
                row = db.execute(f"SELECT {_COLUMNS} FROM taught WHERE key = ?", [k]).fetchone()
                if row is not None:
                    db.execute("DELETE FROM taught WHERE id = ?", [row[0]])
        except sqlite3.Error as e:
            raise self._write_error(e) from None
        if row is None:
            raise UserError(f"nothing is taught for {question.strip()!r}", "/taught lists the taught questions")
        pair = _pair(row)
        self.store.event("forgot", f"forgot {pair.question!r}", {"pair": pair.id})
        for hook in self.on_forget:  # consolidation takes a forgotten answer out of the weights too
            hook(pair)
        return pair

    def lookup(self, question: str) -> Pair | None:
        k = key(question)
        if not k or not self.enabled:
            return None
        with self.store.locked(fresh=False) as db:  # the taught table only: held request rows may wait
            row = db.execute(f"SELECT {_COLUMNS} FROM taught WHERE key = ?", [k]).fetchone()
        return None if row is None else _pair(row)

    def pairs(self, search: str = "", limit: int = 50) -> list[Pair]:
        """The taught pairs, newest first; with `search`, those whose question or answer has all its words (FTS5)."""
        terms = words(search)
        with self.store.locked(fresh=False) as db:  # the taught table only: held request rows may wait
            if terms:
                match = " ".join(f'"{t}"' for t in terms)
                rows = db.execute(
                    f"SELECT {', '.join('t.' + c.strip() for c in _COLUMNS.split(','))} FROM taught_fts "
                    "JOIN taught t ON t.id = taught_fts.rowid WHERE taught_fts MATCH ? ORDER BY rank LIMIT ?",
                    [match, limit],
                ).fetchall()
            else:
                rows = db.execute(f"SELECT {_COLUMNS} FROM taught ORDER BY id DESC LIMIT ?", [limit]).fetchall()
        return [_pair(r) for r in rows]

    def count(self) -> int:
        with self.store.locked(fresh=False) as db:  # the taught table only: held request rows may wait
            return int(db.execute("SELECT COUNT(*) FROM taught").fetchone()[0])

    # -- consolidation (consolidation.py) ------------------------------------------------------------------
    def all_pairs(self) -> list[Pair]:
        with self.store.locked(fresh=False) as db:  # the taught table only: held request rows may wait
            return [_pair(r) for r in db.execute(f"SELECT {_COLUMNS} FROM taught ORDER BY id").fetchall()]

    def mark_consolidated(self, ids: list[int], run: int | None) -> None:
        """Record that run `run`'s model holds these pairs' answers (None: no model does)."""
        with self.store.locked(write=True) as db:
            for i in ids:
                db.execute("UPDATE taught SET consolidated = ? WHERE id = ?", [run, i])
