"""The rows the tlsgate command writes: each one what the daemons would load without a problem,
in the spelling they compare, and every refusal one line with a status scripts can rely on.
Run through `tlsgate.cli.main` in-process against a database of each kind."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tlsgate.cli import build_parser, main
from tlsgate.cli.db import split_sql
from tlsgate.store import (
    MISSING_GENERATION,
    open_engine,
    read_generation,
    schema_script,
    schema_statements,
)

# Nothing in /etc/tlsgate or the environment counts.
pytestmark = pytest.mark.usefixtures("own_config")


class Cli:
    """``tlsgate --database-url URL ...`` in-process: the status, stdout and stderr."""

    def __init__(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url = url
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        try:
            status = main(["--database-url", self.url, *args])
        except SystemExit as exc:  # argparse's refusals
            status = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err
        return status, out, err


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    run = Cli(f"sqlite:///{tmp_path}/rules.sqlite", capsys)
    assert run("db", "init")[0] == 0
    return run


def rows(cli: Cli, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(cli.url.removeprefix("sqlite:///")) as con:
        return con.execute(sql).fetchall()


def assert_lint_clean(cli: Cli) -> None:
    status, out, err = cli("lint")
    assert status == 0, out + err


# Finding: `connector remove` deleted the outbound connector of the same name too.

def test_connector_remove_keeps_the_outbound_connector_of_the_same_name(cli: Cli) -> None:
    assert cli("connector", "add", "contoso", "--sender", "contoso.test")[0] == 0
    assert cli("outbound", "add", "contoso", "--domain", "contoso.test")[0] == 0
    status, out, _ = cli("connector", "remove", "contoso")
    assert status == 0 and out.strip() == "removed inbound connector contoso"
    assert rows(cli, "SELECT name FROM inbound_connector") == []
    assert rows(cli, "SELECT count(*) FROM inbound_domain") == [(0,)]
    assert rows(cli, "SELECT name FROM outbound_connector") == [("contoso",)]
    assert rows(cli, "SELECT pattern FROM outbound_domain") == [("contoso.test",)]
    status, _, err = cli("connector", "remove", "contoso")
    assert status == 1 and err.strip() == "tlsgate: no inbound connector named 'contoso'"


def test_outbound_remove_keeps_the_inbound_connector_of_the_same_name(cli: Cli) -> None:
    assert cli("connector", "add", "contoso", "--sender", "contoso.test")[0] == 0
    assert cli("outbound", "add", "contoso", "--domain", "contoso.test", "--match", "mx.contoso.test",
               "--smart-host", "relay.contoso.test")[0] == 0
    status, out, _ = cli("outbound", "remove", "contoso")
    assert status == 0 and out.strip() == "removed outbound connector contoso"
    for table in ("outbound_connector", "outbound_domain", "outbound_match_name", "outbound_smart_host"):
        assert rows(cli, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert rows(cli, "SELECT name FROM inbound_connector") == [("contoso",)]
    status, _, err = cli("outbound", "remove", "contoso")
    assert status == 1 and err.strip() == "tlsgate: no outbound connector named 'contoso'"


# Finding: `db upgrade` did not restore a deleted rules_generation row.

def test_db_upgrade_restores_the_generation_row(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = Cli(db_url, capsys)
    assert run("db", "init")[0] == 0
    engine = open_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM rules_generation"))
        assert read_generation(engine) == MISSING_GENERATION
        status, out, _ = run("db", "upgrade")
        assert status == 0
        assert "restored the missing rules_generation row (id = 1, generation 0)" in out
        assert "nothing to do" not in out
        assert read_generation(engine) == 0
        status, out, _ = run("db", "upgrade")
        assert status == 0 and out.strip() == "schema is at version 1, the current one; nothing to do"
    finally:
        engine.dispose()


# Finding: the CLI wrote rows that lint reports as errors.

def test_restrict_to_addresses_needs_addresses(cli: Cli) -> None:
    status, _, err = cli("connector", "add", "y3", "--restrict-to-addresses", "yes", "--sender", "b.test")
    assert status == 2 and "--restrict-to-addresses yes needs the partner's client ranges" in err
    assert rows(cli, "SELECT count(*) FROM inbound_connector") == [(0,)]
    assert cli("connector", "add", "y3", "--sender", "b.test")[0] == 0
    status, _, err = cli("connector", "set", "y3", "--restrict-to-addresses", "yes")
    assert status == 2 and "give --address CIDR" in err
    assert rows(cli, "SELECT restrict_to_addresses FROM inbound_connector") == [(0,)]
    assert cli("connector", "set", "y3", "--restrict-to-addresses", "yes", "--address", "192.0.2.0/24")[0] == 0
    assert cli("connector", "set", "y3", "--restrict-to-addresses", "yes")[0] == 0  # has its range now
    assert cli("connector", "add", "y4", "--restrict-to-addresses", "yes", "--sender", "c.test",
               "--address", "198.51.100.0/24")[0] == 0
    assert_lint_clean(cli)


@pytest.mark.parametrize("name", [".bad domain", "..x", ".", ".-x.test", ".x..test"])
def test_outbound_add_refuses_a_bad_dot_match_name(cli: Cli, name: str) -> None:
    status, _, err = cli("outbound", "add", "o1", "--domain", "fab.test", "--match", name)
    assert status == 2 and err.startswith("tlsgate: ") and len(err.strip().splitlines()) == 1
    assert rows(cli, "SELECT count(*) FROM outbound_connector") == [(0,)]


def test_outbound_add_stores_a_dot_match_name_as_the_loader_reads_it(cli: Cli) -> None:
    assert cli("outbound", "add", "o1", "--domain", "fab.test", "--match", ".Fab.Test.", "--match", ".fab.test",
               "--match", "MX.fab.test")[0] == 0
    assert sorted(rows(cli, "SELECT name FROM outbound_match_name")) == [(".fab.test",), ("mx.fab.test",)]
    assert_lint_clean(cli)


# Finding: the CLI could not add IP smart hosts.

@pytest.mark.parametrize(("given", "stored"), [
    ("[192.0.2.5]:2525", ("192.0.2.5", 2525)),
    ("[192.0.2.5]", ("192.0.2.5", 25)),
    ("192.0.2.5:587", ("192.0.2.5", 587)),
    ("[2001:db8::1]:25", ("2001:db8::1", 25)),
    ("[2001:DB8:0::1]:2525", ("2001:db8::1", 2525)),
    ("[IPv6:2001:db8::1]:26", ("2001:db8::1", 26)),
    ("2001:db8::1", ("2001:db8::1", 25)),
    ("[Relay.Example.test.]:2525", ("relay.example.test", 2525)),
    ("relay.example.test", ("relay.example.test", 25)),
])
def test_outbound_add_smart_hosts(cli: Cli, given: str, stored: tuple[str, int]) -> None:
    status, _, err = cli("outbound", "add", "o1", "--domain", "fab.test", "--smart-host", given)
    assert status == 0, err
    assert rows(cli, "SELECT host, port FROM outbound_smart_host") == [stored]
    assert_lint_clean(cli)


@pytest.mark.parametrize("given", ["[192.0.2.5", "[192.0.2.5]x", "[192.0.2.5]:0", "[2001:db8::1]:99999",
                                   "192.0.2.300", "[]:25", "relay.test:x"])
def test_outbound_add_refuses_bad_smart_hosts(cli: Cli, given: str) -> None:
    status, _, err = cli("outbound", "add", "o1", "--domain", "fab.test", "--smart-host", given)
    assert status == 2 and f"--smart-host {given!r} is not HOST" in err


def test_connector_show_brackets_an_ipv6_smart_host(cli: Cli) -> None:
    assert cli("outbound", "add", "o1", "--domain", "fab.test", "--smart-host", "[2001:db8::1]:2525")[0] == 0
    assert "smart hosts:        [2001:db8::1]:2525" in cli("connector", "show", "o1")[1]


# Finding: `db init --examples` split only where a line ended with ';'.

@pytest.mark.parametrize(("script", "statements"), [
    ("INSERT INTO t VALUES ('e1'); -- first partner\nINSERT INTO t VALUES ('e2');",
     ["INSERT INTO t VALUES ('e1')", "INSERT INTO t VALUES ('e2')"]),
    ("SELECT 1; SELECT 2;SELECT 3", ["SELECT 1", "SELECT 2", "SELECT 3"]),
    ("SELECT 'a;b', 'it''s; ok'; SELECT 2", ["SELECT 'a;b', 'it''s; ok'", "SELECT 2"]),
    ('SELECT "odd;name" FROM t; SELECT `x;y`', ['SELECT "odd;name" FROM t', "SELECT `x;y`"]),
    ("SELECT 1 /* a; comment */ + 1; SELECT 2", ["SELECT 1   + 1", "SELECT 2"]),
    ("SELECT 1 -- trailing; comment\n;", ["SELECT 1"]),
    ("-- only a comment;\n; /* and; another */ ;\n", []),
    ("SELECT '-- not a comment; ', '/* nor; this */'", ["SELECT '-- not a comment; ', '/* nor; this */'"]),
    ("CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql; SELECT f()",
     ["CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql", "SELECT f()"]),
    ("DO $body$ BEGIN PERFORM 1; RAISE NOTICE '$$;'; END $body$; SELECT 1",
     ["DO $body$ BEGIN PERFORM 1; RAISE NOTICE '$$;'; END $body$", "SELECT 1"]),
    ("SELECT $1; SELECT 2", ["SELECT $1", "SELECT 2"]),
    ("BEGIN;\nINSERT INTO t VALUES (1);\nCOMMIT;\n", ["BEGIN", "INSERT INTO t VALUES (1)", "COMMIT"]),
    ("CREATE TRIGGER t AFTER INSERT ON x\nBEGIN\n  UPDATE y SET n = CASE WHEN 1 THEN 2 END;\n"
     "  DELETE FROM z;\nEND;\nSELECT 1;",
     ["CREATE TRIGGER t AFTER INSERT ON x\nBEGIN\n  UPDATE y SET n = CASE WHEN 1 THEN 2 END;\n"
      "  DELETE FROM z;\nEND", "SELECT 1"]),
    ("create temp trigger t after delete on x begin delete from y; end; select 1",
     ["create temp trigger t after delete on x begin delete from y; end", "select 1"]),
    ("CREATE TRIGGER t AFTER INSERT ON x FOR EACH ROW BEGIN IF 1 THEN SET @a = 1; END IF; END; SELECT 1",
     ["CREATE TRIGGER t AFTER INSERT ON x FOR EACH ROW BEGIN IF 1 THEN SET @a = 1; END IF; END", "SELECT 1"]),
    ("CREATE TRIGGER t AFTER INSERT ON x FOR EACH ROW BEGIN CASE WHEN 1 THEN SET @a = 1; END CASE; END; SELECT 1",
     ["CREATE TRIGGER t AFTER INSERT ON x FOR EACH ROW BEGIN CASE WHEN 1 THEN SET @a = 1; END CASE; END", "SELECT 1"]),
    ("/*!40101 SET NAMES utf8mb4 */;\nSELECT 1", ["/*!40101 SET NAMES utf8mb4 */", "SELECT 1"]),
    ("SELECT 'unterminated; here", ["SELECT 'unterminated; here"]),
])
@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mariadb"])
def test_split_sql(script: str, statements: list[str], dialect: str) -> None:
    assert split_sql(script, dialect) == statements


# Finding: a ';' in a MariaDB '#' comment split the statement; '#' is a comment there only.

@pytest.mark.parametrize(("dialect", "script", "statements"), [
    ("mariadb", "SELECT 1 # a; b\n;", ["SELECT 1"]),
    ("mysql", "SELECT 1 # a; b\n;", ["SELECT 1"]),
    ("postgresql", "SELECT 1 # a; b\n;", ["SELECT 1 # a", "b"]),
    ("sqlite", "SELECT 1 # a; b\n;", ["SELECT 1 # a", "b"]),
    ("mariadb", "# only; a comment\nSELECT 1;# trailing; it's\n#\n", ["SELECT 1"]),
    ("mariadb", "SELECT 1#no space needed; x\n+ 1; SELECT 2", ["SELECT 1\n+ 1", "SELECT 2"]),
    ("postgresql", "SELECT 5 # 3; SELECT '#;x'", ["SELECT 5 # 3", "SELECT '#;x'"]),
    ("mariadb", "SELECT 'a # b;c', \"d # e;f\", `g # h;i` # j; k\n; SELECT 2",
     ["SELECT 'a # b;c', \"d # e;f\", `g # h;i`", "SELECT 2"]),
    ("mariadb", "SELECT '#', 1; # a '; b\nSELECT 2", ["SELECT '#', 1", "SELECT 2"]),
    ("mariadb", "CREATE TRIGGER t AFTER INSERT ON x FOR EACH ROW BEGIN # the END; of it\nSET @a = 1; END; SELECT 1",
     ["CREATE TRIGGER t AFTER INSERT ON x FOR EACH ROW BEGIN \nSET @a = 1; END", "SELECT 1"]),
])
def test_split_sql_reads_a_hash_as_the_database_does(dialect: str, script: str, statements: list[str]) -> None:
    assert split_sql(script, dialect) == statements


# Pieces of a statement, each holding what a naive splitter would cut at; '#' is statement text
# in PostgreSQL (an operator) and SQLite, a comment to the end of the line in MariaDB.
_PIECES = [
    "SELECT 1", "x", "'a;b'", "'it''s; -- no'", '"odd;name"', "$$ body; $$", "$t$ a;$$ b $t$", "'/* no */'",
    "/*!40101 x */", "1 + 2", "'# no; comment'", '"#;"', "`a#;b`",
]
_SEPARATORS = [";", "; ", ";\n", "; -- note; more\n", "/* c; */;", ";\n-- only; a comment\n;"]
_DIALECT_PIECES = {"sqlite": ["x#y"], "postgresql": ["5 # 3", "x#y"], "mariadb": []}
_DIALECT_SEPARATORS = {"sqlite": [], "postgresql": [],
                       "mariadb": ["; # note; 'more\n", "# c; */\n;", ";\n#only; a comment\n;"]}


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(sorted(_DIALECT_PIECES)), st.data())
def test_split_sql_finds_the_statements_a_script_was_made_of(dialect: str, data: st.DataObject) -> None:
    pieces = st.sampled_from(_PIECES + _DIALECT_PIECES[dialect])
    statements = data.draw(st.lists(st.lists(pieces, min_size=1, max_size=4).map(" ".join), min_size=1, max_size=5))
    separators = st.sampled_from(_SEPARATORS + _DIALECT_SEPARATORS[dialect])
    script = "".join(stmt + data.draw(separators) for stmt in statements)
    assert split_sql(script, dialect) == statements


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mariadb"])
def test_split_sql_reads_the_schema_files_back(dialect: str) -> None:
    """The generated DDL (SQLite triggers with BEGIN ...; END, PostgreSQL's $$ body) splits into
    the statements it was written from."""
    def words(statements: list[str]) -> list[str]:
        return [" ".join(s.split()) for s in statements]
    assert words(split_sql(schema_script(dialect), dialect)) == words(schema_statements(dialect))


def test_db_init_examples_with_comments_after_statements_and_two_on_a_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql = tmp_path / "mine.sql"
    sql.write_text(
        "INSERT INTO inbound_connector (name) VALUES ('e1'); -- first partner\n"
        "INSERT INTO inbound_domain VALUES ('e1', 'sender', 'e1.test'); INSERT INTO inbound_connector (name) "
        "VALUES ('e2');\n"
        "/* the second; partner */ INSERT INTO inbound_domain VALUES ('e2', 'sender', 'e2;x.test');\n"
    )
    run = Cli(f"sqlite:///{tmp_path}/rules.sqlite", capsys)
    status, out, err = run("db", "init", "--examples", str(sql))
    assert status == 0, err
    assert f"ran 4 statements from {sql}" in out
    assert rows(run, "SELECT connector, pattern FROM inbound_domain ORDER BY 1") == [
        ("e1", "e1.test"), ("e2", "e2;x.test")]


# A script whose '#' each database reads its own way: a comment to the end of the line in
# MariaDB, XOR in PostgreSQL; the pattern each writes for connector e1.
_HASH_SCRIPTS = {
    "mariadb": ("INSERT INTO inbound_connector (name, comment) VALUES ('e1', 'no # comment; here'); # e1; it's ours\n"
                "INSERT INTO inbound_domain VALUES ('e1', 'sender', 'e1.test'); #\n", "e1.test"),
    "postgresql": ("INSERT INTO inbound_connector (name, comment) VALUES ('e1', 'no # comment; here');\n"
                   "INSERT INTO inbound_domain VALUES ('e1', 'sender', 'e' || (5 # 3) || '.test');\n", "e6.test"),
    "sqlite": ("INSERT INTO inbound_connector (name, comment) VALUES ('e1', 'no # comment; here');\n"
               "INSERT INTO inbound_domain VALUES ('e1', 'sender', 'e1.test');\n", "e1.test"),
}


def test_db_init_examples_runs_the_shipped_examples_and_a_hash_as_each_database_reads_it(
        db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = Cli(db_url, capsys)
    examples = Path(__file__).resolve().parents[2] / "sql" / "examples.sql"
    status, out, err = run("db", "init", "--examples", str(examples))
    assert status == 0 and "ran " in out, err
    script, pattern = _HASH_SCRIPTS[make_url(db_url).get_backend_name()]
    mine = tmp_path / "mine.sql"
    mine.write_text(script)
    status, out, err = run("db", "init", "--examples", str(mine))
    assert status == 0, err
    assert f"ran 2 statements from {mine}" in out
    engine = open_engine(db_url)
    try:
        with engine.connect() as conn:
            got = conn.execute(text("SELECT c.comment, d.pattern FROM inbound_connector c JOIN inbound_domain d "
                                    "ON d.connector = c.name WHERE c.name = 'e1'")).all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in got] == [("no # comment; here", pattern)]
    status, out, err = run("lint")
    assert status == 0, out + err


# Finding: `connector add/set` stored patterns as typed, not as the loader compares them.

def test_connector_add_and_set_store_normalised_patterns(cli: Cli) -> None:
    status, _, err = cli("connector", "add", "y6", "--sender", "bücher.example", "--sender", "Mixed.Example.",
                         "--sender", "mixed.example", "--recipient", "☃.net", "--header-from", "*.Bank.TEST",
                         "--cert-name", "MX.Partner.test.", "--issuer", "  Partner   CA  ", "--address", "2001:DB8::/32")
    assert status == 0, err
    assert cli("connector", "set", "y6", "--recipient", "Bücher.Example")[0] == 0
    assert sorted(rows(cli, "SELECT scope, pattern FROM inbound_domain")) == [
        ("header_from", "*.bank.test"), ("recipient", "xn--bcher-kva.example"), ("recipient", "xn--n3h.net"),
        ("sender", "mixed.example"), ("sender", "xn--bcher-kva.example")]
    assert sorted(rows(cli, "SELECT field, pattern FROM inbound_cert_name")) == [
        ("issuer", "Partner CA"), ("subject", "mx.partner.test")]
    assert rows(cli, "SELECT address FROM inbound_address") == [("2001:db8::/32",)]
    assert rows(cli, "SELECT connector FROM inbound_domain WHERE pattern = 'xn--bcher-kva.example' "
                     "AND scope = 'sender'") == [("y6",)]
    assert_lint_clean(cli)


# Finding: minor usability.

@pytest.mark.parametrize(("given", "shown"), [("tlsv1.2", "TLSv1.2"), ("TLSV1.3", "TLSv1.3"), ("sslv3", "SSLv3")])
def test_explain_takes_postfix_protocol_names_in_any_case(cli: Cli, given: str, shown: str) -> None:
    assert cli("connector", "add", "p", "--sender", "p.test", "--min-tls", "TLSv1.2")[0] == 0
    status, out, err = cli("explain", "--client", "192.0.2.1", "--sender", "a@p.test", "--recipient", "b@x.test",
                           "--tls-protocol", given)
    assert status == 0, err
    assert f"  TLS {shown} cipher=" in out
    passes = shown != "SSLv3"
    assert (f"[pass] TLS version: {shown} meets the minimum TLSv1.2" in out) is passes


@pytest.mark.parametrize("given", ["TLSv9", "TLS1.2", "tls", ""])
def test_explain_refuses_an_unknown_protocol(cli: Cli, given: str) -> None:
    status, _, err = cli("explain", "--client", "192.0.2.1", "--tls-protocol", given)
    assert status == 2
    assert f"argument --tls-protocol: {given!r} is not one of SSLv3, TLSv1, TLSv1.1, TLSv1.2, TLSv1.3" in err


@pytest.mark.parametrize(("args", "message"), [
    (["connector", "add", "c", "--sender", "c.test", "--comment", "x" * 256],
     "--comment is 256 characters long; inbound_connector.comment holds at most 255"),
    (["connector", "add", "c", "--sender", "c.test", "--certificate", "pinned", "--organization", "O" * 300],
     "--organization is 300 characters long; inbound_connector.require_organization holds at most 255"),
    (["connector", "add", "c", "--sender", "c.test", "--certificate", "pinned", "--unit", "U" * 256],
     "--unit is 256 characters long; inbound_connector.require_unit holds at most 255"),
    (["connector", "add", "c", "--sender", "c.test", "--issuer", "I" * 256],
     "--issuer is 256 characters long; inbound_cert_name.pattern holds at most 255"),
    (["outbound", "add", "o", "--domain", "o.test", "--comment", "x" * 256],
     "--comment is 256 characters long; outbound_connector.comment holds at most 255"),
])
def test_over_long_values_are_refused_by_the_cli(cli: Cli, args: list[str], message: str) -> None:
    status, _, err = cli(*args)
    assert status == 2 and err.strip() == f"tlsgate: {message}"


def test_values_that_fit_their_columns_are_written(cli: Cli) -> None:
    assert cli("connector", "add", "c", "--sender", "c.test", "--comment", "x" * 255)[0] == 0
    assert cli("connector", "set", "c", "--certificate", "pinned", "--organization", "é" * 255)[0] == 0
    status, _, err = cli("connector", "set", "c", "--comment", "y" * 256)
    assert status == 2 and "--comment is 256 characters long" in err
    assert rows(cli, "SELECT length(comment) FROM inbound_connector") == [(255,)]


def test_stats_reports_a_silent_daemon_on_stderr(cli: Cli) -> None:
    status, out, err = cli("stats", "--metrics", "127.0.0.1:1")
    assert status == 1 and out == ""
    assert err.startswith("tlsgate: 127.0.0.1:1: not answering (")


def test_stats_of_something_that_is_no_metrics_endpoint_is_one_line(cli: Cli) -> None:
    # A web server that is not a daemon's metrics, and an address that is no HOST:PORT: both
    # ended in a traceback.
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server calls
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>hello, not prometheus</html>\n")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, out, err = cli("stats", "--metrics", f"127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 1 and out == "" and "not a tlsgate metrics endpoint" in err and err.count("\n") == 1, err
    status, out, err = cli("stats", "--metrics", "127.0.0.1:notaport")
    assert status == 1 and err.startswith("tlsgate: 127.0.0.1:notaport: ") and err.count("\n") == 1, err


def test_an_empty_database_url_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for value in ("", " "):
        with pytest.raises(SystemExit) as exc:
            main(["--database-url", value, "connector", "list"])
        assert exc.value.code == 2
        assert "argument --database-url: must not be empty" in capsys.readouterr().err


def test_the_connector_command_says_it_changes_connectors_too() -> None:
    assert "list, show, add, change or remove connectors" in build_parser().format_help()


def test_explain_shows_why_no_connector_can_be_told(cli: Cli) -> None:
    # A recipient that may be routed on from a local domain: no line may say that no connector
    # applies above a verdict that waits for one.
    assert cli("connector", "add", "rc-in", "--recipient", "example.test")[0] == 0
    status, out, _ = cli("explain", "--client", "203.0.113.5", "--sender", "a@other.test",
                         "--recipient", "b@example.test@localhost")
    lines = out.splitlines()
    assert status == 0 and "no connector applies" not in out, out
    assert lines[2] == "candidates: none can be told"
    assert lines[3].startswith("  [FAIL] address: recipient <b@example.test@localhost> may be delivered to another domain")
    assert lines[-1].startswith("verdict: DEFER 4.1.3 ")
