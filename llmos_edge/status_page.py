"""The status page at `/` of the HTTP front-end, as gokrazy has one: what the device runs, how it is doing, and its
last hour, in one HTML document.

Everything is drawn on the server: the plots are inline SVG built from the `samples` table (llmos_edge/sampler.py),
so the page needs no JavaScript, no library and no network beyond the device; it reloads itself with a meta refresh.
Prompts, answers, model names and event messages are untrusted text: every one goes through `html.escape`, and the
page's Content-Security-Policy forbids scripts altogether, so a prompt that holds markup is shown, never run.

Each panel is a `<section>` with a stable id (`panel-model`, `panel-state`, `panel-temperature`, `panel-speed`,
`panel-queue`, `panel-requests`, `panel-restarts`, `panel-governor`) for people's bookmarks and for tests.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable
from typing import Any

from llmos_edge.scheduler import CLASSES
from llmos_edge.status import Status, duration, mib
from llmos_edge.store import Store

HISTORY_S = 3600.0  # the plots' window
REFRESH_S = 10  # the page reloads itself this often (the default sample interval)
LAST_REQUESTS = 10
LAST_EVENTS = 10
LAST_STARTS = 5
TEXT_CUT = 120  # characters of a prompt or answer shown in the requests table
MAX_POINTS = 600  # points per plotted line: about one per pixel column; more samples are averaged into this many

# Events that tell of something restarting or failing (keeper.py, readiness.py, supervisor.py).
RESTART_KINDS = (
    "engine_restart",
    "thread_restarted",
    "keeper_error",
    "model_failed",
    "self_test_failed",
    "model_fallback_end",
    "config_fallback",
    "database_recovered",
    "http_failed",
    "control_socket_failed",
)

# Plot geometry, in SVG user units (the SVG scales to the panel's width).
W, H = 640, 170
LEFT, RIGHT, TOP, BOTTOM = 70, 10, 10, 22

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
header { background: #1d2330; color: #fff; padding: .6em 1em; display: flex; gap: 1em; align-items: baseline;
  flex-wrap: wrap; }
header h1 { font-size: 1.2em; margin: 0; }
main { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 1em; padding: 1em; }
section { background: #fff; border-radius: 6px; padding: .6em 1em; box-shadow: 0 1px 2px #0002; min-width: 0; }
section.wide { grid-column: 1 / -1; }
h2 { font-size: 1em; margin: .2em 0 .5em; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .15em 1em; margin: 0; }
dt { color: #5a6170; } dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; font-size: .92em; }
th, td { text-align: left; padding: .2em .4em; border-bottom: 1px solid #e3e5e9; vertical-align: top; }
td.text { overflow-wrap: anywhere; max-width: 28em; white-space: pre-wrap; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.state { padding: .1em .5em; border-radius: 4px; font-weight: 600; }
.state-ready { background: #2e7d32; } .state-loading, .state-starting { background: #b26a00; }
.state-degraded, .state-failed { background: #b00020; } .state-other { background: #555; }
.empty, .note { color: #5a6170; }
.ok { color: #2e7d32; } .bad { color: #b00020; }
svg { width: 100%; height: auto; display: block; }
svg .frame { fill: none; stroke: #c9ccd3; } svg .grid { stroke: #e3e5e9; }
svg .line { fill: none; stroke: #1565c0; stroke-width: 2; } svg .dot { fill: #1565c0; }
svg .ref { stroke: #b00020; stroke-dasharray: 4 3; } svg text { font-size: 11px; fill: #5a6170; }
"""


def e(value: object) -> str:
    """Escaped for HTML text and attribute values: the only way any value reaches the page."""
    return html.escape(str(value), quote=True)


def cut(text: str, n: int = TEXT_CUT) -> str:
    text = text.replace("\r", " ").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def clock(t: float | None) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


