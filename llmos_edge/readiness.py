"""Readiness and liveness for systemd: when READY=1 is sent, which threads the product needs, and whether
WATCHDOG=1 may be sent.

READY=1 goes out once the supervisor has reached a steady state: the model answered its self-test (serving), or the
model cannot be used for a reason a person must fix (degraded: the console still answers /status with the reason
instead of the service restarting in a loop). A board that boots above its critical temperature waits to cool
before the self-test, asking systemd for more time (EXTEND_TIMEOUT_USEC) meanwhile. WATCHDOG=1 is sent only while
the product's threads are alive and the engine is idle or making progress; STATUS= is a one-line summary.

A front-end thread (console, control socket, voice) or the governor's loop that dies is started again and the death
is logged and recorded; the watchdog ping is withheld while any needed thread is dead (the keeper and the scheduler
cannot be restarted in place: systemd's watchdog then restarts the whole service).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import sdnotify

from llmos_edge.keeper import EngineState, KeeperState

if TYPE_CHECKING:
    from llmos_edge.engine import Engine
    from llmos_edge.governor import Governor
    from llmos_edge.keeper import Keeper
    from llmos_edge.model_store import ModelStore
    from llmos_edge.store import Store

log = logging.getLogger(__name__)

HOT_BOOT_EXTEND_S = 30  # while booting hot, each EXTEND_TIMEOUT_USEC gives systemd this much more patience


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


class Readiness:
    """The supervisor's side of systemd's notify protocol, and the self-test that decides READY=1."""

    def __init__(
        self,
        keeper: Keeper,
        governor: Governor,
        models: ModelStore,
        store: Store,
        engine: Engine,
        *,
        progress_timeout: float,
        stopping: threading.Event,
        started: float,
        summary: Callable[[], str],
    ) -> None:
        self.keeper, self.governor, self.models, self.store, self.engine = keeper, governor, models, store, engine
        self.progress_timeout = progress_timeout
        self.stopping = stopping
        self.started = started
        self.summary = summary  # the STATUS= line
        self.notifier = sdnotify.SystemdNotifier()
        self.watch = ThreadWatch(store)
        self.ready_sent = False
        self.self_test = "not run"
        self.before_ready: list[threading.Thread] = []  # READY=1 waits for these too (asking systemd for time)

    def wait_until_steady(self) -> None:
        """Block until serving (the model that came up passed its gate) or settled in a state a person must fix;
        then READY=1. A store model that fails its gate at boot is rolled back and the previous one gated."""
        keeper, governor = self.keeper, self.governor
        said_hot = False
        while not self.stopping.is_set():
            if keeper.ready.wait(0.2):
                if governor.thermal.mode.refuses:
                    # Booted hot (a closed case in the sun): the self-test would only be refused. Wait for the
                    # board to cool, telling systemd we are still starting so it does not kill us for being slow;
                    # the console already answers, with the reason.
                    if not said_hot:
                        said_hot = True
                        self.self_test = "waiting for the board to cool"
                        log.warning("self-test waits: %s", governor.thermal.refusal())
                        self.store.event("self_test_waiting", governor.thermal.refusal())
                    self.notifier.notify(f"EXTEND_TIMEOUT_USEC={HOT_BOOT_EXTEND_S * 1_000_000}")
                    self.notify_status()
                    self.stopping.wait(1.0)
                    continue
                entry = keeper.running
                if entry is None:
                    continue
                ok, result = keeper.gate(entry)
                self.self_test = result if ok else f"failed: {result}"
                if ok:
                    self.models.mark(entry.name, good=True, gate=result)
                    self.store.event("ready", f"self-test {self.self_test}", {"model": entry.name})
                    break
                self.store.event("self_test_failed", self.self_test, {"model": entry.name})
                if keeper.boot_gate_failed(result):
                    continue  # rolled back to the last good model: gate that one
                keeper.es = EngineState(KeeperState.DEGRADED, f"self-test {self.self_test}")
                break
            if keeper.es.state is KeeperState.FAILED:
                break
            self.notify_status()
        for job in self.before_ready:  # loading what must not load under the watchdog (voice's models)
            while job.is_alive() and not self.stopping.is_set():
                self.notifier.notify(f"EXTEND_TIMEOUT_USEC={HOT_BOOT_EXTEND_S * 1_000_000}")
                self.notify_status()
                job.join(1.0)
        if not self.stopping.is_set():
            self.notifier.notify("READY=1")
            self.ready_sent = True
            log.info("ready: %s", self.summary())

    def shown_state(self) -> str:
        # The engine is up before the self-test has answered: not ready for people yet.
        state = self.keeper.es.state
        return "starting" if state is KeeperState.READY and not self.ready_sent else state.value

    def loading(self) -> str:
        """For the console's banner and prompt: what is loading and for how long; "" once a model answers."""
        k = self.keeper
        if self.ready_sent and k.ready.is_set():
            return ""
        since = time.monotonic() - self.started
        if k.es.state in (KeeperState.FAILED, KeeperState.DEGRADED) and not k.ready.is_set():
            return f"{k.es.state.value}: {k.es.reason} (see /status)"
        what = k.es.reason or f"loading {k.target.name}"
        if k.ready.is_set() and not self.ready_sent:
            what = f"{k.target.name} loaded, self-test running"
        return f"{what}, {since:.0f} s"

    def notify_status(self) -> None:
        self.notifier.notify(f"STATUS={self.summary()}")

    def healthy(self) -> bool:
        dead = self.watch.check()
        if dead:
            log.error("not healthy: the %s thread(s) are dead", ", ".join(dead))
            return False
        if self.engine.busy:
            return time.monotonic() - self.engine.last_progress < self.progress_timeout
        return True

    def keep_alive(self) -> None:
        """Until stopping: WATCHDOG=1 every half WatchdogSec while healthy, and STATUS= with it."""
        interval = watchdog_interval()
        last_ping = 0.0
        while not self.stopping.wait(0.5):
            now = time.monotonic()
            if now - last_ping >= interval:
                if self.healthy():
                    self.notifier.notify("WATCHDOG=1")
                else:
                    log.error("not healthy: withholding the watchdog ping")
                self.notify_status()
                last_ping = now

    def stopping_now(self) -> None:
        self.notifier.notify("STOPPING=1")
