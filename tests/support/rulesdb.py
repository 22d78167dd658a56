"""A rule database for a test: the schema, then rows written with plain SQL as an
administrator would (SQLite's own client library, not tlsgate's code)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import text

from tlsgate.store import LoadResult, init_schema, load, open_engine


def make_rules_db(path: Path, sql: str = "") -> str:
    """Create an SQLite rule database at ``path``, run ``sql`` in it; its URL."""
    url = f"sqlite:///{path}"
    engine = open_engine(url)
    init_schema(engine)
    engine.dispose()
    if sql:
        con = sqlite3.connect(path)
        try:
            con.executescript(sql)
            con.commit()
        finally:
            con.close()
    return url


def seed_one_connector(url: str) -> None:
    """The schema and connector ``a`` (sender domain a.test) in the database at ``url``, of
    any dialect."""
    engine = open_engine(url)
    init_schema(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO inbound_connector (name) VALUES ('a')"))
        conn.execute(text("INSERT INTO inbound_domain VALUES ('a', 'sender', 'a.test')"))
    engine.dispose()


def load_unchecked(path: Path, *statements: str | tuple[str, tuple[object, ...]]) -> LoadResult:
    """Write ``statements`` (SQL, or SQL with its parameters) into a fresh rule database at
    ``path`` the way an sqlite3 shell can, with CHECK constraints and foreign keys off, and
    load it as a daemon does."""
    url = make_rules_db(path)
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA ignore_check_constraints = ON")
        con.execute("PRAGMA foreign_keys = OFF")
        for statement in statements:
            if isinstance(statement, str):
                con.execute(statement)
            else:
                con.execute(*statement)
        con.commit()
    finally:
        con.close()
    engine = open_engine(url)
    try:
        return load(engine)
    finally:
        engine.dispose()
