"""Pure translations between what an MTA gives a milter and tlsgate's values, with no I/O.

Macros become TLS facts (Postfix and Sendmail spell "verified" differently), the connect
callback's address becomes an IP address, RFC 5322 From header fields become the author
addresses to judge, and a decision becomes the trace header's value and a reply text that
libmilter accepts. Every input is bounded, so a hostile header cannot make the milter work
hard or write an unbounded header.
"""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from tlsgate.decisionlog import verdict_word
from tlsgate.model import Decision, Outcome, SessionFacts
from tlsgate.patterns import Address, judged_domain, parse_address, raw_domain

#: the macros read at every callback; Postfix sends them only where milter_*_macros say so
TLS_MACROS = ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}")
#: Sendmail only: the verification result; "OK" is the one value meaning a verified chain
VERIFY_MACRO = "{verify}"
#: the MTA's name and version, "Postfix 3.7.11"; Postfix sends it at connect by default
MTA_MACRO = "v"

#: the envelope addresses as Postfix read them: it parses the client's spelling with its RFC
#: 822 tokenizer (comments, blanks and escapes dropped) and resolves it, as it then keeps and
#: delivers it; both are in its default macro lists. Sendmail's hold ruleset 0's result instead.
SENDER_MACRO = "{mail_addr}"
RECIPIENT_MACRO = "{rcpt_addr}"

MAX_MACRO = 1024  # a certificate name longer than this is cut, never trusted in full
# An envelope address is judged whole or not at all: cut, it could lose its domain and
# with it a sender or recipient connector. Kept whole, enforcement stays; RFC 5321 allows
# 256 characters in a path and Postfix ends a command line at line_length_limit (2048 by
# default), so no legitimate address comes near this bound. A longer one is answered with
# a temporary failure: never judged on a part, never lost without the sender being told.
MAX_ENVELOPE = 4096
# From fields beyond these bounds are not judged in part: while an enforcing header-From
# connector exists the message is refused whole (see TlsgateMilter.eom), since an
# ignored remainder could hide a protected author.
MAX_FROM_FIELDS = 16
MAX_FROM_VALUE = 8192
MAX_PROTECTED_DOMAINS = 50  # distinct in-scope author domains judged per message
MAX_REPLY = 400  # an SMTP reply line is 512 octets with the code and status
MAX_TRACE_VALUE = 900  # a header line stays under 998 octets

MacroGetter = Callable[[str], "str | None"]

_CN = re.compile(r"(?:^|[/,]\s*)CN=((?:\\.|[^/,\\])+)", re.IGNORECASE)
_BARE_DOMAIN = re.compile(r"@([A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?)")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
# What an MTA's address parser reads as syntax rather than as the address, outside a quoted
# local part: comments, escapes, blanks and quotes.
_RFC822_SYNTAX = re.compile(r'[\s()\\"]')


class AddressTooLong(ValueError):
    """An envelope address longer than :data:`MAX_ENVELOPE`, which is never cut."""

    def __init__(self, length: int) -> None:
        super().__init__(f"an address of {length} characters, longer than {MAX_ENVELOPE}")
        self.length = length


@dataclass(frozen=True, slots=True)
class TlsFacts:
    """The TLS state of one SMTP session as the MTA's macros describe it."""

    protocol: str | None = None
    cipher: str | None = None
    cipher_bits: int = 0
    cert_subject: str | None = None  # verified chain only
    cert_issuer: str | None = None  # verified chain only

    def merged(self, newer: TlsFacts) -> TlsFacts:
        """A session cannot leave TLS: keep what is known, let later macros add to it."""
        if newer.protocol is None:
            return self
        return newer


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    text = _UNSAFE.sub("", value).strip()[:MAX_MACRO]
    return text or None


def common_name(subject: str) -> str:
    """The CN of a distinguished name (Sendmail's ``/C=US/O=X/CN=mx.example``), else the text.

    For Sendmail only: Postfix gives the CN alone, and a value without ``CN=`` is returned
    unchanged.
    """
    found = _CN.findall(subject)
    if not found:
        return subject
    return str(found[-1]).replace("\\", "").strip()


def is_postfix(mta: str | None) -> bool:
    """Whether the ``v`` macro names Postfix (its mail_name, "Postfix" unless changed)."""
    return mta is not None and mta.split(" ", 1)[0] == "Postfix"


