"""Logging as mail software does it: syslog facility mail with the pid, or stderr under
systemd (journald adds the identifier), at a configurable level.

Records are handed to a queue and written by a listener thread, so a slow syslog socket never
stalls a daemon's event loop, and no line is dropped (the queue is unbounded; a decision line
is small).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import socket
import sys

from tlsgate.config import LogConfig

_listener: logging.handlers.QueueListener | None = None


def _under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def _handler(cfg: LogConfig, ident: str) -> logging.Handler:
    target = cfg.target
    if target == "auto":
        target = "stderr" if _under_systemd() or not os.path.exists(cfg.syslog_socket) else "syslog"
    if target == "syslog":
        try:
            handler: logging.Handler = logging.handlers.SysLogHandler(
                address=cfg.syslog_socket,
                facility=logging.handlers.SysLogHandler.LOG_MAIL,
                socktype=socket.SOCK_DGRAM,
            )
            handler.setFormatter(logging.Formatter(f"{ident}[{os.getpid()}]: %(message)s"))
            return handler
        except OSError:
            pass  # no syslog socket (a container): fall back to stderr below
    handler = logging.StreamHandler(sys.stderr)
    if _under_systemd():
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {ident}[{os.getpid()}]: %(levelname)s: %(message)s")
        )
    return handler


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands each record over as it is, its message already formatted, without a copy.

    The stock handler copies every record so that other handlers still see the original; here
    it is the root logger's only handler, and a decision line per request makes the copy a
    measurable share of a daemon's time.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.message = record.msg = self.format(record)
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return record


def configure(cfg: LogConfig, ident: str) -> None:
    """Route the root logger through a queue to syslog or stderr."""
    global _listener
    stop()
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_QueueHandler(q))
    root.setLevel(cfg.level.upper())
    _listener = logging.handlers.QueueListener(q, _handler(cfg, ident), respect_handler_level=False)
    _listener.start()


def stop() -> None:
    """Flush every queued line; call before exit."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
