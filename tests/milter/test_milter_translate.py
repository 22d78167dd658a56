"""The milter's pure translations: macros to TLS facts, connect addresses, From header
authors, reply texts, and Postfix-style socket names to libmilter's."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from tlsgate_milter.milter import libmilter_address
from tlsgate_milter.translate import (
    MAX_ENVELOPE,
    MAX_REPLY,
    AddressTooLong,
    TlsFacts,
    client_address,
    client_name,
    common_name,
    envelope_address,
    header_from_authors,
    is_postfix,
    plainly_spelt,
    reply_text,
    tls_from_macros,
)

from tlsgate.patterns import address_domain


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("unix:/run/tlsgate/milter.sock", "unix:/run/tlsgate/milter.sock"),
        ("inet:127.0.0.1:8891", "inet:8891@127.0.0.1"),
        ("inet:localhost:8891", "inet:8891@localhost"),
        ("inet:[::1]:8891", "inet6:8891@::1"),
    ],
)
def test_libmilter_address(listen: str, expected: str) -> None:
    assert libmilter_address(listen) == expected


@pytest.mark.parametrize("listen", ["inet:127.0.0.1", "inet::25", "inet:host:0", "tcp:1.2.3.4:25", "inet:h:99999"])
def test_libmilter_address_rejects(listen: str) -> None:
    with pytest.raises(ValueError):
        libmilter_address(listen)


def _getter(values: dict[str, str]):  # type: ignore[no-untyped-def]
    return values.get


POSTFIX = "Postfix 3.7.11"


@pytest.mark.parametrize(
    ("macros", "expected"),
    [
        ({}, TlsFacts()),
        ({"{cipher}": "X"}, TlsFacts()),  # no version: no TLS
        ({"{tls_version}": "TLSv1.3", "{cipher}": "TLS_AES_128_GCM_SHA256", "{cipher_bits}": "128"},
         TlsFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256", 128)),
        ({"{tls_version}": "TLSv1.2", "{cipher_bits}": "lots"}, TlsFacts("TLSv1.2", None, 0)),
        ({"{tls_version}": "TLSv1.2", "{cipher_bits}": "²"}, TlsFacts("TLSv1.2", None, 0)),
        # Postfix's CN as the certificate spells it, never a DN to pick a CN from.
        ({"{tls_version}": "TLSv1.3", "{cert_subject}": "evil.test/CN=mx.a.test", "{cert_issuer}": "CA, CN=B"},
         TlsFacts("TLSv1.3", None, 0, "evil.test/CN=mx.a.test", "CA, CN=B")),
        ({"{tls_version}": "TLSv1.3", "{cert_subject}": "mx.a.test", "{cert_issuer}": "CA"},
         TlsFacts("TLSv1.3", None, 0, "mx.a.test", "CA")),
        # Postfix names the issuer of a verified certificate only (smtpd_milter.c, IF_TRUSTED):
        # alone, it is a verified certificate without a subject CN.
        ({"{tls_version}": "TLSv1.3", "{cert_subject}": "", "{cert_issuer}": "CA"},
         TlsFacts("TLSv1.3", None, 0, None, "CA")),
        ({"{tls_version}": "TLSv1.3", "{cert_subject}": "mx\r\n.a.test"}, TlsFacts("TLSv1.3", None, 0, "mx.a.test")),
    ],
)
def test_tls_from_macros(macros: dict[str, str], expected: TlsFacts) -> None:
    assert tls_from_macros(_getter(macros), POSTFIX) == expected


SENDMAIL_CERT = {"{tls_version}": "TLSv1.3", "{cert_subject}": "/O=A/CN=mx.a.test", "{cert_issuer}": "/CN=CA"}


@pytest.mark.parametrize(
    ("mta", "verify", "trusted"),
    [
        (POSTFIX, None, True),  # Postfix sends the names for a verified chain only
        ("Postfix 2.11.3", None, True),
        (None, None, False),  # Sendmail sends no v by default, and the names for any certificate
        ("8.17.1", None, False),  # Sendmail's own v, without {verify}
        ("8.17.1", "OK", True),
        (None, "OK", True),
        (None, "ok", True),
        (None, "FAIL", False),
        (None, "NO", False),
        (POSTFIX, "FAIL", False),  # a {verify} that says no wins over the MTA's name
        ("Postfixed 1.0", None, False),
        ("", None, False),
    ],
)
def test_certificate_names_count_only_when_the_mta_vouches_for_them(
    mta: str | None, verify: str | None, trusted: bool
) -> None:
    macros = dict(SENDMAIL_CERT) if verify is None else {**SENDMAIL_CERT, "{verify}": verify}
    if not trusted:
        expected = TlsFacts("TLSv1.3")
    elif is_postfix(mta):  # Postfix sends the CN alone: a value that looks like a DN is that CN
        expected = TlsFacts("TLSv1.3", None, 0, "/O=A/CN=mx.a.test", "/CN=CA")
    else:
        expected = TlsFacts("TLSv1.3", None, 0, "mx.a.test", "CA")
    assert tls_from_macros(_getter(macros), mta) == expected


def test_tls_facts_never_go_back_to_plaintext() -> None:
    tls = TlsFacts("TLSv1.3", "C", 256)
    assert tls.merged(TlsFacts()) is tls
    assert TlsFacts().merged(tls) is tls


@pytest.mark.parametrize(
    ("dn", "cn"),
    [("mx.a.test", "mx.a.test"), ("/C=US/O=A/CN=mx.a.test", "mx.a.test"),
     ("CN=mx.a.test, O=A", "mx.a.test"), ("/O=A\\/B/CN=x.test", "x.test")],
)
def test_common_name(dn: str, cn: str) -> None:
    assert common_name(dn) == cn


def test_client_address_per_family() -> None:
    assert client_address(socket.AF_INET, ("192.0.2.1", 4711)) == ipaddress.ip_address("192.0.2.1")
    assert client_address(socket.AF_INET6, ("2001:db8::1", 25, 0, 0)) == ipaddress.ip_address("2001:db8::1")
    assert client_address(socket.AF_INET6, ("::ffff:192.0.2.9", 25, 0, 0)) == ipaddress.ip_address("192.0.2.9")
    assert client_address(socket.AF_INET, "192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert client_address(socket.AF_UNIX, "/var/run/x") is None
    assert client_address(0, None) is None
    assert client_address(socket.AF_INET, ("garbage", 1)) is None


def test_client_name_and_envelope() -> None:
    assert client_name("[192.0.2.1]") is None
    assert client_name("mail.a.test") == "mail.a.test"
    assert envelope_address("<a@b.test>") == "a@b.test"
    assert envelope_address("<>") == ""


@pytest.mark.parametrize(("sent", "kept"), [
    ('<"a@contoso.test">', "a@contoso.test"),  # judged quoted, it would have no domain
    ('<"john doe"@contoso.test>', "john doe@contoso.test"),
    ('<"a\\"b"@contoso.test>', 'a"b@contoso.test'),
    ('<"unterminated@contoso.test>', '"unterminated@contoso.test'),
])
def test_a_quoted_local_part_is_kept_as_postfix_keeps_it(sent: str, kept: str) -> None:
    assert envelope_address(sent) == kept


@pytest.mark.parametrize(("sent", "plain"), [
    ("<a@contoso.test>", True),
    ("<>", True),
    ('<"john doe"@contoso.test>', True),  # blanks inside a quoted local part are the address
    ('<"a\\"b"@contoso.test>', True),
    ("< a@contoso.test >", True),  # blanks just inside the brackets: Postfix trims them too
    ("<@hop.test,@hop2.test:a@contoso.test>", True),  # a source route is judged by the engine
    ("<a@contoso.test(x)>", False),
    ("<a@(x)contoso.test>", False),
    ("<a@contoso .test>", False),
    ("<a@contoso\t.test>", True),  # control characters are dropped: a@contoso.test, as Postfix reads it
    ('<a@"contoso.test">', False),
    ("<a@contoso\\.test>", False),
    ("<a\\@b@contoso.test>", False),
    ('<"unterminated@contoso.test>', False),
    ('<"a"@"contoso.test">', False),
    ('<"a""b"@contoso.test>', False),
])
def test_spellings_only_an_mta_reads_are_told_apart(sent: str, plain: bool) -> None:
    # Postfix reads the second kind with its RFC 822 tokenizer (a@contoso.test); as written,
    # its domain is no domain name, which would meet * connectors alone.
    assert plainly_spelt(sent) is plain


def test_a_long_envelope_address_is_kept_whole_never_cut() -> None:
    # Cut at 1024 characters, this address lost its domain and with it its sender connector.
    long = "a" * 1030 + "@contoso.test"
    assert envelope_address(f"<{long}>") == long
    limit = "a" * (MAX_ENVELOPE - len("@contoso.test")) + "@contoso.test"
    assert envelope_address(f"<{limit}>") == limit
    with pytest.raises(AddressTooLong) as raised:
        envelope_address(f"<a{limit}>")
    assert raised.value.length == MAX_ENVELOPE + 1


@pytest.mark.parametrize(
    ("values", "authors"),
    [
        ([], ()),
        (["Alice <a@a.test>"], ("a@a.test",)),
        (["a@a.test, Bob <b@b.test>"], ("a@a.test", "b@b.test")),
        (["a@a.test", "b@b.test", "a@a.test"], ("a@a.test", "b@b.test")),
        (["undisclosed-recipients:;"], ()),
        (["Alice <a@a.test"], ("a@a.test",)),  # getaddresses copes
        (["Bank <@b.test>"], ("unparsed@b.test",)),  # nothing parsed: raw @domain judged
        (['"ceo@bank.test" <evil@evil.test>'], ("evil@evil.test",)),  # display names are not authors
        (["=?utf-8?q?Al=C3=AFce?= <a@a.test>"], ("a@a.test",)),
        (["ceo@partner.test.."], ("unparsed@partner.test",)),
        # an underscore makes no host name, but the author is still under its parent domain
        (["CEO <ceo@x_y.bank.test>"], ("ceo@x_y.bank.test",)),
        (["CEO <ceo@x_y.bank.test"], ("ceo@x_y.bank.test",)),
        (["Bank <@x_y.bank.test>"], ("unparsed@x_y.bank.test",)),
        # a clean field yields exactly its mailboxes, whatever its display names say
        (['a@a.test, "x@c.test" <b@b.test>, Carl <c@c.test>'], ("a@a.test", "b@b.test", "c@c.test")),
        # an address literal is an author too: it meets * connectors, as in the envelope
        (["x@[192.0.2.1]"], ("x@[192.0.2.1]",)),
    ],
)
def test_header_from_authors(values: list[str], authors: tuple[str, ...]) -> None:
    assert header_from_authors(values) == authors


@pytest.mark.parametrize(
    "field",
    [
        "a@evil.test, ceo@partner.test..",
        "a@evil.test, ceo@partner.test\udcff",  # a non-UTF-8 byte, as pymilter decodes it
        "a@evil.test ceo@partner.test",
    ],
)
def test_a_field_not_clean_in_full_has_every_raw_domain_judged(field: str) -> None:
    # A good mailbox next to a malformed one must not hide the protected author: which of
    # them getaddresses understands varies, the domains judged do not.
    authors = header_from_authors([field])
    assert {address_domain(a) for a in authors} == {"evil.test", "partner.test"}
    assert len(authors) == 2


@pytest.mark.parametrize("field", [
    'ceo@"bank.test"',
    "ceo@bank\\.test",
    "ceo@(x)bank.test",
    "ceo@ bank . test",
    '"ceo"@"bank".test',
    "=?utf-8?b?Y2VvQGJhbmsudGVzdA==?=",  # an encoded word that decodes to ceo@bank.test
    "=?utf-8?q?ceo=40bank=2Etest?= <>",
    "ceo@[bank.test]",  # brackets round a name: no address literal
    "ceo" + " " * 8000 + "@bank.test" + " " * 8000 + ",",  # long runs of blanks
])
def test_a_domain_hidden_by_quotes_escapes_or_encoding_is_still_judged(field: str) -> None:
    # Some mail readers show each of these as ceo@bank.test: it must meet bank.test's
    # header-From connector, not slip past it by having no readable domain.
    assert "bank.test" in {address_domain(a) for a in header_from_authors([field])}, header_from_authors([field])


def test_reply_text_is_one_bounded_line_with_percent_doubled() -> None:
    assert reply_text("50% off\r\nnext", "x") == "50%% off  next"
    assert reply_text(None, "fallback") == "fallback"
    assert len(reply_text("a" * 5000, "x")) == MAX_REPLY
