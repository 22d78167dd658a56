"""Client address entries that name DNS: ``a:HOST``, ``mx:DOMAIN``, ``spf:DOMAIN``.

Partners' servers move; a list of addresses typed by hand goes stale and then blocks their
mail. An ``inbound_address`` row may therefore name DNS instead of a range. This module
resolves such entries with dnspython, never on the request path: the rule holder's thread
refreshes the entries whose TTL (clamped to a sane minimum and maximum) ran out, all at once
within one deadline, keeps the last good answer when DNS fails (and, for a while, the ranges that an answer
suddenly lacks), and rebuilds the snapshot with the resolved ranges. A
connector whose DNS ranges are unknown (an entry never resolved) fails closed: a temporary
failure in its scope, where ranges that selected clients then select every client.

SPF records are followed through ``include:`` and ``redirect=`` within RFC 7208's limit of 10
DNS-querying terms; ``a`` and ``mx`` mechanisms inside them are resolved, ``ptr`` and
``exists`` cannot be turned into ranges and are reported.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import dns.exception
import dns.resolver

from tlsgate.model import UNRESOLVED_DNS, InboundConnector
from tlsgate.patterns import Network, PatternError, to_a_label

log = logging.getLogger("tlsgate.dns")

KINDS = ("a", "mx", "spf")
SPF_LOOKUP_LIMIT = 10
MAX_MX_HOSTS = 10
#: seconds before an entry that never resolved is asked again (capped by min_ttl): its
#: connector defers mail meanwhile, so it should not wait a whole min_ttl after DNS recovers
FIRST_RETRY = 10.0
#: seconds the ranges of an entry stay in force after DNS starts answering it with no addresses
#: (NXDOMAIN, no records, no usable SPF record): a botched zone change should not refuse or
#: defer a partner at once, a server that really left should not stay trusted for long
EMPTY_GRACE = 86400.0
#: a round of lookups (every due entry, resolved at once) ends after this many resolver timeouts;
#: a dead server costs one, as each entry gives up at its first unanswered query, and the rest
#: is for entries that need many answers from a slow server (SPF includes)
ROUND_TIMEOUTS = 3
#: entries resolved at the same time in one round; threads mostly wait on a socket
MAX_PARALLEL = 32
#: SPF ranges wider than these (per IP version) are used but reported: the largest mail
#: providers publish a /14 at most, and ``ip4:0.0.0.0/0`` is ``+all`` in disguise
WIDEST_SPF_PREFIX = {4: 8, 6: 16}
ALL_ADDRESSES: tuple[Network, ...] = (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0"))


class DnsFailure(Exception):
    """DNS did not answer usefully (timeout, SERVFAIL): keep the last good answer."""


_DNS_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def dns_name(text: str) -> str:
    """A DNS name as SPF uses them: like a host name, but labels may hold '_' (``_spf``)."""
    name = text.strip().rstrip(".").lower()
    if not name.isascii():
        return to_a_label(name)
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise PatternError(f"invalid DNS name {text!r}")
    return name


def parse_entry(text: str) -> str | None:
    """``a:mail.example.com`` normalised, or None when ``text`` is not a DNS entry.

    Raises PatternError for a DNS entry with a bad name.
    """
    kind, sep, name = text.strip().partition(":")
    if not sep or kind.lower() not in KINDS:
        return None
    try:
        ipaddress.ip_network(text.strip(), strict=False)
        return None  # an IPv6 range that happens to start with a: (a::/16)
    except ValueError:
        pass
    try:
        ipaddress.ip_address(name.strip())
    except ValueError:
        return f"{kind.lower()}:{dns_name(name)}"
    # An address would be looked up as a name, find nothing and refuse the partner.
    raise PatternError(f"{name.strip()!r} is an address, not a name: write it without '{kind}:'")


@dataclass(frozen=True, slots=True)
class Resolution:
    """What DNS said about one entry. ``problems`` are notes for lint and explain (an SPF
    mechanism that cannot become a range, a name with no addresses): the answer still counts."""

    entry: str
    networks: tuple[Network, ...]
    ttl: int
    resolved_at: float
    problems: tuple[str, ...] = ()
    #: ranges of earlier answers that the latest one lacks, kept in ``networks`` for the grace,
    #: each with the time of the first answer without it; empty for an answer taken as it came
    held: tuple[tuple[Network, float], ...] = ()
    #: when DNS began answering with no addresses at all, while the last ones are held
    empty_since: float | None = None

    @property
    def held_since(self) -> float | None:
        """When the range held longest stopped being given (its grace counts from then), None
        if none is held."""
        return min(since for _, since in self.held) if self.held else None


@dataclass(frozen=True)
class ResolverSettings:
    """The resolver part of the configuration's [dns] section."""

    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 3.0
    min_ttl: int = 60
    max_ttl: int = 86400
    empty_grace: float = EMPTY_GRACE


