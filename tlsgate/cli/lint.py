"""``tlsgate lint``: every problem in the rule rows, with table, key and column."""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from tlsgate.cli.dns import lint_dns
from tlsgate.model import CertRequirement, InboundConnector, Mode, OutboundConnector, TlsLevel
from tlsgate.outbound import pinned_prints
from tlsgate.patterns import DomainKind
from tlsgate.snapshot import Snapshot
from tlsgate.store import RowProblem, load, server_warnings

if TYPE_CHECKING:
    from tlsgate.cli import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("lint", help="check every rule row; exit 1 when there are errors")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument(
        "--expiry-days", type=_days, default=30, metavar="N",
        help="warn when a pinned certificate expires within N days (default 30); "
        "an expired one is always an error",
    )
    p.add_argument("--dns", action="store_true",
                   help="also resolve address entries that name DNS and warn about those that do not resolve")
    p.set_defaults(func=cmd_lint)


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if not 0 <= value <= 3650:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 3650 days")
    return value


def cmd_lint(args: argparse.Namespace, ctx: Context) -> int:
    result = load(ctx.engine, expiry_days=args.expiry_days)
    result.problems.extend(_setting_warnings(result.snapshot, ctx.config.milter.pinned_action))
    result.problems.extend(tie_warnings(result.snapshot))
    result.problems.extend(shadow_warnings(result.snapshot))
    for problem in result.problems:
        print(problem)
    dns_warnings = [f"warning: {w}" for w in server_warnings(ctx.engine)]
    dns_warnings += lint_dns(ctx) if args.dns else []
    for line in dns_warnings:
        print(line)
    errors = len(result.errors)
    warnings = len(result.problems) - errors + len(dns_warnings)
    snap = result.snapshot
    print(
        f"{len(snap.inbound)} inbound and {len(snap.outbound)} outbound connectors checked: "
        f"{errors} errors, {warnings} warnings"
    )
    if errors or (args.strict and warnings):
        return 1
    return 0


def _setting_warnings(snap: Snapshot, pinned_action: str) -> Iterator[RowProblem]:
    """Connectors whose settings the daemons cannot hold as they read."""
    for c in snap.inbound:
        if not (c.enabled and c.certificate is CertRequirement.PINNED):
            continue
        if pinned_action == "tempfail":
            # A milter never sees a certificate fingerprint under Postfix: tlsgate-milter
            # answers 4xx for these connectors unless the policy daemon is trusted with them.
            yield _warning("inbound_connector", c.name, "certificate",
                           "is 'pinned', which only tlsgate-policyd can check: tlsgate-milter defers this "
                           "connector's mail ([milter] pinned_action = tempfail); enforce it with "
                           "tlsgate-policyd and set pinned_action = policyd")
        elif c.header_from_domains:
            # The policy daemon never sees the header From: the milter defers these whatever
            # pinned_action says.
            yield _warning("inbound_connector", c.name, "certificate",
                           "is 'pinned' and scoped by the header From, which only tlsgate-milter sees and which "
                           "it cannot check against pinned certificates: it defers this connector's mail; "
                           "use certificate 'trusted' with names for it")
    for o in snap.outbound:
        # Postfix's "dane" falls back to "may" where DANE cannot apply (smtp_tls_policy.c,
        # dane_init): no TLSA records, an MX not signed with DNSSEC, or DNSSEC lookups off
        # (which doctor checks).
        if o.enabled and o.tls_level is TlsLevel.DANE:
            yield _warning("outbound_connector", o.name, "tls_level",
                           "is 'dane', which Postfix treats as opportunistic TLS wherever the partner publishes "
                           "no TLSA records (or its MX records are not DNSSEC-signed): mail then leaves in "
                           "plaintext when the partner's STARTTLS is missing or fails; use 'dane-only' to have "
                           "it deferred instead")


def _warning(table: str, name: str, column: str, message: str) -> RowProblem:
    return RowProblem("warning", table, (name,), column, message, name)


# --------------------------------------------------------------------------- ties

