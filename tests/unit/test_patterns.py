"""Domain, certificate-name, issuer and address patterns: parsing, normalising, matching."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsgate.patterns import (
    CertNamePattern,
    DomainKind,
    DomainPattern,
    IssuerPattern,
    PatternError,
    address_domain,
    parse_address,
    parse_network,
)


@pytest.mark.parametrize(("text", "kind", "domain"), [
    ("example.com", DomainKind.EXACT, "example.com"),
    (" Example.COM. ", DomainKind.EXACT, "example.com"),
    ("*.example.com", DomainKind.SUBDOMAINS, "example.com"),
    ("*", DomainKind.ANY, ""),
    ("bücher.example", DomainKind.EXACT, "xn--bcher-kva.example"),
    ("*.bücher.example", DomainKind.SUBDOMAINS, "xn--bcher-kva.example"),
    ("☃.net", DomainKind.EXACT, "xn--n3h.net"),  # UTS 46 (and Postfix's ICU) admit what IDNA 2008 forbids
])
def test_domain_pattern_parse(text: str, kind: DomainKind, domain: str) -> None:
    p = DomainPattern.parse(text)
    assert (p.kind, p.domain) == (kind, domain)


@pytest.mark.parametrize("text", ["", "faß☃.de", "exa mple.com", "a..b", "*example.com", "ex*ample.com", "mail.*.com",
                                  "user@example.com", "-a.example", "a" * 64 + ".com", "example.123", "**",
                                  "mail\n.example.com", "example.com\n.evil"])
def test_domain_pattern_rejects(text: str) -> None:
    with pytest.raises(PatternError):
        DomainPattern.parse(text)


def test_domain_pattern_specificity_orders_exact_wildcard_star() -> None:
    exact = DomainPattern.parse("a.b.example.com").specificity
    long_wild = DomainPattern.parse("*.b.example.com").specificity
    short_wild = DomainPattern.parse("*.com").specificity
    star = DomainPattern.parse("*").specificity
    assert exact > long_wild > short_wild > star


@pytest.mark.parametrize(("addr", "domain"), [
    ("a@Example.COM", "example.com"),
    ("<a@example.com>", "example.com"),
    ("a@b@example.com", "example.com"),
    ("a@[192.0.2.1]", None),
    ("postmaster", None),
    ("", None),
    ("a@xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("a@bücher.example", "xn--bcher-kva.example"),
    ("a@☃.net", "xn--n3h.net"),
    ("a@under_score.test", None),
])
def test_address_domain(addr: str, domain: str | None) -> None:
    assert address_domain(addr) == domain


@pytest.mark.parametrize(("pattern", "name", "ok"), [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.example.com.", True),
    ("mail.example.com", "other.example.com", False),
    ("*.example.com", "mail.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.mail.example.com", False),
    ("*.example.com", "*.example.com", True),
    ("mail.example.com", "*.example.com", False),
])
def test_cert_name_rfc6125(pattern: str, name: str, ok: bool) -> None:
    assert CertNamePattern.parse(pattern).matches(name) is ok


@pytest.mark.parametrize("text", ["*.com", "m*.example.com", "mail.*.com", "*"])
def test_cert_name_rejects_bad_wildcards(text: str) -> None:
    with pytest.raises(PatternError):
        CertNamePattern.parse(text)


def test_issuer_pattern() -> None:
    p = IssuerPattern.parse("DigiCert  SHA2 *")
    assert p.matches("digicert sha2 secure server ca")
    assert not p.matches("Let's Encrypt R3")
    with pytest.raises(PatternError):
        IssuerPattern.parse("CA[1]")


@pytest.mark.parametrize(("text", "net"), [
    ("192.0.2.0/24", "192.0.2.0/24"),
    ("192.0.2.7", "192.0.2.7/32"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
])
def test_parse_network(text: str, net: str) -> None:
    assert parse_network(text) == ipaddress.ip_network(net)


_octet = st.one_of(st.integers(0, 300).map(str), st.sampled_from(["00", "01", "010", "0x1", "", " 1", "١"]))
_prefix = st.one_of(st.just(""), st.integers(0, 40).map(lambda n: f"/{n}"),
                    st.sampled_from(["/", "/024", "/+8", "/ 8", "/8 ", "/²", "/255.255.255.0", "/0.0.0.255"]))


@given(st.lists(_octet, min_size=3, max_size=5), _prefix)
def test_parse_network_agrees_with_ipaddress_on_ipv4(octets: list[str], prefix: str) -> None:
    """The IPv4 fast path accepts exactly what ipaddress accepts, with the same network."""
    text = ".".join(octets) + prefix
    try:
        expected = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError:
        with pytest.raises(PatternError):
            parse_network(text)
    else:
        assert parse_network(text) == expected


@pytest.mark.parametrize("text", ["192.0.2.1/24", "192.0.2.0/33", "300.1.1.1", "a:mail.example.com", ""])
def test_parse_network_rejects(text: str) -> None:
    with pytest.raises(PatternError):
        parse_network(text)


@pytest.mark.parametrize(("text", "addr"), [
    ("192.0.2.1", "192.0.2.1"),
    ("IPv6:2001:db8::1", "2001:db8::1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("[192.0.2.1]", "192.0.2.1"),
    ("unknown", None),
])
def test_parse_address(text: str, addr: str | None) -> None:
    got = parse_address(text)
    assert (str(got) if got else None) == addr
