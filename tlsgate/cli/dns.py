"""``tlsgate dns show | refresh``: what the DNS address entries resolve to right now."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import dns.resolver

from tlsgate.dnsranges import DnsFailure, ResolverSettings, dns_entries, make_resolver, resolve_entry
from tlsgate.rules import resolver_settings
from tlsgate.store import load

if TYPE_CHECKING:
    from tlsgate.cli import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dns", help="resolve the address entries that name DNS (a:, mx:, spf:)")
    dsub = p.add_subparsers(dest="dns_command", metavar="ACTION", required=True)
    for name, text in (("show", "resolve every entry and show its ranges"),
                       ("refresh", "resolve every entry now (the daemons refresh by TTL on their own, "
                                   "and re-resolve every entry when reloaded)")):
        cmd = dsub.add_parser(name, help=text)
        cmd.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace, ctx: Context) -> int:
    snap = load(ctx.engine).snapshot
    settings = resolver_settings(ctx.config.dns)
    resolver = make_resolver(settings)
    entries = sorted(dns_entries(snap.inbound))
    if not entries:
        print("no address entries name DNS")
        return 0
    users: dict[str, list[str]] = {}
    for c in snap.inbound:
        for e in c.dns_entries:
            users.setdefault(e, []).append(c.name)
    status = 0
    for entry in entries:
        where = ", ".join(users[entry])
        try:
            r = resolve_entry(entry, resolver, settings)
        except DnsFailure as exc:
            print(f"{entry} ({where}): FAILED: {exc}")
            status = 1
            continue
        nets = ", ".join(str(n) for n in r.networks) or "no addresses"
        print(f"{entry} ({where}): {nets} (ttl {r.ttl}s)")
        for problem in r.problems:
            print(f"    note: {problem}")
    return status


def lint_dns(ctx: Context) -> list[str]:
    """Warnings for `tlsgate lint --dns`: entries that do not resolve or resolve to nothing, and
    what could not be followed inside one that did (an SPF include without a record, a loop,
    the lookup limit), one line per connector row, each entry asked once."""
    snap = load(ctx.engine).snapshot
    settings = resolver_settings(ctx.config.dns)
    resolver = make_resolver(settings)
    found: dict[str, list[str]] = {}
    lines: list[str] = []
    for c in snap.inbound:
        for entry in c.dns_entries:
            if entry not in found:
                found[entry] = _lint_entry(entry, resolver, settings)
            row = f"warning: inbound_address ('{c.name}', '{entry}') column address"
            lines.extend(f"{row}: {text}" for text in found[entry])
    return lines


def _lint_entry(entry: str, resolver: dns.resolver.Resolver, settings: ResolverSettings) -> list[str]:
    try:
        r = resolve_entry(entry, resolver, settings)
    except DnsFailure as exc:
        return [f"does not resolve: {exc}"]
    if not r.networks:
        return [f"resolves to no addresses ({'; '.join(r.problems)})"]
    return [f"resolves to {len(r.networks)} ranges, but {problem}" for problem in r.problems]
