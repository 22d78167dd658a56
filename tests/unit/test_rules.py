"""RuleHolder: change detection, atomic swaps, and a database outage logged once."""

from __future__ import annotations

import gc
import logging
import os
import sqlite3
import sys
import threading
import weakref
from pathlib import Path
from types import FrameType

import pytest
from sqlalchemy import create_engine, text

from tests.support.rulesdb import seed_one_connector
from tlsgate import logsetup
from tlsgate.config import DatabaseConfig
from tlsgate.rules import RuleHolder
from tlsgate.snapshot import Snapshot
from tlsgate.store import MISSING_GENERATION, init_schema, open_engine


def test_reload_only_when_generation_moves(sqlite_url: str) -> None:
    seed_one_connector(sqlite_url)
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


def test_the_status_systemd_shows_tells_of_an_outage(sqlite_url: str, tmp_path: object) -> None:
    missing = RuleHolder(DatabaseConfig(url=f"sqlite:///{tmp_path}/missing.sqlite"))
    missing.refresh()
    assert missing.status.startswith("no rules loaded yet: answering temporary failures; "
                                     "rule database unreachable: database sqlite:///"), missing.status
    seed_one_connector(sqlite_url)
    holder = RuleHolder(DatabaseConfig(url=sqlite_url))
    assert holder.refresh()
    generation = holder.snapshot.generation  # type: ignore[union-attr]
    assert holder.status == f"rules generation {generation}: 1 inbound, 0 outbound connectors"
    engine = open_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE schema_version"))
        conn.execute(text("UPDATE inbound_connector SET mode = 'monitor'"))
    engine.dispose()
    assert not holder.refresh()
    assert holder.status.startswith(f"rules generation {generation}: 1 inbound, 0 outbound connectors; "
                                    "rule database unreachable: "), holder.status
    assert "schema_version" in holder.status
    # the latest cause, not the first one of the outage
    engine = open_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE schema_version (version INTEGER)"))
        conn.execute(text("INSERT INTO schema_version VALUES (1)"))
        conn.execute(text("DROP TABLE inbound_domain"))
    engine.dispose()
    assert not holder.refresh()
    assert "inbound_domain" in holder.status and "schema_version" not in holder.status, holder.status
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
    seed_one_connector(pg_url)
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
    seed_one_connector(sqlite_url)
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


def test_after_an_outage_the_rules_are_read_whatever_the_counter_says(sqlite_url: str) -> None:
    # The counter's row deleted by hand: rules changed meanwhile bump nothing, and `db upgrade`
    # restores the row with a counter that may be the very one in force.
    seed_one_connector(sqlite_url)
    holder = RuleHolder(DatabaseConfig(url=sqlite_url))
    assert holder.refresh() is True
    first = holder.snapshot
    assert first is not None
    _sql(sqlite_url, "UPDATE rules_generation SET generation = 'oops'")  # unreadable: an outage
    assert holder.refresh() is False and not holder.healthy
    _sql(sqlite_url, "UPDATE inbound_connector SET mode = 'monitor' WHERE name = 'a'")
    _sql(sqlite_url, f"UPDATE rules_generation SET generation = {first.generation}")  # restored as it was
    assert holder.refresh() is True and holder.healthy
    assert holder.snapshot is not None and holder.snapshot.inbound[0].mode.value == "monitor"
    assert holder.refresh() is False  # and polls on by the counter again
    holder.stop()


