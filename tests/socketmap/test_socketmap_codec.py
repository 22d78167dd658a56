"""Byte-level tests of the socketmap codec: netstrings fed in every chunk size, framing errors
named by their exception, and the size limits of socketmap_table(5)."""

from __future__ import annotations

import pytest

from tlsgate.socketmap import (
    MAX_QUERY,
    MAX_REPLY,
    BadLength,
    BadRequest,
    BadTerminator,
    NetstringDecoder,
    NetstringError,
    Reply,
    Request,
    Status,
    TooLong,
    encode,
    encode_request,
    parse_reply,
    parse_request,
)

CHUNKS = (None, 4096, 128, 16, 1)  # None: the whole stream at once


def feed_in_chunks(data: bytes, size: int | None, limit: int = MAX_QUERY) -> list[bytes]:
    decoder = NetstringDecoder(limit)
    if size is None:
        out = decoder.feed(data)
    else:
        out = []
        for start in range(0, len(data), size):
            out += decoder.feed(data[start : start + size])
    assert not decoder.pending
    return out


VALID = [
    (b"0:,", [b""]),
    (b"5:hello,", [b"hello"]),
    (b"12:hello world!,", [b"hello world!"]),
    (b"3:a,b,1:c,", [b"a,b", b"c"]),
    (b"10:tls_policy,", [b"tls_policy"]),
    (encode_request("tls_policy", "example.com") * 3, [b"tls_policy example.com"] * 3),
    (b"4:\x00:,\xff,", [b"\x00:,\xff"]),
]


@pytest.mark.parametrize("size", CHUNKS)
@pytest.mark.parametrize(("stream", "payloads"), VALID)
def test_valid_streams_in_every_chunk_size(stream: bytes, payloads: list[bytes], size: int | None) -> None:
    assert feed_in_chunks(stream, size) == payloads


@pytest.mark.parametrize("size", CHUNKS)
def test_largest_query_is_accepted_in_every_chunk_size(size: int | None) -> None:
    payload = b"tls_policy " + b"a" * (MAX_QUERY - 11)
    assert len(payload) == MAX_QUERY
    assert feed_in_chunks(encode(payload, MAX_QUERY), size) == [payload]


MALFORMED = [
    (b"5:hello;", BadTerminator),
    (b"5:helloX5:hello,", BadTerminator),
    (b"3:abcd,", BadTerminator),
    (b"x:abc,", BadLength),
    (b"-1:,", BadLength),
    (b" 5:hello,", BadLength),
    (b"05:hello,", BadLength),
    (b":hello,", BadLength),
    (b"5 :hello,", BadLength),
    (b"GET / HTTP/1.0\r\n\r\n", BadLength),
    (b"10001:" + b"a" * 10001 + b",", TooLong),
    (b"99999999999999999999:", TooLong),
    (b"123456", TooLong),  # six digits and no colon: longer than any allowed length
]


@pytest.mark.parametrize("size", CHUNKS)
@pytest.mark.parametrize(("stream", "error"), MALFORMED)
def test_malformed_streams_raise_a_named_error(stream: bytes, error: type[NetstringError], size: int | None) -> None:
    with pytest.raises(error):
        feed_in_chunks(stream, size)


def test_partial_netstring_is_pending() -> None:
    decoder = NetstringDecoder()
    assert decoder.feed(b"12:tls_pol") == []
    assert decoder.pending
    assert decoder.feed(b"icy x,2:") == [b"tls_policy x"]
    assert decoder.pending
    assert decoder.feed(b"ab,") == [b"ab"]
    assert not decoder.pending


def test_oversized_query_is_refused_before_its_payload_arrives() -> None:
    decoder = NetstringDecoder()
    with pytest.raises(TooLong):
        decoder.feed(b"10001:")


def test_encode_refuses_replies_above_postfix_limit() -> None:
    assert encode(b"a" * MAX_REPLY).startswith(b"100000:")
    with pytest.raises(TooLong):
        encode(b"a" * (MAX_REPLY + 1))
    with pytest.raises(TooLong):
        Reply(Status.OK, "a" * MAX_REPLY).encode()  # the status and its space count too


REQUESTS = [
    (b"tls_policy example.com", Request("tls_policy", "example.com")),
    (b"transport user@example.com", Request("transport", "user@example.com")),
    (b"tls_policy [relay.example.com]:2525", Request("tls_policy", "[relay.example.com]:2525")),
    (b"transport a b@example.com", Request("transport", "a b@example.com")),
    (b"tls_policy b\xc3\xbccher.example", Request("tls_policy", "b\u00fccher.example")),
    (b"tls_policy \xff.example", Request("tls_policy", "\ufffd.example")),
]


@pytest.mark.parametrize(("payload", "request_"), REQUESTS)
def test_parse_request(payload: bytes, request_: Request) -> None:
    assert parse_request(payload) == request_


@pytest.mark.parametrize("payload", [b"", b"tls_policy", b"tls_policy ", b" example.com", b"tls/policy x", b"\xfftls x"])
def test_bad_requests(payload: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request(payload)


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (Reply(Status.OK, "secure match=.example.com"), b"28:OK secure match=.example.com,"),
        (Reply(Status.NOTFOUND), b"9:NOTFOUND ,"),
        (Reply(Status.TEMP, "not loaded"), b"15:TEMP not loaded,"),
        (Reply(Status.PERM, "unknown map"), b"16:PERM unknown map,"),
    ],
)
def test_reply_wire_format(reply: Reply, wire: bytes) -> None:
    assert reply.encode() == wire
    assert parse_reply(feed_in_chunks(wire, None, MAX_REPLY)[0]) == reply
