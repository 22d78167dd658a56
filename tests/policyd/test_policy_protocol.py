"""The policy protocol codec, byte by byte: framing, limits, attribute mapping and answers."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tlsgate_policyd.protocol import (
    Limits,
    LineTooLong,
    MalformedLine,
    RequestReader,
    RequestTooLarge,
    TooManyAttributes,
    answer,
    encode,
    facts_from_request,
    unknown_rules_answer,
    xtext_decode,
)

from tlsgate.engine import decide
from tlsgate.model import Decision, FailAction, InboundConnector, Mode, Stage
from tlsgate.patterns import DomainPattern
from tlsgate.snapshot import Snapshot

TWO_REQUESTS = (b"request=smtpd_access_policy\nsender=a@x.test\nrecipient=b@y.test\n\n"
                b"request=smtpd_access_policy\r\nsender=c@x.test\r\n\r\n")


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [len(TWO_REQUESTS), 4096, 16, 1])
def test_requests_at_every_read_size(size: int) -> None:
    reader = RequestReader()
    got = [req for chunk in chunks(TWO_REQUESTS, size) for req in reader.feed(chunk)]
    assert got == [
        {"request": "smtpd_access_policy", "sender": "a@x.test", "recipient": "b@y.test"},
        {"request": "smtpd_access_policy", "sender": "c@x.test"},
    ]
    assert not reader.pending


def test_pending_until_the_empty_line() -> None:
    reader = RequestReader()
    assert list(reader.feed(b"request=smtpd_access_policy\nsend")) == []
    assert reader.pending
    assert list(reader.feed(b"er=\n\n")) == [{"request": "smtpd_access_policy", "sender": ""}]


def test_value_may_contain_equals_and_bad_utf8() -> None:
    reader = RequestReader()
    [req] = list(reader.feed(b"ccert_subject=a=b\nsender=\xff@x.test\n\n"))
    assert req["ccert_subject"] == "a=b"
    assert req["sender"] == "\ufffd@x.test"


@pytest.mark.parametrize(("data", "error"), [
    (b"no equals sign\n", MalformedLine),
    (b"=value\n", MalformedLine),
    (b"a=" + b"x" * 200 + b"\n", LineTooLong),
    (b"a=" + b"x" * 200, LineTooLong),  # no terminator at all
    (b"".join(b"a%d=1\n" % i for i in range(20)), TooManyAttributes),
    (b"".join(b"a=%s\n" % (b"x" * 90) for _ in range(20)), RequestTooLarge),
])
def test_framing_errors(data: bytes, error: type[Exception]) -> None:
    reader = RequestReader(Limits(max_line=128, max_attributes=10, max_request=1000))
    with pytest.raises(error):
        for size in (len(data),):
            for chunk in chunks(data, size):
                list(reader.feed(chunk))


@pytest.mark.parametrize(("data", "error"), [
    (b"a=1\nno equals sign\n\n", MalformedLine),
    (b"a=1\n=value\n\n", MalformedLine),
    (b"a=1\nb=" + b"x" * 200 + b"\n\n", LineTooLong),
    (b"".join(b"a%d=1\n" % i for i in range(20)) + b"\n", TooManyAttributes),
    (b"".join(b"a=%s\n" % (b"x" * 90) for _ in range(20)) + b"\n", RequestTooLarge),
])
def test_framing_errors_in_a_whole_request(data: bytes, error: type[Exception]) -> None:
    reader = RequestReader(Limits(max_line=128, max_attributes=10, max_request=1000))
    with pytest.raises(error):
        list(reader.feed(data))


def _parse(data: bytes, size: int) -> tuple[list[dict[str, str]], bool]:
    reader = RequestReader(Limits(max_line=64, max_attributes=6, max_request=300))
    got: list[dict[str, str]] = []
    try:
        for chunk in chunks(data, size):
            got.extend(reader.feed(chunk))
    except (MalformedLine, LineTooLong, TooManyAttributes, RequestTooLarge):
        return got, True
    return got, False


_LINE = st.one_of(
    st.builds(lambda n, v: b"a%d=%s" % (n, v), st.integers(0, 9), st.binary(max_size=40)),
    st.builds(lambda n, v: b"%s=%s" % (n, v), st.binary(min_size=1, max_size=4), st.binary(max_size=8)),
    st.sampled_from([b"", b"\r", b"a1=1\r", b"b=", b"=x", b"noequals", b"c=" + b"x" * 50, b"d=" + b"x" * 70]),
)
_REQUESTS = st.lists(st.lists(_LINE, max_size=12), max_size=4)


@settings(max_examples=500, deadline=None)
@given(_REQUESTS, st.binary(max_size=20))
# An empty request ended by CR, then one too large: the empty one is answered first either way.
@example([[b"\r", *[b"a0=" + b"x" * 60] * 5]], b"")
def test_whole_requests_and_byte_by_byte_agree(requests: list[list[bytes]], tail: bytes) -> None:
    """A request read in one piece gives what the same bytes give one at a time, limits included."""
    data = b"".join(b"\n".join(lines) + b"\n\n" for lines in requests) + tail
    assert _parse(data, max(len(data), 1)) == _parse(data, 1)


def test_xtext() -> None:
    assert xtext_decode("Lab+20Test+20CA") == "Lab Test CA"
    assert xtext_decode("a+2Bb") == "a+b"
    assert xtext_decode("plain") == "plain"
    # Each byte of a UTF-8 name is encoded on its own; bytes that are not UTF-8 never match a name.
    assert xtext_decode("F+C5+91tan+C3+BAs+C3+ADtv+C3+A1ny+20CA") == "Főtanúsítvány CA"
    assert xtext_decode("a+FFb") == "a\ufffdb"


def test_facts_from_a_postfix_request() -> None:
    facts = facts_from_request({
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "client_address": "127.0.0.2",
        "client_name": "unknown", "sender": "a@partner.test", "recipient": "b@tlsgate.test",
        "encryption_protocol": "TLSv1.3", "encryption_cipher": "TLS_AES_256_GCM_SHA384",
        "encryption_keysize": "256", "ccert_subject": "mail.partner.test", "ccert_issuer": "Lab+20Test+20CA",
        "ccert_fingerprint": "aa:bb", "ccert_pubkey_fingerprint": "", "queue_id": "", "tls_sni": "mx",
        "compatibility_level": "3.6",
    })
    assert facts.client_address == ipaddress.ip_address("127.0.0.2")
    assert (facts.sender, facts.recipient) == ("a@partner.test", "b@tlsgate.test")
    assert (facts.tls_protocol, facts.tls_cipher, facts.tls_cipher_bits) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
    assert (facts.cert_subject, facts.cert_issuer) == ("mail.partner.test", "Lab Test CA")
    assert (facts.cert_fingerprint, facts.pubkey_fingerprint) == ("AA:BB", None)
    assert facts.queue_id is None and facts.stage is Stage.RCPT


def test_empty_and_missing_are_alike() -> None:
    plain = facts_from_request({"sender": "", "encryption_protocol": "", "encryption_keysize": "0",
                                "ccert_subject": ""})
    missing = facts_from_request({"sender": ""})
    assert plain == missing
    assert plain.sender == "" and plain.tls_protocol is None and plain.cert_subject is None
    assert facts_from_request({"encryption_keysize": "lots"}).tls_cipher_bits == 0
    assert facts_from_request({"encryption_keysize": "²"}).tls_cipher_bits == 0
    assert facts_from_request({"protocol_state": "END-OF-MESSAGE"}).stage is Stage.DATA


NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _decision(**kw: Any) -> Decision:
    c = InboundConnector(name="c", sender_domains=(DomainPattern.parse("x.test"),), **kw)
    return decide(Snapshot(inbound=(c,)), facts_from_request({"sender": "a@x.test", "client_address": "192.0.2.1"}), NOW)


def test_answers() -> None:
    assert answer(_decision(on_failure=FailAction.REJECT)) == "REJECT 5.7.10 TLS required by connector c"
    assert answer(_decision()) == "DEFER 4.7.10 TLS required by connector c"
    assert answer(_decision(reply_text="use TLS\r\nplease")) == "DEFER 4.7.10 use TLS  please"
    assert answer(_decision(require_tls=False)) == "DUNNO"
    monitored = _decision(mode=Mode.MONITOR)
    assert answer(monitored) == "DUNNO"
    assert answer(monitored, monitor_header="X-TLSgate-Monitor") == (
        "PREPEND X-TLSgate-Monitor: defer connector=c reason=TLS required by connector c")
    assert unknown_rules_answer("defer", "try later") == "DEFER 4.3.5 try later"
    assert encode("DUNNO") == b"action=DUNNO\n\n"
