"""Invalid rule rows on every database that lets them in: each becomes a named problem that
`tlsgate lint` prints, its connector fails closed in its own scope (inbound: a 4.3.5 temporary
failure for its senders; outbound: a socketmap TEMP for its domains), and every other
connector keeps its verdict.

Extends tests/db/test_invalid_rows.py (SQLite, inbound) to every column of every rule table,
outbound connectors, and PostgreSQL and MariaDB. A case lists the dialects whose constraints let
the row in; on the others the test asserts the database itself refuses it. A dangling child
row needs the administrator to switch foreign keys off (SQLite's default, PostgreSQL's
session_replication_role, MariaDB's FOREIGN_KEY_CHECKS): it is tested that way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, exc, text

from tests.reliability.results import record
from tlsgate.cli import main as tlsgate_main
from tlsgate.engine import decide
from tlsgate.model import FailAction, SessionFacts
from tlsgate.outbound import TLS_POLICY_MAP, TRANSPORT_MAP, OutboundIndex
from tlsgate.patterns import parse_address
from tlsgate.socketmap import Status
from tlsgate.store import LoadResult, init_schema, load, open_engine

NOW = datetime.now(UTC)
ALL = ("sqlite", "postgresql", "mariadb")
SQLITE = ("sqlite",)
CHECKED: list[str] = []
REFUSED: list[str] = []  # rows the database's own constraints kept out

BASE = [
    "INSERT INTO inbound_connector (name) VALUES ('good')",
    "INSERT INTO inbound_domain VALUES ('good', 'sender', 'good.test')",
    "INSERT INTO outbound_connector (name, tls_level) VALUES ('good-out', 'secure')",
    "INSERT INTO outbound_domain (connector, pattern) VALUES ('good-out', 'good-out.test')",
]
BAD_IN = [
    "INSERT INTO inbound_connector (name) VALUES ('bad')",
    "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')",
]
BAD_OUT = [
    "INSERT INTO outbound_connector (name) VALUES ('bad-out')",
    "INSERT INTO outbound_domain (connector, pattern) VALUES ('bad-out', 'bad-out.test')",
]
NOT_A_CERT = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"


@dataclass(frozen=True)
class Case:
    id: str
    direction: str  # "in" or "out": which scope must fail closed
    statements: tuple[str, ...]
    message: str
    dialects: tuple[str, ...] = ALL
    dangling: bool = False  # needs foreign keys switched off
    # an unreadable sender-scope row: the connector then defers every sender (wider, never narrower)
    any_sender: bool = False
    # an unreadable outbound domain row: the connector then claims every domain nobody else covers
    any_domain: bool = False


def inbound(id: str, extra: list[str], message: str, dialects: tuple[str, ...] = ALL, *,
            parent: list[str] | None = None, dangling: bool = False, any_sender: bool = False) -> Case:
    return Case(id, "in", tuple((BAD_IN if parent is None else parent) + extra), message, dialects, dangling,
                any_sender)


def outbound(id: str, extra: list[str], message: str, dialects: tuple[str, ...] = ALL, *,
             parent: list[str] | None = None, dangling: bool = False, any_domain: bool = False) -> Case:
    return Case(id, "out", tuple((BAD_OUT if parent is None else parent) + extra), message, dialects, dangling,
                any_domain=any_domain)


def bad_column(column: str, value: str, message: str, dialects: tuple[str, ...] = SQLITE) -> Case:
    return inbound(f"inbound {column}={value}", [], message, dialects, parent=[
        f"INSERT INTO inbound_connector (name, {column}) VALUES ('bad', {value})",
        "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')",
    ])


CASES = [
    # inbound_connector: each column's bad values
    bad_column("enabled", "'perhaps'", "column enabled: 'perhaps' is not a boolean"),
    bad_column("require_tls", "5", "column require_tls: 5 is not a boolean", ("sqlite", "mariadb")),
    bad_column("require_forward_secrecy", "'often'", "column require_forward_secrecy: 'often' is not a boolean"),
    bad_column("restrict_to_addresses", "7", "column restrict_to_addresses: 7 is not a boolean", ("sqlite", "mariadb")),
    bad_column("mode", "'strict'", "column mode: 'strict' is not one of"),
    bad_column("certificate", "'maybe'", "column certificate: 'maybe' is not one of"),
    bad_column("on_failure", "'bounce'", "column on_failure: 'bounce' is not one of"),
    bad_column("min_tls_version", "'TLSv9'", "column min_tls_version: 'TLSv9' is not one of"),
    bad_column("min_cipher_bits", "-1", "column min_cipher_bits: -1 is not a whole number >= 0"),
    bad_column("min_cipher_bits", "'lots'", "column min_cipher_bits: 'lots' is not a whole number"),
    bad_column("min_key_bits", "0", "column min_key_bits: 0 is not a whole number >= 1"),
    inbound("inbound name with spaces", [], "column name: a name is 1 to 64", parent=[
        "INSERT INTO inbound_connector (name) VALUES ('bad name!')",
        "INSERT INTO inbound_domain VALUES ('bad name!', 'sender', 'bad.test')",
    ]),
    inbound("inbound names differing in case", ["INSERT INTO inbound_connector (name) VALUES ('BAD')"],
            "column name: differs only in case from BAD"),
    inbound("restrict without ranges", [], "is set but the connector has no inbound_address rows", parent=[
        "INSERT INTO inbound_connector (name, restrict_to_addresses) VALUES ('bad', true)",
        "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')",
    ]),
    # child tables
    inbound("domain pattern", ["INSERT INTO inbound_domain VALUES ('bad', 'sender', 'not a domain!')"],
            "inbound_domain ('bad', 'sender', 'not a domain!') column pattern", any_sender=True),
    inbound("domain wildcard in the middle", ["INSERT INTO inbound_domain VALUES ('bad', 'recipient', 'a.*.test')"],
            "column pattern"),
    inbound("domain scope", ["INSERT INTO inbound_domain VALUES ('bad', 'envelope', 'x.test')"],
            "column scope: 'envelope' is not one of", SQLITE, any_sender=True),
    inbound("CIDR prefix too long", ["INSERT INTO inbound_address VALUES ('bad', '10.0.0.0/33')"],
            "inbound_address ('bad', '10.0.0.0/33') column address"),
    inbound("address that is no address", ["INSERT INTO inbound_address VALUES ('bad', '300.1.2.3')"],
            "inbound_address ('bad', '300.1.2.3') column address"),
    inbound("cert name pattern", ["INSERT INTO inbound_cert_name VALUES ('bad', 'subject', '*.*.bad.test')"],
            "inbound_cert_name ('bad', 'subject', '*.*.bad.test') column pattern"),
    inbound("issuer pattern", ["INSERT INTO inbound_cert_name VALUES ('bad', 'issuer', '')"],
            "column pattern: empty issuer pattern"),
    inbound("cert name field", ["INSERT INTO inbound_cert_name VALUES ('bad', 'serial', 'x')"],
            "column field: 'serial' is not one of subject, issuer", SQLITE),
    inbound("PEM that is a private key", [
        "INSERT INTO inbound_certificate (connector, pem) VALUES "
        "('bad', '-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n')"],
        "is a private key (PRIVATE KEY), not a certificate"),
    inbound("PEM that is not a certificate", [
        f"INSERT INTO inbound_certificate (connector, pem) VALUES ('bad', '{NOT_A_CERT}')"], "column pem:"),
    inbound("PEM that is plain text", [
        "INSERT INTO inbound_certificate (connector, pem) VALUES ('bad', 'hello')"], "column pem:"),
    inbound("dangling inbound_domain", [], "refers to inbound connector 'bad', which does not exist",
            parent=["INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"], dangling=True),
    inbound("dangling inbound_certificate", [], "refers to inbound connector 'bad', which does not exist",
            parent=["INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')",
                    "INSERT INTO inbound_certificate (connector, pem) VALUES ('bad', 'x')"], dangling=True),
    # outbound
    outbound("outbound tls_level", [], "column tls_level: 'maybe' is not one of", SQLITE, parent=[
        "INSERT INTO outbound_connector (name, tls_level) VALUES ('bad-out', 'maybe')",
        "INSERT INTO outbound_domain (connector, pattern) VALUES ('bad-out', 'bad-out.test')"]),
    outbound("outbound min_tls_version", [], "column min_tls_version: 'SSLv3' is not one of", SQLITE, parent=[
        "INSERT INTO outbound_connector (name, min_tls_version) VALUES ('bad-out', 'SSLv3')",
        "INSERT INTO outbound_domain (connector, pattern) VALUES ('bad-out', 'bad-out.test')"]),
    outbound("outbound enabled", [], "column enabled: 'sometimes' is not a boolean", SQLITE, parent=[
        "INSERT INTO outbound_connector (name, enabled) VALUES ('bad-out', 'sometimes')",
        "INSERT INTO outbound_domain (connector, pattern) VALUES ('bad-out', 'bad-out.test')"]),
    outbound("outbound domain pattern", ["INSERT INTO outbound_domain (connector, pattern) VALUES ('bad-out', 'x y')"],
             "outbound_domain ('bad-out', 'x y') column pattern", any_domain=True),
    outbound("outbound only domain unreadable", [], "outbound_domain ('bad-out', 'delta..test') column pattern",
             parent=["INSERT INTO outbound_connector (name) VALUES ('bad-out')",
                     "INSERT INTO outbound_domain (connector, pattern) VALUES ('bad-out', 'delta..test')"],
             any_domain=True),
    outbound("outbound match name", ["INSERT INTO outbound_match_name (connector, name) VALUES ('bad-out', '*.*.x')"],
             "outbound_match_name ('bad-out', '*.*.x') column name"),
    outbound("smart host name", [
        "INSERT INTO outbound_smart_host (connector, host, port, mx_lookup) VALUES ('bad-out', 'no host!', 25, false)"],
        "column host:"),
    outbound("smart host port", [
        "INSERT INTO outbound_smart_host (connector, host, port, mx_lookup) VALUES ('bad-out', 'relay.test', 70000, false)"],
        "column port: 70000 is not a port number", SQLITE),
    outbound("smart host mx_lookup", [
        "INSERT INTO outbound_smart_host (connector, host, port, mx_lookup) VALUES ('bad-out', 'relay.test', 25, 3)"],
        "column mx_lookup: 3 is not a boolean", ("sqlite", "mariadb")),
    outbound("outbound names differing in case", ["INSERT INTO outbound_connector (name) VALUES ('BAD-OUT')"],
             "column name: differs only in case from BAD-OUT"),
    outbound("dangling outbound_domain", [], "refers to outbound connector 'bad-out', which does not exist",
             parent=["INSERT INTO outbound_domain (connector, pattern) VALUES ('bad-out', 'bad-out.test')"],
             dangling=True),
]

FK_OFF = {"sqlite": "PRAGMA foreign_keys = OFF", "postgresql": "SET session_replication_role = replica",
          "mariadb": "SET FOREIGN_KEY_CHECKS = 0"}


def write_rows(url: str, dialect: str, statements: list[str], *, dangling: bool) -> None:
    """Plain SQL as an administrator's client would send it, one transaction."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if dialect == "sqlite":
                conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
            if dangling:
                conn.exec_driver_sql(FK_OFF[dialect])
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def loaded(url: str) -> LoadResult:
    engine = open_engine(url)
    try:
        return load(engine)
    finally:
        engine.dispose()


