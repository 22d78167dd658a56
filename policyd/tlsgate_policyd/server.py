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

from tlsgate.config import Config
from tlsgate.decisionlog import decision_line
from tlsgate.engine import decide
from tlsgate.metrics import Metrics
from tlsgate.model import Decision, SessionFacts
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

READ_SIZE = 65536
# Every smtpd process may connect at once after a restart; the default backlog of 100 would
# make some of them fail (EAGAIN on unix sockets) and answer default_action.
BACKLOG = 1024


class Responder:
    """Turns one request into one answer line, and logs the decision."""

    def __init__(self, config: Config, snapshot: Callable[[], Snapshot | None],
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 metrics: Metrics | None = None) -> None:
        self._config = config
        self._snapshot = snapshot
        self._clock = clock
        self._metrics = metrics
        self._monitor_header = "X-TLSgate-Monitor" if config.policyd.monitor_prepend else None
        self.decisions = 0

    def respond(self, attrs: dict[str, str]) -> str:
        if attrs.get("request") != "smtpd_access_policy":
            log.warning("ignoring request=%r: answering DUNNO", attrs.get("request", "")[:40])
            return "DUNNO"
        started = time.perf_counter()
        facts = facts_from_request(attrs)
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
        self._log(facts, decision)
        return answer(decision, monitor_header=self._monitor_header)

    @staticmethod
    def _log(facts: SessionFacts, decision: Decision) -> None:
        level = logging.INFO if decision.connector is not None else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "%s", decision_line(facts, decision))


class Connection:
    __slots__ = ("busy", "peer", "task")

    def __init__(self, peer: str, task: asyncio.Task[None]) -> None:
        self.peer = peer
        self.task = task
        self.busy = False  # part of a request received and not yet answered


class PolicyServer:
    def __init__(self, config: Config, responder: Responder) -> None:
        self._cfg = config.policyd
        self._responder = responder
        self._limits = Limits(self._cfg.max_line, self._cfg.max_attributes, self._cfg.max_request)
        self._servers: list[asyncio.Server] = []
        self._conns: set[Connection] = set()
        self._closing = False
        self._unix_paths: list[str] = []

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def start(self, inherited: list[int] | None = None) -> None:
        """Listen on inherited (socket-activated) descriptors, or on the configured addresses."""
        if inherited:
            for fd in inherited:
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                if sock.family == socket.AF_UNIX:
                    server = await asyncio.start_unix_server(self._accept, sock=sock, limit=self._limits.max_line)
                else:
                    server = await asyncio.start_server(self._accept, sock=sock, limit=self._limits.max_line)
                self._servers.append(server)
                log.info("listening on inherited socket %s", _sockname(sock))
            return
        for listen in self._cfg.listen:
            if listen.startswith("unix:"):
                self._servers.append(await self._listen_unix(listen[5:]))
            else:
                host, _, port = listen[5:].rpartition(":")
                host = host.strip("[]")
                with contextlib.suppress(ValueError):
                    if not ipaddress.ip_address(host).is_loopback:
                        log.warning("listening on %s: the policy protocol has no authentication; "
                                    "anyone who can reach it learns the rules' verdicts", listen)
                server = await asyncio.start_server(self._accept, host, int(port), reuse_address=True,
                                                    backlog=BACKLOG)
                self._servers.append(server)
                log.info("listening on %s", listen)

    async def _listen_unix(self, path: str) -> asyncio.Server:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"{path} exists and is not a socket; refusing to replace it")
            os.unlink(path)  # a stale socket from a previous run
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._accept, path, limit=self._limits.max_line,
                                                     backlog=BACKLOG)
        finally:
            os.umask(old)
        self._unix_paths.append(path)
        try:
            gid = grp.getgrnam(self._cfg.socket_group).gr_gid
            os.chown(path, -1, gid)
        except KeyError:
            log.warning("group %s does not exist: %s keeps its default group", self._cfg.socket_group, path)
        except PermissionError:
            log.warning("cannot give %s to group %s (not root and not a member)", path, self._cfg.socket_group)
        os.chmod(path, self._cfg.socket_mode)
        log.info("listening on unix:%s mode %04o", path, self._cfg.socket_mode)
        return server

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        if self._closing or len(self._conns) >= self._cfg.max_connections:
            log.warning("refusing connection from %s: %s", peer,
                        "shutting down" if self._closing else f"{len(self._conns)} connections already open")
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        conn = Connection(peer, task)
        self._conns.add(conn)
        try:
            await self._serve(conn, reader, writer)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, OSError) as exc:
            log.debug("connection from %s ended: %s", peer, exc)
        finally:
            self._conns.discard(conn)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(self, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = RequestReader(self._limits)
        while not self._closing or conn.busy:
            timeout = self._cfg.request_timeout if parser.pending else self._cfg.idle_timeout
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
            except TimeoutError:
                if parser.pending:
                    log.warning("closing connection from %s: request incomplete after %.0fs", conn.peer, timeout)
                else:
                    log.debug("closing idle connection from %s", conn.peer)
                return
            if not data:
                if parser.pending:
                    log.warning("connection from %s closed in the middle of a request", conn.peer)
                return
            try:
                for request in parser.feed(data):
                    writer.write(encode(self._responder.respond(request)))
            except ProtocolError as exc:
                log.warning("closing connection from %s: %s", conn.peer, exc)
                return
            conn.busy = parser.pending
            await writer.drain()

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace`` seconds), close the rest."""
        self._closing = True
        for server in self._servers:
            server.close()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        idle = [c.task for c in self._conns if not c.busy]
        for task in idle:
            task.cancel()
        busy = [c.task for c in self._conns if c.busy]
        if busy:
            log.info("waiting up to %.0fs for %d requests in flight", grace, len(busy))
            _done, pending = await asyncio.wait(busy, timeout=grace)
            for task in pending:
                task.cancel()
        await asyncio.gather(*(c.task for c in list(self._conns)), return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(asyncio.CancelledError):
                await server.wait_closed()


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    sock = writer.get_extra_info("socket")
    return f"unix:{sock.getsockname()}" if sock is not None else "unix"


def _sockname(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        return f"inet:{name[0]}:{name[1]}"
    return f"unix:{name}"
