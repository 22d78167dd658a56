"""``make demo``: the example connectors at work in a private Postfix on loopback.

Starts a private Postfix (nothing in /etc/postfix is touched) with tlsgate-policyd and
tlsgate-milter on the rows of sql/examples.sql, sends a handful of messages as a partner, a
spoofer and an ordinary sender would, prints what happened to each and the daemons' log
lines, then stops everything.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.pki import Pki, issue_certificate
from tests.support.postfix import PrivatePostfix, SendResult, send, skip_reason
from tests.support.rulesdb import make_rules_db

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TLS_MACROS = "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}"


def start(cmd: list[str], log: Path, ready: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{cmd[0]} did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return proc


def outcome(result: SendResult, rcpt: str) -> str:
    if result.tls_error:
        return f"TLS failed: {result.tls_error}"
    reply = result.rcpt.get(rcpt)
    if reply is None:
        return f"refused before RCPT: {result.mail}"
    if not reply.ok:
        return f"refused: {reply.code} {reply.text}"
    if result.data is not None and not result.data.ok:
        return f"refused at end of data: {result.data.code} {result.data.text}"
    return "delivered"


def main() -> int:
    reason = skip_reason()
    if reason is not None:
        print(f"make demo: {reason}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="tlsgate-demo-"))
    work.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    pki = Pki(work / "pki")
    # Fabrikam's servers present mail.fabrikam.com from Fabrikam's own CA, which we trust.
    fab_ca = issue_certificate(pki.directory, "fabrikam-ca", common_name="Fabrikam Issuing CA 01", is_ca=True)
    fabrikam = issue_certificate(pki.directory, "fabrikam", common_name="mail.fabrikam.com",
                                 san=("mail.fabrikam.com",), issuer=fab_ca)
    bundle = work / "trusted-cas.pem"
    bundle.write_bytes(pki.ca.cert_path.read_bytes() + fab_ca.cert_path.read_bytes())
    postfix = PrivatePostfix(pki, domains=("example.org",))
    try:
        sockdir = postfix.queue_dir / "tlsgate"
        sockdir.mkdir(mode=0o755)
        url = make_rules_db(work / "rules.sqlite", (ROOT / "sql" / "examples.sql").read_text())
        conf = work / "tlsgate.conf"
        conf.write_text(
            f"[database]\nurl = {url}\n"
            f"[policyd]\nlisten = unix:{sockdir}/policy.sock\nsocket_mode = 0666\n"
            f"[milter]\nlisten = unix:{sockdir}/milter.sock\nsocket_mode = 0666\n"
            "[log]\ntarget = stderr\n")
        procs.append(start([str(BIN / "tlsgate-policyd"), "-c", str(conf)], work / "policyd.log",
                           "tlsgate-policyd ready"))
        procs.append(start([str(BIN / "tlsgate-milter"), "-c", str(conf)], work / "milter.log",
                           "loaded rules generation"))
        postfix.start({
            "smtpd_tls_CAfile": str(bundle),
            "smtpd_recipient_restrictions": "reject_unauth_destination, check_policy_service "
            "{ unix:tlsgate/policy.sock, timeout=10s, default_action=DEFER_IF_PERMIT }",
            "smtpd_milters": "unix:tlsgate/milter.sock",
            "milter_default_action": "tempfail",
            "milter_mail_macros": f"i {{mail_addr}} {TLS_MACROS}",
        })
        print(f"private Postfix on 127.0.0.1:{postfix.port}, tlsgate rules from sql/examples.sql\n")
        cases = [
            ("Fabrikam's server, TLS with its certificate", "news@fabrikam.com", "alice@example.org",
             {"starttls": True, "cert": fabrikam.cert_path, "key": fabrikam.key_path}),
            ("a spoofer claiming fabrikam.com, plaintext", "ceo@fabrikam.com", "bob@example.org", {}),
            ("a spoofer claiming fabrikam.com, TLS, no certificate", "ceo@fabrikam.com", "bob@example.org",
             {"starttls": True}),
            ("Contoso without TLS (forced TLS connector)", "sales@contoso.com", "carol@example.org", {}),
            ("Contoso over TLS", "sales@contoso.com", "carol@example.org", {"starttls": True}),
            ("an ordinary sender, plaintext (no connector)", "someone@elsewhere.test", "dave@example.org", {}),
            ("Woodgrove plaintext (monitor mode)", "ops@woodgrovebank.com", "erin@example.org", {}),
        ]
        for title, sender, rcpt, options in cases:
            result = send(postfix.port, sender, [rcpt], **options)  # type: ignore[arg-type]
            print(f"{title}\n    {sender} -> {rcpt}: {outcome(result, rcpt)}")
        # Stopping the daemons flushes their log queues: print the decisions after that.
        stop(procs)
        print("\ntlsgate-policyd log:")
        for line in (work / "policyd.log").read_text().splitlines():
            if "connector=" in line:
                print("   ", line.split(": ", 1)[1] if ": " in line else line)
        return 0
    finally:
        stop(procs)
        postfix.stop()
        shutil.rmtree(work, ignore_errors=True)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(20)


if __name__ == "__main__":
    sys.exit(main())