def lint(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    config = tmp_path / "tlsgate.conf"
    config.write_text("[log]\ntarget = stderr\n")
    capsys.readouterr()
    status = tlsgate_main(["-c", str(config), "--database-url", url, "lint"])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def tls_facts(sender: str) -> SessionFacts:
    return SessionFacts(parse_address("192.0.2.1"), sender, "b@example.org", tls_protocol="TLSv1.3",
                        tls_cipher="TLS_AES_256_GCM_SHA384", tls_cipher_bits=256)


def check_scopes(result: LoadResult, direction: str, any_sender: bool = False, any_domain: bool = False) -> None:
    snap = result.snapshot
    bad = decide(snap, tls_facts("a@bad.test"), NOW)
    good = decide(snap, tls_facts("a@good.test"), NOW)
    other = decide(snap, SessionFacts(parse_address("192.0.2.1"), "a@else.test", "b@example.org"), NOW)
    index = OutboundIndex(snap)
    bad_out = index.lookup(TLS_POLICY_MAP, "bad-out.test").reply
    good_out = index.lookup(TLS_POLICY_MAP, "good-out.test").reply
    other_out = index.lookup(TLS_POLICY_MAP, "delta.test").reply
    if direction == "in":
        assert bad.action is FailAction.DEFER and bad.status == "4.3.5", bad
    else:
        assert bad_out.status is Status.TEMP, bad_out
    assert good.action is None and good.connector is not None and good.connector.name == "good", good
    if any_sender:
        assert other.connector is not None and other.connector.name == "bad" and other.status == "4.3.5", other
    else:
        assert other.connector is None and other.action is None, other
    assert good_out.status is Status.OK, good_out
    assert other_out.status is (Status.TEMP if any_domain else Status.NOTFOUND), other_out
    # Routing never widens: local mail and other domains keep Postfix's own transport.
    assert index.lookup(TRANSPORT_MAP, "root@localhost").reply.status is Status.NOTFOUND


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_row_fails_closed_in_its_scope(case: Case, db_url: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    dialect = db_url.split(":", 1)[0].split("+", 1)[0]
    engine = open_engine(db_url)
    init_schema(engine)
    engine.dispose()
    write_rows(db_url, dialect, BASE, dangling=False)
    if dialect not in case.dialects:
        # The database's own constraints refuse the row: nothing to fail closed.
        with pytest.raises(exc.DBAPIError):
            write_rows(db_url, dialect, list(case.statements), dangling=case.dangling)
        assert loaded(db_url).errors == []
        REFUSED.append(f"{dialect}:{case.id}")
        report()
        return
    write_rows(db_url, dialect, list(case.statements), dangling=case.dangling)
    result = loaded(db_url)
    errors = [str(p) for p in result.errors]
    assert any(case.message in e for e in errors), errors
    check_scopes(result, case.direction, case.any_sender, case.any_domain)
    status, output = lint(db_url, tmp_path, capsys)
    assert status == 1, output
    assert case.message in output, output
    CHECKED.append(f"{dialect}:{case.id}")
    report()


def report() -> None:
    record("invalid-rows", {
        "title": "Invalid rows (fail closed in their scope, named by lint)",
        "kinds of invalid row": len(CASES),
        **{f"let in and failing closed on {d}": sum(c.startswith(d + ":") for c in CHECKED) for d in ALL},
        **{f"refused by {d} itself": sum(c.startswith(d + ":") for c in REFUSED) for d in ALL},
        "note": "A kind counts as checked when the row is named by `tlsgate lint` (exit 1), its connector "
                "answers 4.3.5 (inbound) or TEMP (outbound) and the other connectors keep their verdicts; an "
                "unreadable domain or address row widens its connector, never narrows it (docs/rules.md).",
    })
