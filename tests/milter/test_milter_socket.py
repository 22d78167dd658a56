"""The installed ``tlsgate-milter`` over a real unix socket, driven by Debian's ``miltertest``
(Lua scripts written into the test's temp dir): per-recipient refusals, end-of-message
refusals, the trace header with forged copies deleted; and the daemon's life: socket mode,
--check-config, unknown rules until the database appears, SIGHUP, prompt SIGTERM."""

from __future__ import annotations

import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.milter.milterhelp import MILTER, MilterProcess, make_rules_db, run_sql, write_config

MILTERTEST = shutil.which("miltertest")
pytestmark = pytest.mark.skipif(MILTERTEST is None, reason="miltertest is not installed")

RULES = """
INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('contoso-in', 1, 'reject');
INSERT INTO inbound_domain VALUES ('contoso-in', 'sender', 'contoso.test');
INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('hr-in', 1, 'defer');
INSERT INTO inbound_domain VALUES ('hr-in', 'recipient', 'hr.example.test');
INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('bank-hdr', 1, 'reject');
INSERT INTO inbound_domain VALUES ('bank-hdr', 'header_from', 'bank.test');
"""

# Shared Lua: fail() makes miltertest exit non-zero with a message. mt.eoh() is never
# called, nor mt.bodystring(): the milter negotiates the EOH and body steps away, and Debian's miltertest 8.17 then exits 1
# without a word; mt.eom_check(conn, MT_SMTPREPLY, ...) never matched either, so replies
# are checked through mt.getreply() and the milter's log.
PRELUDE = """
function fail(what) error(what) end
function session(sock, ip, tls)
  local conn = mt.connect("unix:" .. sock, 40, 0.05)
  if conn == nil then fail("cannot connect to " .. sock) end
  mt.macro(conn, SMFIC_CONNECT, "j", "mx.example.test")
  if mt.conninfo(conn, "client.example", ip) ~= nil then fail("conninfo") end
  if mt.getreply(conn) ~= SMFIR_CONTINUE then fail("connect not continued") end
  if tls then
    mt.macro(conn, SMFIC_HELO, "{tls_version}", "TLSv1.3", "{cipher}", "TLS_AES_256_GCM_SHA384",
             "{cipher_bits}", "256")
  end
  if mt.helo(conn, "client.example") ~= nil then fail("helo") end
  return conn
end
function mail(conn, sender)
  mt.macro(conn, SMFIC_MAIL, "i", "4F2A1C3B")
  if mt.mailfrom(conn, sender) ~= nil then fail("mailfrom") end
  if mt.getreply(conn) ~= SMFIR_CONTINUE then fail("mail not continued") end
end
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    # A short path: unix socket names are limited to 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="tgm-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def milter(workdir: Path) -> Iterator[MilterProcess]:
    url = make_rules_db(workdir / "rules.sqlite", RULES)
    sock = workdir / "milter.sock"
    config = write_config(workdir, url, f"unix:{sock}")
    process = MilterProcess(config, sock, workdir / "milter.log").start()
    try:
        yield process
    finally:
        process.stop()


def miltertest(workdir: Path, body: str) -> str:
    script = workdir / "test.lua"
    script.write_text(PRELUDE + body)
    assert MILTERTEST is not None
    result = subprocess.run([MILTERTEST, "-v", "-s", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"miltertest failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_socket_gets_the_configured_mode(milter: MilterProcess) -> None:
    assert stat.S_ISSOCK(milter.sock.stat().st_mode)
    assert stat.S_IMODE(milter.sock.stat().st_mode) == 0o666


def test_one_recipient_refused_the_other_kept(milter: MilterProcess, workdir: Path) -> None:
    miltertest(workdir, f"""
conn = session("{milter.sock}", "192.0.2.7", false)
mail(conn, "<a@else.test>")
if mt.rcptto(conn, "<x@hr.example.test>") ~= nil then fail("rcpt 1") end
if mt.getreply(conn) ~= SMFIR_REPLYCODE then fail("hr recipient not refused") end
if mt.rcptto(conn, "<y@example.test>") ~= nil then fail("rcpt 2") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then fail("other recipient not kept") end
mt.disconnect(conn)
""")
    log = milter.wait_log("to=<x@hr.example.test>")
    assert "4F2A1C3B: defer connector=hr-in stage=rcpt client=client.example[192.0.2.7]" in log


def test_require_tls_sender_refused_in_plaintext_accepted_over_tls(milter: MilterProcess, workdir: Path) -> None:
    miltertest(workdir, f"""
plain = session("{milter.sock}", "192.0.2.7", false)
mail(plain, "<a@contoso.test>")
if mt.rcptto(plain, "<b@example.test>") ~= nil then fail("rcpt") end
if mt.getreply(plain) ~= SMFIR_REPLYCODE then fail("plaintext not refused") end
mt.disconnect(plain)
tls = session("{milter.sock}", "192.0.2.7", true)
mail(tls, "<a@contoso.test>")
if mt.rcptto(tls, "<b@example.test>") ~= nil then fail("rcpt") end
if mt.getreply(tls) ~= SMFIR_CONTINUE then fail("TLS refused") end
mt.disconnect(tls)
""")


def test_a_macro_that_is_not_utf8_is_taken_as_absent(milter: MilterProcess, workdir: Path) -> None:
    # pymilter raises UnicodeDecodeError for such a macro; the session goes on without it.
    out = miltertest(workdir, f"""
