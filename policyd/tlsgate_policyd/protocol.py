"""Postfix's SMTP access policy delegation protocol: bytes in, values out.

A request is ``name=value`` lines ending in an empty line; the answer is ``action=...``
followed by an empty line (Postfix SMTPD_POLICY_README). :class:`RequestReader` takes bytes as
they arrive and yields complete requests, enforcing limits on line length, attribute count and
request size; each framing failure is its own exception so the server can log it and close
that connection. :func:`facts_from_request` maps attributes to :class:`SessionFacts` and
:func:`answer` a decision to the action line. No sockets here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from tlsgate.decisionlog import verdict_word
from tlsgate.model import Decision, FailAction, SessionFacts, Stage
from tlsgate.patterns import parse_address


class ProtocolError(ValueError):
    """A request that breaks the framing; the connection it came on is closed."""


class LineTooLong(ProtocolError):
    pass


class TooManyAttributes(ProtocolError):
    pass


class RequestTooLarge(ProtocolError):
    pass


class MalformedLine(ProtocolError):
    pass


@dataclass(frozen=True, slots=True)
class Limits:
    max_line: int = 8192
    max_attributes: int = 256
    max_request: int = 65536


class RequestReader:
    """Incremental parser: ``feed(data)`` yields each complete request as a dict.

    Later values of a repeated name win, as in Postfix's own attribute reader. Names and
    values are decoded as UTF-8 with replacement: an address in another encoding must not
    end the connection, and the engine only ever compares ASCII domains.
    """

    def __init__(self, limits: Limits = Limits()) -> None:
        self._limits = limits
        self._buffer = bytearray()
        self._attrs: dict[str, str] = {}
        self._size = 0

    @property
    def pending(self) -> bool:
        """True while a request has started but not ended (bytes or attributes held)."""
        return bool(self._buffer or self._attrs)

    def feed(self, data: bytes) -> Iterator[dict[str, str]]:
        if not self._buffer and not self._attrs and data.find(b"\n\n") == len(data) - 2 > 0:
            # Exactly one request, as Postfix writes it: judged without copying it to the buffer.
            request = self._block(data, len(data) - 2)
            if request is not None:
                yield request
                return
        self._buffer += data
        while True:
            request = self._whole_request() if not self._attrs else None
            if request is None:
                request = self._next_line()
                if request is None:
                    return
                if request is _MORE:
                    continue
            yield request

    def _whole_request(self) -> dict[str, str] | None:
        """The common case, a whole request already buffered, split in one go; else None.

        Postfix writes each request at once, so this path serves nearly every request; it
        leaves anything unusual (a CR, an empty request, a request cut in two) to the
        line-by-line path, and applies the same limits.
        """
        buffer = self._buffer
        end = buffer.find(b"\n\n")
        request = self._block(buffer, end)
        if request is not None:
            del buffer[: end + 2]
        return request

    def _block(self, buffer: bytes | bytearray, end: int) -> dict[str, str] | None:
        """The request in ``buffer[:end]``, whose empty line follows at ``end``; None to leave
        it to the line-by-line path."""
        if end <= 0 or buffer[0] == 0x0A or buffer.find(b"\r", 0, end) >= 0:
            return None  # a CR may end an empty request before this one: judged line by line
        limits = self._limits
        if end + 2 > limits.max_request:
            raise RequestTooLarge(f"request larger than {limits.max_request} bytes")
        block = buffer[:end]
        if end > limits.max_line and max(map(len, block.split(b"\n"))) > limits.max_line:
            raise LineTooLong(f"line longer than {limits.max_line} bytes")
        # Decoding the block at once gives what decoding each name and value gives: a newline
        # or "=" is never part of a multi-byte sequence, so a replacement never crosses them.
        lines = block.decode("utf-8", "replace").split("\n")
        try:
            attrs = dict([line.split("=", 1) for line in lines])
        except ValueError:
            attrs = {"": ""}  # a line without "=": named below
        if "" in attrs:
            raise _malformed(next(line for line in lines if "=" not in line or line[0] == "="))
        if len(attrs) > limits.max_attributes:
            raise TooManyAttributes(f"more than {limits.max_attributes} attributes")
        return attrs

    def _next_line(self) -> dict[str, str] | None:
        """Consume one line: the finished request, ``_MORE`` after an attribute, None for no line yet."""
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > self._limits.max_line:
                raise LineTooLong(f"line longer than {self._limits.max_line} bytes")
            return None
        if end > self._limits.max_line:
            raise LineTooLong(f"line longer than {self._limits.max_line} bytes")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        self._size += end + 1
        if self._size > self._limits.max_request:
            raise RequestTooLarge(f"request larger than {self._limits.max_request} bytes")
        if not line:
            attrs, self._attrs, self._size = self._attrs, {}, 0
            return attrs
        name, sep, value = line.partition(b"=")
        if not sep or not name:
            raise _malformed(line.decode("utf-8", "replace"))
        self._attrs[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        if len(self._attrs) > self._limits.max_attributes:
            raise TooManyAttributes(f"more than {self._limits.max_attributes} attributes")
        return _MORE


_MORE: dict[str, str] = {}  # sentinel: a line was consumed, the request goes on


def _malformed(line: str) -> MalformedLine:
    return MalformedLine(f"line without name=value: {line[:40]!r}")


_XTEXT_BYTES = re.compile(rb"\+([0-9A-Fa-f]{2})")


def xtext_decode(value: str) -> str:
    """RFC 3461 xtext, as Postfix encodes ccert_subject and ccert_issuer (``Lab+20Test+20CA``).

    Postfix encodes each byte of a UTF-8 name on its own (``F+C5+91`` for "Fő"), so the bytes
    are gathered first and read as UTF-8; bytes that are not UTF-8 become U+FFFD, which no
    configured name matches.
    """
    if "+" not in value:
        return value
    raw = _XTEXT_BYTES.sub(lambda m: bytes((int(m.group(1), 16),)), value.encode("utf-8"))
    return raw.decode("utf-8", "replace")


_STAGES = {
    "CONNECT": Stage.CONNECT,
    "EHLO": Stage.CONNECT,
    "HELO": Stage.CONNECT,
    "MAIL": Stage.MAIL,
    "RCPT": Stage.RCPT,
    "VRFY": Stage.RCPT,
    "ETRN": Stage.CONNECT,
    "DATA": Stage.DATA,
    "END-OF-MESSAGE": Stage.DATA,
    "BDAT": Stage.DATA,
}


# Each smtpd process asks once per recipient from the same client: parse each address once.
_client_address = functools.lru_cache(maxsize=4096)(parse_address)


def facts_from_request(attrs: Mapping[str, str]) -> SessionFacts:
    """Session facts from one request. Empty and missing attributes mean the same: absent.

    ``header_from`` is never known to a policy server, so header From connectors are left to
    the milter even at END-OF-MESSAGE.
    """
    get = attrs.get  # a request is answered per recipient: no helper call per attribute
    bits_text = get("encryption_keysize", "").strip()
    bits = int(bits_text) if bits_text.isascii() and bits_text.isdigit() and len(bits_text) < 6 else 0
    subject = get("ccert_subject", "").strip()
    issuer = get("ccert_issuer", "").strip()
    state = get("protocol_state", "").strip().upper()
    sender = get("sender")
    return SessionFacts(
        client_address=_client_address(get("client_address", "")),
        client_name=get("client_name", "").strip() or None,
        sender=sender.strip() if sender is not None else None,
        recipient=get("recipient", "").strip() or None,
        tls_protocol=get("encryption_protocol", "").strip() or None,
        tls_cipher=get("encryption_cipher", "").strip() or None,
        tls_cipher_bits=bits,
        cert_subject=xtext_decode(subject) if subject else None,
        cert_issuer=xtext_decode(issuer) if issuer else None,
        cert_fingerprint=get("ccert_fingerprint", "").strip().upper() or None,
        pubkey_fingerprint=get("ccert_pubkey_fingerprint", "").strip().upper() or None,
        stage=Stage.RCPT if state == "RCPT" else _STAGES.get(state, Stage.RCPT),
        queue_id=get("queue_id", "").strip() or None,
    )


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def _text(value: str) -> str:
    """One line of printable text: a reply must never break the protocol."""
    return _UNSAFE.sub(" ", value).strip()[:400]


def answer(decision: Decision, *, monitor_header: str | None = None) -> str:
    """The action for a decision: DUNNO to let the restriction list go on, never OK."""
    if decision.action is FailAction.REJECT:
        return f"REJECT {decision.status} {_text(decision.reply or decision.reason or '')}"
    if decision.action is FailAction.DEFER:
        return f"DEFER {decision.status} {_text(decision.reply or decision.reason or '')}"
    if monitor_header and decision.monitored and decision.reason:
        name = decision.connector.name if decision.connector else "?"
        would = verdict_word(decision).removeprefix("monitor-")
        return f"PREPEND {monitor_header}: {would} connector={name} reason={_text(decision.reason)}"
    return "DUNNO"


def unknown_rules_answer(action: str, text: str) -> str:
    """What to answer before any rules could be loaded: a failure, never a pass."""
    verb = "REJECT" if action == "reject" else "DEFER"
    code = "5.3.5" if action == "reject" else "4.3.5"
    return f"{verb} {code} {_text(text)}"


def encode(action: str) -> bytes:
    return f"action={action}\n\n".encode()
