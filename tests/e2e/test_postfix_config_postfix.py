"""`tlsgate postfix-config` on a relaying Postfix: pasting what it prints keeps mynetworks
clients relaying (relay control untouched) and puts tlsgate's policy check in front of every
recipient. A real private Postfix on loopback, with a fake policy service answering DUNNO."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pki import Pki
from tests.support.postfix import PrivatePostfix, send

BIN = Path(sys.executable).parent


class DunnoPolicy:
    """A policy service that answers DUNNO to every request and keeps the recipients it saw."""

    def __init__(self, path: Path) -> None:
        self.recipients: list[str] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        os.chmod(path, 0o666)
        self._server.listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            attrs: dict[str, str] = {}
            for raw in stream:
                line = raw.decode().rstrip("\n")
                if line:
                    name, _, value = line.partition("=")
                    attrs[name] = value
                    continue
                self.recipients.append(attrs.get("recipient", ""))
                stream.write(b"action=DUNNO\n\n")
                stream.flush()
                attrs = {}

    def close(self) -> None:
        self._server.close()


def printed_parameters(output: str) -> dict[str, str]:
    """The main.cf parameters in postfix-config's output, continuation lines joined."""
    params: dict[str, str] = {}
    name = ""
    for line in output.split("# master.cf:", 1)[0].splitlines():
        if not line or line.startswith("#"):
            continue
        if line[0].isspace():
            params[name] = f"{params[name]} {line.strip()}".strip()
        else:
            name, _, value = line.partition("=")
            name = name.strip()
            params[name] = value.strip()
    return params


@pytest.fixture
def relay_host(pki: Pki) -> Iterator[tuple[PrivatePostfix, DunnoPolicy, Path]]:
    # A relaying host: 127.0.0.1 is in mynetworks, 127.0.0.2 is a stranger. Relayed mail is
    # discarded instead of leaving the machine.
    instance = PrivatePostfix(pki, main_cf={"mynetworks": "127.0.0.1/32", "default_transport": "discard:",
                                            "relay_transport": "discard:"})
    work = Path(tempfile.mkdtemp(prefix="tlsgate-postfix-config-"))
    sockdir = instance.queue_dir / "tlsgate"
    sockdir.mkdir(mode=0o755)
    policy = DunnoPolicy(sockdir / "policy.sock")
    conf = work / "tlsgate.conf"
    conf.write_text(f"[database]\nurl = sqlite:///{work}/rules.sqlite\n[policyd]\nlisten = unix:{sockdir}/policy.sock\n")
    try:
        instance.start()
        yield instance, policy, conf
    finally:
        policy.close()
        instance.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_pasted_configuration_keeps_relaying_for_mynetworks(relay_host: tuple[PrivatePostfix, DunnoPolicy, Path]) -> None:
    postfix, policy, conf = relay_host
    outside, local = "someone@elsewhere.invalid", "user@tlsgate.test"
    before = send(postfix.port, "me@tlsgate.test", [outside, local])
    assert before.rcpt[outside].code == 250 and before.rcpt[local].code == 250, before
    stranger = send(postfix.port, "x@stranger.invalid", [outside], source_address="127.0.0.2")
    # Postfix's default smtpd_relay_restrictions end with defer_unauth_destination: 454.
    assert stranger.rcpt[outside].code == 454 and "Relay access denied" in stranger.rcpt[outside].text, stranger

    r = subprocess.run([BIN / "tlsgate", "-c", conf, "postfix-config", "--postfix-dir", postfix.config_dir,
                        "--no-milter", "--no-outbound"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    params = printed_parameters(r.stdout)
    assert params["smtpd_recipient_restrictions"].startswith("check_policy_service { unix:tlsgate/policy.sock,")
    postfix.reload(params)

    after = send(postfix.port, "me@tlsgate.test", [outside, local])
    assert after.rcpt[outside].code == 250 and after.rcpt[local].code == 250, after  # not 554 Relay access denied
    assert policy.recipients[-2:] == [outside, local]  # tlsgate judged both
    stranger = send(postfix.port, "x@stranger.invalid", [outside], source_address="127.0.0.2")
    assert stranger.rcpt[outside].code == 454 and "Relay access denied" in stranger.rcpt[outside].text, stranger
