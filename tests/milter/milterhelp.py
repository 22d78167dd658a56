"""Test helpers for the milter: a rule database made with plain SQL, a configuration file,
and the installed ``tlsgate-milter`` console script run as a child process in a temp dir,
ready once its socket accepts connections and stopped by pid."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tlsgate.store import init_schema, open_engine

MILTER = str(Path(sys.executable).parent / "tlsgate-milter")
POLICYD = str(Path(sys.executable).parent / "tlsgate-policyd")
START_TIMEOUT = 20.0


def make_rules_db(path: Path, sql: str = "") -> str:
    """An SQLite rule database with tlsgate's schema and ``sql`` applied; returns its URL."""
    url = f"sqlite:///{path}"
    engine = open_engine(url)
    init_schema(engine)
    engine.dispose()
    run_sql(path, sql)
    return url


def run_sql(path: Path, sql: str) -> None:
    con = sqlite3.connect(path)
    try:
        con.executescript(sql)
        con.commit()
    finally:
        con.close()


def write_config(
    directory: Path,
    db_url: str,
    listen: str,
    *,
    extra: str = "",
    socket_mode: str = "0666",
) -> Path:
    path = directory / "tlsgate.conf"
    path.write_text(
        f"[database]\nurl = {db_url}\npoll_interval = 0.2\n\n"
        f"[milter]\nlisten = {listen}\nsocket_mode = {socket_mode}\nsocket_group = root\n{extra}\n"
        "[log]\ntarget = stderr\nlevel = debug\n"
    )
    return path


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


class MilterProcess:
    """``tlsgate-milter --config CONFIG`` (or another tlsgate daemon, ``program``) with its
    stderr in ``log_path``."""

    def __init__(self, config: Path, sock: Path, log_path: Path, program: str = MILTER) -> None:
        self.program = program
        self.config = config
        self.sock = sock
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_rules: bool = True) -> MilterProcess:
        """Start; return once the socket accepts and (with ``wait_rules``) rules are loaded."""
        offset = len(self.log())  # a restart appends to the same log
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.program, "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
            )
        deadline = time.monotonic() + START_TIMEOUT
        # Ready when the socket accepts and the first rules are loaded (the log says so).
        while not (
            _connectable(self.sock)
            and (not wait_rules or "loaded rules generation" in self.log()[offset:])
        ):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.program} exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.program} did not get ready:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> str:
        """The log once ``text`` is in it ``count`` times."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged:\n{self.log()}")
            time.sleep(0.05)
        return self.log()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
