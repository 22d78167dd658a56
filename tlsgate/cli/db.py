"""``tlsgate db init | upgrade | schema``: create, upgrade and print the rule schema."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

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
    """Run a file of ';'-terminated statements in one transaction; the count run."""
    try:
        with open(path, encoding="utf-8") as fh:
            script = fh.read()
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror}") from None
    statements = split_sql(script)
    engine = ctx.engine
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


def split_sql(script: str) -> list[str]:
    """Split on ';' at line ends, outside quotes and $$ bodies; drop '--' comment lines."""
    statements: list[str] = []
    current: list[str] = []
    in_quote = in_body = False
    for line in script.splitlines():
        if not (in_quote or in_body) and line.lstrip().startswith("--"):
            continue
        current.append(line)
        in_body ^= line.count("$$") % 2 == 1
        if not in_body:
            in_quote ^= line.replace("''", "").count("'") % 2 == 1
        if not (in_quote or in_body) and line.rstrip().endswith(";"):
            stmt = "\n".join(current).strip().rstrip(";").strip()
            if stmt:
                statements.append(stmt)
            current = []
    rest = "\n".join(current).strip()
    if rest:
        statements.append(rest)
    return statements


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
    except SQLAlchemyError as exc:
        raise StoreError(describe_db_error(engine, exc)) from None
    if start == end:
        print(f"schema is at version {end}, the current one; nothing to do")
    else:
        print(f"upgraded schema from version {start} to {end}")
    return 0


def cmd_schema(args: argparse.Namespace, ctx: Context) -> int:
    print(schema_script(args.dialect), end="")
    return 0
