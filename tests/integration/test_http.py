"""The HTTP front-end with real clients: the official `openai` package, plain sockets for what a client library
hides, and prometheus_client's own parser for /metrics; against the real supervisor, engine and model."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Appliance, catch_worker_while_loading
from tests.integration.test_engine import SPEED_MODEL

TOKEN = "test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_config(port: int, extra: str = "", token: str = TOKEN) -> str:
    return f"http:\n  enabled: true\n  listen: 127.0.0.1:{port}\n  token: {token}\n{extra}"


def call(
    port: int, path: str, body: Any = None, token: str | None = TOKEN, raw: bytes | None = None, method: str = ""
) -> tuple[int, dict[str, str], bytes]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method or None)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def client(port: int, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0, timeout=120)


def rows(db: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as c:
        return c.execute(sql, args).fetchall()


@pytest.fixture
def served(appliance_factory: type[Appliance]) -> tuple[Appliance, int]:
    port = free_port()
    app = appliance_factory(config=http_config(port))
    app.wait_ready()
    return app, port


def test_the_openai_package_chats_streams_completes_and_lists_models(served: tuple[Appliance, int]) -> None:
    app, port = served
    c = client(port)
    assert [m.id for m in c.models.list()] == ["llmos-tiny"]

    reply = c.chat.completions.create(model="anything", messages=[{"role": "user", "content": "ping"}])
    assert reply.choices[0].message.content == "pong"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens > 0

    question = [{"role": "user", "content": "What is the capital of France?"}]
    whole = c.chat.completions.create(model="llmos-tiny", messages=question)  # type: ignore[arg-type]
    pieces, finish, usage = [], None, None
    stream = c.chat.completions.create(
        model="llmos-tiny",
        messages=question,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 1, "the answer arrived in one piece: not streamed"
    assert "".join(pieces) == whole.choices[0].message.content  # greedy: the same answer either way
    assert finish == "stop" and usage is not None and usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]

    done = c.completions.create(model="llmos-tiny", prompt="The capital of France is", max_tokens=5)
    n = done.usage.completion_tokens  # type: ignore[union-attr]
    # A raw prompt, no template: the model may say EOS early ("stop") or run to the limit ("length").
    assert (done.choices[0].finish_reason, n) in (("length", 5), *(("stop", k) for k in range(5))), done
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model="llmos-tiny", prompt="The capital of France is", max_tokens=5, stream=True)
        if ch.choices
    )
    assert streamed == done.choices[0].text

    # A stop sequence cuts the answer where it first appears, and ends the generation there.
    full = whole.choices[0].message.content or ""
    cut = full.split(" ")[1]
    stopped = c.chat.completions.create(model="llmos-tiny", messages=question, stop=[cut])  # type: ignore[arg-type]
    assert stopped.choices[0].message.content == full[: full.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"

    # Each request went through the scheduler and is in the database, as the HTTP front-end's.
    n = rows(app.db, "SELECT count(*) FROM requests WHERE source = 'http' AND outcome IN ('ok', 'cancelled')")[0][0]
    assert n >= 6


def test_tokens_errors_and_the_shape_of_every_refusal(served: tuple[Appliance, int]) -> None:
    _app, port = served
    with pytest.raises(openai.AuthenticationError):
        client(port, token="wrong").models.list()
    code, headers, body = call(port, "/v1/models", token=None)
    assert code == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert headers["WWW-Authenticate"] == "Bearer"
    assert call(port, "/health", token=None)[0] == 200  # health needs no token: probes have none
    code, _, body = call(port, "/metrics", token=None)
    assert code == 401

    bad = {
        b"{not json": "not valid JSON",
        json.dumps({"messages": "hi"}).encode(): "messages must be",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(): "role must be",
        json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": 9}).encode(): "temperature",
        json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 3}).encode(): "n must be 1",
        json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(): "max_tokens",
        json.dumps({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}).encode(): "tool",
        json.dumps([1, 2]).encode(): "JSON object",
    }
    for raw, says in bad.items():
        code, _, body = call(port, "/v1/chat/completions", raw=raw)
        err = json.loads(body)["error"]
        assert code == 400 and says in err["message"] and err["type"] == "invalid_request_error", (raw, body)
        assert set(err) == {"code", "message", "type"} and err["code"] == 400
    code, _, body = call(port, "/v1/completions", raw=b"x" * (2 << 20))
    assert code == 413
    assert call(port, "/v1/nothing")[0] == 404
    assert call(port, "/v1/chat/completions", method="GET")[0] == 405
    # The server is still there for everyone after all that.
    assert client(port).chat.completions.create(model="m", messages=[{"role": "user", "content": "ping"}])


def test_a_token_is_required_beyond_loopback(tmp_path: Path) -> None:
    cfg = tmp_path / "llmos.yaml"
    cfg.write_text("http:\n  enabled: true\n  listen: 0.0.0.0:8080\n")
    out = subprocess.run(
        [sys.executable, "-m", "llmos_edge.cli", "check-config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0 and "http.token must be set" in out.stderr, out.stderr


def test_health_and_the_api_say_503_while_the_model_loads(appliance_factory: type[Appliance]) -> None:
    port = free_port()
    app = appliance_factory(config=http_config(port))
    pid = catch_worker_while_loading(app, signal.SIGSTOP)  # the worker stays "loading"
    deadline = time.monotonic() + 30
    while True:
        try:
            code, headers, body = call(port, "/health", token=None)
            break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "the HTTP server never answered while the model loaded"
            time.sleep(0.1)
    assert code == 503 and int(headers["Retry-After"]) > 0
    assert json.loads(body)["status"] in ("starting", "loading")
    code, headers, body = call(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "ping"}]})
    assert code == 503 and int(headers["Retry-After"]) > 0
    assert json.loads(body)["error"]["type"] == "unavailable_error"
    assert call(port, "/metrics")[0] == 200  # the device's figures are there while the model loads
    os.kill(pid, signal.SIGCONT)
    app.wait_ready()
    assert call(port, "/health", token=None)[0] == 200


@pytest.fixture
def slow(appliance_factory: type[Appliance]) -> tuple[Appliance, int]:
    """The 50M speed model: answers long enough to fill a queue and to be walked away from."""
    if not SPEED_MODEL.exists():
        pytest.fail(f"{SPEED_MODEL} is missing; `make speed-model` builds it")
    port = free_port()
    app = appliance_factory(
        config=http_config(port),
        override="model:\n  max_tokens: 400\nscheduler:\n  queue_size: 1\n",
        model=SPEED_MODEL,
    )
    app.wait_ready(120)
    return app, port


def queued(app: Appliance) -> int:
    """Requests waiting, as /status shows them."""
    return sum(int(n) for n in re.findall(r"\d+", app.console.status().get("queue", "")))


def test_a_full_queue_is_503_with_retry_after_and_a_client_that_leaves_cancels(slow: tuple[Appliance, int]) -> None:
    app, port = slow
    body = {"model": "m", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 400, "stream": True}
    # One streaming request runs; read its first chunks, then hang up.
    s = socket.create_connection(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    got = b""
    while got.count(b"data: ") < 4:
        got += s.recv(4096)
    assert b"200 OK" in got.split(b"\r\n")[0]
    # While it runs, one more waits (queue_size 1) and the next is refused at once.
    waiting: list[tuple[int, dict[str, str], bytes]] = []
    t = threading.Thread(
        target=lambda: waiting.append(call(port, "/v1/chat/completions", {**body, "stream": False, "max_tokens": 16}))
    )
    t.start()
    deadline = time.monotonic() + 20
    while queued(app) < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.1)
    code, headers, refused = call(port, "/v1/chat/completions", body)
    assert code == 503, refused
    assert int(headers["Retry-After"]) >= 1
    assert "queue is full" in json.loads(refused)["error"]["message"]
    # The streaming client walks away: its request is cancelled, long before its 400 tokens.
    s.close()
    t.join(120)
    assert waiting and waiting[0][0] == 200, waiting
    outcomes = rows(app.db, "SELECT outcome, tokens_out FROM requests WHERE source = 'http' ORDER BY id")
    assert [o for o, _ in outcomes] == ["refused", "cancelled", "ok"], outcomes  # in the order they finished
    assert 0 < outcomes[1][1] < 400, outcomes


def test_metrics_parse_and_count_what_happened(served: tuple[Appliance, int]) -> None:
    _app, port = served
    c = client(port)
    for _ in range(3):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "ping"}])
    code, headers, body = call(port, "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = [s for f in families.values() for s in f.samples]

    def value(name: str, **labels: str) -> float:
        found = [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert found, f"no {name} {labels} in /metrics"
        return sum(s.value for s in found)

    assert value("llmos_requests_total", source="http", outcome="ok") == 3
    assert value("llmos_generated_tokens_total", source="http") > 0
    assert value("llmos_time_to_first_token_seconds_count", priority="interactive") >= 3
    assert value("llmos_ready") == 1
    assert {s.labels["class"] for s in families["llmos_queue_depth"].samples} == {"interactive", "background"}
    for name in ("llmos_cpu_share", "llmos_memory_bytes", "llmos_engine_restarts", "llmos_temperature_celsius"):
        assert name in families, name  # (a family's name: counters' without _total)
    assert value("llmos_memory_bytes", process="engine") > 10 * 2**20


def test_schemathesis_finds_no_server_error_and_no_answer_off_the_openapi_document(
    appliance_factory: type[Appliance], tmp_path: Path
) -> None:
    """schemathesis generates valid and invalid requests from the served OpenAPI document and checks every answer
    against it: status codes, content types, bodies, auth enforced; no 5xx (a 503 would need a full queue or a
    loading model, which a sequential run against a ready device never has)."""
    port = free_port()
    app = appliance_factory(config=http_config(port), override="model:\n  max_tokens: 16\n")
    app.wait_ready()
    out = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"http://127.0.0.1:{port}/openapi.json",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--checks",
            "all",
            "--max-examples",
            "30",
            "--generation-deterministic",
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path / "schemathesis"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"},
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "No issues found" in out.stdout or " passed" in out.stdout, out.stdout[-3000:]


def readme_example(name: str) -> str:
    """The code block under `<!-- example: NAME -->` in README.md."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    m = re.search(rf"<!-- example: {name} -->\n```\w*\n(.*?)```", text, re.S)
    assert m, f"README.md has no example {name}"
    return m.group(1)


