"""Logging as mail software does it: syslog facility mail with the pid, or stderr under
systemd (journald adds the identifier), at a configurable level.

A daemon's threads only append each record to a buffer; a writer thread takes everything that
has gathered each time it wakes and writes it: one write for a stream, one datagram per line
for syslog. A slow syslog socket never stalls an event loop, and no line is dropped (the
buffer is unbounded; a decision line is small).

A line logged after a quiet moment wakes the writer and is written at once; the writer then
takes what has gathered every ``LINGER`` seconds for as long as lines keep coming, and goes
back to waiting after a quiet interval. A busy daemon's threads thus never wake the writer:
waking it, and handing it the interpreter lock, cost more per line than the decision the line
records (measured: about 50 µs of the event loop's time per request at 500 requests/s).

A decision line, logged for every request, goes through :func:`line`: the writer's buffer takes
its time, level and text, without the LogRecord that the logging module would build, and the
writer formats it as any other line.
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

from tlsgate.config import LogConfig

LINGER = 0.02

_writer: _Writer | None = None


def _under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def _stderr_is_journal() -> bool:
    """True when standard error is a stream to systemd's journal: ``JOURNAL_STREAM`` names its
    device and inode (systemd.exec(5)). The journal then reads a ``<N>`` prefix as the line's
    syslog priority; anywhere else such a prefix would be written as it is."""
    try:
        device, inode = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


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
            handler.setFormatter(_LineFormatter(f"{ident}[{os.getpid()}]: ", timed=False, levelled=False))
            return handler
        except OSError:
            pass  # no syslog socket (a container): fall back to stderr below
    handler = logging.StreamHandler(sys.stderr)
    if _under_systemd():
        handler.setFormatter(_LineFormatter("", timed=False, levelled=True, journal=_stderr_is_journal()))
    else:
        handler.setFormatter(_LineFormatter(f"{ident}[{os.getpid()}]: ", timed=True, levelled=True))
    return handler


# syslog(3) priorities of logging's levels, for the journal's ``<N>`` prefix.
_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


class _LineFormatter(logging.Formatter):
    """``[time ]prefix[LEVEL: ]message``, the time as logging's default (``2026-11-29 12:00:00,123``).

    For the journal (``journal=True``), every line of a record also starts with its syslog
    priority (``<3>`` for an error), so that ``journalctl -p`` and the syslog daemon the journal
    forwards to see each line at its level, a traceback's lines included.

    One f-string per line, the time's text kept for the second it names: a daemon writes a
    line per decision, and the general formatter's record dictionary and ``strftime`` per line
    cost the writer more than the decision took.
    """

    def __init__(self, prefix: str, *, timed: bool, levelled: bool, journal: bool = False) -> None:
        super().__init__()
        self._prefix = prefix
        self._timed = timed
        self._levelled = levelled
        self._journal = journal
        self._second = -1
        self._stamp = ""

    def line(self, created: float, levelname: str, message: str) -> str:
        text = self._line(created, levelname, message)
        return self._prioritised(levelname, text) if self._journal else text

    def _prioritised(self, levelname: str, text: str) -> str:
        priority = f"<{_PRIORITY.get(levelname, 6)}>"
        return priority + text.replace("\n", "\n" + priority)

    def _line(self, created: float, levelname: str, message: str) -> str:
        head = self._prefix
        if self._levelled:
            head = f"{head}{levelname}: "
        if self._timed:
            second = int(created)
            if second != self._second:
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
                self._second = second
            head = f"{self._stamp},{int((created - second) * 1000):03d} {head}"
        return head + message

    def format(self, record: logging.LogRecord) -> str:
        """What ``logging.Formatter`` makes of a record, traceback and stack included."""
        text = self._line(record.created, record.levelname, record.getMessage())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for extra in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if extra:
                if not text.endswith("\n"):
                    text += "\n"
                text += extra
        return self._prioritised(record.levelname, text) if self._journal else text


# A line queued by line(): when it was logged, its level and its text.
_Line = tuple[float, int, str]


class _Writer(logging.Handler):
    """The root logger's only handler: buffers records, written in batches on a thread."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self._target = target
        self._records: collections.deque[logging.LogRecord | _Line] = collections.deque()
        self._wake = threading.Event()
        self._idle = True  # waiting for a line to wake it
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tlsgate-log", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # No lock, no copy: the message is merged now (its arguments may change later) and
        # the record queued as it is; deque.append is atomic.
        try:
            record.msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is reported, never raised
            self.handleError(record)
            return False
        record.args = None
        self._queue(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def _queue(self, item: logging.LogRecord | _Line) -> None:
        self._records.append(item)
        if self._idle:
            self._idle = False
            self._wake.set()

    def serves(self, logger: logging.Logger) -> bool:
        """True when a line of ``logger`` would reach this writer and nothing else, and no level
        of the writer's own would hold it back."""
        node: logging.Logger | None = logger
        while node is not None and node.parent is not None:
            if node.handlers or node.filters or not node.propagate:
                return False
            node = node.parent
        return (node is not None and node.handlers == [self] and not node.filters and not self.filters
                and self.level == logging.NOTSET)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            self._write()  # the first line after a quiet moment, at once
            while not self._stopping:
                time.sleep(LINGER)  # then the lines logged meanwhile, together
                self._idle = True  # from here on, a new line wakes the writer
                if not self._records:
                    break  # quiet: wait to be woken
                self._idle = False
                self._write()

    def _write(self) -> None:
        records = self._records
        batch = []
        while records:
            batch.append(records.popleft())
        if not batch:
            return
        target = self._target
        formatter = target.formatter
        if isinstance(target, logging.StreamHandler) and isinstance(formatter, _LineFormatter):
            try:
                target.stream.write("".join([
                    formatter.line(item[0], logging.getLevelName(item[1]), item[2]) + "\n"
                    if isinstance(item, tuple) else target.format(item) + "\n"
                    for item in batch
                ]))
                target.stream.flush()
            except Exception:  # noqa: BLE001 - as logging itself does: report, never raise
                target.handleError(_record(batch[0]))
        else:
            for item in batch:
                target.handle(_record(item))

    def stop(self, timeout: float = 5.0) -> None:
        """Write every buffered line and end the thread; a log that blocks longer than
        ``timeout`` (a syslog daemon that reads nothing) does not hold up an exit."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._write()
            self._target.close()


def _record(item: logging.LogRecord | _Line) -> logging.LogRecord:
    if not isinstance(item, tuple):
        return item
    created, level, text = item
    return logging.makeLogRecord({"created": created, "msecs": (created - int(created)) * 1000,
                                  "levelno": level, "levelname": logging.getLevelName(level), "msg": text})


def line(logger: logging.Logger, level: int, text: str) -> None:
    """Log ``text`` as it is, the way ``logger.log(level, "%s", text)`` would.

    The path of a daemon's line per decision: once configured, the line goes straight to the
    writer's buffer, as a time, a level and the text, without a LogRecord, unless a handler or
    filter of someone else's would have seen it. Check ``logger.isEnabledFor(level)`` before
    building the text.
    """
    writer = _writer
    if writer is not None and writer.serves(logger):
        if logger.isEnabledFor(level):
            writer._queue((time.time(), level, text))
    else:
        logger.log(level, "%s", text)


#: a fault of one kind shows its traceback at most once in this many seconds
TRACEBACK_INTERVAL = 60.0
_tracebacks_shown: dict[tuple[str, str, int], float] = {}
_clock = time.monotonic


def failure(logger: logging.Logger, msg: str, *args: object) -> None:
    """Log the exception being handled at ERROR, on one line with its type and message, and
    with its traceback the first time in ``TRACEBACK_INTERVAL`` seconds that an exception of
    its type is raised at its line. A fault that hits every request thus writes one traceback
    a minute to mail.log, and still one line for every request it concerns."""
    exc = sys.exc_info()[1]
    if exc is None:
        logger.error(msg, *args)
        return
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    kind = (type(exc).__qualname__, tb.tb_frame.f_code.co_filename if tb else "", tb.tb_lineno if tb else 0)
    now = _clock()
    shown = _tracebacks_shown.get(kind)
    if shown is not None and now - shown < TRACEBACK_INTERVAL:
        logger.error(msg + " (%s: %s; its traceback was logged at most %d s ago)",
                     *args, type(exc).__name__, exc, TRACEBACK_INTERVAL)
        return
    if len(_tracebacks_shown) >= 256:  # kinds are places in the code: few, but bounded anyway
        _tracebacks_shown.clear()
    _tracebacks_shown[kind] = now
    logger.error(msg, *args, exc_info=True)


#: a warning about misbehaving clients is logged at most once in this many seconds per kind;
#: the next one says how many were held back
WARNING_INTERVAL = 60.0


class ThrottledWarnings:
    """WARNING lines of one kind at most once per ``interval`` seconds.

    A flood of misbehaving clients would otherwise write one line per connection to mail.log.
    The next line of a kind carries how many were held back since the last one; a flood that
    ends before another line is due is reported by :meth:`flush`, which the daemons call
    periodically.
    """

    def __init__(self, logger: logging.Logger, interval: float = WARNING_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        # kind -> how many were held back since its last line, and the latest of them
        self._held: dict[str, tuple[int, str, tuple[object, ...]]] = {}

    def warning(self, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless a line of ``kind`` was logged less than ``interval`` ago;
        True when the line was written."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            held = self._held.get(kind, (0, "", ()))[0]
            self._held[kind] = (held + 1, msg, args)
            return False
        self._write(kind, now, msg, args, more=self._held.pop(kind, (0, "", ()))[0])
        return True

    def flush(self, *, force: bool = False) -> None:
        """Write the latest held-back line of every kind that has had none written for
        ``interval`` seconds (of every kind, when ``force``: at a stop), with the count of the
        others."""
        now = self._clock()
        for kind, (held, msg, args) in list(self._held.items()):
            if force or now - self._last[kind] >= self._interval:
                del self._held[kind]
                self._write(kind, now, msg, args, more=held - 1)

    def _write(self, kind: str, now: float, msg: str, args: tuple[object, ...], more: int) -> None:
        last = self._last.get(kind)
        self._last[kind] = now
        if more and last is not None:
            self._log.warning(msg + " (and %d more like it in the last %.0f s)", *args, more, now - last)
        else:
            self._log.warning(msg, *args)


def configure(cfg: LogConfig, ident: str) -> None:
    """Route the root logger through the batching writer to syslog or stderr."""
    global _writer
    stop()
    # The line formats use none of these; collecting them is a measurable share of a
    # decision line (the logging HOWTO's "Optimization").
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # the documented switch for caller lookups
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    _writer = _Writer(_handler(cfg, ident))
    root.addHandler(_writer)
    root.setLevel(cfg.level.upper())


def stop(timeout: float = 5.0) -> None:
    """Flush every buffered line; call before exit."""
    global _writer
    if _writer is not None:
        logging.getLogger().removeHandler(_writer)
        _writer.stop(timeout)
        _writer = None
