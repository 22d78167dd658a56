"""tlsgate-policyd run the way its units run it: socket activation, readiness, reload, stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.policyd.policydhelp import BIN, PolicyClient, request, write_config
from tests.policyd.test_policy_server import make_db

pytestmark = pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                                reason="systemd-socket-activate is not installed")


class NotifyListener:
    """What systemd would receive on NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(15)

    def expect(self, key: str) -> list[str]:
        """Messages until one carrying ``key`` (e.g. READY=1); fails after the timeout."""
        seen: list[str] = []
        while True:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                raise AssertionError(f"no {key} from the daemon; got {seen}") from None
            seen.append(data)
            if key in data.split("\n"):
                return seen


def connect_when_listening(path: Path, timeout: float = 10.0) -> PolicyClient:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return PolicyClient(path)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tlsgate-activation-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_socket_activation_notify_reload_and_stop(work: Path) -> None:
    url = make_db(work / "rules.sqlite")
    sock = work / "policy.sock"
    # The configured listen address is NOT used: the inherited socket wins, as under systemd.
    config = write_config(work, url, f"unix:{work}/configured.sock")
    notify = NotifyListener(work / "notify")
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000")
    log = (work / "policyd.log").open("wb")
    proc = subprocess.Popen(
        # systemd-socket-activate passes on only the environment it is told to.
        ["systemd-socket-activate", "-l", str(sock), "--fdname=policy",
         "-E", "NOTIFY_SOCKET", "-E", "WATCHDOG_USEC", "-E", "PATH",
         str(BIN / "tlsgate-policyd"), "--config", str(config)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # systemd-socket-activate starts the daemon on the first connection.
        client = connect_when_listening(sock)
        ready = notify.expect("READY=1")
        assert any("STATUS=" in m for m in ready)
        assert client.ask(request()).startswith("REJECT 5.7.10")
        assert not (work / "configured.sock").exists()
        notify.expect("WATCHDOG=1")
        proc.send_signal(signal.SIGHUP)
        notify.expect("RELOADING=1")
        notify.expect("READY=1")
        assert client.ask(request()).startswith("REJECT 5.7.10")
        proc.send_signal(signal.SIGTERM)
        notify.expect("STOPPING=1")
        assert proc.wait(15) == 0
        text = (work / "policyd.log").read_text()
        assert "listening on inherited socket unix:" in text
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
