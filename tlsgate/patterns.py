"""Parsing and matching of the patterns connector rows are made of.

Domain patterns scope a connector to envelope or header domains (``example.com``,
``*.example.com``, ``*``); certificate name patterns follow RFC 6125 (a wildcard only as the
whole leftmost label); issuer patterns are case-insensitive names with ``*`` globs; address
entries are IPv4 or IPv6 networks. Every parser raises :class:`PatternError` with a message
fit to show an administrator, and every value is normalised so that two spellings of one
pattern compare equal.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import ipaddress
import re
import socket
from dataclasses import dataclass

import idna

_LABEL_RE = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_LABEL = re.compile(_LABEL_RE)
_HOST_NAME = re.compile(rf"(?:{_LABEL_RE}\.)*{_LABEL_RE}")
_MAX_DOMAIN = 253


class PatternError(ValueError):
    """A value in a rule row that is not a valid pattern of its kind."""


_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")  # UTS 46's deviation characters


def to_a_label(domain: str) -> str:
    """Return ``domain`` lowercased, in A-label (ASCII) form, without a trailing dot.

    Raises PatternError for anything that is not a valid host name.
    """
    name = domain.strip()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise PatternError("empty domain")
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            # UTS 46 also admits names that IDNA 2008 forbids (symbols: "☃.net"), and so do
            # Postfix's ICU and the resolvers that deliver such mail; IDNA 2003 (Python's own
            # codec) spells them as they do, except the four characters it maps where UTS 46
            # keeps them (ß, ς, ZWJ, ZWNJ): a name with one of those is refused, not misspelt.
            if _DEVIATIONS.intersection(name):
                raise PatternError(f"invalid internationalized domain {domain!r}: {exc}") from None
            try:
                name = name.encode("idna").decode("ascii")
            except UnicodeError:
                raise PatternError(f"invalid internationalized domain {domain!r}: {exc}") from None
    name = name.lower()
    if len(name) > _MAX_DOMAIN:
        raise PatternError(f"domain {domain!r} is longer than {_MAX_DOMAIN} characters")
    if not _HOST_NAME.fullmatch(name):
        label = next(label for label in name.split(".") if not _LABEL.fullmatch(label))
        raise PatternError(f"invalid domain {domain!r}: bad label {label!r}")
    if name.rpartition(".")[2].isdigit():
        raise PatternError(f"invalid domain {domain!r}: the top-level label is numeric")
    return name


class DomainKind(enum.IntEnum):
    """How a domain pattern matches; the value orders specificity (higher is more specific)."""

    ANY = 0
    SUBDOMAINS = 1
    EXACT = 2


@dataclass(frozen=True, slots=True)
class DomainPattern:
    """``example.com`` (exact), ``*.example.com`` (any subdomain) or ``*`` (every domain)."""

    kind: DomainKind
    domain: str  # A-label form; empty for ANY

    @classmethod
    def parse(cls, text: str) -> DomainPattern:
        raw = text.strip()
        if raw == "*":
            return cls(DomainKind.ANY, "")
        if raw.startswith("*."):
            return cls(DomainKind.SUBDOMAINS, to_a_label(raw[2:]))
        if "*" in raw:
            raise PatternError(
                f"invalid domain pattern {text!r}: '*' may only stand alone or as '*.' at the start"
            )
        if "@" in raw:
            raise PatternError(f"invalid domain pattern {text!r}: a domain, not an address")
        return cls(DomainKind.EXACT, to_a_label(raw))

    @property
    def specificity(self) -> tuple[int, int]:
        """Exact beats wildcard; among wildcards, more labels beat fewer."""
        labels = self.domain.count(".") + 1 if self.domain else 0
        return (int(self.kind), labels)

    def matches(self, domain: str) -> bool:
        """``domain`` must already be normalised with :func:`normalise_domain`."""
        if self.kind is DomainKind.ANY:
            return True
        if self.kind is DomainKind.EXACT:
            return domain == self.domain
        return domain.endswith("." + self.domain)

    def __str__(self) -> str:
        if self.kind is DomainKind.ANY:
            return "*"
        if self.kind is DomainKind.SUBDOMAINS:
            return "*." + self.domain
        return self.domain


@functools.lru_cache(maxsize=8192)
def normalise_domain(domain: str) -> str | None:
    """Normalise a domain seen in mail; None when it is not a valid domain name.

    Address literals (``[192.0.2.1]``) and garbage match no partner's domain pattern (the
    engine holds them to ``*`` connectors only). The same domains come back with every
    recipient and every message, so answers are remembered.
    """
    try:
        return to_a_label(domain)
    except PatternError:
        return None


_LOOSE_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


def loose_domain(domain: str) -> str | None:
    """A domain seen in mail that is no host name for its characters alone (``mx_1.partner.test``:
    Postfix accepts an underscore), lowercased, so that the patterns of its parents still meet
    it; None for anything else (an address literal, an empty label, other characters). No
    pattern can be such a name, so only ``*.parent`` and ``*`` patterns ever match it."""
    name = (domain[:-1] if domain.endswith(".") else domain).lower()
    if not name.isascii() or len(name) > _MAX_DOMAIN or not _LOOSE_NAME.fullmatch(name):
        return None
    return name


def raw_domain(address: str) -> str:
    """The text after the last @ of an envelope or header address, as written; "" when the
    address has no domain (null sender, no @)."""
    addr = address.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    # Postfix drops an empty domain ("bob@example.org@" is delivered to bob@example.org).
    addr = addr.rstrip("@")
    at = addr.rfind("@")
    return addr[at + 1 :] if at >= 0 else ""


def judged_domain(address: str) -> str | None:
    """The domain by which an address meets domain patterns: its normalised domain, or the loose
    one of a name amiss for its characters alone (see :func:`loose_domain`); None for an
    address literal, garbage or no domain."""
    return address_domain(address) or loose_domain(raw_domain(address))


def address_domain(address: str) -> str | None:
    """The normalised domain of an envelope or header address, or None (null sender, no @,
    or a domain that is no domain name: an address literal, garbage)."""
    domain = raw_domain(address)
    return normalise_domain(domain) if domain else None


@dataclass(frozen=True, slots=True)
class CertNamePattern:
    """An RFC 6125 reference identifier: ``mail.example.com`` or ``*.example.com``.

    The wildcard is allowed only as the complete leftmost label and matches exactly one
    label, never the bare parent domain.
    """

    name: str
    wildcard: bool

    @classmethod
    def parse(cls, text: str) -> CertNamePattern:
        raw = text.strip()
        if raw.startswith("*."):
            rest = to_a_label(raw[2:])
            if "." not in rest:
                raise PatternError(
                    f"invalid certificate name pattern {text!r}: a wildcard needs at least two labels after it"
                )
            return cls(rest, True)
        if "*" in raw:
            raise PatternError(
                f"invalid certificate name pattern {text!r}: '*' is allowed only as the whole leftmost label"
            )
        return cls(to_a_label(raw), False)

    def matches(self, presented: str) -> bool:
        """Match a name presented in a certificate (a CN or a DNS SAN), as it is spelt but for
        ASCII case and one final dot: Postfix passes spaces and UTF-8 in a CN through, and
        neither stripping them nor Unicode case rules (the Kelvin sign lowercases to "k") may
        turn a name a CA issued into another one. A wildcard in the presented name
        (``*.example.com``) meets only the same wildcard pattern, never a host under it."""
        if not presented.isascii():
            return False
        name = presented.lower()
        if name.endswith("."):
            name = name[:-1]
        if name.startswith("*."):
            # A wildcard certificate matches a reference only if the reference is the same wildcard.
            return self.wildcard and name[2:] == self.name
        if not self.wildcard:
            return name == self.name
        head, _, tail = name.partition(".")
        return bool(head) and tail == self.name

    def __str__(self) -> str:
        return "*." + self.name if self.wildcard else self.name


@dataclass(frozen=True, slots=True)
class IssuerPattern:
    """A case-insensitive issuer name, where ``*`` matches any run of characters."""

    text: str

    @classmethod
    def parse(cls, text: str) -> IssuerPattern:
        raw = " ".join(text.split())
        if not raw:
            raise PatternError("empty issuer pattern")
        if any(c in raw for c in "?[]"):
            raise PatternError(f"invalid issuer pattern {text!r}: only '*' is a wildcard")
        return cls(raw)

    def matches(self, issuer: str) -> bool:
        return fnmatch.fnmatchcase(" ".join(issuer.split()).casefold(), self.text.casefold())

    def __str__(self) -> str:
        return self.text


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


_HOST_BITS4 = tuple(0xFFFFFFFF >> plen for plen in range(33))


def _plain_ipv4_network(raw: str) -> ipaddress.IPv4Network | None:
    """``a.b.c.d`` or ``a.b.c.d/n`` in their strict form, without ipaddress's string parser
    (a rule load parses every range of every connector); None for anything else, which the
    full parser then judges."""
    addr, slash, plen = raw.partition("/")
    if slash:
        if not (plen.isascii() and plen.isdigit()) or int(plen) > 32:
            return None
        prefix = int(plen)
    else:
        prefix = 32
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET, addr), "big")
    except (OSError, ValueError):  # ValueError: a NUL or a character that is not ASCII
        return None
    if value & _HOST_BITS4[prefix]:
        return None
    return ipaddress.IPv4Network((value, prefix))


def parse_network(text: str) -> Network:
    """An address or CIDR range; host bits must be zero so that a typo cannot widen a range."""
    raw = text.strip()
    fast = _plain_ipv4_network(raw)
    if fast is not None:
        return fast
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        raise PatternError(f"invalid address range {text!r}: {exc}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        mapped = net.network_address.ipv4_mapped
        if net.prefixlen >= 96:
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def parse_address(text: str) -> Address | None:
    """An address as Postfix spells it (a client's, a smart host's: ``192.0.2.1``,
    ``[192.0.2.1]``, ``IPv6:2001:db8::1``, ``[ipv6:2001:db8::1]``); None for unknown or
    unparsable values."""
    raw = text.strip()
    if raw.startswith("[") and raw.endswith("]"):
        raw = raw[1:-1]
    if raw.lower().startswith("ipv6:"):
        raw = raw[5:]
    if raw.startswith("[") and raw.endswith("]"):
        raw = raw[1:-1]
    try:
        addr = ipaddress.ip_address(raw.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr
