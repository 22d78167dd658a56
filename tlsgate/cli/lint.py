"""``tlsgate lint``: every problem in the rule rows, with table, key and column."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tlsgate.cli.dns import lint_dns
from tlsgate.model import CertRequirement, TlsLevel
from tlsgate.snapshot import Snapshot
from tlsgate.store import RowProblem, load

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
    for problem in result.problems:
        print(problem)
    dns_warnings = lint_dns(ctx) if args.dns else []
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
