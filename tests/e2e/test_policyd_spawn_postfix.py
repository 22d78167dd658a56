"""tlsgate-policyd as a spawn(8) service of a real private Postfix, set up as docs/policyd.md
shows it.

master.cf runs one ``tlsgate-policyd --spawn`` per policy connection of an smtpd process, as
an unprivileged user (spawn refuses root and the mail owner), and main.cf asks it at
``unix:private/tlsgate``. The spawned processes have the client's socket for standard error
too, so they log to syslog: here a datagram socket of the test's own, which also tells which
process answered.
"""

from __future__ import annotations

import os
import pwd
import re
import select
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.policyd.policydhelp import BIN, write_config
from tests.support.pki import Pki
from tests.support.postfix import CLIENT_HELO, PrivatePostfix, send
from tests.support.rulesdb import make_rules_db

pytestmark = pytest.mark.postfix

# Neither root nor the mail owner, as spawn(8) requires.
SPAWN_USER = "nobody"

RULES = """
INSERT INTO inbound_connector (name, on_failure) VALUES ('contoso-in', 'reject');
INSERT INTO inbound_domain VALUES ('contoso-in', 'sender', 'contoso.test');
INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('change-in', 0, 'reject');
INSERT INTO inbound_domain VALUES ('change-in', 'sender', 'change.test');
"""


class Syslog:
    """The datagram socket the spawned processes log to, and what they logged so far."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o666)
        self.lines: list[str] = []

    def wait(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """The first line that matches ``pattern`` (a regular expression), waiting for it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if match := regex.search(line):
                    return match
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n" + "\n".join(self.lines))
            self.sock.settimeout(left)
            try:
                self.lines.append(self.sock.recv(65536).decode("utf-8", "replace"))
            except TimeoutError:
                pass

    def close(self) -> None:
        self.sock.close()


class Stack:
    def __init__(self, postfix: PrivatePostfix, syslog: Syslog, db: Path, config: Path) -> None:
        self.postfix = postfix
        self.syslog = syslog
        self.db = db
        self.config = config

    def sql(self, statement: str) -> int:
        """Run and commit ``statement``; the rules generation it leaves."""
        con = sqlite3.connect(self.db)
        try:
            con.execute(statement)
            con.commit()
            return int(con.execute("SELECT generation FROM rules_generation").fetchone()[0])
        finally:
            con.close()


def _spawned_pids(config: Path) -> list[int]:
    """The processes running tlsgate-policyd with ``config``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(config).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _runs_as(user: pwd.struct_passwd, program: Path) -> bool:
    try:
        done = subprocess.run([program, "--help"], user=user.pw_uid, group=user.pw_gid,
                              capture_output=True, check=False, timeout=60)
    except PermissionError:
        return False
    return done.returncode == 0


def _program(work: Path, user: pwd.struct_passwd) -> Path:
    """The installed tlsgate-policyd, or, when the spawn user cannot reach the interpreter the
    virtualenv was made from (a Python under /root), a launcher that runs the same code with
    the system's Python of the same version and the virtualenv's packages."""
    installed = BIN / "tlsgate-policyd"
    if _runs_as(user, installed):
        return installed
    system = Path("/usr/bin/python3")
    if not system.exists():
        pytest.skip(f"user {user.pw_name} cannot run {installed}, and there is no {system}")
    version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"user {user.pw_name} cannot run {installed}, and {system} is Python {version}")
    launcher = work / "tlsgate-policyd"
    launcher.write_text(
        f"#!{system}\n"
        "import site, sys\n"
        f"site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
        "from tlsgate_policyd.__main__ import main\n"
        "sys.exit(main())\n"
    )
    launcher.chmod(0o755)
    if not _runs_as(user, launcher):
        pytest.skip(f"user {user.pw_name} can run neither {installed} nor {launcher}")
    return launcher


def _outliving(pids: list[int], timeout: float) -> list[int]:
    """The processes of ``pids`` still running after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    left = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                left.append(pid)
        finally:
            os.close(fd)
    return left


