"""Part 2: messages per second through a private Postfix with STARTTLS, with no add-on,
tlsgate-policyd, the floor policy server (DUNNO to everything), tlsgate-milter, both, and a
no-op pymilter milter, in the same run.

One Postfix instance (tests/support/postfix.py) is reloaded between configurations, which
are interleaved within each run so that drifting machine load hits them all alike. Clients
are several processes speaking smtplib: EHLO, STARTTLS, EHLO, then one or several
MAIL/RCPT/DATA per connection. A message counts when DATA is answered 250; delivery to the
maildir happens behind, as it does in production, and competes for the same CPU.
"""

from __future__ import annotations

import multiprocessing
import shutil
import smtplib
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import DAEMONS, Child, cpu_seconds, sqlite_rules
from tests.support.pki import Pki
from tests.support.postfix import PrivatePostfix, client_tls_context, skip_reason

TLS_MACROS = "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}"
MAIL_MACROS = f"i {{auth_type}} {{auth_authen}} {{auth_author}} {{mail_addr}} {{mail_host}} {{mail_mailer}} {TLS_MACROS}"
POLICY = "check_policy_service {{ unix:tlsgate/{}, timeout=10s, default_action=DEFER_IF_PERMIT }}"
# The floor policy server answers DUNNO without deciding: what Postfix's policy delegation
# costs by itself, the best any policy daemon could do here.
CONFIGS = ("postfix alone", "tlsgate-policyd", "floor policy server", "tlsgate-milter", "policyd + milter",
           "no-op pymilter")
# The add-on daemons each configuration sends its messages through.
ADD_ONS = {"postfix alone": (), "tlsgate-policyd": ("policyd",), "floor policy server": ("floor",),
           "tlsgate-milter": ("milter",), "policyd + milter": ("policyd", "milter"), "no-op pymilter": ("noop",)}
WARM_UP = 8  # messages after each reload, not counted
MESSAGE = (b"From: a@bench.test\r\nTo: b@tlsgate.test\r\nSubject: bench\r\n\r\n" + b"benchmark body line\r\n" * 40)


def _main_cf(config: str, milter_sock: Path, noop_sock: Path) -> dict[str, str]:
    restrictions = "reject_unauth_destination"
    milters = ""
    if config in ("tlsgate-policyd", "policyd + milter"):
        restrictions = f"reject_unauth_destination, {POLICY.format('policy.sock')}"
    if config == "floor policy server":
        restrictions = f"reject_unauth_destination, {POLICY.format('floor.sock')}"
    if config in ("tlsgate-milter", "policyd + milter"):
        milters = f"unix:{milter_sock}"
    if config == "no-op pymilter":
        milters = f"unix:{noop_sock}"
    return {"smtpd_recipient_restrictions": restrictions, "smtpd_milters": milters,
            "milter_default_action": "tempfail", "milter_helo_macros": TLS_MACROS, "milter_mail_macros": MAIL_MACROS}


