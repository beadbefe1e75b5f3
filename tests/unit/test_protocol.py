"""The JSON-lines envelope (docs/protocol.md): every request line parses to one command or one ProtocolError with a
sentence and a hint; events render as one line of valid JSON."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llmos_edge import protocol
from llmos_edge.engine import GenerationStats
from llmos_edge.protocol import (
    Cancel,
    Exit,
    Forget,
    ModelCommand,
    ProtocolError,
    StatusQuery,
    Submit,
    Taught,
    Teach,
    parse,
)
from llmos_edge.scheduler import Request, Result
from tests.voice_fixtures import status_snapshot


def test_a_full_submit_parses_to_its_fields() -> None:
    cmd = parse('{"op":"submit","id":"q1","prompt":"ping","priority":"background","max_tokens":8,"temperature":0.7}')
    assert cmd == Submit("q1", "ping", "background", 8, 0.7)


def test_a_minimal_submit_leaves_the_defaults_to_the_transport() -> None:
    assert parse(b'{"op": "submit", "id": 7, "prompt": "ping"}') == Submit(7, "ping", None, None, None)


def test_the_other_ops_parse() -> None:
    assert parse('{"op":"cancel","id":7}') == Cancel(7)
    assert parse('{"op":"status"}') == StatusQuery(None)
    assert parse('{"op":"status","id":"s"}') == StatusQuery("s")
    assert parse('{"op":"model","args":"list"}') == ModelCommand("list", None)
    assert parse('{"op":"exit"}') == Exit()


def test_the_learning_ops_parse() -> None:
    assert parse('{"op":"teach","id":1,"question":" Who? ","answer":"me"}') == Teach("Who?", "me", 1)
    assert parse('{"op":"forget","question":"who"}') == Forget("who", None, None)
    assert parse('{"op":"forget","id":"m","memory":true}') == Forget("", "", "m")
    assert parse('{"op":"forget","memory":"voice"}') == Forget("", "voice", None)
    assert parse('{"op":"taught"}') == Taught("", None)
    assert parse('{"op":"taught","search":"wifi"}') == Taught("wifi", None)


def test_an_integer_temperature_is_a_float() -> None:
    cmd = parse('{"op":"submit","id":1,"prompt":"x","temperature":1}')
    assert isinstance(cmd, Submit) and cmd.temperature == 1.0 and isinstance(cmd.temperature, float)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"\xff\xfe", "the line is not valid UTF-8"),
        ("not json", "the line is not valid JSON"),
        ("{" * 5000, "the line is not valid JSON"),
        ("[" * 100000, "the line is not valid JSON"),  # deeper than the parser's recursion limit
        ("[1, 2]", "the line is not a JSON object"),
        ('"op"', "the line is not a JSON object"),
        ("{}", "the object has no op"),
        ('{"op":"frobnicate"}', "unknown op 'frobnicate'"),
        ('{"op":5}', "unknown op 5"),
        ('{"op":"submit","prompt":"x"}', "submit needs an id"),
        ('{"op":"cancel"}', "cancel needs an id"),
        ('{"op":"cancel","id":true}', "id must be a string or an integer"),
        ('{"op":"cancel","id":1.5}', "id must be a string or an integer"),
        ('{"op":"cancel","id":[1]}', "id must be a string or an integer"),
        ('{"op":"cancel","id":-1}', "an integer id must be from 0 to 2^53-1"),
        ('{"op":"cancel","id":9007199254740992}', "an integer id must be from 0 to 2^53-1"),
        ('{"op":"cancel","id":""}', "a string id must be 1 to 64 printable characters"),
        ('{"op":"cancel","id":"' + "x" * 65 + '"}', "a string id must be 1 to 64 printable characters"),
        ('{"op":"cancel","id":"a\\nb"}', "a string id must be 1 to 64 printable characters"),
        ('{"op":"submit","id":1}', "submit needs a non-empty prompt"),
        ('{"op":"submit","id":1,"prompt":"   "}', "submit needs a non-empty prompt"),
        ('{"op":"submit","id":1,"prompt":5}', "submit needs a non-empty prompt"),
        ('{"op":"submit","id":1,"prompt":"x","priority":"urgent"}', "priority must be one of interactive, background"),
        ('{"op":"submit","id":1,"prompt":"x","max_tokens":0}', "max_tokens must be an integer from 1 to 65536"),
        ('{"op":"submit","id":1,"prompt":"x","max_tokens":65537}', "max_tokens must be an integer from 1 to 65536"),
        ('{"op":"submit","id":1,"prompt":"x","max_tokens":"many"}', "max_tokens must be an integer from 1 to 65536"),
        ('{"op":"submit","id":1,"prompt":"x","max_tokens":true}', "max_tokens must be an integer from 1 to 65536"),
        ('{"op":"submit","id":1,"prompt":"x","temperature":-0.1}', "temperature must be a number from 0 to 2"),
        ('{"op":"submit","id":1,"prompt":"x","temperature":"hot"}', "temperature must be a number from 0 to 2"),
        ('{"op":"submit","id":1,"prompt":"x","temperature":NaN}', "temperature must be a number from 0 to 2"),
        ('{"op":"submit","id":1,"prompt":"x","temperature":Infinity}', "temperature must be a number from 0 to 2"),
        ('{"op":"submit","id":1,"prompt":"x","max_token":5}', "submit does not take max_token"),
        ('{"op":"status","wait":true}', "status does not take wait"),
        ('{"op":"exit","id":1}', "exit does not take id"),
        ('{"op":"model","args":5}', "model needs args as a string"),
        ('{"op":"teach","question":"who"}', "the answer to teach is empty"),
        ('{"op":"teach","question":"?!","answer":"a"}', "the question to teach is empty (it needs a word or a number)"),
        ('{"op":"teach","question":"q","answer":5}', "teach needs answer as a string"),
        ('{"op":"teach","question":"q","answer":"a","source":"x"}', "teach does not take source"),
        ('{"op":"forget"}', "forget needs either a question or memory"),
        ('{"op":"forget","question":"q","memory":true}', "forget needs either a question or memory"),
        (
            '{"op":"forget","memory":false}',
            "forget needs memory as true or a source (console, submit, http, voice, all)",
        ),
        ('{"op":"taught","search":1}', "taught needs search as a string"),
    ],
)
def test_a_malformed_line_is_one_error_with_a_hint(line: str | bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as e:
        parse(line)
    assert e.value.message == message
    assert e.value.hint


def test_an_error_names_the_request_when_its_id_could_be_read() -> None:
    with pytest.raises(ProtocolError) as e:
        parse('{"op":"submit","id":"q9","prompt":""}')
    assert e.value.id == "q9"
    assert protocol.from_error(e.value)["id"] == "q9"
    with pytest.raises(ProtocolError) as e:
        parse('{"op":"launch","id":3}')
    assert e.value.id == 3


def test_random_json_never_raises_anything_but_a_protocol_error() -> None:
    rng = random.Random(13)
    keys = ["op", "id", "prompt", "priority", "max_tokens", "temperature", "args", "question", "answer", "memory", "x"]
    ops = ["submit", "cancel", "status", "exit", "teach", "forget", "taught"]
    values: list[object] = [None, 0, -1, 2**70, 1.5, True, "", *ops, [], {}, "a" * 99, "a" * 1001]
    for _ in range(2000):
        msg = {rng.choice(keys): rng.choice(values) for _ in range(rng.randrange(0, 6))}
        try:
            parse(json.dumps(msg))
        except ProtocolError as e:
            assert e.message and "\n" not in e.message


def test_events_are_one_line_of_json_with_control_characters_escaped() -> None:
    req = Request(prompt="x")
    line = protocol.encode(protocol.token("q1", "a\nb\x1b[2Jé"))
    assert "\n" not in line and "\x1b" not in line and "é" in line
    assert json.loads(line) == {"event": "token", "id": "q1", "text": "a\nb\x1b[2Jé"}
    stats = GenerationStats(tokens_in=3, tokens_out=5, ttft_s=0.0123, decode_tok_s=41.666)
    d = json.loads(protocol.encode(protocol.done("q1", req, Result("ok", text="hello", stats=stats))))
    assert d == {
        "event": "done",
        "id": "q1",
        "request": req.id,
        "outcome": "ok",
        "tokens_in": 3,
        "tokens_out": 5,
        "tok_s": 41.67,
        "ttft_ms": 12.3,
        "queue_wait_ms": 0.0,
        "preemptions": 0,
    }
    refused = json.loads(protocol.encode(protocol.done(2, req, Result("refused", error="busy: the queue is full"))))
    assert refused["outcome"] == "refused" and refused["error"] == "busy: the queue is full"


def test_the_status_event_carries_the_snapshot_and_its_lines_and_no_nan() -> None:
    s = status_snapshot(temperatures=(("cpu-thermal", float("nan")), ("soc", 48.5)))
    event = json.loads(protocol.encode(protocol.status(s, "s1")))
    assert event["event"] == "status" and event["id"] == "s1"
    assert event["status"]["state"] == s.state and event["status"]["temperatures"] == [
        ["cpu-thermal", None],
        ["soc", 48.5],
    ]
    assert event["status"]["memory"]["total"] == s.memory.total
    assert event["lines"][0].startswith("state: ")


def test_the_example_in_the_docs_is_the_example_program() -> None:
    """docs/protocol.md shows examples/serial_client.py whole; the integration tests run that file."""
    repo = Path(__file__).resolve().parents[2]
    assert (repo / "examples" / "serial_client.py").read_text() in (repo / "docs" / "protocol.md").read_text()
