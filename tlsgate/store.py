"""The rule database: connecting, creating and upgrading the schema, and loading a snapshot.

Loading reads every rule table once, in one transaction, as raw values: rows written by hand
may hold anything (SQLite has no types, a database may lack the CHECK constraints), and a bad
value must become a named problem, never an exception. A connector with a problem keeps the
scope that could be parsed and is marked misconfigured, so mail in that scope gets a
temporary failure while every other connector keeps working. ORM rows never leave this module.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from tlsgate import schema
from tlsgate.certs import CertificateError, pin_from_pem
from tlsgate.dnsranges import ALL_ADDRESSES, parse_entry
from tlsgate.model import (
    CertRequirement,
    FailAction,
    InboundConnector,
    Mode,
    OutboundConnector,
    Pin,
    SmartHost,
    TlsLevel,
)
from tlsgate.outbound import hop_clashes, next_hop, pinned_prints
from tlsgate.patterns import (
    CertNamePattern,
    DomainKind,
    DomainPattern,
    IssuerPattern,
    Network,
    PatternError,
    parse_address,
    parse_network,
    to_a_label,
)
from tlsgate.snapshot import Snapshot

log = logging.getLogger("tlsgate.store")

DEFAULT_DATABASE_URL = "sqlite:////var/lib/tlsgate/rules.sqlite"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ANY_DOMAIN = DomainPattern.parse("*")

_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}


class StoreError(Exception):
    """The database cannot be used; the message is fit for one log line (no password)."""


# user:password@ of a URL masked by hand: greedy up to the last '@', since a password may hold
# one (and so may a user name, user@server on some hosted databases): masking too much is
# harmless, showing part of a password is not.
_URL_PASSWORD = re.compile(r"(://[^:/]*:).*@")
#: a password with an '@' in it, maybe a '/' or '?' too: two '@' after the scheme (an '@' in the
#: path or query alone is masked with it, which is harmless)
_PASSWORD_WITH_AT = re.compile(r"://[^@]*@.*@")
#: a quoted value in an error message that runs through an '@', 'word@db.example': SQLAlchemy
#: read it from the rest of a password that holds an '@', up to which it may be password
_QUOTED_TO_AT = re.compile(r"'[^'\s]+@")


def safe_url(url: str | URL) -> str:
    """The URL with any password masked, for logs and error messages.

    SQLAlchemy ends a password at its first '@' and takes the rest for the host, so a password
    holding an unescaped '@' would be shown in part: such a URL (two '@' after the user name,
    or a host read with an '@' in it) is masked by hand, up to the last '@'."""
    raw = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        # make_url raises ValueError for a port that is no number or an unclosed '[': such a
        # URL is still worth showing, with its password masked by hand.
        return _URL_PASSWORD.sub(r"\1***@", raw)
    if "@" in (parsed.host or "") or _PASSWORD_WITH_AT.search(raw):
        return _URL_PASSWORD.sub(r"\1***@", raw)
    if parsed.password is not None and parsed.get_backend_name() != "sqlite" and "@" in (parsed.database or ""):
        # parsed from a password holding '@' and '/': its rest is the host and the database
        return parsed.set(host="***", database="***", query={}).render_as_string(hide_password=True)
    return parsed.render_as_string(hide_password=True)


#: what SQLAlchemy raises for a URL, or its query settings, that it cannot use: ArgumentError,
#: and ValueError or TypeError from converting a port or a driver setting such as connect_timeout
_BAD_URL = (ArgumentError, ValueError, TypeError)


def _invalid_url(url: str | URL, exc: Exception) -> StoreError:
    """The one-line error for an unusable URL; SQLAlchemy's message may quote the URL, password
    and all, or a port read from the rest of a password holding an '@', so the password is
    masked in it too."""
    raw = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    masked = safe_url(url)
    lines = str(exc).strip().splitlines()
    reason = _URL_PASSWORD.sub(r"\1***@", (lines[0] if lines else type(exc).__name__).replace(raw, masked))
    reason = _QUOTED_TO_AT.sub("'***@", reason)
    return StoreError(f"invalid database URL {masked}: {reason}")


def normalise_url(url: str) -> URL:
    """Parse a database URL; plain ``postgresql://`` and ``mysql://`` get the drivers we ship."""
    try:
        parsed = make_url(url)
    except _BAD_URL as exc:
        raise _invalid_url(url, exc) from None
    if _unescaped_at(url, parsed):
        raise StoreError(f"invalid database URL {safe_url(url)}: the password holds an '@': write it as %40 "
                         "(read as written, the rest of the password would be taken for the host)")
    driver = _DRIVERS.get(parsed.drivername)
    if driver:
        parsed = parsed.set(drivername=driver)
    if parsed.get_backend_name() not in ("sqlite", "postgresql", "mysql", "mariadb"):
        raise StoreError(
            f"unsupported database {parsed.get_backend_name()!r} in {safe_url(parsed)}: "
            "use sqlite, postgresql or mariadb"
        )
    return parsed


def _unescaped_at(url: str, parsed: URL) -> bool:
    """Whether ``url`` holds an '@' that SQLAlchemy read as the end of the password, so that
    the rest of the password became the host (or vanished, after a '/' or '?'): a host never
    holds an '@', and every other '@' of the URL is in some part of what was parsed."""
    if "@" in (parsed.host or ""):
        return True
    if parsed.get_backend_name() != "sqlite":
        # user:pass@host/db: past the user name, one '@' ends the password; a second one
        # before the query means the password held one (the database would have it otherwise).
        before_query = url.partition("://")[2].partition("?")[0]
        if before_query.partition(":")[2].count("@") > 1:
            return True
    parts = [parsed.username, parsed.password, parsed.database]
    for key, value in parsed.query.items():
        parts += [key, *((value,) if isinstance(value, str) else value)]
    accounted = sum((part or "").count("@") for part in parts)
    separator = 1 if parsed.username is not None or parsed.password is not None else 0
    return url.partition("://")[2].count("@") > accounted + separator


