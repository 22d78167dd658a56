"""tlsgate-socketmap as a process, over real unix and TCP sockets: answers, framing errors,
idle and concurrent connections, reload and stop."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.socketmap.socketmap_daemon import (
    DAEMON,
    SocketmapClient,
    SocketmapDaemon,
    execute,
    make_database,
    outbound_rows,
)
from tests.support.postfix import free_port
from tlsgate.socketmap import Reply, Status

CONTOSO = outbound_rows(
    "contoso", ["contoso.com", "*.contoso.com"], match=["mail.contoso.com"], min_version="TLSv1.2",
    hosts=[("relay.contoso.com", 25, False)],
)
CONTOSO_POLICY = Reply(Status.OK, "secure match=mail.contoso.com protocols=>=TLSv1.2")


@pytest.fixture
def db(tmp_path: Path) -> str:
    return make_database(tmp_path / "rules.sqlite", CONTOSO)


@pytest.fixture
def daemon(tmp_path: Path, db: str) -> SocketmapDaemon:
    d = SocketmapDaemon(tmp_path / "run", db).start()
    yield d  # type: ignore[misc]
    d.stop()


def test_answers_policy_and_transport_on_one_connection(daemon: SocketmapDaemon) -> None:
    daemon.wait_for_log("serving rules generation")
    client = daemon.client()
    assert client.query("tls_policy", "contoso.com") == CONTOSO_POLICY
    assert client.query("tls_policy", "sub.contoso.com") == CONTOSO_POLICY
    assert client.query("tls_policy", ".contoso.com") == CONTOSO_POLICY
    assert client.query("tls_policy", "[relay.contoso.com]:25") == CONTOSO_POLICY
    assert client.query("transport", "someone@contoso.com") == Reply(Status.OK, "smtp:[relay.contoso.com]:25")
    assert client.query("tls_policy", "example.org") == Reply(Status.NOTFOUND)
    assert client.query("transport", "*") == Reply(Status.NOTFOUND)
    assert client.query("nosuchmap", "contoso.com").status is Status.PERM
    client.close()


def test_several_requests_in_one_write_get_answers_in_order(daemon: SocketmapDaemon) -> None:
    daemon.wait_for_log("serving rules generation")
    client = daemon.client()
    client.send_raw(b"22:tls_policy contoso.com,22:tls_policy example.org,23:transport a@contoso.com,")
    assert client.read_reply() == CONTOSO_POLICY
    assert client.read_reply() == Reply(Status.NOTFOUND)
    assert client.read_reply().status is Status.OK
    client.close()


def test_a_request_split_into_single_bytes_is_answered(daemon: SocketmapDaemon) -> None:
    daemon.wait_for_log("serving rules generation")
    client = daemon.client()
    for byte in b"22:tls_policy contoso.com,":
        client.send_raw(bytes([byte]))
    assert client.read_reply() == CONTOSO_POLICY
    client.close()


@pytest.mark.parametrize(
    "garbage",
    [b"5:hello;", b"abc:", b"10001:", b"99999999999:", b"8:tlspolicy,"],
    ids=["terminator", "length", "too-long", "huge-length", "no-key"],
)
def test_malformed_request_closes_only_that_connection(daemon: SocketmapDaemon, garbage: bytes) -> None:
    daemon.wait_for_log("serving rules generation")
    good = daemon.client()
    bad = daemon.client()
    assert good.query("tls_policy", "contoso.com") == CONTOSO_POLICY
    bad.send_raw(garbage)
    assert bad.closed_by_server()
    daemon.wait_for_log("malformed request, closing the connection")
    assert daemon.log().count("WARNING") == 1
    assert good.query("tls_policy", "contoso.com") == CONTOSO_POLICY
    assert daemon.client().query("tls_policy", "contoso.com") == CONTOSO_POLICY
    good.close()
    bad.close()


def test_client_closing_idle_or_mid_request_is_tolerated(daemon: SocketmapDaemon) -> None:
    daemon.wait_for_log("serving rules generation")
    for _ in range(3):  # Postfix drops idle connections; each new one must be served
        c = daemon.client()
        assert c.query("tls_policy", "contoso.com") == CONTOSO_POLICY
        c.close()
    half = daemon.client()
    half.send_raw(b"22:tls_pol")
    half.close()
    daemon.wait_for_log("closed in the middle of a request")
    assert daemon.client().query("tls_policy", "contoso.com") == CONTOSO_POLICY


def test_server_closes_connections_idle_past_the_timeout(tmp_path: Path, db: str) -> None:
    with SocketmapDaemon(tmp_path / "run", db, idle_timeout=0.5) as d:
        c = d.client()
        assert c.query("tls_policy", "contoso.com").status in (Status.OK, Status.TEMP)
        assert c.closed_by_server()


def test_many_concurrent_connections(daemon: SocketmapDaemon) -> None:
    daemon.wait_for_log("serving rules generation")
    clients = [daemon.client() for _ in range(100)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(20):
                key = "contoso.com" if (i + j) % 2 else f"n{i}.example.org"
                want = CONTOSO_POLICY if (i + j) % 2 else Reply(Status.NOTFOUND)
                assert clients[i].query("tls_policy", key) == want
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    assert not errors, errors[0]


def test_stuck_client_does_not_block_others(daemon: SocketmapDaemon) -> None:
    daemon.wait_for_log("serving rules generation")
    stuck = daemon.client()
    stuck.send_raw(b"100:tls_policy ")  # never finishes its request
    other = daemon.client()
    assert other.query("tls_policy", "contoso.com") == CONTOSO_POLICY
    stuck.close()
    other.close()


def test_no_rules_ever_loaded_answers_temp(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path}/no/such/dir/rules.sqlite"
    with SocketmapDaemon(tmp_path / "run", missing) as d:
        d.wait_for_log("cannot load rules")
        c = d.client()
        reply = c.query("tls_policy", "contoso.com")
        assert reply.status is Status.TEMP
        assert c.query("transport", "a@contoso.com").status is Status.TEMP
        c.close()


def test_database_gone_keeps_serving_last_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.sqlite"
    url = make_database(path, CONTOSO)
    with SocketmapDaemon(tmp_path / "run", url) as d:
        d.wait_for_log("serving rules generation")
        # Overwrite in place: the daemon's pooled connection keeps the inode open.
        path.write_bytes(b"this is not a database\n" * 1000)
        d.signal(signal.SIGHUP)
        d.wait_for_log("cannot reach the rule database")
        assert d.client().query("tls_policy", "contoso.com") == CONTOSO_POLICY


def test_sighup_reloads_changed_rows(daemon: SocketmapDaemon, db: str) -> None:
    daemon.wait_for_log("serving rules generation")
    execute(db, ["UPDATE outbound_connector SET tls_level = 'encrypt', min_tls_version = NULL WHERE name = 'contoso'"])
    # poll_interval is an hour: only the signal can make the daemon see the change
    daemon.signal(signal.SIGHUP)
    assert daemon.query_until("tls_policy", "contoso.com", Reply(Status.OK, "encrypt")) == Reply(Status.OK, "encrypt")


def test_misconfigured_connector_answers_temp(tmp_path: Path) -> None:
    rows = outbound_rows("bad", ["bad.example", "bad*pattern"])
    url = make_database(tmp_path / "rules.sqlite", rows)
    with SocketmapDaemon(tmp_path / "run", url) as d:
        d.wait_for_log("serving rules generation")
        c = d.client()
        assert c.query("tls_policy", "bad.example").status is Status.TEMP
        assert c.query("transport", "x@bad.example").status is Status.TEMP


def test_sigterm_stops_gracefully_and_removes_the_socket(daemon: SocketmapDaemon) -> None:
    daemon.wait_for_log("serving rules generation")
    idle = daemon.client()
    assert idle.query("tls_policy", "contoso.com") == CONTOSO_POLICY
    assert daemon.stop() == 0
    assert idle.closed_by_server()
    assert not Path(daemon.socket_path).exists()
    assert "stopping after" in daemon.log()


def test_tcp_loopback_listener(tmp_path: Path, db: str) -> None:
    port = free_port()
    with SocketmapDaemon(tmp_path / "run", db, listen=[f"inet:127.0.0.1:{port}"]) as d:
        d.wait_for_log("serving rules generation")
        assert d.client().query("tls_policy", "contoso.com") == CONTOSO_POLICY


def test_stale_socket_file_is_replaced_but_a_live_one_is_not(tmp_path: Path, db: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(run / "socketmap.sock"))
    stale.close()  # the file stays, nobody listens
    with SocketmapDaemon(run, db) as first:
        first.wait_for_log("serving rules generation")
        second = SocketmapDaemon(run, db)
        second.log_path = run / "second.log"
        with pytest.raises(RuntimeError, match="another process accepts connections"):
            second.start()
        assert second.stop() == 1
        assert first.client().query("tls_policy", "contoso.com") == CONTOSO_POLICY


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[socketmap]\nidle_timeout = soon\n", "idle_timeout"),
        ("[socketmap]\nlisten = tcp:1234\n", "listen"),
        ("[socketmap]\nbogus = 1\n", "bogus"),
        ("[database]\nurl = oracle://x/y\n", "unsupported database"),
    ],
)
def test_check_config_exits_78_with_one_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.conf"
    path.write_text(text)
    for args in (["--check-config"], []):
        proc = subprocess.run([str(DAEMON), "--config", str(path), *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 78
        assert proc.stderr.count("\n") == 1 and needle in proc.stderr


def test_check_config_accepts_a_good_file(tmp_path: Path, db: str) -> None:
    d = SocketmapDaemon(tmp_path / "run", db)
    proc = subprocess.run([str(DAEMON), "--config", str(d.config_path), "--check-config"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_systemd_notifications(tmp_path: Path, db: str) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(15)
    d = SocketmapDaemon(tmp_path / "run", db, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        d.start()
        assert notify.recv(4096).decode().split("\n")[0] == "READY=1"
        d.signal(signal.SIGHUP)
        assert notify.recv(4096) == b"RELOADING=1"
        assert notify.recv(4096) == b"READY=1"
        d.signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        assert d.stop() == 0
    finally:
        d.stop()
        notify.close()


def test_connections_above_the_limit_are_closed(tmp_path: Path, db: str) -> None:
    with SocketmapDaemon(tmp_path / "run", db, extra="max_connections = 2\n") as d:
        d.wait_for_log("serving rules generation")
        first, second = d.client(), d.client()
        assert first.query("tls_policy", "contoso.com") == CONTOSO_POLICY
        assert second.query("tls_policy", "contoso.com") == CONTOSO_POLICY
        third = d.client()
        assert third.closed_by_server()
        d.wait_for_log("refusing a connection: 2 connections open")
        first.close()
        assert d.query_until("tls_policy", "contoso.com", CONTOSO_POLICY) == CONTOSO_POLICY
        second.close()
        third.close()


def test_socket_activation(tmp_path: Path, db: str) -> None:
    """A listening socket handed over as fd 3 with LISTEN_PID/LISTEN_FDS, as systemd does."""
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    d = SocketmapDaemon(tmp_path / "run", db)
    # exec keeps the pid, so the wrapper can name itself in LISTEN_PID
    wrapper = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.environ['LISTEN_FDS'] = '1'; os.execv(sys.argv[2], sys.argv[2:])"
    )
    with open(d.log_path, "ab") as log:
        d.process = subprocess.Popen(
            [sys.executable, "-c", wrapper, str(listener.fileno()), str(DAEMON), "--config", str(d.config_path)],
            stdout=log, stderr=log, pass_fds=(listener.fileno(),),
        )
    listener.close()
    try:
        d.wait_for_log("serving rules generation")
        client = SocketmapClient(str(path))
        assert client.query("tls_policy", "contoso.com") == CONTOSO_POLICY
        client.close()
        assert not Path(d.socket_path).exists()  # the configured socket was not created
    finally:
        assert d.stop() == 0
