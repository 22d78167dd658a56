"""A rule database that stops answering: a network partition that keeps the connections open
(a frozen TCP proxy between the daemon and PostgreSQL or MariaDB), a server that accepts and
never answers at start, and a lock an administrator holds in an open transaction.

Every case must end within bounded time (``[database] query_timeout``, and the stall watch of
the rule holder after connect_timeout + 1.5 x query_timeout) with the outage logged once, the
holder unhealthy, its thread alive (a watchdog restart would throw the last rules away) and the
last rules still deciding; and with "reachable again" once the database answers. The timeouts
here are 1 s, so that each case takes a few seconds. Every wait is on a log line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.reliability.freezeproxy import FreezableProxy
from tests.reliability.results import record
from tests.support.rulesdb import seed_one_connector
from tlsgate.config import ConfigError, DatabaseConfig, load_config
from tlsgate.rules import RuleHolder
from tlsgate.store import open_engine

BACKENDS = [pytest.param("postgresql", marks=pytest.mark.postgresql),
            pytest.param("mariadb", marks=pytest.mark.mariadb)]
FAST = {"poll_interval": 0.2, "connect_timeout": 1.0, "query_timeout": 1.0}
FIGURES: dict[str, int | str] = {
    "title": "A database that stops answering (seconds until the outage is logged)",
    "note": "With connect_timeout and query_timeout at 1 s. Partition: a TCP proxy between daemon and "
            "server stops forwarding and keeps the connections open; PostgreSQL's stuck call is reported by "
            "the stall watch (connect_timeout + 1.5 x query_timeout) and goes on until the proxy thaws, "
            "MariaDB's ends with PyMySQL's read_timeout. "
            "Lock held: an open `BEGIN; ALTER TABLE inbound_domain ...` (PostgreSQL), `LOCK TABLES "
            "inbound_domain WRITE` (MariaDB). Each time the last rules keep deciding, the holder's thread "
            "stays alive (no watchdog restart) and \"reachable again\" is logged once the database answers.",
}


class Lines(logging.Handler):
    """The messages of tlsgate.rules; ``wait`` for one that contains a text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.messages.append(record.getMessage())
            self._changed.notify_all()

    def wait(self, wanted: str, timeout: float = 15) -> str:
        with self._changed:
            found = self._changed.wait_for(lambda: [m for m in self.messages if wanted in m], timeout)
        assert found, f"no log line with {wanted!r} in {timeout} s: {self.messages}"
        return found[0]

    def count(self, wanted: str) -> int:
        with self._changed:
            return sum(wanted in m for m in self.messages)


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("tlsgate.rules")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _through(url: str, proxy: FreezableProxy) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def _server_port(url: str) -> int:
    parsed = make_url(url)
    return parsed.port or (5432 if parsed.get_backend_name() == "postgresql" else 3306)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_partition_is_reported_and_the_last_rules_keep_deciding(
    backend: str, request: pytest.FixtureRequest, lines: Lines
) -> None:
    url = request.getfixturevalue("pg_url" if backend == "postgresql" else "mariadb_url")
    seed_one_connector(url)
    proxy = FreezableProxy(_server_port(url))
    holder = RuleHolder(DatabaseConfig(url=_through(url, proxy), **FAST))
    holder.start()
    try:
        lines.wait("loaded rules generation")
        good = holder.snapshot
        proxy.freeze()  # the connection stays open; nothing answers
        frozen = time.monotonic()
        outage = lines.wait("cannot reach the rule database")
        took = time.monotonic() - frozen
        # the stall watch's limit, connect_timeout + 1.5 x query_timeout, and a poll interval
        assert took < FAST["connect_timeout"] + 1.5 * FAST["query_timeout"] + FAST["poll_interval"] + 1, took
        assert not holder.healthy and holder.alive and holder.snapshot is good and holder.db_errors >= 1
        assert "still deciding with rules generation" in outage
        FIGURES[f"partition, {backend}"] = f"{took:.1f}"
        proxy.thaw()
        lines.wait("is reachable again")
        assert holder.healthy and lines.count("cannot reach") == 1
    finally:
        proxy.thaw()
        holder.stop()
        proxy.close()


