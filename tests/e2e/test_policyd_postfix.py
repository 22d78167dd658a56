"""tlsgate-policyd through a real private Postfix.

The daemon runs from the installed console script on a socket inside the instance's queue
directory, referenced relatively (``unix:tlsgate/policy.sock``) exactly as the documented
main.cf line does; rules are SQLite rows written with plain SQL; clients are smtplib and
swaks, with and without STARTTLS and client certificates, from several 127.x addresses.
Deliveries are checked in the maildirs, refusals by the SMTP reply.
"""

from __future__ import annotations

import shutil
import sqlite3
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.support.postfix as harness
from tests.policyd.policydhelp import PolicydProcess, write_config
from tests.support.pki import Pki, issue_certificate
from tests.support.postfix import PrivatePostfix, send, swaks
from tests.support.rulesdb import make_rules_db

pytestmark = pytest.mark.postfix

RULES = """
INSERT INTO inbound_connector (name, on_failure) VALUES ('contoso-in', 'reject');
INSERT INTO inbound_domain VALUES ('contoso-in', 'sender', 'contoso.test');
INSERT INTO inbound_connector (name, on_failure) VALUES ('defer-in', 'defer');
INSERT INTO inbound_domain VALUES ('defer-in', 'sender', 'defer.test');
INSERT INTO inbound_connector (name, certificate, on_failure) VALUES ('partner-in', 'trusted', 'reject');
INSERT INTO inbound_domain VALUES ('partner-in', 'sender', 'partner.test');
INSERT INTO inbound_cert_name VALUES ('partner-in', 'subject', 'mail.partner.test');
INSERT INTO inbound_cert_name VALUES ('partner-in', 'issuer', 'Lab Test*');
INSERT INTO inbound_connector (name, certificate, on_failure) VALUES ('wrongname-in', 'trusted', 'reject');
INSERT INTO inbound_domain VALUES ('wrongname-in', 'sender', 'wrongname.test');
INSERT INTO inbound_cert_name VALUES ('wrongname-in', 'subject', '*.other.test');
INSERT INTO inbound_connector (name, certificate, on_failure) VALUES ('issuer-in', 'trusted', 'reject');
INSERT INTO inbound_domain VALUES ('issuer-in', 'sender', 'issuer.test');
INSERT INTO inbound_cert_name VALUES ('issuer-in', 'issuer', 'Other CA*');
INSERT INTO inbound_connector (name, certificate, on_failure) VALUES ('hu-in', 'trusted', 'reject');
INSERT INTO inbound_domain VALUES ('hu-in', 'sender', 'hu.test');
INSERT INTO inbound_cert_name VALUES ('hu-in', 'issuer', 'Főtanúsítvány CA');
INSERT INTO inbound_connector (name, min_tls_version, on_failure) VALUES ('v13-in', 'TLSv1.3', 'reject');
INSERT INTO inbound_domain VALUES ('v13-in', 'sender', 'v13.test');
INSERT INTO inbound_connector (name, require_forward_secrecy, on_failure) VALUES ('fs-in', 1, 'reject');
INSERT INTO inbound_domain VALUES ('fs-in', 'sender', 'fs.test');
INSERT INTO inbound_connector (name, require_tls, restrict_to_addresses, on_failure) VALUES ('onprem-in', 0, 1, 'reject');
INSERT INTO inbound_domain VALUES ('onprem-in', 'sender', 'onprem.test');
INSERT INTO inbound_address VALUES ('onprem-in', '127.0.0.2/32');
INSERT INTO inbound_connector (name, on_failure) VALUES ('example-rcpt', 'defer');
INSERT INTO inbound_domain VALUES ('example-rcpt', 'recipient', 'example.test');
INSERT INTO inbound_connector (name, mode, on_failure) VALUES ('watch-in', 'monitor', 'reject');
INSERT INTO inbound_domain VALUES ('watch-in', 'sender', 'watch.test');
INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('change-in', 0, 'reject');
INSERT INTO inbound_domain VALUES ('change-in', 'sender', 'change.test');
"""



