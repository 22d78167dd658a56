"""Outbound connectors as Postfix lookup tables: the TLS policy and the transport of a next hop.

An :class:`OutboundIndex` is built once per rule snapshot and answers the keys Postfix sends
to a ``socketmap:`` table. ``smtp_tls_policy_maps`` is queried with the next-hop destination:
a recipient domain (then ``.parent`` forms when the full domain is not found), or the verbatim
next hop of a transport, ``[host]:port``, ``[host]`` or ``host:port``. ``transport_maps`` with a
socketmap is queried with the full recipient address only (Postfix marks socketmaps as pattern
tables and skips them for its partial domain lookups), and with ``*``. Answers are the right
side of a Postfix table: ``secure match=mail.contoso.com protocols=>=TLSv1.2`` or
``smtp:[relay.contoso.com]:25``. A connector without smart hosts answers ``smtp:`` (deliver to
the recipient domain's MX hosts), so that ``relayhost`` or any other default route can never
take its mail to a next hop whose TLS policy tlsgate does not know. ``*`` connectors answer
TLS policy lookups for domains only (a bare next hop, ``relayhost = relay.isp.example``, is
asked as one), never transport lookups (those would route local mail away too). A
misconfigured connector is a temporary failure, so the mail stays queued; a key no connector
covers is NOTFOUND and Postfix's main.cf defaults apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tlsgate.model import InboundConnector, OutboundConnector, TlsLevel, tls_version_rank
from tlsgate.patterns import DomainKind, loose_domain, normalise_domain, parse_address
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


def _domain(raw: str) -> str | None:
    """A domain key, normalised; or loose when only its characters are amiss. Postfix's
    valid_hostname() admits ``_``: it routes mail to ``mx_1.partner.test`` and asks for its
    ``.partner.test`` policy, so such a name must still meet the ``*.parent`` patterns of its
    parents (no exact pattern can be it), as the inbound side judges it."""
    return normalise_domain(raw) or loose_domain(raw)


def _match_value(name: str) -> str:
    # Postfix has no one-label wildcard for reference identifiers; its ".domain" form (any
    # subdomain) is the closest, so "*.contoso.com" is widened to ".contoso.com".
    return "." + name[2:] if name.startswith("*.") else name


def _sha256(fingerprints: frozenset[str]) -> list[str]:
    return sorted(f for f in fingerprints if len(f) == _SHA256_HEX_LEN)


def pinned_prints(name: str, partners: Mapping[str, InboundConnector]) -> list[str]:
    """The sha256 fingerprints (public keys, then certificates) registered with the inbound
    connector ``name``: what a ``fingerprint`` policy of the outbound connector of that name
    accepts."""
    partner = partners.get(name)
    prints: list[str] = []
    for pin in partner.pins if partner is not None else ():
        prints += _sha256(pin.pubkey_fingerprints) + _sha256(pin.cert_fingerprints)
    return list(dict.fromkeys(prints))


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
        prints = pinned_prints(connector.name, snapshot.by_name)
        if not prints:
            return Reply(
                Status.TEMP,
                f"outbound connector {connector.name} asks for fingerprint but no certificate "
                f"is registered for inbound connector {connector.name}",
            )
        parts.append("match=" + "|".join(prints))
    if connector.min_tls_version is not None:
        parts.append(f"protocols=>={connector.min_tls_version}")
    return Reply(Status.OK, " ".join(parts))


def transport(connector: OutboundConnector, service: str = "smtp") -> Reply:
    """``smtp:[host]:port, ...`` for a connector with smart hosts, else ``smtp:``.

    ``smtp:`` (an empty next hop: the recipient domain, transport(5)) overrides relayhost,
    sender_dependent_relayhost_maps and relay_transport's next hop, which would otherwise take
    the mail to a relay whose TLS policy key is not the domain: it would leave unprotected.
    """
    if connector.problems:
        return Reply(Status.TEMP, f"outbound connector {connector.name} is misconfigured: {connector.problems[0]}")
    if not connector.smart_hosts:
        return Reply(Status.OK, f"{service}:")
    hops = [next_hop(h.host, h.port, h.mx_lookup) for h in connector.smart_hosts]
    # Several destinations in one transport entry are tried in order (Postfix >= 3.5).
    return Reply(Status.OK, f"{service}:" + ", ".join(hops))


def next_hop(host: str, port: int, mx_lookup: bool) -> str:
    # An address has no MX records; Postfix requires the [] form for it (transport(5)).
    if mx_lookup and parse_address(host) is None:
        return host if port == 25 else f"{host}:{port}"
    return f"[{host}]:{port}"


def _hop_keys(host: str, port: int, mx_lookup: bool) -> tuple[str, ...]:
    """Every spelling of a smart host Postfix may use as a TLS policy key."""
    ip = parse_address(host)
    if ip is not None:
        # relayhost may spell an IPv6 address with Postfix's "ipv6:" prefix or without it.
        names = [f"[{ip}]"] + ([f"[ipv6:{ip}]"] if ip.version == 6 else [])
        return tuple(k for n in names for k in ((f"{n}:{port}", n) if port == 25 else (f"{n}:{port}",)))
    if mx_lookup:
        return (host, f"{host}:25") if port == 25 else (f"{host}:{port}",)
    return (f"[{host}]:{port}", f"[{host}]") if port == 25 else (f"[{host}]:{port}",)


def _policy_settings(connector: OutboundConnector, partners: Mapping[str, InboundConnector]) -> tuple[object, ...]:
    """What a connector's TLS policy answer is made of: equal settings, equal answers."""
    level = connector.tls_level
    names = connector.match_names if level in (TlsLevel.VERIFY, TlsLevel.SECURE) else ()
    # Fingerprint pins come from the inbound connector of the same name: two connectors that
    # accept the same certificates agree, whatever their names.
    prints = frozenset(pinned_prints(connector.name, partners)) if level is TlsLevel.FINGERPRINT else frozenset()
    return (level, names, connector.min_tls_version, prints)


