"""The schema on real SQLite, PostgreSQL and MariaDB: DDL files, constraints, triggers, loading."""

from __future__ import annotations

import pathlib
import sqlite3
import subprocess
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from tlsgate.engine import decide
from tlsgate.model import FailAction, Mode, Scope, SessionFacts
from tlsgate.patterns import parse_address
from tlsgate.store import (
    LoadCache,
    current_version,
    init_schema,
    load,
    open_engine,
    read_generation,
    schema_script,
    upgrade_schema,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
SQL = ROOT / "sql"
EXAMPLES = (SQL / "examples.sql").read_text()


def dialect_of(url: str) -> str:
    backend = make_url(url).get_backend_name()
    return "mariadb" if backend in ("mysql", "mariadb") else backend


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mariadb"])
def test_sql_files_are_generated_from_the_models(dialect: str) -> None:
    on_disk = (SQL / f"{dialect}.sql").read_text()
    assert on_disk == schema_script(dialect), (
        f"sql/{dialect}.sql drifted from tlsgate/schema.py: run `make sql` and commit the result"
    )


def apply_with_client(url: str, path: pathlib.Path) -> None:
    """Apply a SQL file the way an administrator would: with the dialect's own client."""
    u = make_url(url)
    dialect = dialect_of(url)
    if dialect == "sqlite":
        db = sqlite3.connect(u.database or "")
        try:
            db.executescript(path.read_text())
            db.commit()
        finally:
            db.close()
    elif dialect == "postgresql":
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", u.host or "127.0.0.1", "-p", str(u.port or 5432),
             "-U", u.username or "postgres", "-d", u.database or "", "-f", str(path)],
            check=True, capture_output=True, text=True,
        )
    else:
        with path.open() as fh:
            subprocess.run(
                ["mariadb", "-h", u.host or "127.0.0.1", "-P", str(u.port or 3306), "-u", u.username or "root",
                 u.database or ""],
                stdin=fh, check=True, capture_output=True, text=True,
            )


def test_ddl_file_and_examples_apply_with_the_native_client(db_url: str) -> None:
    apply_with_client(db_url, SQL / f"{dialect_of(db_url)}.sql")
    apply_with_client(db_url, SQL / "examples.sql")
    engine = open_engine(db_url)
    try:
        result = load(engine)
        snap = result.snapshot
        assert result.problems == []
        assert [c.name for c in snap.inbound] == ["contoso-in", "fabrikam-in", "onprem-in", "woodgrove-in"]
        assert [o.name for o in snap.outbound] == ["contoso-out"]
        assert read_generation(engine) > 0
        with engine.connect() as conn:
            assert current_version(conn) == 1
    finally:
        engine.dispose()


def _init(url: str) -> Engine:
    engine = open_engine(url)
    assert init_schema(engine) is True
    assert init_schema(engine) is False  # idempotent
    with engine.begin() as conn:
        for stmt in EXAMPLES.split(";\n"):
            body = "\n".join(line for line in stmt.splitlines() if not line.lstrip().startswith("--")).strip()
            if body:
                conn.exec_driver_sql(body)
    return engine


def test_round_trip_of_every_field(db_url: str) -> None:
    engine = _init(db_url)
    try:
        snap = load(engine).snapshot
        c = snap.by_name["contoso-in"]
        assert {str(p) for p in c.sender_domains} == {"contoso.com", "*.contoso.com"}
        assert (c.require_tls, c.min_tls_version, c.require_forward_secrecy, c.on_failure) == (
            True, "TLSv1.2", True, FailAction.REJECT)
        f = snap.by_name["fabrikam-in"]
        assert {str(p) for p in f.cert_names} == {"mail.fabrikam.com", "*.mail.fabrikam.com"}
        assert [str(p) for p in f.issuer_names] == ["Fabrikam Issuing CA*"]
        assert f.reply_text == "Fabrikam mail must arrive over TLS with the Fabrikam certificate"
        o = snap.by_name["onprem-in"]
        assert o.restrict_to_ranges and {str(n) for n in o.client_ranges} == {"192.0.2.0/24", "2001:db8:25::/48"}
        assert snap.by_name["woodgrove-in"].mode is Mode.MONITOR
        out = snap.outbound[0]
        assert (out.tls_level.value, out.match_names, out.min_tls_version) == ("secure", ("mail.contoso.com",), "TLSv1.2")
        assert [(h.host, h.port, h.mx_lookup) for h in out.smart_hosts] == [("relay.contoso.com", 25, False)]
    finally:
        engine.dispose()


