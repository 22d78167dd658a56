"""tlsgate-socketmap: serves outbound connectors to Postfix's ``socketmap:`` lookup client.

One asyncio process listens on unix sockets and/or loopback TCP (or sockets handed over by
systemd), reads netstring requests with :mod:`tlsgate.socketmap`, and answers them from an
:class:`tlsgate.outbound.OutboundIndex` rebuilt whenever the :class:`tlsgate.rules.RuleHolder`
swaps in a new snapshot. Postfix keeps a connection open and drops it after about ten idle
seconds; a client that breaks the framing gets one WARNING line and its connection closed,
the others are not disturbed. A request must arrive whole within ``request_timeout`` seconds of
its first byte, and the client must take each answer within as long (never more than
``idle_timeout``; Postfix writes a request at once and reads each answer): a client that drips its
request or never reads its answers loses its connection instead of holding, for ever, one of
the ``max_connections`` slots that Postfix needs. SIGHUP forces a reload, SIGTERM stops
accepting, lets requests being answered finish, and exits 0. Until the first rules are loaded
every answer is TEMP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import ipaddress
import logging
import os
import resource
import signal
import socket
import stat
import sys
from collections.abc import Sequence

from tlsgate import logsetup, sdnotify
from tlsgate.config import EX_CONFIG, ConfigError, SocketmapConfig, check_database_url, load_config
from tlsgate.outbound import Answer, OutboundIndex, lookup
from tlsgate.rules import RuleHolder
from tlsgate.snapshot import Snapshot
from tlsgate.socketmap import (
    MAX_QUERY,
    NetstringDecoder,
    NetstringError,
    Reply,
    Status,
    TooLong,
    parse_request,
)

log = logging.getLogger("tlsgate.socketmap")

IDENT = "tlsgate-socketmap"
READ_SIZE = 4096
STOP_GRACE = 5.0
#: descriptors the daemon needs besides its connections: listeners, database, log, event loop
FD_MARGIN = 64


class StartupError(Exception):
    """A listener could not be set up; the message is one line for the administrator."""


class IndexHolder:
    """The index of the newest snapshot; swapped by one assignment from the rules thread."""

    def __init__(self, service: str = "smtp") -> None:
        self.index: OutboundIndex | None = None
        self._service = service

    def swap(self, snapshot: Snapshot) -> None:
        index = OutboundIndex(snapshot, self._service)
        self.index = index
        log.info(
            "serving rules generation %d: %d enabled outbound connectors",
            index.generation,
            index.connector_count,
        )


def _check_fd_limit(max_connections: int) -> None:
    """Warn when the open-file limit would refuse connections below ``max_connections``:
    asyncio then stops accepting for a second at a time, and Postfix's lookups fail."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < max_connections + FD_MARGIN:
        log.warning(
            "the open file limit of %d is too low for max_connections = %d: raise it (LimitNOFILE=) to %d or more",
            soft, max_connections, max_connections + FD_MARGIN,
        )


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file left by a dead process; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as exc:
        raise StartupError(f"{path}: cannot check the existing socket: {exc}") from None
    finally:
        probe.close()
    raise StartupError(f"{path}: another process accepts connections on it")


def _parse_inet(spec: str) -> tuple[str, int]:
    rest = spec[len("inet:") :]
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


