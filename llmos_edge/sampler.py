"""The status page's history: every `database.sample_interval` seconds a sample of the controlled zone's
temperature, the governor's CPU share, the tokens generated and their decode speed, the queue and memory. The store
keeps the last hour of samples in memory and averages them, `database.sample_row` seconds at a time, into the rows of
the `samples` table (store.py, `average_samples`): the page's hour at full resolution, the flash spared.

Tokens and speed come from the request rows recorded since the last sample (the requests that finished in the
interval), so a sample says what the engine did, not what the last answer happened to be. Speed is NULL in an
interval where nothing finished: the plot shows a gap there, not a made-up zero.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from llmos_edge.status import Status
from llmos_edge.store import Store
from llmos_edge.wear import WearMeter

log = logging.getLogger(__name__)


class Sampler:
    def __init__(
        self, store: Store, status: Callable[[], Status], interval: float, wear: WearMeter | None = None
    ) -> None:
        self.store = store
        self.status = status
        self.interval = interval
        self.wear = wear  # flash wear (wear.py) is counted at the same ticks: it needs the requests of each interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_id = -1  # the newest request row already counted; -1: not read yet

    def start(self) -> None:
        if self._last_id < 0:
            self._last_id = self.store.last_request_id()  # requests of earlier starts belong to no interval of ours
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    restart = start

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 0.5) -> None:
        """Stop, letting a sample under way finish: the store closes next."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # one bad sample (a sensor read, a locked database) must not end the history
                log.exception("could not take a sample")

    def sample(self) -> dict[str, Any]:
        """Take one sample and record it; returns the row."""
        s = self.status()
        self._last_id, tokens, decoded, decode_s, finished = self.store.finished_since(self._last_id)
        if self.wear is not None:
            self.wear.tick(self.interval, finished)
        row = {
            "at": time.time(),
            "celsius": s.governor.celsius,
            "share": round(s.governor.share, 3),
            "tokens": tokens,
            # Tokens after each answer's first, over the time it took to decode them: the speed a person sees.
            "tok_s": round(decoded / decode_s, 2) if decode_s > 0 else None,
            "queue": sum(s.queue.values()),
            "rss_supervisor": s.memory.supervisor_rss,
            "rss_engine": s.memory.engine_rss,
            "mem_available": s.memory.available,
        }
        self.store.record_sample(row)
        return row
