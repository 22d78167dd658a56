"""``tlsgate-milter``: start, reload and stop the milter.

The main thread owns the signals; libmilter's accept loop runs in a thread of its own.
libmilter blocks SIGTERM, SIGHUP and SIGINT in its threads and waits for them in a signal
thread of its own, where SIGTERM means a slow drain (about 4 s) and SIGHUP a restart of the
listener. Here every other thread is started with those signals blocked, so the kernel hands
them to the main thread's Python handlers: SIGHUP reloads the rules, SIGTERM stops promptly
(messages in progress get a bounded grace period, then the process exits after flushing its
logs). systemd hears READY=1 once the socket is open (even with the database down: answers
are then temporary failures), WATCHDOG=1 pings when it asks for them, and STOPPING=1 on
the way out.
"""

from __future__ import annotations

import argparse
import grp
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from tlsgate import logsetup, sdnotify
from tlsgate.config import EX_CONFIG, Config, ConfigError, check_database_url, load_config
from tlsgate.metrics import Metrics
from tlsgate.rules import RuleHolder
from tlsgate_milter.milter import (
    Judge,
    MilterSettings,
    libmilter_address,
    open_socket,
    serve,
    socket_path,
)

log = logging.getLogger("tlsgate.milter")

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: how long a stop waits for sessions that started a message to close
STOP_GRACE = 2.0
EX_SOFTWARE = 70


def check_config(cfg: Config) -> None:
    """Problems load_config cannot see: the socket syntax for libmilter, the socket group."""
    try:
        libmilter_address(cfg.milter.listen)
    except ValueError as exc:
        raise ConfigError(f"{cfg.path}: [milter] listen: {exc}") from None
    if socket_path(cfg.milter.listen) and cfg.milter.socket_group:
        try:
            grp.getgrnam(cfg.milter.socket_group)
        except KeyError:
            raise ConfigError(
                f"{cfg.path}: [milter] socket_group = {cfg.milter.socket_group!r}: no such group"
            ) from None


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tlsgate-milter", description="Enforce tlsgate's TLS connectors as a milter."
    )
    parser.add_argument("-c", "--config", help="configuration file (default /etc/tlsgate/tlsgate.conf)")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        cfg = load_config(args.config)
        check_database_url(cfg)
        check_config(cfg)
    except ConfigError as exc:
        print(f"tlsgate-milter: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        print(f"tlsgate-milter: configuration {cfg.path or '(defaults)'} is valid")
        return 0
    if sdnotify.listen_fds():
        # libmilter only opens sockets by name (smfi_setconn); it cannot adopt a descriptor.
        print(
            "tlsgate-milter: systemd socket activation is not supported by libmilter; "
            "remove the .socket unit and let the milter open [milter] listen itself",
            file=sys.stderr,
        )
        return EX_CONFIG

    # Every thread started from here on inherits the blocked signals.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    logsetup.configure(cfg.log, "tlsgate-milter")
    holder = RuleHolder(cfg.database, dns=cfg.dns)
    metrics = None
    if cfg.milter.metrics:
        metrics = Metrics("tlsgate-milter")
        metrics.watch(lambda: holder.snapshot, lambda: holder.db_errors, lambda: holder.dns_failures)
        try:
            metrics.serve(cfg.milter.metrics)
        except (OSError, ValueError) as exc:
            log.error("cannot serve metrics on %s: %s", cfg.milter.metrics, exc)
            logsetup.stop()
            return EX_SOFTWARE
    judge = Judge(snapshot=lambda: holder.snapshot, settings=MilterSettings.from_config(cfg), metrics=metrics)
    try:
        open_socket(
            judge, cfg.milter.listen, cfg.milter.socket_mode, cfg.milter.socket_group, cfg.milter.timeout
        )
    except Exception as exc:  # noqa: BLE001 - libmilter raises milter.error, the os calls OSError
        log.error("cannot listen on %s: %s", cfg.milter.listen, exc)
        logsetup.stop()
        return EX_SOFTWARE
    holder.start()
    server = threading.Thread(target=_serve, name="tlsgate-milter", daemon=True)
    server.start()

    pending: queue.SimpleQueue[int] = queue.SimpleQueue()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        pending.put(signum)  # SimpleQueue.put is safe in a signal handler

    for wanted in _SIGNALS:
        signal.signal(wanted, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

    log.info("listening on %s", cfg.milter.listen)
    sdnotify.notify("READY=1", f"STATUS=listening on {cfg.milter.listen}")
    ping = sdnotify.watchdog_interval()
    while True:
        try:
            received = pending.get(timeout=ping)
        except queue.Empty:
            if holder.alive:  # the rules are still polled; otherwise systemd restarts us
                sdnotify.notify("WATCHDOG=1", f"STATUS={holder.status}")
            continue
        if received == signal.SIGHUP:
            sdnotify.notify("RELOADING=1")
            log.info("SIGHUP: reloading the rules")
            holder.request_reload()
            sdnotify.notify("READY=1")
            continue
        break
    return _shutdown(cfg, holder, judge, signal.Signals(received).name)


def _serve() -> None:
    try:
        serve()
    except Exception:
        log.exception("the milter loop failed")
        os.kill(os.getpid(), signal.SIGTERM)


def _shutdown(cfg: Config, holder: RuleHolder, judge: Judge, why: str) -> int:
    started = time.monotonic()
    sdnotify.notify("STOPPING=1")
    log.info("%s: stopping, %d sessions with messages in progress", why, judge.activity.count)
    # libmilter's smfi_stop() is not called: it blocks until its listener's next poll
    # (measured 4.7 s) and cuts the sessions in progress. Removing a unix socket refuses new
    # connections at once; the process exit below ends the accept loop.
    path = socket_path(cfg.milter.listen)
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    if not judge.activity.wait_idle(STOP_GRACE):
        log.warning(
            "%d sessions still open after %.1fs; the MTA applies milter_default_action to them",
            judge.activity.count,
            STOP_GRACE,
        )
    holder.stop()
    log.info("stopped in %.3fs", time.monotonic() - started)
    logsetup.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    # libmilter's loop ends only at its next poll timeout and would call back into Python
    # during interpreter shutdown; with the logs flushed there is nothing left to lose.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