# -- plots -------------------------------------------------------------------------------------------------------------
def plot(
    samples: list[dict[str, Any]],
    key: str,
    t0: float,
    t1: float,
    *,
    title: str,
    fmt: Callable[[float], str],
    ref: float | None = None,
    ref_label: str = "",
) -> str:
    """One series of `samples` against time as an inline SVG. A missing value, or a new start of the supervisor,
    breaks the line: a gap is shown as a gap. A lone point is drawn as a dot."""
    samples = thin(samples, key)
    values = [float(s[key]) for s in samples if s.get(key) is not None]
    if not values:
        return f'<p class="empty">no {e(title)} in the samples yet</p>'
    lo, hi = min(values), max(values)
    if ref is not None:
        lo, hi = min(lo, ref), max(hi, ref)
    pad = (hi - lo) * 0.08 or max(1.0, abs(hi) * 0.05)
    lo, hi = lo - pad, hi + pad
    span = max(t1 - t0, 1.0)

    def x(t: float) -> float:
        return LEFT + (t - t0) / span * (W - LEFT - RIGHT)

    def y(v: float) -> float:
        return TOP + (hi - v) / (hi - lo) * (H - TOP - BOTTOM)

    runs: list[list[tuple[float, float]]] = []
    last_start: object = object()
    for s in samples:
        v = s.get(key)
        if v is None or s.get("start_id") != last_start:
            runs.append([])
        last_start = s.get("start_id")
        if v is not None:
            runs[-1].append((x(float(s["at"])), y(float(v))))
    paths, dots = [], []
    for run in runs:
        if len(run) == 1:
            dots.append(f'<circle class="dot" cx="{run[0][0]:.1f}" cy="{run[0][1]:.1f}" r="2.5"/>')
        elif run:
            d = "M" + " L".join(f"{px:.1f},{py:.1f}" for px, py in run)
            paths.append(f'<path class="line" d="{d}"/>')
    parts = [
        f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{e(title)} over the last {e(_ago(span))}">',
        f"<title>{e(title)}</title>",
        f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}"/>',
    ]
    labels = {fmt(v): v for v in (hi - pad, (hi + lo) / 2, lo + pad)}  # the data's max, middle and min
    for text, v in labels.items():
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{e(text)}</text>')
    if ref is not None:
        parts.append(f'<line class="ref" x1="{LEFT}" x2="{W - RIGHT}" y1="{y(ref):.1f}" y2="{y(ref):.1f}"/>')
        parts.append(f'<text x="{W - RIGHT - 4}" y="{y(ref) - 4:.1f}" text-anchor="end">{e(ref_label)}</text>')
    parts.append(f'<text x="{LEFT}" y="{H - 6}">-{e(_ago(span))}</text>')
    parts.append(f'<text x="{W - RIGHT}" y="{H - 6}" text-anchor="end">now</text>')
    parts += paths + dots
    parts.append("</svg>")
    return "".join(parts)


