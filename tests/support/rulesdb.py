"""A rule database for a test: the schema, then rows written with plain SQL as an
administrator would (SQLite's own client library, not tlsgate's code)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tlsgate.store import init_schema, open_engine


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