class SocketmapServer:
    """The listeners and connections of one daemon."""

    def __init__(self, cfg: SocketmapConfig, holder: IndexHolder) -> None:
        self.cfg = cfg
        self.holder = holder
        # A partial request never waits longer than an idle connection would.
        self.request_timeout = min(cfg.request_timeout, cfg.idle_timeout)
        self.warnings = logsetup.ThrottledWarnings(log)
        self._servers: list[asyncio.base_events.Server] = []
        self._paths: list[str] = []
        self._connections: dict[asyncio.Task[None], bool] = {}  # task -> answering now
        self._stopping = False
        self._flusher: asyncio.Task[None] | None = None
        self.requests = 0

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._connections)

    async def start(self, inherited: Sequence[int] = ()) -> None:
        """Listen on inherited descriptors (socket activation) or on ``cfg.listen``."""
        _check_fd_limit(self.cfg.max_connections)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_warnings())
        if inherited:
            for fd in inherited:
                sock = socket.socket(fileno=fd)
                if sock.family == socket.AF_UNIX:
                    self._servers.append(await asyncio.start_unix_server(self._handle, sock=sock))
                else:
                    self._servers.append(await asyncio.start_server(self._handle, sock=sock))
            return
        for spec in self.cfg.listen:
            if spec.startswith("unix:"):
                await self._listen_unix(spec[len("unix:") :])
            else:
                host, port = _parse_inet(spec)
                if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                    log.warning("listening on %s: socketmap requests are not authenticated", spec)
                try:
                    self._servers.append(await asyncio.start_server(self._handle, host, port))
                except OSError as exc:
                    raise StartupError(f"cannot listen on {spec}: {exc.strerror or exc}") from None

    async def _flush_warnings(self) -> None:
        """Report the end of a flood of warnings (see ThrottledWarnings.flush)."""
        while True:
            await asyncio.sleep(1.0)
            self.warnings.flush()

    async def _listen_unix(self, path: str) -> None:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise StartupError(f"directory {parent} for unix:{path} does not exist")
        _remove_stale_socket(path)
        try:
            server = await asyncio.start_unix_server(self._handle, path=path)
        except OSError as exc:
            raise StartupError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
        self._servers.append(server)
        self._paths.append(path)
        os.chmod(path, self.cfg.socket_mode)
        try:
            gid = grp.getgrnam(self.cfg.socket_group).gr_gid
        except KeyError:
            raise StartupError(f"[socketmap] socket_group {self.cfg.socket_group!r} does not exist") from None
        # In the setgid directory tmpfiles makes, the socket has the group already.
        if os.stat(path).st_gid != gid and (os.geteuid() == 0 or gid in os.getgroups()):
            os.chown(path, -1, gid)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._stopping or len(self._connections) >= self.cfg.max_connections:
            if not self._stopping:
                self.warnings.warning("refused", "refusing a connection: %d connections open", len(self._connections))
            writer.close()
            return
        self._connections[task] = False
        try:
            await self.serve(reader, writer)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # Cancelled by close(): ending normally keeps asyncio's own callback (Python 3.11)
            # from logging each idle connection's cancellation as an error at every stop.
        finally:
            self._connections.pop(task, None)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests on one connection until EOF, idle timeout, a request or an answer
        slower than ``request_timeout``, or a framing error."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        peer = _peer_name(writer)
        decoder = NetstringDecoder(MAX_QUERY)
        # When the request being received must be whole: set by its first byte. Limiting each
        # read instead would let a client drip a byte per timeout and keep the connection.
        deadline: float | None = None
        try:
            while not self._stopping:
                wait = self.cfg.idle_timeout if deadline is None else max(0.0, deadline - loop.time())
                try:
                    data = await asyncio.wait_for(reader.read(READ_SIZE), wait)
                except TimeoutError:
                    if deadline is None:
                        log.debug("%s: idle for %.0fs, closing", peer, self.cfg.idle_timeout)
                    else:
                        self.warnings.warning(
                            "slow request", "%s: request incomplete %gs after its first byte, closing the connection",
                            peer, self.request_timeout,
                        )
                    break
                if not data:
                    if decoder.pending:
                        log.warning("%s: connection closed in the middle of a request", peer)
                    break
                arrived = loop.time()
                self._connections[task] = True
                try:
                    payloads = decoder.feed(data)
                    for payload in payloads:
                        request = parse_request(payload)
                        self.requests += 1
                        writer.write(self._answer(peer, request.name, request.key))
                except NetstringError as exc:
                    log.warning("%s: malformed request, closing the connection: %s", peer, exc)
                    break
                if not decoder.pending:
                    deadline = None
                elif payloads or deadline is None:  # this read began the request left pending
                    deadline = arrived + self.request_timeout
                try:
                    await asyncio.wait_for(writer.drain(), self.request_timeout)
                except TimeoutError:
                    self.warnings.warning(
                        "unread answers", "%s: answers not read for %gs, closing the connection",
                        peer, self.request_timeout,
                    )
                    writer.transport.abort()
                    break
                self._connections[task] = False
        except ConnectionError as exc:
            log.debug("%s: connection lost: %s", peer, exc)
        finally:
            writer.close()
            # close() waits for unsent answers to be taken: a client that reads nothing gets
            # as long as for one answer, then the connection is cut.
            try:
                await asyncio.wait_for(writer.wait_closed(), self.request_timeout)
            except TimeoutError:
                writer.transport.abort()
            except ConnectionError:
                pass
            except asyncio.CancelledError:  # stopping: nobody would wait for the answers any more
                writer.transport.abort()
                raise

    def _answer(self, peer: str, name: str, key: str) -> bytes:
        answer: Answer = lookup(self.holder.index, name, key)
        reply = answer.reply
        level = logging.DEBUG if reply.status is Status.NOTFOUND else logging.INFO
        if reply.status in (Status.TEMP, Status.PERM):
            level = logging.WARNING
        log.log(
            level,
            "%s %s -> %s %s%s",
            name,
            key,
            reply.status.value,
            reply.data,
            f" connector={answer.connector}" if answer.connector else "",
        )
        try:
            return reply.encode()
        except TooLong:
            log.error("%s %s: answer of connector %s is too long for Postfix", name, key, answer.connector)
            return Reply(Status.TEMP, "answer too long").encode()
        except UnicodeEncodeError:  # a value no check kept out of the rules: wait, never crash
            log.error("%s %s: answer of connector %r cannot be encoded", name, key, answer.connector)
            return Reply(Status.TEMP, "answer cannot be encoded").encode()

    async def close(self, grace: float = STOP_GRACE) -> None:
        """Stop accepting, let requests being answered finish, close idle connections."""
        self._stopping = True
        for server in self._servers:
            server.close()
        for task, busy in list(self._connections.items()):
            if not busy:
                task.cancel()
        pending = list(self._connections)
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
        for server in self._servers:
            with contextlib.suppress(asyncio.CancelledError):
                await server.wait_closed()
        for path in self._paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self._flusher is not None:
            self._flusher.cancel()
        self.warnings.flush(force=True)


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "unix"