def _sqlite_text(value: bytes) -> str:
    """SQLite keeps whatever bytes it is given as TEXT (an sqlite3 shell on a Latin-1
    terminal writes 'b\\xfccher.test'). Decoded strictly, one such value fails every read of
    its table, hence every load: the last rules would then serve for good, and a restarted
    daemon would have none. Each undecodable byte becomes a lone surrogate instead, which no
    pattern accepts and the loader reports as an error of that row and column."""
    return value.decode("utf-8", "surrogateescape")


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # A Python decoder costs about 0.2 us a text value more than sqlite3's own: some 40 ms a
    # full load of 20,000 connectors, nothing for the poll, which reads one integer.
    dbapi_conn.text_factory = _sqlite_text
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys = ON")
    # The one wait SQLite has, on a lock another process holds (a writer mid-commit), is
    # bounded here; a statement runs on a local file, with nothing else to wait for.
    cur.execute("PRAGMA busy_timeout = 5000")
    cur.close()


def _postgresql_args(parsed: URL, connect_timeout: float, query_timeout: float | None) -> dict[str, Any]:
    """libpq settings that bound every wait: the connection, each statement and lock wait (on
    the server), and a peer gone silent (TCP keepalives, and tcp_user_timeout for data sent
    and never acknowledged). A server or network that stops answering otherwise holds the
    reading thread for ever. Settings given in the URL's query win."""
    args: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout))}
    if query_timeout is None:
        return args
    ms = max(1, round(query_timeout * 1000))
    # A silent peer is found within about query_timeout: idle, then three unanswered probes.
    idle = max(1, round(query_timeout / 2))
    args.update(keepalives=1, keepalives_idle=idle, keepalives_interval=max(1, round(idle / 3)),
                keepalives_count=3, tcp_user_timeout=ms)
    args = {k: v for k, v in args.items() if k not in parsed.query}
    # As -c options at connect: no statement of ours runs without them, and nothing to reset.
    options = f"-c statement_timeout={ms} -c lock_timeout={ms}"
    given = parsed.query.get("options")
    if isinstance(given, str) and given.strip():
        options = f"{options} {given}"  # the URL's own -c come later, and win
    args["options"] = options
    return args


def open_engine(url: str, *, connect_timeout: float = 5.0, query_timeout: float | None = None) -> Engine:
    """An engine for ``url``; no connection is made until first use.

    ``query_timeout`` (seconds) bounds every statement, lock waits included, and every wait for
    the server's answer; a call past it fails as the database being unreachable. None (the
    CLI's default, whose ``db upgrade`` may rewrite tables) sets no such bound."""
    parsed = normalise_url(url)
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "sqlite":
        db = parsed.database
        if db and db != ":memory:":
            parent = os.path.dirname(os.path.abspath(db))
            if not os.path.isdir(parent):
                raise StoreError(f"directory {parent} of the SQLite database does not exist")
    elif backend == "postgresql":
        kwargs["connect_args"] = _postgresql_args(parsed, connect_timeout, query_timeout)
    else:
        kwargs["connect_args"] = {
            "connect_timeout": max(1, int(connect_timeout)),
            "charset": "utf8mb4",
        }
        if query_timeout is not None:
            # PyMySQL's connect_timeout covers the TCP connect only; the handshake that follows,
            # and every answer after it, wait for the socket with these (none by default).
            kwargs["connect_args"].update(read_timeout=query_timeout, write_timeout=query_timeout)
    engine = _create_engine(url, parsed, **kwargs)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def _create_engine(url: str, parsed: URL, **kwargs: Any) -> Engine:
    """SQLAlchemy's engine for ``parsed``, its failures as one-line StoreErrors: the dialect
    reads the URL's query here (PyMySQL's connect_timeout=abc is a ValueError) and imports
    the driver."""
    try:
        return create_engine(parsed, **kwargs)
    except _BAD_URL as exc:
        raise _invalid_url(url, exc) from None
    except ImportError as exc:
        raise StoreError(f"database URL {safe_url(url)}: its driver is not installed ({exc.name or exc}): "
                         "install tlsgate with the postgresql or mariadb extra") from None


def check_url(url: str) -> None:
    """Raise StoreError for a URL no engine can be made of (its syntax, its driver, the driver's
    settings), without connecting or touching a file: what a configuration check can tell
    while the database itself may be down."""
    _create_engine(url, normalise_url(url)).dispose()


def dialect_name(engine: Engine) -> str:
    name = engine.dialect.name
    return "mariadb" if name == "mysql" else name


_STRICT_MODES = ("STRICT_TRANS_TABLES", "STRICT_ALL_TABLES")


def sql_mode_warning(sql_mode: str) -> str | None:
    """Why a MariaDB server's ``sql_mode`` endangers the rules, or None when it is strict.

    Without strict mode the server stores a value a column cannot hold as something else, with
    a warning nobody reads: ``require_tls = 'yes'`` becomes 0 (no TLS required), a long name is
    cut short. The rows then look written that way, and no later check can tell."""
    modes = {m.strip().upper() for m in sql_mode.split(",")}
    if modes.intersection(_STRICT_MODES):
        return None
    return (f"the MariaDB server's sql_mode ({sql_mode or 'empty'}) has neither STRICT_TRANS_TABLES nor "
            "STRICT_ALL_TABLES: it then stores a value a column cannot hold as another one, with a mere "
            "warning (require_tls = 'yes' becomes 0, no TLS required), which tlsgate cannot tell afterwards; "
            "add STRICT_TRANS_TABLES to sql_mode in the server's configuration (the default since MariaDB 10.2.4)")