def test_triggers_bump_generation_and_renames_cascade(db_url: str) -> None:
    engine = _init(db_url)
    try:
        before = read_generation(engine)
        with engine.begin() as conn:
            conn.execute(text("UPDATE inbound_connector SET name = 'contoso-2' WHERE name = 'contoso-in'"))
        after = read_generation(engine)
        assert after > before
        snap = load(engine).snapshot
        assert "contoso-in" not in snap.by_name
        assert {str(p) for p in snap.by_name["contoso-2"].sender_domains} == {"contoso.com", "*.contoso.com"}
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM inbound_connector WHERE name = 'contoso-2'"))
            left = conn.execute(text("SELECT count(*) FROM inbound_domain WHERE connector = 'contoso-2'")).scalar()
        assert left == 0
        assert read_generation(engine) > after
    finally:
        engine.dispose()


def test_reload_with_a_cache_rebuilds_what_changed_and_nothing_else(db_url: str) -> None:
    engine = _init(db_url)
    try:
        cache = LoadCache()
        first = load(engine, cache=cache).snapshot.by_name
        with engine.begin() as conn:
            conn.execute(text("UPDATE inbound_connector SET require_tls = :f WHERE name = 'contoso-in'"), {"f": False})
            conn.execute(text("UPDATE inbound_domain SET pattern = 'fabrikam.example' WHERE connector = 'fabrikam-in'"))
            conn.execute(text("INSERT INTO inbound_domain (connector, scope, pattern) "
                              "VALUES ('woodgrove-in', 'sender', 'not a domain!')"))
        result = load(engine, cache=cache)
        second = result.snapshot.by_name
        assert second["onprem-in"] is first["onprem-in"]  # untouched: not parsed again
        assert second["contoso-in"].require_tls is False
        assert [str(p) for p in second["fabrikam-in"].sender_domains] == ["fabrikam.example"]
        assert second["woodgrove-in"].misconfigured  # a new bad row is never hidden by the cache
        assert any("not a domain!" in str(p) for p in result.errors)
        assert result.snapshot.inbound == load(engine).snapshot.inbound  # the same as a load from scratch
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM inbound_domain WHERE pattern = 'not a domain!'"))
        third = load(engine, cache=cache).snapshot.by_name
        assert not third["woodgrove-in"].misconfigured and third["onprem-in"] is first["onprem-in"]
    finally:
        engine.dispose()


def test_a_settings_change_keeps_the_indexes_of_the_previous_load(db_url: str) -> None:
    engine = _init(db_url)
    try:
        cache = LoadCache()
        first = load(engine, cache=cache).snapshot
        with engine.begin() as conn:
            conn.execute(text("UPDATE inbound_connector SET require_tls = :f WHERE name = 'contoso-in'"), {"f": False})
        second = load(engine, cache=cache).snapshot
        assert second.domains is first.domains and second.ranges is first.ranges
        assert second.by_name["contoso-in"].require_tls is False
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO inbound_domain (connector, scope, pattern) "
                              "VALUES ('contoso-in', 'sender', 'contoso.example')"))
        third = load(engine, cache=cache).snapshot
        assert third.domains is not second.domains
        found = third.domains[Scope.SENDER].lookup("contoso.example")
        assert [third.inbound[i].name for i in found] == ["contoso-in"]
    finally:
        engine.dispose()


def test_postgresql_bumps_once_per_transaction_and_savepoints_keep_it(pg_url: str) -> None:
    """Many statements in one transaction bump once; a bump undone with its savepoint is made
    again by the next change, so a committed change always moves the generation."""
    engine = _init(pg_url)
    try:
        start = read_generation(engine)
        with engine.begin() as conn:
            for i in range(50):
                conn.execute(text("INSERT INTO inbound_connector (name) VALUES (:n)"), {"n": f"bulk{i}"})
                conn.execute(text("INSERT INTO inbound_domain (connector, scope, pattern) VALUES (:n, 'sender', :d)"),
                             {"n": f"bulk{i}", "d": f"bulk{i}.test"})
        assert read_generation(engine) == start + 1
        with engine.begin() as conn:
            savepoint = conn.begin_nested()
            conn.execute(text("DELETE FROM inbound_connector WHERE name = 'bulk0'"))
            savepoint.rollback()
            conn.execute(text("DELETE FROM inbound_connector WHERE name = 'bulk1'"))
        assert read_generation(engine) == start + 2
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM inbound_connector WHERE name = 'bulk2'"))
            savepoint = conn.begin_nested()
            conn.execute(text("DELETE FROM inbound_connector WHERE name = 'bulk3'"))
            savepoint.rollback()
        assert read_generation(engine) == start + 3
        names = set(load(engine).snapshot.by_name)
        assert {"bulk0", "bulk3"} <= names and not {"bulk1", "bulk2"} & names
    finally:
        engine.dispose()


