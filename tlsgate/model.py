"""The domain objects every part of tlsgate speaks: connectors, session facts and verdicts.

They are frozen dataclasses with no tie to SQL or to a protocol: the store turns rows into
them, the front-ends turn Postfix's attributes and macros into :class:`SessionFacts`, and the
engine turns both into a :class:`Decision`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from tlsgate.patterns import (
    Address,
    CertNamePattern,
    DomainPattern,
    IssuerPattern,
    Network,
)


class Mode(enum.Enum):
    ENFORCE = "enforce"
    MONITOR = "monitor"


class CertRequirement(enum.Enum):
    NONE = "none"
    TRUSTED = "trusted"
    PINNED = "pinned"


class FailAction(enum.Enum):
    REJECT = "reject"
    DEFER = "defer"


class Scope(enum.Enum):
    """What a domain pattern of an inbound connector is compared with."""

    SENDER = "sender"
    RECIPIENT = "recipient"
    HEADER_FROM = "header_from"


class TlsLevel(enum.Enum):
    """Postfix smtp_tls_security_level values an outbound connector may ask for."""

    ENCRYPT = "encrypt"
    VERIFY = "verify"
    SECURE = "secure"
    FINGERPRINT = "fingerprint"
    DANE = "dane"
    DANE_ONLY = "dane-only"


TLS_VERSIONS: tuple[str, ...] = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


def tls_version_rank(version: str) -> int | None:
    """Order of a protocol name as Postfix reports it; None for unknown names."""
    try:
        return TLS_VERSIONS.index(version)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Pin:
    """A registered partner certificate, reduced to what a decision needs.

    Fingerprints are kept per digest name (``sha256``, ``md5``, ``sha1``) in Postfix's format:
    uppercase hex bytes joined by colons.
    """

    cert_fingerprints: frozenset[str]
    pubkey_fingerprints: frozenset[str]
    subject_cn: str | None
    dns_names: tuple[str, ...]
    organization: str | None  # the subject's first O
    units: tuple[str, ...]  # every OU of the subject, in order
    issuer_cn: str | None
    key_type: str
    key_bits: int
    not_before: datetime
    not_after: datetime
    label: str  # how to name it in a reason: sha256 fingerprint prefix
    # Issuer and root names of the registered chain above the leaf (issuer patterns see them).
    chain_issuers: tuple[str, ...] = ()


#: the end of the problem an address entry not resolved yet gives its connector
UNRESOLVED_DNS = "has not been resolved yet"


@dataclass(frozen=True, slots=True)
class InboundConnector:
    """One inbound connector row with its child rows, parsed and validated.

    ``problems`` lists what was wrong with the rows; a connector with problems is
    *misconfigured*: mail in whatever scope could be parsed gets a temporary failure.
    """

    name: str
    enabled: bool = True
    mode: Mode = Mode.ENFORCE
    comment: str = ""
    sender_domains: tuple[DomainPattern, ...] = ()
    recipient_domains: tuple[DomainPattern, ...] = ()
    header_from_domains: tuple[DomainPattern, ...] = ()
    client_ranges: tuple[Network, ...] = ()
    #: address entries that name DNS (a:HOST, mx:DOMAIN, spf:DOMAIN), resolved in the background
    dns_entries: tuple[str, ...] = ()
    restrict_to_ranges: bool = False
    require_tls: bool = True
    min_tls_version: str | None = None
    require_forward_secrecy: bool = False
    min_cipher_bits: int = 0
    certificate: CertRequirement = CertRequirement.NONE
    cert_names: tuple[CertNamePattern, ...] = ()
    issuer_names: tuple[IssuerPattern, ...] = ()
    pins: tuple[Pin, ...] = ()
    require_organization: str | None = None
    require_unit: str | None = None
    min_key_bits: int | None = None
    on_failure: FailAction = FailAction.DEFER
    reply_text: str | None = None
    problems: tuple[str, ...] = ()

    @property
    def misconfigured(self) -> bool:
        return bool(self.problems)

    @property
    def awaits_dns(self) -> bool:
        """An address entry of its scope has not been resolved yet: it covers every client
        meanwhile, and which client range it will have is unknown."""
        return any(p.endswith(UNRESOLVED_DNS) for p in self.problems)

    @property
    def scopes_ranges(self) -> bool:
        """Client ranges select sessions unless they only restrict a domain-scoped connector."""
        return bool(self.client_ranges) and not (self.restrict_to_ranges and self.has_domain_scope)

    @property
    def has_domain_scope(self) -> bool:
        return bool(self.sender_domains or self.recipient_domains or self.header_from_domains)


@dataclass(frozen=True, slots=True)
class SmartHost:
    host: str
    port: int = 25
    mx_lookup: bool = False  # False: [host] as Postfix writes it, no MX lookup


@dataclass(frozen=True, slots=True)
class OutboundConnector:
    name: str
    enabled: bool = True
    comment: str = ""
    recipient_domains: tuple[DomainPattern, ...] = ()
    tls_level: TlsLevel = TlsLevel.SECURE
    match_names: tuple[str, ...] = ()
    min_tls_version: str | None = None
    smart_hosts: tuple[SmartHost, ...] = ()
    problems: tuple[str, ...] = ()


class Stage(enum.Enum):
    """Where in the SMTP dialogue a front-end asks; header-From scopes exist only at DATA."""

    CONNECT = "connect"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What Postfix told a front-end about one SMTP transaction.

    Empty strings from Postfix are turned into None by the front-ends, so that "absent" has
    one spelling. ``cert_subject`` and ``cert_issuer`` are present only for a verified chain.
    ``sender`` is the envelope sender without brackets; ``""`` is the null sender.
    """

    client_address: Address | None
    sender: str | None = None
    recipient: str | None = None
    header_from: str | None = None
    tls_protocol: str | None = None
    tls_cipher: str | None = None
    tls_cipher_bits: int = 0
    cert_subject: str | None = None
    cert_issuer: str | None = None
    cert_fingerprint: str | None = None
    pubkey_fingerprint: str | None = None
    stage: Stage = Stage.RCPT
    queue_id: str | None = None
    client_name: str | None = None