def make_resolver(settings: ResolverSettings) -> dns.resolver.Resolver:
    """The resolver for ``settings``. Without nameservers of its own it reads /etc/resolv.conf;
    one that names no nameserver (or cannot be read) gives a resolver with none, whose every
    lookup then fails like a DNS outage, rather than stopping a daemon that may never look up
    anything (the socketmap daemon, rules without DNS entries)."""
    if settings.nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = list(settings.nameservers)
    else:
        try:
            resolver = dns.resolver.Resolver(configure=True)
        except (dns.exception.DNSException, OSError) as exc:
            log.warning("no DNS resolver (%s): address entries that name DNS cannot be resolved; "
                        "set [dns] nameservers", _short(exc) if isinstance(exc, dns.exception.DNSException) else exc)
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = []
    resolver.port = settings.port
    resolver.lifetime = settings.timeout
    resolver.timeout = settings.timeout
    return resolver


class _Lookup:
    """One entry's resolution: counts queries, collects TTLs and problems, keeps the deadline
    (``time.monotonic()`` seconds) of the round it is part of."""

    def __init__(self, resolver: dns.resolver.Resolver, deadline: float | None = None) -> None:
        self.resolver = resolver
        self.deadline = deadline
        self.ttls: list[int] = []
        self.problems: list[str] = []

    def _lifetime(self, name: str, rdtype: str) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DnsFailure(f"{name} {rdtype}: not asked, this round of lookups ran out of time")
        return min(left, self.resolver.lifetime)

    def query(self, name: str, rdtype: str) -> list[object]:
        lifetime = self._lifetime(name, rdtype)
        try:
            answer = self.resolver.resolve(name, rdtype, raise_on_no_answer=False, lifetime=lifetime)
        except dns.resolver.NXDOMAIN:
            return []  # authoritative: the name does not exist, which is an answer
        except dns.resolver.NoNameservers as exc:
            raise DnsFailure(f"{name} {rdtype}: no server answered ({_short(exc)})") from None
        except dns.exception.Timeout:
            raise DnsFailure(f"{name} {rdtype}: timed out") from None
        except dns.exception.DNSException as exc:
            raise DnsFailure(f"{name} {rdtype}: {_short(exc)}") from None
        if answer.rrset is None:
            return []
        self.ttls.append(answer.rrset.ttl)
        return list(answer.rrset)

    def addresses(self, name: str, v4_prefix: int = 32, v6_prefix: int = 128) -> list[Network]:
        nets: list[Network] = []
        for rdtype, plen in (("A", v4_prefix), ("AAAA", v6_prefix)):
            for record in self.query(name, rdtype):
                address = getattr(record, "address", "")
                nets.append(ipaddress.ip_network(f"{address}/{plen}", strict=False))
        return nets

    def mx_hosts(self, domain: str) -> list[str]:
        records = sorted(self.query(domain, "MX"), key=lambda r: getattr(r, "preference", 0))
        hosts = [str(getattr(r, "exchange", "")).rstrip(".") for r in records]
        if len(hosts) > MAX_MX_HOSTS:
            self.problems.append(f"{domain} has {len(hosts)} MX hosts; the first {MAX_MX_HOSTS} are used")
        return [h for h in hosts[:MAX_MX_HOSTS] if h]


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def resolve_entry(entry: str, resolver: dns.resolver.Resolver, settings: ResolverSettings,
                  deadline: float | None = None) -> Resolution:
    """Resolve one entry now. Raises DnsFailure when DNS could not give an answer, by
    ``deadline`` (``time.monotonic()`` seconds) when one is given."""
    kind, _, name = entry.partition(":")
    lookup = _Lookup(resolver, deadline)
    if kind == "a":
        nets = lookup.addresses(name)
        if not nets:
            lookup.problems.append(f"{name} has no A or AAAA records")
    elif kind == "mx":
        nets = []
        hosts = lookup.mx_hosts(name)
        if not hosts:
            lookup.problems.append(f"{name} has no MX records")
        for host in hosts:
            found = lookup.addresses(host)
            if not found:
                lookup.problems.append(f"MX host {host} of {name} has no addresses")
            nets.extend(found)
    elif kind == "spf":
        nets = _spf(name, lookup)
    else:
        raise ValueError(f"not a DNS entry: {entry}")
    ttl = min(lookup.ttls) if lookup.ttls else settings.min_ttl
    ttl = max(settings.min_ttl, min(settings.max_ttl, ttl))
    unique = tuple(dict.fromkeys(nets))
    return Resolution(entry, unique, ttl, time.time(), tuple(lookup.problems))


