"""The decision: session facts and a rule snapshot in, a verdict out, no I/O.

Every front-end (policy daemon, milter, ``tlsgate explain``) calls :func:`decide`; the milter
also calls :func:`decide_header_from` at end of message. The steps:

1. find the enabled connectors whose every declared scope matches the session (sender
   domain, recipient domain, header From domain, client range);
2. rank them: the sender scope's specificity first, then header From, then recipient, then
   the client range's prefix length; exact beats ``*.parent`` beats ``*``; ties go to the
   name that sorts first. The best one decides, so a specific connector overrides a broad one,
   unless it is in monitor mode: then the best enforcing connector judges first, and only
   when it passes does the monitor connector's verdict stand;
3. check the winner's requirements; the first unmet one is the reason;
4. map the connector's mode and failure action to what the front-end must do.

No matching connector means opportunistic TLS: pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

from tlsgate.model import (
    Candidate,
    CertRequirement,
    Check,
    Decision,
    FailAction,
    InboundConnector,
    Mode,
    Outcome,
    Pin,
    Scope,
    SessionFacts,
    Stage,
)
from tlsgate.patterns import address_domain, judged_domain, loose_domain, raw_domain
from tlsgate.snapshot import DomainIndex, Snapshot, range_contains

# RFC 3463 status details, per kind of unmet requirement.
STATUS_ENCRYPTION = "7.10"  # X.7.10 Encryption needed
STATUS_POLICY = "7.1"  # X.7.1 Delivery not authorized
STATUS_CONFIG = "3.5"  # X.3.5 System incorrectly configured
# An address without a domain, by where it stands: (scope, status, the Postfix restriction that refuses it)
_BARE = ((Scope.SENDER, "4.1.7", "reject_non_fqdn_sender"), (Scope.RECIPIENT, "4.1.3", "reject_non_fqdn_recipient"))

DEFAULT_MIN_KEY_BITS = 2048  # RSA bits, or the RSA-equivalent strength of other keys

_NO_MATCH = (-1, 0)
_UNKNOWN_RANGE = 129  # above every prefix length: a range not known yet ranks first
_VERSION = re.compile(r"^(?:TLSv(\d+)(?:\.(\d+))?|SSLv(\d+))$")
_FS_CIPHER = re.compile(r"^(?:TLS_)?(?:ECDHE|DHE|EECDH|EDH)[-_]", re.IGNORECASE)


def version_key(name: str) -> tuple[int, int] | None:
    """``TLSv1.2`` -> (1, 2); ``SSLv3`` -> (0, 3); None for names that are not versions."""
    m = _VERSION.match(name.strip())
    if not m:
        return None
    if m.group(3) is not None:
        return (0, int(m.group(3)))
    return (int(m.group(1)), int(m.group(2) or 0))


def has_forward_secrecy(protocol: str, cipher: str | None) -> bool:
    """TLS 1.3 always has it; before that, only ephemeral (EC)DH key exchange."""
    key = version_key(protocol)
    if key is not None and key >= (1, 3):
        return True
    return bool(cipher and _FS_CIPHER.match(cipher))


def find_candidates(snapshot: Snapshot, facts: SessionFacts) -> list[Candidate]:
    """Every enabled connector whose scope matches, best first."""
    sender_domain = address_domain(facts.sender) if facts.sender else None
    rcpt_domain = address_domain(facts.recipient) if facts.recipient else None
    header_domain = (
        address_domain(facts.header_from)
        if facts.header_from and facts.stage is Stage.DATA
        else None
    )
    domains = snapshot.domains
    sender_hits = _hits(domains[Scope.SENDER], sender_domain, facts.sender)
    rcpt_hits = _hits(domains[Scope.RECIPIENT], rcpt_domain, facts.recipient)
    header_hits = (_hits(domains[Scope.HEADER_FROM], header_domain, facts.header_from)
                   if facts.stage is Stage.DATA else {})
    # An unknown client address (XCLIENT ADDR=[UNAVAILABLE]) may be in any range: every range
    # connector is met, ranked first among equals, and judged by _judge as undecidable.
    address = facts.client_address
    range_hits = snapshot.ranges.lookup(address) if address else snapshot.ranges.everyone(_UNKNOWN_RANGE)

    found: list[Candidate] = []
    values = (sender_domain, header_domain, rcpt_domain, facts.client_address)
    ids = set(range_hits).union(sender_hits, rcpt_hits, header_hits)
    for idx in ids:
        c = snapshot.inbound[idx]
        if c.sender_domains and idx not in sender_hits:
            continue
        if c.recipient_domains and idx not in rcpt_hits:
            continue
        if c.header_from_domains and idx not in header_hits:
            continue
        if c.scopes_ranges and idx not in range_hits:
            continue
        if not (c.has_domain_scope or c.scopes_ranges):
            continue
        prefix = range_hits.get(idx, -1)
        if prefix >= 0 and c.dns_entries and c.awaits_dns:
            # It covers every client until its entries resolve; ranked by that /0, it would lose
            # to any narrower range connector, whose requirements are not its own.
            prefix = _UNKNOWN_RANGE
        rank = (
            sender_hits.get(idx, _NO_MATCH),
            header_hits.get(idx, _NO_MATCH),
            rcpt_hits.get(idx, _NO_MATCH),
            prefix,
        )
        found.append(Candidate(c, rank, values))
    if len(found) > 1:
        found.sort(key=lambda cand: cand.connector.name)
        found.sort(key=lambda cand: cand.rank, reverse=True)
    return found


def _hits(index: DomainIndex, domain: str | None, address: str | None) -> dict[int, tuple[int, int]]:
    """The connectors of one scope that ``address`` (its normalised ``domain``) meets. An
    address whose domain is written but is no domain name meets every ``*`` pattern, which
    stands for all mail, and the ``*.parent`` patterns of its parents when only its characters
    are amiss (``mx_1.partner.test`` is under partner.test); an address literal
    (``[192.0.2.1]``) meets ``*`` alone."""
    if domain:
        return index.lookup(domain)
    raw = raw_domain(address) if address else ""
    if not raw:
        return {}
    loose = loose_domain(raw)
    return index.lookup(loose) if loose else index.lookup_any()


def _needs_tls(c: InboundConnector) -> bool:
    return (
        c.require_tls
        or c.min_tls_version is not None
        or c.require_forward_secrecy
        or c.min_cipher_bits > 0
        or c.certificate is not CertRequirement.NONE
        or bool(c.cert_names or c.issuer_names)
    )


def _pin_checks(c: InboundConnector, facts: SessionFacts, now: datetime) -> list[tuple[Check, str]]:
    """Judge the presented certificate by the registered certificate it is.

    A certificate fingerprint that is registered decides alone: the partner presents exactly
    that certificate, so its own validity and names count (an expired certificate stays
    refused even when a renewal with the same key is registered too). Otherwise a registered
    public-key fingerprint identifies the partner's key (a renewal that was not registered
    yet): any registered certificate with that key that is fully acceptable passes. Pins hold
    every digest Postfix may be set to (sha256, sha1, md5, sha224, sha384, sha512), so each is
    recognised.
    """
    cert_fp = facts.cert_fingerprint.strip().upper() if facts.cert_fingerprint else None
    key_fp = facts.pubkey_fingerprint.strip().upper() if facts.pubkey_fingerprint else None
    if not (cert_fp or key_fp):
        return [(Check("pinned certificate", False, "no client certificate presented"), STATUS_POLICY)]
    exact = [p for p in c.pins if cert_fp and cert_fp in p.cert_fingerprints]
    same_key = [p for p in c.pins if key_fp and key_fp in p.pubkey_fingerprints]
    matching = exact or same_key
    if not matching:
        fp = cert_fp or key_fp or ""
        return [
            (
                Check(
                    "pinned certificate",
                    False,
                    f"certificate {fp[:23]}... is not registered with connector {c.name}",
                ),
                STATUS_POLICY,
            )
        ]
    # Several registered certificates may share the key (renewals): any one that is fully
    # acceptable passes; otherwise report the problems of the first.
    best: list[tuple[Check, str]] | None = None
    for pin in matching:
        checks = _check_pin(c, pin, now, by_key=not exact)
        if all(ch.ok for ch, _ in checks):
            return checks
        if best is None:
            best = checks
    assert best is not None
    return best


def _check_pin(c: InboundConnector, pin: Pin, now: datetime, by_key: bool) -> list[tuple[Check, str]]:
    out: list[tuple[Check, str]] = []
    valid = pin.not_before <= now <= pin.not_after
    what = f"pinned certificate {pin.label}" + (" (same public key)" if by_key else "")
    if now > pin.not_after:
        detail = f"{what} expired on {pin.not_after:%Y-%m-%d}"
    elif now < pin.not_before:
        detail = f"{what} is not valid before {pin.not_before:%Y-%m-%d}"
    else:
        detail = f"{what} valid until {pin.not_after:%Y-%m-%d}"
    out.append((Check("pinned certificate", valid, detail), STATUS_POLICY))
    if c.require_organization is not None:
        ok = (pin.organization or "").casefold() == c.require_organization.casefold()
        out.append(
            (
                Check(
                    "organization",
                    ok,
                    f"certificate organization {pin.organization or '(none)'!s}"
                    + (" matches" if ok else f" is not {c.require_organization}"),
                ),
                STATUS_POLICY,
            )
        )
    if c.require_unit is not None:
        # A subject may hold several OUs (older public certificates often do): any one will do.
        wanted = c.require_unit.casefold()
        unit = next((u for u in pin.units if u.casefold() == wanted), None)
        if unit is not None:
            detail = f"certificate organizational unit {unit} matches"
        elif len(pin.units) > 1:
            detail = f"certificate organizational units {', '.join(pin.units)}: none is {c.require_unit}"
        else:
            detail = f"certificate organizational unit {pin.units[0] if pin.units else '(none)'} is not {c.require_unit}"
        out.append((Check("organizational unit", unit is not None, detail), STATUS_POLICY))
    min_bits = c.min_key_bits if c.min_key_bits is not None else DEFAULT_MIN_KEY_BITS
    ok = rsa_equivalent_bits(pin.key_type, pin.key_bits) >= min_bits
    out.append(
        (
            Check(
                "key strength",
                ok,
                f"certificate key {pin.key_type} {pin.key_bits} bits"
                + ("" if pin.key_type == "RSA" else f" (about RSA {rsa_equivalent_bits(pin.key_type, pin.key_bits)})")
                + (f" meets {min_bits}" if ok else f" is weaker than {min_bits}"),
            ),
            STATUS_POLICY,
        )
    )
    if c.cert_names:
        names = [n for n in (pin.subject_cn, *pin.dns_names) if n]
        ok = any(p.matches(n) for p in c.cert_names for n in names)
        shown = ", ".join(names) or "(none)"
        pats = ", ".join(str(p) for p in c.cert_names)
        out.append(
            (
                Check(
                    "certificate name",
                    ok,
                    f"certificate name {shown} " + ("matches " if ok else "does not match ") + pats,
                ),
                STATUS_POLICY,
            )
        )
    if c.issuer_names:
        # The issuer of the leaf, and the intermediates and root when the chain was registered.
        issuers = [n for n in dict.fromkeys((pin.issuer_cn, *pin.chain_issuers)) if n]
        ok = any(p.matches(n) for p in c.issuer_names for n in issuers)
        out.append(
            (
                Check(
                    "issuer",
                    ok,
                    f"certificate issuer {', '.join(issuers) or '(none)'} "
                    + ("matches " if ok else "does not match ")
                    + ", ".join(str(p) for p in c.issuer_names),
                ),
                STATUS_POLICY,
            )
        )
    return out


def rsa_equivalent_bits(key_type: str, key_bits: int) -> int:
    """Strength of a key in RSA bits (NIST SP 800-57 part 1, table 2): an RSA key is its
    size; a P-256 key is worth about RSA 3072, P-384 about 7680, Ed25519 like P-256."""
    if key_type == "RSA":
        return key_bits
    if key_type not in ("EC", "Ed25519", "Ed448"):
        return 0  # unknown kinds of key are never strong enough
    if key_bits >= 512:
        return 15360
    if key_bits >= 384:
        return 7680
    if key_bits >= 256:
        return 3072
    if key_bits >= 224:
        return 2048
    return 1024


def check_requirements(
    c: InboundConnector, facts: SessionFacts, now: datetime
) -> list[tuple[Check, str]]:
    """Each requirement of ``c`` with whether ``facts`` meet it, paired with its status detail."""
    out: list[tuple[Check, str]] = []
    # Checked even when the ranges are empty (a DNS entry resolving to nothing): no client is inside.
    if c.restrict_to_ranges and c.has_domain_scope:
        addr = facts.client_address
        ok = addr is not None and range_contains(c.client_ranges, addr)
        out.append(
            (
                Check(
                    "client range",
                    ok,
                    f"client {addr} is "
                    + ("within" if ok else "outside")
                    + f" the ranges of connector {c.name}",
                ),
                STATUS_POLICY,
            )
        )
    if not _needs_tls(c):
        return out
    protocol = facts.tls_protocol
    out.append(
        (
            Check(
                "TLS",
                protocol is not None,
                f"TLS used ({protocol})" if protocol else f"TLS required by connector {c.name}",
            ),
            STATUS_ENCRYPTION,
        )
    )
    if c.min_tls_version is not None:
        want = version_key(c.min_tls_version)
        got = version_key(protocol) if protocol else None
        ok = want is not None and got is not None and got >= want
        out.append(
            (
                Check(
                    "TLS version",
                    ok,
                    f"{protocol or 'no TLS'} "
                    + ("meets" if ok else "is below")
                    + f" the minimum {c.min_tls_version}",
                ),
                STATUS_ENCRYPTION,
            )
        )
    if c.require_forward_secrecy:
        ok = protocol is not None and has_forward_secrecy(protocol, facts.tls_cipher)
        out.append(
            (
                Check(
                    "forward secrecy",
                    ok,
                    f"cipher {facts.tls_cipher or '(none)'} "
                    + ("has" if ok else "lacks")
                    + " forward secrecy",
                ),
                STATUS_ENCRYPTION,
            )
        )
    if c.min_cipher_bits > 0:
        ok = protocol is not None and facts.tls_cipher_bits >= c.min_cipher_bits
        out.append(
            (
                Check(
                    "cipher bits",
                    ok,
                    f"cipher strength {facts.tls_cipher_bits} bits "
                    + ("meets" if ok else "is below")
                    + f" {c.min_cipher_bits}",
                ),
                STATUS_ENCRYPTION,
            )
        )
    if c.certificate is CertRequirement.PINNED:
        out.extend(_pin_checks(c, facts, now))
        return out
    if c.certificate is CertRequirement.TRUSTED or c.cert_names or c.issuer_names:
        # Postfix names the subject and the issuer of a verified certificate only, each by its
        # CN (the issuer's O when it has none), and leaves out an empty one: a certificate
        # without a subject CN is still verified when its issuer is named.
        ok = facts.cert_subject is not None or facts.cert_issuer is not None
        shown = facts.cert_subject or f"without a subject CN, issued by {facts.cert_issuer},"
        out.append(
            (
                Check(
                    "trusted certificate",
                    ok,
                    f"certificate {shown} verified" if ok else "no client certificate that chains to a trusted CA",
                ),
                STATUS_POLICY,
            )
        )
    if c.cert_names:
        subject = facts.cert_subject
        ok = subject is not None and any(p.matches(subject) for p in c.cert_names)
        pats = ", ".join(str(p) for p in c.cert_names)
        out.append(
            (
                Check(
                    "certificate name",
                    ok,
                    f"certificate name {subject or '(none)'} "
                    + ("matches " if ok else "does not match ")
                    + pats,
                ),
                STATUS_POLICY,
            )
        )
    if c.issuer_names:
        issuer = facts.cert_issuer
        ok = issuer is not None and any(p.matches(issuer) for p in c.issuer_names)
        pats = ", ".join(str(p) for p in c.issuer_names)
        out.append(
            (
                Check(
                    "issuer",
                    ok,
                    f"certificate issuer {issuer or '(none)'} "
                    + ("matches " if ok else "does not match ")
                    + pats,
                ),
                STATUS_POLICY,
            )
        )
    return out


def _status(action: FailAction, detail: str) -> str:
    return ("5." if action is FailAction.REJECT else "4.") + detail


def _local_part_only(address: str | None) -> str | None:
    """The address when it is a local part with no domain (``<bob>``), else None."""
    if not address or "@" in address:
        return None
    addr = address.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    return addr or None


def with_myorigin(facts: SessionFacts, myorigin: str | None) -> SessionFacts:
    """``facts`` with a sender or recipient that has no domain completed as Postfix completes
    it after its restrictions (``RCPT TO:<bob>`` is delivered to bob@$myorigin), so that the
    connectors judge the address that will be delivered."""
    if myorigin is None:
        return facts
    sender = _local_part_only(facts.sender)
    recipient = _local_part_only(facts.recipient)
    # site!user and user%domain are not completed: Postfix may deliver them elsewhere.
    sender = None if sender is None or _elsewhere(sender) else sender
    recipient = None if recipient is None or _elsewhere(recipient) else recipient
    if sender is None and recipient is None:
        return facts
    return replace(
        facts,
        sender=f"{sender}@{myorigin}" if sender is not None else facts.sender,
        recipient=f"{recipient}@{myorigin}" if recipient is not None else facts.recipient,
    )


def _elsewhere(address: str) -> bool:
    """Whether Postfix will give ``address``, which has no @, a domain it does not show:
    ``site!user`` becomes user@site (swap_bangpath) and ``user%domain`` user@domain
    (allow_percent_hack) when trivial-rewrite makes it canonical, after the restrictions. An
    address with an @ is never rewritten so (rewrite.c); a recipient's may still be routed
    on, see :func:`_routes`."""
    return "@" not in address and ("!" in address or "%" in address)


# Routes judged at most; a recipient that goes on further waits (Postfix bounds its own loop).
_MAX_ROUTES = 10
# What Postfix's tokenizer drops when it opens a quoted local part and writes it back.
_QUOTES_AND_BLANKS = re.compile(r'[\s"]')


def _routes(recipient: str) -> list[str]:
    """The addresses Postfix may deliver ``recipient`` to instead of the one it shows.

    When the domain is one of this host's (mydestination and the like, which the engine cannot
    know), trivial-rewrite strips it and resolves what is left again where it names another
    hop: a further @ (``bob@partner.test@localhost``), a ``site!user`` (swap_bangpath) or a
    ``user%domain`` (allow_percent_hack), and so on while each new domain is local too
    (resolve.c). It opens a quoted local part and drops its quotes and blanks on the way
    (``"bob@partner . test"@localhost`` goes to bob@partner.test), and a source route first.
    Empty for every ordinary address; one more than :data:`_MAX_ROUTES` when it goes on further.
    """
    address = _QUOTES_AND_BLANKS.sub("", recipient.strip().strip("<>")).rstrip("@")
    if address.startswith("@") and ":" in address:
        address = address.partition(":")[2]  # @hop1,@hop2:user@domain
    routes: list[str] = []
    while "@" in address and len(routes) <= _MAX_ROUTES:
        local = address.rpartition("@")[0].rstrip("@")
        if "@" in local:
            address = local
        elif "!" in local:
            site, _, user = local.partition("!")
            address = f"{user}@{site}"
        elif "%" in local:
            user, _, domain = local.rpartition("%")
            address = f"{user}@{domain}"
        else:
            break
        routes.append(address)
    return routes


def _address_waits(status: str, reason: str, connector: InboundConnector | None = None) -> Decision:
    """A temporary failure because of what an address is, not of the session's TLS."""
    return Decision(Outcome.FAIL, FailAction.DEFER, connector, status, reason, reason, (Check("address", False, reason),))


