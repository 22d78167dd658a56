"""A private PostgreSQL cluster for tests that must stop and restart the rule database:
``initdb`` and ``pg_ctl`` run as user postgres in a temp directory, the server listens on a
free loopback port (its unix socket stays in the temp directory) and is stopped by the pid in
``postmaster.pid``. Trust authentication for the superuser, plus a login with a password for
tests that need a secret in the URL."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.postfix import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
_TIMEOUT = 60.0


def skip_reason() -> str | None:
    """Why a private cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "a private PostgreSQL cluster is started as user postgres, which needs root"
    if not (PG_BIN / "initdb").exists():
        return f"{PG_BIN}/initdb is not installed"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "there is no postgres user"
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


class PgCluster:
    """``start()`` (initdb on first use), ``stop()`` (fast shutdown by pid), ``url``."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="tlsgate-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        self.log_path = self.directory / "server.log"
        user = pwd.getpwnam("postgres")
        os.chown(self.directory, user.pw_uid, user.pw_gid)
        self._initialised = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str) -> None:
        completed = subprocess.run(
            ["runuser", "-u", "postgres", "--", *args], stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=_TIMEOUT, check=False, cwd=self.directory,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({completed.returncode}): {completed.stdout}{completed.stderr}")

    def start(self) -> Self:
        if not self._initialised:
            self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                              "--no-sync", "-E", "UTF8")
            self._initialised = True
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        # pg_ctl -w returns once the server accepts connections.
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path),
                          "-o", options, "-w", "-t", str(int(_TIMEOUT)), "start")
        return self

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster), waiting until it has exited."""
        pid = self.pid()
        if pid is None or not _alive(pid):
            return
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + _TIMEOUT
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise RuntimeError(f"postmaster {pid} ignored SIGINT; killed")
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