def thin(samples: list[dict[str, Any]], key: str, most: int = MAX_POINTS) -> list[dict[str, Any]]:
    """At most about `most` points: runs of consecutive samples (of one start) averaged into one, so an hour at a
    short sample interval stays a small page. A bucket where nothing was measured stays a gap."""
    k = -(-len(samples) // most)
    if k <= 1:
        return samples
    out: list[dict[str, Any]] = []
    bucket: list[dict[str, Any]] = []

    def flush() -> None:
        vals = [float(b[key]) for b in bucket if b.get(key) is not None]
        at = sum(float(b["at"]) for b in bucket) / len(bucket)
        out.append({"at": at, "start_id": bucket[0].get("start_id"), key: sum(vals) / len(vals) if vals else None})
        bucket.clear()

    for smp in samples:
        if bucket and (len(bucket) == k or smp.get("start_id") != bucket[0].get("start_id")):
            flush()
        bucket.append(smp)
    if bucket:
        flush()
    return out


def _ago(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.0f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


# -- panels ------------------------------------------------------------------------------------------------------------
def _section(pid: str, title: str, body: str, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return f'<section id="panel-{pid}"{cls}><h2>{e(title)}</h2>{body}</section>'


def _dl(rows: Iterable[tuple[str, str]]) -> str:
    """A definition list; the values are HTML already escaped by the caller."""
    return "<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _model(s: Status) -> str:
    rows: list[tuple[str, str]] = []
    if s.model is not None:
        m = s.model
        rows += [
            ("name", f'<strong class="model-name">{e(m.name)}</strong>'),
            ("quantization", e(m.quantization)),
            ("parameters", e(f"{m.n_params / 1e6:.2f}M")),
            ("file", e(f"{mib(m.file_size)}, {m.path}")),
        ]
    else:
        rows.append(("file", f'<strong class="model-name">{e(s.model_file)}</strong> (not loaded)'))
    if s.engine is not None:
        g = s.engine
        rows.append(("engine", e(f"pid {g.pid}, context {g.n_ctx}, {g.n_threads} threads, cpu {g.cpu_backend}")))
    st = s.store
    active = e(st.active) + (" (trying it: gate running)" if st.trial else "")
    rows.append(("active model", active))
    if st.fallback:
        rows.append(("fallback", f'<span class="bad">{e(st.fallback)}</span>'))
    rows.append(("model store", e(f"{st.installed} installed in {st.directory}")))
    if st.last_change:
        rows.append(("last change", e(st.last_change)))
    return _section("model", "Model", _dl(rows))


def _state(s: Status) -> str:
    state = f'<strong class="state-name">{e(s.state)}</strong>' + (f" ({e(s.reason)})" if s.reason else "")
    mem = s.memory
    rows = [
        ("state", state),
        ("serving", '<span class="ok">yes</span>' if s.serving else '<span class="bad">no</span>'),
        ("uptime", e(duration(s.uptime_s))),
        ("self-test", e(s.self_test)),
        ("last answer", e(_last_answer(s))),
        (
            "memory",
            e(
                f"supervisor {mib(mem.supervisor_rss)}, engine {mib(mem.engine_rss)}; "
                f"available {mib(mem.available)} of {mib(mem.total)}"
            ),
        ),
        (
            "temperatures",
            e(", ".join(f"{n} {c:.1f} °C" for n, c in s.temperatures) if s.temperatures else "no thermal sensor"),
        ),
        ("voice", e(s.voice)),
        (
            "config",
            e(", ".join(s.config_sources))
            + (f' <span class="bad">FALLBACK: {e(s.config_fallback)}</span>' if s.config_fallback else ""),
        ),
        (
            "database",
            e(s.database)
            + (f" ({s.database_pending} rows waiting for disk space)" if s.database_pending else "")
            + (f' <span class="bad">degraded: {e(s.database_degraded)}</span>' if s.database_degraded else ""),
        ),
    ]
    return _section("state", "State", _dl(rows))


def _last_answer(s: Status) -> str:
    if s.last is None:
        return "none yet"
    a = s.last
    return f"{a.tokens_out} tokens, {a.decode_tok_s:.1f} tok/s, first token {a.ttft_s * 1000:.0f} ms"


def _history(s: Status, samples: list[dict[str, Any]], now: float) -> tuple[str, str]:
    if not samples:
        empty = '<p class="empty">no samples yet</p>'
        return _section("temperature", "Temperature, last hour", empty), _section(
            "speed", "Tokens per second, last hour", empty
        )
    t0 = min(float(samples[0]["at"]), now - 60)  # at least a minute wide: a fresh boot's few samples stay readable
    temps = [float(x["celsius"]) for x in samples if x["celsius"] is not None]
    shares = [float(x["share"]) for x in samples if x["share"] is not None]
    g = s.governor
    note = f"now {g.celsius:.1f} °C ({e(g.mode)}), setpoint {g.setpoint:g} °C" if g.celsius is not None else "no sensor"
    if temps:
        note += f"; last hour {min(temps):.1f} to {max(temps):.1f} °C"
    if shares:
        note += f"; CPU share now {g.share:.2f}, lowest {min(shares):.2f}"
    temp = plot(
        samples,
        "celsius",
        t0,
        now,
        title="temperature",
        fmt=lambda v: f"{v:.1f} °C",
        ref=g.setpoint if g.enabled and temps else None,
        ref_label=f"setpoint {g.setpoint:g} °C",
    )
    speeds = [float(x["tok_s"]) for x in samples if x["tok_s"] is not None]
    tokens = sum(int(x["tokens"] or 0) for x in samples)
    speed_note = f"{tokens} tokens generated in {len(samples)} samples"
    if speeds:
        speed_note += f"; decode speed {min(speeds):.0f} to {max(speeds):.0f} tok/s"
    speed = plot(samples, "tok_s", t0, now, title="decode speed", fmt=lambda v: f"{v:.0f} tok/s")
    return (
        _section("temperature", "Temperature, last hour", temp + f'<p class="note">{note}</p>'),
        _section("speed", "Tokens per second, last hour", speed + f'<p class="note">{e(speed_note)}</p>'),
    )


def _queue(s: Status, samples: list[dict[str, Any]]) -> str:
    rows = [(c, f'<span class="num">{s.queue.get(c, 0)}</span>') for c in CLASSES]
    body = _dl(rows)
    if samples:
        peak = max(int(x["queue"] or 0) for x in samples)
        body += f'<p class="note">most waiting at once in the last hour (sampled): {peak}</p>'
    return _section("queue", "Queue", body)


def _requests(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return _section("requests", "Last requests", '<p class="empty">no requests yet</p>', wide=True)
    head = (
        "<tr><th>#</th><th>at</th><th>from</th><th>class</th><th>outcome</th><th class=num>tokens</th>"
        "<th class=num>tok/s</th><th class=num>first token</th><th>prompt</th><th>answer</th></tr>"
    )
    body = []
    for r in reversed(rows):  # newest first
        outcome = r.get("outcome") or ""
        answer = r.get("answer") or r.get("error") or ""
        body.append(
            "<tr>"
            f"<td class=num>{e(r['id'])}</td><td>{e(clock(r.get('created_at')))}</td>"
            f"<td>{e(r.get('source') or '')}</td><td>{e(r.get('priority') or '')}</td>"
            f'<td class="{"ok" if outcome == "ok" else "bad"}">{e(outcome)}</td>'
            f"<td class=num>{e(r.get('tokens_out') or 0)}</td><td class=num>{(r.get('tok_s') or 0):.0f}</td>"
            f"<td class=num>{(r.get('ttft_ms') or 0):.0f} ms</td>"
            f'<td class="text prompt">{e(cut(r.get("prompt") or ""))}</td>'
            f'<td class="text answer">{e(cut(answer))}</td>'
            "</tr>"
        )
    return _section("requests", "Last requests", f"<table>{head}{''.join(body)}</table>", wide=True)


def _events(rows: list[dict[str, Any]], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{e(empty)}</p>'
    items = "".join(
        f"<tr><td>{e(clock(r.get('at')))}</td><td>{e(r.get('kind') or '')}</td>"
        f'<td class="text">{e(r.get("message") or "")}</td></tr>'
        for r in reversed(rows)
    )
    return f"<table><tr><th>at</th><th>kind</th><th>what</th></tr>{items}</table>"


def _restarts(s: Status, events: list[dict[str, Any]], starts: list[dict[str, Any]]) -> str:
    body = f'<p>engine restarts since this start: <strong class="num">{s.restarts}</strong></p>'
    body += _events(events, "no restarts or failures recorded")
    if starts:
        items = "".join(
            f"<tr><td class=num>{e(r['id'])}</td><td>{e(clock(r.get('started_at')))}</td>"
            f"<td>{e(clock(r.get('stopped_at')) if r.get('stopped_at') else 'running')}</td>"
            f"<td>{e(r.get('exit_reason') or '')}</td><td>{e(r.get('version') or '')}</td></tr>"
            for r in reversed(starts)
        )
        body += (
            "<h2>Supervisor starts</h2><table><tr><th>#</th><th>started</th><th>stopped</th><th>why</th>"
            f"<th>version</th></tr>{items}</table>"
        )
    return _section("restarts", "Restarts", body)


def _governor(s: Status, events: list[dict[str, Any]]) -> str:
    g = s.governor
    if not g.enabled:
        head = '<p class="note">the governor is disabled (governor.enabled: false)</p>'
    else:
        budget = mib(g.budget) if g.budget else "none"
        head = _dl(
            [
                ("mode", e(g.mode)),
                ("CPU share", e(f"{g.share:.2f}")),
                ("memory budget", e(budget)),
            ]
        )
    return _section("governor", "Governor", head + _events(events, "no governor decisions recorded"))


# -- the page ----------------------------------------------------------------------------------------------------------
def render(status: Status, store: Store, now: float, refresh_s: int = REFRESH_S) -> str:
    """The whole page, for `status` and what `store` recorded up to `now` (time.time())."""
    s = status
    samples = store.samples_since(now - HISTORY_S)
    temperature, speed = _history(s, samples, now)
    state_class = s.state if s.state in ("ready", "loading", "starting", "degraded", "failed") else "other"
    title = f"llmos-edge: {s.state}"
    panels = [
        _model(s),
        _state(s),
        temperature,
        speed,
        _queue(s, samples),
        _governor(s, store.recent_events(LAST_EVENTS, ("governor",))),
        _restarts(s, store.recent_events(LAST_EVENTS, RESTART_KINDS), store.recent_starts(LAST_STARTS)),
        _requests(store.recent_requests(LAST_REQUESTS)),
    ]
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # No script runs on this page, ever: text from prompts and models cannot become one.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        'img-src data:">'
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">'
        '<link rel="icon" href="data:,">'  # no /favicon.ico request (a 404 in the browser's console)
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>llmos-edge</h1><span class="state state-{state_class}">{e(s.state)}</span>'
        f"<span>{e(s.model_file)}</span><span>up {e(duration(s.uptime_s))}</span>"
        f'<span class="note">as of {e(clock(now))}, reloads every {int(refresh_s)} s</span></header>'
        f"<main>{''.join(panels)}</main></body></html>\n"
    )
