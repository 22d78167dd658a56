"""Shared fixtures: rule databases on SQLite, PostgreSQL and MariaDB.

PostgreSQL and MariaDB tests each get a database of their own, created and dropped around the
test. In CI (CI=true) an unreachable server fails the test; elsewhere it is skipped with the
reason, so a laptop without the servers can still run the rest.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

PG_ADMIN = os.environ.get("TLSGATE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIA_ADMIN = os.environ.get("TLSGATE_TEST_MARIADB", "mariadb+pymysql://root@127.0.0.1:3306/test")


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable: {exc}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def own_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty configuration file and no TLSGATE_DATABASE_URL: the commands under test read
    nothing of this host's /etc/tlsgate or environment."""
    config = tmp_path / "tlsgate.conf"
    config.write_text("")
    monkeypatch.setenv("TLSGATE_CONFIG", str(config))
    monkeypatch.delenv("TLSGATE_DATABASE_URL", raising=False)


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    return f"sqlite:///{tmp_path}/rules.sqlite"


@pytest.fixture
def pg_url() -> Iterator[str]:
    name = "tlsgate_" + uuid.uuid4().hex[:12]
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
    except Exception as exc:
        admin.dispose()
        _unavailable("PostgreSQL", exc)
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    name = "tlsgate_" + uuid.uuid4().hex[:12]
    admin = create_engine(MARIA_ADMIN)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
    except Exception as exc:
        admin.dispose()
        _unavailable("MariaDB", exc)
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql),
                        pytest.param("mariadb", marks=pytest.mark.mariadb)])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database of each dialect in turn."""
    fixture = {"sqlite": "sqlite_url", "postgresql": "pg_url", "mariadb": "mariadb_url"}[request.param]
    url: str = request.getfixturevalue(fixture)
    return url
