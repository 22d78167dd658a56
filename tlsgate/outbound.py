"""Outbound connectors as Postfix lookup tables: the TLS policy and the transport of a next hop.

An :class:`OutboundIndex` is built once per rule snapshot and answers the keys Postfix sends
to a ``socketmap:`` table. ``smtp_tls_policy_maps`` is queried with the next-hop destination:
a recipient domain (then ``.parent`` forms when the full domain is not found), or the verbatim
next hop of a transport, ``[host]:port``, ``[host]`` or ``host:port``. ``transport_maps`` with a
socketmap is queried with the full recipient address only (Postfix marks socketmaps as pattern
tables and skips them for its partial domain lookups), and with ``*``. Answers are the right
side of a Postfix table: ``secure match=mail.contoso.com protocols=>=TLSv1.2`` or
``smtp:[relay.contoso.com]:25``. A misconfigured connector is a temporary failure, so the mail
stays queued; a key no connector covers is NOTFOUND and Postfix's main.cf defaults apply.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlsgate.model import OutboundConnector, TlsLevel
from tlsgate.patterns import DomainKind, normalise_domain
from tlsgate.snapshot import Snapshot
from tlsgate.socketmap import Reply, Status

TLS_POLICY_MAP = "tls_policy"
TRANSPORT_MAP = "transport"
MAP_NAMES = (TLS_POLICY_MAP, TRANSPORT_MAP)

NO_RULES = Reply(Status.TEMP, "tlsgate has not loaded its rules yet")
_SHA256_HEX_LEN = 32 * 3 - 1  # "AB:CD:..." for 32 bytes


@dataclass(frozen=True, slots=True)
class Answer:
    """A lookup result and the connector it came from (for the log line)."""

    reply: Reply
    connector: str | None = None


NOT_FOUND = Answer(Reply(Status.NOTFOUND))


def _match_value(name: str) -> str:
    # Postfix has no one-label wildcard for reference identifiers; its ".domain" form (any
    # subdomain) is the closest, so "*.contoso.com" is widened to ".contoso.com".
    return "." + name[2:] if name.startswith("*.") else name


def _sha256(fingerprints: frozenset[str]) -> list[str]:
    return sorted(f for f in fingerprints if len(f) == _SHA256_HEX_LEN)


def tls_policy(connector: OutboundConnector, snapshot: Snapshot) -> Reply:
    """The policy table entry of one connector, or TEMP when it cannot be written."""
    if connector.problems:
        return Reply(Status.TEMP, f"outbound connector {connector.name} is misconfigured: {connector.problems[0]}")
    level = connector.tls_level
    parts = [level.value]
    if level in (TlsLevel.VERIFY, TlsLevel.SECURE) and connector.match_names:
        parts.append("match=" + ":".join(_match_value(n) for n in connector.match_names))
    if level is TlsLevel.FINGERPRINT:
        # The partner's registered certificates live with the inbound connector of the same
        # name: a partner usually sends and receives with one certificate.
        partner = snapshot.by_name.get(connector.name)
        pins = partner.pins if partner is not None else ()
        prints: list[str] = []
        for pin in pins:
            prints += _sha256(pin.pubkey_fingerprints) + _sha256(pin.cert_fingerprints)
        if not prints:
            return Reply(
                Status.TEMP,
                f"outbound connector {connector.name} asks for fingerprint but no certificate "
                f"is registered for inbound connector {connector.name}",
            )
        parts.append("match=" + "|".join(dict.fromkeys(prints)))
    if connector.min_tls_version is not None:
        parts.append(f"protocols=>={connector.min_tls_version}")
    return Reply(Status.OK, " ".join(parts))


def transport(connector: OutboundConnector) -> Reply:
    """``smtp:[host]:port, ...`` for a connector with smart hosts, else NOTFOUND."""
    if connector.problems:
        return Reply(Status.TEMP, f"outbound connector {connector.name} is misconfigured: {connector.problems[0]}")
    if not connector.smart_hosts:
        return Reply(Status.NOTFOUND)
    hops = [next_hop(h.host, h.port, h.mx_lookup) for h in connector.smart_hosts]
    # Several destinations in one transport entry are tried in order (Postfix >= 3.5).
    return Reply(Status.OK, "smtp:" + ", ".join(hops))


def next_hop(host: str, port: int, mx_lookup: bool) -> str:
    if mx_lookup:
        return host if port == 25 else f"{host}:{port}"
    return f"[{host}]:{port}"


def _hop_keys(host: str, port: int, mx_lookup: bool) -> tuple[str, ...]:
    """Every spelling of a smart host Postfix may use as a TLS policy key."""
    if mx_lookup:
        return (host, f"{host}:25") if port == 25 else (f"{host}:{port}",)
    return (f"[{host}]:{port}", f"[{host}]") if port == 25 else (f"[{host}]:{port}",)


class OutboundIndex:
    """The enabled outbound connectors of one snapshot, by recipient domain and by smart host.

    Among connectors covering a domain the most specific pattern wins (exact, then the longest
    ``*.`` parent, then ``*``); equal patterns go to the first connector by name.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.generation = snapshot.generation
        live = sorted((c for c in snapshot.outbound if c.enabled), key=lambda c: c.name)
        exact: dict[str, OutboundConnector] = {}
        sub: dict[str, OutboundConnector] = {}
        anyone: OutboundConnector | None = None
        hops: dict[str, OutboundConnector] = {}
        for conn in live:
            for pattern in conn.recipient_domains:
                if pattern.kind is DomainKind.EXACT:
                    exact.setdefault(pattern.domain, conn)
                elif pattern.kind is DomainKind.SUBDOMAINS:
                    sub.setdefault(pattern.domain, conn)
                elif anyone is None:
                    anyone = conn
            for h in conn.smart_hosts:
                for key in _hop_keys(h.host, h.port, h.mx_lookup):
                    hops.setdefault(key, conn)
        self._exact = exact
        self._sub = sub
        self._any = anyone
        self._hops = hops
        self._policies = {c.name: tls_policy(c, snapshot) for c in live}
        self._transports = {c.name: transport(c) for c in live}
        self.connector_count = len(live)

    def for_domain(self, domain: str) -> OutboundConnector | None:
        """The connector for a recipient domain (normalised), or None."""
        found = self._exact.get(domain)
        if found is not None:
            return found
        return self._parents(domain)

    def _parents(self, domain: str) -> OutboundConnector | None:
        # "*.parent" patterns, walking from the longest proper parent up.
        rest = domain
        while True:
            dot = rest.find(".")
            if dot < 0:
                return self._any
            rest = rest[dot + 1 :]
            found = self._sub.get(rest)
            if found is not None:
                return found

    def connector_for_policy_key(self, key: str) -> OutboundConnector | None:
        """The connector for a smtp_tls_policy_maps key, in any form Postfix sends."""
        raw = key.strip()
        hop = self._hop(raw)
        if hop is not None:
            return hop
        if raw.startswith("."):
            # Postfix's retry with the parent of a domain whose full name was not found: only
            # patterns that cover subdomains of that parent apply.
            parent = normalise_domain(raw[1:])
            if parent is None:
                return self._any
            found = self._sub.get(parent)
            return found if found is not None else self._parents(parent)
        if raw.startswith("[") or ":" in raw:
            return self._any
        domain = normalise_domain(raw)
        if domain is None:
            return self._any
        return self.for_domain(domain)

    def _hop(self, raw: str) -> OutboundConnector | None:
        low = raw.lower()
        found = self._hops.get(low)
        if found is not None or not (low.startswith("[") or ":" in low):
            return found
        host, sep, port = low.rpartition(":") if not low.endswith("]") else (low, "", "")
        inner = host.strip("[]") if host.startswith("[") else host
        name = normalise_domain(inner)
        if name is None:
            return None
        canonical = f"[{name}]" if host.startswith("[") else name
        return self._hops.get(canonical + (sep + port if sep else ""))

    def tls_policy(self, key: str) -> Answer:
        conn = self.connector_for_policy_key(key)
        if conn is None:
            return NOT_FOUND
        return Answer(self._policies[conn.name], conn.name)

    def transport(self, key: str) -> Answer:
        """A transport_maps key: ``user@domain`` (what Postfix sends), a bare domain, or ``*``."""
        raw = key.strip()
        if raw == "*":
            return NOT_FOUND  # the wildcard entry: leave unmatched mail to Postfix's defaults
        at = raw.rfind("@")
        domain = normalise_domain(raw[at + 1 :] if at >= 0 else raw.lstrip("."))
        if domain is None:
            return NOT_FOUND
        conn = self._parents(domain) if raw.startswith(".") else self.for_domain(domain)
        if conn is None:
            return NOT_FOUND
        return Answer(self._transports[conn.name], conn.name)

    def lookup(self, map_name: str, key: str) -> Answer:
        if map_name == TLS_POLICY_MAP:
            return self.tls_policy(key)
        if map_name == TRANSPORT_MAP:
            return self.transport(key)
        return Answer(Reply(Status.PERM, f"unknown map {map_name!r}: use {' or '.join(MAP_NAMES)}"))


def lookup(index: OutboundIndex | None, map_name: str, key: str) -> Answer:
    """Answer one socketmap request; with no rules loaded yet, a temporary failure."""
    if map_name not in MAP_NAMES:
        return Answer(Reply(Status.PERM, f"unknown map {map_name!r}: use {' or '.join(MAP_NAMES)}"))
    if index is None:
        return Answer(NO_RULES)
    return index.lookup(map_name, key)
