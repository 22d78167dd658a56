"""Faults end to end: a real private Postfix with tlsgate-policyd and tlsgate-milter on a
private PostgreSQL cluster, and a stream of messages from a partner that meets its connector
(STARTTLS with the PKI's mail.partner.test client certificate) and from a plaintext sender
forging the partner's domain, while the policy daemon is killed and restarted, the milter is
killed and restarted, the database stops and comes back, both daemons start while the
database is unreachable, and the connector's rows are made invalid and repaired.

A client resends after a 4xx once the fault is cleared, up to MAX_ATTEMPTS sessions per
message. Pass: no forged message is accepted at any moment; every partner message is
delivered exactly once in the end, none refused with a 5xx nor bounced; every refusal while
the rules cannot be judged is a 4xx. Every wait is on a readiness signal (a socket that
accepts, a log line), never a sleep. The counts go to docs/reliability.md.
"""

from __future__ import annotations

import itertools
import shutil
import signal
import smtplib
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.milter.milterhelp import MILTER, POLICYD, MilterProcess
from tests.milter.milterhelp import write_config as write_milter_config
from tests.policyd.policydhelp import write_config as write_policyd_config
from tests.reliability.pgcluster import PgCluster
from tests.reliability.pgcluster import skip_reason as pg_skip_reason
from tests.reliability.results import record
from tests.support.pki import Pki
from tests.support.postfix import (
    CLIENT_HELO,
    PrivatePostfix,
    SendResult,
    client_tls_context,
    default_message,
    send,
)
from tests.support.postfix import skip_reason as postfix_skip_reason
from tlsgate.store import init_schema, open_engine

pytestmark = [pytest.mark.postfix, pytest.mark.postgresql]

MAX_ATTEMPTS = 4
PER_PHASE = 3  # partner messages and forged messages sent while each fault lasts

RULES = [
    "INSERT INTO inbound_connector (name, require_tls, certificate, on_failure) "
    "VALUES ('partner-in', true, 'trusted', 'reject')",
    "INSERT INTO inbound_domain VALUES ('partner-in', 'sender', 'partner.test')",
    "INSERT INTO inbound_domain VALUES ('partner-in', 'header_from', 'partner.test')",
    "INSERT INTO inbound_cert_name VALUES ('partner-in', 'subject', 'mail.partner.test')",
    "INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('other-in', true, 'reject')",
    "INSERT INTO inbound_domain VALUES ('other-in', 'sender', 'other.test')",
]
# The one invalid row PostgreSQL's constraints let in: a domain pattern that is no domain.
INVALID_ROW = "INSERT INTO inbound_domain VALUES ('partner-in', 'sender', 'not a domain!')"
REPAIR_ROW = "DELETE FROM inbound_domain WHERE pattern = 'not a domain!'"

TLS_MACROS = "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}"
MAIL_MACROS = f"i {{auth_type}} {{auth_authen}} {{auth_author}} {{mail_addr}} {{mail_host}} {{mail_mailer}} {TLS_MACROS}"


def first_code(result: SendResult) -> int:
    """250 when the message was accepted, else the first refusal's code; 0 when the session
    ended without one (connection dropped or TLS handshake failed)."""
    if result.delivered:
        return 250
    replies = [result.banner, result.ehlo, result.starttls, result.ehlo_after_tls, result.mail,
               *result.rcpt.values(), result.data]
    for reply in replies:
        if reply is not None and not reply.ok:
            return reply.code
    return 0


@dataclass
class Stack:
    postfix: PrivatePostfix
    pki: Pki
    pg: PgCluster
    policyd: MilterProcess
    milter: MilterProcess

    def sql(self, statement: str) -> None:
        engine = create_engine(self.pg.url)
        try:
            with engine.begin() as conn:
                conn.execute(text(statement))
        finally:
            engine.dispose()

    def daemons(self) -> tuple[MilterProcess, MilterProcess]:
        return self.policyd, self.milter