def _unreadable_route(snapshot: Snapshot, route: str) -> Decision | None:
    """A temporary failure for a route whose domain is no name at all (Postfix bounces such an
    address at delivery), where a recipient connector is in force: judged by no domain, it
    would pass every one."""
    raw = raw_domain(route)
    if (not raw or raw.startswith("[") or judged_domain(route) is not None
            or Scope.RECIPIENT not in snapshot.enforced_scopes):
        return None
    reason = f"recipient <{route}> names no domain Postfix could deliver to, so the connector that applies cannot be told"
    return _address_waits("4.1.3", reason)


def _undecidable(snapshot: Snapshot, facts: SessionFacts) -> Decision | None:
    """A temporary failure for a sender or recipient whose domain cannot be told where a
    connector in force could have applied, since judging it by none would let it pass every
    connector: one without a domain (left so when Postfix's myorigin is not known, see
    :func:`with_myorigin`), one Postfix may deliver elsewhere (:func:`_elsewhere`), or a
    recipient at an address literal (``bob@[192.0.2.1]``, local when it is this host's). A bare
    ``postmaster`` recipient, which RFC 5321 says must be accepted, is left to pass."""
    for scope, status, restriction in _BARE:
        address = facts.sender if scope is Scope.SENDER else facts.recipient
        if not address or scope not in snapshot.enforced_scopes:
            continue
        shown = address.strip().strip("<>")
        if scope is Scope.RECIPIENT and raw_domain(shown).startswith("["):
            reason = (f"recipient <{shown}> names a host by its address, which Postfix delivers locally when it "
                      "is this host's, so the connector that applies cannot be told")
        elif _elsewhere(shown):
            reason = (f"{scope.value} <{shown}> may be delivered to another domain than it shows (Postfix's "
                      "allow_percent_hack, swap_bangpath), so the connector that applies cannot be told")
        elif _local_part_only(address) is not None:
            if scope is Scope.RECIPIENT and shown.lower() == "postmaster":
                continue
            reason = (f"{scope.value} <{shown}> has no domain, so the connector that applies cannot be told "
                      f"(set [engine] myorigin, or Postfix's {restriction} refuses such addresses)")
        else:
            continue
        return _address_waits(status, reason)
    return None