async def run(cfg_path: str | None) -> int:
    cfg = load_config(cfg_path)
    holder = IndexHolder(cfg.socketmap.transport)
    # Inbound address entries never decide an outbound answer: no DNS lookups here.
    rules = RuleHolder(cfg.database, on_swap=holder.swap, resolve_dns=False)
    server = SocketmapServer(cfg.socketmap, holder)
    inherited = [fd for fd, _ in sdnotify.listen_fds()]
    where = f"{len(inherited)} socket(s) from systemd" if inherited else ", ".join(cfg.socketmap.listen)
    try:
        await server.start(inherited)
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    rules.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        log.info("SIGHUP: reloading rules")
        sdnotify.notify("RELOADING=1")
        rules.request_reload()
        sdnotify.notify("READY=1")

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    log.info("listening on %s", where)
    sdnotify.notify("READY=1", f"STATUS=serving {where}")
    interval = sdnotify.watchdog_interval()
    watchdog = asyncio.create_task(_watchdog(interval, rules)) if interval else None
    await stop.wait()
    sdnotify.notify("STOPPING=1")
    log.info("stopping after %d requests", server.requests)
    if watchdog is not None:
        watchdog.cancel()
    await server.close()
    rules.stop()
    return 0


async def _watchdog(interval: float, rules: RuleHolder) -> None:
    # Pings stop, and systemd restarts the daemon, when the loop or the rules' polling stops.
    while True:
        if rules.alive:
            sdnotify.notify("WATCHDOG=1", f"STATUS={rules.status}")
        await asyncio.sleep(interval)


def check_config(path: str | None) -> None:
    """Everything that can be checked without listening: the file and the database URL."""
    check_database_url(load_config(path))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=IDENT, description="Serve outbound connectors to Postfix socketmap lookups.")
    parser.add_argument("-c", "--config", help="configuration file (default /etc/tlsgate/tlsgate.conf)")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    args = parser.parse_args(argv)
    try:
        check_config(args.config)
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"{IDENT}: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        return 0
    logsetup.configure(cfg.log, IDENT)
    try:
        return asyncio.run(run(args.config))
    finally:
        logsetup.stop()


if __name__ == "__main__":
    sys.exit(main())