@dataclass
class Stream:
    """The two senders, every attempt they made, and what is still to be resent."""

    stack: Stack
    counts: Counter[str] = field(default_factory=Counter)
    attempts: dict[str, int] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    partner_rcpts: list[str] = field(default_factory=list)
    forged_rcpts: list[str] = field(default_factory=list)
    phases: dict[str, Counter[str]] = field(default_factory=dict)
    _numbers: Iterator[int] = field(default_factory=itertools.count)

    def _tally(self, phase: str, who: str, code: int) -> None:
        kind = {2: "accepted", 4: "refused 4xx", 5: "refused 5xx"}.get(code // 100, "dropped")
        self.counts[f"{who} {kind}"] += 1
        self.phases.setdefault(phase, Counter())[f"{who} {kind}"] += 1

    def partner(self, phase: str, rcpt: str | None = None) -> int:
        if rcpt is None:
            rcpt = f"partner{next(self._numbers)}@tlsgate.test"
            self.partner_rcpts.append(rcpt)
        self.attempts[rcpt] = self.attempts.get(rcpt, 0) + 1
        result = send(self.stack.postfix.port, "orders@partner.test", [rcpt], starttls=True,
                      cert=self.stack.pki.partner.cert_path, key=self.stack.pki.partner.key_path)
        code = first_code(result)
        self._tally(phase, "partner", code)
        if code != 250 and code // 100 != 5 and self.attempts[rcpt] < MAX_ATTEMPTS:
            self.pending.append(rcpt)
        return code

    def partner_interrupted(self, phase: str, interrupt: Callable[[], None], *, before_data: bool) -> int:
        """One partner session with a daemon killed in its middle: after RCPT was accepted
        and before DATA (``before_data``), or after MAIL and before RCPT."""
        rcpt = f"partner{next(self._numbers)}@tlsgate.test"
        self.partner_rcpts.append(rcpt)
        self.attempts[rcpt] = 1
        sender = "orders@partner.test"
        # Connecting in the constructor makes the host STARTTLS's server_hostname.
        client = smtplib.SMTP("127.0.0.1", self.stack.postfix.port, local_hostname=CLIENT_HELO, timeout=30)
        try:
            client.ehlo()
            client.starttls(context=client_tls_context(self.stack.pki.partner.cert_path,
                                                       self.stack.pki.partner.key_path))
            client.ehlo()
            assert client.mail(sender)[0] == 250
            if not before_data:
                interrupt()
            code = client.rcpt(rcpt)[0]
            if code == 250:
                if before_data:
                    interrupt()
                code = client.data(default_message(sender, [rcpt]))[0]
            client.quit()
        except smtplib.SMTPServerDisconnected:
            code = 0
        except smtplib.SMTPDataError as error:
            code = error.smtp_code
        finally:
            client.close()
        self._tally(phase, "partner", code)
        if code != 250 and code // 100 != 5:
            self.pending.append(rcpt)
        return code

    def forged(self, phase: str) -> int:
        rcpt = f"forged{next(self._numbers)}@tlsgate.test"
        self.forged_rcpts.append(rcpt)
        code = first_code(send(self.stack.postfix.port, "ceo@partner.test", [rcpt]))
        self._tally(phase, "forged", code)
        assert code != 250, f"{phase}: a forged message was accepted"
        return code

    def batch(self, phase: str) -> tuple[list[int], list[int]]:
        """PER_PHASE messages from each sender, interleaved; their codes."""
        partner, forged = [], []
        for _ in range(PER_PHASE):
            partner.append(self.partner(phase))
            forged.append(self.forged(phase))
        return partner, forged

    def resend(self, phase: str) -> list[int]:
        """The fault is cleared: resend every message refused with a 4xx."""
        todo, self.pending = self.pending, []
        return [self.partner(phase, rcpt) for rcpt in todo]


def wait_for_load(daemon: MilterProcess, offset: int) -> None:
    """Until the daemon logs a rules load after log offset ``offset``."""
    deadline = time.monotonic() + 30
    while "loaded rules generation" not in daemon.log()[offset:]:
        assert time.monotonic() < deadline, daemon.log()[offset:]
        time.sleep(0.05)


def wait_for_text(daemon: MilterProcess, offset: int, needle: str) -> None:
    """Until the daemon logs ``needle`` after log offset ``offset``."""
    deadline = time.monotonic() + 30
    while needle not in daemon.log()[offset:]:
        assert time.monotonic() < deadline, f"{needle!r} not logged:\n{daemon.log()[offset:]}"
        time.sleep(0.05)


def kill(daemon: MilterProcess) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(30)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    for reason in (postfix_skip_reason(), pg_skip_reason()):
        if reason is not None:
            pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="tlsgate-faults-"))
    work.chmod(0o755)
    pki = Pki(work / "pki")
    pg = PgCluster().start()
    postfix = PrivatePostfix(pki)
    policyd = milter = None
    try:
        engine = open_engine(pg.url)
        init_schema(engine)
        engine.dispose()
        stack_sql = create_engine(pg.url)
        with stack_sql.begin() as conn:
            for statement in RULES:
                conn.execute(text(statement))
        stack_sql.dispose()
        sockdir = postfix.queue_dir / "tlsgate"
        sockdir.mkdir(mode=0o755)
        (work / "policyd").mkdir()
        (work / "milter").mkdir()
        policy_sock = sockdir / "policy.sock"
        milter_sock = postfix.socket_dir / "milter.sock"
        policyd = MilterProcess(write_policyd_config(work / "policyd", pg.url, f"unix:{policy_sock}"),
                                policy_sock, work / "policyd.log", program=POLICYD).start()
        milter = MilterProcess(write_milter_config(work / "milter", pg.url, f"unix:{milter_sock}"),
                               milter_sock, work / "milter.log", program=MILTER).start()
        postfix.start({
            "smtpd_recipient_restrictions": "reject_unauth_destination, check_policy_service "
            "{ unix:tlsgate/policy.sock, timeout=10s, default_action=DEFER_IF_PERMIT }",
            "smtpd_milters": f"unix:{milter_sock}",
            "milter_default_action": "tempfail",
            "milter_helo_macros": TLS_MACROS,
            "milter_mail_macros": MAIL_MACROS,
        })
        yield Stack(postfix, pki, pg, policyd, milter)
    finally:
        for daemon in (policyd, milter):
            if daemon is not None:
                daemon.stop()
        postfix.stop()
        pg.close()
        shutil.rmtree(work, ignore_errors=True)


