"""Rows a database without constraints lets through: each becomes a named problem, the
connector it belongs to fails closed in its scope, and every other connector keeps working.

SQLite enforces CHECK and foreign keys only when asked, so an administrator's sqlite3 shell
can write exactly these rows; the tests write them the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.rulesdb import load_unchecked
from tlsgate.engine import decide
from tlsgate.model import FailAction, SessionFacts
from tlsgate.patterns import parse_address

NOW = datetime.now(UTC)
TLS = dict(tls_protocol="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384", tls_cipher_bits=256)


def loaded(tmp_path: object, *statements: str) -> object:
    return load_unchecked(Path(str(tmp_path)) / "r.sqlite", "INSERT INTO inbound_connector (name) VALUES ('good')",
                          "INSERT INTO inbound_domain VALUES ('good', 'sender', 'good.test')", *statements)


CASES = [
    ("unknown mode", ["INSERT INTO inbound_connector (name, mode) VALUES ('bad', 'strict')",
                      "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"],
     "inbound_connector ('bad') column mode: 'strict' is not one of enforce, monitor"),
    ("unknown on_failure", ["INSERT INTO inbound_connector (name, on_failure) VALUES ('bad', 'bounce')",
                            "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"],
     "column on_failure: 'bounce' is not one of reject, defer"),
    ("unknown certificate", ["INSERT INTO inbound_connector (name, certificate) VALUES ('bad', 'maybe')",
                             "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"],
     "column certificate: 'maybe'"),
    ("bad boolean", ["INSERT INTO inbound_connector (name, require_tls) VALUES ('bad', 'sometimes')",
                     "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"],
     "column require_tls: 'sometimes' is not a boolean"),
    ("bad number", ["INSERT INTO inbound_connector (name, min_cipher_bits) VALUES ('bad', 'lots')",
                    "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"],
     "column min_cipher_bits: 'lots' is not a whole number"),
    ("unknown scope", ["INSERT INTO inbound_connector (name) VALUES ('bad')",
                       "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')",
                       "INSERT INTO inbound_domain VALUES ('bad', 'envelope', 'x.test')"],
     "inbound_domain ('bad', 'envelope', 'x.test') column scope"),
    ("dangling child row", ["INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"],
     "inbound_domain ('bad') column connector: refers to inbound connector 'bad', which does not exist"),
    ("names differing in case", ["INSERT INTO inbound_connector (name) VALUES ('bad')",
                                 "INSERT INTO inbound_connector (name) VALUES ('BAD')",
                                 "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"],
     "inbound_connector ('bad') column name: differs only in case from BAD"),
    ("bad name", ["INSERT INTO inbound_connector (name) VALUES ('bad name!')",
                  "INSERT INTO inbound_domain VALUES ('bad name!', 'sender', 'bad.test')"],
     "column name: a name is 1 to 64"),
    ("restrict without ranges", ["INSERT INTO inbound_connector (name, restrict_to_addresses) VALUES ('bad', 1)",
                                 "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"],
     "column restrict_to_addresses: is set but the connector has no inbound_address rows"),
    ("organization without a pinned certificate", [
        "INSERT INTO inbound_connector (name, certificate, require_organization) VALUES ('bad', 'trusted', 'Bad Org')",
        "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"],
     "column require_organization: is checked only against a pinned certificate (Postfix reports no organization"),
    ("unit without a pinned certificate", [
        "INSERT INTO inbound_connector (name, require_unit) VALUES ('bad', 'Mail')",
        "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"],
     "column require_unit: is checked only against a pinned certificate"),
    ("key size without a pinned certificate", [
        "INSERT INTO inbound_connector (name, certificate, min_key_bits) VALUES ('bad', 'none', 4096)",
        "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"],
     "column min_key_bits: is checked only against a pinned certificate"),
    # x'e9': "é" in Latin-1, as an sqlite3 shell on a Latin-1 terminal writes it
    ("reply text not UTF-8", [
        "INSERT INTO inbound_connector (name, reply_text) VALUES ('bad', CAST(x'5472e973' AS TEXT))",
        "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"],
     "inbound_connector ('bad') column reply_text: is not valid UTF-8 text"),
    ("organization not UTF-8", [
        "INSERT INTO inbound_connector (name, certificate, require_organization) "
        "VALUES ('bad', 'pinned', CAST(x'42616e71e9' AS TEXT))",
        "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')"],
     "column require_organization: is not valid UTF-8 text"),
    ("issuer not UTF-8", [
        "INSERT INTO inbound_connector (name) VALUES ('bad')",
        "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')",
        "INSERT INTO inbound_cert_name VALUES ('bad', 'issuer', CAST(x'4361e9' AS TEXT))"],
     "column pattern: is not valid UTF-8 text"),
    ("bad certificate PEM", ["INSERT INTO inbound_connector (name, certificate) VALUES ('bad', 'pinned')",
                             "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test')",
                             "INSERT INTO inbound_certificate (connector, pem) VALUES ('bad', '-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n')"],
     "column pem: PEM block 1 (line 1) is a private key (PRIVATE KEY), not a certificate"),
]


@pytest.mark.parametrize(("statements", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_row_is_named_and_fails_closed(tmp_path: object, statements: list[str], message: str) -> None:
    result = loaded(tmp_path, *statements)
    errors = [str(p) for p in result.errors]  # type: ignore[attr-defined]
    assert any(message in e for e in errors), errors
    snap = result.snapshot  # type: ignore[attr-defined]
    d = decide(snap, SessionFacts(parse_address("192.0.2.1"), "a@bad.test", "b@example.org", **TLS), NOW)
    assert d.action is FailAction.DEFER and d.status == "4.3.5", d
    assert "misconfigured" in (d.reason or "")
    ok = decide(snap, SessionFacts(parse_address("192.0.2.1"), "a@good.test", "b@example.org", **TLS), NOW)
    assert ok.action is None and ok.connector is not None and ok.connector.name == "good"
    other = decide(snap, SessionFacts(parse_address("192.0.2.1"), "a@else.test", "b@example.org"), NOW)
    if "column scope" in message:  # which scope the row meant is unknown: its sender scope widens
        assert other.connector is not None and other.connector.name == "bad" and other.status == "4.3.5"
    else:
        assert other.connector is None and other.action is None


# A row that defines a connector's scope and cannot be read widens the connector instead of
# narrowing it: the mail it was written for is deferred with the rest of the connector's scope,
# never let through. (connector rows, sender, recipient, client, must defer)
WIDENED = [
    ("the only pattern unreadable", ["INSERT INTO inbound_domain VALUES ('p', 'sender', '@partner.test')"],
     "a@partner.test", "b@example.org", "192.0.2.1", True),
    ("a pattern unreadable beside a good one", [
        "INSERT INTO inbound_domain VALUES ('p', 'sender', 'partner.test')",
        "INSERT INTO inbound_domain VALUES ('p', 'sender', '@partner.net')"],
     "a@partner.net", "b@example.org", "192.0.2.1", True),
    ("the only range unreadable", ["INSERT INTO inbound_address VALUES ('p', '198.51.100.1/24')"],
     "a@else.test", "b@example.org", "198.51.100.7", True),
    ("the only scope unreadable", ["INSERT INTO inbound_domain VALUES ('p', 'Sender', 'partner.test')"],
     "a@partner.test", "b@example.org", "192.0.2.1", True),
    ("a scope unreadable beside recipient rows: any recipient", [
        "INSERT INTO inbound_domain VALUES ('p', 'recipient', 'example.org')",
        "INSERT INTO inbound_domain VALUES ('p', 'Sender', 'partner.test')"],
     "", "b@example.net", "192.0.2.1", True),
    ("a recipient pattern unreadable: still only the sender's mail", [
        "INSERT INTO inbound_domain VALUES ('p', 'sender', 'partner.test')",
        "INSERT INTO inbound_domain VALUES ('p', 'recipient', 'a.*.test')"],
     "a@partner.test", "b@example.net", "192.0.2.1", True),
    ("... and not another sender's", [
        "INSERT INTO inbound_domain VALUES ('p', 'sender', 'partner.test')",
        "INSERT INTO inbound_domain VALUES ('p', 'recipient', 'a.*.test')"],
     "a@else.test", "b@example.net", "192.0.2.1", False),
]


@pytest.mark.parametrize(("statements", "sender", "recipient", "client", "defers"), [c[1:] for c in WIDENED],
                         ids=[c[0] for c in WIDENED])
def test_an_unreadable_scope_row_never_narrows_its_connector(
    tmp_path: object, statements: list[str], sender: str, recipient: str, client: str, defers: bool
) -> None:
    result = loaded(tmp_path, "INSERT INTO inbound_connector (name) VALUES ('p')", *statements)
    snap = result.snapshot  # type: ignore[attr-defined]
    assert snap.by_name["p"].misconfigured
    d = decide(snap, SessionFacts(parse_address(client), sender, recipient), NOW)  # no TLS
    if defers:
        assert (d.action, d.status, d.connector and d.connector.name) == (FailAction.DEFER, "4.3.5", "p"), d
    else:
        assert d.connector is None and d.action is None, d
    ok = decide(snap, SessionFacts(parse_address(client), "a@good.test", recipient, **TLS), NOW)
    assert ok.action is None and ok.connector is not None and ok.connector.name == "good"


# Each table with its columns and a row that is good apart from the one column under test.
GOOD_ROWS = {
    "inbound_connector": {"name": "bad", "comment": "c", "mode": "enforce", "min_tls_version": "TLSv1.2",
                          "certificate": "trusted", "on_failure": "defer", "reply_text": "r"},
    "inbound_domain": {"connector": "bad", "scope": "sender", "pattern": "bad.test"},
    "inbound_address": {"connector": "bad", "address": "192.0.2.0/24"},
    "inbound_cert_name": {"connector": "bad", "field": "subject", "pattern": "mail.bad.test"},
    "inbound_certificate": {"connector": "bad", "pem": "x"},
    "outbound_connector": {"name": "bad", "tls_level": "encrypt", "min_tls_version": "TLSv1.2", "comment": "c"},
    "outbound_domain": {"connector": "bad", "pattern": "bad.test"},
    "outbound_match_name": {"connector": "bad", "name": "mail.bad.test"},
    "outbound_smart_host": {"connector": "bad", "host": "relay.bad.test"},
}


@pytest.mark.parametrize("value", ["192.0.2.0\x00", "\x00", "bad\x00.test", "\u0660.test", "é.test"])
@pytest.mark.parametrize(("table", "column"), [(t, c) for t, row in GOOD_ROWS.items() for c in row])
def test_a_nul_or_a_stray_character_in_any_column_never_stops_a_load(
    tmp_path: Path, table: str, column: str, value: str
) -> None:
    # SQLite and MariaDB store a NUL in text; one in an address once raised out of the loader,
    # and a daemon starting with such a row would never have loaded any rules.
    row = {**GOOD_ROWS[table], column: value}
    placeholders = ", ".join("?" * len(row))
    result = load_unchecked(tmp_path / "r.sqlite", "INSERT INTO inbound_connector (name) VALUES ('good')",
                            "INSERT INTO inbound_domain VALUES ('good', 'sender', 'good.test')",
                            (f"INSERT INTO {table} ({', '.join(row)}) VALUES ({placeholders})", tuple(row.values())))
    ok = decide(result.snapshot, SessionFacts(parse_address("192.0.2.1"), "a@good.test", "b@example.org", **TLS), NOW)
    assert ok.connector is not None and ok.connector.name == "good"


def test_a_comment_that_is_not_utf8_is_a_warning_only(tmp_path: Path) -> None:
    result = load_unchecked(tmp_path / "r.sqlite",
                            "INSERT INTO inbound_connector (name, comment) VALUES ('good', CAST(x'4361e9' AS TEXT))",
                            "INSERT INTO inbound_domain VALUES ('good', 'sender', 'good.test')",
                            "INSERT INTO outbound_connector (name, comment) VALUES ('out', CAST(x'4361e9' AS TEXT))",
                            "INSERT INTO outbound_domain VALUES ('out', 'good.test')")
    assert not result.errors
    assert [str(p) for p in result.problems if "comment" in str(p)] == [
        "warning: inbound_connector ('good') column comment: is not valid UTF-8 text (written with another encoding?)",
        "warning: outbound_connector ('out') column comment: is not valid UTF-8 text (written with another encoding?)",
    ]
    (inbound,) = result.snapshot.inbound
    assert inbound.comment == "Ca\ufffd" and not inbound.problems
    assert result.snapshot.outbound[0].comment == "Ca\ufffd"


def test_a_connector_name_that_is_not_utf8_fails_closed_and_can_still_be_answered(tmp_path: Path) -> None:
    """Its errors name it, its domains wait (TEMP, 4.3.5), and the answers that name it can be
    encoded for Postfix and the log."""
    from tlsgate.outbound import OutboundIndex
    from tlsgate.socketmap import Status

    name = "CAST(x'62fc63686572' AS TEXT)"  # "bücher" in Latin-1
    result = load_unchecked(tmp_path / "r.sqlite",
                            f"INSERT INTO outbound_connector (name, tls_level) VALUES ({name}, 'encrypt')",
                            f"INSERT INTO outbound_domain VALUES ({name}, 'books.test')",
                            f"INSERT INTO inbound_connector (name) VALUES ({name})",
                            f"INSERT INTO inbound_domain VALUES ({name}, 'sender', 'books.test')")
    assert any("outbound_connector ('b\\udcfccher') column name: is not valid UTF-8 text" in str(p)
               for p in result.errors), result.errors
    answer = OutboundIndex(result.snapshot).tls_policy("books.test")
    assert answer.reply.status is Status.TEMP and answer.connector == "b\ufffdcher"
    answer.reply.encode()
    d = decide(result.snapshot, SessionFacts(parse_address("192.0.2.1"), "a@books.test", "b@example.org", **TLS), NOW)
    assert d.status == "4.3.5" and d.connector is not None and d.connector.name == "b\ufffdcher"
    (d.reason or "").encode()
