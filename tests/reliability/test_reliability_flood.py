"""Floods against a running tlsgate-policyd (the installed console script on a unix socket):
a thousand idle connections at once, slow clients sending a byte at a time, malformed and
oversized requests on many connections, and thousands of pipelined requests, while a
well-behaved client, like an smtpd process with its persistent connection, keeps getting
answers. Memory is read from /proc/PID/status before and after and must stay within a
generous bound. Assertions are on answers and closed connections, never on timings."""

from __future__ import annotations

import re
import resource
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.policyd.policydhelp import PolicyClient, PolicydProcess, request, write_config
from tests.reliability.results import record
from tests.support.rulesdb import make_rules_db

IDLE = 1000
SLOW = 50
MALFORMED = 200
PIPELINED = 2000
RSS_GROWTH_LIMIT_KB = 64 * 1024  # generous: a leak per connection would show far above

RULES = """
INSERT INTO inbound_connector (name, on_failure) VALUES ('contoso-in', 'reject');
INSERT INTO inbound_domain VALUES ('contoso-in', 'sender', 'contoso.com');
"""
REFUSED = "REJECT 5.7.10"

GARBAGE = [
    b"no equals sign\n\n",
    b"name=" + b"x" * 100_000 + b"\n\n",
    b"\xff\xfe\x00garbage\x80\n\n",
    b"".join(b"a%d=b\n" % i for i in range(5000)) + b"\n",
    b"=no-name\n\n",
]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def wait_until(what: str, condition: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    return sock


def closed_without_answer(sock: socket.socket) -> bool:
    """Read until EOF: True when the daemon closed the connection without answering."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    assert received == b"", received[:80]
    return True


@pytest.fixture(scope="module")
def daemon() -> Iterator[PolicydProcess]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * (IDLE + SLOW + MALFORMED) + 256
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {wanted} descriptors needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))  # the daemon inherits it
    work = Path(tempfile.mkdtemp(prefix="tlsgate-flood-"))
    process = None
    try:
        sock = work / "policy.sock"
        url = make_rules_db(work / "rules.sqlite", RULES)
        process = PolicydProcess(write_config(work, url, f"unix:{sock}"), sock, work / "policyd.log").start()
        yield process
    finally:
        if process is not None:
            process.stop()
        shutil.rmtree(work, ignore_errors=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_floods_leave_a_well_behaved_client_answered(daemon: PolicydProcess) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    good = PolicyClient(daemon.sock)
    assert good.ask(request(sender="a@contoso.com")).startswith(REFUSED)
    assert good.ask(request(sender="a@other.test")) == "DUNNO"
    answered = 2
    rss_before = rss_kb(pid)
    fds_before = open_fds(pid)

    # A thousand idle connections at once: the daemon holds them all and still answers.
    idle = [connect(daemon.sock) for _ in range(IDLE)]
    wait_until("the daemon accepted every idle connection", lambda: open_fds(pid) >= fds_before + IDLE)
    assert good.ask(request(sender="b@contoso.com")).startswith(REFUSED)
    answered += 1
    rss_peak = rss_kb(pid)

    # Slow clients: each sends its request one byte per round, all interleaved, with the
    # well-behaved client asking between rounds. Every slow client gets its answer in the end.
    slow = [connect(daemon.sock) for _ in range(SLOW)]
    slow_request = request(sender="slow@contoso.com")
    for index in range(len(slow_request)):
        for sock in slow:
            sock.sendall(slow_request[index:index + 1])
        if index % 100 == 0:
            assert good.ask(request(sender="c@other.test")) == "DUNNO"
            answered += 1
    for sock in slow:
        reader = PolicyClient.__new__(PolicyClient)
        reader.sock, reader.buffer = sock, b""
        assert reader.read_answer().startswith(REFUSED)
        answered += 1
    rss_peak = max(rss_peak, rss_kb(pid))

    # Malformed and oversized requests: each such connection is closed, only that one.
    bad = [connect(daemon.sock) for _ in range(MALFORMED)]
    for number, sock in enumerate(bad):
        try:
            sock.sendall(GARBAGE[number % len(GARBAGE)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed already, while the oversized line was still being written
        if number % 20 == 0:
            assert good.ask(request(sender="d@contoso.com")).startswith(REFUSED)
            answered += 1
    assert all(closed_without_answer(sock) for sock in bad)
    rss_peak = max(rss_peak, rss_kb(pid))

    # Thousands of requests pipelined on one connection: one answer each, in order.
    burst = PolicyClient(daemon.sock)
    burst.sock.sendall(b"".join(request(sender=f"n{i}@contoso.com" if i % 2 else f"n{i}@other.test")
                                for i in range(PIPELINED)))
    for i in range(PIPELINED):
        assert burst.read_answer().startswith(REFUSED if i % 2 else "DUNNO")
    answered += PIPELINED
    rss_peak = max(rss_peak, rss_kb(pid))

    # The idle and slow connections are still served: a request on any of them is answered.
    for sock in (idle[0], idle[-1], slow[0]):
        client = PolicyClient.__new__(PolicyClient)
        client.sock, client.buffer = sock, b""
        assert client.ask(request(sender="e@other.test")) == "DUNNO"
        answered += 1

    for sock in idle + slow + bad:
        sock.close()
    burst.close()
    wait_until("the daemon closed every flood connection", lambda: open_fds(pid) <= fds_before)
    assert good.ask(request(sender="f@contoso.com")).startswith(REFUSED)
    answered += 1
    rss_after = rss_kb(pid)
    good.close()
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_KB, (rss_before, rss_after)
    assert rss_peak - rss_before < 2 * RSS_GROWTH_LIMIT_KB, (rss_before, rss_peak)
    # one WARNING line per malformed connection
    daemon.wait_log("closing connection from", count=MALFORMED)
    assert daemon.proc.poll() is None

    record("flood", {
        "title": "Floods against tlsgate-policyd (one well-behaved client answered throughout)",
        "idle connections held at once": IDLE,
        "slow clients (one byte per round)": SLOW,
        "malformed or oversized connections closed": MALFORMED,
        "pipelined requests on one connection": PIPELINED,
        "requests answered": answered,
        "RSS before (KiB)": rss_before,
        "RSS peak (KiB)": rss_peak,
        "RSS after (KiB)": rss_after,
        "RSS growth bound asserted (KiB)": RSS_GROWTH_LIMIT_KB,
    })


def test_connections_beyond_the_limit_are_refused_and_the_others_served() -> None:
    """With max_connections = 50, a flood of 200 connections gets the surplus closed at once
    while the connection opened first keeps being answered."""
    work = Path(tempfile.mkdtemp(prefix="tlsgate-flood-limit-"))
    sock = work / "policy.sock"
    url = make_rules_db(work / "rules.sqlite", RULES)
    process = PolicydProcess(write_config(work, url, f"unix:{sock}", max_connections="50"), sock,
                             work / "policyd.log").start()
    flood: list[socket.socket] = []
    try:
        good = PolicyClient(sock)
        assert good.ask(request(sender="a@contoso.com")).startswith(REFUSED)
        flood = [connect(sock) for _ in range(200)]
        refused = sum(closed_without_answer(s) for s in flood[60:])
        assert refused == 140
        assert good.ask(request(sender="b@contoso.com")).startswith(REFUSED)
        served = PolicyClient.__new__(PolicyClient)
        served.sock, served.buffer = flood[0], b""
        assert served.ask(request(sender="c@other.test")) == "DUNNO"
        # 140 refusals, one line: a flood must not flood mail.log too
        log = process.wait_log("refusing connection from")
        assert log.count("refusing connection from") == 1
        for s in flood:
            s.close()
        # ... and the count of the others is written once the flood is over (here: at the stop)
        assert process.stop() == 0
        lines = [line for line in process.log().splitlines() if "refusing connection from" in line]
        held = re.search(r"\(and (\d+) more like it in the last \d+ s\)$", lines[-1])
        assert len(lines) == 2 and held and int(held.group(1)) >= 139, lines
    finally:
        for s in flood:
            s.close()
        process.stop()
        shutil.rmtree(work, ignore_errors=True)
    record("flood", {"connections beyond max_connections=50 refused (of 200)": refused})