@pytest.mark.mariadb
def test_a_server_that_accepts_and_never_answers_at_start(mariadb_url: str, lines: Lines) -> None:
    """PyMySQL's connect_timeout covers the TCP connect only: the server's greeting was awaited
    for ever, the daemon answering temporary failures without a word in its log."""
    seed_one_connector(mariadb_url)
    proxy = FreezableProxy(_server_port(mariadb_url))
    proxy.freeze()
    holder = RuleHolder(DatabaseConfig(url=_through(mariadb_url, proxy), **FAST))
    started = time.monotonic()
    holder.start()
    try:
        assert holder.first_attempt.wait(15), "the first attempt never ended"
        took = time.monotonic() - started
        line = lines.wait("cannot load rules")
        assert holder.snapshot is None and not holder.healthy
        assert "answering temporary failures" in line
        assert took < FAST["connect_timeout"] + FAST["query_timeout"] + 2, took
        FIGURES["silent server at start, mariadb"] = f"{took:.1f}"
        proxy.thaw()
        lines.wait("loaded rules generation")
        assert holder.healthy
    finally:
        proxy.thaw()
        holder.stop()
        proxy.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lock_held_in_an_open_transaction_is_reported(
    backend: str, request: pytest.FixtureRequest, lines: Lines
) -> None:
    """An administrator's `BEGIN; ALTER TABLE inbound_domain ...` left open in psql (on MariaDB,
    LOCK TABLES ... WRITE): the load waits on the lock for at most query_timeout."""
    url = request.getfixturevalue("pg_url" if backend == "postgresql" else "mariadb_url")
    seed_one_connector(url)
    holder = RuleHolder(DatabaseConfig(url=url, **FAST))
    admin = open_engine(url)
    locker = admin.connect()
    try:
        assert holder.refresh()
        with admin.begin() as conn:
            conn.execute(text("UPDATE inbound_connector SET mode = 'monitor'"))  # a change to load
        if backend == "postgresql":
            tx = locker.begin()
            locker.execute(text("ALTER TABLE inbound_domain ADD COLUMN note text"))
        else:
            locker.execute(text("LOCK TABLES inbound_domain WRITE"))
        started = time.monotonic()
        done = threading.Event()
        threading.Thread(target=lambda: (holder.refresh(), done.set()), daemon=True).start()
        assert done.wait(15), "the load waits on the lock for as long as it is held"
        took = time.monotonic() - started
        outage = lines.wait("cannot reach the rule database")
        assert took < FAST["query_timeout"] + 2 and not holder.healthy
        # the cause, not the failed rollback after it (PyMySQL's says only "(0, '')")
        assert "(0, '')" not in outage and ("timed out" in outage or "timeout" in outage), outage
        FIGURES[f"lock held, {backend}"] = f"{took:.1f}"
        if backend == "postgresql":
            tx.rollback()
        else:
            locker.execute(text("UNLOCK TABLES"))
        assert holder.refresh() is True
        assert holder.healthy and holder.snapshot is not None
        assert holder.snapshot.inbound[0].mode.value == "monitor"
    finally:
        locker.close()  # ends the transaction, or the lock: a load still waiting goes on
        admin.dispose()
        holder.stop()
        record("database-stalls", FIGURES)


@pytest.mark.postgresql
def test_postgresql_sessions_carry_the_deadline_and_the_url_s_own_options_win(pg_url: str) -> None:
    engine = open_engine(pg_url, query_timeout=1.5)
    own = open_engine(pg_url + "?options=-c%20statement_timeout%3D7000", query_timeout=1.5)
    cli = open_engine(pg_url)  # no deadline: `tlsgate db upgrade` may rewrite big tables
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "1500ms"
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "1500ms"
            sent = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
            assert sent["tcp_user_timeout"] == "1500" and sent["keepalives"] == "1"
        with own.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "7s"
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "1500ms"
        with cli.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "0"
    finally:
        engine.dispose()
        own.dispose()
        cli.dispose()


def test_query_timeout_is_a_setting_with_a_bounded_default(tmp_path: object) -> None:
    assert DatabaseConfig().query_timeout == 30.0
    path = f"{tmp_path}/tlsgate.conf"
    with open(path, "w") as fh:
        fh.write("[database]\nquery_timeout = 12.5\n")
    assert load_config(path, environ={}).database.query_timeout == 12.5
    with open(path, "w") as fh:
        fh.write("[database]\nquery_timeout = 0\n")
    with pytest.raises(ConfigError, match=r"\[database\] query_timeout = '0': must be between 0 and 86400"):
        load_config(path, environ={})
