"""The ``tlsgate`` administrator's command: one sub-command module per area.

Each module has ``register(subparsers)`` that adds its commands with a ``func`` default taking
the parsed arguments and the :class:`Context`. Errors an administrator can cause (bad input,
an unreachable database, a bad configuration) end as one line on stderr and a non-zero exit
status, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import io
import pkgutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from sqlalchemy import Engine

from tlsgate.config import EX_CONFIG, Config, ConfigError, load_config
from tlsgate.store import StoreError, open_engine


class CommandError(Exception):
    """A failure to report as one line; ``status`` is the exit code."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Context:
    config: Config
    out: object = sys.stdout

    @cached_property
    def engine(self) -> Engine:
        return open_engine(self.config.database.url, connect_timeout=self.config.database.connect_timeout)


def _non_empty(text: str) -> str:
    """Refuse an empty value: ignoring it would quietly use another database (the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsgate",
        description="Manage TLS connector rules for Postfix and explain their decisions.",
    )
    parser.add_argument("-c", "--config", help="configuration file (default /etc/tlsgate/tlsgate.conf)")
    parser.add_argument("--database-url", type=_non_empty,
                        help="database URL (overrides the configuration and TLSGATE_DATABASE_URL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Every module of this package that has register() adds its commands, in name order.
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # A row's bytes that were not UTF-8 (kept as lone surrogates) are shown escaped, whatever
    # the terminal's encoding, never a traceback in place of the problem that names them.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"tlsgate: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.database_url:
        config = replace(config, database=replace(config.database, url=args.database_url))
    ctx = Context(config)
    try:
        status: int = args.func(args, ctx)
        return status
    except (CommandError, StoreError) as exc:
        print(f"tlsgate: {exc}", file=sys.stderr)
        return getattr(exc, "status", 1)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
