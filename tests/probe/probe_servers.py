"""Test helpers for ``tlsgate probe``: a tiny STARTTLS SMTP server and a dnspython DNS
responder, both on loopback, both run in threads and stopped by the test."""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

TRICKLE_EVERY = 0.2  # seconds between the bytes of a trickled reply: each read is well within any timeout
Trickle = Literal["greeting", "ehlo", "handshake"]


class SmtpServer(socketserver.ThreadingTCPServer):
    """Greets, answers EHLO (offering STARTTLS when it has a certificate), does STARTTLS.

    ``trickle`` sends the greeting, the EHLO reply or the server's TLS handshake a byte at a
    time, never finishing within a test; ``trickled`` is set once the first byte went out.
    """

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = True  # the handlers end with the server, a trickling one included

    def __init__(
        self,
        cert: Path | None,
        key: Path | None,
        *,
        tls_max: ssl.TLSVersion | None = None,
        banner: str = "220 mx.test ESMTP probe-test",
        trickle: Trickle | None = None,
    ) -> None:
        self.banner = banner
        self.trickle = trickle
        self.trickled = threading.Event()
        self.stopping = threading.Event()
        self.context: ssl.SSLContext | None = None
        if cert is not None and key is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.set_ciphers("ALL:@SECLEVEL=0")  # before loading, so that weak test keys load
            ctx.load_cert_chain(cert, key)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if tls_max is not None:
                ctx.maximum_version = tls_max
            self.context = ctx
        super().__init__(("127.0.0.1", 0), _SmtpHandler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


class _SmtpHandler(socketserver.StreamRequestHandler):
    server: SmtpServer
    tls: ssl.SSLSocket | None = None

    def finish(self) -> None:
        super().finish()
        if self.tls is not None:
            self.tls.close()  # the server closes the request's socket only, detached by STARTTLS

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(10)
        reader = conn.makefile("rb")
        trickle = self.server.trickle
        if trickle == "greeting":
            self._trickle(conn, b"220 " + b"x" * 1000 + b"\r\n")
            return
        conn.sendall(self.server.banner.encode() + b"\r\n")
        if not self.server.banner.startswith("220"):
            return
        while True:
            line = reader.readline(1000)
            if not line:
                return
            verb = line.strip().split(b" ")[0].upper()
            if verb in (b"EHLO", b"HELO") and trickle == "ehlo":
                self._trickle(conn, b"250-mx.test\r\n250-" + b"x" * 1000 + b"\r\n250 STARTTLS\r\n")
                return
            if verb in (b"EHLO", b"HELO"):
                extra = b"250-STARTTLS\r\n" if self.server.context and not isinstance(conn, ssl.SSLSocket) else b""
                conn.sendall(b"250-mx.test\r\n" + extra + b"250 8BITMIME\r\n")
            elif verb == b"STARTTLS" and self.server.context is not None:
                conn.sendall(b"220 2.0.0 go ahead\r\n")
                if trickle == "handshake":
                    self._trickle_handshake(conn, self.server.context)
                    return
                try:
                    conn = self.tls = self.server.context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                reader = conn.makefile("rb")
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 bye\r\n")
                return
            else:
                conn.sendall(b"502 5.5.2 not here\r\n")

    def _trickle(self, conn: socket.socket, data: bytes) -> None:
        """Until the client hangs up or the server stops."""
        for byte in data:
            if self.server.stopping.wait(TRICKLE_EVERY):
                return
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                return
            self.server.trickled.set()

    def _trickle_handshake(self, conn: socket.socket, context: ssl.SSLContext) -> None:
        """TLS in memory, so that the server's handshake records can be trickled."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)
        while not outgoing.pending:
            try:
                data = conn.recv(16384)
            except OSError:
                return
            if not data:
                return
            incoming.write(data)
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLError:
                return
        self._trickle(conn, outgoing.read())


class DnsServer:
    """Answers A and MX (and anything else given) from a table; NXDOMAIN for unknown names.

    ``records`` maps a name to (type, rdata text) pairs; ``silent`` names get no answer at all.
    """

    def __init__(self, records: Mapping[str, Sequence[tuple[str, str]]], silent: Sequence[str] = ()) -> None:
        self.records = {_fqdn(k): list(v) for k, v in records.items()}
        self.silent = {_fqdn(s) for s in silent}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            question = query.question[0]
            name = question.name.to_text().lower()
            rtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rtype))
            if name in self.silent:
                continue
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            if name not in self.records:
                response.set_rcode(dns.rcode.NXDOMAIN)
            else:
                values = [v for t, v in self.records[name] if t == rtype]
                if values:
                    response.answer.append(dns.rrset.from_text_list(name, 60, "IN", rtype, values))
            self.sock.sendto(response.to_wire(), peer)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def _fqdn(name: str) -> str:
    return name.lower().rstrip(".") + "."
