"""The status page's HTML (llmos_edge/status_page.py) and the sampler that records its history, on a real SQLite
store: panels by id, plots drawn from the samples table, untrusted text escaped, a fresh boot with no data."""

from __future__ import annotations

import re
import time
from html.parser import HTMLParser
from pathlib import Path

from llmos_edge import status_page
from llmos_edge.sampler import Sampler
from llmos_edge.status import GovernorStatus
from llmos_edge.store import Store
from tests.voice_fixtures import status_snapshot

PANELS = ("model", "state", "temperature", "speed", "queue", "governor", "restarts", "requests")
EVIL = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


class Tags(HTMLParser):
    """Every element and attribute of a document, as a browser's tokenizer sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    p = Tags()
    p.feed(page)
    return p.tags


def panels(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="panel-([a-z]+)"[^>]*>(.*?)</section>', page, re.S))


def store_with_history(tmp_path: Path, now: float) -> Store:
    s = Store(tmp_path / "l.db")
    s.record_start(version="t", config_sources="defaults", config_fallback="", model="m.gguf")
    for i in range(12):  # two minutes at 10 s, warming up; tok/s only where a request finished
        s.record_sample(
            {
                "at": now - 120 + i * 10,
                "celsius": 50.0 + i,
                "share": 1.0 if i < 8 else 0.6,
                "tokens": 40 if i % 3 == 0 else 0,
                "tok_s": 250.0 - i if i % 3 == 0 else None,
                "queue": i % 2,
                "rss_supervisor": 40 << 20,
                "rss_engine": 60 << 20,
                "mem_available": 1 << 30,
            }
        )
    s.record_request(
        {
            "source": "http",
            "priority": "interactive",
            "prompt": EVIL,
            "answer": "a </td> answer & more",
            "outcome": "ok",
        }
    )
    s.record_request({"source": "console", "prompt": "hello", "answer": "", "outcome": "refused", "error": "too hot"})
    s.event("governor", "throttling: 61.0 °C above setpoint 60 °C; share 0.60", {"action": "throttle"})
    s.event("engine_restart", "the engine died (SIGKILL); restarting in 1 s", {"restarts": 1})
    s.event("ready", "self-test passed")  # neither a restart nor the governor's: on no event panel
    return s


def test_every_panel_is_on_the_page_with_its_content(tmp_path: Path) -> None:
    now = time.time()
    store = store_with_history(tmp_path, now)
    status = status_snapshot(restarts=1, queue={"interactive": 2, "background": 0})
    page = status_page.render(status, store, now)
    got = panels(page)
    assert tuple(got) == PANELS
    assert "llmos-tiny" in got["model"] and "Q8_0" in got["model"]
    assert "ready" in got["state"] and "cpu-thermal 52.5 °C" in got["state"]
    assert '<dd><span class="num">2</span></dd>' in got["queue"]
    assert "most waiting at once in the last hour (sampled): 1" in got["queue"]
    assert "throttling: 61.0 °C" in got["governor"] and "engine_restart" not in got["governor"]
    assert "the engine died (SIGKILL)" in got["restarts"] and "self-test passed" not in page
    assert 'engine restarts since this start: <strong class="num">1</strong>' in got["restarts"]
    assert "too hot" in got["requests"] and "refused" in got["requests"]


def test_the_plots_draw_the_samples_and_break_the_line_where_nothing_was_measured(tmp_path: Path) -> None:
    now = time.time()
    page = status_page.render(status_snapshot(), store_with_history(tmp_path, now), now)
    got = panels(page)
    temp = re.findall(r'<path class="line" d="([^"]+)"', got["temperature"])
    assert len(temp) == 1 and temp[0].count("L") == 11  # twelve samples, one unbroken line
    xs = [float(p.split(",")[0]) for p in temp[0][1:].split(" L")]
    ys = [float(p.split(",")[1]) for p in temp[0][1:].split(" L")]
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True)  # later to the right, warmer higher up
    assert "setpoint 70 °C" in got["temperature"]  # the governor's setpoint as a reference line
    assert "CPU share now 1.00, lowest 0.60" in got["temperature"]
    # tok/s was measured in 4 samples of 12, none adjacent: 4 dots, no line through the gaps
    assert "<path" not in got["speed"] and got["speed"].count('<circle class="dot"') == 4
    assert "160 tokens generated in 12 samples; decode speed 241 to 250 tok/s" in got["speed"]


def test_prompts_and_answers_are_shown_as_text_never_as_markup(tmp_path: Path) -> None:
    now = time.time()
    page = status_page.render(status_snapshot(), store_with_history(tmp_path, now), now)
    elements = tags(page)
    assert not [t for t, _ in elements if t in ("script", "img", "iframe", "object")]
    assert not [a for _, attrs in elements for a in attrs if a.startswith("on")]
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in page
    assert "a &lt;/td&gt; answer &amp; more" in page
    csp = [a["content"] for t, a in elements if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in (csp[0] or "") and "script-src" not in (csp[0] or "")


def test_a_model_name_with_markup_is_escaped_too(tmp_path: Path) -> None:
    s = Store(tmp_path / "l.db")
    status = status_snapshot(state="loading", model=None, model_file='<b onmouseover="x()">m.gguf')
    page = status_page.render(status, s, time.time())
    assert "&lt;b onmouseover=&quot;x()&quot;&gt;m.gguf" in page
    assert not [t for t, _ in tags(page) if t == "b"]


def test_a_fresh_boot_says_there_is_no_data_yet(tmp_path: Path) -> None:
    s = Store(tmp_path / "l.db")
    status = status_snapshot(
        state="loading",
        serving=False,
        model=None,
        governor=GovernorStatus(True, None, 75.0, "no thermal sensor", 1.0, 0, (), ""),
    )
    got = panels(status_page.render(status, s, time.time()))
    assert tuple(got) == PANELS
    assert "no samples yet" in got["temperature"] and "no samples yet" in got["speed"]
    assert "no requests yet" in got["requests"]
    assert "no governor decisions recorded" in got["governor"]
    assert "no restarts or failures recorded" in got["restarts"]
    assert "<svg" not in "".join(got.values())


def test_samples_older_than_an_hour_are_not_plotted(tmp_path: Path) -> None:
    now = time.time()
    s = Store(tmp_path / "l.db")
    s.record_sample({"at": now - 4000, "celsius": 99.0, "share": 1.0, "tokens": 0, "queue": 0})
    s.record_sample({"at": now - 30, "celsius": 40.0, "share": 1.0, "tokens": 0, "queue": 0})
    got = panels(status_page.render(status_snapshot(), s, now))
    assert "99" not in got["temperature"] and "last hour 40.0 to 40.0 °C" in got["temperature"]


def test_an_hour_of_fast_samples_is_averaged_into_a_line_of_a_few_hundred_points(tmp_path: Path) -> None:
    now = time.time()
    s = Store(tmp_path / "l.db")
    rows = [{"at": now - 3600 + i, "celsius": 60.0 + (i % 2) * 10, "share": 1.0, "queue": 0} for i in range(3600)]
    s.db["samples"].insert_all(rows)  # an hour at database.sample_interval 1, in one transaction (fsync is slow)
    page = status_page.render(status_snapshot(), s, now)
    lines = re.findall(r'<path class="line" d="([^"]+)"', panels(page)["temperature"])
    assert len(lines) == 1 and 300 <= lines[0].count("L") + 1 <= status_page.MAX_POINTS
    assert "last hour 60.0 to 70.0 °C" in page  # the note still tells the extremes the averages hide
    assert len(page) < 60_000


def test_the_sampler_records_the_decode_speed_of_the_requests_finished_in_each_interval(tmp_path: Path) -> None:
    s = Store(tmp_path / "l.db")
    s.record_request({"prompt": "from an earlier start", "tokens_out": 500, "tok_s": 1.0, "outcome": "ok"})
    status = status_snapshot(queue={"interactive": 1, "background": 2})
    sampler = Sampler(s, lambda: status, 10.0)
    sampler._last_id = s.last_request_id()  # as start() does, without its thread
    s.record_request({"prompt": "a", "tokens_out": 11, "tok_s": 100.0, "outcome": "ok"})  # 10 tokens in 0.1 s
    s.record_request({"prompt": "b", "tokens_out": 21, "tok_s": 50.0, "outcome": "ok"})  # 20 tokens in 0.4 s
    s.record_request({"prompt": "c", "tokens_out": 0, "tok_s": 0.0, "outcome": "refused"})
    first = sampler.sample()
    assert first["tokens"] == 32 and first["tok_s"] == 60.0  # 30 tokens in 0.5 s, not the mean of 100 and 50
    assert first["celsius"] == 52.5 and first["queue"] == 3 and first["rss_engine"] == 60 << 20
    second = sampler.sample()
    assert second["tokens"] == 0 and second["tok_s"] is None  # nothing finished: no speed, not a zero
    rows = s.samples_since(0)
    assert [r["tok_s"] for r in rows] == [60.0, None] and rows[0]["start_id"] is None


def test_the_sampler_thread_writes_samples_at_its_interval(tmp_path: Path) -> None:
    s = Store(tmp_path / "l.db")
    sampler = Sampler(s, status_snapshot, 0.05)
    sampler.start()
    try:
        deadline = time.monotonic() + 10
        while len(s.samples_since(0)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sampler.alive()
    finally:
        sampler.stop()
    assert len(s.samples_since(0)) >= 3
