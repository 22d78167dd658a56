"""The one log line per decision, shared by every front-end.

Postfix style, queue id first (NOQUEUE before Postfix assigns one), then key=value pairs an
administrator can grep: ``4F2A1C3B: reject connector=contoso-in client=203.0.113.5
from=<a@contoso.com> to=<b@example.org> tls=none reason="TLS required by connector contoso-in"``.
"""

from __future__ import annotations

import functools
import logging

from tlsgate import logsetup
from tlsgate.model import Decision, FailAction, Outcome, SessionFacts
from tlsgate.patterns import Address


@functools.lru_cache(maxsize=4096)
def _address_text(address: Address) -> str:
    """An address as text; the same clients come back with every recipient, and ipaddress
    spells an address slowly."""
    return str(address)


def verdict_word(decision: Decision) -> str:
    """pass, reject, defer, or monitor-pass / monitor-reject / monitor-defer."""
    if decision.outcome is Outcome.PASS:
        return "pass"
    if decision.action is None:
        would = "defer" if decision.status and decision.status.startswith("4") else "reject"
        return f"monitor-{would}"
    return "reject" if decision.action is FailAction.REJECT else "defer"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def tls_summary(facts: SessionFacts) -> str:
    if not facts.tls_protocol:
        return "tls=none"
    parts = [f"tls={facts.tls_protocol}", f"cipher={facts.tls_cipher or '-'}"]
    if facts.cert_subject or facts.cert_issuer:
        parts.append(f"cert={_quote(facts.cert_subject) if facts.cert_subject else 'no-cn'}")
        if facts.cert_issuer:
            parts.append(f"issuer={_quote(facts.cert_issuer)}")
    elif facts.cert_fingerprint:
        parts.append("cert=unverified")
    else:
        parts.append("cert=none")
    return " ".join(parts)


def decision_line(facts: SessionFacts, decision: Decision, *, stage: str | None = None) -> str:
    head = facts.queue_id or "NOQUEUE"
    parts = [f"{head}: {verdict_word(decision)}"]
    if decision.connector is not None:
        parts.append(f"connector={decision.connector.name}")
    if stage:
        parts.append(f"stage={stage}")
    address = _address_text(facts.client_address) if facts.client_address else "unknown"
    parts.append(f"client={facts.client_name or 'unknown'}[{address}]")
    if facts.sender is not None:
        parts.append(f"from=<{facts.sender}>")
    if facts.recipient:
        parts.append(f"to=<{facts.recipient}>")
    if facts.header_from:
        parts.append(f"header_from={_quote(facts.header_from)}")
    parts.append(tls_summary(facts))
    if decision.status:
        parts.append(f"status={decision.status}")
    if decision.reason:
        parts.append(f"reason={_quote(decision.reason)}")
    return " ".join(parts)


def log_decision(logger: logging.Logger, facts: SessionFacts, decision: Decision, *, stage: str | None = None) -> None:
    """The decision's line: INFO when a connector decided or the mail is refused, DEBUG when
    none applied (built only when that level is logged)."""
    level = logging.INFO if decision.connector is not None or decision.action is not None else logging.DEBUG
    if logger.isEnabledFor(level):
        logsetup.line(logger, level, decision_line(facts, decision, stage=stage))
