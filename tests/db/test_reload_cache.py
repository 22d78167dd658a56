"""A reload with the cache kept from the previous load must give what a load from scratch gives,
whatever sequence of row changes came in between: the cache only ever saves work."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.indexes import index_answers
from tlsgate.snapshot import Snapshot
from tlsgate.store import LoadCache, init_schema, load, open_engine

NAMES = ("a", "b", "c", "B")  # "B" differs from "b" only in case: both fail while it exists
DOMAINS = ("contoso.com", "*.contoso.com", "fabrikam.com", "not a domain!")
RANGES = ("192.0.2.0/24", "192.0.2.0/25", "198.51.100.7", "10.0.0.300/8")

# Each change is one SQL statement with its parameters: settings, child rows, names, new rows.
# A change the schema refuses (a CHECK) is skipped, as an administrator's would fail.
CHANGES = st.one_of(
    st.tuples(st.just("UPDATE OR IGNORE inbound_connector SET require_tls = ? WHERE name = ?"),
              st.tuples(st.sampled_from([0, 1]), st.sampled_from(NAMES))),
    st.tuples(st.just("UPDATE OR IGNORE inbound_connector SET enabled = ? WHERE name = ?"),
              st.tuples(st.sampled_from([0, 1]), st.sampled_from(NAMES))),
    st.tuples(st.just("UPDATE OR IGNORE inbound_connector SET restrict_to_addresses = ? WHERE name = ?"),
              st.tuples(st.sampled_from([0, 1]), st.sampled_from(NAMES))),
    st.tuples(st.just("UPDATE OR IGNORE inbound_connector SET min_cipher_bits = ? WHERE name = ?"),
              st.tuples(st.sampled_from([0, 128, -1]), st.sampled_from(NAMES))),
    st.tuples(st.just("UPDATE OR IGNORE inbound_connector SET on_failure = ? WHERE name = ?"),
              st.tuples(st.sampled_from(["reject", "defer"]), st.sampled_from(NAMES))),
    st.tuples(st.just("INSERT OR IGNORE INTO inbound_connector (name) VALUES (?)"), st.tuples(st.sampled_from(NAMES))),
    st.tuples(st.just("DELETE FROM inbound_connector WHERE name = ?"), st.tuples(st.sampled_from(NAMES))),
    st.tuples(st.just("INSERT OR IGNORE INTO inbound_domain (connector, scope, pattern) VALUES (?, ?, ?)"),
              st.tuples(st.sampled_from(NAMES), st.sampled_from(["sender", "recipient"]), st.sampled_from(DOMAINS))),
    st.tuples(st.just("DELETE FROM inbound_domain WHERE connector = ? AND pattern = ?"),
              st.tuples(st.sampled_from(NAMES), st.sampled_from(DOMAINS))),
    st.tuples(st.just("INSERT OR IGNORE INTO inbound_address (connector, address) VALUES (?, ?)"),
              st.tuples(st.sampled_from(NAMES), st.sampled_from(RANGES))),
    st.tuples(st.just("DELETE FROM inbound_address WHERE connector = ? AND address = ?"),
              st.tuples(st.sampled_from(NAMES), st.sampled_from(RANGES))),
)


def _answers(snap: Snapshot) -> list[object]:
    return index_answers(snap, ("contoso.com", "mail.contoso.com", "fabrikam.com"),
                         ("192.0.2.7", "192.0.2.200", "198.51.100.7"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.lists(CHANGES, min_size=1, max_size=3), min_size=1, max_size=6))
def test_a_cached_reload_equals_a_load_from_scratch(tmp_path: Path, steps: list[list[tuple[str, tuple[object, ...]]]]) -> None:
    path = tmp_path / "cache.sqlite"
    path.unlink(missing_ok=True)
    engine = open_engine(f"sqlite:///{path}")
    try:
        init_schema(engine)
        con = sqlite3.connect(path)
        con.execute("PRAGMA foreign_keys = OFF")  # child rows may outlive their connector: orphans are errors
        con.executescript(
            "INSERT INTO inbound_connector (name) VALUES ('a'), ('b'), ('c');"
            "INSERT INTO inbound_domain VALUES ('a', 'sender', 'contoso.com'), ('b', 'sender', 'fabrikam.com');"
            "INSERT INTO inbound_address VALUES ('b', '192.0.2.0/24'), ('c', '198.51.100.7');")
        con.commit()
        cache = LoadCache()
        load(engine, cache=cache)
        for transaction in steps:  # each list of changes is committed together, then loaded
            for sql, params in transaction:
                con.execute(sql, params)
            con.commit()
            cached, fresh = load(engine, cache=cache), load(engine)
            assert cached.snapshot.inbound == fresh.snapshot.inbound
            assert [str(p) for p in cached.problems] == [str(p) for p in fresh.problems]
            assert _answers(cached.snapshot) == _answers(fresh.snapshot)
        con.close()
    finally:
        engine.dispose()


def test_the_cache_keeps_each_combination_of_column_types_once(tmp_path: Path) -> None:
    path = tmp_path / "types.sqlite"
    engine = open_engine(f"sqlite:///{path}")
    try:
        init_schema(engine)
        con = sqlite3.connect(path)
        con.executemany("INSERT INTO inbound_connector (name, comment) VALUES (?, ?)",
                        [(f"c{i}", None if i % 2 else "partner") for i in range(50)])
        con.executemany("INSERT INTO inbound_domain VALUES (?, 'sender', ?)", [(f"c{i}", f"d{i}.example") for i in range(50)])
        con.commit()
        con.close()
        cache = LoadCache()
        load(engine, cache=cache)
        assert len(cache.inbound) == 50
        kept_types = [raw[1] for raw, _ in cache.inbound.values()]
        assert len({id(t) for t in kept_types}) == len(set(kept_types)) == 2  # comment NULL or text
    finally:
        engine.dispose()
