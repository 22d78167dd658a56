"""Test helper: a rule database in SQLite, tlsgate-socketmap run from its console script
against it, and a small socketmap client. Used by the server tests and the Postfix tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

from sqlalchemy import create_engine, text

from tlsgate.socketmap import MAX_REPLY, NetstringDecoder, Reply, encode_request, parse_reply
from tlsgate.store import init_schema

DAEMON = Path(sys.executable).parent / "tlsgate-socketmap"
_POLL = 0.02


def make_database(path: Path, statements: Iterable[str] = ()) -> str:
    """A fresh SQLite rule database at ``path`` holding ``statements``; its URL."""
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    init_schema(engine)
    execute(url, statements)
    engine.dispose()
    return url


def execute(url: str, statements: Iterable[str]) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys = ON")
        for stmt in statements:
            conn.execute(text(stmt))
    engine.dispose()


def outbound_rows(
    name: str,
    domains: Iterable[str],
    *,
    level: str = "secure",
    min_version: str | None = None,
    match: Iterable[str] = (),
    hosts: Iterable[tuple[str, int, bool]] = (),
) -> list[str]:
    version = f"'{min_version}'" if min_version else "NULL"
    rows = [
        "INSERT INTO outbound_connector (name, enabled, tls_level, min_tls_version) "
        f"VALUES ('{name}', 1, '{level}', {version})"
    ]
    rows += [f"INSERT INTO outbound_domain (connector, pattern) VALUES ('{name}', '{d}')" for d in domains]
    rows += [f"INSERT INTO outbound_match_name (connector, name) VALUES ('{name}', '{m}')" for m in match]
    rows += [
        "INSERT INTO outbound_smart_host (connector, host, port, mx_lookup) "
        f"VALUES ('{name}', '{h}', {p}, {int(mx)})"
        for h, p, mx in hosts
    ]
    return rows


class SocketmapClient:
    """One persistent connection, like Postfix's dict_sockmap client."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 10.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.decoder = NetstringDecoder(MAX_REPLY)
        self.pending: list[bytes] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> Reply:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.pending += self.decoder.feed(data)
        return parse_reply(self.pending.pop(0))

    def query(self, name: str, key: str) -> Reply:
        self.send_raw(encode_request(name, key))
        return self.read_reply()

    def closed_by_server(self) -> bool:
        """True when the server closed the connection (EOF), waiting up to the socket timeout."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


class SocketmapDaemon:
    """tlsgate-socketmap started as a process with a config file in ``directory``."""

    def __init__(
        self,
        directory: Path,
        database_url: str,
        *,
        listen: Iterable[str] | None = None,
        extra: str = "",
        poll_interval: float = 3600.0,
        idle_timeout: float = 300.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.extra_env = env or {}
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.socket_path = str(directory / "socketmap.sock")
        self.listen = list(listen) if listen is not None else [f"unix:{self.socket_path}"]
        self.config_path = directory / "tlsgate.conf"
        self.log_path = directory / "socketmap.log"
        self.config_path.write_text(
            "[database]\n"
            f"url = {database_url}\n"
            f"poll_interval = {poll_interval}\n"
            "[log]\ntarget = stderr\nlevel = debug\n"
            "[socketmap]\n"
            f"listen = {' '.join(self.listen)}\n"
            "socket_mode = 0666\n"
            "socket_group = root\n"
            f"idle_timeout = {idle_timeout}\n" + extra
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "TLSGATE_DATABASE_URL")}
        env.update(self.extra_env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(DAEMON), "--config", str(self.config_path)], stdout=log, stderr=log, env=env
            )
        self.wait_for_log("listening on")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 15.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(needle) < count:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tlsgate-socketmap exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {needle!r} in the log:\n{self.log()}")
            time.sleep(_POLL)

    def client(self) -> SocketmapClient:
        spec = self.listen[0]
        if spec.startswith("unix:"):
            return SocketmapClient(spec[5:])
        host, _, port = spec[5:].rpartition(":")
        return SocketmapClient((host, int(port)))

    def query_until(self, name: str, key: str, expected: Reply, timeout: float = 15.0) -> Reply:
        """Ask on fresh connections until the answer is ``expected`` (after a reload, or
        once a connection slot is free again)."""
        deadline = time.monotonic() + timeout
        while True:
            client = self.client()
            try:
                reply: Reply | None = client.query(name, key)
            except ConnectionError:
                reply = None
            finally:
                client.close()
            if reply == expected or time.monotonic() > deadline:
                if reply is None:
                    raise ConnectionError("the server kept closing the connection")
                return reply
            time.sleep(_POLL)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return code

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
