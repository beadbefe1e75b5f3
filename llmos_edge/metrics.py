"""Prometheus metrics for /metrics: counters the scheduler feeds as requests finish, gauges read from a Status
snapshot at each scrape.

A registry of our own (not prometheus_client's global one), so nothing but these metrics is exported and tests can
make as many as they like. Names follow Prometheus' conventions: a `llmos_` prefix, base units (seconds, bytes),
`_total` on counters.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmos_edge.scheduler import CLASSES, Request, Result
from llmos_edge.status import Status

# Time to first token as a user sees it (queue wait + prefill), from a 2-core board's tens of milliseconds to a
# request that waited behind a long answer.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The `_created` series (a timestamp per counter) double the output and tell a scraper nothing the supervisor's
# uptime does not; the process exports no other registry.
disable_created_metrics()  # type: ignore[no-untyped-call]


class _StatusCollector(Collector):
    """Gauges from one Status snapshot per scrape: what the device is doing right now."""

    def __init__(self, status: Callable[[], Status]) -> None:
        self.status = status

    def describe(self) -> list[Metric]:
        return []  # registering must not take a snapshot: the supervisor is still being built then

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        ready = GaugeMetricFamily("llmos_ready", "1 when the model answers requests, else 0")
        ready.add_metric([], 1.0 if s.ready else 0.0)
        yield ready
        state = GaugeMetricFamily("llmos_state", "The appliance's state (1 for the current one)", labels=["state"])
        state.add_metric([s.state], 1.0)
        yield state
        queue = GaugeMetricFamily("llmos_queue_depth", "Requests waiting, by class", labels=["class"])
        for c in CLASSES:
            queue.add_metric([c], float(s.queue.get(c, 0)))
        yield queue
        temp = GaugeMetricFamily("llmos_temperature_celsius", "Thermal zone temperature", labels=["zone"])
        for name, celsius in s.temperatures:
            temp.add_metric([name], celsius)
        yield temp
        share = GaugeMetricFamily(
            "llmos_cpu_share", "CPU share the governor grants the engine (1 = unthrottled, lower = throttled)"
        )
        share.add_metric([], s.governor.share)
        yield share
        mem = GaugeMetricFamily("llmos_memory_bytes", "Resident memory by process", labels=["process"])
        mem.add_metric(["supervisor"], float(s.memory.supervisor_rss))
        mem.add_metric(["engine"], float(s.memory.engine_rss))
        yield mem
        avail = GaugeMetricFamily("llmos_memory_available_bytes", "Memory available to new work (MemAvailable)")
        avail.add_metric([], float(s.memory.available))
        yield avail
        budget = GaugeMetricFamily("llmos_memory_budget_bytes", "The engine's memory budget (0 when none)")
        budget.add_metric([], float(s.governor.budget))
        yield budget
        restarts = GaugeMetricFamily("llmos_engine_restarts", "Engine worker restarts since the supervisor started")
        restarts.add_metric([], float(s.restarts))
        yield restarts
        speed = GaugeMetricFamily("llmos_last_decode_tokens_per_second", "Decode speed of the last answer")
        speed.add_metric([], s.last.decode_tok_s if s.last else 0.0)
        yield speed
        up = GaugeMetricFamily("llmos_uptime_seconds", "Seconds since the supervisor started")
        up.add_metric([], s.uptime_s)
        yield up


class Metrics:
    def __init__(self, status: Callable[[], Status]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self.requests = Counter(
            "llmos_requests",
            "Finished requests by front-end and outcome",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.tokens = Counter("llmos_generated_tokens", "Tokens generated", ["source"], registry=self.registry)
        self.prompt_tokens = Counter("llmos_prompt_tokens", "Prompt tokens read", ["source"], registry=self.registry)
        self.decode_seconds = Counter(
            "llmos_decode_seconds",
            "Seconds spent decoding after the first token (tokens / seconds = tok/s over any window)",
            registry=self.registry,
        )
        self.ttft = Histogram(
            "llmos_time_to_first_token_seconds",
            "From a request's arrival to its first token: queue wait plus prompt processing",
            ["priority"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StatusCollector(status))

    def observe(self, req: Request, result: Result) -> None:
        """The scheduler calls this as each request finishes (refused ones too)."""
        s = result.stats
        with self._lock:
            self.requests.labels(req.source, result.outcome).inc()
            if s.tokens_out:
                self.tokens.labels(req.source).inc(s.tokens_out)
                self.prompt_tokens.labels(req.source).inc(s.tokens_in)
                self.ttft.labels(req.priority).observe(result.queue_wait_s + s.ttft_s)
                if s.decode_tok_s > 0 and s.tokens_out > 1:
                    self.decode_seconds.inc((s.tokens_out - 1) / s.decode_tok_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