def _client(port: int, sessions: int, per_session: int, start_at: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    context = client_tls_context()
    accepted = failed = 0
    while time.time() < start_at:
        time.sleep(0.001)
    for _ in range(sessions):
        try:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.tlsgate.test", timeout=60) as smtp:
                smtp.ehlo()
                smtp.starttls(context=context)
                smtp.ehlo()
                for n in range(per_session):
                    code, _ = smtp.docmd("MAIL", "FROM:<a@bench.test>")
                    code2, _ = smtp.docmd("RCPT", f"TO:<bench{n}@tlsgate.test>")
                    if code == 250 and code2 == 250:
                        code3, _ = smtp.data(MESSAGE)
                        accepted += code3 == 250
                        failed += code3 != 250
                    else:
                        failed += 1
                        smtp.rset()
        except (smtplib.SMTPException, OSError):
            failed += 1
    out.put((accepted, failed, time.time()))


def drive(port: int, messages: int, per_session: int, processes: int) -> dict[str, float]:
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    sessions = max(1, messages // (per_session * processes))
    start_at = time.time() + 0.3
    workers = [multiprocessing.Process(target=_client, args=(port, sessions, per_session, start_at, queue))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(30)
    accepted = sum(r[0] for r in results)
    elapsed = max(r[2] for r in results) - start_at
    return {"rate": accepted / elapsed, "accepted": accepted, "failed": sum(r[1] for r in results), "seconds": elapsed}


def _cpu_seconds(child: Child) -> float:
    pid = child.pid()
    assert pid is not None
    return cpu_seconds(pid)


def _measured(drive_once: Callable[[], dict[str, float]], master_pid: int, add_ons: list[Child]) -> dict[str, float]:
    """One drive, with the CPU time that Postfix (its master and every process under it: smtpd,
    cleanup, qmgr, the delivery agent, tlsmgr) and the configuration's add-ons spent on it, per
    message sent."""
    postfix_before = cpu_seconds(master_pid)
    add_ons_before = sum(_cpu_seconds(child) for child in add_ons)
    result = drive_once()
    sent = max(1.0, result["accepted"] + result["failed"])
    result["postfix_cpu_us"] = 1e6 * (cpu_seconds(master_pid) - postfix_before) / sent
    result["addon_cpu_us"] = 1e6 * (sum(_cpu_seconds(child) for child in add_ons) - add_ons_before) / sent
    return result


def run(work: Path, *, runs: int = 5, messages: int = 300, processes: int = 4,
        per_session: tuple[int, ...] = (1, 10)) -> dict[str, Any]:
    reason = skip_reason()
    if reason is not None:
        return {"skipped": reason}
    work.mkdir(parents=True, exist_ok=True)
    pki_dir = Path(tempfile.mkdtemp(prefix="tlsgate-bench-pki-"))
    instance = PrivatePostfix(Pki(pki_dir))
    children: list[Child] = []
    by_name: dict[str, Child] = {}
    try:
        sockdir = instance.queue_dir / "tlsgate"
        sockdir.mkdir(mode=0o755)
        url = sqlite_rules(work / "postfix-rules.sqlite", 10)
        # The bench sender's connector: TLS required (STARTTLS is used, so a logged pass).
        with sqlite3.connect(work / "postfix-rules.sqlite") as con:
            con.execute("INSERT INTO inbound_connector (name, on_failure) VALUES ('bench-in', 'reject')")
            con.execute("INSERT INTO inbound_domain VALUES ('bench-in', 'sender', 'bench.test')")
        con.close()
        conf = work / "postfix-tlsgate.conf"
        milter_sock = instance.socket_dir / "milter.sock"
        noop_sock = instance.socket_dir / "noop.sock"
        conf.write_text(f"[database]\nurl = {url}\npoll_interval = 2\n\n[policyd]\nlisten = unix:{sockdir / 'policy.sock'}\n"
                        f"socket_mode = 0666\nsocket_group = root\n\n[milter]\nlisten = unix:{milter_sock}\n"
                        "socket_mode = 0666\nsocket_group = root\n\n[log]\ntarget = stderr\nlevel = info\n")
        for name, args, sock in (("policyd", [*DAEMONS["tlsgate-policyd"], "--config", str(conf)], sockdir / "policy.sock"),
                                 ("milter", [*DAEMONS["tlsgate-milter"], "--config", str(conf)], milter_sock),
                                 ("noop", [sys.executable, "-m", "bench.noop_milter", f"unix:{noop_sock}"], noop_sock),
                                 ("floor", [sys.executable, "-m", "bench.floor_server", str(sockdir / "floor.sock")],
                                  sockdir / "floor.sock")):
            child = Child(args, work / f"postfix-{name}.log")
            children.append(child)
            by_name[name] = child
            child.start(lambda s=sock: s.exists())
        noop_sock.chmod(0o666)
        instance.start(_main_cf("postfix alone", milter_sock, noop_sock))
        master_pid = instance.master_pid()
        assert master_pid is not None
        out: dict[str, Any] = {"runs": runs, "messages": messages, "processes": processes, "results": {}}
        cpu_before = [_cpu_seconds(child) for child in children]  # start-up excluded
        for run_index in range(runs):
            for config in CONFIGS:
                instance.reload(_main_cf(config, milter_sock, noop_sock))
                drive(instance.port, WARM_UP, 1, 2)  # smtpd processes with the new settings
                add_ons = [by_name[name] for name in ADD_ONS[config]]
                for k in per_session:
                    result = _measured(lambda k=k: drive(instance.port, messages, k, processes), master_pid, add_ons)
                    out["results"].setdefault(config, {}).setdefault(str(k), []).append(result)
                    print(f"  run {run_index + 1} {config}, {k}/connection: {result['rate']:.1f} msg/s "
                          f"({result['accepted']} accepted, {result['failed']} failed)", flush=True)
        # Every message is from a partner with STARTTLS: the daemons found connector bench-in and
        # judged it (a pass, logged at INFO); count their lines to show they were in the path.
        out["policyd_decisions"] = (work / "postfix-policyd.log").read_text().count("connector=bench-in")
        out["milter_decisions"] = (work / "postfix-milter.log").read_text().count("connector=bench-in")
        # Outside its configurations an add-on only waits (tlsgate's daemons also poll their rules
        # every 2 s): its CPU time over the messages it saw is its cost per message, the share it
        # takes from Postfix on the shared cores.
        sent = {config: runs * WARM_UP + sum(r["accepted"] + r["failed"] for rows in modes.values() for r in rows)
                for config, modes in out["results"].items()}
        seen = {name: sum(sent.get(config, 0) for config in CONFIGS if name in ADD_ONS[config])
                for name in by_name}
        out["cpu_us_per_message"] = {
            name: 1e6 * (_cpu_seconds(child) - before) / seen[name]
            for name, child, before in zip(by_name, children, cpu_before, strict=True) if seen[name]
        }
        return out
    finally:
        instance.stop()
        for child in children:
            child.stop()
        shutil.rmtree(pki_dir, ignore_errors=True)
