"""tlsgate postfix-config and tlsgate doctor, against private Postfix configurations."""

from __future__ import annotations

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
smtpd_recipient_restrictions = reject_unauth_destination,
    check_policy_service {{ unix:tlsgate/policy.sock, timeout=10s, default_action=DEFER_IF_PERMIT }}
smtpd_milters = unix:tlsgate/milter.sock
milter_default_action = tempfail
milter_mail_macros = i {{tls_version}} {{cipher}} {{cipher_bits}} {{cert_subject}} {{cert_issuer}}
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
                    f"[milter]\nlisten = unix:{sockdir}/milter.sock\n")
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


def test_postfix_config_is_relative_to_the_queue_directory(setup: dict[str, pathlib.Path]) -> None:
    r = subprocess.run([BIN / "tlsgate", "-c", setup["conf"], "postfix-config", "--queue-directory", setup["queue"]],
                       capture_output=True, text=True)
    assert r.returncode == 0
    assert "check_policy_service { unix:tlsgate/policy.sock, timeout=10s, default_action=DEFER_IF_PERMIT" in r.stdout
    assert "smtpd_milters = unix:tlsgate/milter.sock" in r.stdout
    assert "milter_default_action = tempfail" in r.stdout
    # The printed lines are valid Postfix syntax.
    (setup["pfdir"] / "main.cf").write_text(
        "\n".join(line for line in r.stdout.splitlines() if not line.startswith("#")) + "\n")
    check = subprocess.run(["postconf", "-c", setup["pfdir"], "-n"], capture_output=True, text=True)
    assert check.returncode == 0 and "warning" not in check.stderr, check.stderr
    assert "smtpd_tls_ask_ccert = yes" in check.stdout


def test_doctor_healthy(setup: dict[str, pathlib.Path]) -> None:
    with listen(setup["sockdir"] / "policy.sock", 0o666), listen(setup["sockdir"] / "milter.sock", 0o666):
        r = doctor(setup, GOOD_MAIN_CF)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "ok: no problems found"


@pytest.mark.parametrize(("change", "expected"), [
    (("smtpd_tls_ask_ccert = yes", "smtpd_tls_ask_ccert = no"), "smtpd_tls_ask_ccert = no"),
    (("smtpd_tls_CAfile = /etc/ssl/certs/ca-certificates.crt", ""), "neither smtpd_tls_CAfile nor smtpd_tls_CApath"),
    (("smtpd_tls_security_level = may", "smtpd_tls_security_level = none"), "smtpd offers no STARTTLS"),
    (("milter_mail_macros = i {{tls_version}} {{cipher}} {{cipher_bits}} {{cert_subject}} {{cert_issuer}}",
      "milter_helo_macros = {{tls_version}}\nmilter_mail_macros = i"), "the milter never receives {cipher}"),
    (("milter_mail_macros = i {{tls_version}} {{cipher}} {{cipher_bits}} {{cert_subject}} {{cert_issuer}}", ""),
     "milter_mail_macros lacks the TLS macros"),
    (("milter_default_action = tempfail", "milter_default_action = accept"), "mail passes unjudged"),
    (("smtpd_tls_fingerprint_digest = sha256", "smtpd_tls_fingerprint_digest = md5"), None),
    (("milter_default_action = tempfail", "milter_default_action = tempfail\nmilter_connect_macros = j _"),
     "the milter cannot tell that the MTA is Postfix"),
    (("milter_default_action = tempfail", "milter_default_action = tempfail\nmail_name = Mailer"),
     "milter_macro_v = 'Mailer "),
    (("milter_default_action = tempfail", "milter_default_action = tempfail\nmilter_macro_v = MTA"),
     "milter_macro_v = 'MTA'"),
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
    warning = "lacks the TLS macros" in expected
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
    main_cf = main_cf.replace("reject_unauth_destination,", "reject_unauth_destination")
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


def test_doctor_outbound_healthy(setup: dict[str, pathlib.Path]) -> None:
    with listen(setup["sockdir"] / "policy.sock", 0o666), listen(setup["sockdir"] / "milter.sock", 0o666):
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
    with listen(setup["sockdir"] / "policy.sock", 0o666), listen(setup["sockdir"] / "milter.sock", 0o666):
        r = doctor(setup, OUTBOUND_MAIN_CF + extra)
    assert r.returncode == (1 if severity == "error" else 0), r.stdout + r.stderr
    line = next(line for line in r.stdout.splitlines() if expected in line)
    assert line.startswith(f"{severity}: ")
    assert "    fix: " in r.stdout
