"""``tlsgate explain``: which connector a session would meet, and why it passes or fails."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from tlsgate.cli import CommandError
from tlsgate.config import resolve_myorigin
from tlsgate.decisionlog import verdict_word
from tlsgate.dnsranges import DnsCache, apply_dns, dns_entries
from tlsgate.engine import decide, decide_header_from, with_myorigin
from tlsgate.model import Decision, Outcome, SessionFacts, Stage
from tlsgate.patterns import parse_address
from tlsgate.rules import resolver_settings
from tlsgate.snapshot import Snapshot
from tlsgate.store import load

if TYPE_CHECKING:
    from tlsgate.cli import Context


#: the protocol names Postfix reports for a TLS session (its ``encryption_protocol``)
_PROTOCOLS = ("SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


def _tls_protocol(text: str) -> str:
    """Postfix's spelling of a protocol given in any case: the engine compares these names, and
    one it does not know would be judged as some other version, not refused."""
    found = next((p for p in _PROTOCOLS if p.lower() == text.strip().lower()), None)
    if found is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(_PROTOCOLS)}")
    return found


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "explain",
        help="show how the rules judge a session",
        description="Show every connector whose scope matches the session, the one that decides, "
        "each of its requirements and the verdict. Omit --tls-protocol for a plaintext session.",
    )
    p.add_argument("--client", required=True, metavar="IP", help="client address")
    p.add_argument("--sender", default=None, metavar="ADDR", help="envelope sender; '' or '<>' for the null sender")
    p.add_argument("--recipient", metavar="ADDR", help="envelope recipient")
    p.add_argument("--header-from", metavar="ADDR", help="header From address (judged at end of message)")
    p.add_argument("--tls-protocol", type=_tls_protocol, metavar="VERSION",
                   help=f"one of {', '.join(_PROTOCOLS)}, as Postfix reports it; omit for no TLS")
    p.add_argument("--cipher", metavar="NAME", help="e.g. TLS_AES_256_GCM_SHA384")
    p.add_argument("--cipher-bits", type=int, default=None, metavar="N")
    p.add_argument("--cert-subject", metavar="CN", help="verified client certificate subject CN")
    p.add_argument("--cert-issuer", metavar="CN", help="verified client certificate issuer CN")
    p.add_argument("--cert-fingerprint", metavar="FP", help="client certificate fingerprint (AA:BB:...)")
    p.add_argument("--pubkey-fingerprint", metavar="FP", help="client public-key fingerprint")
    p.set_defaults(func=cmd_explain)


def facts_from_args(args: argparse.Namespace) -> SessionFacts:
    client = parse_address(args.client)
    if client is None:
        raise CommandError(f"--client {args.client!r} is not an IPv4 or IPv6 address", 2)
    sender = args.sender
    if sender is not None:
        sender = sender.strip()
        if sender in ("<>", ""):
            sender = ""
        elif sender.startswith("<") and sender.endswith(">"):
            sender = sender[1:-1]
    protocol = args.tls_protocol or None
    bits = args.cipher_bits
    if bits is None:
        bits = 256 if protocol else 0
    if bits < 0:
        raise CommandError("--cipher-bits must not be negative", 2)
    if not protocol and (args.cipher or args.cert_subject or args.cert_fingerprint):
        raise CommandError("--cipher and certificate options need --tls-protocol", 2)
    return SessionFacts(
        client_address=client,
        sender=sender,
        recipient=args.recipient,
        header_from=args.header_from,
        tls_protocol=protocol,
        tls_cipher=args.cipher,
        tls_cipher_bits=bits,
        cert_subject=args.cert_subject or None,
        cert_issuer=args.cert_issuer or None,
        cert_fingerprint=(args.cert_fingerprint or "").upper() or None,
        pubkey_fingerprint=(args.pubkey_fingerprint or "").upper() or None,
        stage=Stage.DATA if args.header_from else Stage.RCPT,
    )


def _rank_text(rank: tuple[object, ...]) -> str:
    names = ("sender", "header-from", "recipient")
    kinds = {0: "*", 1: "wildcard", 2: "exact"}
    parts = []
    for label, spec in zip(names, rank[:3], strict=False):
        if isinstance(spec, tuple) and spec[0] >= 0:
            parts.append(f"{label} {kinds[int(spec[0])]}/{spec[1]} labels")
    plen = rank[3]
    if isinstance(plen, int) and plen >= 0:
        parts.append(f"range /{plen}")
    return ", ".join(parts)


def render(facts: SessionFacts, decision: Decision) -> list[str]:
    lines = []
    sender = "(none)" if facts.sender is None else f"<{facts.sender}>"
    lines.append(
        f"session: client={facts.client_address} from={sender} to=<{facts.recipient or ''}>"
        + (f" header-from=<{facts.header_from}>" if facts.header_from else "")
    )
    if facts.tls_protocol:
        lines.append(
            f"  TLS {facts.tls_protocol} cipher={facts.tls_cipher or '-'} bits={facts.tls_cipher_bits} "
            f"cert={facts.cert_subject or '-'} issuer={facts.cert_issuer or '-'}"
        )
    else:
        lines.append("  no TLS")
    if not decision.candidates and decision.outcome is Outcome.FAIL:
        # No connector could be told (an address without a domain, a recipient routed on):
        # the reason is the address itself.
        lines.append("candidates: none can be told")
        lines.extend(f"  [FAIL] {check.requirement}: {check.detail}" for check in decision.checks)
    elif not decision.candidates:
        lines.append("candidates: none; no connector applies (opportunistic TLS)")
    else:
        lines.append("candidates (best first):")
        winner = decision.connector or decision.candidates[0].connector
        for cand in decision.candidates:
            mark = "*" if cand.connector is winner else " "
            c = cand.connector
            flags = []
            if c.mode.value == "monitor":
                flags.append("monitor")
            if c.misconfigured:
                flags.append("MISCONFIGURED")
            extra = f" [{', '.join(flags)}]" if flags else ""
            lines.append(f"  {mark} {c.name}{extra}: matched {'; '.join(cand.matched)} ({_rank_text(cand.rank)})")
        first = decision.candidates[0].connector
        if winner is not first:
            lines.append(f"winner: {winner.name}, enforcing: {first.name} is in monitor mode and lifts no requirement")
        else:
            others = [c.connector.name for c in decision.candidates[1:]]
            lines.append(f"winner: {winner.name}" + (f", overriding {', '.join(others)}" if others else ""))
        if decision.checks:
            lines.append("requirements:")
            for check in decision.checks:
                lines.append(f"  [{'pass' if check.ok else 'FAIL'}] {check.requirement}: {check.detail}")
    lines.append(f"verdict: {_verdict_text(decision)}")
    return lines


def _verdict_text(decision: Decision) -> str:
    word = verdict_word(decision).upper()
    return f"{word} {decision.status} {decision.reason}" if decision.status else word


def cmd_explain(args: argparse.Namespace, ctx: Context) -> int:
    facts = facts_from_args(args)
    snap = load(ctx.engine).snapshot
    lines: list[str] = []
    wanted = dns_entries(snap.inbound)
    if wanted:
        # Resolve now, as a daemon would have: the decision then uses the same ranges.
        cache = DnsCache(resolver_settings(ctx.config.dns))
        cache.refresh(sorted(wanted))
        snap = Snapshot(inbound=apply_dns(snap.inbound, cache), outbound=snap.outbound,
                        generation=snap.generation, errors=snap.errors)
        lines.append("DNS address entries:")
        for entry in sorted(wanted):
            got = cache.entries.get(entry)
            if got is None:
                lines.append(f"  {entry}: NOT RESOLVED (its connector defers)")
            else:
                age = time.time() - got.resolved_at
                nets = ", ".join(str(n) for n in got.networks) or "no addresses"
                lines.append(f"  {entry}: {nets} (resolved {age:.0f}s ago, ttl {got.ttl}s)")
    if any(a and "@" not in a and a.strip("<> ") for a in (facts.sender, facts.recipient)):
        facts = with_myorigin(facts, resolve_myorigin(ctx.config.engine))
    now = datetime.now(UTC)
    if not facts.header_from:
        rendered = render(facts, decide(snap, facts, now))
        print("\n".join([*rendered[:2], *lines, *rendered[2:]]))
        return 0
    # As the milter judges a message: each recipient at RCPT, where no header From is known,
    # then the author by the header-From connectors alone; the stronger refusal stands.
    at_rcpt = decide(snap, replace(facts, header_from=None, stage=Stage.RCPT), now)
    at_end = decide_header_from(snap, facts, now)
    rendered = render(facts, at_rcpt)
    print("\n".join([*rendered[:2], *lines, "at RCPT (every connector but those scoped by the header From):",
                     *_indented(rendered[2:]), "at end of message (the connectors scoped by the header From):",
                     *_indented(render(facts, at_end)[2:])]))
    final = at_end if at_end.severity > at_rcpt.severity else at_rcpt
    print(f"verdict: {_verdict_text(final)}")
    return 0


def _indented(lines: list[str]) -> list[str]:
    return [f"  {line}" for line in lines]