def names_verified(mta: str | None, verify: str | None) -> bool:
    """Whether the MTA vouches that the certificate names come from a verified chain.

    Postfix sends ``{cert_subject}``/``{cert_issuer}`` only for a chain that verified against
    smtpd_tls_CAfile and has no ``{verify}``. Sendmail sends the names for any certificate,
    self-signed too, and ``{verify}`` only when configured to: from any MTA but Postfix a
    missing ``{verify}`` means "not verified", and only ``OK`` makes the names count.
    """
    if verify is not None:
        return verify.upper() == "OK"
    return is_postfix(mta)


def tls_from_macros(get: MacroGetter, mta: str | None = None) -> TlsFacts:
    """Read the TLS macros through ``get`` (a milter's getsymval); ``mta`` is the ``v`` macro
    seen in this session (at connect, under Postfix), None when none was. See
    :func:`names_verified`."""
    protocol = _clean(get("{tls_version}"))
    if protocol is None:
        return TlsFacts()
    cipher = _clean(get("{cipher}"))
    bits_text = _clean(get("{cipher_bits}")) or ""
    bits = int(bits_text) if bits_text.isascii() and bits_text.isdigit() and len(bits_text) <= 5 else 0
    subject = _clean(get("{cert_subject}"))
    issuer = _clean(get("{cert_issuer}"))
    if not names_verified(mta, _clean(get(VERIFY_MACRO))):
        subject = issuer = None
    elif not is_postfix(mta):
        # Postfix sends the CN alone, as the certificate spells it: a CN that reads
        # "evil.example/CN=mail.partner.test" is that whole text, never a DN to pick from.
        subject = common_name(subject) if subject is not None else None
        issuer = common_name(issuer) if issuer is not None else None
    # A verified certificate without a subject CN comes with its issuer alone.
    return TlsFacts(protocol, cipher, bits, subject, issuer)


def client_address(family: int, hostaddr: object) -> Address | None:
    """The client IP from the connect callback; None for a local (unix) or unknown client.

    pymilter gives ``(ip, port)`` for AF_INET, ``(ip, port, flowinfo, scope)`` for AF_INET6
    and the socket path for AF_UNIX; a bare string is accepted for IP families too.
    """
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    if isinstance(hostaddr, tuple) and hostaddr:
        hostaddr = hostaddr[0]
    if not isinstance(hostaddr, str):
        return None
    return parse_address(hostaddr[:64])


def client_name(hostname: str | None) -> str | None:
    """The verified PTR name, or None where the MTA shows the bracketed address instead."""
    name = _clean(hostname)
    if name is None or name.startswith("["):
        return None
    return name[:255]


def envelope_address(value: str) -> str:
    """``<a@b>`` -> ``a@b``; ``<>`` -> ``""`` (the null sender).

    Raises :class:`AddressTooLong` beyond :data:`MAX_ENVELOPE` characters.
    """
    text = _bare(value)
    if len(text) > MAX_ENVELOPE:
        raise AddressTooLong(len(text))
    local = _quoted_local(text)
    return text if local is None else local[0] + text[local[1]:]


def plainly_spelt(value: str) -> bool:
    """Whether an envelope address reads the same to an MTA's RFC 822 parser as to
    :func:`envelope_address`: no comment, escape, blank or quote outside a quoted local part.

    Postfix delivers ``<a@contoso.test(x)>``, ``<a@"contoso.test">`` and ``<a@contoso\\.test>``
    to a@contoso.test; read as written, their domain is no domain name at all.
    """
    text = _bare(value)
    local = _quoted_local(text)
    rest = text if local is None else text[local[1]:]
    return not (rest.startswith('"') or _RFC822_SYNTAX.search(rest))


def _bare(value: str) -> str:
    text = _UNSAFE.sub("", value).strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


def _quoted_local(address: str) -> tuple[str, int] | None:
    """A leading quoted local part without its quotes, and where the rest begins; None when
    the address does not start with a whole quoted string.

    As Postfix keeps it and tells a policy server: ``"a@contoso.test"`` is a@contoso.test,
    ``"j doe"@x`` is j doe@x; judged quoted, such an address would have no domain.
    """
    if not address.startswith('"'):
        return None
    local: list[str] = []
    escaped = False
    for i, char in enumerate(address[1:], start=1):
        if escaped:
            local.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return "".join(local), i + 1
        else:
            local.append(char)
    return None  # no closing quote


