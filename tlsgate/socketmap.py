"""Postfix's socketmap protocol as bytes in, values out: netstrings, requests and replies.

A request is one netstring holding ``name <space> key``; the reply is one netstring holding
``OK data``, ``NOTFOUND ``, ``TEMP reason``, ``TIMEOUT reason`` or ``PERM reason``
(socketmap_table(5)). Postfix refuses replies longer than 100000 bytes and this side refuses
queries longer than 10000, so a peer cannot make either end buffer without bound. Every
framing failure is a named subclass of :class:`NetstringError`; nothing here touches a socket.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_QUERY = 10_000
MAX_REPLY = 100_000


class NetstringError(Exception):
    """Framing the peer got wrong; the connection cannot be trusted to stay in step."""


class TooLong(NetstringError):
    """The announced length is above the limit."""


class BadLength(NetstringError):
    """The length prefix is not a plain decimal number followed by ':'."""


class BadTerminator(NetstringError):
    """The payload is not followed by ','."""


class BadRequest(NetstringError):
    """A well-framed payload that is not ``name <space> key``."""


def encode(payload: bytes, limit: int = MAX_REPLY) -> bytes:
    """One netstring; raises TooLong when ``payload`` is above ``limit`` bytes."""
    if len(payload) > limit:
        raise TooLong(f"payload of {len(payload)} bytes is above the limit of {limit}")
    return b"%d:%s," % (len(payload), payload)


class NetstringDecoder:
    """Incremental decoder: feed it whatever the socket gave, get the complete payloads back.

    After an exception the decoder is poisoned: the stream is out of step and the caller
    must close the connection.
    """

    def __init__(self, limit: int = MAX_QUERY) -> None:
        self._limit = limit
        self._digits = len(str(limit))
        self._buf = bytearray()
        self._want: int | None = None  # payload length once the prefix is read

    @property
    def pending(self) -> bool:
        """True while part of a netstring is buffered."""
        return bool(self._buf) or self._want is not None

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            if self._want is None:
                colon = self._buf.find(b":", 0, self._digits + 1)
                if colon < 0:
                    head = bytes(self._buf[: self._digits + 1])
                    if head and not head.isdigit():
                        raise BadLength(f"length prefix {head[:16]!r} is not a decimal number")
                    if len(self._buf) > self._digits:
                        raise TooLong(f"length prefix is longer than {self._digits} digits")
                    return out
                prefix = bytes(self._buf[:colon])
                if not prefix.isdigit() or (len(prefix) > 1 and prefix[0:1] == b"0"):
                    raise BadLength(f"length prefix {prefix[:16]!r} is not a decimal number")
                length = int(prefix)
                if length > self._limit:
                    raise TooLong(f"netstring of {length} bytes is above the limit of {self._limit}")
                del self._buf[: colon + 1]
                self._want = length
            if len(self._buf) < self._want + 1:
                return out
            if self._buf[self._want] != ord(","):
                raise BadTerminator(
                    f"netstring of {self._want} bytes ends with {bytes(self._buf[self._want:self._want + 1])!r}, not ','"
                )
            out.append(bytes(self._buf[: self._want]))
            del self._buf[: self._want + 1]
            self._want = None


@dataclass(frozen=True, slots=True)
class Request:
    name: str
    key: str


def parse_request(payload: bytes) -> Request:
    """``name <space> key``; the key may itself hold spaces, the name may not.

    Keys are decoded as UTF-8 (SMTPUTF8 domains); undecodable bytes become U+FFFD so that
    such a key simply matches nothing.
    """
    name, sep, key = payload.partition(b" ")
    if not sep or not name or not key:
        raise BadRequest(f"request {payload[:64]!r} is not 'name key'")
    if not name.isascii() or not name.replace(b"_", b"").replace(b"-", b"").isalnum():
        raise BadRequest(f"map name {name[:64]!r} is not a plain word")
    return Request(name.decode("ascii"), key.decode("utf-8", errors="replace"))


def encode_request(name: str, key: str) -> bytes:
    """What Postfix sends, for clients and tests."""
    return encode(f"{name} {key}".encode(), MAX_QUERY)


class Status(enum.Enum):
    OK = "OK"
    NOTFOUND = "NOTFOUND"
    TEMP = "TEMP"
    TIMEOUT = "TIMEOUT"
    PERM = "PERM"


@dataclass(frozen=True, slots=True)
class Reply:
    status: Status
    data: str = ""

    def payload(self) -> bytes:
        # Postfix splits at the first space, so NOTFOUND still carries one.
        return f"{self.status.value} {self.data}".encode()

    def encode(self) -> bytes:
        """The reply netstring; raises TooLong above Postfix's reply limit."""
        return encode(self.payload(), MAX_REPLY)


def parse_reply(payload: bytes) -> Reply:
    """A server's reply, for clients and tests."""
    status, sep, data = payload.partition(b" ")
    try:
        kind = Status(status.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest(f"reply {payload[:64]!r} has no known status") from None
    if not sep:
        raise BadRequest(f"reply {payload[:64]!r} has no space after the status")
    return Reply(kind, data.decode("utf-8", errors="replace"))
