"""Run tlsgate-policyd from the installed console script, as Postfix and systemd would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def write_config(directory: Path, url: str, listen: str, **policyd: str) -> Path:
    lines = [f"[database]\nurl = {url}\npoll_interval = 0.2\n", f"[policyd]\nlisten = {listen}\nsocket_mode = 0666\n"]
    lines += [f"{k} = {v}\n" for k, v in policyd.items()]
    lines.append("[log]\ntarget = stderr\nlevel = debug\n")
    path = directory / "tlsgate.conf"
    path.write_text("".join(lines))
    return path


def request(**attrs: str) -> bytes:
    base = {
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
        "client_address": "203.0.113.5", "client_name": "mail.example.net", "sender": "a@contoso.com",
        "recipient": "b@example.org", "encryption_protocol": "", "encryption_cipher": "",
        "encryption_keysize": "0", "ccert_subject": "", "ccert_issuer": "", "ccert_fingerprint": "",
        "ccert_pubkey_fingerprint": "", "queue_id": "", "instance": "1a2b.3c4d.0",
    }
    base.update(attrs)
    return "".join(f"{k}={v}\n" for k, v in base.items()).encode() + b"\n"


class PolicyClient:
    """A persistent connection, as each smtpd process keeps one."""

    def __init__(self, path: Path | None, timeout: float = 10.0, *, sock: socket.socket | None = None) -> None:
        """Connect to ``path``, or talk over ``sock``, already connected."""
        if sock is None:
            assert path is not None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(str(path))
        else:
            sock.settimeout(timeout)
        self.sock = sock
        self.buffer = b""

    def ask(self, data: bytes) -> str:
        self.sock.sendall(data)
        return self.read_answer()

    def read_answer(self) -> str:
        while b"\n\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the daemon")
            self.buffer += chunk
        answer, _, self.buffer = self.buffer.partition(b"\n\n")
        text = answer.decode()
        assert text.startswith("action="), text
        return text[len("action="):]

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


class PolicydProcess:
    def __init__(self, config: Path, sock: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.sock = sock
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_rules: bool = True) -> PolicydProcess:
        # The log is appended to: a restart waits for this instance's lines, not the last one's.
        earlier = self.log() if self.log_path.exists() else ""
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([str(BIN / "tlsgate-policyd"), "--config", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        self.wait_log("tlsgate-policyd ready", count=earlier.count("tlsgate-policyd ready") + 1)
        if wait_rules:
            self.wait_log("loaded rules generation", count=earlier.count("loaded rules generation") + 1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 15.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if log.count(text) >= count:
                return log
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"tlsgate-policyd exited with {self.proc.returncode}:\n{log}")
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log()}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()