def header_from_authors(values: Sequence[str]) -> tuple[str, ...]:
    """The distinct author addresses of the From header fields that have a domain, an
    address literal's included (it meets ``*`` connectors, as in the envelope).

    RFC 5322 wants one From field; it may list several mailboxes. Every mailbox is judged,
    so adding a second author cannot dilute a connector's scope. A field that does not
    parse cleanly in full (an entry getaddresses cannot make a mailbox with a domain of)
    also has every ``@domain`` part of its text judged, as ``unparsed@domain``, in the text
    as written and as a reader may see it (see :func:`_as_read`): a malformed mailbox next to
    a good one, or one whose domain is quoted, escaped or encoded, cannot hide a protected
    author either.
    """
    authors: list[str] = []
    for field in values:
        parsed = [addr for _, addr in email.utils.getaddresses([field])]
        found = [addr for addr in parsed if "@" in addr and _has_domain(addr)]
        if len(found) < len(parsed) or (not parsed and field.strip()):
            domains = {judged_domain(addr) for addr in found}
            for raw in _BARE_DOMAIN.findall(f"{field} {_as_read(field)}"):
                domain = judged_domain(f"x@{raw}")
                if domain is not None and domain not in domains:
                    domains.add(domain)
                    found.append(f"unparsed@{raw}")
        for addr in found:
            if addr not in authors:
                authors.append(addr)
    return tuple(authors)


def _has_domain(address: str) -> bool:
    """A domain name, or an address literal (``[192.0.2.1]``); ``[bank.test]`` is neither, and
    leaves its field to the scan of its raw text."""
    if judged_domain(address) is not None:
        return True
    domain = raw_domain(address)
    return domain.startswith("[") and domain.endswith("]") and parse_address(domain) is not None


_COMMENT = re.compile(r"\([^()]*\)")
_BLANKS = re.compile(r"\s+")
_BLANK_AROUND = re.compile(r" ?([@.]) ?")  # after _BLANKS: one blank at most each side, linear work


def _as_read(field: str) -> str:
    """A malformed From field as a mail reader may show it: encoded words decoded (which RFC
    2047 forbids in an address, and some readers decode all the same), comments, quotes and
    escapes dropped, blanks around ``@`` and ``.`` closed: ``ceo@"bank.test"``,
    ``ceo@bank\\.test``, ``ceo@ (x) bank.test`` all read ceo@bank.test."""
    text = field
    if "=?" in text:
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
            pass  # left encoded: the text as written is scanned too
    for _ in range(3):  # comments nest; deeper ones are left, with their @ parts scanned as written
        text = _COMMENT.sub(" ", text)
    text = text.replace("[", "").replace("]", "")  # ceo@[bank.test] is no address literal
    text = _BLANKS.sub(" ", _UNSAFE.sub(" ", text).replace("\\", "").replace('"', ""))
    return _BLANK_AROUND.sub(r"\1", text)


def reply_text(text: str | None, fallback: str) -> str:
    """A one-line reply text libmilter accepts: no control characters, ``%`` doubled."""
    line = _UNSAFE.sub(" ", text or fallback).strip()[:MAX_REPLY] or fallback
    return line.replace("%", "%%")


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def trace_value(
    host: str | None,
    facts: SessionFacts,
    decisions: Iterable[Decision],
) -> str:
    """The trace header's value for one message.

    ``decisions`` are the verdicts that stand for the accepted recipients; the most severe
    one is the headline (a failure over a monitored failure over a connector's pass over no
    connector), and every connector met is listed.
    """
    chosen = list(decisions)
    headline = max(chosen, key=_severity) if chosen else None
    parts = [host or "localhost"]
    parts.append(f"verdict={verdict_word(headline) if headline else 'pass'}")
    names = sorted({d.connector.name for d in chosen if d.connector is not None})
    parts.append(f"connector={','.join(names) if names else 'none'}")
    if headline is not None and headline.status:
        parts.append(f"status={headline.status}")
    if facts.tls_protocol:
        parts.append(f"tls={facts.tls_protocol}")
        parts.append(f"cipher={facts.tls_cipher or 'unknown'}")
        parts.append(f"bits={facts.tls_cipher_bits}")
        parts.append(f"verified={'yes' if facts.cert_subject or facts.cert_issuer else 'no'}")
        if facts.cert_subject:
            parts.append(f"cert={_quoted(facts.cert_subject[:200])}")
            if facts.cert_issuer:
                parts.append(f"issuer={_quoted(facts.cert_issuer[:200])}")
    else:
        parts.append("tls=none")
    if headline is not None and headline.reason and headline.outcome is Outcome.FAIL:
        parts.append(f"reason={_quoted(headline.reason[:300])}")
    value = "; ".join(parts)
    return _UNSAFE.sub(" ", value)[:MAX_TRACE_VALUE]


def _severity(decision: Decision) -> tuple[int, int]:
    permanent = 1 if (decision.status or "").startswith("5") else 0
    if decision.outcome is Outcome.FAIL:
        return (3 if decision.action is not None else 2, permanent)
    return (1 if decision.connector is not None else 0, 0)
