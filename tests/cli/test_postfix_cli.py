"""tlsgate postfix-config and tlsgate doctor, against private Postfix configurations."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

BIN = pathlib.Path(sys.executable).parent
ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("postconf") is None, reason="Postfix's postconf is not installed")

GOOD_MAIN_CF = """\
queue_directory = {queue}
smtpd_tls_security_level = may
smtpd_tls_ask_ccert = yes
smtpd_tls_CAfile = /etc/ssl/certs/ca-certificates.crt
smtpd_tls_fingerprint_digest = sha256
smtpd_tls_chain_files = /etc/postfix/mx-key-and-chain.pem
compatibility_level = 3.6
smtpd_recipient_restrictions =
    check_policy_service {{ unix:tlsgate/policy.sock, timeout=10s, default_action=DEFER_IF_PERMIT }}
smtpd_milters = unix:tlsgate/milter.sock
milter_default_action = tempfail
milter_mail_macros = i {{mail_addr}} {{tls_version}} {{cipher}} {{cipher_bits}} {{cert_subject}} {{cert_issuer}}
"""


@pytest.fixture
def setup(tmp_path: pathlib.Path) -> Iterator[dict[str, pathlib.Path]]:
    # The queue directory must be searchable by user postfix, as a real one is; pytest's own
    # temporary directories are not (mode 0700), and doctor checks exactly that.
    top = pathlib.Path(tempfile.mkdtemp(prefix="tlsgate-doctor-"))
    os.chmod(top, 0o755)
    queue = top / "queue"
    sockdir = queue / "tlsgate"
    sockdir.mkdir(parents=True)
    os.chmod(queue, 0o755)
    os.chmod(sockdir, 0o755)
    db = tmp_path / "rules.sqlite"
    conf = tmp_path / "tlsgate.conf"
    conf.write_text(f"[database]\nurl = sqlite:///{db}\n[policyd]\nlisten = unix:{sockdir}/policy.sock\n"
                    f"[milter]\nlisten = unix:{sockdir}/milter.sock\n"
                    f"[socketmap]\nlisten = unix:{sockdir}/socketmap.sock\n")
    r = subprocess.run([BIN / "tlsgate", "-c", conf, "db", "init", "--examples", ROOT / "sql" / "examples.sql"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pfdir = tmp_path / "postfix"
    pfdir.mkdir()
    (pfdir / "master.cf").write_text("")
    yield {"queue": queue, "sockdir": sockdir, "conf": conf, "pfdir": pfdir}
    shutil.rmtree(top)


def listen(path: pathlib.Path, mode: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    os.chmod(path, mode)
    return s


def doctor(setup: dict[str, pathlib.Path], main_cf: str) -> subprocess.CompletedProcess[str]:
    (setup["pfdir"] / "main.cf").write_text(main_cf.format(queue=setup["queue"]))
    return subprocess.run([BIN / "tlsgate", "-c", setup["conf"], "doctor", "--postfix-dir", setup["pfdir"]],
                          capture_output=True, text=True)


def use_transport(setup: dict[str, pathlib.Path], transport: str | None) -> None:
    """Have connector mail leave by the master.cf service ``transport`` ([socketmap] transport)."""
    if transport:
        with setup["conf"].open("a") as fh:
            fh.write(f"transport = {transport}\n")  # the last section is [socketmap]


def postfix_config(setup: dict[str, pathlib.Path], *args: str, main_cf: str | None = None,
                   master_cf: str = "", readable: bool = True) -> subprocess.CompletedProcess[str]:
    """`tlsgate postfix-config` against the private configuration (`main_cf`, `master_cf` when
    given, else the files as they are; `readable=False`: one postconf cannot read)."""
    if main_cf is not None:
        (setup["pfdir"] / "main.cf").write_text(main_cf.format(queue=setup["queue"]))
        (setup["pfdir"] / "master.cf").write_text(master_cf)
    pfdir = setup["pfdir"] if readable else setup["pfdir"] / "missing"
    r = subprocess.run([BIN / "tlsgate", "-c", setup["conf"], "postfix-config", "--postfix-dir", pfdir, *args],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def main_cf_part(output: str) -> str:
    """The main.cf lines of postfix-config's output (before the master.cf advice), comments left out."""
    main = output.split("# master.cf:", 1)[0]
    return "".join(line + "\n" for line in main.splitlines() if line and not line.startswith("#"))


