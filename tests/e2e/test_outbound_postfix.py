"""Outbound connectors through two real private Postfix instances: A relays mail for a
partner domain to B, with its route (transport_maps) and its TLS policy
(smtp_tls_policy_maps) both served by tlsgate-socketmap. A matching certificate means
delivery over verified TLS; a wrong name or no TLS at B keeps the message deferred in A's
queue (never sent in clear, never bounced) until the connector or B is fixed."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.socketmap.socketmap_daemon import SocketmapDaemon, execute, make_database, outbound_rows
from tests.support.pki import Pki
from tests.support.postfix import PostfixError, PrivatePostfix, send
from tlsgate.socketmap import Reply, Status

pytestmark = [pytest.mark.postfix, pytest.mark.slow]

PARTNER = "partner.test"
SENDER = "sender@example.test"
B_NAME = "mx.tlsgate.test"  # the name in B's certificate (pki.server)



class Relay:
    """A (the sender side, served by tlsgate-socketmap), B (the partner) and the database."""

    def __init__(self, a: PrivatePostfix, b: PrivatePostfix, daemon: SocketmapDaemon, db: str) -> None:
        self.a, self.b, self.daemon, self.db = a, b, daemon, db

    def submit(self, rcpt: str) -> None:
        result = send(self.a.port, SENDER, [rcpt])
        assert result.delivered, result

    def queue(self) -> list[dict[str, object]]:
        out = subprocess.run(
            ["postqueue", "-c", str(self.a.config_dir), "-j"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.a.config_dir), "-f"], check=True, timeout=30)

    def flush_until_delivered(self, rcpt: str, timeout: float = 30.0) -> bytes:
        """Flush A's queue until B has the message. After `postfix reload`, an smtpd process of
        B that was idle may still take the next connection with the old settings: the mail is
        deferred once more, and a later flush reaches a process with the new ones."""
        deadline = time.monotonic() + timeout
        while True:
            self.flush()
            try:
                return self.b.wait_delivered(rcpt, timeout=2)[0]
            except PostfixError:
                if time.monotonic() > deadline:
                    raise


@pytest.fixture
def relay(pki: Pki) -> Iterator[Relay]:
    with PrivatePostfix(pki, domains=(PARTNER,)) as b:
        a = PrivatePostfix(pki, domains=("example.test",))
        # As in production: a directory of our own inside the queue directory, referenced
        # relative to it, which is how chrooted smtp and trivial-rewrite processes see it.
        run = a.queue_dir / "tlsgate"
        run.mkdir(mode=0o755)
        db = make_database(
            run / "rules.sqlite",
            outbound_rows("partner", [PARTNER], match=[B_NAME], min_version="TLSv1.2", hosts=[("localhost", b.port, False)]),
        )
        daemon = SocketmapDaemon(run, db)
        a.configure({
            "mynetworks": "127.0.0.0/8",
            "relay_domains": PARTNER,
            "transport_maps": "socketmap:unix:tlsgate/socketmap.sock:transport",
            "smtp_tls_policy_maps": "socketmap:unix:tlsgate/socketmap.sock:tls_policy",
            "smtp_tls_CAfile": str(pki.ca.cert_path),
            "smtp_tls_loglevel": "1",
            # "localhost" from /etc/hosts: no DNS needed for the smart host
            "smtp_host_lookup": "native",
            "smtp_tls_fingerprint_digest": "sha256",
        })
        with daemon:
            daemon.wait_for_log("serving rules generation")
            with a:
                yield Relay(a, b, daemon, db)


def postmap_query(postfix: PrivatePostfix, key: str, table: str) -> str:
    done = subprocess.run(
        ["postmap", "-c", str(postfix.config_dir), "-q", key, table], capture_output=True, text=True, timeout=30
    )
    assert done.returncode in (0, 1), done.stderr
    return done.stdout.strip()


def test_matching_certificate_is_delivered_over_verified_tls(relay: Relay) -> None:
    sock = relay.daemon.socket_path
    # Postfix's own socketmap client gets the answers tlsgate-socketmap composes.
    assert postmap_query(relay.a, "x@partner.test", f"socketmap:unix:{sock}:transport") == f"smtp:[localhost]:{relay.b.port}"
    assert postmap_query(relay.a, f"[localhost]:{relay.b.port}", f"socketmap:unix:{sock}:tls_policy") == (
        f"secure match={B_NAME} protocols=>=TLSv1.2"
    )
    rcpt = "ok@partner.test"
    relay.submit(rcpt)
    message = relay.b.wait_delivered(rcpt, timeout=30)[0]
    relay.a.wait_for_log(r"Verified TLS connection established to localhost\[127\.0\.0\.1\]")
    relay.a.wait_for_log(rf"to=<{rcpt}>, relay=localhost\[127\.0\.0\.1\]:{relay.b.port}.*status=sent")
    assert b"(using TLSv1." in message  # B's Received header: the hop was encrypted
    relay.b.wait_for_log(r"TLS connection established from localhost\[127\.0\.0\.1\]")
    assert relay.queue() == []


def _assert_held(relay: Relay, rcpt: str, reason: str) -> None:
    relay.a.wait_for_log(rf"to=<{rcpt}>.*status=deferred \(.*{reason}", timeout=30)
    queued = relay.queue()
    assert [q["queue_name"] for q in queued] == ["deferred"]
    recipients = queued[0]["recipients"]
    assert isinstance(recipients, list) and recipients[0]["address"] == rcpt
    assert "status=bounced" not in relay.a.maillog()
    assert "status=sent" not in relay.a.maillog()
    assert relay.b.delivered(rcpt) == []
    # Nothing reached B's queue either: no MAIL FROM was ever sent in clear.
    assert "from=<sender@example.test>" not in relay.b.maillog()


def test_wrong_name_stays_deferred_until_the_connector_is_fixed(relay: Relay) -> None:
    execute(relay.db, ["UPDATE outbound_match_name SET name = 'wrong.partner.test' WHERE connector = 'partner'"])
    relay.daemon.signal(signal.SIGHUP)
    sock = relay.daemon.socket_path
    key = f"[localhost]:{relay.b.port}"
    wrong = Reply(Status.OK, "secure match=wrong.partner.test protocols=>=TLSv1.2")
    assert relay.daemon.query_until("tls_policy", key, wrong) == wrong
    rcpt = "held@partner.test"
    relay.submit(rcpt)
    _assert_held(relay, rcpt, "Server certificate not verified")

    execute(relay.db, [f"UPDATE outbound_match_name SET name = '{B_NAME}' WHERE connector = 'partner'"])
    relay.daemon.signal(signal.SIGHUP)
    relay.daemon.query_until("tls_policy", key, Reply(Status.OK, f"secure match={B_NAME} protocols=>=TLSv1.2"))
    assert postmap_query(relay.a, key, f"socketmap:unix:{sock}:tls_policy").startswith(f"secure match={B_NAME}")
    relay.flush()
    message = relay.b.wait_delivered(rcpt, timeout=30)[0]
    assert b"(using TLSv1." in message
    assert "status=bounced" not in relay.a.maillog()


def test_partner_without_tls_stays_deferred_until_it_offers_tls(relay: Relay) -> None:
    relay.b.reload({"smtpd_tls_security_level": "none"})
    rcpt = "plain@partner.test"
    relay.submit(rcpt)
    _assert_held(relay, rcpt, "TLS is required, but was not offered")

    relay.b.reload({"smtpd_tls_security_level": "may"})
    message = relay.flush_until_delivered(rcpt)
    assert b"(using TLSv1." in message
    assert "status=bounced" not in relay.a.maillog()


def test_misconfigured_connector_keeps_mail_queued(relay: Relay) -> None:
    execute(relay.db, ["INSERT INTO outbound_domain (connector, pattern) VALUES ('partner', 'bad*pattern')"])
    relay.daemon.signal(signal.SIGHUP)
    relay.daemon.wait_for_log("serving rules generation", count=2)
    rcpt = "broken@partner.test"
    # trivial-rewrite's transport lookup gets TEMP: smtpd answers 4xx at RCPT, the sender
    # keeps the message and retries; nothing is routed by Postfix's defaults meanwhile.
    result = send(relay.a.port, SENDER, [rcpt])
    refusal = result.rcpt[rcpt]
    assert refusal.code == 451 and "Temporary lookup failure" in refusal.text, result
    relay.a.wait_for_log(r"transport.*lookup.*(fail|error)|socketmap.*misconfigured|Temporary lookup failure")
    assert relay.b.delivered(rcpt) == []
    assert relay.queue() == []


def test_relayhost_never_carries_a_covered_domain_in_clear(pki: Pki) -> None:
    """relayhost (or any default route) must not take a connector's mail to a hop whose TLS
    policy key tlsgate does not cover. Here the connector covers "localhost" (no DNS needed:
    A's SMTP client resolves it from /etc/hosts) and has no smart host; relayhost is C, which
    offers no TLS. tlsgate's transport answer `smtp:` keeps the route on the domain, so the TLS
    policy lookup is for "localhost" and the mail reaches the partner B over verified TLS."""
    with PrivatePostfix(pki, domains=("localhost",)) as b, \
            PrivatePostfix(pki, domains=("localhost",), main_cf={"smtpd_tls_security_level": "none"}) as c:
        a = PrivatePostfix(pki, domains=("example.test",))
        run = a.queue_dir / "tlsgate"
        run.mkdir(mode=0o755)
        db = make_database(run / "rules.sqlite", outbound_rows("partner", ["localhost"], match=[B_NAME]))
        a.configure({
            "mynetworks": "127.0.0.0/8",
            "relay_domains": "localhost",
            "relayhost": f"[127.0.0.1]:{c.port}",
            "relay_transport": "relay",
            "default_transport": "smtp",
            "transport_maps": "socketmap:unix:tlsgate/socketmap.sock:transport",
            "smtp_tls_policy_maps": "socketmap:unix:tlsgate/socketmap.sock:tls_policy",
            "smtp_tls_CAfile": str(pki.ca.cert_path),
            "smtp_tls_loglevel": "1",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            # The partner's "MX" is localhost on B's port.
            "smtp_tcp_port": str(b.port),
        })
        with SocketmapDaemon(run, db) as daemon:
            daemon.wait_for_log("serving rules generation")
            with a:
                rcpt = "partner@localhost"
                assert send(a.port, SENDER, [rcpt]).delivered
                outcome = a.wait_for_log(rf"to=<{rcpt}>, relay=(\S+), .*status=(\w+)", timeout=30)
                assert outcome.group(1, 2) == (f"localhost[127.0.0.1]:{b.port}", "sent"), outcome.group(0)
                a.wait_for_log(r"Verified TLS connection established to localhost\[127\.0\.0\.1\]")
                assert b"(using TLSv1." in b.wait_delivered(rcpt, timeout=30)[0]
                assert c.delivered(rcpt) == []
                assert "from=<sender@example.test>" not in c.maillog()
                sock = daemon.socket_path
                assert postmap_query(a, "x@localhost", f"socketmap:unix:{sock}:transport") == "smtp:"