def test_a_deleted_counter_row_is_loaded_once_and_its_return_applies(sqlite_url: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    # Without its row nothing can tell a change: the rules are read once, with the load's error
    # logged, and neither reloaded at every poll nor taken for an outage; the row's return is.
    seed_one_connector(sqlite_url)
    holder = RuleHolder(DatabaseConfig(url=sqlite_url))
    assert holder.refresh() is True
    _sql(sqlite_url, "DELETE FROM rules_generation")
    with caplog.at_level(logging.INFO, logger="tlsgate.rules"):
        assert holder.refresh() is True
        assert [holder.refresh() for _ in range(3)] == [False] * 3
    assert holder.healthy and holder.snapshot is not None and holder.snapshot.generation == MISSING_GENERATION
    assert sum("has no row id = 1" in r.getMessage() for r in caplog.records) == 1
    _sql(sqlite_url, "UPDATE inbound_connector SET mode = 'monitor' WHERE name = 'a'")  # bumps nothing
    _sql(sqlite_url, "INSERT INTO rules_generation (id, generation) VALUES (1, 0)")  # `db upgrade`
    assert holder.refresh() is True
    assert holder.snapshot is not None and holder.snapshot.inbound[0].mode.value == "monitor"
    holder.stop()


def test_a_counter_that_is_no_number_is_an_outage_not_a_crash(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    seed_one_connector(sqlite_url)
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

    seed_one_connector(sqlite_url)
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
    seed_one_connector(sqlite_url)
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
    seed_one_connector(sqlite_url)
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


class _Lines(logging.Handler):
    """The messages of tlsgate.rules, and an event for the first one containing ``wanted``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.waiting: dict[str, threading.Event] = {}
        self._logger = logging.getLogger("tlsgate.rules")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        for wanted, event in self.waiting.items():
            if wanted in message:
                event.set()

    def wait(self, wanted: str, timeout: float = 10) -> bool:
        event = self.waiting.setdefault(wanted, threading.Event())
        if any(wanted in m for m in self.messages):
            event.set()
        return event.wait(timeout)

    def __enter__(self) -> _Lines:
        self._level = self._logger.level
        self._logger.setLevel(logging.DEBUG)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def test_a_poll_that_never_returns_is_reported_once_and_the_rules_keep_deciding(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that keeps the connection and never answers: the poll stays in the driver,
    and the watch reports the outage after connect_timeout + 1.5 x query_timeout, once."""
    import tlsgate.rules

    seed_one_connector(sqlite_url)
    cfg = DatabaseConfig(url=sqlite_url, poll_interval=0.05, connect_timeout=0.2, query_timeout=0.2)
    holder = RuleHolder(cfg)
    assert holder.refresh()
    good = holder.snapshot
    entered, answer = threading.Event(), threading.Event()
    real = tlsgate.rules.read_generation

    def silent_database(engine: object) -> int:
        entered.set()
        answer.wait(30)
        return real(engine)  # type: ignore[arg-type]

    monkeypatch.setattr(tlsgate.rules, "read_generation", silent_database)
    with _Lines() as lines:
        holder.start()
        try:
            assert entered.wait(10)
            assert lines.wait("cannot reach the rule database"), lines.messages
            assert not holder.healthy and holder.alive and holder.snapshot is good
            assert holder.db_errors == 1
            [outage] = [m for m in lines.messages if "cannot reach" in m]
            assert "no answer in 0.5 s (query_timeout 0.2 s)" in outage and "still deciding with rules" in outage
            # Another caller (policyd's SIGHUP reload) waits no longer than the watch did.
            assert holder.refresh(force=True) is False
            answer.set()  # the database answers at last
            assert lines.wait("is reachable again"), lines.messages
            assert holder.healthy and holder.db_errors == 1
            assert lines.wait("loaded rules generation"), lines.messages  # the forced load left pending
        finally:
            answer.set()
            holder.stop()
    assert sum("cannot reach" in m for m in lines.messages) == 1


def test_one_row_that_is_not_utf8_is_that_row_s_error_not_an_outage(tmp_path: Path) -> None:
    """An sqlite3 shell on a Latin-1 terminal writes 'bücher.test' as the byte 0xFC: that row's
    connector fails closed, named by the error, and every other change is still loaded."""
    path = tmp_path / "rules.sqlite"
    url = f"sqlite:///{path}"
    seed_one_connector(url)
    holder = RuleHolder(DatabaseConfig(url=url))
    try:
        assert holder.refresh()
        con = sqlite3.connect(path)
        con.executescript(
            "INSERT INTO inbound_connector (name) VALUES ('books');"
            "INSERT INTO inbound_domain VALUES ('books', 'sender', CAST(x'62fc636865722e74657374' AS TEXT));"
            "INSERT INTO inbound_connector (name) VALUES ('later');"
            "INSERT INTO inbound_domain VALUES ('later', 'sender', 'later.test');")
        con.close()
        assert holder.refresh() is True and holder.healthy
        snap = holder.snapshot
        assert snap is not None
        by_name = {c.name: c for c in snap.inbound}
        assert set(by_name) == {"a", "books", "later"}
        assert not by_name["later"].problems and not by_name["a"].problems
        [problem] = by_name["books"].problems  # misconfigured: its mail gets a temporary failure
        assert problem.startswith("inbound_domain ('books', 'sender', 'b\\udcfccher.test') column pattern: ")
        assert any("inbound_domain ('books'" in e for e in snap.errors)
    finally:
        holder.stop()


def test_a_sqlite_file_renamed_into_place_is_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A backup restored over the live file (with os.replace, as `cp` to a temp name and `mv`
    do): the pool's connection still reads the old file, until the poll sees another inode."""
    live = tmp_path / "rules.sqlite"
    seed_one_connector(f"sqlite:///{live}")
    holder = RuleHolder(DatabaseConfig(url=f"sqlite:///{live}"))
    try:
        assert holder.refresh()
        first = holder.snapshot
        assert first is not None
        aside = tmp_path / "restored.sqlite"
        seed_one_connector(f"sqlite:///{aside}")
        # The same counter as the rules in force (a backup of the same day): read all the same.
        _sql(f"sqlite:///{aside}", "UPDATE inbound_domain SET pattern = 'restored.test'")
        _sql(f"sqlite:///{aside}", f"UPDATE rules_generation SET generation = {first.generation}")
        os.replace(aside, live)
        with caplog.at_level(logging.INFO, logger="tlsgate.rules"):
            assert holder.refresh() is True
            assert holder.refresh() is False  # read once, then polled as usual
        snap = holder.snapshot
        assert snap is not None and str(snap.inbound[0].sender_domains[0]) == "restored.test"
        replaced = [r.getMessage() for r in caplog.records if "replaced" in r.getMessage()]
        assert replaced == [f"rule database file {live} was replaced: reading the new file"]
    finally:
        holder.stop()


def test_an_unforeseen_failure_is_logged_once_per_outage(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import tlsgate.rules

    seed_one_connector(sqlite_url)
    holder = RuleHolder(DatabaseConfig(url=sqlite_url))
    assert holder.refresh()
    fault = ["a value of a type nobody expected"]

    def failing_load(*args: object, **kwargs: object) -> object:
        raise AttributeError(fault[0])

    monkeypatch.setattr(tlsgate.rules, "load", failing_load)
    monkeypatch.setattr(logsetup, "_tracebacks_shown", {})
    monkeypatch.setattr(logsetup, "_clock", lambda: 0.0)  # every poll within the traceback interval
    with caplog.at_level(logging.ERROR, logger="tlsgate.rules"):
        for _ in range(5):
            holder.refresh(force=True)
        fault[0] = "another fault"
        for _ in range(5):
            holder.refresh(force=True)
    holder.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0] == "loading rules failed" and caplog.records[0].exc_info is not None
    assert lines[1].startswith("cannot reach the rule database: loading rules failed: AttributeError: a value")
    # A new fault is logged once too (its traceback only if none of its kind was shown lately).
    assert lines[2].startswith("loading rules failed (AttributeError: another fault;")
    assert holder.db_errors == 10


@pytest.mark.parametrize("landing", range(1, 13))
def test_a_reload_request_is_never_lost_wherever_it_lands(sqlite_url: str, landing: int) -> None:
    """request_reload (SIGHUP) at every line of the poll loop in turn, as a signal or another
    thread can: a forced load always follows it."""
    seed_one_connector(sqlite_url)
    forced_after: list[bool] = []
    sent = threading.Event()

    class Holder(RuleHolder):
        def refresh(self, force: bool = False) -> bool:
            if sent.is_set():
                forced_after.append(force)
                if force or len(forced_after) >= 3:
                    self._stop.set()
            return super().refresh(force)

    holder = Holder(DatabaseConfig(url=sqlite_url, poll_interval=0.01))
    assert holder.refresh()
    code = RuleHolder._run.__code__
    lines = [0]

    def local(frame: FrameType, event: str, arg: object) -> object:
        if event == "line" and not sent.is_set():
            lines[0] += 1
            if lines[0] == landing:
                sent.set()
                holder.request_reload()
        return local

    def trace(frame: FrameType, event: str, arg: object) -> object:
        return local if frame.f_code is code else None

    sys.settrace(trace)
    try:
        holder._run()
    finally:
        sys.settrace(None)
        holder.stop()
    assert sent.is_set() and True in forced_after, f"a reload requested at line event {landing} was lost"