def paste(setup: dict[str, pathlib.Path], output: str) -> dict[str, str]:
    """Append the printed lines to main.cf, as an administrator pasting them would, and return
    the values postconf then reads (a later line of the same name wins)."""
    main_cf = setup["pfdir"] / "main.cf"
    main_cf.write_text(main_cf.read_text() + main_cf_part(output))
    r = subprocess.run(["postconf", "-c", setup["pfdir"], "-n"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert all("overriding earlier entry" in line for line in r.stderr.splitlines() if "warning" in line), r.stderr
    return {name: value for name, _, value in (line.partition(" = ") for line in r.stdout.splitlines())}


def test_postfix_config_is_relative_to_the_queue_directory(setup: dict[str, pathlib.Path]) -> None:
    r = postfix_config(setup, main_cf="queue_directory = {queue}\n")
    assert "check_policy_service { unix:tlsgate/policy.sock, timeout=10s, default_action=DEFER_IF_PERMIT" in r.stdout
    assert "smtpd_milters = unix:tlsgate/milter.sock" in r.stdout
    assert "milter_default_action = tempfail: kept" in r.stdout
    assert "transport_maps = socketmap:unix:tlsgate/socketmap.sock:transport" in r.stdout
    # The printed lines are valid Postfix syntax.
    (setup["pfdir"] / "main.cf").write_text(main_cf_part(r.stdout))
    check = subprocess.run(["postconf", "-c", setup["pfdir"], "-n"], capture_output=True, text=True)
    assert check.returncode == 0 and "warning" not in check.stderr, check.stderr
    assert "smtpd_tls_ask_ccert = yes" in check.stdout
    # The same with --queue-directory, and without the optional parts.
    r = postfix_config(setup, "--queue-directory", str(setup["queue"]), "--no-milter", "--no-outbound",
                       main_cf="queue_directory = /var/spool/postfix\n")
    assert "check_policy_service { unix:tlsgate/policy.sock," in r.stdout
    assert "milter" not in main_cf_part(r.stdout) and "socketmap" not in r.stdout


# What a relaying host has: mynetworks and SASL users send out through it, relay control in
# the recipient restrictions, other milters and tables of its own.
ADMIN_MAIN_CF = """\
queue_directory = {queue}
compatibility_level = 3.6
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated,
    reject_unauth_destination, check_policy_service unix:private/policyd-spf
smtpd_milters = inet:127.0.0.1:8891
non_smtpd_milters = $smtpd_milters
milter_default_action = accept
transport_maps = hash:/etc/postfix/transport
smtp_tls_policy_maps = hash:/etc/postfix/tls_policy
smtpd_tls_security_level = encrypt
smtpd_tls_CAfile = /etc/postfix/partners-ca.pem
smtpd_tls_chain_files = /etc/postfix/mx.pem
"""


def test_postfix_config_keeps_debians_ca_path(setup: dict[str, pathlib.Path]) -> None:
    r = postfix_config(setup, main_cf="queue_directory = {queue}\nsmtp_tls_CApath = /etc/ssl/certs\n")
    assert "# smtp_tls_CApath = /etc/ssl/certs: kept" in r.stdout
    assert "smtp_tls_CAfile" not in r.stdout, r.stdout


def test_postfix_config_adds_to_what_the_admin_has(setup: dict[str, pathlib.Path]) -> None:
    r = postfix_config(setup, main_cf=ADMIN_MAIN_CF)
    assert "reject_unauth_destination" not in main_cf_part(r.stdout).replace(
        "permit_sasl_authenticated, reject_unauth_destination", "")
    after = paste(setup, r.stdout)
    # tlsgate before the first entry that could accept, every entry of the admin kept in order.
    assert after["smtpd_recipient_restrictions"].split(" }, ", 1)[0].startswith(
        "check_policy_service { unix:tlsgate/policy.sock,")
    assert after["smtpd_recipient_restrictions"].endswith(
        "}, permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination, "
        "check_policy_service unix:private/policyd-spf")
    # tlsgate's milter added with its own tempfail; the other milter keeps accept; local submission
    # keeps only the milters it had.
    assert after["smtpd_milters"] == "inet:127.0.0.1:8891, { unix:tlsgate/milter.sock, default_action=tempfail }"
    assert after["milter_default_action"] == "accept"
    assert after["non_smtpd_milters"] == "inet:127.0.0.1:8891"
    # tlsgate's tables first: it must win for connector domains.
    assert after["transport_maps"] == "socketmap:unix:tlsgate/socketmap.sock:transport, hash:/etc/postfix/transport"
    assert after["smtp_tls_policy_maps"] == \
        "socketmap:unix:tlsgate/socketmap.sock:tls_policy, hash:/etc/postfix/tls_policy"
    # Settings that suit tlsgate are not weakened nor replaced.
    assert after["smtpd_tls_security_level"] == "encrypt"
    assert after["smtpd_tls_CAfile"] == "/etc/postfix/partners-ca.pem"
    # Once pasted, a second run adds nothing more.
    again = postfix_config(setup)
    assert paste(setup, again.stdout) == after


def test_postfix_config_moves_a_tlsgate_check_that_comes_after_a_permit(setup: dict[str, pathlib.Path]) -> None:
    # Merged by hand "after relay control", as the docs once said: mynetworks and SASL clients
    # were accepted by the permits before tlsgate was asked.
    late = ADMIN_MAIN_CF.replace("check_policy_service unix:private/policyd-spf",
                                 "check_policy_service {{ unix:tlsgate/policy.sock, timeout=10s }}")
    r = postfix_config(setup, main_cf=late)
    assert "asked tlsgate after permit_mynetworks, which can accept a recipient" in r.stdout
    after = paste(setup, r.stdout)
    assert after["smtpd_recipient_restrictions"] == (
        "check_policy_service { unix:tlsgate/policy.sock, timeout=10s, default_action=DEFER_IF_PERMIT, "
        "max_idle=300s }, permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination")
    assert "already asks tlsgate before anything that accepts, kept" in postfix_config(setup).stdout


def test_postfix_config_without_postconf_says_to_merge_by_hand(setup: dict[str, pathlib.Path]) -> None:
    r = postfix_config(setup, readable=False)
    assert "postconf could not read the Postfix configuration" in r.stdout
    assert "REPLACES a line of the same name" in r.stdout
    assert r.stdout.count("MERGE BY HAND") == 3
    assert "reject_unauth_destination" not in main_cf_part(r.stdout)
    assert "smtpd_recipient_restrictions =\n    check_policy_service { unix:" in r.stdout


def test_doctor_healthy(setup: dict[str, pathlib.Path]) -> None:
    with listen(setup["sockdir"] / "policy.sock", 0o666), listen(setup["sockdir"] / "milter.sock", 0o666):
        r = doctor(setup, GOOD_MAIN_CF)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "ok: no problems found"


@pytest.mark.parametrize(("change", "expected"), [
    (("smtpd_tls_ask_ccert = yes", "smtpd_tls_ask_ccert = no"), "smtpd_tls_ask_ccert = no"),
    (("smtpd_tls_CAfile = /etc/ssl/certs/ca-certificates.crt", ""), "neither smtpd_tls_CAfile nor smtpd_tls_CApath"),
    (("smtpd_tls_security_level = may", "smtpd_tls_security_level = none"), "smtpd offers no STARTTLS"),
    (("milter_mail_macros = i {{mail_addr}} {{tls_version}} {{cipher}} {{cipher_bits}} {{cert_subject}} {{cert_issuer}}",
      "milter_helo_macros = {{tls_version}}\nmilter_mail_macros = i"), "the milter never receives {cipher}"),
    (("milter_mail_macros = i {{mail_addr}} {{tls_version}} {{cipher}} {{cipher_bits}} {{cert_subject}} {{cert_issuer}}", ""),
     "milter_mail_macros lacks the TLS macros"),
    (("milter_default_action = tempfail", "milter_default_action = accept"), "mail passes unjudged"),
    (("milter_mail_macros = i {{mail_addr}}", "milter_mail_macros = i"),
     "milter_mail_macros lacks {mail_addr}: the milter sees the client's spelling only"),
    (("milter_default_action = tempfail", "milter_default_action = tempfail\nmilter_rcpt_macros = i"),
     "milter_rcpt_macros lacks {rcpt_addr}"),
    (("smtpd_tls_fingerprint_digest = sha256", "smtpd_tls_fingerprint_digest = md5"), None),
    (("milter_default_action = tempfail", "milter_default_action = tempfail\nmilter_connect_macros = j _"),
     "the milter cannot tell that the MTA is Postfix"),
    (("milter_default_action = tempfail", "milter_default_action = tempfail\nmail_name = Mailer"),
     "milter_macro_v = 'Mailer "),
    (("milter_default_action = tempfail", "milter_default_action = tempfail\nmilter_macro_v = MTA"),
     "milter_macro_v = 'MTA'"),
    # tlsgate asked after a permit: what the permit accepts is never judged.
    (("smtpd_recipient_restrictions =\n", "smtpd_recipient_restrictions = permit_mynetworks,\n"),
     "smtpd_recipient_restrictions asks tlsgate after permit_mynetworks, which can accept a recipient"),
    # What postfix-config printed before it merged: relaying clients got "Relay access denied".
    (("smtpd_recipient_restrictions =\n", "smtpd_recipient_restrictions = reject_unauth_destination,\n"),
     "smtpd_recipient_restrictions has reject_unauth_destination without permit_mynetworks and "
     "permit_sasl_authenticated before it, which smtpd_relay_restrictions grants"),
])
def test_doctor_names_each_fault_and_its_fix(setup: dict[str, pathlib.Path], change: tuple[str, str],
                                             expected: str | None) -> None:
    main_cf = GOOD_MAIN_CF.replace(change[0], change[1])
    assert main_cf != GOOD_MAIN_CF
    with listen(setup["sockdir"] / "policy.sock", 0o666), listen(setup["sockdir"] / "milter.sock", 0o666):
        r = doctor(setup, main_cf)
    if expected is None:  # md5 matters only once a connector is pinned: no finding with the examples
        assert r.returncode == 0, r.stdout
        return
    warning = " lacks " in expected  # the milter still judges, some sessions less well
    assert r.returncode == (0 if warning else 1), r.stdout
    line = next(line for line in r.stdout.splitlines() if expected in line)
    assert line.startswith("warning: " if warning else "error: ")
    assert "    fix: " in r.stdout


def test_doctor_sockets_postfix_cannot_reach(setup: dict[str, pathlib.Path]) -> None:
    r = doctor(setup, GOOD_MAIN_CF)  # nothing listening
    assert r.returncode == 1
    assert "policy socket:" in r.stdout and "does not exist" in r.stdout
    with listen(setup["sockdir"] / "policy.sock", 0o600), listen(setup["sockdir"] / "milter.sock", 0o666):
        r = doctor(setup, GOOD_MAIN_CF)
    assert "is not writable by user postfix (mode 0600)" in r.stdout


def test_doctor_pinned_connector_enforced_only_by_the_milter(setup: dict[str, pathlib.Path]) -> None:
    import sqlite3

    db = sqlite3.connect(str(setup["conf"].parent / "rules.sqlite"))
    db.execute("UPDATE inbound_connector SET certificate = 'pinned' WHERE name = 'fabrikam-in'")
    db.commit()
    db.close()
    main_cf = GOOD_MAIN_CF.replace(
        "    check_policy_service {{ unix:tlsgate/policy.sock, timeout=10s, default_action=DEFER_IF_PERMIT }}\n", "")
    with listen(setup["sockdir"] / "milter.sock", 0o666):
        r = doctor(setup, main_cf)
    assert r.returncode == 1
    assert "pinned connectors (fabrikam-in) are enforced only by the milter" in r.stdout


def test_doctor_without_any_tlsgate_hook(setup: dict[str, pathlib.Path]) -> None:
    r = doctor(setup, "queue_directory = {queue}\nsmtpd_tls_security_level = may\n")
    assert r.returncode == 1
    assert "neither the policy daemon nor the milter is in the Postfix configuration" in r.stdout


OUTBOUND_MAIN_CF = GOOD_MAIN_CF + """\
smtp_tls_policy_maps = socketmap:unix:tlsgate/socketmap.sock:tls_policy
transport_maps = socketmap:unix:tlsgate/socketmap.sock:transport
"""


def listening(setup: dict[str, pathlib.Path], *names: str) -> contextlib.ExitStack:
    """Sockets that user postfix can reach, listening in the socket directory until the stack closes."""
    stack = contextlib.ExitStack()
    for name in names:
        stack.enter_context(listen(setup["sockdir"] / name, 0o666))
    return stack


ALL_SOCKETS = ("policy.sock", "milter.sock", "socketmap.sock")


def test_doctor_outbound_healthy(setup: dict[str, pathlib.Path]) -> None:
    with listening(setup, *ALL_SOCKETS):
        r = doctor(setup, OUTBOUND_MAIN_CF + "mydestination = localhost, $myhostname\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "ok: no problems found"


@pytest.mark.parametrize(("extra", "severity", "expected"), [
    ("relayhost = [smarthost.example.net]:587\n", "warning",
     "relayhost = [smarthost.example.net]:587: mail to an outbound connector's domains does not go there"),
    ("sender_dependent_relayhost_maps = texthash:/etc/postfix/relays\n", "warning",
     "sender_dependent_relayhost_maps = texthash:/etc/postfix/relays: mail to an outbound connector's domains"),
    ("transport_maps = texthash:/etc/postfix/transport, socketmap:unix:tlsgate/socketmap.sock:transport\n",
     "warning", "transport_maps asks texthash:/etc/postfix/transport before tlsgate"),
    ("transport_maps =\n", "error", "smtp_tls_policy_maps asks tlsgate but transport_maps does not"),
    ("virtual_mailbox_domains = example.org contoso.com\n", "error",
     "outbound connector contoso-out covers contoso.com, which this Postfix delivers itself (virtual_mailbox_domains)"),
    ("relay_domains = contoso.com\n", "warning",
     "outbound connector contoso-out covers contoso.com, which this Postfix relays for (relay_domains)"),
    ("default_transport = smtp-out\n", "warning",
     "default_transport = smtp-out, but tlsgate's transport answers name the smtp service ([socketmap] transport)"),
])
def test_doctor_outbound_routes(setup: dict[str, pathlib.Path], extra: str, severity: str, expected: str) -> None:
    with listening(setup, *ALL_SOCKETS):
        r = doctor(setup, OUTBOUND_MAIN_CF + extra)
    assert r.returncode == (1 if severity == "error" else 0), r.stdout + r.stderr
    line = next(line for line in r.stdout.splitlines() if expected in line)
    assert line.startswith(f"{severity}: ")
    assert "    fix: " in r.stdout


@pytest.mark.parametrize("main_cf", [
    OUTBOUND_MAIN_CF,
    GOOD_MAIN_CF + "transport_maps = socketmap:unix:tlsgate/socketmap.sock:transport\n",
    GOOD_MAIN_CF + "smtp_tls_policy_maps = socketmap:unix:tlsgate/socketmap.sock:tls_policy\n"
                   "transport_maps = socketmap:unix:tlsgate/socketmap.sock:transport\n",
])
def test_doctor_socketmap_nobody_listens_on(setup: dict[str, pathlib.Path], main_cf: str) -> None:
    # Postfix then answers 451 4.3.0 for every recipient, local ones too.
    with listening(setup, "policy.sock", "milter.sock"):
        r = doctor(setup, main_cf)
        assert r.returncode == 1, r.stdout
        assert "error: socketmap socket (unix:tlsgate/socketmap.sock, in transport_maps or smtp_tls_policy_maps): " \
            f"{setup['sockdir']}/socketmap.sock does not exist" in r.stdout
        assert "systemctl enable --now tlsgate-socketmap.socket tlsgate-socketmap.service" in r.stdout
        # A socket file left behind by a daemon that died: nothing accepts on it.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(setup["sockdir"] / "socketmap.sock"))
        os.chmod(setup["sockdir"] / "socketmap.sock", 0o666)
        stale.close()
        r = doctor(setup, main_cf)
        assert r.returncode == 1, r.stdout
        assert "socketmap.sock (connection refused): is the daemon running?" in r.stdout


@pytest.mark.parametrize("certificate", ["smtpd_tls_chain_files", "smtpd_tls_cert_file", "smtpd_tls_eccert_file"])
def test_doctor_tls_without_a_server_certificate(setup: dict[str, pathlib.Path], certificate: str) -> None:
    main_cf = GOOD_MAIN_CF.replace("smtpd_tls_chain_files = /etc/postfix/mx-key-and-chain.pem\n", "")
    with listening(setup, *ALL_SOCKETS):
        r = doctor(setup, main_cf)
        assert r.returncode == 1, r.stdout
        line = next(line for line in r.stdout.splitlines() if "no server certificate" in line)
        assert line.startswith("error: smtpd_tls_security_level = may but smtpd has no server certificate")
        assert "fix: smtpd_tls_chain_files = " in r.stdout
        r = doctor(setup, main_cf + f"{certificate} = /etc/postfix/mx.pem\n")
        assert r.returncode == 0, r.stdout
        # No TLS offered at all: the error that says so, not this one.
        r = doctor(setup, main_cf.replace("smtpd_tls_security_level = may", "smtpd_tls_security_level = none"))
        assert "no server certificate" not in r.stdout and "smtpd offers no STARTTLS" in r.stdout


SMTP_SERVICE = "smtp      unix  -       -       y       -       -       smtp\n"


@pytest.mark.parametrize(("main_extra", "master_cf", "transport", "fault"), [
    ("smtp_fallback_relay = [fallback.example.net]:25\n", SMTP_SERVICE, None,
     "main.cf smtp_fallback_relay = [fallback.example.net]:25"),
    ("fallback_relay = [fallback.example.net]\n", SMTP_SERVICE, None, "main.cf smtp_fallback_relay = [fallback.example.net]"),
    ("", SMTP_SERVICE + "  -o smtp_fallback_relay=[fallback.example.net]\n", None,
     "master.cf smtp -o smtp_fallback_relay = [fallback.example.net]"),
    ("smtp_fallback_relay = [fallback.example.net]\n", SMTP_SERVICE + "  -o smtp_fallback_relay=\n", None, None),
    ("smtp_fallback_relay = [fallback.example.net]\n",
     SMTP_SERVICE + SMTP_SERVICE.replace("smtp ", "tlsgate-smtp ", 1) + "  -o smtp_fallback_relay=\n", "tlsgate-smtp", None),
    ("smtp_fallback_relay = [fallback.example.net]\n",
     SMTP_SERVICE + SMTP_SERVICE.replace("smtp ", "tlsgate-smtp ", 1), "tlsgate-smtp",
     "main.cf smtp_fallback_relay = [fallback.example.net]"),
])
def test_doctor_fallback_relay_for_connector_mail(setup: dict[str, pathlib.Path], main_extra: str, master_cf: str,
                                                  transport: str | None, fault: str | None) -> None:
    # Postfix appends the fallback relay after tlsgate's smtp:[hop], and tlsgate has no TLS policy
    # for the relay: a partner that fails its connector's TLS check would get the mail in plaintext.
    use_transport(setup, transport)
    (setup["pfdir"] / "master.cf").write_text(master_cf)
    with listening(setup, *ALL_SOCKETS):
        r = doctor(setup, OUTBOUND_MAIN_CF + main_extra)
    if fault is None:
        assert r.returncode == 0, r.stdout
        assert "fallback" not in r.stdout
        return
    assert r.returncode == 1, r.stdout
    line = next(line for line in r.stdout.splitlines() if fault in line)
    assert line.startswith(f"error: {fault}: Postfix adds the fallback relay after every next hop of the "
                           f"{transport or 'smtp'} service")
    assert f"fix: -o smtp_fallback_relay= on the {transport or 'smtp'} service in master.cf" in r.stdout


def test_postfix_config_service_without_the_fallback_relay(setup: dict[str, pathlib.Path]) -> None:
    main_cf = "queue_directory = {queue}\nsmtp_fallback_relay = [fallback.example.net]\n"
    master_cf = SMTP_SERVICE + "  -o smtp_helo_name=mx.example.org\n"
    r = postfix_config(setup, main_cf=main_cf, master_cf=master_cf)
    assert "[socketmap] transport = tlsgate-smtp" in r.stdout
    assert r.stdout.endswith("tlsgate-smtp unix - - y - - smtp\n  -o smtp_helo_name=mx.example.org\n"
                             "  -o smtp_fallback_relay=\n")
    # With that service in master.cf and named in [socketmap] transport, doctor is satisfied.
    with (setup["pfdir"] / "master.cf").open("a") as fh:
        fh.write(r.stdout.rsplit("\ntlsgate-smtp ", 1)[1].join(["tlsgate-smtp ", ""]))
    with setup["conf"].open("a") as fh:
        fh.write("transport = tlsgate-smtp\n")
    with listening(setup, *ALL_SOCKETS):
        r = doctor(setup, OUTBOUND_MAIN_CF + main_cf.split("\n", 1)[1])
    assert "fallback" not in r.stdout, r.stdout
    # No fallback relay: nothing to add to master.cf.
    r = postfix_config(setup, main_cf="queue_directory = {queue}\n", master_cf=SMTP_SERVICE)
    assert "-o smtp_fallback_relay" not in r.stdout


def test_doctor_per_milter_default_action(setup: dict[str, pathlib.Path]) -> None:
    # What postfix-config prints when the admin's other milters keep milter_default_action = accept.
    main_cf = GOOD_MAIN_CF.replace(
        "smtpd_milters = unix:tlsgate/milter.sock\nmilter_default_action = tempfail",
        "smtpd_milters = inet:127.0.0.1:8891, {{ unix:tlsgate/milter.sock, default_action=tempfail }}\n"
        "milter_default_action = accept")
    assert main_cf != GOOD_MAIN_CF
    with listening(setup, *ALL_SOCKETS):
        r = doctor(setup, main_cf)
        assert r.returncode == 0, r.stdout
        r = doctor(setup, main_cf.replace("default_action=tempfail", "default_action=accept"))
    assert r.returncode == 1, r.stdout
    assert "error: default_action=accept in smtpd_milters: mail passes unjudged" in r.stdout


def add_outbound(setup: dict[str, pathlib.Path], name: str, level: str) -> None:
    import sqlite3

    db = sqlite3.connect(str(setup["conf"].parent / "rules.sqlite"))
    db.execute("INSERT INTO outbound_connector (name, tls_level) VALUES (?, ?)", (name, level))
    db.execute("INSERT INTO outbound_domain (connector, pattern) VALUES (?, ?)", (name, f"{name}.example"))
    db.commit()
    db.close()


# postconf as Postfix 3.10 answers: mail_version 3.10.x and tls_required_enable (default yes),
# which the installed, older postconf does not know.
FAKE_POSTCONF = """\
#!{python}
import re, subprocess, sys
args = sys.argv[1:]
real = subprocess.run([{postconf!r}, *args], capture_output=True, text=True)
out = re.sub(r"^mail_version = .*$", "mail_version = 3.10.5", real.stdout, flags=re.M)
names = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "-c")]
if not {{"-P", "-M", "-n"}} & set(args) and (not names or "tls_required_enable" in names):
    main_cf = open(args[args.index("-c") + 1] + "/main.cf").read() if "-c" in args else ""
    value = re.findall(r"^tls_required_enable\\s*=\\s*(\\S*)", main_cf, flags=re.M)
    out += "tls_required_enable = " + (value[-1] if value else "yes") + "\\n"
sys.stdout.write(out)
sys.stderr.write("".join(l for l in real.stderr.splitlines(True) if "tls_required_enable" not in l))
sys.exit(real.returncode)
"""


@pytest.fixture
def postfix_3_10(tmp_path: pathlib.Path) -> dict[str, str]:
    """The environment in which tlsgate finds a postconf that answers as Postfix 3.10."""
    bindir = tmp_path / "fake-bin"
    bindir.mkdir()
    fake = bindir / "postconf"
    fake.write_text(FAKE_POSTCONF.format(python=sys.executable, postconf=shutil.which("postconf")))
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


def run_doctor(setup: dict[str, pathlib.Path], main_cf: str, master_cf: str = "",
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    (setup["pfdir"] / "master.cf").write_text(master_cf)
    (setup["pfdir"] / "main.cf").write_text(main_cf.format(queue=setup["queue"]))
    for name in ALL_SOCKETS:  # left by an earlier run: closed, not removed
        (setup["sockdir"] / name).unlink(missing_ok=True)
    with listening(setup, *ALL_SOCKETS):
        return subprocess.run([BIN / "tlsgate", "-c", setup["conf"], "doctor", "--postfix-dir", setup["pfdir"]],
                              capture_output=True, text=True, env=env)


@pytest.mark.parametrize(("main_extra", "master_cf", "fault"), [
    ("", "", "error: main.cf smtp_dns_support_level = '' for the smtp service, by which connector mail leaves: "
     "Postfix uses no DANE then (it logs \"dane configured with dnssec lookups disabled\"): outbound connectors "
     "at tls_level dane (partner-dane) get opportunistic TLS instead, and their mail leaves in plaintext where "
     "the partner offers no STARTTLS; those at dane-only (partner-strict) get all their mail deferred"),
    ("smtp_dns_support_level = dnssec\n", "", None),
    ("smtp_dns_support_level = dnssec\n", SMTP_SERVICE + "  -o smtp_dns_support_level=enabled\n",
     "error: master.cf smtp -o smtp_dns_support_level = 'enabled' for the smtp service"),
    ("smtp_dns_support_level = dnssec\nsmtp_host_lookup = native\n", "",
     "error: main.cf smtp_host_lookup = 'native' for the smtp service"),
])
def test_doctor_dane_connectors_need_dnssec_lookups(setup: dict[str, pathlib.Path], main_extra: str,
                                                    master_cf: str, fault: str | None) -> None:
    # Postfix's dane_init() (smtp_tls_policy.c): without DNSSEC lookups "dane" becomes "may".
    add_outbound(setup, "partner-dane", "dane")
    add_outbound(setup, "partner-strict", "dane-only")
    r = run_doctor(setup, OUTBOUND_MAIN_CF + main_extra, master_cf)
    if fault is None:
        assert r.returncode == 0, r.stdout
        return
    assert r.returncode == 1, r.stdout
    assert fault in r.stdout
    assert "    fix: " in r.stdout.split(fault, 1)[1].split("\n")[1]


def test_doctor_fingerprint_connectors_need_sha256(setup: dict[str, pathlib.Path]) -> None:
    add_outbound(setup, "partner-pinned", "fingerprint")
    # Postfix's default digest is md5 below compatibility_level 3.6.
    r = run_doctor(setup, OUTBOUND_MAIN_CF.replace("compatibility_level = 3.6", "compatibility_level = 2"))
    assert r.returncode == 1, r.stdout
    assert "error: main.cf smtp_tls_fingerprint_digest = 'md5' for the smtp service: outbound connectors at " \
        "tls_level fingerprint (partner-pinned) pin sha256 fingerprints" in r.stdout
    assert "fix: smtp_tls_fingerprint_digest = sha256" in r.stdout
    r = run_doctor(setup, OUTBOUND_MAIN_CF, SMTP_SERVICE + "  -o smtp_tls_fingerprint_digest=sha1\n")
    assert "error: master.cf smtp -o smtp_tls_fingerprint_digest = 'sha1'" in r.stdout
    assert "fix: -o smtp_tls_fingerprint_digest=sha256 on the smtp service in master.cf" in r.stdout
    assert run_doctor(setup, OUTBOUND_MAIN_CF).returncode == 0  # sha256 from compatibility_level 3.6


def test_doctor_tls_required_header(setup: dict[str, pathlib.Path], postfix_3_10: dict[str, str]) -> None:
    # Postfix >= 3.10: a "TLS-Required: no" header skips smtp_tls_policy_maps (tls_required_enable = yes).
    r = run_doctor(setup, OUTBOUND_MAIN_CF, env=postfix_3_10)
    assert r.returncode == 1, r.stdout
    assert "error: main.cf tls_required_enable = yes for the smtp service: Postfix 3.10.5 obeys a " \
        "\"TLS-Required: no\" message header (RFC 8689)" in r.stdout
    assert "every outbound connector (contoso-out)" in r.stdout and "fix: tls_required_enable = no" in r.stdout
    r = run_doctor(setup, OUTBOUND_MAIN_CF + "tls_required_enable = no\n", env=postfix_3_10)
    assert r.returncode == 0, r.stdout
    r = run_doctor(setup, OUTBOUND_MAIN_CF + "tls_required_enable = no\n",
                   SMTP_SERVICE + "  -o tls_required_enable=yes\n", env=postfix_3_10)
    assert "error: master.cf smtp -o tls_required_enable = yes" in r.stdout
    # Postfix 3.7 has no such header support: nothing to report, whatever master.cf says.
    r = run_doctor(setup, OUTBOUND_MAIN_CF, SMTP_SERVICE + "  -o tls_required_enable=yes\n")
    assert r.returncode == 0 and "tls_required" not in r.stdout, r.stdout


@pytest.mark.parametrize(("main_cf", "master_cf", "transport", "fault"), [
    (OUTBOUND_MAIN_CF, SMTP_SERVICE + "  -o smtp_tls_policy_maps=\n", None,
     "error: master.cf smtp -o smtp_tls_policy_maps = (empty): it replaces main.cf's smtp_tls_policy_maps for the "
     "smtp service, by which connector mail leaves ([socketmap] transport), and does not ask tlsgate"),
    (OUTBOUND_MAIN_CF, SMTP_SERVICE + "  -o smtp_tls_policy_maps=texthash:/etc/postfix/tls_policy\n", None,
     "fix: remove that -o from the smtp service in master.cf, or put tlsgate's table first in it: "
     "-o smtp_tls_policy_maps=socketmap:unix:tlsgate/socketmap.sock:tls_policy,texthash:/etc/postfix/tls_policy"),
    (OUTBOUND_MAIN_CF, SMTP_SERVICE + "  -o smtp_tls_policy_maps=socketmap:unix:tlsgate/socketmap.sock:tls_policy\n",
     None, None),
    # Connector mail leaves by tlsgate-smtp: an override there counts, one on smtp does not.
    (OUTBOUND_MAIN_CF, SMTP_SERVICE + "  -o smtp_tls_policy_maps=\n" + SMTP_SERVICE.replace("smtp ", "tlsgate-smtp ", 1),
     "tlsgate-smtp", None),
    (OUTBOUND_MAIN_CF, SMTP_SERVICE + SMTP_SERVICE.replace("smtp ", "tlsgate-smtp ", 1) + "  -o smtp_tls_policy_maps=\n",
     "tlsgate-smtp", "error: master.cf tlsgate-smtp -o smtp_tls_policy_maps = (empty)"),
    (OUTBOUND_MAIN_CF.replace("smtp_tls_policy_maps = socketmap:unix:tlsgate/socketmap.sock:tls_policy\n", ""), "",
     None, "error: transport_maps asks tlsgate but smtp_tls_policy_maps does not: for the smtp service, by which "
     "connector mail leaves, no outbound connector's TLS level applies to the mail it delivers"),
])
def test_doctor_policy_maps_on_the_connector_service(setup: dict[str, pathlib.Path], main_cf: str, master_cf: str,
                                                     transport: str | None, fault: str | None) -> None:
    use_transport(setup, transport)
    r = run_doctor(setup, main_cf, master_cf)
    if fault is None:
        assert r.returncode == 0, r.stdout
        return
    assert r.returncode == 1, r.stdout
    assert fault in r.stdout


def test_postfix_config_client_settings(setup: dict[str, pathlib.Path], postfix_3_10: dict[str, str]) -> None:
    main_cf = "queue_directory = {queue}\ncompatibility_level = 2\n"
    r = postfix_config(setup, main_cf=main_cf, master_cf=SMTP_SERVICE + "  -o smtp_tls_policy_maps=\n")
    assert "# master.cf smtp -o smtp_tls_policy_maps= replaces main.cf's smtp_tls_policy_maps for connector mail" \
        in r.stdout
    # Always with outbound: the socketmap answers sha256 fingerprints (md5 here, by compatibility_level).
    assert "# smtp_tls_fingerprint_digest was md5: " in r.stdout
    assert "\nsmtp_tls_fingerprint_digest = sha256\n" in r.stdout
    # No dane connector in the rules: DNSSEC is left alone. Postfix 3.7: no tls_required_enable.
    assert "smtp_dns_support_level" not in r.stdout and "tls_required_enable" not in r.stdout
    add_outbound(setup, "partner-dane", "dane")
    r = postfix_config(setup, main_cf=main_cf + "smtp_host_lookup = native\n")
    assert "\nsmtp_dns_support_level = dnssec\n" in r.stdout and "\nsmtp_host_lookup = dns\n" in r.stdout
    # Pasted, doctor finds nothing more to say about DANE or the digest.
    paste(setup, r.stdout)
    with listening(setup, *ALL_SOCKETS):
        d = subprocess.run([BIN / "tlsgate", "-c", setup["conf"], "doctor", "--postfix-dir", setup["pfdir"]],
                           capture_output=True, text=True)
    assert "smtp_dns_support_level" not in d.stdout and "smtp_host_lookup" not in d.stdout, d.stdout
    assert "fingerprint_digest" not in d.stdout, d.stdout
    assert "# smtp_dns_support_level = dnssec: kept" in postfix_config(setup).stdout
    # Postfix 3.10: tls_required_enable = no, unless main.cf has it already.
    (setup["pfdir"] / "main.cf").write_text(main_cf.format(queue=setup["queue"]))
    r = subprocess.run([BIN / "tlsgate", "-c", setup["conf"], "postfix-config", "--postfix-dir", setup["pfdir"]],
                       capture_output=True, text=True, env=postfix_3_10)
    assert "\ntls_required_enable = no\n" in r.stdout, r.stdout
    (setup["pfdir"] / "main.cf").write_text(main_cf.format(queue=setup["queue"]) + "tls_required_enable = no\n")
    r = subprocess.run([BIN / "tlsgate", "-c", setup["conf"], "postfix-config", "--postfix-dir", setup["pfdir"]],
                       capture_output=True, text=True, env=postfix_3_10)
    assert "# tls_required_enable = no: kept" in r.stdout, r.stdout


def test_lint_warns_that_dane_is_opportunistic(setup: dict[str, pathlib.Path]) -> None:
    add_outbound(setup, "partner-dane", "dane")
    add_outbound(setup, "partner-strict", "dane-only")
    r = subprocess.run([BIN / "tlsgate", "-c", setup["conf"], "lint"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    warnings = [line for line in r.stdout.splitlines() if "opportunistic" in line]
    assert warnings == ["warning: outbound_connector ('partner-dane') column tls_level: is 'dane', which Postfix "
                        "treats as opportunistic TLS wherever the partner publishes no TLSA records (or its MX "
                        "records are not DNSSEC-signed): mail then leaves in plaintext when the partner's STARTTLS "
                        "is missing or fails; use 'dane-only' to have it deferred instead"]
