"""Pinned partner certificates end to end: a real private Postfix asks the installed
`tlsgate-policyd` (check_policy_service on a unix socket), whose rules sit in an SQLite
database where the certificates were registered with `tlsgate cert add`. Covered: a pinned
self-signed partner is accepted; the same CN with another key, an expired pinned
certificate, an O or an OU mismatch are refused; a renewal that keeps the key is accepted
through the public-key pin, with Postfix's sha256 and md5 fingerprint digests. A small
recording policy server first shows that the fingerprints Postfix sends are exactly those
`tlsgate cert inspect` prints."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shutil
import signal
import socket
import socketserver
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pki import IssuedCert, Pki
from tests.support.postfix import PrivatePostfix, send

TLSGATE = Path(sys.executable).parent / "tlsgate"
POLICYD = TLSGATE.with_name("tlsgate-policyd")
PARTNER_DOMAIN = "partner.test"
_READY_TIMEOUT = 20.0
_POLL = 0.05


def _policyd_missing() -> str | None:
    if importlib.util.find_spec("tlsgate_policyd.__main__") is None:
        return "tlsgate_policyd.__main__ is not written yet: the policy daemon (issue 3) is needed"
    if not POLICYD.exists():
        return f"{POLICYD} is not installed"
    return None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _inspect(path: Path) -> dict[str, object]:
    out = subprocess.run([str(TLSGATE), "cert", "inspect", "--json", str(path)],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    first: dict[str, object] = json.loads(out)["certificates"][0]
    return first


# ------------------------------------------------------------------ fixtures



@pytest.fixture(scope="module")
def partners(pki: Pki) -> dict[str, IssuedCert]:
    """Self-signed partner certificates, as partners without a public CA have them."""
    cn, san = "mail.partner.test", ("mail.partner.test",)
    pinned = pki.issue("pinned", common_name=cn, san=san, organization="Partner Org", organizational_unit="Mail")
    return {
        "pinned": pinned,
        # Same names, another key: what an impostor would present.
        "impostor": pki.issue("impostor", common_name=cn, san=san, organization="Partner Org", organizational_unit="Mail"),
        "expired": pki.issue("expired", common_name=cn, san=san, organization="Partner Org", organizational_unit="Mail",
                             not_before=_now() - datetime.timedelta(days=400),
                             not_after=_now() - datetime.timedelta(days=1)),
        "other-org": pki.issue("other-org", common_name=cn, san=san, organization="Other Org", organizational_unit="Mail"),
        "other-unit": pki.issue("other-unit", common_name=cn, san=san, organization="Partner Org", organizational_unit="Sales"),
        # The partner renewed and kept its key; the administrator did not register it.
        "renewed": pki.issue("renewed", common_name=cn, san=san, organization="Partner Org", organizational_unit="Mail",
                             key=pinned.key, not_after=_now() + datetime.timedelta(days=365)),
    }


class _Recorder(socketserver.ThreadingUnixStreamServer):
    """A policy server that records requests and answers DUNNO."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, path: Path) -> None:
        self.requests: list[dict[str, str]] = []
        self.lock = threading.Lock()
        super().__init__(str(path), _RecorderHandler)
        path.chmod(0o666)  # smtpd runs as user postfix

    def for_recipient(self, recipient: str) -> dict[str, str]:
        with self.lock:
            found = [r for r in self.requests if r.get("recipient") == recipient]
        assert len(found) == 1, found
        return found[0]


class _RecorderHandler(socketserver.StreamRequestHandler):
    server: _Recorder

    def handle(self) -> None:
        request: dict[str, str] = {}
        for raw in self.rfile:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line:
                name, _, value = line.partition("=")
                request[name] = value
                continue
            with self.server.lock:
                self.server.requests.append(request)
            self.wfile.write(b"action=DUNNO\n\n")
            self.wfile.flush()
            request = {}


@pytest.fixture(scope="module")
def recording_postfix(pki: Pki) -> Iterator[tuple[PrivatePostfix, _Recorder]]:
    instance = PrivatePostfix(pki, domains=("tlsgate.test", PARTNER_DOMAIN))
    try:
        path = instance.socket_dir / "recorder"
        recorder = _Recorder(path)
        thread = threading.Thread(target=recorder.serve_forever, name="recorder", daemon=True)
        thread.start()
        try:
            instance.start({"smtpd_recipient_restrictions": f"check_policy_service unix:{path}, permit"})
            yield instance, recorder
        finally:
            recorder.shutdown()
            recorder.server_close()
            thread.join(timeout=5)
    finally:
        instance.stop()


