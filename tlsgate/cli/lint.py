"""``tlsgate lint``: every problem in the rule rows, with table, key and column."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tlsgate.store import load

if TYPE_CHECKING:
    from tlsgate.cli import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("lint", help="check every rule row; exit 1 when there are errors")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.set_defaults(func=cmd_lint)


def cmd_lint(args: argparse.Namespace, ctx: Context) -> int:
    result = load(ctx.engine)
    for problem in result.problems:
        print(problem)
    errors = len(result.errors)
    warnings = len(result.problems) - errors
    snap = result.snapshot
    print(
        f"{len(snap.inbound)} inbound and {len(snap.outbound)} outbound connectors checked: "
        f"{errors} errors, {warnings} warnings"
    )
    if errors or (args.strict and warnings):
        return 1
    return 0