def _spf_record(domain: str, lookup: _Lookup) -> str | None:
    records = []
    for record in lookup.query(domain, "TXT"):
        strings = getattr(record, "strings", ())
        text = b"".join(strings).decode("utf-8", "replace")
        if text.lower() == "v=spf1" or text.lower().startswith("v=spf1 "):
            records.append(text)
    if len(records) > 1:
        lookup.problems.append(f"{domain} has {len(records)} SPF records (a permanent error in SPF); none used")
        return None
    return records[0] if records else None


def _cidr(spec: str) -> tuple[str, int, int]:
    """``domain/24//64`` -> (domain, 24, 64); missing parts default."""
    name, _, rest = spec.partition("/")
    v4, _, v6 = rest.partition("/")
    v6 = v6.lstrip("/")
    return name, int(v4) if v4 else 32, int(v6) if v6 else 128


def _spf(domain: str, lookup: _Lookup) -> list[Network]:
    nets: list[Network] = []
    budget = [SPF_LOOKUP_LIMIT]
    _spf_walk(domain, lookup, nets, budget, path=set())
    for net in dict.fromkeys(nets):
        widest = WIDEST_SPF_PREFIX[net.version]
        if net.prefixlen < widest:
            lookup.problems.append(f"the SPF of {domain} authorises {net}, wider than a /{widest}: "
                                   "every client in it counts as the partner's server")
    return nets


def _spend(what: str, lookup: _Lookup, budget: list[int]) -> bool:
    if budget[0] <= 0:
        lookup.problems.append(f"SPF lookup limit of {SPF_LOOKUP_LIMIT} reached; {what} not followed")
        return False
    budget[0] -= 1
    return True


def _spf_walk(domain: str, lookup: _Lookup, nets: list[Network], budget: list[int], path: set[str]) -> None:
    # ``path`` holds the records being walked, not every record seen: a domain included twice
    # through different records (a diamond) is no loop, only one that includes itself is.
    if domain in path:
        lookup.problems.append(f"SPF include loop at {domain}")
        return
    path.add(domain)
    try:
        _spf_terms(domain, lookup, nets, budget, path)
    finally:
        path.discard(domain)


def _spf_terms(domain: str, lookup: _Lookup, nets: list[Network], budget: list[int], path: set[str]) -> None:
    record = _spf_record(domain, lookup)
    if record is None:
        lookup.problems.append(f"{domain} has no SPF record")
        return
    redirect: str | None = None
    has_all = False
    for term in record.split()[1:]:
        qualifier = term[0] if term[0] in "+-~?" else "+"
        body = term[1:] if term[0] in "+-~?" else term
        low = body.lower()
        if low.startswith("redirect="):
            redirect = body.split("=", 1)[1]
            continue
        if "=" in body and ":" not in body.split("=", 1)[0]:
            continue  # another modifier (exp=...)
        if low in ("all",):
            has_all = True
            continue
        if qualifier != "+":
            continue  # only mechanisms that pass authorize addresses
        try:
            if low.startswith("ip4:") or low.startswith("ip6:"):
                nets.append(ipaddress.ip_network(body[4:], strict=False))
            elif low.startswith("include:"):
                if _spend(term, lookup, budget):
                    _spf_walk(dns_name(body[8:]), lookup, nets, budget, path)
            elif low == "a" or low.startswith(("a:", "a/")):
                if _spend(term, lookup, budget):
                    name, v4, v6 = _cidr(body[2:] if low.startswith("a:") else domain + body[1:])
                    nets.extend(lookup.addresses(dns_name(name), v4, v6))
            elif low == "mx" or low.startswith(("mx:", "mx/")):
                if _spend(term, lookup, budget):
                    name, v4, v6 = _cidr(body[3:] if low.startswith("mx:") else domain + body[2:])
                    for host in lookup.mx_hosts(dns_name(name)):
                        nets.extend(lookup.addresses(host, v4, v6))
            elif low.startswith(("ptr", "exists:")):
                _spend(term, lookup, budget)
                lookup.problems.append(f"SPF mechanism {term} of {domain} cannot be turned into address ranges")
            else:
                lookup.problems.append(f"unknown SPF term {term!r} in {domain}")
        except (ValueError, PatternError) as exc:
            lookup.problems.append(f"bad SPF term {term!r} in {domain}: {exc}")
    if redirect is not None and not has_all and _spend(f"redirect={redirect}", lookup, budget):
        try:
            _spf_walk(dns_name(redirect), lookup, nets, budget, path)
        except PatternError as exc:
            lookup.problems.append(f"bad SPF redirect {redirect!r} in {domain}: {exc}")