def decide(snapshot: Snapshot, facts: SessionFacts, now: datetime) -> Decision:
    """The verdict for one transaction (one recipient, when recipients are known)."""
    return _over_routes(snapshot, facts, now, _decide_one)


def _over_routes(snapshot: Snapshot, facts: SessionFacts, now: datetime,
                 judge: Callable[[Snapshot, SessionFacts, datetime], Decision]) -> Decision:
    """``judge``'s verdict for the recipient as it shows and, for one that Postfix may route on
    to another address (:func:`_routes`), for each address it may become. When none refuses,
    the one shown stands (or a monitor connector's view, if one has one); when all refuse, the
    weakest refusal, since which one applies is in doubt; when some would refuse and some would
    not, which one applies cannot be told, and the mail waits (4.1.3) rather than pass a
    connector.
    """
    shown = judge(snapshot, facts, now)
    recipient = facts.recipient
    if not recipient or not ("!" in recipient or "%" in recipient or recipient.count("@") > 1):
        return shown  # every ordinary address, at the cost of three searches
    routes = _routes(recipient)
    if not routes:
        return shown
    every = [(recipient.strip().strip("<>"), shown)]
    for route in routes[:_MAX_ROUTES]:
        every.append((route, _unreadable_route(snapshot, route)
                       or judge(snapshot, replace(facts, recipient=route), now)))
    if len(routes) > _MAX_ROUTES and Scope.RECIPIENT in snapshot.enforced_scopes:
        reason = f"recipient <{every[0][0]}> goes on through more than {_MAX_ROUTES} addresses"
        every.append((routes[-1], Decision(Outcome.FAIL, FailAction.DEFER, None, "4.1.3", reason, reason)))
    refusing = [(route, d) for route, d in every if d.action is not None]
    if not refusing:
        return next((d for _, d in every if d.outcome is Outcome.FAIL), shown)
    if len(refusing) == len(every):
        return min((d for _, d in every), key=lambda d: d.severity)
    (refused, by), passed = refusing[0], next(route for route, d in every if d.action is None)
    reason = (f"recipient <{every[0][0]}> may be delivered to another domain than it shows (Postfix strips a "
              f"domain of this host's and resolves what is left): as <{refused}>, connector {_name(by)} "
              f"refuses it ({by.reason}), as <{passed}> it would pass; so the connector that applies cannot be told")
    return _address_waits("4.1.3", reason, by.connector)


