"""bench/http_load.py's judges: what it calls a garbled stream, its HTTP framing, and its histogram quantiles."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.http_load import Garbled, Response, check_stream, histogram_bucket, histogram_quantile


def sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


def chunk(content: str | None, finish: str | None = None, rid: str = "chatcmpl-1") -> str:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return json.dumps({"id": rid, "object": "chat.completion.chunk", "choices": [choice]}, ensure_ascii=False)


USAGE = json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": {
    "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})  # fmt: skip


def test_a_whole_stream_is_ok_with_its_token_count() -> None:
    body = sse(chunk(""), chunk("po"), chunk("ng"), chunk(None, "stop"), USAGE, "[DONE]")
    assert check_stream(body, "pong") == ("ok", "", 2)


@pytest.mark.parametrize(
    ("body", "outcome", "why"),
    [
        (sse(chunk("po"), chunk(None, "stop")), "garbled", "data: [DONE]"),  # cut short
        (sse(chunk("po"), "{not json", "[DONE]"), "garbled", "not JSON"),
        (b"data: " + chunk("p\xe9").encode("latin-1") + b"\n\ndata: [DONE]\n\n", "garbled", "UTF-8"),
        (sse(chunk("pong") + "\ndata: x", "[DONE]"), "garbled", "one data line"),
        (sse(chunk("po"), chunk("ng", "stop", rid="chatcmpl-2"), "[DONE]"), "garbled", "2 ids"),
        (sse(chunk("pong"), "[DONE]"), "garbled", "finish_reason"),
        (sse(chunk("png", "stop"), "[DONE]"), "mismatch", "'png'"),  # a piece lost
        (sse(json.dumps({"error": {"code": 500}}), "[DONE]"), "error-in-stream", "500"),
    ],
)
def test_what_counts_as_a_bad_stream(body: bytes, outcome: str, why: str) -> None:
    got, detail, _ = check_stream(body, "pong")
    assert got == outcome and why in detail


def read(raw: bytes) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        r = await Response.read(reader)
        return r.status, await r.body()

    return asyncio.run(go())


def test_chunked_bodies_are_decoded_and_broken_framing_is_caught() -> None:
    ok = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"
    assert read(ok) == (200, b"hello!")
    assert read(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\nRetry-After: 2\r\n\r\nbusy") == (503, b"busy")
    with pytest.raises(Garbled, match="CRLF"):
        read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n")
    with pytest.raises(Garbled, match="chunk size"):
        read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    with pytest.raises(asyncio.IncompleteReadError):  # the connection dropped mid-stream: a lost stream
        read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")


def test_histogram_quantiles_interpolate_as_prometheus_does() -> None:
    buckets = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (float("inf"), 40.0)]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.3)  # 20 of 40: halfway through (0.1, 0.5]
    assert histogram_bucket(0.5, buckets) == "(0.1, 0.5] s"
    assert histogram_bucket(0.99, buckets) == "(0.5, 1] s"
