"""The policy daemon's asyncio server: sockets, connections, limits and graceful stop.

Every smtpd process keeps one connection open and sends a request per recipient, so the
server holds many idle persistent connections and answers each request inline: the engine is
a pure function over an in-memory snapshot, far cheaper than a thread hop. A slow client only
ever waits on its own connection. A framing error gets one WARNING line and closes that
connection; nothing a client sends can stop the others being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import ipaddress
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime

from tlsgate import logsetup
from tlsgate.config import Config
from tlsgate.decisionlog import log_decision
from tlsgate.engine import decide, with_myorigin
from tlsgate.metrics import Metrics
from tlsgate.snapshot import Snapshot
from tlsgate_policyd.protocol import (
    Limits,
    ProtocolError,
    RequestReader,
    answer,
    encode,
    facts_from_request,
    unknown_rules_answer,
)

log = logging.getLogger("tlsgate.policyd")

# Every smtpd process may connect at once after a restart; the default backlog of 100 would
# make some of them fail (EAGAIN on unix sockets) and answer default_action.
BACKLOG = 1024
# One read's worth: a request is about 1 KiB; a larger one arrives over several reads.
RECEIVE_BUFFER = 65536
# A bug met while deciding: the client tries again later (as the milter's answer for the same),
# unless a later restriction refuses the recipient for good, as default_action DEFER_IF_PERMIT
# has it when the daemon does not answer at all.
INTERNAL_ERROR = "DEFER_IF_PERMIT 4.3.0 tlsgate-policyd internal error, try again later"


class Responder:
    """Turns one request into one answer line, and logs the decision."""

    def __init__(self, config: Config, snapshot: Callable[[], Snapshot | None],
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 metrics: Metrics | None = None, myorigin: str | None = None) -> None:
        self._config = config
        self._snapshot = snapshot
        self._clock = clock
        self._metrics = metrics
        self._myorigin = myorigin  # see tlsgate.engine.with_myorigin
        self._monitor_header = "X-TLSgate-Monitor" if config.policyd.monitor_prepend else None
        self.decisions = 0

    def respond(self, attrs: dict[str, str]) -> str:
        """The answer to one request; a failure while deciding is a temporary one."""
        try:
            return self._respond(attrs)
        except Exception:  # noqa: BLE001 - logged by logsetup.failure; never a pass, the connection stays up
            logsetup.failure(log, "%s: deciding failed; answering DEFER_IF_PERMIT",
                             (attrs.get("queue_id") or "").strip() or "NOQUEUE")
            if self._metrics is not None:
                self._metrics.record_error()
            return INTERNAL_ERROR

    def _respond(self, attrs: dict[str, str]) -> str:
        if attrs.get("request") != "smtpd_access_policy":
            log.warning("ignoring request=%r: answering DUNNO", attrs.get("request", "")[:40])
            return "DUNNO"
        started = time.perf_counter()
        facts = facts_from_request(attrs)
        if self._myorigin is not None:
            facts = with_myorigin(facts, self._myorigin)
        snap = self._snapshot()
        self.decisions += 1
        if snap is None:
            if self._metrics is not None:
                self._metrics.record(None, time.perf_counter() - started)
            engine_cfg = self._config.engine
            action = unknown_rules_answer(engine_cfg.unknown_rules_action, engine_cfg.unknown_rules_text)
            log.info("%s: %s reason=\"no rules loaded\" client=[%s] from=<%s> to=<%s>",
                     facts.queue_id or "NOQUEUE", action.split(" ", 1)[0].lower(), facts.client_address,
                     facts.sender or "", facts.recipient or "")
            return action
        decision = decide(snap, facts, self._clock())
        if self._metrics is not None:
            self._metrics.record(decision, time.perf_counter() - started)
        log_decision(log, facts, decision)
        return answer(decision, monitor_header=self._monitor_header)


class Connection(asyncio.BufferedProtocol):
    """One client connection: requests are parsed and answered as their bytes arrive, with no
    task per connection or per read (the event loop calls back; the answer is written inline).

    Bytes are received into the server's one buffer. A plain protocol's transport allocates
    256 KiB for every read; until glibc has raised its mmap threshold (after freeing some larger
    block), each of those is a fresh mapping: measured, 14 µs per read against 1.5 µs.
    """

    def __init__(self, server: PolicyServer) -> None:
        self._server = server
        self._parser = RequestReader(server.limits)
        self.transport: asyncio.Transport | None = None
        self.peer = "unix"
        self.last = time.monotonic()  # when bytes last arrived
        self.started = self.last  # when the first byte of the request being received arrived
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def busy(self) -> bool:
        """Part of a request received and not yet answered."""
        return self._parser.pending

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = _peer(transport)
        self._server.admit(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._server.receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        # The buffer is the next connection's as soon as this returns: the bytes are copied.
        self.data_received(self._server.receive_buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.last = now = time.monotonic()
        if not self.busy:
            self.started = now
        respond = self._server.responder.respond
        try:
            answered = False
            for request in self._parser.feed(data):
                self.transport.write(encode(respond(request)))
                answered = True
            if answered:
                self.started = now  # what is left pending began in this read
        except ProtocolError as exc:
            log.warning("closing connection from %s: %s", self.peer, exc)
            self.transport.close()
            return
        if self._server.closing and not self.busy:
            self.transport.close()  # the request in flight at shutdown is answered

    def eof_received(self) -> bool:
        if self._parser.pending:
            log.warning("connection from %s closed in the middle of a request", self.peer)
        return False

    def pause_writing(self) -> None:
        # A client that sends without reading its answers is not read further until it does.
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("connection from %s ended: %s", self.peer, exc)
        self._server.forget(self)
        if not self.done.done():
            self.done.set_result(None)

    def expire(self, now: float) -> None:
        """Close the connection when a request has taken too long to arrive (counted from its
        first byte: a client dripping a byte at a time must not hold its slot for ever), when
        its answers have not been read for as long, or when it has been idle too long."""
        cfg = self._server.config
        if self.transport is None or self.transport.is_closing():
            return
        warnings = self._server.warnings
        if self.busy and now - self.started >= cfg.request_timeout:
            warnings.warning("slow request", "closing connection from %s: request incomplete %gs after its first byte",
                             self.peer, cfg.request_timeout)
        elif self.transport.get_write_buffer_size() and now - self.last >= cfg.request_timeout:
            warnings.warning("unread answers", "closing connection from %s: answers not read for %gs",
                             self.peer, cfg.request_timeout)
        elif not self.busy and now - self.last >= cfg.idle_timeout:
            log.debug("closing idle connection from %s", self.peer)
        else:
            return
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # answers it does not read would keep a close waiting forever
        else:
            self.transport.close()


class PolicyServer:
    def __init__(self, config: Config, responder: Responder) -> None:
        self.config = config.policyd
        self.responder = responder
        self.limits = Limits(self.config.max_line, self.config.max_attributes, self.config.max_request)
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[Connection] = set()
        self.closing = False
        self._unix_paths: list[str] = []
        self._sweeper: asyncio.Task[None] | None = None
        # Clients cut or refused: one line per kind a minute, however many there are.
        self.warnings = logsetup.ThrottledWarnings(log)
        # Shared by every connection: the event loop fills it and a connection copies out of
        # it before the next read (see Connection).
        self.receive_buffer = memoryview(bytearray(RECEIVE_BUFFER))

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def start(self, inherited: list[int] | None = None) -> None:
        """Listen on inherited (socket-activated) descriptors, or on the configured addresses."""
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep())
        if inherited:
            for fd in inherited:
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                if sock.family == socket.AF_UNIX:
                    server = await loop.create_unix_server(self._connection, sock=sock)
                else:
                    server = await loop.create_server(self._connection, sock=sock)
                self._servers.append(server)
                log.info("listening on inherited socket %s", _sockname(sock))
            return
        for listen in self.config.listen:
            if listen.startswith("unix:"):
                self._servers.append(await self._listen_unix(listen[5:]))
            else:
                host, _, port = listen[5:].rpartition(":")
                host = host.strip("[]")
                with contextlib.suppress(ValueError):
                    if not ipaddress.ip_address(host).is_loopback:
                        log.warning("listening on %s: the policy protocol has no authentication; "
                                    "anyone who can reach it learns the rules' verdicts", listen)
                server = await loop.create_server(self._connection, host, int(port), reuse_address=True,
                                                  backlog=BACKLOG)
                self._servers.append(server)
                log.info("listening on %s", listen)

    async def _listen_unix(self, path: str) -> asyncio.AbstractServer:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"{path} exists and is not a socket; refusing to replace it")
            os.unlink(path)  # a stale socket from a previous run
        old = os.umask(0o177)
        try:
            server = await asyncio.get_running_loop().create_unix_server(self._connection, path, backlog=BACKLOG)
        finally:
            os.umask(old)
        self._unix_paths.append(path)
        try:
            gid = grp.getgrnam(self.config.socket_group).gr_gid
            if os.stat(path).st_gid != gid:  # in the setgid directory tmpfiles makes, it has it
                os.chown(path, -1, gid)
        except KeyError:
            log.warning("group %s does not exist: %s keeps its default group", self.config.socket_group, path)
        except PermissionError:
            log.warning("cannot give %s to group %s (not root and not a member)", path, self.config.socket_group)
        os.chmod(path, self.config.socket_mode)
        log.info("listening on unix:%s mode %04o", path, self.config.socket_mode)
        return server

    def _connection(self) -> Connection:
        return Connection(self)

    def admit(self, conn: Connection) -> None:
        """A new connection: served, or closed at once when shutting down or over the limit."""
        assert conn.transport is not None
        if self.closing or len(self._conns) >= self.config.max_connections:
            self.warnings.warning("refused", "refusing connection from %s: %s", conn.peer,
                                  "shutting down" if self.closing else f"{len(self._conns)} connections already open")
            conn.transport.close()
            return
        self._conns.add(conn)

    def forget(self, conn: Connection) -> None:
        self._conns.discard(conn)

    async def _sweep(self) -> None:
        """Close connections silent beyond their timeout, checked a few times per timeout, and
        report the end of a flood of warnings."""
        period = min(1.0, max(0.05, min(self.config.idle_timeout, self.config.request_timeout) / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self._conns):
                conn.expire(now)
            self.warnings.flush()

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace`` seconds), close the rest."""
        self.closing = True
        for server in self._servers:
            server.close()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        # Bytes a client sent just before the stop may still wait in the kernel, behind
        # connections accepted in the same turn of the loop: a few turns let them be read, so
        # that their connection counts as busy and gets its answer.
        for _ in range(3):
            await asyncio.sleep(0)
        for conn in list(self._conns):
            if not conn.busy and conn.transport is not None:
                conn.transport.close()
        busy = [c for c in self._conns if c.busy]
        if busy:
            log.info("waiting up to %.0fs for %d requests in flight", grace, len(busy))
            await asyncio.wait([c.done for c in busy], timeout=grace)
        left = [c.done for c in self._conns]
        if left:  # closed ones flush their last answer; a client that reads nothing is cut off
            await asyncio.wait(left, timeout=1.0)
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.gather(*left, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self.warnings.flush(force=True)
        for server in self._servers:
            with contextlib.suppress(asyncio.CancelledError):
                await server.wait_closed()


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    sock = transport.get_extra_info("socket")
    return f"unix:{sock.getsockname()}" if sock is not None else "unix"


def _sockname(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        return f"inet:{name[0]}:{name[1]}"
    return f"unix:{name}"