class Policyd:
    """The installed tlsgate-policyd on a unix socket, started and stopped by pid."""

    def __init__(self, directory: Path, database: Path) -> None:
        self.socket = directory / "tlsgate-policy.sock"
        self.config = directory / "tlsgate.conf"
        self.log = directory / "policyd.log"
        self.config.write_text(
            "[database]\n"
            f"url = sqlite:///{database}\n"
            "poll_interval = 0.2\n"
            "[policyd]\n"
            f"listen = unix:{self.socket}\n"
            "socket_mode = 0666\n"
            "socket_group = root\n"
            "[log]\n"
            "target = stderr\n"
            "level = debug\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(POLICYD), "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "TLSGATE_CONFIG": str(self.config)},
            )
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"tlsgate-policyd exited {self.process.returncode}: {self.log.read_text()}")
            if self.socket.exists():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    try:
                        probe.connect(str(self.socket))
                        return
                    except OSError:
                        pass
            time.sleep(_POLL)
        raise AssertionError(f"tlsgate-policyd not listening on {self.socket}: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _tlsgate(database: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TLSGATE), "--database-url", f"sqlite:///{database}", *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def pinned_postfix(pki: Pki, partners: dict[str, IssuedCert]) -> Iterator[tuple[PrivatePostfix, Policyd]]:
    missing = _policyd_missing()
    if missing is not None:
        pytest.skip(missing)
    instance = PrivatePostfix(pki, domains=("tlsgate.test", PARTNER_DOMAIN))
    state = Path(tempfile.mkdtemp(prefix="tlsgate-pinned-"))
    state.chmod(0o755)
    database = state / "rules.sqlite"
    assert _tlsgate(database, "db", "init").returncode == 0
    with sqlite3.connect(database) as conn:
        conn.execute(
            "INSERT INTO inbound_connector (name, certificate, require_organization, require_unit, on_failure) "
            "VALUES ('partner-in', 'pinned', 'Partner Org', 'Mail', 'reject')"
        )
        conn.execute(f"INSERT INTO inbound_domain VALUES ('partner-in', 'sender', '{PARTNER_DOMAIN}')")
    for name in ("pinned", "expired", "other-org", "other-unit"):
        added = _tlsgate(database, "cert", "add", "partner-in", str(partners[name].cert_path))
        assert added.returncode == 0, added.stderr
    daemon = Policyd(instance.socket_dir, database)
    try:
        daemon.start()
        instance.start({
            "smtpd_recipient_restrictions": (
                f"check_policy_service {{ unix:{daemon.socket}, default_action=DEFER_IF_PERMIT, timeout=10s }}, "
                "reject_unauth_destination"
            ),
        })
        yield instance, daemon
    finally:
        instance.stop()
        daemon.stop()
        shutil.rmtree(state, ignore_errors=True)


# ------------------------------------------------------------------ fingerprints


@pytest.mark.postfix
@pytest.mark.parametrize("digest", ["sha256", "md5"])
def test_postfix_fingerprints_equal_cert_inspect(
    recording_postfix: tuple[PrivatePostfix, _Recorder], partners: dict[str, IssuedCert], digest: str
) -> None:
    instance, recorder = recording_postfix
    instance.reload({"smtpd_tls_fingerprint_digest": digest})
    assert instance.postconf("smtpd_tls_fingerprint_digest") == digest
    shown = {}
    for name in ("pinned", "renewed"):
        recipient = f"fp-{digest}-{name}@tlsgate.test"
        result = send(instance.port, f"a@{PARTNER_DOMAIN}", [recipient], starttls=True,
                      cert=partners[name].cert_path, key=partners[name].key_path)
        assert result.delivered, result
        request = recorder.for_recipient(recipient)
        info = _inspect(partners[name].cert_path)
        assert request["ccert_fingerprint"] == info["fingerprints"][digest]  # type: ignore[index]
        assert request["ccert_pubkey_fingerprint"] == info["pubkey_fingerprints"][digest]  # type: ignore[index]
        # Self-signed: fingerprints are sent, the names are not (the chain did not verify).
        assert request["ccert_subject"] == ""
        shown[name] = request
    assert shown["pinned"]["ccert_pubkey_fingerprint"] == shown["renewed"]["ccert_pubkey_fingerprint"]
    assert shown["pinned"]["ccert_fingerprint"] != shown["renewed"]["ccert_fingerprint"]


# ------------------------------------------------------------------ decisions


def _session(instance: PrivatePostfix, cert: IssuedCert, recipient: str) -> tuple[int, str, bool]:
    result = send(instance.port, f"partner@{PARTNER_DOMAIN}", [recipient], starttls=True,
                  cert=cert.cert_path, key=cert.key_path)
    reply = result.rcpt[recipient]
    return reply.code, reply.text, result.delivered


@pytest.mark.postfix
@pytest.mark.parametrize(
    ("partner", "code", "text"),
    [
        ("pinned", 250, ""),
        ("renewed", 250, ""),
        ("impostor", 554, "is not registered with connector partner-in"),
        ("expired", 554, "expired on"),
        ("other-org", 554, "organization Other Org is not Partner Org"),
        ("other-unit", 554, "organizational unit Sales is not Mail"),
    ],
)
@pytest.mark.parametrize("digest", ["sha256", "md5"])
def test_pinned_partner(
    pinned_postfix: tuple[PrivatePostfix, Policyd], partners: dict[str, IssuedCert],
    digest: str, partner: str, code: int, text: str,
) -> None:
    instance, _ = pinned_postfix
    if instance.postconf("smtpd_tls_fingerprint_digest") != digest:
        instance.reload({"smtpd_tls_fingerprint_digest": digest})
    recipient = f"{partner}-{digest}@tlsgate.test"
    got_code, got_text, delivered = _session(instance, partners[partner], recipient)
    assert got_code == code, got_text
    if code == 250:
        assert delivered
        [message] = instance.wait_delivered(recipient)
        assert b"Subject: tlsgate test" in message
    else:
        assert got_text.startswith("5.7.1"), got_text
        assert text in got_text
        assert not delivered
        assert instance.delivered(recipient) == []


@pytest.mark.postfix
def test_engine_decides_on_the_attributes_postfix_sends(
    recording_postfix: tuple[PrivatePostfix, _Recorder], partners: dict[str, IssuedCert], tmp_path: Path
) -> None:
    """Without the daemon: the decision engine, fed the exact fingerprints a real Postfix
    sent (sha256, then md5), with rules registered by `tlsgate cert add`."""
    from tlsgate.engine import decide
    from tlsgate.model import SessionFacts
    from tlsgate.store import load, open_engine

    database = tmp_path / "rules.sqlite"
    assert _tlsgate(database, "db", "init").returncode == 0
    with sqlite3.connect(database) as conn:
        conn.execute(
            "INSERT INTO inbound_connector (name, certificate, require_organization, require_unit, on_failure) "
            "VALUES ('partner-in', 'pinned', 'Partner Org', 'Mail', 'reject')"
        )
        conn.execute(f"INSERT INTO inbound_domain VALUES ('partner-in', 'sender', '{PARTNER_DOMAIN}')")
    for name in ("pinned", "expired", "other-org", "other-unit"):
        added = _tlsgate(database, "cert", "add", "partner-in", str(partners[name].cert_path))
        assert added.returncode == 0, added.stderr
    engine = open_engine(f"sqlite:///{database}")
    snapshot = load(engine).snapshot
    engine.dispose()
    expected = {
        "pinned": None, "renewed": None, "impostor": "is not registered", "expired": "expired on",
        "other-org": "organization Other Org", "other-unit": "organizational unit Sales",
    }
    instance, recorder = recording_postfix
    for digest in ("sha256", "md5"):
        instance.reload({"smtpd_tls_fingerprint_digest": digest})
        for name, reason in expected.items():
            recipient = f"engine-{digest}-{name}@tlsgate.test"
            result = send(instance.port, f"a@{PARTNER_DOMAIN}", [recipient], starttls=True,
                          cert=partners[name].cert_path, key=partners[name].key_path)
            assert result.delivered, result
            request = recorder.for_recipient(recipient)
            facts = SessionFacts(
                client_address=None,
                sender=request["sender"],
                recipient=request["recipient"],
                tls_protocol=request["encryption_protocol"] or None,
                tls_cipher=request["encryption_cipher"] or None,
                cert_fingerprint=request["ccert_fingerprint"] or None,
                pubkey_fingerprint=request["ccert_pubkey_fingerprint"] or None,
            )
            decision = decide(snapshot, facts, _now())
            assert decision.connector is not None and decision.connector.name == "partner-in"
            if reason is None:
                assert decision.action is None, (digest, name, decision.reason)
            else:
                assert decision.action is not None and decision.status == "5.7.1", (digest, name)
                assert reason in (decision.reason or ""), (digest, name, decision.reason)