class DnsCache:
    """The last good resolution of every entry, and which entries are due for a refresh."""

    def __init__(self, settings: ResolverSettings) -> None:
        self.settings = settings
        self._resolver = make_resolver(settings)
        self.entries: dict[str, Resolution] = {}
        self._failing: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}
        self.failures = 0

    def due(self, wanted: Iterable[str], now: float | None = None) -> list[str]:
        moment = time.time() if now is None else now
        out = []
        for entry in wanted:
            known = self.entries.get(entry)
            retry = self._retry_at.get(entry, 0.0)
            if moment < retry:
                continue
            if known is None or moment >= known.resolved_at + known.ttl:
                out.append(entry)
            elif known.held_since is not None and moment >= known.held_since + self.settings.empty_grace:
                out.append(entry)  # a held range's grace ended: asked again, to drop it on time
        return out

    def forget(self, keep: Iterable[str]) -> None:
        """Drop what is known about entries not in ``keep`` (rows deleted from the database)."""
        wanted = set(keep)
        for table in (self.entries, self._failing, self._retry_at):
            for entry in [e for e in table if e not in wanted]:
                del table[entry]

    def refresh(self, entries: Iterable[str]) -> bool:
        """Resolve ``entries`` at once, within one deadline; True when any answer changed the
        ranges in force."""
        changed = False
        for entry, outcome in self._resolve_all(list(entries)):
            if isinstance(outcome, DnsFailure):
                self._failed(entry, outcome)
            else:
                changed = self._answered(entry, outcome) or changed
        return changed

    def _resolve_all(self, entries: list[str]) -> list[tuple[str, Resolution | DnsFailure]]:
        """Every entry's answer or failure. Concurrent, so that a dead server costs one timeout
        for the round rather than one per entry; each lookup stops at the round's deadline, so
        no thread outlives the round."""
        if not entries:
            return []
        deadline = time.monotonic() + ROUND_TIMEOUTS * self.settings.timeout

        def one(entry: str) -> Resolution | DnsFailure:
            try:
                return resolve_entry(entry, self._resolver, self.settings, deadline)
            except DnsFailure as exc:
                return exc

        with ThreadPoolExecutor(min(MAX_PARALLEL, len(entries)), thread_name_prefix="tlsgate-dns") as pool:
            return list(zip(entries, pool.map(one, entries), strict=True))

    def _failed(self, entry: str, exc: DnsFailure) -> None:
        self.failures += 1
        # Retry failed entries after the minimum TTL, not on every poll; sooner when the
        # entry never resolved, as its connector defers mail until it does.
        wait = self.settings.min_ttl if entry in self.entries else min(FIRST_RETRY, self.settings.min_ttl)
        self._retry_at[entry] = time.time() + wait
        if entry in self._failing:
            return
        self._failing[entry] = str(exc)
        old = self.entries.get(entry)
        if old is None:
            log.error("DNS entry %s: %s; its connector defers until it resolves", entry, exc)
        else:
            log.error("DNS entry %s: %s; keeping the ranges resolved %.0fs ago", entry, exc,
                      time.time() - old.resolved_at)

    def _answered(self, entry: str, result: Resolution) -> bool:
        self._retry_at.pop(entry, None)
        if self._failing.pop(entry, None) is not None:
            log.warning("DNS entry %s resolves again", entry)
        old = self.entries.get(entry)
        if old is not None:
            result = self._hold(old, result)
        self.entries[entry] = result
        if old is not None and set(old.networks) == set(result.networks):
            return False
        if result.networks:
            log.info("DNS entry %s: %s", entry, ", ".join(str(n) for n in result.networks))
        elif old is None:  # ranges dropped after their grace are logged by _hold
            log.error("DNS entry %s: no addresses (%s); its connector covers no client by it",
                      entry, "; ".join(result.problems))
        return True

    def _hold(self, old: Resolution, new: Resolution) -> Resolution:
        """``new`` with the ranges of ``old`` that it lacks, each while within the grace.

        An answer that only loses addresses (none left, one MX host or SPF include gone, an SPF
        record grown past the lookup limit) is more often a mistake in the partner's zone than
        servers that left: each lost range stays for ``empty_grace`` from the first answer
        without it, so that a partner held to its addresses is not refused for good meanwhile.
        An answer with an address ``old`` did not have is a move, followed at once.
        """
        grace = self.settings.empty_grace
        now = new.resolved_at
        since_of = dict(old.held)
        answered = set(new.networks)
        if not answered <= set(old.networks):
            if old.empty_since is not None:
                log.warning("DNS entry %s has addresses again", new.entry)
            elif old.held:
                log.warning("DNS entry %s gives new addresses; the ranges it had lost are dropped", new.entry)
            return new
        held: list[tuple[Network, float]] = []
        dropped: list[tuple[Network, float]] = []
        for net in old.networks:
            if net in answered:
                continue
            since = since_of.get(net, now)
            (held if now < since + grace else dropped).append((net, since))
        entry, why = new.entry, "; ".join(new.problems)
        fresh = [net for net, since in held if net not in since_of]
        if not new.networks and held and old.empty_since is None:
            log.warning("DNS entry %s: no addresses (%s); keeping the last ranges for up to %.0fs",
                        entry, why, grace)
        elif fresh:
            log.warning("DNS entry %s no longer gives %s%s; keeping them for up to %.0fs", entry,
                        ", ".join(map(str, fresh)), f" ({why})" if why else "", grace)
        if dropped:
            lost = now - min(since for _, since in dropped)
            if not new.networks and not held:
                log.error("DNS entry %s has had no addresses for %.0fs (%s); its last ranges are dropped, "
                          "and its connector covers no client by it", entry, lost, why)
            else:
                log.warning("DNS entry %s has not given %s for %.0fs; dropped", entry,
                            ", ".join(str(net) for net, _ in dropped), lost)
        elif old.empty_since is not None and new.networks:
            log.warning("DNS entry %s has addresses again%s", entry, " (some still held)" if held else "")
        elif old.held and not held:
            log.warning("DNS entry %s has all its ranges again", entry)
        if not held:
            return new
        empty_since = (now if old.empty_since is None else old.empty_since) if not new.networks else None
        return replace(new, networks=(*new.networks, *(net for net, _ in held)), held=tuple(held),
                       empty_since=empty_since)


