"""tlsgate-milter through a real private Postfix: the installed console script on a unix
socket in the instance's socket directory, rules in SQLite written with plain SQL, and
smtplib clients with and without STARTTLS and client certificates. Refusals are checked by
the SMTP reply codes, acceptance by the maildirs, the trace header in the delivered files.
The last tests run both daemons: tlsgate-policyd checks pinned certificates at RCPT while
the milter ([milter] pinned_action = policyd) still judges header-From connectors."""

from __future__ import annotations

import email.message
import email.parser
import email.utils
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.milter.milterhelp import POLICYD, MilterProcess, make_rules_db, write_config
from tests.support.pki import PARTNER_CN, Pki, issue_certificate
from tests.support.postfix import PrivatePostfix, send, skip_reason

pytestmark = pytest.mark.postfix

RULES = """
INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('contoso-in', 1, 'reject');
INSERT INTO inbound_domain VALUES ('contoso-in', 'sender', 'contoso.test');
INSERT INTO inbound_connector (name, require_tls, certificate, on_failure)
    VALUES ('partner-in', 1, 'trusted', 'reject');
INSERT INTO inbound_domain VALUES ('partner-in', 'sender', 'partner.test');
INSERT INTO inbound_cert_name VALUES ('partner-in', 'subject', 'mail.partner.test');
INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('split-in', 1, 'defer');
INSERT INTO inbound_domain VALUES ('split-in', 'sender', 'split.test');
INSERT INTO inbound_domain VALUES ('split-in', 'recipient', 'example.test');
INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('bank-hdr', 1, 'reject');
INSERT INTO inbound_domain VALUES ('bank-hdr', 'header_from', 'bank.test');
INSERT INTO inbound_connector (name, require_tls, mode, on_failure) VALUES ('watch-in', 1, 'monitor', 'reject');
INSERT INTO inbound_domain VALUES ('watch-in', 'sender', 'watch.test');
"""