@dataclass(frozen=True, slots=True)
class HopClash:
    """Connectors whose different TLS policies one smart host key would have to answer for."""

    routed: tuple[str, ...]  # the connectors with this smart host, by name
    shared: bool  # whether their own policies differ
    domain: str | None = None  # the connector covering the key as a recipient domain, if it clashes

    @property
    def names(self) -> tuple[str, ...]:
        return self.routed + ((self.domain,) if self.domain is not None else ())


def _connectors(names: tuple[str, ...]) -> str:
    return f"outbound connector{'s' if len(names) > 1 else ''} {', '.join(names)}"


def hop_clashes(
    connectors: Iterable[OutboundConnector],
    partners: Mapping[str, InboundConnector],
    domains: _Domains | None = None,
) -> dict[str, HopClash]:
    """Smart host keys that must answer for enabled connectors whose TLS policies differ.

    Postfix asks for the TLS policy of a smart host by its name alone, so one answer must
    serve every connector routed there. No answer is "the strictest" in general (two match
    lists, or encrypt with TLS 1.3 against verify with TLS 1.2, do not compare), so such a
    hop answers TEMP until the connectors agree. ``partners`` are the inbound connectors by
    name, whose registered certificates ``fingerprint`` policies pin.

    A smart host ``contoso.com`` (MX lookup, port 25) has the very key Postfix sends for mail
    to the recipient domain contoso.com, so the connector covering that domain (with the
    domain lookup's precedence) has to agree too; a misconfigured one never does, since its
    domains answer TEMP. A ``*`` connector is a floor: it agrees with any smart host whose
    connectors all ask at least what it asks (see :func:`_asks_at_least`).
    ``domains``: the table of ``connectors``, when the caller has built it.
    """
    live = sorted((c for c in connectors if c.enabled), key=lambda c: c.name)
    by_key: dict[str, dict[str, OutboundConnector]] = {}
    bare: set[str] = set()
    for conn in live:
        for h in conn.smart_hosts:
            for key in _hop_keys(h.host, h.port, h.mx_lookup):
                by_key.setdefault(key, {})[conn.name] = conn
                # Only a host name with MX lookup on port 25 has a key without brackets or a
                # port, as a domain has. "[address]" is an address-literal recipient's next hop
                # too, but no connector covers those as a domain.
                if not key.startswith("[") and ":" not in key:
                    bare.add(key)
    # The loader has no index: it gets a domain table only when a bare key needs one.
    owners = domains if domains is not None or not bare else _Domains(live)
    clashes: dict[str, HopClash] = {}
    for key, group in by_key.items():
        settings = {_policy_settings(c, partners) for c in group.values()}
        # A bare key is also a domain's key (hosts are A-labels, as domains are): the connector
        # the domain lookup picks must agree.
        owner = owners.for_domain(key) if owners is not None and key in bare else None
        rival: str | None = None
        if owner is not None and owner.name not in group and (
            owner.problems or settings != {_policy_settings(owner, partners)}
        ) and not (
            # "*" is a floor: a smart host's connector may ask more than it, never less.
            not owner.problems and owners is not None and owners.specific(key) is None
            and all(_asks_at_least(c, owner, partners) for c in group.values())
        ):
            rival = owner.name
        if rival is not None or len(settings) > 1:
            clashes[key] = HopClash(tuple(group), len(settings) > 1, rival)
    return clashes


