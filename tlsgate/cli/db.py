"""``tlsgate db init | upgrade | schema``: create, upgrade and print the rule schema."""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from tlsgate import schema
from tlsgate.store import (
    StoreError,
    describe_db_error,
    init_schema,
    safe_url,
    schema_script,
    upgrade_schema,
)

if TYPE_CHECKING:
    from tlsgate.cli import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("db", help="create, upgrade or print the rule schema")
    dsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    init = dsub.add_parser("init", help="create the schema in an empty database")
    init.add_argument("--examples", metavar="FILE", help="then run this SQL file (e.g. sql/examples.sql)")
    init.set_defaults(func=cmd_init)
    up = dsub.add_parser("upgrade", help="apply schema migrations")
    up.set_defaults(func=cmd_upgrade)
    sch = dsub.add_parser("schema", help="print the DDL for a dialect")
    sch.add_argument("--dialect", choices=("sqlite", "postgresql", "mariadb"), default="sqlite")
    sch.set_defaults(func=cmd_schema)


def run_sql_file(ctx: Context, path: str) -> int:
    """Run a file of ';'-separated statements (see :func:`split_sql`) in one transaction; the
    count run."""
    try:
        with open(path, encoding="utf-8") as fh:
            script = fh.read()
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror}") from None
    engine = ctx.engine
    statements = split_sql(script, engine.dialect.name)
    try:
        with engine.begin() as conn:
            for n, stmt in enumerate(statements, 1):
                try:
                    conn.exec_driver_sql(stmt)
                except SQLAlchemyError as exc:
                    raise StoreError(f"{path}: statement {n}: {describe_db_error(engine, exc)}") from None
    except SQLAlchemyError as exc:
        raise StoreError(describe_db_error(engine, exc)) from None
    return len(statements)


def _token_pattern(more_comments: str) -> re.Pattern[str]:
    """One token of a SQL script. Comments, quoted text and dollar-quoted bodies are single
    tokens, so a ';' inside one ends nothing; an unterminated one runs to the end (the database
    reports it). MariaDB's executable comments (/*! ... */) are statement text, not comments.
    ``more_comments``: the dialect's own comments, an alternative of their group. A '#' is never
    in a run of other characters, so that such a comment can start anywhere."""
    return re.compile(
        rf"""(?P<comment>--[^\n]*|/\*(?![!]|M!).*?(?:\*/|\Z){more_comments})
          | (?P<quoted>'(?:[^']+|'')*(?:'|\Z)|"(?:[^"]+|"")*(?:"|\Z)|`[^`]*(?:`|\Z))
          | (?P<dollar>\$(?P<tag>(?:[A-Za-z_]\w*)?)\$.*?(?:\$(?P=tag)\$|\Z))
          | (?P<word>[A-Za-z_][\w$]*)
          | (?P<semicolon>;)
          | (?P<other>[^-/'"`$;A-Za-z_#]+|.)""",
        re.VERBOSE | re.DOTALL,
    )


_TOKEN = _token_pattern("")
#: MariaDB's and MySQL's: '#' starts a comment to the end of the line there, while it is an
#: operator in PostgreSQL (SELECT 5 # 3) and no comment in SQLite
_MARIADB_TOKEN = _token_pattern(r"|\#[^\n]*")
#: words after END that close a MariaDB control block opened by a word not counted (IF, LOOP ...)
_END_OF_CONTROL = frozenset({"IF", "LOOP", "WHILE", "REPEAT", "FOR"})