def unreadable_address(snapshot: Snapshot, scope: Scope, shown: str) -> Decision | None:
    """A temporary failure for a sender or recipient spelt with RFC 822 syntax (a comment,
    quotes, an escape, blanks: ``<a@contoso.test(x)>``) that the caller got without the MTA's
    reading of it, where a connector in force could have applied; None where none could.

    Postfix reads such a spelling with its own parser (``a@contoso.test``); read as written
    its domain is no domain name and would meet ``*`` connectors alone."""
    if scope not in snapshot.enforced_scopes:
        return None
    status = next(status for bare, status, _ in _BARE if bare is scope)
    reason = (f"{scope.value} <{shown[:200]}> is spelt with RFC 822 syntax (a comment, quotes, an escape or "
              "blanks) that only the MTA can read, so the connector that applies cannot be told")
    return _address_waits(status, reason)


def _name(decision: Decision) -> str:
    return decision.connector.name if decision.connector is not None else "(none)"


def _decide_one(snapshot: Snapshot, facts: SessionFacts, now: datetime) -> Decision:
    """The verdict for the transaction as its addresses show."""
    sender, recipient = facts.sender, facts.recipient
    if (sender and "@" not in sender) or (recipient and ("@" not in recipient or "@[" in recipient)):
        if (undecidable := _undecidable(snapshot, facts)) is not None:
            return undecidable
    return _verdict(find_candidates(snapshot, facts), facts, now)