class Outcome(enum.Enum):
    PASS = "pass"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Check:
    """One requirement of the winning connector and whether the session met it."""

    requirement: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Candidate:
    """A connector whose scope matched, with the sort key that ranked it and the session's
    values its scopes matched (sender, header From and recipient domains, client address)."""

    connector: InboundConnector
    rank: tuple[object, ...]
    values: tuple[str | None, str | None, str | None, Address | None]

    @property
    def matched(self) -> tuple[str, ...]:
        """What matched, in words, for an explanation (built only when asked for)."""
        c = self.connector
        sender, header_from, recipient, client = self.values
        out = []
        if c.sender_domains:
            out.append(f"sender domain {sender}")
        if c.header_from_domains:
            out.append(f"header From domain {header_from}")
        if c.recipient_domains:
            out.append(f"recipient domain {recipient}")
        if c.scopes_ranges:
            out.append(f"client {client}")
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict for one transaction and everything needed to explain it.

    ``outcome`` is what the connector's requirements say; ``action`` is what a front-end must
    do: None to let the mail go on, otherwise reject or defer with ``status`` (RFC 3463) and
    ``reply`` (the connector's reply text, or the reason). In monitor mode the outcome can be FAIL while ``action`` is None.
    """

    outcome: Outcome
    action: FailAction | None
    connector: InboundConnector | None
    status: str | None = None
    reason: str | None = None
    reply: str | None = None
    checks: tuple[Check, ...] = ()
    candidates: tuple[Candidate, ...] = field(default=(), compare=False)

    @property
    def monitored(self) -> bool:
        return self.connector is not None and self.connector.mode is Mode.MONITOR

    @property
    def severity(self) -> int:
        """How strongly the mail is refused: 2 reject, 1 defer, 0 let go on. Where verdicts
        add up (a message's recipients and its header From), the strongest refusal stands."""
        if self.action is FailAction.REJECT:
            return 2
        if self.action is FailAction.DEFER:
            return 1
        return 0

    @property
    def smtp_code(self) -> int | None:
        if self.action is FailAction.REJECT:
            return 550
        if self.action is FailAction.DEFER:
            return 450
        return None