@pytest.fixture(scope="module")
def stack(pki: Pki) -> Iterator[Stack]:
    user = pwd.getpwnam(SPAWN_USER)
    work = Path(tempfile.mkdtemp(prefix="tlsgate-spawn-e2e-"))
    instance: PrivatePostfix | None = None
    syslog: Syslog | None = None
    config = work / "tlsgate.conf"
    try:
        work.chmod(0o755)
        # The spawned processes read the rules as that user; SQLite's WAL needs its -shm writable.
        os.chown(work, user.pw_uid, user.pw_gid)
        db = work / "rules.sqlite"
        url = make_rules_db(db, RULES)
        for path in work.iterdir():
            os.chown(path, user.pw_uid, user.pw_gid)
        program = _program(work, user)
        config = write_config(work, url, "unix:/nonexistent/unused.sock")
        syslog = Syslog(work / "log.sock")
        with config.open("a") as fh:
            fh.write(f"syslog_socket = {work / 'log.sock'}\n")  # [log] is the file's last section
            fh.write("[engine]\nmyorigin = none\n")  # addresses without a domain: no connector can be told
        instance = PrivatePostfix(pki)
        instance.start(
            {
                "smtpd_recipient_restrictions": "reject_unauth_destination, check_policy_service "
                "{ unix:private/tlsgate, timeout=10s, default_action=DEFER_IF_PERMIT }",
                "tlsgate_time_limit": "3600s",
            },
            [
                "tlsgate unix - n n - 0 spawn",
                f"  user={SPAWN_USER} argv={program} --config {config} --spawn",
            ],
        )
        yield Stack(instance, syslog, db, config)
    finally:
        left: list[int] = []
        if instance is not None:
            instance.stop()
            # Stopping Postfix closes every policy connection: each spawned process sees the
            # end of its input and exits.
            left = _outliving(_spawned_pids(config), 15)
            for pid in left:
                os.kill(pid, signal.SIGKILL)
        if syslog is not None:
            syslog.close()
        shutil.rmtree(work, ignore_errors=True)
        assert not left, f"spawned tlsgate-policyd processes {left} outlived Postfix"


def test_spawned_daemon_refuses_plaintext_and_passes_tls(stack: Stack) -> None:
    refused = send(stack.postfix.port, "a@contoso.test", ["r@tlsgate.test"])
    reply = refused.rcpt["r@tlsgate.test"]
    assert reply.code == 554, reply
    assert reply.text == "5.7.10 <r@tlsgate.test>: Recipient address rejected: TLS required by connector contoso-in"
    accepted = send(stack.postfix.port, "a@contoso.test", ["r-tls@tlsgate.test"], starttls=True)
    assert accepted.delivered, accepted
    assert stack.postfix.wait_delivered("r-tls@tlsgate.test")
    line = stack.syslog.wait(r"tlsgate-policyd\[\d+\]: NOQUEUE: reject connector=contoso-in .*"
                             r"from=<a@contoso\.test> to=<r@tlsgate\.test> tls=none")
    assert line.string.startswith("<"), line.string  # a syslog record, facility and severity first
    stack.syslog.wait(r"pass connector=contoso-in .*to=<r-tls@tlsgate\.test> tls=TLSv1\.3")


def test_a_sender_without_a_domain_is_deferred_when_myorigin_is_unknown(stack: Stack) -> None:
    # MAIL FROM:<ceo> becomes ceo@$myorigin after the restrictions; with myorigin not known,
    # no sender connector can be told for it, and it must not pass them all.
    with smtplib.SMTP("127.0.0.1", stack.postfix.port, local_hostname=CLIENT_HELO, timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail("ceo")[0] == 250
        code, text = smtp.rcpt("r@tlsgate.test")
    # The daemon answers DEFER 4.1.7 (bad sender address); asked at RCPT, Postfix reports an
    # address detail code of the recipient's (X.1.3) in its reply, as it does for any restriction there.
    assert (code, text.decode()) == (
        450, "4.1.3 <r@tlsgate.test>: Recipient address rejected: sender <ceo> has no domain, so the connector "
        "that applies cannot be told (set [engine] myorigin, or Postfix's reject_non_fqdn_sender refuses such "
        "addresses)")


def test_spawned_daemon_applies_a_change_while_smtpd_keeps_it(stack: Stack) -> None:
    # One SMTP session: smtpd asks over one policy connection, hence one spawned process,
    # which must follow a change committed meanwhile.
    with smtplib.SMTP("127.0.0.1", stack.postfix.port, local_hostname=CLIENT_HELO, timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@change.test")[0] == 250
        assert smtp.rcpt("before@tlsgate.test")[0] == 250
        before = stack.syslog.wait(r"tlsgate-policyd\[(\d+)\]: NOQUEUE: pass connector=change-in .*to=<before@")
        pid = before.group(1)
        smtp.rset()
        generation = stack.sql("UPDATE inbound_connector SET require_tls = 1 WHERE name = 'change-in'")
        stack.syslog.wait(rf"tlsgate-policyd\[{pid}\]: loaded rules generation {generation}:")
        assert smtp.mail("a@change.test")[0] == 250
        code, text = smtp.rcpt("after@tlsgate.test")
        assert (code, text.decode()) == (
            554, "5.7.10 <after@tlsgate.test>: Recipient address rejected: TLS required by connector change-in")
    stack.syslog.wait(rf"tlsgate-policyd\[{pid}\]: NOQUEUE: reject connector=change-in .*to=<after@")
