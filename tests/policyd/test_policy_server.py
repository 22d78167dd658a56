"""tlsgate-policyd over real unix sockets: many clients, bad clients, reloads, outages, stop."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.policyd.policydhelp import BIN, PolicyClient, PolicydProcess, request, write_config
from tests.support.rulesdb import make_rules_db
from tlsgate.store import init_schema, open_engine

RULES = """
INSERT INTO inbound_connector (name, on_failure) VALUES ('contoso-in', 'reject');
INSERT INTO inbound_domain VALUES ('contoso-in', 'sender', 'contoso.com');
"""


def make_db(path: Path, sql: str = RULES) -> str:
    return make_rules_db(path, sql)


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tlsgate-policyd-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(work: Path) -> Iterator[PolicydProcess]:
    url = make_db(work / "rules.sqlite")
    sock = work / "policy.sock"
    config = write_config(work, url, f"unix:{sock}", max_line="1024", max_attributes="64",
                          idle_timeout="30", request_timeout="1")
    proc = PolicydProcess(config, sock, work / "policyd.log").start()
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()


def test_answers_and_persistent_connection(daemon: PolicydProcess) -> None:
    client = PolicyClient(daemon.sock)
    for _ in range(3):
        assert client.ask(request()) == "REJECT 5.7.10 TLS required by connector contoso-in"
    tls = request(encryption_protocol="TLSv1.3", encryption_cipher="TLS_AES_256_GCM_SHA384", encryption_keysize="256")
    assert client.ask(tls) == "DUNNO"
    assert client.ask(request(sender="a@other.test")) == "DUNNO"
    client.close()
    log = daemon.wait_log('reason="TLS required by connector contoso-in"', count=3)
    assert "NOQUEUE: reject connector=contoso-in client=mail.example.net[203.0.113.5] from=<a@contoso.com>" in log


def test_socket_mode(daemon: PolicydProcess) -> None:
    assert oct(os.stat(daemon.sock).st_mode & 0o777) == "0o666"


def test_many_concurrent_connections(daemon: PolicydProcess) -> None:
    clients = [PolicyClient(daemon.sock) for _ in range(200)]
    errors: list[str] = []

    def work(c: PolicyClient) -> None:
        for _ in range(5):
            got = c.ask(request())
            if not got.startswith("REJECT"):
                errors.append(got)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    for c in clients:
        c.close()


def test_requests_in_pieces_and_in_pairs_on_interleaved_connections(daemon: PolicydProcess) -> None:
    """Every connection's bytes stay its own, however reads of several connections interleave."""
    partner, other = request(), request(sender="a@other.test")
    first, second = PolicyClient(daemon.sock), PolicyClient(daemon.sock)
    for cut in (1, len(partner) // 2, len(partner) - 1):
        first.sock.sendall(partner[:cut])
        assert second.ask(other) == "DUNNO"  # read and answered while the first waits in pieces
        first.sock.sendall(partner[cut:])
        assert first.read_answer().startswith("REJECT 5.7.10")
    second.sock.sendall(partner + other + partner)
    assert [second.read_answer().split()[0] for _ in range(3)] == ["REJECT", "DUNNO", "REJECT"]
    first.close()
    second.close()


def test_a_stuck_client_does_not_block_others(daemon: PolicydProcess) -> None:
    stuck = PolicyClient(daemon.sock)
    stuck.sock.sendall(b"request=smtpd_access_policy\nsender=a@contoso.com\n")  # never finishes
    other = PolicyClient(daemon.sock)
    assert other.ask(request()).startswith("REJECT")
    # The incomplete request is dropped after request_timeout (1 s here), the other stays served.
    assert stuck.closed_by_peer()
    assert other.ask(request()).startswith("REJECT")
    daemon.wait_log("request incomplete 1s after its first byte")


def test_a_client_dripping_its_request_loses_its_connection(daemon: PolicydProcess) -> None:
    # A byte every 0.25 s never leaves the connection silent for request_timeout (1 s): counted
    # from the request's first byte, the deadline still ends it, and its slot is freed.
    drip = PolicyClient(daemon.sock)
    drip.sock.settimeout(0.25)
    closed = False
    for byte in request()[:40]:
        try:
            drip.sock.sendall(bytes((byte,)))
            closed = drip.sock.recv(1) == b""
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        if closed:
            break
    assert closed, "still connected after 10 s of dripping"
    daemon.wait_log("request incomplete 1s after its first byte")


def test_idle_and_unread_connections_are_closed(work: Path) -> None:
    url = make_db(work / "rules.sqlite")
    sock = work / "policy.sock"
    config = write_config(work, url, f"unix:{sock}", idle_timeout="1", request_timeout="1")
    proc = PolicydProcess(config, sock, work / "policyd.log").start()
    try:
        idle = PolicyClient(sock)
        assert idle.ask(request()).startswith("REJECT")
        # A client that sends request after request and never reads an answer: the daemon stops
        # reading it once its answers pile up, and cuts it off once they have waited request_timeout.
        greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        greedy.connect(str(sock))
        greedy.settimeout(0.2)
        many = request() * 2000
        sent = 0
        with contextlib.suppress(TimeoutError, BrokenPipeError, ConnectionResetError):
            for _ in range(200):
                sent += greedy.send(many)
        assert sent > 0
        other = PolicyClient(sock)
        assert other.ask(request()).startswith("REJECT")  # the others are served meanwhile
        assert idle.closed_by_peer()
        proc.wait_log("closing idle connection")
        greedy.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while greedy.recv(1 << 20):
                pass  # the answers it had, then the end of the connection
        greedy.close()
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.mark.parametrize("bad", [
    b"this is not a policy request\n",
    b"sender=" + b"x" * 5000 + b"\n",
    b"".join(b"a%d=1\n" % i for i in range(100)),
    b"\xff\xfe\x00garbage\n",
])
def test_bad_input_closes_only_that_connection(daemon: PolicydProcess, bad: bytes) -> None:
    good = PolicyClient(daemon.sock)
    assert good.ask(request()).startswith("REJECT")
    evil = PolicyClient(daemon.sock)
    evil.sock.sendall(bad)
    assert evil.closed_by_peer()
    assert good.ask(request()).startswith("REJECT")
    daemon.wait_log("WARNING: closing connection from")


# Loaded by the daemon's interpreter through PYTHONPATH: deciding fails for one sender.
FAULT = """
import tlsgate_policyd.server as server

_decide = server.decide


def decide(snapshot, facts, now):
    if facts.sender == "boom@contoso.com":
        raise RuntimeError("injected fault")
    return _decide(snapshot, facts, now)


server.decide = decide
"""


def test_a_failure_while_deciding_answers_a_temporary_failure_and_keeps_the_connection(work: Path) -> None:
    url = make_db(work / "rules.sqlite")
    sock = work / "policy.sock"
    (work / "fault").mkdir()
    (work / "fault" / "sitecustomize.py").write_text(FAULT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(work / "fault"), os.environ.get("PYTHONPATH")]))}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(work, url, f"unix:{sock}", metrics=f"127.0.0.1:{port}")
    proc = PolicydProcess(config, sock, work / "policyd.log", env=env).start()
    try:
        client = PolicyClient(sock)
        assert client.ask(request(sender="boom@contoso.com", queue_id="4F2A1C3B")) == (
            "DEFER_IF_PERMIT 4.3.0 tlsgate-policyd internal error, try again later")
        assert client.ask(request()).startswith("REJECT 5.7.10")
        log = proc.wait_log("RuntimeError: injected fault")
        assert "ERROR: 4F2A1C3B: deciding failed; answering DEFER_IF_PERMIT" in log
        # The same fault again: one line, no second traceback.
        assert client.ask(request(sender="boom@contoso.com", queue_id="5B3C2D4E")).startswith("DEFER_IF_PERMIT 4.3.0")
        log = proc.wait_log("5B3C2D4E: deciding failed")
        assert ("ERROR: 5B3C2D4E: deciding failed; answering DEFER_IF_PERMIT (RuntimeError: injected fault; "
                "its traceback was logged at most 60 s ago)") in log
        assert log.count("Traceback (most recent call last)") == 1
        stats = subprocess.run([BIN / "tlsgate", "-c", config, "stats"], capture_output=True, text=True, timeout=30)
        assert "(no connector): error 2" in stats.stdout, stats.stdout + stats.stderr
        assert "contoso-in: reject 1" in stats.stdout
    finally:
        assert proc.stop() == 0, proc.log()