def test_the_readme_examples_work_as_written(appliance_factory: type[Appliance]) -> None:
    """README's curl and Python examples, run as they are against the loopback API of examples/dev.yaml (only the
    port changes, to a free one)."""
    port = free_port()
    app = appliance_factory(config=f"http:\n  enabled: true\n  listen: 127.0.0.1:{port}\n")
    app.wait_ready()
    curl = readme_example("http-curl").replace("8080", str(port))
    out = subprocess.run(["sh", "-c", curl], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout)["choices"][0]["message"]["content"] == "pong"
    script = readme_example("http-python").replace("8080", str(port))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "I am llmos-tiny, a small llama model running offline.", out.stdout


def test_a_chat_goes_through_the_models_template_and_a_completion_does_not(
    appliance_factory: type[Appliance],
) -> None:
    """Every turn of a chat reaches a real chat template (llama.cpp's Llama-3 vocabulary and template, random
    weights); a template that refuses a turn, and a prompt longer than the context, are the client's 400s."""
    archs = Path(os.environ.get("LLMOS_ARCH_MODELS", Path.home() / ".cache/llmos-edge/models/archs"))
    model = archs / "llama3.gguf"
    if not model.exists():
        pytest.fail(f"{model} is missing; `make arch-models` builds it")
    port = free_port()
    app = appliance_factory(config=http_config(port), model=model, override="model:\n  max_tokens: 4\n")
    app.wait_ready(120)
    c = client(port)
    one = [{"role": "user", "content": "hello there"}]
    turns = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        *one,
    ]
    alone = c.chat.completions.create(model="m", messages=one).usage  # type: ignore[arg-type]
    whole = c.chat.completions.create(model="m", messages=turns).usage  # type: ignore[arg-type]
    raw = c.completions.create(model="m", prompt="hello there").usage
    assert alone and whole and raw
    # The template wraps each turn in header tokens: the whole chat is longer than its last message by far more
    # than the words it adds, and the raw completion is the two words and BOS, with no template at all.
    assert whole.prompt_tokens >= alone.prompt_tokens + 12, (whole, alone)
    assert raw.prompt_tokens <= 4 < alone.prompt_tokens, (raw, alone)
    code, _, body = call(port, "/v1/completions", {"prompt": "word " * 5000})
    assert code == 400 and "context holds" in json.loads(body)["error"]["message"], body