@pytest.mark.parametrize("statement", [
    "INSERT INTO inbound_connector (name, mode) VALUES ('x', 'enforcing')",
    "INSERT INTO inbound_connector (name, certificate) VALUES ('x', 'any')",
    "INSERT INTO inbound_connector (name, on_failure) VALUES ('x', 'bounce')",
    "INSERT INTO inbound_connector (name, min_tls_version) VALUES ('x', 'TLSv1.4')",
    "INSERT INTO inbound_connector (name, min_cipher_bits) VALUES ('x', -1)",
    "INSERT INTO inbound_domain (connector, scope, pattern) VALUES ('contoso-in', 'envelope', 'a.com')",
    "INSERT INTO inbound_domain (connector, scope, pattern) VALUES ('nobody', 'sender', 'a.com')",
    "INSERT INTO outbound_connector (name, tls_level) VALUES ('x', 'may')",
    "INSERT INTO outbound_smart_host (connector, host, port) VALUES ('contoso-out', 'h.example', 70000)",
])
def test_constraints_refuse_bad_rows(db_url: str, statement: str) -> None:
    engine = _init(db_url)
    try:
        with pytest.raises((IntegrityError, OperationalError)):
            with engine.begin() as conn:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def test_defaults_are_the_safe_ones(db_url: str) -> None:
    engine = _init(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO inbound_connector (name) VALUES ('bare')"))
            conn.execute(text("INSERT INTO inbound_domain (connector, scope, pattern) VALUES ('bare', 'sender', 'bare.test')"))
        c = load(engine).snapshot.by_name["bare"]
        assert c.enabled and c.require_tls and c.mode is Mode.ENFORCE and c.on_failure is FailAction.DEFER
    finally:
        engine.dispose()


def test_upgrade_is_a_no_op_at_the_current_version(db_url: str) -> None:
    engine = _init(db_url)
    try:
        assert upgrade_schema(engine) == (1, 1)
    finally:
        engine.dispose()


@pytest.mark.parametrize(("version", "says"), [(2, "newer than this tlsgate (1): upgrade tlsgate"),
                                               (0, "older than this tlsgate (1): run `tlsgate db upgrade`")])
def test_rows_of_another_schema_version_are_not_loaded(db_url: str, caplog: pytest.LogCaptureFixture,
                                                        version: int, says: str) -> None:
    """A host of a fleet not yet upgraded keeps its last rules rather than read a newer
    schema's rows as its own (ignoring the requirements it adds), and says why, once."""
    from tlsgate.config import DatabaseConfig
    from tlsgate.rules import RuleHolder
    from tlsgate.store import StoreError

    engine = _init(db_url)
    holder = RuleHolder(DatabaseConfig(url=db_url))
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO inbound_connector (name) VALUES ('old')"))
        assert holder.refresh() and holder.snapshot is not None
        loaded = holder.snapshot.generation
        with engine.begin() as conn:
            conn.execute(text("UPDATE schema_version SET version = :v"), {"v": version})
            conn.execute(text("INSERT INTO inbound_connector (name) VALUES ('new')"))
        with pytest.raises(StoreError, match=says.replace("(", r"\(").replace(")", r"\)")):
            load(engine)
        with caplog.at_level("ERROR", "tlsgate.rules"):
            for _ in range(3):
                holder.refresh()
        names = {c.name for c in holder.snapshot.inbound}
        assert "old" in names and "new" not in names
        assert holder.snapshot.generation == loaded and not holder.healthy
        assert [r.getMessage().count(says) for r in caplog.records] == [1], caplog.text
    finally:
        holder.stop()
        engine.dispose()


def test_invalid_value_without_check_fails_closed_in_scope(db_url: str) -> None:
    """Values that no CHECK can catch (a bad domain, a bad range) make that connector defer."""
    engine = _init(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO inbound_domain (connector, scope, pattern) VALUES ('contoso-in', 'sender', 'cont oso.com')"))
            conn.execute(text("INSERT INTO inbound_address (connector, address) VALUES ('onprem-in', '192.0.2.1/24')"))
        result = load(engine)
        texts = [str(p) for p in result.errors]
        assert any("inbound_domain ('contoso-in', 'sender', 'cont oso.com') column pattern" in t for t in texts)
        assert any("inbound_address ('onprem-in', '192.0.2.1/24') column address" in t for t in texts)
        now = datetime.now(UTC)
        tls = dict(tls_protocol="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384", tls_cipher_bits=256)
        d = decide(result.snapshot, SessionFacts(parse_address("203.0.113.9"), "a@contoso.com", "b@example.org", **tls), now)
        assert d.action is FailAction.DEFER and d.status == "4.3.5" and "misconfigured" in (d.reason or "")
        # Fabrikam's connector is untouched by Contoso's bad row.
        d = decide(result.snapshot, SessionFacts(parse_address("203.0.113.9"), "a@fabrikam.com", "b@example.org"), now)
        assert d.action is FailAction.REJECT and d.status == "5.7.10"
    finally:
        engine.dispose()