def test_rows_changed_apply_without_restart_and_sighup(daemon: PolicydProcess, work: Path) -> None:
    client = PolicyClient(daemon.sock)
    assert client.ask(request()).startswith("REJECT")
    db = sqlite3.connect(work / "rules.sqlite")
    db.execute("UPDATE inbound_connector SET on_failure = 'defer' WHERE name = 'contoso-in'")
    db.commit()
    db.close()
    daemon.wait_log("loaded rules generation", count=2)
    assert client.ask(request()) == "DEFER 4.7.10 TLS required by connector contoso-in"
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("SIGHUP: reloading rules")
    daemon.wait_log("loaded rules generation", count=3)
    assert client.ask(request()).startswith("DEFER 4.7.10")


@pytest.mark.postgresql
def test_database_outage_keeps_the_last_rules(work: Path, pg_url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = open_engine(pg_url)
    init_schema(engine)
    with engine.begin() as conn:
        for stmt in RULES.strip().split(";\n"):
            conn.exec_driver_sql(stmt.strip().rstrip(";"))
    engine.dispose()
    sock = work / "policy.sock"
    proc = PolicydProcess(write_config(work, pg_url, f"unix:{sock}"), sock, work / "policyd.log").start()
    name = pg_url.rsplit("/", 1)[1]
    admin = create_engine(pg_url.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
    try:
        client = PolicyClient(sock)
        assert client.ask(request()).startswith("REJECT")
        with admin.connect() as conn:
            conn.execute(text(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"))
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        proc.wait_log("cannot reach the rule database")
        for _ in range(3):
            assert client.ask(request()).startswith("REJECT")
        with admin.connect() as conn:
            conn.execute(text(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true"))
        proc.wait_log("is reachable again")
        assert proc.log().count("cannot reach the rule database") == 1
        assert client.ask(request()).startswith("REJECT")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true"))
        admin.dispose()
        assert proc.stop() == 0


def test_never_loaded_answers_a_temporary_failure(work: Path) -> None:
    sock = work / "policy.sock"
    config = write_config(work, f"sqlite:///{work}/absent.sqlite", f"unix:{sock}")
    proc = PolicydProcess(config, sock, work / "policyd.log").start(wait_rules=False)
    try:
        proc.wait_log("cannot load rules")
        client = PolicyClient(sock)
        assert client.ask(request(sender="a@anything.test")).startswith("DEFER 4.3.5 ")
        assert client.ask(request()).startswith("DEFER 4.3.5 ")
        # The rules arrive: the daemon starts deciding without a restart.
        make_db(work / "absent.sqlite")
        proc.wait_log("loaded rules generation")
        assert client.ask(request(sender="a@anything.test")) == "DUNNO"
    finally:
        assert proc.stop() == 0


def test_sigterm_finishes_the_request_in_flight(daemon: PolicydProcess) -> None:
    idle = PolicyClient(daemon.sock)
    busy = PolicyClient(daemon.sock)
    first, rest = request()[:40], request()[40:]
    busy.sock.sendall(first)
    daemon.wait_log("ready")
    assert daemon.proc is not None
    daemon.signal(signal.SIGTERM)
    daemon.wait_log("stopping: finishing requests in flight")
    busy.sock.sendall(rest)
    assert busy.read_answer().startswith("REJECT")
    assert idle.closed_by_peer()
    assert daemon.proc.wait(15) == 0
    assert not daemon.sock.exists()


def test_tcp_listener_and_check_config(work: Path) -> None:
    url = make_db(work / "rules.sqlite")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(work, url, f"inet:127.0.0.1:{port}")
    r = subprocess.run([BIN / "tlsgate-policyd", "--config", config, "--check-config"], capture_output=True, text=True)
    assert r.returncode == 0 and "is valid" in r.stdout
    proc = PolicydProcess(config, work / "none", work / "policyd.log").start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request())
            assert s.recv(1000).startswith(b"action=REJECT 5.7.10")
    finally:
        assert proc.stop() == 0
    bad = work / "bad.conf"
    bad.write_text("[policyd]\nlisten = tcp:1234\n")
    r = subprocess.run([BIN / "tlsgate-policyd", "--config", bad], capture_output=True, text=True)
    assert r.returncode == 78
    assert r.stderr.strip() == (f"tlsgate-policyd: {bad}: [policyd] listen = 'tcp:1234': "
                                "'tcp:1234' is not unix:/PATH or inet:HOST:PORT")


def test_spawn_mode(work: Path) -> None:
    url = make_db(work / "rules.sqlite")
    config = write_config(work, url, f"unix:{work}/unused.sock")
    r = subprocess.run([BIN / "tlsgate-policyd", "--config", config, "--spawn"],
                       input=request() + request(sender="a@else.test"), capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (b"action=REJECT 5.7.10 TLS required by connector contoso-in\n\n"
                        b"action=DUNNO\n\n")


def _spawned(config: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], PolicyClient, PolicydProcess]:
    """A ``--spawn`` process on one end of a socket pair, as spawn(8) runs it, logging to a file."""
    client, child = socket.socketpair()
    log = PolicydProcess(config, Path("unused"), log_path)
    with log_path.open("ab") as stderr, child:
        proc = subprocess.Popen([BIN / "tlsgate-policyd", "--config", config, "--spawn"],
                                stdin=child, stdout=child, stderr=stderr)
    log.proc = proc
    return proc, PolicyClient(None, 30, sock=client), log


def test_spawned_process_applies_rule_changes(work: Path) -> None:
    # smtpd keeps its policy connection, so one spawned process, for up to 1000 s: a change
    # committed meanwhile must apply within poll_interval, as in the socket daemon.
    url = make_db(work / "rules.sqlite")
    config = write_config(work, url, f"unix:{work}/unused.sock")
    proc, client, log = _spawned(config, work / "spawn.log")
    try:
        assert client.ask(request()) == "REJECT 5.7.10 TLS required by connector contoso-in"
        con = sqlite3.connect(work / "rules.sqlite")
        con.execute("UPDATE inbound_connector SET require_tls = 0 WHERE name = 'contoso-in'")
        con.commit()
        con.close()
        log.wait_log("loaded rules generation", count=2)
        assert client.ask(request()) == "DUNNO"
    finally:
        client.close()
        assert proc.wait(30) == 0, log.log()


def test_spawned_process_started_without_rules_recovers(work: Path) -> None:
    # A database without its schema yet: temporary failures, then decisions once it loads.
    db = work / "rules.sqlite"
    sqlite3.connect(db).close()
    config = write_config(work, f"sqlite:///{db}", f"unix:{work}/unused.sock")
    proc, client, log = _spawned(config, work / "spawn.log")
    try:
        assert client.ask(request()).startswith("DEFER 4.3.5 ")
        make_db(db)  # the schema and rules, into the file the process has open
        log.wait_log("loaded rules generation")
        assert client.ask(request()) == "REJECT 5.7.10 TLS required by connector contoso-in"
    finally:
        client.close()
        assert proc.wait(30) == 0, log.log()


@pytest.mark.parametrize("syslog_listens", [True, False])
def test_spawned_on_one_socket_logs_to_syslog_never_into_the_answers(work: Path, syslog_listens: bool) -> None:
    # spawn(8) gives the process the client's socket as standard input, output and error: with
    # target = stderr, a log line there would reach Postfix as part of an answer.
    url = make_db(work / "rules.sqlite")
    config = write_config(work, url, f"unix:{work}/unused.sock")
    syslog_path = str(work / "log.sock")
    with config.open("a") as fh:
        fh.write(f"syslog_socket = {syslog_path}\n")  # [log], with target = stderr, is the last section
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if syslog_listens:
        syslog.bind(syslog_path)
    syslog.settimeout(10)
    client, child = socket.socketpair()
    with syslog, client, child:
        proc = subprocess.Popen([BIN / "tlsgate-policyd", "--config", config, "--spawn"],
                                stdin=child, stdout=child, stderr=child)
        child.close()
        client.settimeout(30)
        client.sendall(request() + request(sender="a@else.test"))
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
        assert proc.wait(30) == 0
        assert received == (b"action=REJECT 5.7.10 TLS required by connector contoso-in\n\n"
                            b"action=DUNNO\n\n")
        if not syslog_listens:
            return  # the lines are lost, and the answers are still clean
        lines = []
        while not any(b"reject connector=contoso-in" in line for line in lines):
            lines.append(syslog.recv(65536))
    assert lines[-1].startswith(b"<") and b"tlsgate-policyd[" in lines[-1]


def test_metrics_and_stats(work: Path) -> None:
    url = make_db(work / "rules.sqlite")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock = work / "policy.sock"
    config = write_config(work, url, f"unix:{sock}", metrics=f"127.0.0.1:{port}")
    proc = PolicydProcess(config, sock, work / "policyd.log").start()
    try:
        client = PolicyClient(sock)
        for _ in range(3):
            client.ask(request())
        client.ask(request(sender="a@other.test"))
        r = subprocess.run([BIN / "tlsgate", "-c", config, "stats"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "decisions: 4" in r.stdout
        assert "contoso-in: reject 3" in r.stdout
        assert "(no connector): pass 1" in r.stdout
        assert "rules: generation" in r.stdout and "latency: p50 <=" in r.stdout
    finally:
        assert proc.stop() == 0
    r = subprocess.run([BIN / "tlsgate", "-c", config, "stats"], capture_output=True, text=True)
    assert r.returncode == 1 and "not answering" in r.stderr


def test_a_sighup_while_the_first_load_waits_for_the_database_does_not_end_the_daemon(work: Path) -> None:
    """The first load may take seconds (a database slow to answer, 100,000 connectors): a
    reload asked meanwhile is queued, not the signal's default action, which ends the process."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (backlog), never answers
    port = silent.getsockname()[1]
    sock = work / "policy.sock"
    config = write_config(work, f"postgresql+psycopg://tlsgate@127.0.0.1:{port}/rules", f"unix:{sock}")
    config.write_text(config.read_text().replace("[database]\n", "[database]\nconnect_timeout = 3\n"))
    proc = PolicydProcess(config, sock, work / "policyd.log")
    log = (work / "policyd.log").open("ab")
    proc._log = log
    proc.proc = subprocess.Popen([str(BIN / "tlsgate-policyd"), "--config", str(config)], stdout=log,
                                 stderr=subprocess.STDOUT)
    try:
        proc.wait_log("listening on unix:")
        assert "tlsgate-policyd ready" not in proc.log()  # still in its first load
        proc.signal(signal.SIGHUP)
        proc.wait_log("tlsgate-policyd ready", timeout=30)
        proc.wait_log("SIGHUP: reloading rules")
        assert proc.proc.poll() is None
        # without rules, a temporary failure, never a pass
        assert PolicyClient(sock).ask(request()).startswith("DEFER 4.3.5")
    finally:
        assert proc.stop() == 0, proc.log()
        silent.close()
