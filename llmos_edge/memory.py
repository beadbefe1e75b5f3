"""Conversation memory (issue 15, point 3): each source's turns in SQLite, recalled into a follow-up through FTS5.

A conversation is a source (console, submit, http, voice): every answered question of a person is stored as a turn.
For a new question, the source's earlier turns that share its rarer words (FTS5 MATCH, ranked by bm25) are recalled,
the best first, as many as `learning.recall_turns` allows and as fit the context budget, and given to the model as
the conversation before the question (chronological user/assistant messages through the model's chat template).

The budget is counted without the model's tokenizer, as an upper bound: a turn costs its UTF-8 bytes (no tokenizer
makes more tokens than bytes, byte fallback being one token per byte) plus TURN_OVERHEAD tokens for the template's
role markers; the question, the answer's max_tokens and TEMPLATE_RESERVE come off the context first. So the prompt
always fits, whatever the model.

Only a model with a chat template is given recalled turns. Models that take one question (the default model's
`llmos.prompt_template`) were trained without a conversation before it, and a model with no template at all would get
the turns as raw lines: for them nothing is recalled, and no turn is stored either (the supervisor decides): a turn
nothing can recall would only wear the flash (about 2.8 kB a turn, index included, even in batches).

A turn is written in the same commit as its request's row (`turn_row`, through the scheduler): an answer costs the
flash one fsync, not two. Retention, at most `learning.keep_turns` turns per source and none older than
`learning.keep_days`, is applied at start and then once every PRUNE_EVERY turns, not at each (a delete per turn
would rewrite FTS5 pages on every answer); a turn past `keep_days` is never recalled meanwhile. Forget is per source
(`/memory forget`), or everything.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmos_edge.errors import UserError
from llmos_edge.learning import SOURCES, words
from llmos_edge.store import Store

log = logging.getLogger(__name__)

TURN_OVERHEAD = 16  # tokens a chat template adds around one message (role markers, separators), generously
TEMPLATE_RESERVE = 64  # tokens a template may add once (a default system prompt, the assistant's header)
MAX_STORED_CHARS = 2000  # of a turn's question or answer: longer text is cut when stored
PRUNE_EVERY = 50  # turns written between two applications of the retention limits
# Words too common to make a turn relevant; words of one or two letters are skipped too.
STOPWORDS = frozenset(
    {
        "the",
        "and",
        "for",
        "are",
        "but",
        "not",
        "you",
        "your",
        "yours",
        "with",
        "what",
        "which",
        "who",
        "whom",
        "this",
        "that",
        "these",
        "those",
        "was",
        "were",
        "have",
        "has",
        "had",
        "how",
        "why",
        "when",
        "where",
        "does",
        "did",
        "can",
        "could",
        "would",
        "should",
        "will",
        "shall",
        "from",
        "into",
        "about",
        "there",
        "their",
        "them",
        "they",
        "then",
        "than",
        "its",
        "please",
        "thanks",
        "thank",
        "tell",
        "llmos",
        "hey",
        "hello",
        "some",
        "any",
        "very",
        "just",
        "also",
    }
)


@dataclass(frozen=True)
class Turn:
    id: int
    source: str
    at: float
    question: str
    answer: str

    def cost(self) -> int:
        """Upper bound of the tokens this turn takes in a prompt (the module's doc string)."""
        return len(self.question.encode()) + len(self.answer.encode()) + 2 * TURN_OVERHEAD


def prompt_cost(text: str) -> int:
    return len(text.encode()) + TURN_OVERHEAD


def query_terms(question: str) -> list[str]:
    seen: list[str] = []
    for w in words(question):
        if len(w) > 2 and w not in STOPWORDS and w.isalnum() and w not in seen:
            seen.append(w)
    return seen


class Memory:
    def __init__(
        self,
        store: Store,
        *,
        keep_turns: int,
        keep_days: float,
        recall_turns: int,
        recall_tokens: int,
        enabled: bool = True,
        prune_every: int = PRUNE_EVERY,
    ) -> None:
        self.store = store
        self.enabled = enabled  # learning.memory (the supervisor neither stores nor recalls turns when false)
        self.keep_turns = keep_turns
        self.keep_days = keep_days
        self.recall_turns = recall_turns
        self.recall_tokens = recall_tokens
        self.prune_every = prune_every
        self._unpruned = 0  # turns handed out since the limits were last applied
        # Whether the running model takes a conversation (the supervisor sets it): when not, nothing is stored.
        self.model_takes: Callable[[], bool] = lambda: True

    def turn_row(self, source: str, question: str, answer: str, request_id: int = 0) -> tuple[str, dict[str, Any]]:
        """A turn as a row of `turns`, for the caller to write with the request's own row (Store.record_request)."""
        self._unpruned += 1
        row = {
            "source": source,
            "at": time.time(),
            "question": question[:MAX_STORED_CHARS],
            "answer": answer[:MAX_STORED_CHARS],
            "request_id": request_id or None,
        }
        return "turns", row

    def remember(self, source: str, question: str, answer: str, request_id: int = 0) -> None:
        """Store a turn on its own (no request row to go with it) and apply the limits when due. A failure (a full
        disk) costs the turn only."""
        table, row = self.turn_row(source, question, answer, request_id)
        try:
            with self.store.locked(write=True) as db:
                db.table(table).insert(row)
        except sqlite3.Error as e:
            log.error("could not store a turn of %s: %s", source, e)
        self.prune_when_due()

    def prune_when_due(self) -> None:
        if self._unpruned >= self.prune_every:
            self.prune()

    def prune(self) -> None:
        """Apply the retention limits to every source, in one transaction. A failure (a full disk: deleting needs
        room in the WAL too) is tried again at the next turn."""
        try:
            with self.store.locked(write=True) as db:
                db.execute("DELETE FROM turns WHERE at < ?", [time.time() - self.keep_days * 86400])
                sources = [str(r[0]) for r in db.execute("SELECT DISTINCT source FROM turns").fetchall()]
                for source in sources:
                    db.execute(
                        "DELETE FROM turns WHERE source = ? AND id <= (SELECT id FROM turns WHERE source = ? "
                        "ORDER BY id DESC LIMIT 1 OFFSET ?)",
                        [source, source, self.keep_turns],
                    )
            self._unpruned = 0
        except sqlite3.Error as e:
            log.error("could not apply the conversation's retention limits: %s", e)

    def recall(self, source: str, question: str, budget: int) -> list[Turn]:
        """The earlier turns of `source` relevant to `question`, best first while they fit `budget` tokens (at most
        recall_turns of them), returned oldest first: the conversation to put before the question."""
        budget = min(budget, self.recall_tokens)
        terms = query_terms(question)
        if not terms or budget <= 0 or self.recall_turns <= 0:
            return []
        match = " OR ".join(f'"{t}"' for t in terms)
        since = time.time() - self.keep_days * 86400
        # Turns still held for the next batch commit (store.py's request ring) are not in the FTS5 index yet: those
        # sharing a word with the question come first, newest first (they are the last hour's), then the index's.
        wanted = set(terms)
        rows = [
            (t["id"], t["source"], t["at"], t["question"], t["answer"])
            for t in reversed(self.store.held("turns"))
            if t["source"] == source and wanted & set(query_terms(f"{t['question']} {t['answer']}"))
        ]
        with self.store.locked(fresh=False) as db:
            rows += db.execute(
                "SELECT t.id, t.source, t.at, t.question, t.answer FROM turns_fts JOIN turns t "
                "ON t.id = turns_fts.rowid WHERE turns_fts MATCH ? AND t.source = ? AND t.at >= ? "
                "ORDER BY bm25(turns_fts), t.id DESC LIMIT 50",
                [match, source, since],
            ).fetchall()
        chosen: list[Turn] = []
        for r in rows:
            turn = Turn(int(r[0]), str(r[1]), float(r[2]), str(r[3]), str(r[4]))
            if turn.cost() <= budget:
                chosen.append(turn)
                budget -= turn.cost()
                if len(chosen) == self.recall_turns:
                    break
        return sorted(chosen, key=lambda t: t.id)

    def forget(self, source: str = "") -> int:
        """Delete the turns of one source (every source when empty): how many were deleted."""
        try:
            with self.store.locked(write=True) as db:
                cur = db.execute("DELETE FROM turns WHERE source = ? OR ? = ''", [source, source])
                n = int(cur.rowcount)
        except sqlite3.Error as e:
            raise UserError(
                f"cannot forget the conversation in {self.store.path}: {e}",
                "free space on /var (`/status` shows the database); nothing was deleted",
            ) from None
        self.store.event("memory_forgotten", f"forgot {n} turns of {source or 'every source'}", {"source": source})
        return n

    def forget_source(self, which: str, own: str) -> tuple[str, int]:
        """`/memory forget [SOURCE|all]`: the source named (the asker's own when none), or every one: (what was
        forgotten, how many turns)."""
        which = which.strip() or own
        if which == "all":
            return "every source", self.forget("")
        if which not in SOURCES:
            raise UserError(f"there is no conversation source {which!r}", f"name one of: {', '.join(SOURCES)}, all")
        return which, self.forget(which)

    def describe(self) -> str:
        counts = self.counts()
        held = ", ".join(f"{s} {n} turns" for s, n in counts.items()) or "no turns"
        if not self.enabled:
            return f"memory: off (learning.memory is false); {held} stored from before"
        if not self.model_takes():
            return (
                f"memory: {held}; the running model takes one question (no chat template), so no turn is stored "
                "or recalled while it runs"
            )
        return (
            f"memory: {held}; each source keeps its newest {self.keep_turns} turns for {self.keep_days:g} days; "
            f"up to {self.recall_turns} relevant ones go before a question"
        )

    def counts(self) -> dict[str, int]:
        with self.store.locked(fresh=False) as db:
            rows = db.execute("SELECT source, COUNT(*) FROM turns GROUP BY source ORDER BY source").fetchall()
        counts = {str(s): int(n) for s, n in rows}
        for t in self.store.held("turns"):
            counts[t["source"]] = counts.get(t["source"], 0) + 1
        return dict(sorted(counts.items()))