class Stack:
    def __init__(self, postfix: PrivatePostfix, policyd: PolicydProcess, db: Path) -> None:
        self.postfix = postfix
        self.policyd = policyd
        self.db = db

    def sql(self, statement: str) -> None:
        con = sqlite3.connect(self.db)
        con.execute(statement)
        con.commit()
        con.close()

    def apply(self, *statements: str) -> None:
        """Run ``statements`` in one transaction and wait until the daemon decides by them."""
        con = sqlite3.connect(self.db)
        try:
            with con:
                for statement in statements:
                    con.execute(statement)
            (generation,) = con.execute("SELECT generation FROM rules_generation").fetchone()
        finally:
            con.close()
        self.policyd.wait_log(f"loaded rules generation {generation}:")


@pytest.fixture(scope="module")
def stack(pki: Pki) -> Iterator[Stack]:
    instance = PrivatePostfix(pki)
    work = Path(tempfile.mkdtemp(prefix="tlsgate-policyd-e2e-"))
    policyd: PolicydProcess | None = None
    try:
        sockdir = instance.queue_dir / "tlsgate"
        sockdir.mkdir(mode=0o755)
        sock = sockdir / "policy.sock"
        db = work / "rules.sqlite"
        url = make_rules_db(db, RULES)
        config = write_config(work, url, f"unix:{sock}")
        with config.open("a") as fh:  # what Postfix appends to an address without a domain
            fh.write("[engine]\nmyorigin = example.test\n")
        policyd = PolicydProcess(config, sock, work / "policyd.log").start()
        instance.start({
            "smtpd_recipient_restrictions": "reject_unauth_destination, check_policy_service "
            "{ unix:tlsgate/policy.sock, timeout=10s, default_action=DEFER_IF_PERMIT }",
        })
        yield Stack(instance, policyd, db)
    finally:
        if policyd is not None:
            policyd.stop()
        instance.stop()
        shutil.rmtree(work, ignore_errors=True)


def rcpt_code(result: harness.SendResult, rcpt: str) -> int:
    return result.rcpt[rcpt].code


def test_no_connector_plaintext_delivered(stack: Stack) -> None:
    result = send(stack.postfix.port, "a@other.test", ["open@tlsgate.test"])
    assert result.delivered, result
    assert stack.postfix.wait_delivered("open@tlsgate.test")


def test_require_tls_reject_and_defer(stack: Stack) -> None:
    result = send(stack.postfix.port, "a@contoso.test", ["r@tlsgate.test"])
    reply = result.rcpt["r@tlsgate.test"]
    assert reply.code == 554, reply
    assert reply.text == "5.7.10 <r@tlsgate.test>: Recipient address rejected: TLS required by connector contoso-in"
    assert result.data is None
    result = send(stack.postfix.port, "a@defer.test", ["d@tlsgate.test"])
    reply = result.rcpt["d@tlsgate.test"]
    assert reply.code == 450, reply
    assert reply.text == "4.7.10 <d@tlsgate.test>: Recipient address rejected: TLS required by connector defer-in"
    ok = send(stack.postfix.port, "a@contoso.test", ["r-tls@tlsgate.test"], starttls=True)
    assert ok.delivered, ok
    assert stack.postfix.wait_delivered("r-tls@tlsgate.test")
    log = stack.policyd.wait_log("from=<a@defer.test>")
    assert "defer connector=defer-in client=localhost[127.0.0.1] from=<a@defer.test> to=<d@tlsgate.test> tls=none" in log


def test_swaks_plaintext_and_tls(stack: Stack) -> None:
    refused = swaks(stack.postfix.port, sender="b@contoso.test", recipients=["sw@tlsgate.test"])
    assert "554 5.7.10" in refused.output
    accepted = swaks(stack.postfix.port, sender="b@contoso.test", recipients=["sw-tls@tlsgate.test"], tls=True)
    assert accepted.returncode == 0, accepted.output
    assert stack.postfix.wait_delivered("sw-tls@tlsgate.test")


