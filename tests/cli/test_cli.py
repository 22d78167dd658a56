"""The tlsgate command as an administrator runs it: output, exit status, and one-line errors."""

from __future__ import annotations

import os
import pathlib
import sqlite3
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = str(ROOT / "sql" / "examples.sql")
TLSGATE = str(pathlib.Path(sys.executable).parent / "tlsgate")


def tlsgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script in a child, as an administrator would."""
    return subprocess.run([TLSGATE, *args], capture_output=True, text=True, env=env, cwd="/")


@pytest.fixture
def db(tmp_path: pathlib.Path) -> str:
    url = f"sqlite:///{tmp_path}/rules.sqlite"
    r = tlsgate("--database-url", url, "db", "init", "--examples", EXAMPLES)
    assert r.returncode == 0, r.stderr
    assert "created tlsgate schema version 1" in r.stdout
    return url


def test_explain_shows_candidates_checks_and_verdict(db: str) -> None:
    r = tlsgate("--database-url", db, "explain", "--client", "203.0.113.5", "--sender", "a@mail.contoso.com",
                "--recipient", "b@example.org", "--tls-protocol", "TLSv1.2", "--cipher", "AES256-GCM-SHA384")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "* contoso-in: matched sender domain mail.contoso.com" in out
    assert "[pass] TLS: TLS used (TLSv1.2)" in out
    assert "[pass] TLS version: TLSv1.2 meets the minimum TLSv1.2" in out
    assert "[FAIL] forward secrecy: cipher AES256-GCM-SHA384 lacks forward secrecy" in out
    assert out.rstrip().endswith("verdict: REJECT 5.7.10 cipher AES256-GCM-SHA384 lacks forward secrecy")


def test_explain_judges_the_header_from_as_the_milter_does(db: str) -> None:
    """A sender connector for ``*`` wins at RCPT; the header-From connector is judged at end of
    message all the same, and its refusal is the verdict."""
    path = db.removeprefix("sqlite:///")
    with sqlite3.connect(path) as con:
        con.executescript("""
            INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('all-tls', 1, 'defer');
            INSERT INTO inbound_domain VALUES ('all-tls', 'sender', '*');
            INSERT INTO inbound_connector (name, require_tls, certificate, on_failure)
                VALUES ('bank-hdr', 1, 'trusted', 'reject');
            INSERT INTO inbound_domain VALUES ('bank-hdr', 'header_from', 'bank.test');
            INSERT INTO inbound_cert_name VALUES ('bank-hdr', 'subject', 'mx.bank.test');
        """)
    con.close()
    session = ["--database-url", db, "explain", "--client", "203.0.113.5", "--sender", "x@spoofer.test",
               "--recipient", "b@example.org", "--tls-protocol", "TLSv1.3"]
    r = tlsgate(*session, "--header-from", "ceo@bank.test")
    assert r.returncode == 0, r.stderr
    rcpt, end = r.stdout.split("at end of message")
    assert "* all-tls: matched sender domain spoofer.test" in rcpt and "verdict: PASS" in rcpt
    assert "bank-hdr" not in rcpt
    assert "* bank-hdr: matched header From domain bank.test" in end
    assert r.stdout.rstrip().splitlines()[-1].startswith("verdict: REJECT 5.7.")
    other = tlsgate(*session, "--header-from", "ceo@else.test")
    assert other.stdout.rstrip().splitlines()[-1] == "verdict: PASS"


def test_explain_no_connector_is_opportunistic(db: str) -> None:
    r = tlsgate("--database-url", db, "explain", "--client", "203.0.113.5", "--sender", "a@else.test",
                "--recipient", "b@example.org")
    assert r.returncode == 0
    assert "no connector applies (opportunistic TLS)" in r.stdout
    assert r.stdout.rstrip().endswith("verdict: PASS")


def test_explain_shows_an_override(db: str, tmp_path: pathlib.Path) -> None:
    con = sqlite3.connect(f"{tmp_path}/rules.sqlite")
    con.executescript("INSERT INTO inbound_connector (name, require_tls) VALUES ('contoso-eu', 0);"
                      "INSERT INTO inbound_domain VALUES ('contoso-eu', 'sender', 'eu.contoso.com');")
    con.commit()
    con.close()
    r = tlsgate("--database-url", db, "explain", "--client", "203.0.113.5", "--sender", "a@eu.contoso.com",
                "--recipient", "b@example.org")
    assert "winner: contoso-eu, overriding contoso-in" in r.stdout
    assert r.stdout.rstrip().endswith("verdict: PASS")


def test_explain_shows_a_monitor_connector_lifts_nothing(db: str, tmp_path: pathlib.Path) -> None:
    # contoso-in (sender *.contoso.com, TLS required) stays in force behind a monitor-mode
    # connector for one of its subdomains.
    con = sqlite3.connect(f"{tmp_path}/rules.sqlite")
    con.executescript("INSERT INTO inbound_connector (name, mode, require_tls) VALUES ('contoso-eu', 'monitor', 0);"
                      "INSERT INTO inbound_domain VALUES ('contoso-eu', 'sender', 'eu.contoso.com');")
    con.commit()
    con.close()
    r = tlsgate("--database-url", db, "explain", "--client", "203.0.113.5", "--sender", "a@eu.contoso.com",
                "--recipient", "b@example.org")
    assert "    contoso-eu [monitor]: matched sender domain eu.contoso.com" in r.stdout
    assert "  * contoso-in: matched sender domain eu.contoso.com" in r.stdout
    assert "winner: contoso-in, enforcing: contoso-eu is in monitor mode and lifts no requirement" in r.stdout
    assert r.stdout.rstrip().endswith("verdict: REJECT 5.7.10 TLS required by connector contoso-in")


def test_explain_monitor_mode(db: str) -> None:
    r = tlsgate("--database-url", db, "explain", "--client", "203.0.113.5", "--sender", "a@woodgrovebank.com",
                "--recipient", "b@example.org")
    assert "[monitor]" in r.stdout
    assert "verdict: MONITOR-DEFER 4.7.10 TLS required by connector woodgrove-in" in r.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--client", "not-an-ip"], "--client 'not-an-ip' is not an IPv4 or IPv6 address"),
    (["--client", "192.0.2.1", "--cipher", "X"], "--cipher and certificate options need --tls-protocol"),
    (["--client", "192.0.2.1", "--tls-protocol", "TLSv1.3", "--cipher-bits", "-5"], "--cipher-bits must not be negative"),
])
def test_explain_bad_input_is_one_line(db: str, args: list[str], message: str) -> None:
    r = tlsgate("--database-url", db, "explain", *args)
    assert r.returncode == 2
    assert r.stderr.strip() == f"tlsgate: {message}"


def test_lint_clean_and_with_errors(db: str, tmp_path: pathlib.Path) -> None:
    r = tlsgate("--database-url", db, "lint")
    assert r.returncode == 0
    assert "4 inbound and 1 outbound connectors checked: 0 errors, 0 warnings" in r.stdout
    con = sqlite3.connect(f"{tmp_path}/rules.sqlite")
    con.executescript("PRAGMA ignore_check_constraints = ON;"
                      "INSERT INTO inbound_domain VALUES ('contoso-in', 'sender', 'exa mple.com');"
                      "UPDATE inbound_connector SET on_failure = 'bounce' WHERE name = 'fabrikam-in';"
                      "INSERT INTO inbound_connector (name) VALUES ('lonely');")
    con.commit()
    con.close()
    r = tlsgate("--database-url", db, "lint")
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert "error: inbound_domain ('contoso-in', 'sender', 'exa mple.com') column pattern: invalid domain 'exa mple.com': bad label 'exa mple'" in lines
    assert "error: inbound_connector ('fabrikam-in') column on_failure: 'bounce' is not one of reject, defer" in lines
    assert any(line.startswith("warning: inbound_connector ('lonely')") and "matches no mail" in line for line in lines)
    assert lines[-1].endswith("2 errors, 1 warnings")


@pytest.mark.parametrize("pinned_action", ["tempfail", "policyd"])
def test_lint_warns_that_a_pinned_header_from_connector_is_deferred(db: str, tmp_path: pathlib.Path,
                                                                     pinned_action: str) -> None:
    with sqlite3.connect(f"{tmp_path}/rules.sqlite") as con:
        con.executescript("INSERT INTO inbound_connector (name, certificate) VALUES ('bank', 'pinned');"
                          "INSERT INTO inbound_domain VALUES ('bank', 'header_from', 'bank.test');")
    con.close()
    config = tmp_path / "tlsgate.conf"
    config.write_text(f"[database]\nurl = {db}\n[milter]\npinned_action = {pinned_action}\n")
    r = tlsgate("-c", str(config), "lint")
    bank = [line for line in r.stdout.splitlines()
            if line.startswith("warning: inbound_connector ('bank')") and "defers this connector's mail" in line]
    assert len(bank) == 1, r.stdout + r.stderr


def test_a_row_that_is_not_utf8_is_named_whatever_the_terminal(db: str, tmp_path: pathlib.Path) -> None:
    with sqlite3.connect(f"{tmp_path}/rules.sqlite") as con:  # "Caé" in Latin-1
        con.execute("INSERT INTO inbound_cert_name VALUES ('contoso-in', 'issuer', CAST(x'4361e9' AS TEXT))")
    con.close()
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    r = tlsgate("--database-url", db, "lint", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert ("error: inbound_cert_name ('contoso-in', 'issuer', 'Ca\\udce9') column pattern: is not valid UTF-8 text"
            in r.stdout), r.stdout
    shown = tlsgate("--database-url", db, "connector", "show", "contoso-in", env=env)
    assert "Traceback" not in shown.stderr, shown.stderr


def test_connector_list_and_show(db: str) -> None:
    r = tlsgate("--database-url", db, "connector", "list")
    assert r.returncode == 0
    assert r.stdout.splitlines()[0].split()[:4] == ["inbound", "contoso-in", "enforce", "reject"]
    r = tlsgate("--database-url", db, "connector", "show", "onprem-in")
    assert "client ranges:      192.0.2.0/24, 2001:db8:25::/48 (restricts the domains to these ranges)" in r.stdout
    r = tlsgate("--database-url", db, "connector", "show", "nope")
    assert r.returncode == 1 and r.stderr.strip() == "tlsgate: no connector named 'nope' (see `tlsgate connector list`)"


def test_schema_command_prints_the_ddl() -> None:
    r = tlsgate("db", "schema", "--dialect", "postgresql")
    assert r.returncode == 0
    assert r.stdout == (ROOT / "sql" / "postgresql.sql").read_text()


def test_db_init_twice_and_upgrade(db: str) -> None:
    r = tlsgate("--database-url", db, "db", "init")
    assert r.returncode == 0 and "already has a tlsgate schema" in r.stdout
    r = tlsgate("--database-url", db, "db", "upgrade")
    assert r.returncode == 0 and "schema is at version 1" in r.stdout


@pytest.mark.parametrize(("url", "secrets"), [
    ("postgresql://tlsgate:s3cret@127.0.0.1:1/rules", ["s3cret"]),
    # An unescaped '@' in the password: SQLAlchemy reads the rest as the host, which the
    # driver's message names; no piece of the password may show.
    ("postgresql://tlsgate:Pa55@W0rd@T4il@127.0.0.1:1/rules", ["Pa55", "W0rd", "T4il"]),
    ("mariadb://tlsgate:Pa55@W0rd@T4il@127.0.0.1:1/rules", ["Pa55", "W0rd", "T4il"]),
    ("postgresql://u:p@zq9@127.0.0.1:1/x", ["zq9"]),
    ("postgresql://u:S3cret@Pa5s/w0rd?Ta1l9@127.0.0.1:1/x", ["S3cret", "Pa5s", "w0rd", "Ta1l9"]),
])
@pytest.mark.parametrize("command", [["lint"], ["db", "init"]], ids=" ".join)
def test_unreachable_database_is_one_line_without_password(url: str, secrets: list[str], command: list[str]) -> None:
    r = tlsgate("--database-url", url, *command)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1
    assert "***" in r.stderr and "127.0.0.1" in r.stderr
    assert not any(secret in r.stdout + r.stderr for secret in secrets), r.stderr


def test_missing_schema_is_one_line(tmp_path: pathlib.Path) -> None:
    r = tlsgate("--database-url", f"sqlite:///{tmp_path}/empty.sqlite", "lint")
    assert r.returncode == 1
    assert r.stderr.startswith("tlsgate: database sqlite:///") and "no such table" in r.stderr


def test_bad_url_and_bad_config(tmp_path: pathlib.Path) -> None:
    r = tlsgate("--database-url", "oracle://x/y", "lint")
    assert r.returncode == 1 and "unsupported database 'oracle'" in r.stderr
    conf = tmp_path / "tlsgate.conf"
    conf.write_text("[database]\nurl = sqlite:////tmp/x.sqlite\npoll_intervall = 3\n")
    r = tlsgate("-c", str(conf), "lint")
    assert r.returncode == 78
    assert r.stderr.strip().startswith(f"tlsgate: {conf}: [database] unknown key 'poll_intervall' (value '3')")
    conf.write_text("[database]\npoll_interval = soon\n")
    r = tlsgate("-c", str(conf), "lint")
    assert r.returncode == 78 and "[database] poll_interval = 'soon': must be a number of seconds" in r.stderr


def test_environment_overrides_the_database_url(db: str, tmp_path: pathlib.Path) -> None:
    import os

    env = dict(os.environ, TLSGATE_DATABASE_URL=db, TLSGATE_CONFIG=str(tmp_path / "none.conf"))
    (tmp_path / "none.conf").write_text("[database]\nurl = sqlite:////nonexistent/dir/x.sqlite\n")
    r = tlsgate("connector", "list", env=env)
    assert r.returncode == 0 and "contoso-in" in r.stdout


def test_connector_add_set_remove(tmp_path: pathlib.Path) -> None:
    url = f"sqlite:///{tmp_path}/rules.sqlite"
    assert tlsgate("--database-url", url, "db", "init").returncode == 0
    r = tlsgate("--database-url", url, "connector", "add", "contoso-in", "--sender", "contoso.com",
                "--sender", "*.contoso.com", "--min-tls", "TLSv1.2", "--forward-secrecy", "yes",
                "--on-failure", "reject", "--cert-name", "*.contoso.com", "--address", "192.0.2.0/24")
    assert r.returncode == 0, r.stderr
    r = tlsgate("--database-url", url, "connector", "show", "contoso-in")
    assert "sender domains:     *.contoso.com, contoso.com" in r.stdout  # loaded in key order
    assert "forward secrecy:    required" in r.stdout and "on failure:         reject" in r.stdout
    r = tlsgate("--database-url", url, "connector", "set", "contoso-in", "--mode", "monitor", "--recipient", "example.org")
    assert r.returncode == 0, r.stderr
    r = tlsgate("--database-url", url, "connector", "show", "contoso-in")
    assert "mode:               monitor" in r.stdout and "recipient domains:  example.org" in r.stdout
    assert tlsgate("--database-url", url, "lint").returncode == 0
    r = tlsgate("--database-url", url, "connector", "add", "Contoso-IN", "--sender", "x.test")
    assert r.returncode == 1 and "a connector named 'contoso-in' already exists" in r.stderr
    r = tlsgate("--database-url", url, "connector", "remove", "contoso-in")
    assert r.returncode == 0
    con = sqlite3.connect(f"{tmp_path}/rules.sqlite")
    assert con.execute("SELECT count(*) FROM inbound_domain").fetchone() == (0,)
    con.close()
    r = tlsgate("--database-url", url, "connector", "remove", "contoso-in")
    assert r.returncode == 1 and "no inbound connector named 'contoso-in'" in r.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--sender", "exa mple.com"], "argument --sender: invalid domain 'exa mple.com'"),
    (["--address", "192.0.2.1/24"], "argument --address: invalid address range '192.0.2.1/24'"),
    (["--cert-name", "m*.example.com"], "argument --cert-name: invalid certificate name pattern"),
    (["--sender", "a.test", "--require-tls", "maybe"], "argument --require-tls: 'maybe' is not yes or no"),
    ([], "a connector needs a scope"),
    (["--sender", "a.test", "--min-cipher-bits", "-1"], "--min-cipher-bits -1 is out of range"),
    (["--sender", "a.test", "--min-key-bits", "9" * 25], f"--min-key-bits {'9' * 25} is out of range"),
    (["--sender", "a.test", "--organization", "Org"],
     "--organization can be checked only against a pinned certificate"),
    (["--sender", "a.test", "--certificate", "trusted", "--unit", "Mail", "--min-key-bits", "3072"],
     "--unit, --min-key-bits can be checked only against a pinned certificate"),
])
def test_connector_add_refuses_bad_values(tmp_path: pathlib.Path, args: list[str], message: str) -> None:
    url = f"sqlite:///{tmp_path}/rules.sqlite"
    assert tlsgate("--database-url", url, "db", "init").returncode == 0
    r = tlsgate("--database-url", url, "connector", "add", "c1", *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_outbound_add(tmp_path: pathlib.Path) -> None:
    url = f"sqlite:///{tmp_path}/rules.sqlite"
    assert tlsgate("--database-url", url, "db", "init").returncode == 0
    r = tlsgate("--database-url", url, "outbound", "add", "contoso-out", "--domain", "contoso.com",
                "--tls-level", "secure", "--match", "mail.contoso.com", "--min-tls", "TLSv1.2",
                "--smart-host", "[relay.contoso.com]:2525")
    assert r.returncode == 0, r.stderr
    r = tlsgate("--database-url", url, "connector", "show", "contoso-out")
    assert "smart hosts:        relay.contoso.com:2525" in r.stdout and "TLS level:          secure" in r.stdout
    r = tlsgate("--database-url", url, "outbound", "add", "x", "--domain", "a.test", "--smart-host", "h:99999")
    assert r.returncode == 2 and "--smart-host 'h:99999' is not HOST, HOST:PORT or [HOST]:PORT" in r.stderr
    # A second name differing only in case would make both connectors misconfigured (TEMP).
    r = tlsgate("--database-url", url, "outbound", "add", "Contoso-Out", "--domain", "contoso.org")
    assert r.returncode == 1 and "an outbound connector named 'contoso-out' already exists" in r.stderr
    assert tlsgate("--database-url", url, "lint").returncode == 0


def test_connector_set_keeps_pin_only_requirements_on_pinned_connectors(tmp_path: pathlib.Path) -> None:
    url = f"sqlite:///{tmp_path}/rules.sqlite"
    assert tlsgate("--database-url", url, "db", "init").returncode == 0
    r = tlsgate("--database-url", url, "connector", "add", "p", "--sender", "p.test", "--certificate", "pinned",
                "--organization", "P Org")
    assert r.returncode == 0, r.stderr
    r = tlsgate("--database-url", url, "connector", "set", "p", "--certificate", "trusted")
    assert r.returncode == 2 and "--organization can be checked only against a pinned certificate" in r.stderr
    r = tlsgate("--database-url", url, "connector", "show", "p")
    assert "organization:       P Org" in r.stdout and "certificate:        pinned" in r.stdout
    r = tlsgate("--database-url", url, "connector", "set", "p", "--enabled", "no")
    assert r.returncode == 0, r.stderr
