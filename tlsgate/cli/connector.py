"""``tlsgate connector list | show NAME``: the connectors as the daemons see them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tlsgate.cli import CommandError
from tlsgate.model import InboundConnector, OutboundConnector
from tlsgate.store import load

if TYPE_CHECKING:
    from tlsgate.cli import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("connector", help="list or show connectors")
    csub = p.add_subparsers(dest="connector_command", metavar="ACTION", required=True)
    lst = csub.add_parser("list", help="one line per connector")
    lst.set_defaults(func=cmd_list)
    show = csub.add_parser("show", help="every setting of one connector")
    show.add_argument("name")
    show.set_defaults(func=cmd_show)


def _scope(c: InboundConnector) -> str:
    parts = []
    if c.sender_domains:
        parts.append("from " + ",".join(str(p) for p in c.sender_domains))
    if c.header_from_domains:
        parts.append("header-from " + ",".join(str(p) for p in c.header_from_domains))
    if c.recipient_domains:
        parts.append("to " + ",".join(str(p) for p in c.recipient_domains))
    if c.client_ranges:
        word = "only-from" if c.restrict_to_ranges and c.has_domain_scope else "client"
        parts.append(f"{word} " + ",".join(str(n) for n in c.client_ranges))
    return "; ".join(parts) or "(no scope)"


def _needs(c: InboundConnector) -> str:
    parts = []
    if c.require_tls:
        parts.append("tls")
    if c.min_tls_version:
        parts.append(f">={c.min_tls_version}")
    if c.require_forward_secrecy:
        parts.append("pfs")
    if c.min_cipher_bits:
        parts.append(f"bits>={c.min_cipher_bits}")
    if c.certificate.value != "none":
        parts.append(f"cert={c.certificate.value}")
    if c.cert_names:
        parts.append("name=" + ",".join(str(p) for p in c.cert_names))
    if c.issuer_names:
        parts.append("issuer=" + ",".join(str(p) for p in c.issuer_names))
    return " ".join(parts) or "nothing"


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    snap = load(ctx.engine).snapshot
    for c in snap.inbound:
        state = "disabled" if not c.enabled else ("MISCONFIGURED" if c.misconfigured else c.mode.value)
        print(f"inbound  {c.name:<24} {state:<13} {c.on_failure.value:<6} {_scope(c)} => {_needs(c)}")
    for o in snap.outbound:
        state = "disabled" if not o.enabled else ("MISCONFIGURED" if o.problems else "enabled")
        hosts = ",".join(f"[{h.host}]:{h.port}" for h in o.smart_hosts) or "MX"
        doms = ",".join(str(p) for p in o.recipient_domains) or "(no domains)"
        print(f"outbound {o.name:<24} {state:<13} {o.tls_level.value:<6} to {doms} via {hosts}")
    if not snap.inbound and not snap.outbound:
        print("no connectors: every session is opportunistic TLS")
    return 0


def describe_inbound(c: InboundConnector) -> list[str]:
    lines = [
        f"inbound connector {c.name}",
        f"  enabled:            {'yes' if c.enabled else 'no'}",
        f"  mode:               {c.mode.value}",
        f"  comment:            {c.comment or '-'}",
        f"  sender domains:     {', '.join(str(p) for p in c.sender_domains) or '-'}",
        f"  recipient domains:  {', '.join(str(p) for p in c.recipient_domains) or '-'}",
        f"  header From:        {', '.join(str(p) for p in c.header_from_domains) or '-'}",
        f"  client ranges:      {', '.join(str(n) for n in c.client_ranges) or '-'}"
        + (" (restricts the domains to these ranges)" if c.restrict_to_ranges else ""),
        f"  require TLS:        {'yes' if c.require_tls else 'no'}",
        f"  minimum TLS:        {c.min_tls_version or '-'}",
        f"  forward secrecy:    {'required' if c.require_forward_secrecy else '-'}",
        f"  minimum cipher:     {c.min_cipher_bits or '-'}",
        f"  certificate:        {c.certificate.value}",
        f"  certificate names:  {', '.join(str(p) for p in c.cert_names) or '-'}",
        f"  issuer names:       {', '.join(str(p) for p in c.issuer_names) or '-'}",
    ]
    if c.certificate.value == "pinned":
        lines.append(f"  organization:       {c.require_organization or '-'}")
        lines.append(f"  organizational unit:{' ' if c.require_unit else ''}{c.require_unit or ' -'}")
        lines.append(f"  minimum key bits:   {c.min_key_bits or 2048}")
        for pin in c.pins:
            lines.append(
                f"  pinned:             {pin.label} CN={pin.subject_cn} {pin.key_type} {pin.key_bits} "
                f"until {pin.not_after:%Y-%m-%d}"
            )
    lines.append(f"  on failure:         {c.on_failure.value}" + (f" ({c.reply_text})" if c.reply_text else ""))
    for problem in c.problems:
        lines.append(f"  PROBLEM:            {problem}")
    return lines


def describe_outbound(o: OutboundConnector) -> list[str]:
    lines = [
        f"outbound connector {o.name}",
        f"  enabled:            {'yes' if o.enabled else 'no'}",
        f"  comment:            {o.comment or '-'}",
        f"  recipient domains:  {', '.join(str(p) for p in o.recipient_domains) or '-'}",
        f"  TLS level:          {o.tls_level.value}",
        f"  match names:        {', '.join(o.match_names) or '-'}",
        f"  minimum TLS:        {o.min_tls_version or '-'}",
        f"  smart hosts:        {', '.join(f'{h.host}:{h.port}' for h in o.smart_hosts) or '- (MX)'}",
    ]
    for problem in o.problems:
        lines.append(f"  PROBLEM:            {problem}")
    return lines


def cmd_show(args: argparse.Namespace, ctx: Context) -> int:
    snap = load(ctx.engine).snapshot
    found = False
    for c in snap.inbound:
        if c.name == args.name:
            print("\n".join(describe_inbound(c)))
            found = True
    for o in snap.outbound:
        if o.name == args.name:
            print("\n".join(describe_outbound(o)))
            found = True
    if not found:
        raise CommandError(f"no connector named {args.name!r} (see `tlsgate connector list`)")
    return 0
