"""Addresses spelt with RFC 822 syntax, through a real private Postfix and tlsgate-milter.
Postfix reads ``<a@contoso.test(x)>`` with its own parser and keeps, delivers and tells a
policy server a@contoso.test, while a milter's envelope callbacks get the client's spelling.
The milter judges the address Postfix read ({mail_addr}, {rcpt_addr}); without those macros,
such a spelling waits where a connector could apply, never passes by meeting none. A From
header whose domain is quoted, escaped or encoded is judged as a mail reader may show it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.milter.milterhelp import MilterProcess, make_rules_db, write_config
from tests.support.pki import Pki
from tests.support.postfix import PrivatePostfix, send

pytestmark = pytest.mark.postfix

RULES = """
INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('contoso-in', 1, 'reject');
INSERT INTO inbound_domain VALUES ('contoso-in', 'sender', 'contoso.test');
INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('rcpt-in', 1, 'reject');
INSERT INTO inbound_domain VALUES ('rcpt-in', 'recipient', 'example.test');
INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('bank-hdr', 1, 'reject');
INSERT INTO inbound_domain VALUES ('bank-hdr', 'header_from', 'bank.test');
"""
TLS_MACROS = "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}"
# Each read by Postfix as the address before it: a comment, blanks, a quoted or escaped domain.
SENDERS = ["a@contoso.test(x)", "a@contoso .test", 'a@"contoso.test"', "a@contoso\\.test", "a@(x)contoso.test",
           "a@contoso.test.(x)"]
RECIPIENTS = ["y@example.test(x)", "y@example .test", 'y@"example.test"', "y@example\\.test"]


def _stack(pki: Pki, macros: dict[str, str]) -> Iterator[PrivatePostfix]:
    instance = PrivatePostfix(pki)
    work = Path(tempfile.mkdtemp(prefix="tlsgate-milter-"))
    milter: MilterProcess | None = None
    try:
        sock = instance.socket_dir / "milter.sock"
        config = write_config(work, make_rules_db(work / "rules.sqlite", RULES), f"unix:{sock}")
        milter = MilterProcess(config, sock, work / "milter.log").start()
        instance.start({"smtpd_milters": f"unix:{sock}", "milter_default_action": "tempfail",
                        "milter_helo_macros": TLS_MACROS, **macros,
                        # The test client stands for a remote one, whose headers cleanup leaves
                        # as they came (it gives milters the headers it rewrote, if any).
                        "local_header_rewrite_clients": ""})
        yield instance
    finally:
        if milter is not None:
            milter.stop()
        instance.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def postfix(pki: Pki) -> Iterator[PrivatePostfix]:
    """Postfix's default milter_mail_macros and milter_rcpt_macros, which hold the addresses."""
    yield from _stack(pki, {})


@pytest.fixture(scope="module")
def without_addresses(pki: Pki) -> Iterator[PrivatePostfix]:
    """Macro lists an administrator cut down to the queue id: the milter sees spellings only."""
    yield from _stack(pki, {"milter_mail_macros": "i", "milter_rcpt_macros": "i"})


@pytest.mark.parametrize("sender", SENDERS)
def test_a_sender_spelt_with_syntax_meets_its_connector(postfix: PrivatePostfix, sender: str) -> None:
    reply = send(postfix.port, sender, ["one@tlsgate.test"]).rcpt["one@tlsgate.test"]
    assert (reply.code, reply.text.split(" ", 1)[0]) == (550, "5.7.10"), reply
    assert "connector contoso-in" in reply.text


@pytest.mark.parametrize("recipient", RECIPIENTS)
def test_a_recipient_spelt_with_syntax_meets_its_connector(postfix: PrivatePostfix, recipient: str) -> None:
    reply = send(postfix.port, "b@mailer.test", [recipient]).rcpt[recipient]
    assert (reply.code, reply.text.split(" ", 1)[0]) == (550, "5.7.10"), reply
    assert "connector rcpt-in" in reply.text


def test_spellings_postfix_reads_the_same_still_pass_over_tls(postfix: PrivatePostfix) -> None:
    result = send(postfix.port, SENDERS[0], [RECIPIENTS[0]], starttls=True)
    assert result.delivered, result
    assert postfix.wait_delivered("y@example.test")


def test_without_the_address_macros_such_spellings_wait(without_addresses: PrivatePostfix) -> None:
    port = without_addresses.port
    for sender in SENDERS:
        reply = send(port, sender, ["one@tlsgate.test"]).rcpt["one@tlsgate.test"]
        assert reply.code // 100 == 4 and reply.text.startswith("4.1.7"), (sender, reply)
        assert "spelt with RFC 822 syntax" in reply.text
    for recipient in RECIPIENTS:
        reply = send(port, "b@mailer.test", [recipient]).rcpt[recipient]
        assert reply.code // 100 == 4 and reply.text.startswith("4.1.3"), (recipient, reply)
    # Plain spellings are judged as they read; a quoted local part is plain too.
    plain = send(port, "a@contoso.test", ["one@tlsgate.test"]).rcpt["one@tlsgate.test"]
    assert (plain.code, plain.text.split(" ", 1)[0]) == (550, "5.7.10"), plain
    quoted = send(port, '"j doe"@mailer.test', ["two@tlsgate.test"])
    assert quoted.delivered, quoted


@pytest.mark.parametrize("author", ['ceo@"bank.test"', "ceo@bank\\.test", "=?utf-8?b?Y2VvQGJhbmsudGVzdA==?="])
def test_a_from_header_whose_domain_is_hidden_meets_its_connector(postfix: PrivatePostfix, author: str) -> None:
    body = f"From: {author}\r\nSubject: t\r\n\r\nhello\r\n".encode()
    result = send(postfix.port, "b@mailer.test", ["three@tlsgate.test"], data=body)
    assert result.data is not None and result.data.code == 550, result
    assert "connector bank-hdr" in result.data.text
