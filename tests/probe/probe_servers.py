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
from typing import Self

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class SmtpServer(socketserver.ThreadingTCPServer):
    """Greets, answers EHLO (offering STARTTLS when it has a certificate), does STARTTLS."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(
        self,
        cert: Path | None,
        key: Path | None,
        *,
        tls_max: ssl.TLSVersion | None = None,
        banner: str = "220 mx.test ESMTP probe-test",
    ) -> None:
        self.banner = banner
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
        self.shutdown()
        self.server_close()


class _SmtpHandler(socketserver.StreamRequestHandler):
    server: SmtpServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(10)
        reader = conn.makefile("rb")
        conn.sendall(self.server.banner.encode() + b"\r\n")
        if not self.server.banner.startswith("220"):
            return
        while True:
            line = reader.readline(1000)
            if not line:
                return
            verb = line.strip().split(b" ")[0].upper()
            if verb in (b"EHLO", b"HELO"):
                extra = b"250-STARTTLS\r\n" if self.server.context and not isinstance(conn, ssl.SSLSocket) else b""
                conn.sendall(b"250-mx.test\r\n" + extra + b"250 8BITMIME\r\n")
            elif verb == b"STARTTLS" and self.server.context is not None:
                conn.sendall(b"220 2.0.0 go ahead\r\n")
                try:
                    conn = self.server.context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                reader = conn.makefile("rb")
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 bye\r\n")
                return
            else:
                conn.sendall(b"502 5.5.2 not here\r\n")


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