def test_trusted_certificate_name_and_issuer(stack: Stack, pki: Pki) -> None:
    good = send(stack.postfix.port, "a@partner.test", ["p@tlsgate.test"], starttls=True,
                cert=pki.partner.cert_path, key=pki.partner.key_path)
    assert good.delivered, good
    for cert in (None, pki.self_signed, pki.untrusted_client):
        bad = send(stack.postfix.port, "a@partner.test", ["p-bad@tlsgate.test"], starttls=True,
                   cert=cert.cert_path if cert else None, key=cert.key_path if cert else None)
        reply = bad.rcpt["p-bad@tlsgate.test"]
        assert reply.code == 554 and "no client certificate that chains to a trusted CA" in reply.text, reply
    wrong = send(stack.postfix.port, "a@wrongname.test", ["w@tlsgate.test"], starttls=True,
                 cert=pki.partner.cert_path, key=pki.partner.key_path)
    assert "certificate name mail.partner.test does not match *.other.test" in wrong.rcpt["w@tlsgate.test"].text
    issuer = send(stack.postfix.port, "a@issuer.test", ["i@tlsgate.test"], starttls=True,
                  cert=pki.partner.cert_path, key=pki.partner.key_path)
    assert "certificate issuer Lab Test CA does not match Other CA*" in issuer.rcpt["i@tlsgate.test"].text
    assert stack.postfix.wait_delivered("p@tlsgate.test")


def test_a_non_ascii_issuer_name_is_read_as_postfix_encodes_it(stack: Stack, pki: Pki) -> None:
    # Postfix xtext-encodes every byte of a UTF-8 name on its own ("F+C5+91..."): read one
    # character per byte, the issuer never matched and the partner's mail got a 554.
    inter = issue_certificate(pki.directory, "hu-ca", common_name="Főtanúsítvány CA", issuer=pki.ca, is_ca=True)
    leaf = issue_certificate(pki.directory, "hu-leaf", common_name="mail.hu.test", san=("mail.hu.test",), issuer=inter)
    chain = pki.directory / "hu-chain.crt"
    chain.write_bytes(leaf.cert_path.read_bytes() + inter.cert_path.read_bytes())
    good = send(stack.postfix.port, "a@hu.test", ["hu@tlsgate.test"], starttls=True, cert=chain, key=leaf.key_path)
    assert good.delivered, good
    other = send(stack.postfix.port, "a@hu.test", ["hu-bad@tlsgate.test"], starttls=True,
                 cert=pki.partner.cert_path, key=pki.partner.key_path)
    assert "certificate issuer Lab Test CA does not match Főtanúsítvány CA" in other.rcpt["hu-bad@tlsgate.test"].text


def test_minimum_tls_version(stack: Stack) -> None:
    old = send(stack.postfix.port, "a@v13.test", ["v@tlsgate.test"], starttls=True,
               tls_max_version=ssl.TLSVersion.TLSv1_2)
    assert old.tls_version == "TLSv1.2"
    reply = old.rcpt["v@tlsgate.test"]
    assert reply.code == 554 and "TLSv1.2 is below the minimum TLSv1.3" in reply.text
    new = send(stack.postfix.port, "a@v13.test", ["v13@tlsgate.test"], starttls=True)
    assert new.delivered


