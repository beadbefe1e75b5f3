"""Teaching and conversation memory (issue 15, points 1 and 3) through the real supervisor, engine, model and SQLite:
the console, `llmos teach`/`llmos forget` over the control socket, machine mode on the serial line, and HTTP."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from llmos_edge.control import call as control_call
from llmos_edge.errors import UserError
from tests.integration.conftest import Appliance
from tests.integration.test_http import call, http_config
from tests.integration.test_machine_mode import Program, cable, tokens  # noqa: F401  (cable: a fixture)

MODEL_ANSWER = "I am llmos-tiny, a small llama model running offline."
TAUGHT = "I am the kitchen assistant."


def rows(db: Path, where: str = "1") -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM requests WHERE {where} ORDER BY id")]
    finally:
        conn.close()


def test_a_taught_answer_reaches_the_variants_survives_a_restart_and_is_forgotten(
    appliance_factory: type[Appliance],
) -> None:
    app = appliance_factory()
    app.wait_ready()
    app.console.read_until(b"llmos> ", 10)
    c = app.console
    assert c.ask("what model is this") == MODEL_ANSWER
    out = c.command(f"/teach what model is this => {TAUGHT}")
    assert out == f"taught #1: 'what model is this' => {TAUGHT!r}", out
    for variant in ("what model is this", "Hey llmos, WHAT MODEL IS THIS?", "please what model is this, thanks"):
        assert c.ask(variant) == TAUGHT, variant
    assert c.ask("which model is this") == MODEL_ANSWER  # other words: not the taught question
    # The self-test asks "ping": a taught "ping" must not reach it (the restart below would not become READY).
    assert c.command("/teach ping => a taught pong").startswith("taught #2")
    assert c.ask("Ping!") == "a taught pong"
    assert c.status()["learning"].startswith("2 taught pairs (/taught); "), c.status()
    taught = rows(app.db, "taught_id IS NOT NULL")
    assert [r["prompt"] for r in taught][:3] == [
        "what model is this",
        "Hey llmos, WHAT MODEL IS THIS?",
        "please what model is this, thanks",
    ]
    assert {r["taught_id"] for r in taught} == {1, 2} and all(r["source"] == "console" for r in taught)
    assert {r["outcome"] for r in taught} == {"ok"} and {r["answer"] for r in taught} == {TAUGHT, "a taught pong"}
    # Conversation memory with the default model: it takes one question (no chat template), so nothing is recalled
    # into its prompt, and no turn is stored (it would only wear the flash).
    which = rows(app.db, "prompt = 'which model is this'")[-1]
    assert which["recalled"] is None, which
    conn = sqlite3.connect(f"file:{app.db}?mode=ro", uri=True)
    assert conn.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 0
    conn.close()

    for bad, says in (
        ("/teach what model is this", "error: teach needs a question and an answer separated by =>"),
        ("/teach => " + TAUGHT, "error: the question to teach is empty"),
        ("/teach what model is this =>", "error: the answer to teach is empty"),
        ("/teach " + "q" * 201 + " => a", "error: the question is 201 characters; at most 200 can be taught"),
        ("/forget", "error: forget needs the taught question"),
        ("/memory wipe", "error: unknown memory command 'wipe'"),
    ):
        out = c.command(bad)
        assert out.startswith(says) and "(hint: " in out and "\n" not in out, out
    app.stop()

    again = appliance_factory(db=app.db)
    again.wait_ready()  # the self-test still heard "pong" from the model
    again.console.read_until(b"llmos> ", 10)
    c = again.console
    assert c.ask("WHAT MODEL IS THIS??") == TAUGHT
    listed = c.command("/taught")
    assert listed.splitlines() == [
        "#2 'ping' => 'a taught pong' (taught on console)",
        f"#1 'what model is this' => {TAUGHT!r} (taught on console)",
    ], listed
    assert c.command("/taught kitchen").splitlines() == [f"#1 'what model is this' => {TAUGHT!r} (taught on console)"]
    assert c.command("/forget What model is this?") == f"forgot #1: 'what model is this' => {TAUGHT!r}"
    assert c.ask("what model is this") == MODEL_ANSWER
    out = c.command("/forget what model is this")
    assert out.startswith("error: nothing is taught for 'what model is this' (hint: "), out
    memory = c.command("/memory")
    assert memory.startswith("memory: no turns; the running model takes one question (no chat template)"), memory
    out = c.command("/memory forget")
    assert out == "forgot 0 turns of console", out


def test_llmos_teach_and_forget_over_the_control_socket(appliance: Appliance) -> None:
    app = appliance
    out = app.llmos("teach", "reverse lantern => a taught lantern")
    assert out.stdout.strip() == "taught #1: 'reverse lantern' => 'a taught lantern'", out
    assert app.console.ask("Reverse lantern.") == "a taught lantern"
    assert app.llmos("submit", "reverse LANTERN").stdout.strip() == "a taught lantern"
    listed = app.llmos("teach", "--list").stdout.strip()
    assert listed == "#1 'reverse lantern' => 'a taught lantern' (taught on submit)", listed
    bad = app.llmos("teach", "reverse lantern", check=False)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines()[0] == "llmos: error: teach needs a question and an answer separated by =>"
    assert bad.stderr.splitlines()[1].startswith("llmos: hint: ")
    with pytest.raises(UserError, match="answer to teach is empty"):
        list(control_call(str(app.socket), {"op": "teach", "id": 7, "question": "x", "answer": " "}, timeout=10))
    with pytest.raises(UserError, match="forget needs either a question or memory"):
        list(control_call(str(app.socket), {"op": "forget", "id": 8}, timeout=10))
    assert (
        app.llmos("forget", "reverse", "lantern").stdout.strip() == "forgot #1: 'reverse lantern' => 'a taught lantern'"
    )
    assert app.console.ask("reverse lantern") == "nretnal"
    out = app.llmos("forget", "--memory", "console").stdout.strip()
    assert out.startswith("forgot ") and out.endswith(" turns of console"), out
    bad = app.llmos("forget", "--memory", "radio", check=False)
    assert bad.returncode == 2 and "there is no conversation source 'radio'" in bad.stderr


def test_a_program_teaches_and_forgets_in_machine_mode_on_the_serial_line(
    cable: tuple[Appliance, Program],  # noqa: F811
) -> None:
    _app, program = cable
    program.enter_json_mode()
    program.send({"op": "teach", "id": "t", "question": "Who made you?", "answer": "The workshop."})
    event = program.event()
    assert event == {
        "event": "taught",
        "id": "t",
        "pair": 1,
        "question": "Who made you?",
        "answer": "The workshop.",
        "source": "console",
        "replaced": False,
    }, event
    program.send({"op": "submit", "id": 1, "prompt": "who made you"})
    events = program.until(lambda e: e["event"] == "done")
    assert tokens(events, 1) == "The workshop." and events[-1]["outcome"] == "ok"
    program.send({"op": "teach", "id": "bad", "question": "who made you"})
    event = program.event()
    assert event["event"] == "error" and event["id"] == "bad" and "answer to teach is empty" in event["message"]
    program.send({"op": "taught", "id": "l"})
    assert [p["question"] for p in program.event()["pairs"]] == ["Who made you?"]
    program.send({"op": "forget", "id": "f", "question": "WHO MADE YOU"})
    assert program.event()["event"] == "forgotten"
    program.send({"op": "forget", "id": "m", "memory": True})
    event = program.event()
    # the default model stores no turns (see above): the forget is answered, with nothing to delete
    assert event["event"] == "forgotten" and event["memory"] == "console" and event["turns"] == 0, event


def test_http_teaches_every_front_end_and_forgets(appliance_factory: type[Appliance]) -> None:
    from tests.integration.test_http import free_port

    port = free_port()
    app = appliance_factory(config=http_config(port))
    app.wait_ready()
    app.console.read_until(b"llmos> ", 10)
    code, _, body = call(port, "/v1/teach", {"question": "What is the WiFi password?", "answer": "On the sticker."})
    taught = json.loads(body)
    assert code == 200 and taught["object"] == "taught_pair" and taught["replaced"] is False, body
    chat = {"messages": [{"role": "user", "content": "what is the wifi password"}]}
    code, _, body = call(port, "/v1/chat/completions", chat)
    assert code == 200 and json.loads(body)["choices"][0]["message"]["content"] == "On the sticker.", body
    assert app.console.ask("hey llmos, what is the wifi password please?") == "On the sticker."
    code, _, body = call(port, "/v1/completions", {"prompt": "what is the wifi password", "max_tokens": 8})
    assert code == 200 and json.loads(body)["choices"][0]["text"] != "On the sticker."  # raw text: never taught
    code, _, body = call(port, "/v1/teach")
    assert code == 200 and [p["question"] for p in json.loads(body)["data"]] == ["What is the WiFi password?"]
    for bad, status, says in (
        ({"question": "x"}, 400, "answer must be a string"),
        ({"question": "!!", "answer": "a"}, 400, "question needs a letter or digit"),
        ({"question": "q", "answer": "a", "extra": 1}, 400, "unknown field 'extra'"),
        ({"question": "q", "memory": True}, 400, "give either question"),
        ({"question": "who is there"}, 404, "nothing is taught"),
    ):
        path = "/v1/forget" if "memory" in bad or (bad.keys() == {"question"} and status == 404) else "/v1/teach"
        code, _, body = call(port, path, bad)
        assert code == status and says in json.loads(body)["error"]["message"], (bad, body)
    code, _, body = call(port, "/v1/forget", {"question": "what is the WIFI password"})
    assert code == 200 and json.loads(body)["object"] == "forgotten_pair", body
    code, _, body = call(port, "/v1/forget", {"memory": True})
    forgotten = json.loads(body)
    assert code == 200 and forgotten == {"object": "forgotten_memory", "source": "http", "turns": 0}, body
    assert app.console.command("/memory").startswith("memory: no turns;")


def test_a_follow_up_gets_its_relevant_earlier_turns_within_the_context(appliance_factory: type[Appliance]) -> None:
    """A chat-template model (random weights; its answers mean nothing, its prompt sizes do): the follow-up's prompt
    holds the relevant earlier turn, not the unrelated one, and is back to the bare question once memory is
    forgotten."""
    archs = Path(os.environ.get("LLMOS_ARCH_MODELS", Path.home() / ".cache/llmos-edge/models/archs"))
    model = archs / "llama3.gguf"
    if not model.exists():
        pytest.fail(f"{model} is missing; `make arch-models` builds it")
    app = appliance_factory(model=model, override="model:\n  max_tokens: 4\n")
    app.wait_ready(120)
    for q in ("my dog is called Rex", "the weather is sunny today", "what is my dog called"):
        app.llmos("submit", "--priority", "interactive", q)
    follow_up = rows(app.db, "prompt = 'what is my dog called'")[-1]
    first = rows(app.db, "prompt = 'my dog is called Rex'")[-1]
    assert follow_up["recalled"] and first["recalled"] is None
    conn = sqlite3.connect(f"file:{app.db}?mode=ro", uri=True)
    recalled = [
        conn.execute("SELECT question FROM turns WHERE id = ?", [int(i)]).fetchone()[0]
        for i in follow_up["recalled"].split(",")
    ]
    conn.close()
    assert recalled == ["my dog is called Rex"], recalled
    assert "turns of submit" in app.llmos("forget", "--memory", "submit").stdout
    app.llmos("submit", "--priority", "interactive", "what is my dog called")
    alone = rows(app.db, "prompt = 'what is my dog called'")[-1]
    assert alone["recalled"] is None
    # The earlier turn's question and answer, with the template's markers around them, were in the prompt.
    assert follow_up["tokens_in"] >= alone["tokens_in"] + 5 + 4, (follow_up, alone)
