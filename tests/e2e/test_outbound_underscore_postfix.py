"""A recipient domain with an underscore, through a real Postfix: its valid_hostname() admits
``a_b.partner.test`` and delivers to it, so the ``*.partner.test`` connector must route it.
Once the transport answered NOTFOUND for it and relayhost took the mail in plaintext."""

from __future__ import annotations

import pytest

from tests.socketmap.socketmap_daemon import SocketmapDaemon, make_database, outbound_rows
from tests.support.pki import Pki
from tests.support.postfix import PrivatePostfix, send

pytestmark = [pytest.mark.postfix, pytest.mark.slow]

RCPT = "u@a_b.partner.test"
B_NAME = "mx.tlsgate.test"  # the name in B's certificate (pki.server)


def test_underscore_subdomain_takes_its_connectors_route_not_relayhost(pki: Pki) -> None:
    # Smart host and relay by address: nothing to resolve. B is the partner, C a relay without TLS.
    domains = ("a_b.partner.test",)
    with PrivatePostfix(pki, domains=domains) as b, \
            PrivatePostfix(pki, domains=domains, main_cf={"smtpd_tls_security_level": "none"}) as c:
        a = PrivatePostfix(pki, domains=("example.test",))
        run = a.queue_dir / "tlsgate"
        run.mkdir(mode=0o755)
        db = make_database(run / "rules.sqlite", outbound_rows(
            "partner", ["*.partner.test"], match=[B_NAME], hosts=[("127.0.0.1", b.port, False)]))
        a.configure({
            "mynetworks": "127.0.0.0/8",
            "relay_domains": " ".join(domains),
            "default_transport": "smtp",
            "relay_transport": "smtp",
            "relayhost": f"[127.0.0.1]:{c.port}",
            "transport_maps": "socketmap:unix:tlsgate/socketmap.sock:transport",
            "smtp_tls_policy_maps": "socketmap:unix:tlsgate/socketmap.sock:tls_policy",
            "smtp_tls_CAfile": str(pki.ca.cert_path),
            "smtp_tls_loglevel": "1",
            "smtp_dns_support_level": "disabled",
        })
        with SocketmapDaemon(run, db) as daemon:
            daemon.wait_for_log("serving rules generation")
            with a:
                assert send(a.port, "sender@example.test", [RCPT]).delivered
                outcome = a.wait_for_log(rf"to=<{RCPT}>, relay=\S+, .*status=\w+", timeout=30).group(0)
                assert f"relay=127.0.0.1[127.0.0.1]:{b.port}," in outcome and "status=sent" in outcome, outcome
                a.wait_for_log(rf"Verified TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{b.port}")
                assert b"(using TLSv1." in b.wait_delivered(RCPT, timeout=30)[0]
                assert c.delivered(RCPT) == []