def _asks_at_least(conn: OutboundConnector, floor: OutboundConnector,
                   partners: Mapping[str, InboundConnector]) -> bool:
    """Whether ``conn``'s policy asks all that ``floor``'s asks, with TLS at least as recent:
    an ``encrypt`` floor, TLS whatever the level (``dane`` falls back to ``may``, plaintext
    possible, where no TLSA records are published); a ``dane`` floor, ``dane`` or a level that
    always authenticates the server (any but ``encrypt``); any other floor, the very same
    certificate check."""
    if _version_rank(conn.min_tls_version) < _version_rank(floor.min_tls_version):
        return False
    if floor.tls_level is TlsLevel.ENCRYPT:
        return conn.tls_level is not TlsLevel.DANE
    if floor.tls_level is TlsLevel.DANE:
        return conn.tls_level is not TlsLevel.ENCRYPT
    return _certificate_check(conn, partners) == _certificate_check(floor, partners)


def _certificate_check(conn: OutboundConnector, partners: Mapping[str, InboundConnector]) -> tuple[object, ...]:
    level, names, _, prints = _policy_settings(conn, partners)
    return (level, names, prints)


def _version_rank(version: str | None) -> int:
    return (tls_version_rank(version) or 0) if version else 0


class _Domains:
    """The enabled connectors by recipient domain pattern.

    Among connectors covering a domain the most specific pattern wins (exact, then the longest
    ``*.`` parent, then ``*``); equal patterns go to a misconfigured connector first (its mail
    waits until it is fixed), then to the first connector by name.
    """

    def __init__(self, live: Iterable[OutboundConnector]) -> None:
        """``live``: enabled connectors, sorted by name."""
        exact: dict[str, OutboundConnector] = {}
        sub: dict[str, OutboundConnector] = {}
        anyone: OutboundConnector | None = None
        for conn in live:
            for pattern in conn.recipient_domains:
                if pattern.kind is DomainKind.EXACT:
                    _claim(exact, pattern.domain, conn)
                elif pattern.kind is DomainKind.SUBDOMAINS:
                    _claim(sub, pattern.domain, conn)
                elif anyone is None or (conn.problems and not anyone.problems):
                    anyone = conn
        self._exact = exact
        self._sub = sub
        self._any = anyone

    def for_domain(self, domain: str) -> OutboundConnector | None:
        """The connector for a recipient domain (normalised, or loose: see :func:`_domain`), or None."""
        found = self._exact.get(domain)
        if found is not None:
            return found
        return self._parents(domain)

    def specific(self, domain: str) -> OutboundConnector | None:
        """The connector for a domain by an exact or ``*.`` pattern, leaving ``*`` out."""
        found = self._exact.get(domain)
        return found if found is not None else self._parents(domain, anyone=False)

    def _parents(self, domain: str, *, anyone: bool = True) -> OutboundConnector | None:
        # "*.parent" patterns, walking from the longest proper parent up.
        rest = domain
        while True:
            dot = rest.find(".")
            if dot < 0:
                return self._any if anyone else None
            rest = rest[dot + 1 :]
            found = self._sub.get(rest)
            if found is not None:
                return found


