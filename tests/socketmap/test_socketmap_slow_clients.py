"""tlsgate-socketmap against clients that are slow on purpose: one that drips its request a
byte at a time, one that pipelines requests and never reads the answers. Neither may keep a
connection slot for ever, or Postfix's own connections are refused once such clients fill
``max_connections``; a well-behaved persistent client, as Postfix is, must never be cut off."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.socketmap.socketmap_daemon import DAEMON, SocketmapDaemon, make_database
from tests.support.postfix import free_port
from tlsgate.config import PolicydConfig, SocketmapConfig
from tlsgate.logsetup import ThrottledWarnings
from tlsgate.model import OutboundConnector, TlsLevel
from tlsgate.patterns import DomainPattern
from tlsgate.snapshot import Snapshot
from tlsgate.socketmap import MAX_REPLY, NetstringDecoder, Reply, Status, encode_request, parse_reply
from tlsgate.socketmapd import FD_MARGIN, IndexHolder, SocketmapServer

PARTNER = Reply(Status.OK, "encrypt")
# an answer of about 4 KB: a client that does not read fills any socket buffer with few requests
WIDE_NAMES = tuple(f"mx{i}.{'a' * 60}.wide.test" for i in range(60))


def holder() -> IndexHolder:
    h = IndexHolder()
    partner = OutboundConnector(name="partner", recipient_domains=(DomainPattern.parse("partner.test"),),
                                tls_level=TlsLevel.ENCRYPT)
    wide = OutboundConnector(name="wide", recipient_domains=(DomainPattern.parse("wide.test"),),
                             tls_level=TlsLevel.SECURE, match_names=WIDE_NAMES)
    h.swap(Snapshot(inbound=(), outbound=(partner, wide), generation=1))
    return h


class Server(SocketmapServer):
    """The daemon's server, telling the test each time it has let a connection go."""

    def __init__(self, port: int, *, idle_timeout: float, max_connections: int, **kw: float) -> None:
        cfg = SocketmapConfig(listen=(f"inet:127.0.0.1:{port}",), idle_timeout=idle_timeout,
                              max_connections=max_connections, **kw)
        super().__init__(cfg, holder())
        self.ended: asyncio.Queue[None] = asyncio.Queue()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await super().serve(reader, writer)
        finally:
            # _handle frees the slot in the same step, before the test wakes up
            self.ended.put_nowait(None)


async def query(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str) -> Reply:
    writer.write(encode_request("tls_policy", key))
    await writer.drain()
    return await read_reply(reader)


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    decoder = NetstringDecoder(MAX_REPLY)
    while True:
        data = await asyncio.wait_for(reader.read(100), 5)
        if not data:
            raise ConnectionError("the server closed the connection")
        payloads = decoder.feed(data)
        if payloads:
            return parse_reply(payloads[0])