def all_4xx(codes: list[int]) -> bool:
    return all(code // 100 == 4 for code in codes)


def test_faults_lose_nothing_and_let_nothing_through(stack: Stack) -> None:
    stream = Stream(stack)

    # Everything up: the partner is delivered, the forger refused for good.
    partner, forged = stream.batch("all up")
    assert partner == [250] * PER_PHASE and all(code // 100 == 5 for code in forged), (partner, forged)

    # tlsgate-policyd killed: Postfix's default_action defers; the milter still judges.
    kill(stack.policyd)
    partner, forged = stream.batch("policyd killed")
    assert all_4xx(partner), partner
    offset = len(stack.policyd.log())
    stack.policyd.start(wait_rules=False)
    wait_for_load(stack.policyd, offset)
    assert stream.resend("policyd restarted") == [250] * PER_PHASE

    # tlsgate-milter killed: milter_default_action = tempfail.
    kill(stack.milter)
    partner, forged = stream.batch("milter killed")
    assert all_4xx(partner), partner
    stack.milter.start()
    assert stream.resend("milter restarted") == [250] * PER_PHASE

    # Killed in the middle of a session: before RCPT (policy daemon), before DATA (milter).
    code = stream.partner_interrupted("policyd killed mid-session", lambda: kill(stack.policyd), before_data=False)
    assert code // 100 == 4, code
    offset = len(stack.policyd.log())
    stack.policyd.start(wait_rules=False)
    wait_for_load(stack.policyd, offset)
    code = stream.partner_interrupted("milter killed mid-session", lambda: kill(stack.milter), before_data=True)
    assert code // 100 == 4, code
    stack.milter.start()
    assert stream.resend("both back") == [250, 250]

    # The database stops: both daemons keep deciding with the rules they loaded.
    offsets = [len(d.log()) for d in stack.daemons()]
    stack.pg.stop()
    for daemon, offset in zip(stack.daemons(), offsets, strict=True):
        wait_for_text(daemon, offset, "cannot reach the rule database")
    partner, forged = stream.batch("database stopped")
    assert partner == [250] * PER_PHASE and all(code // 100 == 5 for code in forged), (partner, forged)

    # Both daemons restart while the database is unreachable: no rules, so 4xx for everyone.
    offsets = []
    for daemon in stack.daemons():
        kill(daemon)
        offsets.append(len(daemon.log()))
        daemon.start(wait_rules=False)
    for daemon, offset in zip(stack.daemons(), offsets, strict=True):
        wait_for_text(daemon, offset, "cannot load rules")
    partner, forged = stream.batch("database unreachable at daemon start")
    assert all_4xx(partner) and all_4xx(forged), (partner, forged)
    stack.pg.start()
    for daemon, offset in zip(stack.daemons(), offsets, strict=True):
        wait_for_load(daemon, offset)
    assert stream.resend("database back") == [250] * PER_PHASE

    # A row of the partner's connector made invalid: that connector fails closed with a 4xx.
    offsets = [len(d.log()) for d in stack.daemons()]
    stack.sql(INVALID_ROW)
    for daemon, offset in zip(stack.daemons(), offsets, strict=True):
        wait_for_text(daemon, offset, "not a domain!")
        wait_for_load(daemon, offset)
    partner, forged = stream.batch("connector row invalid")
    assert all_4xx(partner) and all_4xx(forged), (partner, forged)
    offsets = [len(d.log()) for d in stack.daemons()]
    stack.sql(REPAIR_ROW)
    for daemon, offset in zip(stack.daemons(), offsets, strict=True):
        wait_for_load(daemon, offset)
    assert stream.resend("row repaired") == [250] * PER_PHASE

    # Everything partner sent is delivered exactly once; nothing forged is, nothing bounced.
    assert stream.pending == []
    for rcpt in stream.partner_rcpts:
        assert len(stack.postfix.wait_delivered(rcpt)) == 1, rcpt
    delivered = sum(len(stack.postfix.delivered(rcpt)) == 1 for rcpt in stream.partner_rcpts)
    forged_delivered = sum(len(stack.postfix.delivered(rcpt)) for rcpt in stream.forged_rcpts)
    bounced = stack.postfix.maillog().count("status=bounced")
    lost = len(stream.partner_rcpts) - delivered
    counts = stream.counts
    assert counts["forged accepted"] == 0 and forged_delivered == 0
    assert counts["partner refused 5xx"] == 0 and counts["partner dropped"] == 0
    assert bounced == 0 and lost == 0

    per_phase = "; ".join(
        f"{phase}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) for phase, c in stream.phases.items()
    )
    record("faults", {
        "title": "Faults end to end (Postfix + tlsgate-policyd + tlsgate-milter + private PostgreSQL)",
        "sent (SMTP sessions)": sum(counts.values()),
        "partner messages": len(stream.partner_rcpts),
        "forged messages": len(stream.forged_rcpts),
        "delivered (partner)": delivered,
        "refused 4xx": counts["partner refused 4xx"] + counts["forged refused 4xx"],
        "refused 4xx (partner, resent later)": counts["partner refused 4xx"],
        "refused 5xx": counts["partner refused 5xx"] + counts["forged refused 5xx"],
        "refused 5xx (partner)": counts["partner refused 5xx"],
        "forged accepted": counts["forged accepted"] + forged_delivered,
        "bounced": bounced,
        "lost": lost,
        "note": "Faults, in order: policyd SIGKILL and restart; milter SIGKILL and restart; policyd "
                "killed between MAIL and RCPT, milter killed between RCPT and DATA; database "
                "stopped; both daemons restarted while it is unreachable, then database back; a "
                "partner-in row made invalid, then repaired. Per phase: " + per_phase + ".",
    })