def dns_entries(connectors: Iterable[InboundConnector]) -> set[str]:
    return {e for c in connectors for e in c.dns_entries}


def apply_dns(connectors: Iterable[InboundConnector], cache: DnsCache) -> tuple[InboundConnector, ...]:
    """Connectors with their DNS entries' ranges added to their client ranges."""
    return tuple(_with_dns(c, cache.entries) if c.dns_entries else c for c in connectors)


def _with_dns(c: InboundConnector, known: Mapping[str, Resolution]) -> InboundConnector:
    """``c`` with the ranges of its entries; misconfigured when they leave its scope unknown.

    An entry that never resolved leaves the ranges unknown: the connector cannot tell which
    clients are its own, so it gets a problem (mail in its scope is deferred) and, where its
    ranges select sessions, covers every client address, so that no session of the partner
    falls outside it (ranges beside a domain scope narrow it: the domain scope alone is then
    covered whole). Closed, never open, and never narrower than with its ranges known.

    Entries that DNS answered with no addresses at all (and no literal range beside them) are
    an answer: the partner has no servers. A connector scoped by them alone then covers no
    client, and one scoped by domains too covers its domains from any client; neither holds
    up anyone else's mail (the cache logs the empty answer as an error). Only a connector that
    restricts its domains to those servers is misconfigured: its partner's mail is deferred,
    not refused for good over what is more likely a mistake in a zone than a partner without
    servers.
    """
    ranges = list(c.client_ranges)
    problems = []
    for entry in c.dns_entries:
        got = known.get(entry)
        if got is None:
            problems.append(f"address entry {entry} {UNRESOLVED_DNS}")
        else:
            ranges.extend(got.networks)
    if not ranges and not problems and c.restrict_to_ranges and c.has_domain_scope:
        problems = [f"address entry {entry} resolves to no addresses" for entry in c.dns_entries]
    if problems and not (c.restrict_to_ranges and c.has_domain_scope):
        ranges = list(ALL_ADDRESSES)
    return replace(c, client_ranges=tuple(dict.fromkeys(ranges)), problems=(*c.problems, *problems))
