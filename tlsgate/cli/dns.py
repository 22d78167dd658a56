"""``tlsgate dns show | refresh``: what the DNS address entries resolve to right now."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tlsgate.dnsranges import DnsCache, DnsFailure, dns_entries, make_resolver, resolve_entry
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
    """Warnings for entries that do not resolve, for `tlsgate lint --dns`."""
    snap = load(ctx.engine).snapshot
    cache = DnsCache(resolver_settings(ctx.config.dns))
    lines = []
    for c in snap.inbound:
        for entry in c.dns_entries:
            try:
                r = resolve_entry(entry, make_resolver(cache.settings), cache.settings)
            except DnsFailure as exc:
                lines.append(f"warning: inbound_address ('{c.name}', '{entry}') column address: does not resolve: {exc}")
                continue
            if not r.networks:
                lines.append(f"warning: inbound_address ('{c.name}', '{entry}') column address: resolves to no "
                             f"addresses ({'; '.join(r.problems)})")
    return lines
