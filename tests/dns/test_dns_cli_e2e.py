"""DNS address entries seen by an administrator (tlsgate dns, explain, lint) and through a
real private Postfix with tlsgate-policyd, against a DNS server the tests run on loopback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dns.dnsserver import DnsServer, running
from tests.policyd.policydhelp import PolicydProcess
from tests.support.pki import Pki
from tests.support.postfix import PrivatePostfix, send, skip_reason
from tests.support.rulesdb import make_rules_db

BIN = Path(sys.executable).parent
RULES = """
INSERT INTO inbound_connector (name, require_tls, restrict_to_addresses, on_failure) VALUES ('partner-in', 0, 1, 'reject');
INSERT INTO inbound_domain VALUES ('partner-in', 'sender', 'partner.test');
INSERT INTO inbound_address VALUES ('partner-in', 'a:mail.partner.test');
INSERT INTO inbound_connector (name, restrict_to_addresses) VALUES ('ghost-in', 1);
INSERT INTO inbound_domain VALUES ('ghost-in', 'sender', 'ghost.test');
INSERT INTO inbound_address VALUES ('ghost-in', 'a:mail.ghost.test');
"""


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with running({("mail.partner.test", "A"): ["127.0.0.2"]}, ttl=1) as server:
        yield server


def setup(work: Path, server: DnsServer, listen: str) -> Path:
    url = make_rules_db(work / "rules.sqlite", RULES)
    conf = work / "tlsgate.conf"
    conf.write_text(f"[database]\nurl = {url}\npoll_interval = 0.2\n"
                    f"[policyd]\nlisten = {listen}\nsocket_mode = 0666\n"
                    f"[dns]\nnameservers = 127.0.0.1\nport = {server.port}\ntimeout = 1\nmin_ttl = 1\n"
                    "[log]\ntarget = stderr\nlevel = debug\n")
    return conf


def tlsgate(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN / "tlsgate", "-c", conf, *args], capture_output=True, text=True)


def test_dns_show_explain_and_lint(dns_server: DnsServer, tmp_path: Path) -> None:
    conf = setup(tmp_path, dns_server, f"unix:{tmp_path}/p.sock")
    r = tlsgate(conf, "dns", "show")
    assert "a:mail.partner.test (partner-in): 127.0.0.2/32 (ttl" in r.stdout
    assert "a:mail.ghost.test (ghost-in): no addresses" in r.stdout
    assert "note: mail.ghost.test has no A or AAAA records" in r.stdout
    r = tlsgate(conf, "explain", "--client", "127.0.0.3", "--sender", "a@partner.test", "--recipient", "b@x.test")
    assert "a:mail.partner.test: 127.0.0.2/32 (resolved 0s ago" in r.stdout
    assert "verdict: REJECT 5.7.1 client 127.0.0.3 is outside the ranges of connector partner-in" in r.stdout
    r = tlsgate(conf, "lint", "--dns")
    assert "warning: inbound_address ('ghost-in', 'a:mail.ghost.test') column address: resolves to no addresses" in r.stdout
    dns_server.servfail.add("mail.partner.test")
    r = tlsgate(conf, "lint", "--dns", "--strict")
    assert r.returncode == 1 and "('partner-in', 'a:mail.partner.test') column address: does not resolve" in r.stdout
    r = tlsgate(conf, "explain", "--client", "127.0.0.2", "--sender", "a@partner.test", "--recipient", "b@x.test")
    assert "a:mail.partner.test: NOT RESOLVED (its connector defers)" in r.stdout
    assert "verdict: DEFER 4.3.5 connector partner-in is misconfigured: address entry a:mail.partner.test" in r.stdout


@pytest.mark.postfix
def test_partner_address_from_dns_through_postfix(dns_server: DnsServer) -> None:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="tlsgate-dns-e2e-"))
    pki = Pki(work / "pki")
    postfix = PrivatePostfix(pki)
    policyd = None
    try:
        sockdir = postfix.queue_dir / "tlsgate"
        sockdir.mkdir(mode=0o755)
        conf = setup(work, dns_server, f"unix:{sockdir}/policy.sock")
        policyd = PolicydProcess(conf, sockdir / "policy.sock", work / "policyd.log").start()
        postfix.start({"smtpd_recipient_restrictions": "reject_unauth_destination, check_policy_service "
                       "{ unix:tlsgate/policy.sock, timeout=10s, default_action=DEFER_IF_PERMIT }"})
        right = send(postfix.port, "a@partner.test", ["one@tlsgate.test"], source_address="127.0.0.2")
        assert right.delivered, right
        wrong = send(postfix.port, "a@partner.test", ["two@tlsgate.test"], source_address="127.0.0.3")
        assert wrong.rcpt["two@tlsgate.test"].code == 554
        assert "client 127.0.0.3 is outside the ranges of connector partner-in" in wrong.rcpt["two@tlsgate.test"].text
        # The partner's server moves: once the record's TTL runs out the daemon follows, no restart.
        dns_server.records[("mail.partner.test", "A")] = ["127.0.0.3"]
        policyd.wait_log("DNS entry a:mail.partner.test: 127.0.0.3/32")
        moved = send(postfix.port, "a@partner.test", ["three@tlsgate.test"], source_address="127.0.0.3")
        assert moved.delivered, moved
        old = send(postfix.port, "a@partner.test", ["four@tlsgate.test"], source_address="127.0.0.2")
        assert old.rcpt["four@tlsgate.test"].code == 554
        # A second server, then an answer without it: more likely a slip in the partner's zone
        # than a server gone, so its mail is still taken, not refused for good.
        dns_server.records[("mail.partner.test", "A")] = ["127.0.0.3", "127.0.0.4"]
        policyd.wait_log("127.0.0.4/32")  # in the line that gives both, in either order
        dns_server.records[("mail.partner.test", "A")] = ["127.0.0.3"]
        policyd.wait_log("DNS entry a:mail.partner.test no longer gives 127.0.0.4/32")
        held = send(postfix.port, "a@partner.test", ["six@tlsgate.test"], source_address="127.0.0.4")
        assert held.delivered, held
        # A name without addresses leaves the connector without ranges: a temporary failure that
        # names the entry, never a pass, never a refusal for good.
        ghost = send(postfix.port, "a@ghost.test", ["five@tlsgate.test"], source_address="127.0.0.2")
        reply = ghost.rcpt["five@tlsgate.test"]
        assert reply.code == 450
        assert "connector ghost-in is misconfigured: address entry a:mail.ghost.test resolves to no addresses" in reply.text
        assert postfix.wait_delivered("three@tlsgate.test") and postfix.wait_delivered("six@tlsgate.test")
    finally:
        if policyd is not None:
            policyd.stop()
        postfix.stop()
        shutil.rmtree(work, ignore_errors=True)
