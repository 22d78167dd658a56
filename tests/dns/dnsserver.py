"""A small authoritative DNS server for tests, on a loopback UDP port, built with dnspython.

Serves A, AAAA, MX, TXT and CNAME records from a dict that tests may change while it runs,
answers NXDOMAIN for unknown names, SERVFAIL for names listed in ``servfail`` and nothing at
all for names in ``silent`` (a timeout). Stopped by ``stop()``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

Records = dict[tuple[str, str], list[str]]


class DnsServer:
    def __init__(self, records: Records | None = None, ttl: int = 300) -> None:
        self.records: Records = dict(records or {})
        self.ttl = ttl
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> DnsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue
            reply = self.answer(query)
            if reply is not None:
                self.sock.sendto(reply.to_wire(), peer)

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.silent:
            return None
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        if name in self.servfail:
            reply.set_rcode(dns.rcode.SERVFAIL)
            return reply
        current, seen = name, 0
        while (current, "CNAME") in self.records and rdtype != "CNAME" and seen < 8:
            target = self.records[(current, "CNAME")][0].rstrip(".").lower()
            reply.answer.append(dns.rrset.from_text(current + ".", self.ttl, "IN", "CNAME", target + "."))
            current, seen = target, seen + 1
        values = self.records.get((current, rdtype))
        if values:
            reply.answer.append(dns.rrset.from_text_list(current + ".", self.ttl, "IN", rdtype, values))
        elif not any(key[0] == current for key in self.records):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply


@contextmanager
def running(records: Records | None = None, ttl: int = 300) -> Iterator[DnsServer]:
    server = DnsServer(records, ttl).start()
    try:
        yield server
    finally:
        server.stop()