#: an inbound connector's scopes, by their index in _scopes: the three domain scopes, then the
#: client ranges where they select sessions (not where they restrict a domain-scoped connector)
_SCOPE_NAMES = ("sender", "header_from", "recipient", "address")


def _ranges_scope(c: InboundConnector) -> bool:
    """Whether the connector's addresses select sessions; DNS entries count before they resolve."""
    return bool(c.client_ranges or c.dns_entries) and not (c.restrict_to_ranges and c.has_domain_scope)


def _scopes(c: InboundConnector) -> tuple[frozenset[str], ...]:
    """Each scope's patterns as text, in the order of _SCOPE_NAMES (no ranges where they restrict)."""
    ranges = frozenset(map(str, c.client_ranges)) | frozenset(c.dns_entries) if _ranges_scope(c) else frozenset()
    return (frozenset(map(str, c.sender_domains)), frozenset(map(str, c.header_from_domains)),
            frozenset(map(str, c.recipient_domains)), ranges)


def _tie_keys(c: InboundConnector) -> Iterator[str]:
    """One key per pattern of the connector: which scopes it has, the scope, the pattern. Plain
    strings, so that 100,000 connectors leave the garbage collector nothing to scan."""
    ranges = _ranges_scope(c)
    scoped = (c.sender_domains, c.header_from_domains, c.recipient_domains)
    shape = "".join("1" if s else "0" for s in (*scoped, ranges))
    for i, patterns in enumerate(scoped):
        for pattern in patterns:
            yield f"{shape} {i} {pattern}"
    if ranges:
        for entry in (*map(str, c.client_ranges), *c.dns_entries):
            yield f"{shape} 3 {entry}"


def _inbound_requirements(c: InboundConnector) -> InboundConnector:
    """The connector without its name, comment and scope: what it asks of the mail it wins."""
    scoping = _ranges_scope(c)
    return replace(c, name="", comment="", sender_domains=(), header_from_domains=(), recipient_domains=(),
                   client_ranges=() if scoping else c.client_ranges, dns_entries=() if scoping else c.dns_entries,
                   problems=("misconfigured",) if c.problems else ())


def tie_warnings(snap: Snapshot) -> Iterator[RowProblem]:
    """Enabled connectors that rank equal for some mail and ask different things of it.

    The tie rule (the name that sorts first wins) is documented and relied on, so a tie is
    legal; but when the two ask different things, the one that applies was chosen by its name,
    which is rarely what was meant (a connector added with a name that sorts first silently
    lifts a partner's forced TLS). Connectors are grouped by their pattern in each scope, so
    this stays linear in their number."""
    yield from _inbound_ties(sorted((c for c in snap.inbound if c.enabled), key=lambda c: c.name))
    yield from _outbound_ties(sorted((o for o in snap.outbound if o.enabled), key=lambda o: o.name), snap.by_name)


def _inbound_ties(live: Sequence[InboundConnector]) -> Iterator[RowProblem]:
    """Two connectors rank equal for mail that meets the same pattern in each scope they have,
    and only then (a connector with a scope more ranks above one without it)."""
    first: dict[str, int] = {}  # each key's first connector; most keys have no other
    tied: dict[str, list[int]] = {}
    for n, c in enumerate(live):
        for key in _tie_keys(c):
            held = first.setdefault(key, n)
            if held != n and tied.setdefault(key, [held])[-1] != n:
                tied[key].append(n)
    shared: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for key, indexes in tied.items():
        _shape, scope, pattern = key.split(" ", 2)
        members = [(live[n], _scopes(live[n])) for n in indexes]
        head = members[0]
        # A winner in monitor mode lets the first enforcing connector judge first (docs/rules.md):
        # that one, not the monitor, is what an enforcing connector of the tie gives way to.
        enforcing = next((m for m in members if m[0].mode is Mode.ENFORCE), None)
        for member in members[1:]:
            ref = enforcing if head[0].mode is Mode.MONITOR and member[0].mode is Mode.ENFORCE else head
            if ref is None or ref[0] is member[0]:
                continue
            (winner, wscopes), (loser, lscopes) = ref, member
            if not all(w & s for w, s in zip(wscopes, lscopes, strict=True) if w):
                continue  # no mail meets both at the same rank in every scope
            if _inbound_requirements(winner) != _inbound_requirements(loser):
                shared[(winner.name, loser.name)].append((int(scope), pattern))
    for (winner_name, loser_name), found in shared.items():
        found.sort()
        i, shown = found[0]
        row: tuple[str, tuple[object, ...], str] = (
            ("inbound_address", (loser_name, shown), "address") if _SCOPE_NAMES[i] == "address"
            else ("inbound_domain", (loser_name, _SCOPE_NAMES[i], shown), "pattern"))
        what = ", ".join(f"{_SCOPE_NAMES[j]} {p}" for j, p in found)
        yield RowProblem("warning", *row,
                         f"ties with inbound connector {winner_name} ({what}: the same rank) and their requirements "
                         f"differ: {winner_name} wins because its name sorts first, so {loser_name}'s requirements "
                         "never apply to that mail; make one pattern more specific, or disable one of them",
                         loser_name)