conn = session("{milter.sock}", "192.0.2.7", false)
mt.macro(conn, SMFIC_HELO, "{{tls_version}}", "TLSv1.3", "{{cipher}}", "TLS_AES_256_GCM_SHA384",
         "{{cipher_bits}}", "256", "{{cert_subject}}", "caf\\233.example", "{{verify}}", "OK")
if mt.helo(conn, "client.example") ~= nil then fail("helo") end
for i = 1, 2 do
  mail(conn, "<a@contoso.test>")
  if mt.rcptto(conn, "<b@example.test>") ~= nil then fail("rcpt") end
  if mt.getreply(conn) ~= SMFIR_CONTINUE then fail("refused") end
  if mt.eom(conn) ~= nil then fail("eom") end
  if mt.getreply(conn) ~= SMFIR_CONTINUE then fail("message refused") end
  print("TRACE " .. mt.getheader(conn, "X-TLSgate", 0))
  mt.abort(conn)
end
mt.disconnect(conn)
""")
    assert "TRACE mx.example.test; verdict=pass; connector=contoso-in; tls=TLSv1.3; " \
        "cipher=TLS_AES_256_GCM_SHA384; bits=256; verified=no" in out
    log = milter.wait_log("is not UTF-8")
    assert log.count("macro {cert_subject} is not UTF-8: taken as absent (logged once per session)") == 1
    assert "callback failed" not in log


def test_header_from_refused_at_end_of_message(milter: MilterProcess, workdir: Path) -> None:
    miltertest(workdir, f"""
conn = session("{milter.sock}", "192.0.2.7", false)
mail(conn, "<bounce@mailer.test>")
if mt.rcptto(conn, "<b@example.test>") ~= nil then fail("rcpt") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then fail("envelope refused") end
if mt.header(conn, "From", "Bank <alerts@bank.test>") ~= nil then fail("header") end
if mt.eom(conn) ~= nil then fail("eom") end
if mt.getreply(conn) ~= SMFIR_REPLYCODE then fail("message not refused") end
mt.disconnect(conn)
""")
    log = milter.wait_log("stage=data")
    assert (
        "4F2A1C3B: reject connector=bank-hdr stage=data client=client.example[192.0.2.7] "
        'from=<bounce@mailer.test> to=<b@example.test> header_from="alerts@bank.test" tls=none status=5.7.10'
    ) in log


def test_trace_header_replaces_forged_ones(milter: MilterProcess, workdir: Path) -> None:
    out = miltertest(workdir, f"""
conn = session("{milter.sock}", "192.0.2.7", true)
mail(conn, "<a@contoso.test>")
if mt.rcptto(conn, "<b@example.test>") ~= nil then fail("rcpt") end
mt.header(conn, "From", "a@contoso.test")
mt.header(conn, "X-TLSgate", "verdict=pass; forged")
mt.header(conn, "X-TLSgate", "forged again")
if mt.eom(conn) ~= nil then fail("eom") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then fail("message not accepted") end
if not mt.eom_check(conn, MT_HDRDELETE, "X-TLSgate") then fail("forged header not deleted") end
if not mt.eom_check(conn, MT_HDRINSERT, "X-TLSgate") then fail("trace header not inserted") end
print("TRACE " .. mt.getheader(conn, "X-TLSgate", 0))
mt.disconnect(conn)
""")
    assert (
        "TRACE mx.example.test; verdict=pass; connector=contoso-in; tls=TLSv1.3; "
        "cipher=TLS_AES_256_GCM_SHA384; bits=256; verified=no"
    ) in out


def test_check_config(workdir: Path) -> None:
    good = write_config(workdir, "sqlite:////nonexistent/x.sqlite", f"unix:{workdir}/m.sock")
    ok = subprocess.run([MILTER, "--check-config", "--config", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = workdir / "bad.conf"
    bad.write_text("[milter]\npinned_action = allow\n")
    result = subprocess.run([MILTER, "--check-config", "--config", str(bad)], capture_output=True, text=True)
    assert result.returncode == 78
    assert result.stderr.count("\n") == 1
    assert "[milter] pinned_action = 'allow'" in result.stderr
    nogroup = workdir / "nogroup.conf"
    nogroup.write_text(f"[milter]\nlisten = unix:{workdir}/m.sock\nsocket_group = no-such-group-tg\n")
    result = subprocess.run([MILTER, "--config", str(nogroup)], capture_output=True, text=True)
    assert result.returncode == 78
    assert "no such group" in result.stderr


def test_unknown_rules_tempfail_until_the_database_appears(workdir: Path) -> None:
    # The database file exists but holds no schema yet: rules cannot be loaded.
    db = workdir / "later.sqlite"
    sock = workdir / "milter.sock"
    config = write_config(workdir, f"sqlite:///{db}", f"unix:{sock}")
    process = MilterProcess(config, sock, workdir / "milter.log")
    try:
        process.start(wait_rules=False)
        out = miltertest(workdir, f"""
