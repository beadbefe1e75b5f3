"""Readiness and liveness for systemd: which threads the product needs, and whether WATCHDOG=1 may be sent.

A front-end thread (console, control socket, voice) or the governor's loop that dies is started again and the death
is logged and recorded; the watchdog ping is withheld while any needed thread is dead (the keeper and the scheduler
cannot be restarted in place: systemd's watchdog then restarts the whole service).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


class EventSink(Protocol):
    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None: ...


@dataclass
class Watched:
    name: str
    alive: Callable[[], bool]
    restart: Callable[[], None] | None = None  # None: cannot be restarted in place


class ThreadWatch:
    def __init__(self, store: EventSink) -> None:
        self.store = store
        self.watched: list[Watched] = []
        self.restarts: dict[str, int] = {}

    def add(self, name: str, alive: Callable[[], bool], restart: Callable[[], None] | None = None) -> None:
        self.watched.append(Watched(name, alive, restart))

    def check(self) -> list[str]:
        """Restart what died and can be restarted; return the names of threads still dead."""
        dead = []
        for w in self.watched:
            if w.alive():
                continue
            if w.restart is not None:
                n = self.restarts[w.name] = self.restarts.get(w.name, 0) + 1
                log.error("the %s thread died; starting it again (restart %d)", w.name, n)
                self.store.event("thread_restarted", f"the {w.name} thread died and was started again", {"n": n})
                try:
                    w.restart()
                except Exception:
                    log.exception("restarting the %s thread", w.name)
                if w.alive():
                    continue
            dead.append(w.name)
        return dead


def watchdog_interval() -> float:
    """Half of systemd's WatchdogSec (WATCHDOG_USEC), or 5 s when not run by systemd's watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    return max(int(usec) / 2e6, 0.5) if usec and usec.isdigit() else 5.0