def decide_header_from(snapshot: Snapshot, facts: SessionFacts, now: datetime) -> Decision:
    """The verdict of the connectors scoped by the header From alone, ranked and judged as
    :func:`decide` ranks and judges (at ``Stage.DATA``; no such connector applies earlier).

    :func:`decide` lets the best connector of all decide, and a sender scope ranks first: a
    sender connector, even one for ``*``, would hide every header-From connector. The milter
    therefore judges each author with this at end of message, on top of the RCPT verdict, so
    that a header-From connector is always enforced whatever else also matches. A connector
    without a header From scope was judged at RCPT already.
    """
    return _over_routes(snapshot, facts, now, _judge_header_from)


def _judge_header_from(snapshot: Snapshot, facts: SessionFacts, now: datetime) -> Decision:
    candidates = [c for c in find_candidates(snapshot, facts) if c.connector.header_from_domains]
    return _verdict(candidates, facts, now)


def _verdict(candidates: list[Candidate], facts: SessionFacts, now: datetime) -> Decision:
    """The verdict of the best of ``candidates`` (ranked best first), monitor mode applied."""
    if not candidates:
        return Decision(Outcome.PASS, None, None, candidates=())
    winner = candidates[0].connector
    cands = tuple(candidates)
    if winner.mode is Mode.MONITOR:
        # A connector in monitor mode observes: it never lifts the requirements of a broader
        # enforcing one. That one judges first; when it passes, the monitor's view is logged.
        enforcing = next((c.connector for c in candidates if c.connector.mode is not Mode.MONITOR), None)
        if enforcing is not None:
            enforced = _judge(enforcing, facts, now, cands)
            if enforced.outcome is Outcome.FAIL:
                return enforced
    return _judge(winner, facts, now, cands)


