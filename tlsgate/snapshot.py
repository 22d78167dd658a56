"""An immutable, indexed set of connectors: what the engine decides against.

The store builds one from the database in a single read; the daemons swap a new one in
atomically when rows change. Lookups cost about the same at 100,000 connectors as at 10:

* domain patterns sit in dicts keyed by domain (exact) or by the parent of ``*.`` patterns,
  so a lookup walks the labels of the domain, never the list of connectors;
* client ranges sit in one dict per prefix length, keyed by network address, so finding
  every range that holds an address costs one dict probe per prefix length in use
  (at most 33 for IPv4 and 129 for IPv6), independent of the number of ranges.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import InitVar, dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

from tlsgate.model import InboundConnector, Mode, OutboundConnector, Scope
from tlsgate.patterns import Address, DomainKind, DomainPattern, Network

# (connector index, specificity of the pattern that matched)
Hit = tuple[int, tuple[int, int]]
_SCOPE_FIELDS = ((Scope.SENDER, "sender_domains"), (Scope.RECIPIENT, "recipient_domains"),
                 (Scope.HEADER_FROM, "header_from_domains"))


class DomainIndex:
    """Every domain pattern of one scope, searchable by a domain name."""

    __slots__ = ("_any", "_exact", "_sub")

    def __init__(self, entries: Iterable[tuple[int, DomainPattern]]) -> None:
        exact: dict[str, list[int]] = defaultdict(list)
        sub: dict[str, list[int]] = defaultdict(list)
        anyone: list[int] = []
        for idx, pattern in entries:
            if pattern.kind is DomainKind.EXACT:
                exact[pattern.domain].append(idx)
            elif pattern.kind is DomainKind.SUBDOMAINS:
                sub[pattern.domain].append(idx)
            else:
                anyone.append(idx)
        self._exact = {k: tuple(v) for k, v in exact.items()}
        self._sub = {k: tuple(v) for k, v in sub.items()}
        self._any = tuple(anyone)

    def lookup(self, domain: str) -> dict[int, tuple[int, int]]:
        """Connector index -> the best specificity among its patterns matching ``domain``."""
        found: dict[int, tuple[int, int]] = {}
        labels = domain.count(".") + 1
        for idx in self._exact.get(domain, ()):
            found[idx] = (int(DomainKind.EXACT), labels)
        # Walk parents from the longest: the first hit for a connector is its best wildcard.
        rest = domain
        depth = labels
        while True:
            dot = rest.find(".")
            if dot < 0:
                break
            rest = rest[dot + 1 :]
            depth -= 1
            for idx in self._sub.get(rest, ()):
                found.setdefault(idx, (int(DomainKind.SUBDOMAINS), depth))
        for idx in self._any:
            found.setdefault(idx, (int(DomainKind.ANY), 0))
        return found

    def lookup_any(self) -> dict[int, tuple[int, int]]:
        """The connectors of ``*``: all that a domain which is no domain name can match."""
        return {idx: (int(DomainKind.ANY), 0) for idx in self._any}


class RangeIndex:
    """Address ranges keyed by (version, prefix length) then network address."""

    __slots__ = ("_everyone", "_tables")

    def __init__(self, entries: Iterable[tuple[int, Network]]) -> None:
        tables: dict[tuple[int, int], dict[int, list[int]]] = {}
        for idx, net in entries:
            key = (net.version, net.prefixlen)
            tables.setdefault(key, defaultdict(list))[int(net.network_address)].append(idx)
        # Longest prefixes first, so the first hit for a connector is its most specific range.
        self._tables = tuple(
            (version, plen, {k: tuple(v) for k, v in table.items()})
            for (version, plen), table in sorted(tables.items(), key=lambda kv: -kv[0][1])
        )
        self._everyone: tuple[int, ...] | None = None

    def everyone(self, prefix: int) -> dict[int, int]:
        """Every connector with a range, each at ``prefix``: those an unknown address may be in."""
        if self._everyone is None:
            self._everyone = tuple(dict.fromkeys(i for _, _, table in self._tables for ids in table.values() for i in ids))
        return dict.fromkeys(self._everyone, prefix)

    def lookup(self, address: Address) -> dict[int, int]:
        """Connector index -> longest prefix length of its ranges that hold ``address``."""
        found: dict[int, int] = {}
        value = int(address)
        bits = 32 if address.version == 4 else 128
        for version, plen, table in self._tables:
            if version != address.version:
                continue
            masked = value >> (bits - plen) << (bits - plen) if plen else 0
            for idx in table.get(masked, ()):
                found.setdefault(idx, plen)
        return found


def range_contains(ranges: Iterable[Network], address: Address) -> bool:
    return any(address.version == net.version and address in net for net in ranges)


def _indexed(c: InboundConnector) -> tuple[object, ...]:
    """All that the indexes hold of a connector, apart from its position."""
    if not c.enabled:
        return ()
    return (c.sender_domains, c.recipient_domains, c.header_from_domains,
            c.client_ranges if c.scopes_ranges else ())


def _same_indexes(old: tuple[InboundConnector, ...], new: tuple[InboundConnector, ...]) -> bool:
    """True when indexes built for ``old`` are those ``new`` would get: the same count, and at
    every position the same connector object or one alike in what is indexed."""
    return len(old) == len(new) and all(a is b or _indexed(a) == _indexed(b) for a, b in zip(old, new, strict=True))


@dataclass(frozen=True)
class Snapshot:
    """Connectors as loaded at one moment, with their indexes.

    ``generation`` is the database's change counter at load time; ``errors`` are the problems
    found while loading (also attached to the connectors they concern). Given the ``previous``
    snapshot, its indexes are shared when they would come out the same: a change of settings
    (TLS required, certificate, failure action) at 100,000 connectors then skips rebuilding them.
    """

    inbound: tuple[InboundConnector, ...]
    outbound: tuple[OutboundConnector, ...] = ()
    generation: int = 0
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    errors: tuple[str, ...] = ()
    # Derived from inbound, and shared between snapshots: never part of a comparison.
    domains: Mapping[Scope, DomainIndex] = field(init=False, repr=False, compare=False)
    ranges: RangeIndex = field(init=False, repr=False, compare=False)
    by_name: Mapping[str, InboundConnector] = field(init=False, repr=False, compare=False)
    # The domain scopes of the enabled connectors in enforce mode (an address without a
    # domain is refused only where one of them could have applied).
    enforced_scopes: frozenset[Scope] = field(init=False, repr=False, compare=False)
    previous: InitVar[Snapshot | None] = None

    def __post_init__(self, previous: Snapshot | None) -> None:
        if previous is not None and _same_indexes(previous.inbound, self.inbound):
            object.__setattr__(self, "domains", previous.domains)
            object.__setattr__(self, "ranges", previous.ranges)
        else:
            live = [(i, c) for i, c in enumerate(self.inbound) if c.enabled]
            domains = {
                Scope.SENDER: DomainIndex((i, p) for i, c in live for p in c.sender_domains),
                Scope.RECIPIENT: DomainIndex((i, p) for i, c in live for p in c.recipient_domains),
                Scope.HEADER_FROM: DomainIndex((i, p) for i, c in live for p in c.header_from_domains),
            }
            object.__setattr__(self, "domains", MappingProxyType(domains))
            object.__setattr__(
                self,
                "ranges",
                RangeIndex((i, n) for i, c in live if c.scopes_ranges for n in c.client_ranges),
            )
        object.__setattr__(
            self, "by_name", MappingProxyType({c.name: c for c in self.inbound})
        )
        enforced = [c for c in self.inbound if c.enabled and c.mode is Mode.ENFORCE]
        object.__setattr__(self, "enforced_scopes", frozenset(
            scope for scope, attr in _SCOPE_FIELDS if any(getattr(c, attr) for c in enforced)
        ))


def empty_snapshot() -> Snapshot:
    return Snapshot(inbound=())