async def drip(port: int, every: float, give_up: float) -> float:
    """Send a request's prefix, then one byte every ``every`` seconds (each well within the
    idle timeout) until the server closes the connection; seconds that took (``give_up``
    when it never does)."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = loop.time()
    writer.write(b"9999:tls_policy ")
    closed = asyncio.ensure_future(reader.read())  # b"" at EOF, or ConnectionResetError
    try:
        while loop.time() - start < give_up:
            done, _ = await asyncio.wait([closed], timeout=every)
            if done:
                return loop.time() - start
            writer.write(b"x")
        return give_up
    finally:
        closed.cancel()
        writer.close()


@pytest.mark.parametrize(
    ("idle_timeout", "timeouts", "deadline"),
    [
        # the reported case: the request deadline never exceeds the idle timeout
        (1.0, {}, 1.0),
        (30.0, {"request_timeout": 0.5}, 0.5),
    ],
)
def test_dripping_clients_lose_their_slots_and_postfix_is_served(
    caplog: pytest.LogCaptureFixture, idle_timeout: float, timeouts: dict[str, float], deadline: float
) -> None:
    async def main() -> tuple[list[float], Reply, int]:
        port = free_port()
        server = Server(port, idle_timeout=idle_timeout, max_connections=2, **timeouts)
        await server.start()
        try:
            # a byte every 0.2 s: each read would meet any per-read timeout of the two
            took = await asyncio.gather(*(drip(port, every=0.2, give_up=deadline + 5) for _ in range(2)))
            for _ in took:
                await asyncio.wait_for(server.ended.get(), 5)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            reply = await query(reader, writer, "partner.test")
            writer.close()
            # the second client's line is held back: no flood in mail.log
            assert len(incomplete()) == 1, incomplete()
            return list(took), reply, server.connections
        finally:
            await server.close(grace=0.1)

    def incomplete() -> list[str]:
        return [r.getMessage() for r in caplog.records if "request incomplete" in r.getMessage()]

    with caplog.at_level(logging.WARNING, "tlsgate.socketmap"):
        took, reply, open_after = asyncio.run(main())
    for seconds in took:
        # counted from the first byte: not cut before the deadline, and not much after it
        assert deadline - 0.05 <= seconds < deadline + 5, took
    assert reply == PARTNER
    assert open_after == 1
    cut = incomplete()
    assert len(cut) == 2, cut  # the line held back is written at the stop
    assert all("after its first byte, closing the connection" in line for line in cut)
    assert server_request_timeout(idle_timeout, timeouts) == deadline


def server_request_timeout(idle_timeout: float, timeouts: dict[str, float]) -> float:
    return SocketmapServer(SocketmapConfig(idle_timeout=idle_timeout, **timeouts), IndexHolder()).request_timeout


def test_default_request_timeout_is_short_and_below_the_idle_timeout() -> None:
    assert SocketmapConfig().request_timeout == 10.0
    assert server_request_timeout(300.0, {}) == 10.0
    assert server_request_timeout(2.0, {}) == 2.0


def test_a_persistent_client_with_many_sequential_lookups_is_never_cut(caplog: pytest.LogCaptureFixture) -> None:
    """Postfix's way: one connection, one whole request at a time, each answer read. The
    connection lives many times the request deadline; a request whose bytes arrive in two
    reads, or that starts in the read of the one before, is answered within its deadline."""

    async def main() -> tuple[list[Reply], int]:
        port = free_port()
        server = Server(port, idle_timeout=5.0, max_connections=1, request_timeout=1.0)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            replies = []
            for i in range(40):  # 40 x 0.05 s: twice the request deadline
                replies.append(await query(reader, writer, "partner.test" if i % 2 else f"n{i}.example"))
                await asyncio.sleep(0.05)
            whole = encode_request("tls_policy", "partner.test")
            for _ in range(3):  # split requests, each completed 0.3 s after its first byte
                writer.write(whole[:7])
                await asyncio.sleep(0.3)
                writer.write(whole[7:])
                replies.append(await read_reply(reader))
            writer.write(whole + whole[:5])  # the next request begins in the same read
            replies.append(await read_reply(reader))
            await asyncio.sleep(0.3)
            writer.write(whole[5:])
            replies.append(await read_reply(reader))
            replies.append(await query(reader, writer, "partner.test"))
            still_open = server.connections
            writer.close()
            return replies, still_open
        finally:
            await server.close(grace=0.1)

    with caplog.at_level(logging.WARNING, "tlsgate.socketmap"):
        replies, still_open = asyncio.run(main())
    assert replies[:40] == [PARTNER if i % 2 else Reply(Status.NOTFOUND) for i in range(40)]
    assert replies[40:] == [PARTNER] * 6
    assert still_open == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_client_that_never_reads_its_answers_loses_its_slot(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[float, Reply, int]:
        loop = asyncio.get_running_loop()
        port = free_port()
        server = Server(port, idle_timeout=30.0, max_connections=1, request_timeout=0.5)
        await server.start()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            _, writer = await asyncio.open_connection(sock=sock)
            start = loop.time()
            # pipelined, never read: 40 MB of answers, far above what the socket buffers (4 MB
            # at most on loopback) and the server's write buffer hold: drain() waits for ever
            writer.write(encode_request("tls_policy", "wide.test") * 10_000)
            await asyncio.wait_for(server.ended.get(), 10)
            took = loop.time() - start
            writer.transport.abort()
            reader, postfix = await asyncio.open_connection("127.0.0.1", port)
            reply = await query(reader, postfix, "partner.test")
            postfix.close()
            return took, reply, server.connections
        finally:
            await server.close(grace=0.1)

    with caplog.at_level(logging.WARNING, "tlsgate.socketmap"):
        took, reply, open_after = asyncio.run(main())
    assert took < 5, took
    assert reply == PARTNER
    assert open_after == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert lines[0].endswith(": answers not read for 0.5s, closing the connection"), lines


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttled_warnings_one_line_per_kind_and_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    warnings = ThrottledWarnings(logging.getLogger("tlsgate.socketmap"), interval=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, "tlsgate.socketmap"):
        assert warnings.warning("slow", "%s: slow", "a")
        clock.now += 10
        assert not warnings.warning("slow", "%s: slow", "b")
        assert not warnings.warning("slow", "%s: slow", "c")
        assert warnings.warning("refused", "refusing: %d open", 2)  # another kind is not held back
        clock.now += 50.5
        assert warnings.warning("slow", "%s: slow", "d")
        clock.now += 61
        assert warnings.warning("slow", "%s: slow", "e")
    assert [r.getMessage() for r in caplog.records] == [
        "a: slow",
        "refusing: 2 open",
        "d: slow (and 2 more like it in the last 60 s)",
        "e: slow",
    ]


def test_throttled_warnings_report_a_flood_that_has_ended(caplog: pytest.LogCaptureFixture) -> None:
    """Without a next line of its kind, the count held back is written by flush once the
    interval has passed since the last line (and by a forced flush at a stop)."""
    clock = FakeClock()
    warnings = ThrottledWarnings(logging.getLogger("tlsgate.socketmap"), interval=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, "tlsgate.socketmap"):
        warnings.warning("slow", "%s: slow", "a")
        for peer in "bcd":
            clock.now += 5
            warnings.warning("slow", "%s: slow", peer)
        clock.now += 44
        warnings.flush()  # 59 s after the last line: nothing yet
        clock.now += 1
        warnings.flush()
        warnings.flush()  # written once
        clock.now += 1
        warnings.warning("slow", "%s: slow", "e")  # held: a line of its kind was written 1 s ago
        warnings.warning("refused", "refusing: %d open", 2)
        warnings.flush(force=True)
    assert [r.getMessage() for r in caplog.records] == [
        "a: slow",
        "d: slow (and 2 more like it in the last 60 s)",
        "refusing: 2 open",
        "e: slow",
    ]


def test_a_low_open_file_limit_is_reported_at_start(tmp_path: Path) -> None:
    """Above the soft limit asyncio stops accepting (EMFILE) long before max_connections."""
    d = SocketmapDaemon(tmp_path / "run", make_database(tmp_path / "rules.sqlite"),
                        listen=[f"inet:127.0.0.1:{free_port()}"])
    # exec keeps the limit: the daemon starts with a soft limit of 256 and max_connections 2000
    wrapper = (
        "import os, resource, sys; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); os.execv(sys.argv[1], sys.argv[1:])"
    )
    with open(d.log_path, "ab") as log:
        d.process = subprocess.Popen([sys.executable, "-c", wrapper, str(DAEMON), "--config", str(d.config_path)],
                                     stdout=log, stderr=log)
    try:
        d.wait_for_log("listening on")
        assert "the open file limit of 256 is too low for max_connections = 2000: raise it (LimitNOFILE=) to 2064" in d.log()
    finally:
        d.stop()


def test_the_default_limit_is_not_reported(tmp_path: Path) -> None:
    with SocketmapDaemon(tmp_path / "run", make_database(tmp_path / "rules.sqlite"),
                         extra="max_connections = 100\n") as d:
        d.wait_for_log("listening on")
        assert "open file limit" not in d.log()


def test_stopping_with_an_idle_connection_logs_no_error(caplog: pytest.LogCaptureFixture) -> None:
    """close() cancels idle connections; Python 3.11's stream callback used to log each as an
    'Exception in callback' ERROR with a traceback at every stop."""

    async def main() -> tuple[Reply, bytes]:
        port = free_port()
        server = Server(port, idle_timeout=30.0, max_connections=10)
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        reply = await query(reader, writer, "partner.test")  # answered: the connection is idle
        await server.close(grace=0.1)
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return reply, rest

    with caplog.at_level(logging.WARNING):
        reply, rest = asyncio.run(main())
    assert reply == PARTNER
    assert rest == b""  # closed by the server
    assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.parametrize(("unit", "section"), [("tlsgate-socketmap.service", SocketmapConfig),
                                                ("tlsgate-policyd.service", PolicydConfig)])
def test_units_allow_a_descriptor_per_connection(unit: str, section: type[SocketmapConfig | PolicydConfig]) -> None:
    text = (Path(__file__).resolve().parents[2] / "systemd" / unit).read_text()
    limits = [int(line.split("=", 1)[1]) for line in text.splitlines() if line.startswith("LimitNOFILE=")]
    assert len(limits) == 1, limits
    assert limits[0] >= section().max_connections + FD_MARGIN > 1024
