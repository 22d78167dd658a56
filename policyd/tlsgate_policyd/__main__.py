"""``tlsgate-policyd``: start, readiness, reload and graceful stop of the policy daemon.

One place owns the lifecycle: the configuration is read and checked first (exit 78 with one
line on any problem); rules load in the background, so the daemon is READY as soon as it
listens and answers a temporary failure until the first snapshot exists; SIGHUP reloads the
rules now; SIGTERM stops accepting, lets requests in flight finish and exits 0.
``--spawn`` serves one connection on stdin/stdout, for a ``spawn`` service in master.cf,
with the same polling for rule changes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import stat
import sys
from collections.abc import Sequence

from tlsgate import logsetup, sdnotify
from tlsgate.config import EX_CONFIG, Config, ConfigError, check_database_url, load_config, resolve_myorigin
from tlsgate.metrics import Metrics
from tlsgate.rules import RuleHolder
from tlsgate.store import safe_url
from tlsgate_policyd.protocol import Limits, ProtocolError, RequestReader, encode
from tlsgate_policyd.server import PolicyServer, Responder

log = logging.getLogger("tlsgate.policyd")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tlsgate-policyd",
        description="Postfix SMTP access policy daemon that enforces tlsgate's TLS connectors.",
    )
    p.add_argument("-c", "--config", help="configuration file (default /etc/tlsgate/tlsgate.conf)")
    p.add_argument("--check-config", action="store_true", help="check the configuration and exit")
    p.add_argument("--spawn", action="store_true",
                   help="serve one connection on stdin/stdout (a spawn service in master.cf)")
    return p.parse_args(argv)


async def serve(config: Config, holder: RuleHolder) -> int:
    loop = asyncio.get_running_loop()
    metrics = None
    if config.policyd.metrics:
        metrics = Metrics("tlsgate-policyd")
        metrics.watch(lambda: holder.snapshot, lambda: holder.db_errors,
                      lambda: int(getattr(holder, "dns_failures", 0)))
        try:
            metrics.serve(config.policyd.metrics)
        except (OSError, ValueError) as exc:
            log.error("cannot serve metrics on %s: %s", config.policyd.metrics, exc)
            return 1
    server = PolicyServer(config, Responder(config, lambda: holder.snapshot, metrics=metrics,
                                            myorigin=resolve_myorigin(config.engine)))
    fds = [fd for fd, _name in sdnotify.listen_fds()]
    try:
        await server.start(fds)
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 1
    stop = asyncio.Event()

    async def reload() -> None:
        sdnotify.notify("RELOADING=1", "STATUS=reloading rules")
        log.info("SIGHUP: reloading rules")
        await loop.run_in_executor(None, holder.refresh, True)
        sdnotify.notify("READY=1", _status(holder))

    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # Before anything waits: a SIGHUP's default action would end the daemon (cleanly, for
    # systemd's Restart=on-failure, so for good).
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Ready once the first load has been tried (bounded by the database's connect timeout):
    # Postfix then meets the rules at once, or the outage answer if the database is down.
    await loop.run_in_executor(None, holder.first_attempt.wait, config.database.connect_timeout + 5)
    sdnotify.notify("READY=1", _status(holder))
    log.info("tlsgate-policyd ready; rules from %s", safe_url(config.database.url))

    interval = sdnotify.watchdog_interval()
    watchdog = loop.create_task(_watchdog(interval, holder)) if interval else None
    await stop.wait()
    sdnotify.notify("STOPPING=1", "STATUS=stopping")
    log.info("stopping: finishing requests in flight")
    if watchdog is not None:
        watchdog.cancel()
    await server.shutdown()
    return 0


def _status(holder: RuleHolder) -> str:
    return f"STATUS={holder.status}"


async def _watchdog(interval: float, holder: RuleHolder) -> None:
    # A ping proves the event loop still turns and the rules are still polled; systemd
    # restarts the daemon when the pings stop.
    while True:
        if holder.alive:
            sdnotify.notify("WATCHDOG=1", _status(holder))
        await asyncio.sleep(interval)


def spawn(config: Config, holder: RuleHolder) -> int:
    """One connection on stdin/stdout; Postfix's spawn(8) ends it by closing stdin.

    The first load is done before the first request is read, so a spawned process never
    answers a temporary failure for want of time; then the rules are polled as by the
    socket daemon, since smtpd keeps its connection, hence this process, for up to
    ``smtpd_policy_service_max_ttl`` (1000 s).
    """
    holder.refresh()
    holder.start()
    responder = Responder(config, lambda: holder.snapshot, myorigin=resolve_myorigin(config.engine))
    cfg = config.policyd
    parser = RequestReader(Limits(cfg.max_line, cfg.max_attributes, cfg.max_request))
    stdout = sys.stdout.buffer
    while True:
        data = os.read(sys.stdin.fileno(), 65536)
        if not data:
            return 0
        try:
            for request in parser.feed(data):
                stdout.write(encode(responder.respond(request)))
        except ProtocolError as exc:
            log.warning("closing spawned connection: %s", exc)
            return 0
        stdout.flush()


def _stderr_is_stdout() -> bool:
    """True when standard error and output are one socket: under spawn(8), the client's (a
    terminal shared by both is not)."""
    try:
        err, out = os.fstat(2), os.fstat(1)
    except OSError:
        return False
    return stat.S_ISSOCK(err.st_mode) and (err.st_dev, err.st_ino) == (out.st_dev, out.st_ino)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        check_database_url(config)
    except ConfigError as exc:
        print(f"tlsgate-policyd: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        print(f"tlsgate-policyd: configuration {config.path or '(defaults)'} is valid")
        return 0
    log_config = config.log
    if args.spawn and _stderr_is_stdout():
        # spawn(8) put the client's socket on standard error too: whatever would be written
        # there (a log line, a logging error, a warning) would be read as part of an answer.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        log_config = dataclasses.replace(log_config, target="syslog")
    logsetup.configure(log_config, "tlsgate-policyd")
    holder = RuleHolder(config.database, dns=config.dns)
    try:
        if args.spawn:
            return spawn(config, holder)
        holder.start()
        return asyncio.run(serve(config, holder))
    except KeyboardInterrupt:
        return 0
    finally:
        holder.stop()
        logsetup.stop()


if __name__ == "__main__":
    sys.exit(main())