def test_forward_secrecy(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = send(stack.postfix.port, "a@fs.test", ["fs@tlsgate.test"], starttls=True,
              tls_max_version=ssl.TLSVersion.TLSv1_2)
    assert fs.delivered and fs.tls_cipher is not None and "ECDHE" in fs.tls_cipher
    original = harness.client_tls_context

    def static_rsa(*args: object, **kwargs: object) -> ssl.SSLContext:
        context = original(*args, **kwargs)  # type: ignore[arg-type]
        context.set_ciphers("AES256-GCM-SHA384")  # RSA key exchange: no forward secrecy
        return context

    monkeypatch.setattr(harness, "client_tls_context", static_rsa)
    nofs = send(stack.postfix.port, "a@fs.test", ["nofs@tlsgate.test"], starttls=True,
                tls_max_version=ssl.TLSVersion.TLSv1_2)
    assert nofs.tls_cipher == "AES256-GCM-SHA384", nofs
    reply = nofs.rcpt["nofs@tlsgate.test"]
    assert reply.code == 554 and "cipher AES256-GCM-SHA384 lacks forward secrecy" in reply.text


def test_restrict_to_client_ranges(stack: Stack) -> None:
    inside = send(stack.postfix.port, "a@onprem.test", ["in@tlsgate.test"], source_address="127.0.0.2")
    assert inside.delivered, inside
    outside = send(stack.postfix.port, "a@onprem.test", ["out@tlsgate.test"], source_address="127.0.0.3")
    reply = outside.rcpt["out@tlsgate.test"]
    assert reply.code == 554 and "client 127.0.0.3 is outside the ranges of connector onprem-in" in reply.text


def test_a_recipient_without_a_domain_is_judged_where_postfix_delivers_it(stack: Stack) -> None:
    # Postfix appends @$myorigin to RCPT TO:<bob> after its restrictions: with $myorigin in a
    # recipient connector's scope (example-rcpt), the bare address must meet that connector.
    stack.postfix.reload({"myorigin": "example.test"})
    try:
        result = send(stack.postfix.port, "a@other.test", ["bob", "full@tlsgate.test"])
        reply = result.rcpt["bob"]
        assert reply.code == 450, reply
        assert reply.text == ("4.7.10 <bob>: Recipient address rejected: TLS required by connector example-rcpt")
        assert result.delivered and stack.postfix.wait_delivered("full@tlsgate.test")
        assert stack.postfix.delivered("bob@example.test") == []
        stack.policyd.wait_log("defer connector=example-rcpt client=localhost[127.0.0.1] from=<a@other.test> "
                               "to=<bob@example.test> tls=none")
        tls = send(stack.postfix.port, "a@other.test", ["bob"], starttls=True)
        assert tls.delivered, tls
        assert stack.postfix.wait_delivered("bob@example.test")
    finally:
        stack.postfix.reload({"myorigin": "$myhostname"})


def test_addresses_postfix_delivers_elsewhere_than_they_show(stack: Stack) -> None:
    # Postfix delivers bob@example.test@ to bob@example.test, and bob%example.test to
    # bob@example.test (allow_percent_hack): each must meet example-rcpt, or be deferred.
    result = send(stack.postfix.port, "a@other.test", ["bob@example.test@", "bob%example.test"])
    empty, percent = result.rcpt["bob@example.test@"], result.rcpt["bob%example.test"]
    assert (empty.code, percent.code) == (450, 450), result
    assert empty.text.endswith("TLS required by connector example-rcpt")
    assert "may be delivered to another domain than it shows" in percent.text
    assert result.data is None


def test_a_recipient_routed_on_from_a_local_domain_meets_the_connector_where_it_goes(stack: Stack) -> None:
    # With localhost one of its own domains, Postfix strips @localhost and resolves what is
    # left (resolve.c): both recipients below are delivered to example.test, whose connector
    # requires TLS. Judged by localhost alone, they passed it.
    # Postfix opens a quoted local part and drops its blanks: the third goes to bob@example.test.
    routed = ["bob@example.test@localhost", "example.test!frank@localhost", '"bob@example . test"@localhost']
    stack.postfix.reload({"mydestination": "localhost"})
    try:
        plain = send(stack.postfix.port, "a@other.test", routed)
        for rcpt in routed:
            reply = plain.rcpt[rcpt]
            assert reply.code == 450 and "may be delivered to another domain than it shows" in reply.text, (rcpt, reply)
        assert plain.data is None
        tls = send(stack.postfix.port, "a@other.test", routed[:1], starttls=True)
        assert tls.delivered, tls
        assert stack.postfix.wait_delivered("bob@example.test")
    finally:
        stack.postfix.reload({"mydestination": ""})


def test_an_underscore_in_a_label_keeps_a_domain_under_its_parent(stack: Stack) -> None:
    # Postfix accepts MAIL FROM:<a@mx_1.subs.test>; no host name for its underscore, it was
    # judged by '*' connectors alone and escaped the one for *.subs.test.
    stack.apply("INSERT INTO inbound_connector (name, on_failure) VALUES ('subs-in', 'reject')",
                "INSERT INTO inbound_domain VALUES ('subs-in', 'sender', '*.subs.test')")
    try:
        result = send(stack.postfix.port, "a@mx_1.subs.test", ["u@tlsgate.test"])
        reply = result.rcpt["u@tlsgate.test"]
        assert reply.code == 554 and "TLS required by connector subs-in" in reply.text, reply
    finally:
        stack.apply("DELETE FROM inbound_domain WHERE connector = 'subs-in'",
                    "DELETE FROM inbound_connector WHERE name = 'subs-in'")


def test_a_domain_that_is_no_domain_name_still_meets_every_star_connector(stack: Stack) -> None:
    # Postfix accepts MAIL FROM:<a@[127.0.0.1]> and <a@under_score.test>; judged by no domain,
    # they escaped a connector for every sender ('*'). A recipient at an address literal may be
    # delivered locally, under a domain tlsgate cannot see, and waits where a recipient
    # connector is in force.
    stack.apply("INSERT INTO inbound_connector (name, on_failure) VALUES ('everyone-in', 'reject')",
                "INSERT INTO inbound_domain VALUES ('everyone-in', 'sender', '*')")
    try:
        for sender in ("a@[127.0.0.1]", "a@under_score.test"):
            result = send(stack.postfix.port, sender, ["star@tlsgate.test"])
            reply = result.rcpt["star@tlsgate.test"]
            assert reply.code == 554 and "TLS required by connector everyone-in" in reply.text, (sender, reply)
        literal = send(stack.postfix.port, "a@other.test", ["bob@[127.0.0.1]"], starttls=True).rcpt["bob@[127.0.0.1]"]
        assert literal.code == 450 and "names a host by its address" in literal.text, literal
    finally:
        stack.apply("DELETE FROM inbound_domain WHERE connector = 'everyone-in'",
                    "DELETE FROM inbound_connector WHERE name = 'everyone-in'")


def test_recipient_scope_refuses_only_that_recipient(stack: Stack) -> None:
    result = send(stack.postfix.port, "a@other.test", ["scoped@example.test", "free@tlsgate.test"])
    assert rcpt_code(result, "scoped@example.test") == 450
    assert rcpt_code(result, "free@tlsgate.test") == 250
    assert result.delivered
    assert stack.postfix.wait_delivered("free@tlsgate.test")
    assert stack.postfix.delivered("scoped@example.test") == []


def test_monitor_mode_accepts_and_logs(stack: Stack) -> None:
    result = send(stack.postfix.port, "a@watch.test", ["watch@tlsgate.test"])
    assert result.delivered
    log = stack.policyd.wait_log("monitor-reject connector=watch-in")
    assert 'from=<a@watch.test> to=<watch@tlsgate.test> tls=none status=5.7.10' in log


def test_row_change_applies_without_restart(stack: Stack) -> None:
    before = send(stack.postfix.port, "a@change.test", ["c1@tlsgate.test"])
    assert before.delivered
    loads = stack.policyd.log().count("loaded rules generation")
    stack.sql("UPDATE inbound_connector SET require_tls = 1 WHERE name = 'change-in'")
    stack.policyd.wait_log("loaded rules generation", count=loads + 1)
    after = send(stack.postfix.port, "a@change.test", ["c2@tlsgate.test"])
    assert rcpt_code(after, "c2@tlsgate.test") == 554


def test_daemon_down_gives_4xx_then_the_same_message_is_accepted(stack: Stack) -> None:
    assert stack.policyd.stop() == 0
    try:
        down = send(stack.postfix.port, "a@other.test", ["retry@tlsgate.test"])
        reply = down.rcpt["retry@tlsgate.test"]
        assert 400 <= reply.code < 500, reply
        assert down.data is None
    finally:
        stack.policyd.start()
    again = send(stack.postfix.port, "a@other.test", ["retry@tlsgate.test"])
    assert again.delivered, again
    assert len(stack.postfix.wait_delivered("retry@tlsgate.test")) == 1