def _judge(winner: InboundConnector, facts: SessionFacts, now: datetime, cands: tuple[Candidate, ...]) -> Decision:
    """The verdict of one connector, ``cands`` being every connector that applied."""
    if winner.misconfigured:
        reason = f"connector {winner.name} is misconfigured: {winner.problems[0]}"
        check = Check("configuration", False, reason)
        action = None if winner.mode is Mode.MONITOR else FailAction.DEFER
        return Decision(
            Outcome.FAIL, action, winner, _status(FailAction.DEFER, STATUS_CONFIG),
            reason, reason, (check,), cands,
        )
    if facts.client_address is None and (winner.scopes_ranges or winner.restrict_to_ranges):
        reason = (f"the client address is unknown, so whether connector {winner.name} applies, or the client "
                  "is within its ranges, cannot be told")
        action = None if winner.mode is Mode.MONITOR else FailAction.DEFER
        return Decision(Outcome.FAIL, action, winner, _status(FailAction.DEFER, STATUS_POLICY), reason, reason,
                        (Check("client range", False, reason),), cands)
    results = check_requirements(winner, facts, now)
    checks = tuple(ch for ch, _ in results)
    failed = next(((ch, st) for ch, st in results if not ch.ok), None)
    if failed is None:
        return Decision(Outcome.PASS, None, winner, checks=checks, candidates=cands)
    check, detail = failed
    status = _status(winner.on_failure, detail)
    reason = check.detail
    reply = winner.reply_text or reason
    action = None if winner.mode is Mode.MONITOR else winner.on_failure
    return Decision(Outcome.FAIL, action, winner, status, reason, reply, checks, cands)