def test_a_template_that_refuses_a_turn_is_the_clients_400(appliance_factory: type[Appliance]) -> None:
    archs = Path(os.environ.get("LLMOS_ARCH_MODELS", Path.home() / ".cache/llmos-edge/models/archs"))
    model = archs / "gemma2.gguf"  # Gemma's template raises on a system message
    if not model.exists():
        pytest.fail(f"{model} is missing; `make arch-models` builds it")
    port = free_port()
    app = appliance_factory(config=http_config(port), model=model, override="model:\n  max_tokens: 4\n")
    app.wait_ready(120)
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    code, _, answer = call(port, "/v1/chat/completions", body)
    err = json.loads(answer)["error"]
    assert code == 400 and "chat template refused" in err["message"], answer
    assert call(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})[0] == 200


def test_an_empty_answer_is_an_answer(served: tuple[Appliance, int]) -> None:
    """A model that says EOS first gives an empty completion, 200, not an error (schemathesis found the 500)."""
    _app, port = served
    empty = 0
    for prompt in ("0", "llmos>", "\n", "reverse"):
        code, _, body = call(port, "/v1/completions", {"prompt": prompt, "max_tokens": 8})
        assert code == 200, (prompt, body)
        empty += json.loads(body)["usage"]["completion_tokens"] == 0
        code, _, body = call(port, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "stream": True})
        assert code == 200 and body.rstrip().endswith(b"data: [DONE]"), (prompt, body)
    assert empty, "no prompt made the model say EOS first: the case is not exercised"