def split_sql(script: str, dialect: str) -> list[str]:
    """Split a script into statements the way sqlite3, psql and mariadb read it: at each ';'
    outside quotes ('' escapes one), quoted identifiers, $$ or $tag$ bodies and comments, and
    not inside a trigger's BEGIN ... END body. Comments are dropped, and with them statements
    that were only comments; a backslash escapes nothing, as in standard SQL. ``dialect`` is the
    database's (engine.dialect.name): '#' starts a comment only in mariadb and mysql."""
    statements: list[str] = []
    parts: list[str] = []
    first = ""  # the statement's first bare word, upper-cased
    trigger = False  # a CREATE ... TRIGGER statement, whose body may hold ';'
    depth = 0  # open BEGIN/CASE blocks of that body
    closing = False  # the word before was END: the next one names what it closes

    token_re = _MARIADB_TOKEN if dialect in ("mariadb", "mysql") else _TOKEN
    tokens = list(token_re.finditer(script))
    for i, token in enumerate(tokens):
        kind, value = token.lastgroup, token.group()
        if kind == "comment":
            if value.startswith("/*"):  # it may stand between two words
                parts.append(" ")
            continue
        if kind == "semicolon" and depth == 0:
            statements.append("".join(parts).strip())
            parts, first, trigger = [], "", False
            continue
        parts.append(value)
        if kind != "word":
            continue
        word = value.upper()
        first = first or word
        if first != "CREATE":
            continue
        after_end, closing = closing, word == "END"
        if word == "TRIGGER":
            trigger = True
        elif not trigger or after_end:
            continue  # END CASE closes a CASE; it opens none
        elif word in ("BEGIN", "CASE"):
            depth += 1
        elif word == "END" and depth and _next_word(tokens, i) not in _END_OF_CONTROL:
            depth -= 1
    statements.append("".join(parts).strip())
    return [stmt for stmt in statements if stmt]


def _next_word(tokens: list[re.Match[str]], i: int) -> str:
    """The bare word after token ``i`` (skipping blanks and comments), upper-cased; "" if none."""
    for token in tokens[i + 1:]:
        if token.lastgroup == "word":
            return token.group().upper()
        if token.lastgroup != "comment" and token.group().strip():
            return ""
    return ""


def cmd_init(args: argparse.Namespace, ctx: Context) -> int:
    engine = ctx.engine
    try:
        created = init_schema(engine)
    except SQLAlchemyError as exc:
        raise StoreError(describe_db_error(engine, exc)) from None
    where = safe_url(engine.url)
    if created:
        print(f"created tlsgate schema version {schema.SCHEMA_VERSION} in {where}")
    else:
        print(f"{where} already has a tlsgate schema; nothing done (see `tlsgate db upgrade`)")
    if args.examples:
        count = run_sql_file(ctx, args.examples)
        print(f"ran {count} statements from {args.examples}")
    return 0


def cmd_upgrade(args: argparse.Namespace, ctx: Context) -> int:
    engine = ctx.engine
    try:
        start, end = upgrade_schema(engine)
        restored = _restore_generation_row(engine)
    except SQLAlchemyError as exc:
        raise StoreError(describe_db_error(engine, exc)) from None
    if start != end:
        print(f"upgraded schema from version {start} to {end}")
    elif not restored:
        print(f"schema is at version {end}, the current one; nothing to do")
    else:
        print(f"schema is at version {end}, the current one")
    if restored:
        print("restored the missing rules_generation row (id = 1, generation 0) that the daemons poll: "
              "they read the rules again at their next poll")
    return 0


# The row as `db init` writes it.
_GENERATION_SEED = next(s for s in schema.seed_rows() if s.startswith("INSERT INTO rules_generation "))


def _restore_generation_row(engine: Engine) -> bool:
    """Insert the single ``rules_generation`` row when it is missing (a hand-written DELETE):
    without it every daemon's poll fails and it serves no new rules. True when inserted."""
    table = schema.Base.metadata.tables["rules_generation"]
    with engine.begin() as conn:
        if conn.execute(select(table.c.id).where(table.c.id == 1)).first() is not None:
            return False
        conn.exec_driver_sql(_GENERATION_SEED)
    return True


def cmd_schema(args: argparse.Namespace, ctx: Context) -> int:
    print(schema_script(args.dialect), end="")
    return 0
