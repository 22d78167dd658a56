"""RuleHolder: change detection, atomic swaps, and a database outage logged once."""

from __future__ import annotations

import gc
import logging
import sqlite3
import weakref
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tlsgate import logsetup
from tlsgate.config import DatabaseConfig
from tlsgate.rules import RuleHolder
from tlsgate.snapshot import Snapshot
from tlsgate.store import init_schema, open_engine


def _seed(url: str) -> None:
    engine = open_engine(url)
    init_schema(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO inbound_connector (name) VALUES ('a')"))
        conn.execute(text("INSERT INTO inbound_domain VALUES ('a', 'sender', 'a.test')"))
    engine.dispose()


def test_reload_only_when_generation_moves(sqlite_url: str) -> None:
    _seed(sqlite_url)
    holder = RuleHolder(DatabaseConfig(url=sqlite_url))
    assert holder.snapshot is None
    assert holder.refresh() is True
    first = holder.snapshot
    assert first is not None and [c.name for c in first.inbound] == ["a"]
    assert holder.refresh() is False
    assert holder.snapshot is first
    engine = open_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE inbound_connector SET mode = 'monitor' WHERE name = 'a'"))
    engine.dispose()
    assert holder.refresh() is True
    second = holder.snapshot
    assert second is not None and second is not first
    assert second.generation > first.generation
    assert second.inbound[0].mode.value == "monitor"
    assert first.inbound[0].mode.value == "enforce"  # the old snapshot is untouched
    holder.stop()


def test_never_loaded_stays_none_and_logs_once(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    holder = RuleHolder(DatabaseConfig(url=f"sqlite:///{tmp_path}/missing.sqlite"))
    with caplog.at_level(logging.ERROR, logger="tlsgate.rules"):
        assert holder.refresh() is False
        assert holder.refresh() is False
    assert holder.snapshot is None
    assert not holder.healthy
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "answering temporary failures" in lines[0]


@pytest.mark.postgresql
def test_outage_keeps_last_snapshot_and_is_logged_once(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    _seed(pg_url)
    holder = RuleHolder(DatabaseConfig(url=pg_url, connect_timeout=2))
    assert holder.refresh() is True
    good = holder.snapshot
    name = pg_url.rsplit("/", 1)[1]
    admin = create_engine(pg_url.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"))
        conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
    try:
        with caplog.at_level(logging.WARNING, logger="tlsgate.rules"):
            for _ in range(3):
                assert holder.refresh() is False
            assert holder.snapshot is good
            assert not holder.healthy
            outage = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(outage) == 1
            assert "still deciding with rules generation" in outage[0].getMessage()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true"))
        admin.dispose()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tlsgate.rules"):
        holder.refresh()
    assert holder.healthy
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    holder.stop()


def test_background_thread_and_forced_reload(sqlite_url: str) -> None:
    _seed(sqlite_url)
    swapped: list[int] = []
    import threading

    event = threading.Event()

    def on_swap(snap: Snapshot) -> None:
        swapped.append(snap.generation)
        event.set()

    holder = RuleHolder(DatabaseConfig(url=sqlite_url, poll_interval=3600), on_swap=on_swap)
    holder.start()
    try:
        assert event.wait(10), "first load did not happen"
        event.clear()
        holder.request_reload()  # SIGHUP: a full load even though nothing changed
        assert event.wait(10), "forced reload did not happen"
        assert len(swapped) == 2 and swapped[0] == swapped[1]
    finally:
        holder.stop()


def _sql(url: str, statement: str) -> None:
    engine = open_engine(url)
    with engine.begin() as conn:
        conn.execute(text(statement))
    engine.dispose()


def test_a_counter_that_is_no_number_is_an_outage_not_a_crash(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    _seed(sqlite_url)
    holder = RuleHolder(DatabaseConfig(url=sqlite_url))
    assert holder.refresh() is True
    first = holder.snapshot
    _sql(sqlite_url, "UPDATE rules_generation SET generation = 'oops'")  # SQLite keeps it as text
    with caplog.at_level(logging.ERROR, logger="tlsgate.rules"):
        assert holder.refresh() is False
        assert holder.refresh() is False
    assert holder.snapshot is first and not holder.healthy
    assert [r.getMessage() for r in caplog.records] == [
        "cannot reach the rule database: rules_generation.generation (id = 1) is 'oops', not a whole number; "
        f"still deciding with rules generation {first.generation} loaded at "
        f"{first.loaded_at:%Y-%m-%d %H:%M:%S %Z}"]
    _sql(sqlite_url, "UPDATE rules_generation SET generation = 100")
    assert holder.refresh() is True and holder.healthy
    assert holder.snapshot is not None and holder.snapshot.generation == 100


def test_an_unforeseen_failure_keeps_the_rules_and_the_thread(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    import tlsgate.rules

    _seed(sqlite_url)
    loaded = threading.Event()
    holder = RuleHolder(DatabaseConfig(url=sqlite_url, poll_interval=0.05), on_swap=lambda _: loaded.set())
    real_load = tlsgate.rules.load
    failures = []

    def failing_load(*args: object, **kwargs: object) -> object:
        if holder.snapshot is not None and len(failures) < 2:
            failures.append(1)
            raise AttributeError("a bug in loading")
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tlsgate.rules, "load", failing_load)
    monkeypatch.setattr(logsetup, "_tracebacks_shown", {})
    holder.start()
    try:
        assert loaded.wait(10), "first load did not happen"
        first = holder.snapshot
        assert first is not None
        loaded.clear()
        with caplog.at_level(logging.ERROR, logger="tlsgate.rules"):
            _sql(sqlite_url, "INSERT INTO inbound_connector (name) VALUES ('b')")
            assert loaded.wait(10), "the change was never loaded"
        assert holder.alive and holder.healthy and len(failures) == 2
        assert holder.snapshot is not None and [c.name for c in holder.snapshot.inbound] == ["a", "b"]
        messages = [r.getMessage() for r in caplog.records]
        assert messages[0] == "loading rules failed" and caplog.records[0].exc_info is not None
        assert messages[1].startswith("cannot reach the rule database: loading rules failed: AttributeError: a bug")
    finally:
        holder.stop()


def test_alive_while_the_polling_thread_runs(sqlite_url: str) -> None:
    _seed(sqlite_url)
    holder = RuleHolder(DatabaseConfig(url=sqlite_url, poll_interval=3600))
    assert holder.alive  # not started: loads are the caller's (a spawned policy daemon's first)
    holder.start()
    assert holder.first_attempt.wait(10) and holder.alive
    holder.stop()
    assert not holder.alive  # a daemon's watchdog pings stop, and systemd restarts it


def test_a_daemon_s_snapshot_is_frozen_out_of_the_collector_and_still_freed(sqlite_url: str) -> None:
    """The snapshot a holder loads is not scanned by the cyclic collector, and a snapshot
    replaced by a later load is freed all the same (the frozen set does not grow per load)."""
    engine = open_engine(sqlite_url)
    init_schema(engine)
    with engine.begin() as conn:
        for i in range(200):
            conn.execute(text("INSERT INTO inbound_connector (name) VALUES (:n)"), {"n": f"c{i}"})
            conn.execute(text("INSERT INTO inbound_domain VALUES (:n, 'sender', :d)"), {"n": f"c{i}", "d": f"c{i}.test"})
    holder = RuleHolder(DatabaseConfig(url=sqlite_url))
    try:
        assert holder.refresh(force=True)
        snap = holder.snapshot
        assert snap is not None
        scanned = {id(o) for generation in (0, 1, 2) for o in gc.get_objects(generation)}
        assert id(snap.inbound[0]) not in scanned and id(snap) not in scanned
        del snap, scanned
        counts = []
        for i in range(12):
            with engine.begin() as conn:
                conn.execute(text("UPDATE inbound_connector SET mode = :m"), {"m": ("monitor", "enforce")[i % 2]})
            assert holder.refresh(force=True)  # every connector built afresh
            counts.append(gc.get_freeze_count())
        # 200 connectors are thousands of objects: a snapshot kept alive per load would show
        assert counts[-1] - counts[1] < 2000, counts
    finally:
        holder.stop()
        engine.dispose()
        gc.unfreeze()


class _Node:
    pass


def test_garbage_left_before_a_load_is_collected_not_frozen(sqlite_url: str, tmp_path: Path) -> None:
    """A freeze keeps what it takes forever: garbage cycles are collected first (before the
    process's first load, after each later one), and a load that fails (a database without the
    schema yet, polled again and again) freezes nothing."""
    _seed(sqlite_url)
    holder = RuleHolder(DatabaseConfig(url=sqlite_url))
    sqlite3.connect(tmp_path / "empty.sqlite").close()
    broken = RuleHolder(DatabaseConfig(url=f"sqlite:///{tmp_path}/empty.sqlite"))
    was_enabled = gc.isenabled()
    gc.disable()  # each cycle below must still be there when its load starts
    gc.unfreeze()  # as in a new process: nothing frozen yet
    try:
        assert broken.refresh() is False  # a first load that fails freezes nothing...
        assert gc.get_freeze_count() == 0
        for _ in range(2):  # ...so the next one is still the first freeze, then a later one
            node = _Node()
            node.me = node  # type: ignore[attr-defined]
            gone = weakref.ref(node)
            del node
            assert gone() is not None
            assert holder.refresh(force=True)
            assert gone() is None
            assert gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        for _ in range(5):
            assert broken.refresh() is False
        assert gc.get_freeze_count() == frozen
    finally:
        if was_enabled:
            gc.enable()
        holder.stop()
        broken.stop()
        gc.unfreeze()