conn = session("{sock}", "192.0.2.7", true)
mail(conn, "<a@else.test>")
if mt.rcptto(conn, "<b@example.test>") ~= nil then fail("rcpt") end
if mt.getreply(conn) ~= SMFIR_REPLYCODE then fail("not refused") end
print("REFUSED")
mt.disconnect(conn)
""")
        assert "REFUSED" in out
        process.wait_log("cannot load rules")
        log = process.wait_log("no rules loaded yet")
        assert "4F2A1C3B: defer client=client.example[192.0.2.7]: no rules loaded yet" in log
        make_rules_db(db, RULES)
        process.wait_log("loaded rules generation")
        miltertest(workdir, f"""
conn = session("{sock}", "192.0.2.7", true)
mail(conn, "<a@else.test>")
if mt.rcptto(conn, "<b@example.test>") ~= nil then fail("rcpt") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then fail("still refused") end
mt.disconnect(conn)
""")
    finally:
        process.stop()


def test_sighup_reloads_and_sigterm_stops_promptly(milter: MilterProcess, workdir: Path) -> None:
    run_sql(workdir / "rules.sqlite", "UPDATE inbound_connector SET require_tls = 0 WHERE name = 'contoso-in';")
    milter.signal(signal.SIGHUP)
    milter.wait_log("SIGHUP: reloading the rules")
    milter.wait_log("loaded rules generation", count=2)  # the reload done, not only begun
    miltertest(workdir, f"""
conn = session("{milter.sock}", "192.0.2.7", false)
mail(conn, "<a@contoso.test>")
if mt.rcptto(conn, "<b@example.test>") ~= nil then fail("rcpt") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then fail("new rule not applied") end
mt.disconnect(conn)
""")
    assert milter.stop() == 0
    log = milter.log()
    assert "SIGTERM: stopping" in log and "still open" not in log
    assert "stopped in" in log
    assert not milter.sock.exists()


def test_sigterm_lets_a_message_in_progress_finish(milter: MilterProcess, workdir: Path) -> None:
    flag = workdir / "go"
    judged = workdir / "judged"  # the recipient's line is written at end of message, with the queue id
    script = workdir / "inflight.lua"
    script.write_text(PRELUDE + f"""
conn = session("{milter.sock}", "192.0.2.7", true)
mail(conn, "<a@contoso.test>")
if mt.rcptto(conn, "<b@example.test>") ~= nil then fail("rcpt") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then fail("recipient refused") end
io.open("{judged}", "w"):close()
-- wait until the test has sent SIGTERM and says go
while io.open("{flag}") == nil do mt.sleep(0.02) end
mt.header(conn, "From", "a@contoso.test")
if mt.eom(conn) ~= nil then fail("eom") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then fail("message in progress not accepted") end
print("FINISHED")
mt.disconnect(conn)
""")
    assert MILTERTEST is not None
    client = subprocess.Popen([MILTERTEST, "-s", str(script)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not judged.exists():
            assert time.monotonic() < deadline and client.poll() is None, "the recipient was not judged"
            time.sleep(0.02)
        milter.signal(signal.SIGTERM)
        milter.wait_log("SIGTERM: stopping, 1 sessions with messages in progress")
        assert not milter.sock.exists()  # no new connections from here on
        flag.touch()
        out, _ = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0 and "FINISHED" in out, milter.log()
    assert milter.stop() == 0
    assert "still open" not in milter.log()
    assert "4F2A1C3B: pass connector=contoso-in stage=rcpt client=client.example[192.0.2.7] " \
        "from=<a@contoso.test> to=<b@example.test>" in milter.log()


def test_metrics_count_the_milter_decisions(workdir: Path) -> None:
    from tests.policyd.policydhelp import BIN

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = make_rules_db(workdir / "rules.sqlite", RULES)
    sock = workdir / "milter.sock"
    config = write_config(workdir, url, f"unix:{sock}", extra=f"metrics = 127.0.0.1:{port}\n")
    process = MilterProcess(config, sock, workdir / "milter.log").start()
    try:
        miltertest(workdir, f"""
conn = session("{sock}", "192.0.2.7", false)
mail(conn, "<a@contoso.test>")
if mt.rcptto(conn, "<b@example.test>") ~= nil then fail("rcpt") end
if mt.getreply(conn) ~= SMFIR_REPLYCODE then fail("plaintext not refused") end
mail(conn, "<a@else.test>")
if mt.rcptto(conn, "<b@example.test>") ~= nil then fail("rcpt") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then fail("other sender refused") end
mt.disconnect(conn)
""")
        stats = subprocess.run([BIN / "tlsgate", "-c", config, "stats"], capture_output=True, text=True, timeout=30)
        assert stats.returncode == 0, stats.stdout + stats.stderr
        assert "decisions: 2" in stats.stdout
        assert "contoso-in: reject 1" in stats.stdout and "(no connector): pass 1" in stats.stdout
    finally:
        assert process.stop() == 0