class OutboundIndex(_Domains):
    """The enabled outbound connectors of one snapshot, by recipient domain (as
    :class:`_Domains` ranks them) and by smart host."""

    def __init__(self, snapshot: Snapshot, service: str = "smtp") -> None:
        """``service``: the master.cf service the transport answers name (``[socketmap] transport``)."""
        self.snapshot = snapshot
        self.generation = snapshot.generation
        live = sorted((c for c in snapshot.outbound if c.enabled), key=lambda c: c.name)
        super().__init__(live)
        hops: dict[str, OutboundConnector] = {}
        for conn in live:
            for h in conn.smart_hosts:
                for key in _hop_keys(h.host, h.port, h.mx_lookup):
                    hops.setdefault(key, conn)
        self._hops = hops
        self._policies = {c.name: tls_policy(c, snapshot) for c in live}
        self._transports = {c.name: transport(c, service) for c in live}
        self._hop_answers: dict[str, Answer] = {}
        for key, clash in hop_clashes(live, snapshot.by_name, self).items():
            names = clash.names
            broken = next((n for n in names if self._policies[n].status is Status.TEMP), None)
            if broken is not None:
                reply = self._policies[broken]
            elif clash.domain is not None:
                reply = Reply(Status.TEMP, (
                    f"the smart host {key} of {_connectors(clash.routed)} is a recipient domain "
                    f"of outbound connector {clash.domain}, with a different TLS policy"))
            else:
                reply = Reply(Status.TEMP, (
                    f"outbound connectors {', '.join(names)} share the smart host {key} with different TLS policies"))
            self._hop_answers[key] = Answer(reply, broken or names[0])
        self.connector_count = len(live)

    def connector_for_policy_key(self, key: str) -> OutboundConnector | None:
        """The connector for a smtp_tls_policy_maps key, in any form Postfix sends."""
        raw = key.strip()
        hop = self._hop(raw)
        if hop is not None:
            return hop
        if raw.startswith("."):
            # Postfix's retry with the parent of a domain whose full name was not found: only
            # patterns that cover subdomains of that parent apply.
            parent = _domain(raw[1:])
            if parent is None:
                return self._any
            found = self._sub.get(parent)
            return found if found is not None else self._parents(parent)
        if raw.startswith("[") or ":" in raw:
            # A next hop that no connector routes to: a content filter ([127.0.0.1]:10024),
            # relayhost, a transport of main.cf. Its TLS needs are not a "*" connector's. (A
            # bare relay name, MX-style, is a domain key like any other: "*" answers it.)
            return None
        domain = _domain(raw)
        if domain is None:
            return self._any
        return self.for_domain(domain)

    def _hop_key(self, raw: str) -> str | None:
        """The key a bracketed or host:port next hop is indexed under, if it is one."""
        low = raw.lower()
        if low in self._hops or not (low.startswith("[") or ":" in low):
            return low
        host, sep, port = low.rpartition(":") if not low.endswith("]") else (low, "", "")
        inner = host.strip("[]") if host.startswith("[") else host
        ip = parse_address(inner)
        if ip is not None:
            name: str | None = str(ip)
        else:
            name = normalise_domain(inner)
        if name is None:
            return None
        canonical = f"[{name}]" if host.startswith("[") else name
        return canonical + (sep + port if sep else "")

    def _hop(self, raw: str) -> OutboundConnector | None:
        key = self._hop_key(raw)
        return self._hops.get(key) if key is not None else None

    def tls_policy(self, key: str) -> Answer:
        if self._hop_answers:
            hop = self._hop_key(key.strip())
            if hop is not None and hop in self._hop_answers:
                return self._hop_answers[hop]
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
        domain = _domain(raw[at + 1 :] if at >= 0 else raw.lstrip("."))
        if domain is None:
            return NOT_FOUND
        # Never "*": Postfix asks transport_maps for local and virtual domains too, and a "*"
        # connector would send root@localhost to its smart hosts, or away from this host.
        conn = self._parents(domain, anyone=False) if raw.startswith(".") else (
            self._exact.get(domain) or self._parents(domain, anyone=False)
        )
        if conn is None:
            return NOT_FOUND
        return Answer(self._transports[conn.name], conn.name)

    def lookup(self, map_name: str, key: str) -> Answer:
        if map_name == TLS_POLICY_MAP:
            return self.tls_policy(key)
        if map_name == TRANSPORT_MAP:
            return self.transport(key)
        return Answer(Reply(Status.PERM, f"unknown map {map_name!r}: use {' or '.join(MAP_NAMES)}"))


def _claim(table: dict[str, OutboundConnector], domain: str, conn: OutboundConnector) -> None:
    held = table.get(domain)
    if held is None or (conn.problems and not held.problems):
        table[domain] = conn


def lookup(index: OutboundIndex | None, map_name: str, key: str) -> Answer:
    """Answer one socketmap request; with no rules loaded yet, a temporary failure."""
    if map_name not in MAP_NAMES:
        return Answer(Reply(Status.PERM, f"unknown map {map_name!r}: use {' or '.join(MAP_NAMES)}"))
    if index is None:
        return Answer(NO_RULES)
    return index.lookup(map_name, key)