TLS_MACROS = "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}"
# Postfix's default milter_mail_macros plus the TLS macros, for clients that skip the
# second EHLO (the HELO-stage macros are then never sent after STARTTLS).
MAIL_MACROS = f"i {{auth_type}} {{auth_authen}} {{auth_author}} {{mail_addr}} {{mail_host}} {{mail_mailer}} {TLS_MACROS}"


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    directory = Path(tempfile.mkdtemp(prefix="tlsgate-pki-"))
    try:
        yield Pki(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(pki: Pki) -> Iterator[tuple[PrivatePostfix, MilterProcess]]:
    instance = PrivatePostfix(pki)
    work = Path(tempfile.mkdtemp(prefix="tlsgate-milter-"))
    milter: MilterProcess | None = None
    try:
        sock = instance.socket_dir / "milter.sock"
        url = make_rules_db(work / "rules.sqlite", RULES)
        config = write_config(work, url, f"unix:{sock}")
        milter = MilterProcess(config, sock, work / "milter.log").start()
        instance.start({
            "smtpd_milters": f"unix:{sock}",
            "milter_default_action": "tempfail",
            "milter_helo_macros": TLS_MACROS,
            "milter_mail_macros": MAIL_MACROS,
            # Let a client send MAIL without greeting again after STARTTLS.
            "smtpd_helo_required": "no",
        })
        yield instance, milter
    finally:
        if milter is not None:
            milter.stop()
        instance.stop()
        shutil.rmtree(work, ignore_errors=True)


def headers(raw: bytes) -> email.message.Message:
    return email.parser.BytesHeaderParser().parsebytes(raw)


def message(
    sender: str, header_from: str, recipients: list[str], extra: tuple[tuple[str, str], ...] = ()
) -> bytes:
    msg = email.message.EmailMessage()
    msg["From"] = header_from
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = "tlsgate milter test"
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = email.utils.make_msgid(domain="client.tlsgate.test")
    for name, value in extra:
        msg[name] = value
    msg.set_content("hello\n")
    return msg.as_bytes()


def test_plaintext_refused_for_a_require_tls_sender(stack: tuple[PrivatePostfix, MilterProcess]) -> None:
    postfix, _ = stack
    result = send(postfix.port, "a@contoso.test", ["plain@tlsgate.test"])
    reply = result.rcpt["plain@tlsgate.test"]
    assert reply.code == 550
    assert "5.7.10 TLS required by connector contoso-in" in reply.text
    assert result.data is None


def test_a_long_sender_address_keeps_its_domain(stack: tuple[PrivatePostfix, MilterProcess]) -> None:
    # Postfix accepts a path far longer than RFC 5321's 256 characters; cut at 1024, this
    # one lost its domain and its connector, and was accepted in plaintext.
    postfix, _ = stack
    result = send(postfix.port, "a" * 1030 + "@contoso.test", ["long@tlsgate.test"])
    reply = result.rcpt["long@tlsgate.test"]
    assert reply.code == 550, result
    assert "5.7.10 TLS required by connector contoso-in" in reply.text
    assert result.data is None


def test_tls_accepted_with_the_trace_header(stack: tuple[PrivatePostfix, MilterProcess]) -> None:
    postfix, _ = stack
    result = send(postfix.port, "a@contoso.test", ["tls@tlsgate.test"], starttls=True)
    assert result.delivered, result
    trace = headers(postfix.wait_delivered("tls@tlsgate.test")[0])["X-TLSgate"]
    assert f"{postfix.myhostname}; verdict=pass; connector=contoso-in; tls=TLSv1.3;" in trace
    assert "verified=no" in trace


def test_trusted_certificate_name(stack: tuple[PrivatePostfix, MilterProcess], pki: Pki) -> None:
    postfix, _ = stack
    good = send(postfix.port, "a@partner.test", ["cert@tlsgate.test"], starttls=True,
                cert=pki.partner.cert_path, key=pki.partner.key_path)
    assert good.delivered, good
    trace = headers(postfix.wait_delivered("cert@tlsgate.test")[0])["X-TLSgate"]
    assert f'verified=yes; cert="{PARTNER_CN}"; issuer="Lab Test CA"' in trace
    for cert in (pki.self_signed, pki.untrusted_client):
        bad = send(postfix.port, "a@partner.test", ["nocert@tlsgate.test"], starttls=True,
                   cert=cert.cert_path, key=cert.key_path)
        reply = bad.rcpt["nocert@tlsgate.test"]
        assert reply.code == 550 and "5.7.1 " in reply.text, reply
        assert bad.data is None


def test_a_common_name_is_never_read_as_a_distinguished_name(
    stack: tuple[PrivatePostfix, MilterProcess], pki: Pki
) -> None:
    # Postfix passes the CN as the certificate spells it: this one is not mail.partner.test.
    postfix, _ = stack
    for i, cn in enumerate((f"evil.example/CN={PARTNER_CN}", f"evil.example, CN={PARTNER_CN}")):
        cert = issue_certificate(pki.directory, f"cn-in-cn-{i}", common_name=cn, issuer=pki.ca)
        result = send(postfix.port, "a@partner.test", ["cn@tlsgate.test"], starttls=True,
                      cert=cert.cert_path, key=cert.key_path)
        reply = result.rcpt["cn@tlsgate.test"]
        assert reply.code == 550 and f"certificate name {cn} does not match {PARTNER_CN}" in reply.text, reply
        assert result.data is None


def test_one_recipient_refused_the_other_delivered(stack: tuple[PrivatePostfix, MilterProcess]) -> None:
    postfix, _ = stack
    result = send(postfix.port, "a@split.test", ["split@example.test", "split@tlsgate.test"])
    assert result.rcpt["split@example.test"].code == 450
    assert "4.7.10" in result.rcpt["split@example.test"].text
    assert result.rcpt["split@tlsgate.test"].code == 250
    assert result.delivered
    postfix.wait_delivered("split@tlsgate.test")
    assert postfix.delivered("split@example.test") == []


def test_header_from_connector_refused_at_end_of_data(stack: tuple[PrivatePostfix, MilterProcess]) -> None:
    postfix, milter = stack
    body = message("bounce@mailer.test", "Bank <alerts@bank.test>", ["hdr@tlsgate.test"])
    plain = send(postfix.port, "bounce@mailer.test", ["hdr@tlsgate.test"], data=body)
    assert plain.rcpt["hdr@tlsgate.test"].code == 250  # the envelope is fine
    assert plain.data is not None and plain.data.code == 550
    assert "5.7.10 TLS required by connector bank-hdr" in plain.data.text
    assert 'header_from="alerts@bank.test"' in milter.wait_log("connector=bank-hdr stage=data")
    tls = send(postfix.port, "bounce@mailer.test", ["hdr-tls@tlsgate.test"], starttls=True,
               data=message("bounce@mailer.test", "alerts@bank.test", ["hdr-tls@tlsgate.test"]))
    assert tls.delivered, tls
    trace = headers(postfix.wait_delivered("hdr-tls@tlsgate.test")[0])["X-TLSgate"]
    assert "verdict=pass; connector=bank-hdr; tls=TLSv1.3" in trace
    assert postfix.delivered("hdr@tlsgate.test") == []


def test_forged_trace_header_is_stripped(stack: tuple[PrivatePostfix, MilterProcess]) -> None:
    postfix, _ = stack
    forged = (("X-TLSgate", "mx.example.test; verdict=pass; connector=contoso-in; forged"),
              ("X-TLSgate", "second forged copy"))
    body = message("a@contoso.test", "a@contoso.test", ["forged@tlsgate.test"], forged)
    result = send(postfix.port, "a@contoso.test", ["forged@tlsgate.test"], starttls=True, data=body)
    assert result.delivered, result
    delivered = headers(postfix.wait_delivered("forged@tlsgate.test")[0])
    values = delivered.get_all("X-TLSgate")
    assert values is not None and len(values) == 1, values
    assert "forged" not in values[0]
    assert values[0].startswith(f"{postfix.myhostname}; verdict=pass; connector=contoso-in; tls=TLSv1.3")


def test_monitor_mode_delivers_and_records_what_would_have_happened(
    stack: tuple[PrivatePostfix, MilterProcess],
) -> None:
    postfix, milter = stack
    result = send(postfix.port, "a@watch.test", ["watch@tlsgate.test"])
    assert result.delivered, result
    trace = headers(postfix.wait_delivered("watch@tlsgate.test")[0])["X-TLSgate"]
    assert "verdict=monitor-reject; connector=watch-in; status=5.7.10; tls=none" in trace
    assert "monitor-reject connector=watch-in stage=rcpt" in milter.wait_log("monitor-reject")


def test_the_decision_of_a_single_recipient_message_carries_its_queue_id(
    stack: tuple[PrivatePostfix, MilterProcess],
) -> None:
    # Postfix opens the queue file after the first recipient it accepts
    # (smtpd_delay_open_until_valid_rcpt = yes): that RCPT has no i macro. The milter writes
    # the decision line at end of message, when i is known; a refusal at RCPT stays NOQUEUE.
    postfix, milter = stack
    assert postfix.postconf("smtpd_delay_open_until_valid_rcpt") == "yes"
    result = send(postfix.port, "a@watch.test", ["qid@tlsgate.test"])
    assert result.delivered and result.data is not None, result
    found = re.search(r"queued as (\w+)", result.data.text)
    assert found is not None, result.data
    queue_id = found.group(1)
    log = milter.wait_log(f"{queue_id}: monitor-reject connector=watch-in stage=rcpt")
    lines = [line for line in log.splitlines() if "to=<qid@tlsgate.test>" in line]
    assert len(lines) == 1 and f"{queue_id}: monitor-reject connector=watch-in stage=rcpt" in lines[0], lines
    refused = send(postfix.port, "a@contoso.test", ["qid-refused@tlsgate.test"])
    assert refused.rcpt["qid-refused@tlsgate.test"].code == 550
    log = milter.wait_log("to=<qid-refused@tlsgate.test>")
    lines = [line for line in log.splitlines() if "to=<qid-refused@tlsgate.test>" in line]
    assert len(lines) == 1 and "NOQUEUE: reject connector=contoso-in stage=rcpt" in lines[0], lines


def test_client_skipping_the_second_ehlo_is_judged_on_tls(stack: tuple[PrivatePostfix, MilterProcess]) -> None:
    postfix, _ = stack
    result = send(postfix.port, "a@contoso.test", ["noehlo@tlsgate.test"], starttls=True, ehlo_after_tls=False)
    assert result.ehlo_after_tls is None and result.tls_version == "TLSv1.3"
    assert result.delivered, result  # the TLS macros arrived with MAIL FROM
    trace = headers(postfix.wait_delivered("noehlo@tlsgate.test")[0])["X-TLSgate"]
    assert "connector=contoso-in; tls=TLSv1.3" in trace


def test_milter_down_tempfails_then_accepts_once_back(stack: tuple[PrivatePostfix, MilterProcess]) -> None:
    postfix, milter = stack
    assert milter.stop() == 0
    try:
        down = send(postfix.port, "a@contoso.test", ["down@tlsgate.test"], starttls=True)
        # Postfix refuses every command after the failed milter connection with a 4xx;
        # measured: STARTTLS gets "454 4.3.0 Try again later".
        replies = [r for r in (down.starttls, down.mail, *down.rcpt.values(), down.data) if r is not None]
        refused = [r for r in replies if not r.ok]
        assert refused and all(400 <= r.code < 500 for r in refused), down
        assert not down.delivered
        plain = send(postfix.port, "a@else.test", ["down-plain@tlsgate.test"])
        assert plain.mail is not None and 400 <= plain.mail.code < 500, plain
        assert not plain.delivered
    finally:
        milter.start()
    back = send(postfix.port, "a@contoso.test", ["down@tlsgate.test"], starttls=True)
    assert back.delivered, back
    assert len(postfix.wait_delivered("down@tlsgate.test")) == 1


def test_without_tls_macros_at_mail_a_client_skipping_ehlo_looks_plaintext(
    stack: tuple[PrivatePostfix, MilterProcess], pki: Pki,
) -> None:
    # Why docs/milter.md asks for the TLS macros in milter_mail_macros: with Postfix's
    # default list the milter never hears of TLS from such a client, and refuses (the safe
    # way round) a connector that requires it. A second instance with the default macros
    # shares the milter (a reload of the first one is not seen by every smtpd at once).
    _, milter = stack
    settings = {
        "smtpd_milters": f"unix:{milter.sock}",
        "milter_default_action": "tempfail",
        "smtpd_helo_required": "no",
    }
    with PrivatePostfix(pki, main_cf=settings) as default:
        assert "{tls_version}" not in default.postconf("milter_mail_macros")
        result = send(default.port, "a@contoso.test", ["noehlo-default@tlsgate.test"],
                      starttls=True, ehlo_after_tls=False)
        assert result.tls_version == "TLSv1.3"
        reply = result.rcpt["noehlo-default@tlsgate.test"]
        assert reply.code == 550 and "TLS required by connector contoso-in" in reply.text
        greeted = send(default.port, "a@contoso.test", ["ehlo-default@tlsgate.test"], starttls=True)
        assert greeted.delivered, greeted


# ---------------------------------------------------------------- with the policy daemon

BOTH_RULES = """
INSERT INTO inbound_connector (name, require_tls, certificate, on_failure)
    VALUES ('pinned-in', 1, 'pinned', 'reject');
INSERT INTO inbound_domain VALUES ('pinned-in', 'sender', 'pinned.test');
INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('bank-hdr', 1, 'reject');
INSERT INTO inbound_domain VALUES ('bank-hdr', 'header_from', 'bank.test');
"""


@pytest.fixture(scope="module")
def both(pki: Pki) -> Iterator[PrivatePostfix]:
    """Postfix with tlsgate-policyd at RCPT and tlsgate-milter, pinned connectors left to
    the policy daemon."""
    instance = PrivatePostfix(pki)
    work = Path(tempfile.mkdtemp(prefix="tlsgate-both-"))
    daemons: list[MilterProcess] = []
    try:
        milter_sock = instance.socket_dir / "milter.sock"
        policy_sock = instance.socket_dir / "policy.sock"
        url = make_rules_db(work / "rules.sqlite", BOTH_RULES)
        pem = pki.partner.cert_path.read_text()
        con = sqlite3.connect(work / "rules.sqlite")
        con.execute("INSERT INTO inbound_certificate (connector, pem) VALUES ('pinned-in', ?)", (pem,))
        con.commit()
        con.close()
        config = write_config(
            work, url, f"unix:{milter_sock}",
            extra=f"pinned_action = policyd\n\n[policyd]\nlisten = unix:{policy_sock}\n"
                  "socket_mode = 0666\nsocket_group = root\n",
        )
        daemons.append(MilterProcess(config, milter_sock, work / "milter.log").start())
        daemons.append(MilterProcess(config, policy_sock, work / "policyd.log", POLICYD).start())
        instance.start({
            "smtpd_recipient_restrictions":
                f"check_policy_service unix:{policy_sock}, reject_unauth_destination",
            "smtpd_milters": f"unix:{milter_sock}",
            "milter_default_action": "tempfail",
            "milter_helo_macros": TLS_MACROS,
            "milter_mail_macros": MAIL_MACROS,
        })
        yield instance
    finally:
        for daemon in daemons:
            daemon.stop()
        instance.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_both_pinned_certificate_checked_by_the_policy_daemon(both: PrivatePostfix, pki: Pki) -> None:
    good = send(both.port, "a@pinned.test", ["pin@tlsgate.test"], starttls=True,
                cert=pki.partner.cert_path, key=pki.partner.key_path)
    assert good.delivered, good
    trace = headers(both.wait_delivered("pin@tlsgate.test")[0])["X-TLSgate"]
    assert "verdict=pass; connector=pinned-in; tls=TLSv1.3" in trace
    for cert in (pki.self_signed, pki.untrusted_client):  # same name, other keys
        bad = send(both.port, "a@pinned.test", ["nopin@tlsgate.test"], starttls=True,
                   cert=cert.cert_path, key=cert.key_path)
        reply = bad.rcpt["nopin@tlsgate.test"]
        assert reply.code == 554 and "5.7.1" in reply.text, reply  # the policy daemon's REJECT
        assert bad.data is None


def test_both_header_from_still_judged_by_the_milter(both: PrivatePostfix) -> None:
    body = message("bounce@mailer.test", "alerts@bank.test", ["both-hdr@tlsgate.test"])
    plain = send(both.port, "bounce@mailer.test", ["both-hdr@tlsgate.test"], data=body)
    assert plain.rcpt["both-hdr@tlsgate.test"].code == 250
    assert plain.data is not None and plain.data.code == 550
    assert both.delivered("both-hdr@tlsgate.test") == []