def _outbound_requirements(o: OutboundConnector, partners: Mapping[str, InboundConnector]) -> tuple[object, ...]:
    """What a connector's answers are made of: its settings, and the certificates it pins."""
    prints = frozenset(pinned_prints(o.name, partners)) if o.tls_level is TlsLevel.FINGERPRINT else frozenset()
    return (replace(o, name="", comment="", recipient_domains=()), prints)


def _outbound_ties(live: Sequence[OutboundConnector], partners: Mapping[str, InboundConnector]) -> Iterator[RowProblem]:
    """Connectors with the same recipient domain pattern: a misconfigured one wins (its mail
    waits, and its own error says why), otherwise the name that sorts first."""
    groups: dict[str, list[OutboundConnector]] = defaultdict(list)
    for o in live:
        for pattern in dict.fromkeys(map(str, o.recipient_domains)):
            groups[pattern].append(o)
    for pattern, members in groups.items():
        if len(members) < 2 or any(o.problems for o in members):
            continue
        winner = members[0]
        wanted = _outbound_requirements(winner, partners)
        for loser in members[1:]:
            if _outbound_requirements(loser, partners) != wanted:
                yield RowProblem("warning", "outbound_domain", (loser.name, pattern), "pattern",
                                 f"ties with outbound connector {winner.name} (the same recipient domain pattern) and "
                                 f"their TLS policies or smart hosts differ: {winner.name} wins because its name sorts "
                                 f"first, so {loser.name}'s settings never apply to mail for {pattern}; remove the "
                                 "pattern from one of them, or disable one", loser.name)


def shadow_warnings(snap: Snapshot) -> Iterator[RowProblem]:
    """Connectors that a catch-all for every sender outranks for all mail but the null sender.

    A sender scope ranks first, even one for ``*`` (docs/rules.md): with an enforcing ``*``
    sender connector in force, a connector scoped by recipients or client ranges alone decides
    only for ``<>``, whatever it requires. Giving it a sender scope of ``*`` as well makes it
    rank above the catch-all for its own mail."""
    catch_all = next((c for c in sorted(snap.inbound, key=lambda c: c.name)
                      if c.enabled and c.mode is Mode.ENFORCE
                      and any(p.kind is DomainKind.ANY for p in c.sender_domains)
                      and not (c.recipient_domains or c.header_from_domains or _ranges_scope(c))), None)
    if catch_all is None:
        return
    wanted = _inbound_requirements(catch_all)
    for c in snap.inbound:
        if (not c.enabled or c.sender_domains or not (c.recipient_domains or _ranges_scope(c))
                or _inbound_requirements(c) == wanted):
            continue
        yield _warning("inbound_connector", c.name, "name",
                       f"connector {catch_all.name} covers every sender ('*') and a sender scope ranks first, so "
                       f"{c.name}, scoped by {'recipients' if c.recipient_domains else 'client addresses'} alone, "
                       f"decides only for the null sender <>; give {c.name} the sender pattern '*' too, so that it "
                       f"ranks above {catch_all.name} for its own mail")
