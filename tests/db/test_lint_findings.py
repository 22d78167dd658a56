"""What `tlsgate lint` and the loader must tell an administrator that they used to keep quiet:
connectors that tie with different requirements, an outbound ``fingerprint`` connector without
a certificate, a lost ``rules_generation`` row, a MariaDB server that is not strict, and
database URLs or databases tlsgate cannot use, each as one clear line."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from tests.support.pki import Pki
from tests.support.rulesdb import load_unchecked, make_rules_db
from tlsgate import store
from tlsgate.cli.lint import cmd_lint, tie_warnings
from tlsgate.config import Config, DatabaseConfig
from tlsgate.outbound import OutboundIndex
from tlsgate.rules import RuleHolder
from tlsgate.socketmap import Reply, Status
from tlsgate.store import StoreError, init_schema, load, open_engine, server_warnings, sql_mode_warning

EXAMPLES = (Path(__file__).resolve().parents[2] / "sql" / "examples.sql").read_text()


def lint(url: str, capsys: pytest.CaptureFixture[str], strict: bool = False) -> tuple[int, list[str]]:
    """``tlsgate lint`` on ``url``: its exit status and its lines."""
    # What cmd_lint reads of the CLI's context: the engine and the configuration.
    ctx = SimpleNamespace(engine=open_engine(url), config=Config(database=DatabaseConfig(url=url)))
    try:
        status = cmd_lint(argparse.Namespace(expiry_days=30, dns=False, strict=strict), ctx)  # type: ignore[arg-type]
    finally:
        ctx.engine.dispose()
    return status, capsys.readouterr().out.splitlines()


def examples_with(tmp_path: Path, sql: str, name: str = "rules.sqlite") -> str:
    """A SQLite rule database of sql/examples.sql and then ``sql``; its URL."""
    return make_rules_db(tmp_path / name, EXAMPLES + sql)


def ties(tmp_path: Path, sql: str) -> list[str]:
    engine = open_engine(examples_with(tmp_path, sql))
    try:
        return [str(p) for p in tie_warnings(load(engine).snapshot)]
    finally:
        engine.dispose()


# ---------------------------------------------------------------- 1. ties


def test_a_catch_all_for_every_sender_that_outranks_recipient_and_range_connectors_is_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A sender scope ranks first, even '*': with an enforcing catch-all in force, bank-rcpt's
    # trusted certificate is asked only of the null sender.
    sql = ("INSERT INTO inbound_connector (name) VALUES ('all-senders-tls');"
           "INSERT INTO inbound_domain VALUES ('all-senders-tls', 'sender', '*');"
           "INSERT INTO inbound_connector (name, certificate) VALUES ('bank-rcpt', 'trusted');"
           "INSERT INTO inbound_domain VALUES ('bank-rcpt', 'recipient', 'bank.test');"
           "INSERT INTO inbound_connector (name) VALUES ('same-rcpt');"  # asks what the catch-all asks
           "INSERT INTO inbound_domain VALUES ('same-rcpt', 'recipient', 'same.test');")
    status, lines = lint(examples_with(tmp_path, sql), capsys)
    assert lines[:-1] == [
        "warning: inbound_connector ('bank-rcpt') column name: connector all-senders-tls covers every sender "
        "('*') and a sender scope ranks first, so bank-rcpt, scoped by recipients alone, decides only for the "
        "null sender <>; give bank-rcpt the sender pattern '*' too, so that it ranks above all-senders-tls for "
        "its own mail"], lines
    assert status == 0
    # A '*' sender connector with another scope covers only the mail of that scope.
    narrow = sql.replace("'all-senders-tls', 'sender', '*');", "'all-senders-tls', 'sender', '*');"
                         "INSERT INTO inbound_domain VALUES ('all-senders-tls', 'recipient', 'other.test');")
    assert lint(examples_with(tmp_path, narrow, "narrow.sqlite"), capsys)[1][:-1] == []
    # As the warning says: with the sender pattern '*' as well, bank-rcpt ranks first for its mail.
    fixed = sql + "INSERT INTO inbound_domain VALUES ('bank-rcpt', 'sender', '*');"
    assert lint(examples_with(tmp_path, fixed, "fixed.sqlite"), capsys)[1][:-1] == []


def test_a_weaker_inbound_connector_winning_a_tie_by_name_is_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql = ("INSERT INTO inbound_connector (name, require_tls) VALUES ('a-contoso', FALSE);"
           "INSERT INTO inbound_domain VALUES ('a-contoso', 'sender', 'contoso.com');")
    url = examples_with(tmp_path, sql)
    status, lines = lint(url, capsys)
    assert lines[:-1] == [
        "warning: inbound_domain ('contoso-in', 'sender', 'contoso.com') column pattern: ties with inbound "
        "connector a-contoso (sender contoso.com: the same rank) and their requirements differ: a-contoso wins "
        "because its name sorts first, so contoso-in's requirements never apply to that mail; make one pattern "
        "more specific, or disable one of them"]
    assert lines[-1].endswith("0 errors, 1 warnings") and status == 0
    assert lint(url, capsys, strict=True)[0] == 1


def test_a_weaker_outbound_connector_winning_a_tie_by_name_is_a_warning(tmp_path: Path) -> None:
    sql = ("INSERT INTO outbound_connector (name, tls_level) VALUES ('a-contoso-out', 'encrypt');"
           "INSERT INTO outbound_domain VALUES ('a-contoso-out', 'contoso.com');")
    assert ties(tmp_path, sql) == [
        "warning: outbound_domain ('contoso-out', 'contoso.com') column pattern: ties with outbound connector "
        "a-contoso-out (the same recipient domain pattern) and their TLS policies or smart hosts differ: "
        "a-contoso-out wins because its name sorts first, so contoso-out's settings never apply to mail for "
        "contoso.com; remove the pattern from one of them, or disable one"]


@pytest.mark.parametrize("sql", [
    # the same requirements: whichever wins, the mail is held to the same
    "INSERT INTO inbound_connector (name, comment, require_tls, min_tls_version, require_forward_secrecy, on_failure) "
    "VALUES ('a-contoso', 'a twin', TRUE, 'TLSv1.2', TRUE, 'reject');"
    "INSERT INTO inbound_domain VALUES ('a-contoso', 'sender', 'contoso.com');",
    # disabled
    "INSERT INTO inbound_connector (name, enabled, require_tls) VALUES ('a-contoso', FALSE, FALSE);"
    "INSERT INTO inbound_domain VALUES ('a-contoso', 'sender', 'contoso.com');",
    # a second scope ranks above: the specific connector overrides on purpose
    "INSERT INTO inbound_connector (name, require_tls) VALUES ('a-contoso', FALSE);"
    "INSERT INTO inbound_domain VALUES ('a-contoso', 'sender', 'contoso.com');"
    "INSERT INTO inbound_domain VALUES ('a-contoso', 'recipient', 'example.org');",
    # a trial in monitor mode that wins lets the enforcing connector judge first
    "INSERT INTO inbound_connector (name, mode, min_tls_version) VALUES ('a-trial', 'monitor', 'TLSv1.3');"
    "INSERT INTO inbound_domain VALUES ('a-trial', 'sender', 'contoso.com');",
    # an outbound twin
    "INSERT INTO outbound_connector (name, tls_level, min_tls_version) VALUES ('a-out', 'secure', 'TLSv1.2');"
    "INSERT INTO outbound_domain VALUES ('a-out', 'contoso.com');"
    "INSERT INTO outbound_match_name VALUES ('a-out', 'mail.contoso.com');"
    "INSERT INTO outbound_smart_host (connector, host, port) VALUES ('a-out', 'relay.contoso.com', 25);",
])
def test_ties_that_change_nothing_are_not_reported(tmp_path: Path, sql: str) -> None:
    assert ties(tmp_path, sql) == []


def test_ties_by_client_range_and_in_every_scope_are_reported_once_per_pair(tmp_path: Path) -> None:
    sql = ("INSERT INTO inbound_connector (name, require_tls) VALUES ('r1', FALSE), ('r2', TRUE);"
           "INSERT INTO inbound_address VALUES ('r1', '198.51.100.0/24'), ('r2', '198.51.100.0/24');"
           "INSERT INTO inbound_connector (name, on_failure) VALUES ('s1', 'defer'), ('s2', 'reject');"
           "INSERT INTO inbound_domain VALUES ('s1', 'sender', 'x.test'), ('s1', 'recipient', 'y.test'),"
           " ('s2', 'sender', 'x.test'), ('s2', 'recipient', 'y.test'), ('s2', 'recipient', 'z.test');")
    found = ties(tmp_path, sql)
    assert [w.split(" column ")[0] for w in found] == [
        "warning: inbound_address ('r2', '198.51.100.0/24')",
        "warning: inbound_domain ('s2', 'sender', 'x.test')"]
    assert "(sender x.test, recipient y.test: the same rank)" in found[1]


def test_tie_warnings_stay_linear(tmp_path: Path) -> None:
    # 100,000 enabled connectors in pairs on one pattern each: grouped by pattern, not compared
    # pairwise (which would take hours, not seconds).
    from tlsgate.model import InboundConnector
    from tlsgate.patterns import DomainPattern
    from tlsgate.snapshot import Snapshot

    inbound = tuple(InboundConnector(f"c{i:06d}", sender_domains=(DomainPattern.parse(f"d{i // 2}.test"),),
                                     require_tls=i % 4 != 1) for i in range(100_000))
    found = list(tie_warnings(Snapshot(inbound=inbound, outbound=())))
    assert len(found) == 25_000


# ---------------------------------------------------------------- 3. fingerprint without a certificate


def test_fingerprint_connector_without_a_certificate_is_misconfigured_until_one_is_registered(tmp_path: Path) -> None:
    result = load_unchecked(tmp_path / "r.sqlite",
                            "INSERT INTO outbound_connector (name, tls_level) VALUES ('o8', 'fingerprint')",
                            "INSERT INTO outbound_domain VALUES ('o8', '*')")
    assert [str(p) for p in result.errors] == [
        "error: outbound_connector ('o8') column tls_level: is 'fingerprint' but no certificate is registered for "
        "inbound connector o8 (inbound_certificate), whose certificates it pins: mail it covers is deferred "
        "until one is"]
    assert result.snapshot.outbound[0].problems
    answer = OutboundIndex(result.snapshot).tls_policy("example.com")
    assert answer.reply.status is Status.TEMP and answer.connector == "o8"

    # A certificate registered later is seen by the next load.
    pki = Pki(tmp_path / "pki")
    engine = open_engine(f"sqlite:///{tmp_path / 'r.sqlite'}")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO inbound_connector (name, certificate, enabled) VALUES ('o8', 'pinned', FALSE)"))
        conn.execute(text("INSERT INTO inbound_certificate (connector, pem) VALUES ('o8', :pem)"),
                     {"pem": pki.partner.cert_path.read_text()})
    result = load(engine)
    engine.dispose()
    assert [p for p in result.errors] == []
    assert OutboundIndex(result.snapshot).tls_policy("example.com").reply == Reply(
        Status.OK, f"fingerprint match={pki.partner.pubkey_fingerprint}|{pki.partner.fingerprint}")


def test_a_disabled_fingerprint_connector_without_a_certificate_is_no_error(tmp_path: Path) -> None:
    result = load_unchecked(tmp_path / "r.sqlite",
                            "INSERT INTO outbound_connector (name, tls_level, enabled) VALUES ('o8', 'fingerprint', 0)",
                            "INSERT INTO outbound_domain VALUES ('o8', 'o8.test')")
    assert result.errors == []


# ---------------------------------------------------------------- 4. MariaDB compares text byte for byte


@pytest.mark.mariadb
@pytest.mark.parametrize("statement", [
    "INSERT INTO inbound_connector (name, mode) VALUES ('m1', 'Monitor')",
    "INSERT INTO inbound_domain VALUES ('M5', 'Sender', 'm1.test')",
    "INSERT INTO inbound_domain VALUES ('m5', 'sender', 'm5.test')",  # the parent is 'M5'
    "INSERT INTO outbound_connector (name, tls_level) VALUES ('o1', 'Secure')",
])
def test_mariadb_refuses_values_in_the_wrong_case(mariadb_url: str, statement: str) -> None:
    engine = open_engine(mariadb_url)
    try:
        init_schema(engine)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO inbound_connector (name) VALUES ('M5')"))
        with pytest.raises(DBAPIError), engine.begin() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


# ---------------------------------------------------------------- 5. MariaDB strict mode


@pytest.mark.parametrize(("mode", "strict"), [
    ("STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION", True),
    ("STRICT_ALL_TABLES", True),
    ("", False),
    ("ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION", False),
])
def test_sql_mode_without_strict_mode_is_a_warning(mode: str, strict: bool) -> None:
    warning = sql_mode_warning(mode)
    assert (warning is None) is strict
    if warning:
        assert "require_tls = 'yes' becomes 0" in warning and "STRICT_TRANS_TABLES" in warning


@pytest.mark.mariadb
def test_lint_warns_on_a_mariadb_server_not_in_strict_mode(
        mariadb_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    engine = open_engine(mariadb_url)
    init_schema(engine)
    assert server_warnings(engine) == []  # the test server runs in its default, strict mode
    engine.dispose()
    # The server's global mode is shared with every other test: the non-strict answer is faked.
    monkeypatch.setattr(store, "_global_sql_mode", lambda engine: "NO_ENGINE_SUBSTITUTION")
    status, lines = lint(mariadb_url, capsys)
    assert lines[0].startswith("warning: the MariaDB server's sql_mode (NO_ENGINE_SUBSTITUTION) has neither")
    assert lines[-1].endswith("0 errors, 1 warnings") and status == 0


def test_other_databases_have_no_sql_mode(tmp_path: Path) -> None:
    engine = open_engine(make_rules_db(tmp_path / "r.sqlite"))
    assert server_warnings(engine) == []
    engine.dispose()


# ---------------------------------------------------------------- 6. malformed database URLs

BAD_URLS = [
    ("sqlite://relative.sqlite", "invalid database URL sqlite://relative.sqlite: Invalid SQLite URL"),
    ("postgresql://postgres:s3cret@127.0.0.1:notaport/revb",
     "invalid database URL postgresql://postgres:***@127.0.0.1:notaport/revb: "),
    ("postgresql://postgres@[::1/revb", "invalid database URL postgresql://postgres@[::1/revb: "),
    ("mariadb://root:s3cret@127.0.0.1/revb?connect_timeout=abc",
     "invalid database URL mariadb://root:***@127.0.0.1/revb?connect_timeout=abc: "),
]


@pytest.mark.parametrize(("url", "message"), BAD_URLS)
def test_a_malformed_database_url_is_one_line_without_password(url: str, message: str) -> None:
    with pytest.raises(StoreError) as caught:
        open_engine(url)
    assert str(caught.value).startswith(message)
    assert "s3cret" not in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("url", "message"), BAD_URLS)
def test_a_daemon_with_a_malformed_database_url_logs_one_line_and_fails_closed(
        url: str, message: str, caplog: pytest.LogCaptureFixture) -> None:
    holder = RuleHolder(DatabaseConfig(url=url))
    with caplog.at_level(logging.ERROR, logger="tlsgate.rules"):
        assert holder.refresh() is False
        assert holder.refresh(force=True) is False
    assert holder.snapshot is None and not holder.healthy
    (record,) = caplog.records  # once per outage, not once per poll
    assert record.getMessage().startswith(f"cannot load rules: {message}")
    assert record.getMessage().endswith("; answering temporary failures until it can")
    assert record.exc_info is None and "s3cret" not in record.getMessage()


# Finding: a password holding an unescaped '@' was shown in part, SQLAlchemy ending it at its
# first '@' and reading the rest as the host ("tlsgate:***@ss@db.example"), and so were the
# messages that quote that host or a port read from it.

SECRET = "Pa55@W0rd@T4il"  # what of it is password: every piece between its '@'
PIECES = SECRET.split("@")

MASKED_URLS = [
    (f"postgresql://tlsgate:{SECRET}@db.example/rules", "postgresql://tlsgate:***@db.example/rules"),
    (f"mariadb+pymysql://tlsgate:{SECRET}@db.example:3306/rules?charset=utf8mb4",
     "mariadb+pymysql://tlsgate:***@db.example:3306/rules?charset=utf8mb4"),
    (f"postgresql://tlsgate:{SECRET}@[2001:db8::5]:5432/rules", "postgresql://tlsgate:***@[2001:db8::5]:5432/rules"),
    (f"postgresql://tlsgate@server:{SECRET}@db.example/rules", "postgresql://tlsgate@server:***@db.example/rules"),
    (f"postgresql://tlsgate:{SECRET}@db.example:notaport/rules", "postgresql://tlsgate:***@db.example:notaport/rules"),
    # as before: an escaped '@', and one in the user name only
    ("postgresql://tlsgate:Pa55%40W0rd%40T4il@db.example/rules", "postgresql://tlsgate:***@db.example/rules"),
    ("postgresql://tlsgate@server:Pa55W0rdT4il@db.example/rules", "postgresql://tlsgate@server:***@db.example/rules"),
    # an '@' then a '/' or '?' in the password: the host SQLAlchemy reads has no '@'
    ("postgresql://tlsgate:Pa55@W0rd/T4il@db.example/rules", "postgresql://tlsgate:***@db.example/rules"),
]


def test_a_password_with_an_at_then_a_question_mark_is_masked() -> None:
    # Parsed, nothing of it is left to tell (the rest is a query without a value): the daemons
    # and the CLI refuse such a URL before any URL object is made of it (normalise_url).
    url = "postgresql://tlsgate:Pa55@W0rd?T4il@db.example/rules"
    assert store.safe_url(url) == "postgresql://tlsgate:***@db.example/rules"
    with pytest.raises(StoreError, match="the password holds an '@'"):
        open_engine(url)


@pytest.mark.parametrize(("url", "masked"), MASKED_URLS)
def test_safe_url_shows_no_part_of_a_password_holding_an_at(url: str, masked: str) -> None:
    assert store.safe_url(url) == masked
    try:
        parsed = make_url(url)
    except ValueError:
        return  # no URL object: the port is no number
    # engine.url: what SQLAlchemy took for the password and the host
    assert not any(piece in store.safe_url(parsed) for piece in PIECES)


@pytest.mark.parametrize(("url", "message"), [
    (f"postgresql://tlsgate:{SECRET}@127.0.0.1:notaport/rules",
     "invalid database URL postgresql://tlsgate:***@127.0.0.1:notaport/rules: "),
    # the port SQLAlchemy reads from the password's rest is quoted in its message
    ("postgresql://tlsgate:Pa55@W0rd:T4il@127.0.0.1/rules",
     "invalid database URL postgresql://tlsgate:***@127.0.0.1/rules: invalid literal for int() with base 10: "
     "'***@127.0.0.1'"),
    (f"mariadb://tlsgate:{SECRET}@127.0.0.1/rules?connect_timeout=abc",
     "invalid database URL mariadb://tlsgate:***@127.0.0.1/rules?connect_timeout=abc: "),
    (f"oracle://tlsgate:{SECRET}@db.example/rules",
     "invalid database URL oracle://tlsgate:***@db.example/rules: the password holds an '@': write it as %40"),
    # a URL that parses: refused all the same, since it would reach a host made of the password
    (f"postgresql://tlsgate:{SECRET}@127.0.0.1/rules",
     "invalid database URL postgresql://tlsgate:***@127.0.0.1/rules: the password holds an '@': write it as %40"),
    ("postgresql://tlsgate:Pa55@W0rd/T4il@127.0.0.1/rules",
     "invalid database URL postgresql://tlsgate:***@127.0.0.1/rules: the password holds an '@'"),
])
def test_an_unusable_url_with_an_at_in_its_password_shows_no_part_of_it(url: str, message: str) -> None:
    with pytest.raises(StoreError) as caught:
        open_engine(url)
    assert str(caught.value).startswith(message)
    assert not any(piece in str(caught.value) for piece in PIECES)


@pytest.mark.parametrize("scheme", ["postgresql", "mariadb"])
def test_a_daemon_that_cannot_reach_such_a_database_logs_no_part_of_the_password(
        scheme: str, caplog: pytest.LogCaptureFixture) -> None:
    """Read as written, the rest of the password would be the host, which the driver's message
    names: the URL is refused as invalid, with no part of the password."""
    holder = RuleHolder(DatabaseConfig(url=f"{scheme}://tlsgate:{SECRET}@127.0.0.1:1/rules", connect_timeout=2))
    with caplog.at_level(logging.INFO, logger="tlsgate"):
        assert holder.refresh() is False
    assert holder.snapshot is None and not holder.healthy
    assert "127.0.0.1" in caplog.text and "***@" in caplog.text
    assert not any(piece in caplog.text for piece in PIECES), caplog.text


# ---------------------------------------------------------------- 7. the rules_generation row


def test_lint_reports_a_missing_rules_generation_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, lines = lint(examples_with(tmp_path, "DELETE FROM rules_generation;"), capsys)
    assert lines[0] == ("error: rules_generation: has no row id = 1: run `tlsgate db upgrade`, "
                        "which restores it")
    assert status == 1


# ---------------------------------------------------------------- 10. a database without the schema


def test_a_database_without_the_schema_says_to_run_db_init(db_url: str) -> None:
    engine = open_engine(db_url)
    try:
        with pytest.raises(StoreError) as caught:
            load(engine)
        with pytest.raises(StoreError) as polled:
            store.read_generation(engine)
    finally:
        engine.dispose()
    for exc in (caught.value, polled.value):
        assert "no tlsgate schema (" in str(exc) and str(exc).endswith("run `tlsgate db init`")
        assert "rules_generation" in str(exc)


@pytest.mark.mariadb
def test_doctor_warns_on_a_mariadb_server_not_in_strict_mode(mariadb_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tlsgate.cli.postfix import diagnose

    engine = open_engine(mariadb_url)
    init_schema(engine)
    monkeypatch.setattr(store, "_global_sql_mode", lambda engine: "")
    try:
        found = diagnose(Config(), {}, SimpleNamespace(engine=engine))  # type: ignore[arg-type]
    finally:
        engine.dispose()
    assert [f.severity for f in found if "sql_mode (empty) has neither" in f.what] == ["warning"]
