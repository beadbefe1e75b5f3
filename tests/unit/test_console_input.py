from llmos_edge.console import LineReader


def lines(events: list[tuple[str, object]]) -> list[tuple[str, object]]:
    return [e for e in events if e[0] != "echo"]


def test_cr_lf_and_crlf_each_end_one_line() -> None:
    r = LineReader(64)
    assert lines(r.feed(b"a\rb\nc\r\nd\r\n")) == [("line", "a"), ("line", "b"), ("line", "c"), ("line", "d")]


def test_backspace_removes_a_whole_utf8_character() -> None:
    r = LineReader(64)
    assert lines(r.feed("héé\x7f\x08llo\r".encode())) == [("line", "hllo")]


def test_ctrl_c_interrupts_and_clears_the_line() -> None:
    r = LineReader(64)
    assert lines(r.feed(b"abc\x03def\r")) == [("interrupt", ""), ("line", "def")]


def test_arrow_keys_are_swallowed() -> None:
    r = LineReader(64)
    assert lines(r.feed(b"ab\x1b[A\x1b[Dc\r")) == [("line", "abc")]


def test_over_long_lines_are_dropped_with_a_reason() -> None:
    r = LineReader(8)
    assert lines(r.feed(b"0123456789abc\rok\r")) == [("drop", "line longer than 8 bytes; dropped"), ("line", "ok")]


def test_invalid_utf8_and_control_bytes_drop_the_line() -> None:
    r = LineReader(64)
    out = lines(r.feed(b"\xff\xfeabc\rx\x00y\x01\rgood\r"))
    assert out[0] == ("drop", "line is not valid UTF-8; dropped (type plain text)")
    assert out[1] == ("drop", "line held 2 control byte(s); dropped")
    assert out[2] == ("line", "good")


def test_echo_returns_printable_input_only() -> None:
    r = LineReader(64)
    echoed = b"".join(v for k, v in r.feed(b"hi\x00!\r") if k == "echo")  # type: ignore[misc]
    assert echoed == b"hi!"


def test_random_garbage_never_raises_and_a_clean_line_still_parses() -> None:
    import random

    rng = random.Random(7)
    r = LineReader(512)
    for _ in range(200):
        r.feed(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
    r.feed(b"\r")
    assert lines(r.feed(b"ping\r")) == [("line", "ping")]