def _global_sql_mode(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT @@GLOBAL.sql_mode")).scalar() or "")


def server_warnings(engine: Engine) -> list[str]:
    """What is wrong with the database server's settings, for ``lint`` and ``doctor``: a
    MariaDB server not in strict mode. Raises StoreError when the server cannot be asked."""
    if dialect_name(engine) != "mariadb":
        return []
    try:
        mode = _global_sql_mode(engine)
    except SQLAlchemyError as exc:
        raise StoreError(describe_db_error(engine, exc)) from None
    warning = sql_mode_warning(mode)
    return [warning] if warning else []


# --------------------------------------------------------------------------- schema


def schema_statements(dialect: str) -> list[str]:
    """Every statement that creates the schema in ``dialect``, as ``sql/<dialect>.sql`` holds."""
    from sqlalchemy.dialects import mysql, postgresql, sqlite
    from sqlalchemy.schema import CreateIndex, CreateTable

    dialects = {
        "sqlite": sqlite.dialect(),
        "postgresql": postgresql.dialect(),  # type: ignore[no-untyped-call]
        "mariadb": mysql.dialect(is_mariadb=True),
    }
    if dialect not in dialects:
        raise StoreError(f"unknown dialect {dialect!r}: use sqlite, postgresql or mariadb")
    d = dialects[dialect]
    out: list[str] = []
    for table in schema.Base.metadata.sorted_tables:
        ddl = str(CreateTable(table).compile(dialect=d)).strip()
        if dialect == "mariadb":
            # Binary collation: MariaDB's default for utf8mb4 ignores case, so its CHECK
            # constraints would take mode 'Monitor' and scope 'Sender', and a foreign key child
            # 'm5' for parent 'M5', all of which PostgreSQL and SQLite refuse (and the loader too).
            ddl += f" ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={schema.MARIADB_COLLATION}"
        out.append(ddl)
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            out.append(str(CreateIndex(index).compile(dialect=d)).strip())
    out.extend(schema.trigger_ddl(dialect))
    out.extend(schema.seed_rows())
    return out


def schema_script(dialect: str) -> str:
    """``schema_statements`` as a script; MariaDB's triggers are single statements, so ';'
    ends every statement in every dialect (PostgreSQL's function body is dollar-quoted)."""
    head = (
        f"-- tlsgate rule schema, version {schema.SCHEMA_VERSION}, for {dialect}.\n"
        f"-- Generated by `tlsgate db schema --dialect {dialect}`; do not edit by hand.\n\n"
    )
    body = "".join(stmt + ";\n\n" for stmt in schema_statements(dialect)).rstrip() + "\n"
    return head + "\n".join(line.rstrip() for line in body.split("\n"))


def current_version(conn: Connection) -> int | None:
    """The schema version, or None when the database has no tlsgate schema."""
    from sqlalchemy import inspect

    if not inspect(conn).has_table("schema_version"):
        return None
    value = conn.execute(text("SELECT max(version) FROM schema_version")).scalar()
    return int(value) if value is not None else None


def init_schema(engine: Engine) -> bool:
    """Create the schema if absent; False when it was already there."""
    with engine.begin() as conn:
        if current_version(conn) is not None:
            return False
        for stmt in schema_statements(dialect_name(engine)):
            conn.exec_driver_sql(stmt)
    if dialect_name(engine) == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode = WAL")
    return True


# Each step takes a schema at version N-1 to N. Steps are plain statements per dialect so
# that an administrator who keeps the database by hand can read and apply them too.
MIGRATIONS: dict[int, Mapping[str, Sequence[str]]] = {}


def _check_version(version: object) -> None:
    """Rows of another schema version are not read as if they were this one's: a newer schema
    may hold requirements this code would silently ignore (several MX hosts sharing one
    database are upgraded one by one)."""
    if version == schema.SCHEMA_VERSION:
        return
    if version is None:
        raise StoreError("the table schema_version is empty: run `tlsgate db init` on an empty database")
    if int(str(version)) > schema.SCHEMA_VERSION:
        raise StoreError(f"the database schema is version {version}, newer than this tlsgate "
                         f"({schema.SCHEMA_VERSION}): upgrade tlsgate")
    raise StoreError(f"the database schema is version {version}, older than this tlsgate "
                     f"({schema.SCHEMA_VERSION}): run `tlsgate db upgrade`")


def upgrade_schema(engine: Engine) -> tuple[int, int]:
    """Apply every migration step above the database's version; (from, to)."""
    with engine.begin() as conn:
        version = current_version(conn)
        if version is None:
            raise StoreError("the database has no tlsgate schema: run `tlsgate db init` first")
        if version > schema.SCHEMA_VERSION:
            raise StoreError(
                f"the database schema is version {version}, newer than this tlsgate "
                f"({schema.SCHEMA_VERSION}): upgrade tlsgate"
            )
        start = version
        for step in range(version + 1, schema.SCHEMA_VERSION + 1):
            for stmt in MIGRATIONS[step][dialect_name(engine)]:
                conn.exec_driver_sql(stmt)
            conn.execute(text("UPDATE schema_version SET version = :v"), {"v": step})
            version = step
    return start, version


#: the load's problem when the change counter's row is gone (deleted by hand)
NO_GENERATION_ROW = "has no row id = 1: run `tlsgate db upgrade`, which restores it"
#: the counter read while its row is gone: the rules loaded then carry it too, so that polls
#: neither reload them again and again nor count an outage, and the row's return is a change
MISSING_GENERATION = -1


def read_generation(engine: Engine) -> int:
    """The change counter: one indexed single-row read; :data:`MISSING_GENERATION` without its
    row (which the load reports as an error)."""
    try:
        with engine.connect() as conn:
            value = conn.execute(text("SELECT generation FROM rules_generation WHERE id = 1")).scalar()
    except SQLAlchemyError as exc:
        raise StoreError(describe_db_error(engine, exc)) from None
    if value is None:
        return MISSING_GENERATION
    return _generation(value)


def _generation(value: Any) -> int:
    """The counter as read; a hand-written value that is no whole number is a database fault
    (SQLite keeps whatever it is given), reported as such, never a crash of the reader."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise StoreError(f"rules_generation.generation (id = 1) is {value!r}, not a whole number") from None


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True, slots=True)
class RowProblem:
    """A bad value in one row: which table, which key, which column, and why."""

    severity: str  # "error" or "warning"
    table: str
    key: tuple[object, ...]
    column: str | None
    message: str
    connector: str | None = None

    def __str__(self) -> str:
        key = ", ".join(repr(k) for k in self.key)
        where = f"{self.table} ({key})" if self.key else self.table
        if self.column:
            where += f" column {self.column}"
        return f"{self.severity}: {where}: {self.message}"


@dataclass
class LoadCache:
    """The inbound connectors of the previous load with the raw rows each was built from, so
    that a reload rebuilds only the connectors whose rows changed. Only connectors that loaded
    without any problem and have no pinned certificate (whose checks depend on the date) are
    kept; a connector is reused only when its row, the types of its values and every child row
    are equal to those it was built from. The previous snapshot lends its indexes to the next
    when they would come out the same (see :class:`Snapshot`)."""

    inbound: dict[str, tuple[tuple[object, ...], InboundConnector]] = field(default_factory=dict)
    snapshot: Snapshot | None = None


@dataclass
class LoadResult:
    snapshot: Snapshot
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def errors(self) -> list[RowProblem]:
        return [p for p in self.problems if p.severity == "error"]


_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def _bool(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0 if value in (0, 1) else None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    return None


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def _str(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _undecodable(value: str) -> bool:
    """Whether ``value`` holds bytes that were not UTF-8 (kept as lone surrogates by the SQLite
    text factory): text that cannot be compared, logged or sent to Postfix as it stands."""
    return not value.isascii() and any("\udc80" <= ch <= "\udcff" for ch in value)


NOT_UTF8 = "is not valid UTF-8 text (written with another encoding?)"


def _readable(value: str) -> str:
    """``value`` with each byte that was not UTF-8 shown as U+FFFD: for a comment, and for a
    refused name, which still names its connector in answers and log lines."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if _undecodable(value) else value


class _RowReader:
    """Collects problems while turning one connector's raw columns into typed values."""

    def __init__(self, table: str, key: tuple[object, ...], connector: str, problems: list[RowProblem]):
        self.table = table
        self.key = key
        self.connector = connector
        self.problems = problems
        self.failed = False

    def error(self, column: str | None, message: str) -> None:
        self.failed = True
        self.problems.append(RowProblem("error", self.table, self.key, column, message, self.connector))

    def warn(self, column: str | None, message: str) -> None:
        self.problems.append(RowProblem("warning", self.table, self.key, column, message, self.connector))

    def boolean(self, row: Mapping[str, object], column: str, default: bool) -> bool:
        raw = row.get(column)
        if raw is None:
            return default
        value = _bool(raw)
        if value is None:
            self.error(column, f"{raw!r} is not a boolean (use 1/0 or true/false)")
            return default
        return value

    def integer(self, row: Mapping[str, object], column: str, default: int | None, minimum: int) -> int | None:
        raw = row.get(column)
        if raw is None:
            return default
        value = _int(raw)
        if value is None or value < minimum:
            self.error(column, f"{raw!r} is not a whole number >= {minimum}")
            return default
        return value

    def text(self, row: Mapping[str, object], column: str) -> str | None:
        value = _str(row.get(column))
        if value is not None and _undecodable(value):
            self.error(column, NOT_UTF8)
            return None
        return value

    def comment(self, value: object) -> str:
        """A comment never fails its connector: one that is not UTF-8 is a warning, shown with
        U+FFFD in place of its bad bytes."""
        text = _str(value) or ""
        if _undecodable(text):
            self.warn("comment", NOT_UTF8)
            return _readable(text)
        return text

    def choice(self, row: Mapping[str, object], column: str, allowed: tuple[str, ...], default: str) -> str:
        raw = row.get(column)
        if raw is None:
            return default
        value = _str(raw) or ""
        if value not in allowed:
            self.error(column, f"{value!r} is not one of {', '.join(allowed)}")
            return default
        return value


def _select(conn: Connection, table: str, columns: Sequence[str]) -> list[tuple[Any, ...]]:
    """Every row of ``table`` as plain tuples, in the order of ``columns``.

    Read with the driver's own cursor, inside ``conn``'s transaction: a load reads every row of
    every table, and SQLAlchemy's row objects would cost as much again as the read. Driver
    errors are not wrapped: ``load`` catches them.
    """
    cursor = conn.connection.cursor()
    try:
        cursor.execute(f"SELECT {', '.join(columns)} FROM {table}")
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _group(rows: list[tuple[Any, ...]]) -> dict[str, list[tuple[Any, ...]]]:
    """Child rows by connector name (their first column), without it."""
    out: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in rows:
        connector = row[0]
        out[connector if type(connector) is str else _str(connector) or ""].append(row[1:])
    return out


def _check_names(
    table: str, rows: list[tuple[Any, ...]], problems: list[RowProblem]
) -> dict[str, tuple[Any, ...]]:
    """Index parent rows by name (their first column); a name that differs from another only
    in case is an error for both, since an administrator cannot tell which one a child row meant."""
    by_name = {_str(row[0]) or "": row for row in rows}
    if len({name.casefold() for name in by_name}) == len(rows):
        return by_name  # the usual case: no two names alike, in any case
    folded: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        name = _str(row[0]) or ""
        folded[name.casefold()].append(name)
    for names in folded.values():
        if len(names) > 1:
            for name in names:
                problems.append(
                    RowProblem(
                        "error", table, (name,), "name",
                        "differs only in case from " + ", ".join(n for n in names if n != name),
                        name,
                    )
                )
    return by_name


def _by_connector(problems: Iterable[RowProblem]) -> dict[str | None, list[RowProblem]]:
    out: dict[str | None, list[RowProblem]] = defaultdict(list)
    for p in problems:
        out[p.connector].append(p)
    return out


def _own_errors(name: str, problems: Iterable[RowProblem]) -> tuple[str, ...]:
    """What a failed connector reports as its problems: its errors, without the row prefix."""
    own = tuple(str(p).split(": ", 1)[1] for p in problems if p.connector == name and p.severity == "error")
    return own or ("invalid rows",)


_INBOUND_SETTINGS = (
    "enabled", "mode", "require_tls", "min_tls_version", "require_forward_secrecy", "min_cipher_bits",
    "certificate", "require_organization", "require_unit", "min_key_bits", "restrict_to_addresses",
    "on_failure", "reply_text",
)


_INBOUND_COLUMNS = ("name", "comment", *_INBOUND_SETTINGS)
_OUTBOUND_COLUMNS = ("name", "enabled", "comment", "tls_level", "min_tls_version")


def _inbound_settings(row: Mapping[str, object], r: _RowReader) -> dict[str, Any]:
    """The typed settings of one inbound_connector row (every column but name and comment)."""
    kw: dict[str, Any] = {}
    kw["enabled"] = r.boolean(row, "enabled", True)
    kw["mode"] = Mode(r.choice(row, "mode", schema.MODES, "enforce"))
    kw["require_tls"] = r.boolean(row, "require_tls", True)
    version = row.get("min_tls_version")
    kw["min_tls_version"] = (
        r.choice(row, "min_tls_version", schema.TLS_VERSIONS, "TLSv1.2") if version is not None else None
    )
    kw["require_forward_secrecy"] = r.boolean(row, "require_forward_secrecy", False)
    kw["min_cipher_bits"] = r.integer(row, "min_cipher_bits", 0, 0)
    known = len(r.problems)
    kw["certificate"] = CertRequirement(r.choice(row, "certificate", schema.CERT_REQUIREMENTS, "trusted"))
    certificate_read = len(r.problems) == known
    kw["require_organization"] = r.text(row, "require_organization")
    kw["require_unit"] = r.text(row, "require_unit")
    kw["min_key_bits"] = r.integer(row, "min_key_bits", None, 1)
    if certificate_read and kw["certificate"] is not CertRequirement.PINNED:
        # Postfix reports no organization, unit or key size of a client certificate: only a
        # registered certificate can be held to them. Left unenforced, the requirement would
        # read as met; the connector fails closed until it is pinned or the column cleared.
        for column, what in schema.PIN_ONLY.items():
            if kw[column] is not None:
                r.error(column, f"is checked only against a pinned certificate (Postfix reports no "
                                f"{what} of a client certificate): set certificate to 'pinned' and "
                                "register the partner's certificate, or clear it")
    kw["restrict_to_ranges"] = r.boolean(row, "restrict_to_addresses", False)
    kw["on_failure"] = FailAction(r.choice(row, "on_failure", schema.FAIL_ACTIONS, "defer"))
    kw["reply_text"] = r.text(row, "reply_text")
    return kw


def _load_inbound(
    conn: Connection, problems: list[RowProblem], now: datetime, expiry_days: int = 30,
    cache: LoadCache | None = None,
) -> list[InboundConnector]:
    parents = _select(conn, "inbound_connector", _INBOUND_COLUMNS)
    by_name = _check_names("inbound_connector", parents, problems)
    domains = _group(_select(conn, "inbound_domain", ("connector", "scope", "pattern")))
    addresses = _group(_select(conn, "inbound_address", ("connector", "address")))
    names = _group(_select(conn, "inbound_cert_name", ("connector", "field", "pattern")))
    certs = _group(_select(conn, "inbound_certificate", ("connector", "id", "pem", "cert_sha256")))
    case_dupes = {p.connector for p in problems if p.table == "inbound_connector" and p.column == "name"}
    # Connectors mostly share their settings: parse each distinct, valid combination once. The
    # key holds the values' types too, so that 1.0 never borrows the parse of 1 or True.
    settings_seen: dict[tuple[object, ...], dict[str, Any]] = {}
    # The cache keeps each row's column types; rows share a handful of combinations, kept once
    # (at 100,000 connectors, 17 MB less).
    types_seen: dict[tuple[type, ...], tuple[type, ...]] = {}

    earlier = _by_connector(problems)
    kept: dict[str, tuple[tuple[object, ...], InboundConnector]] = {}
    out: list[InboundConnector] = []
    all_names = set(by_name).union(domains, addresses, names, certs)
    cached = cache.inbound if cache is not None else None
    for name in sorted(all_names):
        first = len(problems)
        parent = by_name.get(name)
        raw: tuple[object, ...] | None = None
        if cached is not None and parent is not None and name not in certs and name not in case_dupes:
            types = tuple(map(type, parent))
            raw = (parent, types_seen.setdefault(types, types), domains.get(name), addresses.get(name), names.get(name))
            hit = cached.get(name)
            if hit is not None and hit[0] == raw:
                kept[name] = hit
                out.append(hit[1])
                continue
        r = _RowReader("inbound_connector", (name,), name, problems)
        if parent is None:
            child_tables = [
                t for t, g in (
                    ("inbound_domain", domains), ("inbound_address", addresses),
                    ("inbound_cert_name", names), ("inbound_certificate", certs),
                ) if name in g
            ]
            r.table = child_tables[0]
            r.key = (name,)
            r.error("connector", f"refers to inbound connector {name!r}, which does not exist")
            parent = (name, None) + (None,) * len(_INBOUND_SETTINGS)
        if not NAME_RE.match(name):
            r.error("name", "a name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if name in case_dupes:
            r.failed = True
        values = parent[2:]
        settings_key: tuple[object, ...] | None = values + tuple(map(type, values))
        try:
            settings = settings_seen.get(settings_key)  # type: ignore[arg-type]
        except TypeError:  # a value a driver returned unhashable: parse it every time
            settings, settings_key = None, None
        if settings is None:
            known = len(problems)
            settings = _inbound_settings(dict(zip(_INBOUND_SETTINGS, values, strict=True)), r)
            if settings_key is not None and len(problems) == known:
                settings_seen[settings_key] = settings
        # A name refused above still names its connector in answers and log lines: readable.
        kw: dict[str, Any] = {"name": _readable(name), "comment": r.comment(parent[1]), **settings}

        # A row that cannot be read leaves the connector's scope wider than meant, never
        # narrower: the connector is misconfigured, so the mail it matches gets a temporary
        # failure, and that must include the mail the unreadable row was written for.
        scoped: dict[str, list[DomainPattern]] = {s: [] for s in schema.SCOPES}
        widen: set[str] = set()  # scopes with a pattern that could not be read
        unknown_scope = False
        for raw_scope, raw_pattern in domains.get(name, ()):
            scope = _str(raw_scope) or ""
            pattern = _str(raw_pattern) or ""
            key = (name, scope, pattern)
            if scope not in schema.SCOPES:
                problems.append(RowProblem("error", "inbound_domain", key, "scope",
                                           f"{scope!r} is not one of {', '.join(schema.SCOPES)}", name))
                r.failed = unknown_scope = True
                continue
            try:
                scoped[scope].append(DomainPattern.parse(pattern))
            except PatternError as exc:
                problems.append(RowProblem("error", "inbound_domain", key, "pattern", str(exc), name))
                r.failed = True
                widen.add(scope)

        ranges: list[Network] = []
        entries: list[str] = []
        for (raw_address,) in addresses.get(name, ()):
            value = _str(raw_address) or ""
            try:
                entry = parse_entry(value)
                if entry is None:
                    ranges.append(parse_network(value))
                else:
                    entries.append(entry)
            except PatternError as exc:
                problems.append(RowProblem("error", "inbound_address", (name, value), "address", str(exc), name))
                r.failed = True
                ranges.extend(ALL_ADDRESSES)
        if unknown_scope:
            # Meant for one of the domain scopes: each one that has patterns takes any domain
            # (one without stays unconstrained), and a connector left without any scope takes
            # every client, as a range that could not be read does.
            widen.update(s for s, patterns in scoped.items() if patterns)
            if not widen and not ranges and not entries:
                ranges.extend(ALL_ADDRESSES)
        for scope in widen:
            scoped[scope].append(_ANY_DOMAIN)
        kw["sender_domains"] = tuple(scoped["sender"])
        kw["recipient_domains"] = tuple(scoped["recipient"])
        kw["header_from_domains"] = tuple(scoped["header_from"])
        kw["client_ranges"] = tuple(dict.fromkeys(ranges))
        kw["dns_entries"] = tuple(sorted(set(entries)))

        cert_names: list[CertNamePattern] = []
        issuers: list[IssuerPattern] = []
        for raw_field, raw_pattern in names.get(name, ()):
            fld = _str(raw_field) or ""
            pattern = _str(raw_pattern) or ""
            key = (name, fld, pattern)
            try:
                if _undecodable(pattern):
                    raise PatternError(NOT_UTF8)
                if fld == "subject":
                    cert_names.append(CertNamePattern.parse(pattern))
                elif fld == "issuer":
                    issuers.append(IssuerPattern.parse(pattern))
                else:
                    problems.append(RowProblem("error", "inbound_cert_name", key, "field",
                                               f"{fld!r} is not one of subject, issuer", name))
                    r.failed = True
            except PatternError as exc:
                problems.append(RowProblem("error", "inbound_cert_name", key, "pattern", str(exc), name))
                r.failed = True
        kw["cert_names"] = tuple(cert_names)
        kw["issuer_names"] = tuple(issuers)

        pins: list[Pin] = []
        for cert_id, pem, raw_sha256 in certs.get(name, ()):
            try:
                pin = pin_from_pem(_str(pem) or "")
            except CertificateError as exc:
                problems.append(RowProblem("error", "inbound_certificate", (cert_id,), "pem", str(exc), name))
                r.failed = True
                continue
            stored = _str(raw_sha256)
            if stored and stored.strip().upper() not in pin.cert_fingerprints:
                # The PEM was replaced by hand without its derived columns: the PEM counts.
                problems.append(RowProblem("warning", "inbound_certificate", (cert_id,), "cert_sha256",
                                           f"does not match the PEM ({pin.label}); the PEM is used", name))
            # An expired pin is an error to fix (the engine refuses it anyway, with that reason);
            # one close to expiry is a warning while there is time to register the renewal.
            if pin.not_after < now:
                problems.append(RowProblem("error", "inbound_certificate", (cert_id,), "pem",
                                           f"certificate {pin.label} ({pin.subject_cn or '-'}) expired on "
                                           f"{pin.not_after:%Y-%m-%d}", name))
            elif pin.not_after < now + timedelta(days=expiry_days):
                problems.append(RowProblem("warning", "inbound_certificate", (cert_id,), "pem",
                                           f"certificate {pin.label} ({pin.subject_cn or '-'}) expires on "
                                           f"{pin.not_after:%Y-%m-%d}, in {(pin.not_after - now).days} days",
                                           name))
            pins.append(pin)
        kw["pins"] = tuple(pins)

        if kw["restrict_to_ranges"] and not ranges and not entries:
            r.error("restrict_to_addresses", "is set but the connector has no inbound_address rows")
        if kw["certificate"] is CertRequirement.PINNED and not pins and not r.failed:
            r.warn("certificate", "is 'pinned' but no certificate is registered: every session will fail")
        if not (any(scoped.values()) or ranges or entries):
            r.warn(None, "has no sender, recipient, header From domain or address: it matches no mail")

        kw["problems"] = _own_errors(name, earlier.get(name, []) + problems[first:]) if r.failed else ()
        connector = InboundConnector(**kw)
        out.append(connector)
        if raw is not None and len(problems) == first and not r.failed:
            kept[name] = (raw, connector)
    if cache is not None:
        cache.inbound = kept
    return out


def _load_outbound(
    conn: Connection, problems: list[RowProblem], inbound: Sequence[InboundConnector]
) -> list[OutboundConnector]:
    by_name = _check_names("outbound_connector", _select(conn, "outbound_connector", _OUTBOUND_COLUMNS), problems)
    domains = _group(_select(conn, "outbound_domain", ("connector", "pattern")))
    matches = _group(_select(conn, "outbound_match_name", ("connector", "name")))
    hosts = _group(_select(conn, "outbound_smart_host", ("connector", "host", "port", "mx_lookup")))
    case_dupes = {p.connector for p in problems if p.table == "outbound_connector" and p.column == "name"}
    earlier = _by_connector(p for p in problems if p.table.startswith("outbound"))
    partners = {c.name: c for c in inbound}
    out: list[OutboundConnector] = []
    for name in sorted(set(by_name) | set(domains) | set(matches) | set(hosts)):
        first = len(problems)
        parent = by_name.get(name)
        r = _RowReader("outbound_connector", (name,), name, problems)
        row: dict[str, object] = {"name": name}
        if parent is None:
            r.table = "outbound_domain" if name in domains else "outbound_smart_host"
            r.error("connector", f"refers to outbound connector {name!r}, which does not exist")
        else:
            row = dict(zip(_OUTBOUND_COLUMNS, parent, strict=True))
        if name in case_dupes:
            r.failed = True
        kw: dict[str, Any] = {"name": _readable(name)}  # in answers and log lines: readable
        kw["enabled"] = r.boolean(row, "enabled", True)
        if _undecodable(name):
            r.error("name", NOT_UTF8)
        kw["comment"] = r.comment(row.get("comment"))
        kw["tls_level"] = TlsLevel(r.choice(row, "tls_level", schema.TLS_LEVELS, "secure"))
        version = row.get("min_tls_version")
        kw["min_tls_version"] = (
            r.choice(row, "min_tls_version", schema.TLS_VERSIONS, "TLSv1.2") if version is not None else None
        )
        pats: list[DomainPattern] = []
        unreadable = False
        for (raw_pattern,) in domains.get(name, ()):
            value = _str(raw_pattern) or ""
            try:
                pats.append(DomainPattern.parse(value))
            except PatternError as exc:
                problems.append(RowProblem("error", "outbound_domain", (name, value), "pattern", str(exc), name))
                r.failed = True
                unreadable = True
        if unreadable:
            # The domain the row was written for cannot be known, and its mail must not leave
            # with less TLS than the connector asks: the (misconfigured) connector claims "*",
            # so every domain no other connector covers waits in the queue until it is fixed.
            pats.append(_ANY_DOMAIN)
        kw["recipient_domains"] = tuple(pats)
        names: list[str] = []
        for (raw_name,) in matches.get(name, ()):
            value = _str(raw_name) or ""
            try:
                names.append(str(CertNamePattern.parse(value)) if not value.startswith(".") else "." + to_a_label(value[1:]))
            except PatternError as exc:
                problems.append(RowProblem("error", "outbound_match_name", (name, value), "name", str(exc), name))
                r.failed = True
        kw["match_names"] = tuple(names)
        smart: list[SmartHost] = []
        for raw_host, raw_port, raw_mx in hosts.get(name, ()):
            host = _str(raw_host) or ""
            h = {"port": raw_port, "mx_lookup": raw_mx}
            hr = _RowReader("outbound_smart_host", (name, host, raw_port), name, problems)
            port = hr.integer(h, "port", 25, 1) or 25
            mx = hr.boolean(h, "mx_lookup", False)
            address = parse_address(host)
            if address is not None:
                host = str(address)
                if mx:
                    hr.warn("mx_lookup", f"is ignored for the address {host}: an address has no MX records")
                    mx = False
            else:
                try:
                    host = to_a_label(host)
                except PatternError as exc:
                    hr.error("host", str(exc))
            if port > 65535:
                hr.error("port", f"{port} is not a port number")
            if hr.failed:
                r.failed = True
                continue
            smart.append(SmartHost(host, port, mx))
        kw["smart_hosts"] = tuple(smart)
        # Its policy pins the certificates of the inbound connector of the same name: with none,
        # every lookup it answers would be TEMP while it looked fine. A disabled one answers none.
        if kw["enabled"] and kw["tls_level"] is TlsLevel.FINGERPRINT and not pinned_prints(kw["name"], partners):
            r.error("tls_level", f"is 'fingerprint' but no certificate is registered for inbound connector {kw['name']} "
                                 "(inbound_certificate), whose certificates it pins: mail it covers is deferred "
                                 "until one is")
        if smart and any(p.kind is DomainKind.ANY for p in pats) and not unreadable:
            r.warn(None, "covers '*' and has smart hosts: tlsgate never routes '*' (local mail would go too), "
                         "so its smart hosts only get its TLS policy; set relayhost to them in main.cf")
        kw["problems"] = _own_errors(name, earlier.get(name, []) + problems[first:]) if r.failed else ()
        out.append(OutboundConnector(**kw))
    # One line per smart host, under the spelling tlsgate's transport answer gives it.
    written = {next_hop(h.host, h.port, h.mx_lookup) for c in out for h in c.smart_hosts}
    misconfigured = {c.name for c in out if c.problems}
    for key, clash in hop_clashes(out, partners).items():
        if key not in written:
            continue
        if clash.shared:
            problems.append(RowProblem(
                "error", "outbound_smart_host", (key,), "host",
                f"outbound connectors {', '.join(clash.routed)} share this smart host with different TLS policies: "
                "mail through it is deferred until they agree", clash.routed[0]))
        # A misconfigured domain connector has its own error; a clash left after the fix shows then.
        if clash.domain is not None and clash.domain not in misconfigured:
            routed = f"outbound connector{'s' if len(clash.routed) > 1 else ''} {', '.join(clash.routed)}"
            problems.append(RowProblem(
                "error", "outbound_smart_host", (key,), "host",
                f"is also a recipient domain of outbound connector {clash.domain}, whose TLS policy differs "
                f"from that of {routed}: Postfix asks for both by this one name, so mail to it and through "
                "it is deferred until they agree", clash.routed[0]))
    return out


@contextlib.contextmanager
def _collector_paused(freeze: bool = False) -> Iterator[None]:
    """A load allocates millions of objects that live on, and every one of them would make the
    cyclic garbage collector run again over the growing heap (a third of the load time at
    100,000 connectors). Reference counting still frees what a load drops.

    With ``freeze``, a load that succeeds ends with one full collection, then moves everything
    still alive to the collector's permanent generation. A daemon's snapshot lives until the next
    load; left to the collector, each of its objects would be scanned by the young collections,
    then again by every full one: at 100,000 connectors a full collection holds the interpreter
    for 0.25 to 0.4 s, stalling every answer. The collection first frees the garbage cycles that
    any thread left while the collector was paused, which a freeze would keep forever; a failed
    load freezes nothing. Frozen objects are still freed by reference counting when the next
    snapshot replaces them (a load leaves no reference cycles behind).

    A process's first freeze collects before the load instead, while there is little to scan:
    after it, the collection would scan the whole new snapshot (0.3 to 0.4 s of a daemon's
    start at 100,000 connectors, answering temporary failures meanwhile). What that leaves to
    the freeze is the garbage cycles other threads make during that one load, once per process;
    every later load collects after itself (as does the first, should anything else have frozen
    objects before it)."""
    first = freeze and gc.get_freeze_count() == 0
    if first:
        gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        if freeze:
            if not first:
                gc.collect()
            gc.freeze()
    finally:
        if was_enabled:
            gc.enable()


def load(
    engine: Engine, now: datetime | None = None, *, expiry_days: int = 30, cache: LoadCache | None = None,
    freeze: bool = False,
) -> LoadResult:
    """Read every rule table in one transaction and build a snapshot.

    A pinned certificate that expires within ``expiry_days`` is a warning; an expired one an error.
    With ``cache`` (kept from one load to the next), unchanged connectors are not parsed again.
    ``freeze`` (for a daemon's long-lived snapshot) keeps the garbage collector from scanning
    what the load built.

    Raises StoreError when the database cannot be read at all; bad rows never raise.
    """
    moment = now or datetime.now(UTC)
    problems: list[RowProblem] = []
    with _collector_paused(freeze):
        try:
            with engine.connect() as raw:
                conn = raw
                if dialect_name(engine) != "sqlite":
                    conn = raw.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    if dialect_name(engine) == "sqlite":
                        # The sqlite3 module opens a transaction only before a write: without
                        # this the tables would be read one by one, each at its own moment.
                        conn.exec_driver_sql("BEGIN")
                    generation = conn.execute(
                        text("SELECT generation FROM rules_generation WHERE id = 1")
                    ).scalar()
                    _check_version(conn.execute(text("SELECT max(version) FROM schema_version")).scalar())
                    if generation is None:
                        problems.append(RowProblem("error", "rules_generation", (), None, NO_GENERATION_ROW))
                    inbound = _load_inbound(conn, problems, moment, expiry_days, cache)
                    outbound = _load_outbound(conn, problems, inbound)
        except (SQLAlchemyError, engine.dialect.loaded_dbapi.Error) as exc:
            raise StoreError(describe_db_error(engine, exc)) from None
        snap = Snapshot(
            inbound=tuple(inbound),
            outbound=tuple(outbound),
            generation=_generation(generation) if generation is not None else MISSING_GENERATION,
            errors=tuple(str(p) for p in problems if p.severity == "error"),
            previous=cache.snapshot if cache is not None else None,
        )
        if cache is not None:
            cache.snapshot = snap
    return LoadResult(snap, problems)


def describe_db_error(engine: Engine, exc: Exception) -> str:
    """One line about a database failure, without the password or the SQL text.

    The first database error of the chain is the one told: a driver error raised while handling
    another (PyMySQL's rollback on a connection its read timeout broke says only "(0, '')")
    hides the cause."""
    errors = (SQLAlchemyError, engine.dialect.loaded_dbapi.Error)
    context, hops = exc.__context__, 0
    while context is not None and hops < 8:
        if isinstance(context, errors):
            exc = context
        context, hops = context.__context__, hops + 1
    orig = getattr(exc, "orig", None)
    detail = str(orig if orig is not None else exc).strip().splitlines()[0] if str(orig or exc).strip() else type(exc).__name__
    if _missing_table(detail) in schema.Base.metadata.tables:
        return f"database {safe_url(engine.url)}: no tlsgate schema ({detail}): run `tlsgate db init`"
    return f"database {safe_url(engine.url)}: {detail}"


# How each backend says a table is missing: SQLite, PostgreSQL, MariaDB ("Table 'db.t' ...").
_MISSING_TABLE = re.compile(
    r"no such table: (?:\w+\.)?(\w+)|relation \"(?:\w+\.)?(\w+)\" does not exist"
    r"|Table '(?:[^'.]*\.)?(\w+)' doesn't exist"
)


def _missing_table(detail: str) -> str | None:
    """The table a database error says does not exist, if that is what it says: one of
    tlsgate's own means the URL names a database ``tlsgate db init`` never ran on (or the
    wrong database), which the raw message does not tell an administrator."""
    m = _MISSING_TABLE.search(detail)
    return next((g for g in m.groups() if g), None) if m else None
