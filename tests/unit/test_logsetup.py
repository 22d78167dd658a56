"""The daemons' log writer: every line written once, in order, to stderr or to a syslog socket."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlsgate import logsetup
from tlsgate.config import LogConfig


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    switches = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing, logging._srcfile)
    yield
    logsetup.stop()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.logThreads, logging.logProcesses, logging.logMultiprocessing, logging._srcfile = switches


def test_lines_from_many_threads_are_all_written_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logsetup.configure(LogConfig(target="stderr", level="info"), "tlsgate-test")
    log = logging.getLogger("tlsgate.test")

    def talk(n: int) -> None:
        for i in range(500):
            log.info("thread %d line %d", n, i)
            log.debug("thread %d hidden %d", n, i)

    threads = [threading.Thread(target=talk, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    log.info("%d and %d", 1)  # a bad format string is reported, not raised
    logsetup.stop()

    lines = out.getvalue().splitlines()
    for n in range(4):
        mine = [line.split(": ", 2)[-1] for line in lines if f"thread {n} line" in line]
        assert mine == [f"thread {n} line {i}" for i in range(500)]
    assert not [line for line in lines if "hidden" in line]
    assert f"tlsgate-test[{os.getpid()}]: ERROR: failed" in out.getvalue()
    assert "ValueError: boom" in out.getvalue()


@contextlib.contextmanager
def logging_to_syslog(tmp_path: Path, lines: int) -> Iterator[socket.socket]:
    """A syslog socket of our own, and a daemon that has logged ``lines`` lines to it."""
    path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(path)
        logsetup.configure(LogConfig(target="syslog", level="info", syslog_socket=path), "tlsgate-test")
        for i in range(lines):
            logging.getLogger("tlsgate.test").info("line %d", i)
        yield syslog


def test_syslog_gets_one_datagram_per_line(tmp_path: Path) -> None:
    with logging_to_syslog(tmp_path, 50) as syslog:
        syslog.settimeout(5)
        got = [syslog.recv(4096) for _ in range(50)]  # a datagram socket queues only a few
        logsetup.stop()
    # facility mail (2), severity info (6): <22>
    assert got == [f"<22>tlsgate-test[{os.getpid()}]: line {i}\x00".encode() for i in range(50)]


def test_stop_writes_what_is_left_and_later_lines_do_not_vanish(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logsetup.configure(LogConfig(target="stderr", level="info"), "tlsgate-test")
    for i in range(1000):
        logging.getLogger("tlsgate.test").info("burst %d", i)
    logsetup.stop()
    assert out.getvalue().count("burst") == 1000
    assert not logging.getLogger().handlers


def test_a_syslog_that_reads_nothing_does_not_hold_up_the_exit(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", False)  # the lines after the close fail quietly
    with logging_to_syslog(tmp_path, 500) as syslog:
        writer = logsetup._writer
        assert writer is not None
        began = time.monotonic()
        logsetup.stop(timeout=0.5)
        assert time.monotonic() - began < 5
        assert syslog.recv(4096).endswith(b"line 0\x00")  # the writer was blocked, not gone
    writer._thread.join(10)  # its last lines fail once the socket is gone, then it ends
    assert not writer._thread.is_alive()


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_a_busy_daemon_s_lines_are_written_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _CountingStream()
    monkeypatch.setattr(sys, "stderr", out)
    logsetup.configure(LogConfig(target="stderr", level="info"), "tlsgate-test")
    log = logging.getLogger("tlsgate.test")
    log.info("alone")
    deadline = time.monotonic() + 10
    while "alone" not in out.getvalue():  # a quiet daemon's line is written without company
        assert time.monotonic() < deadline
        time.sleep(0.001)
    began = time.monotonic()
    lines = 0
    while time.monotonic() - began < 0.5:
        log.info("busy %d", lines)
        lines += 1
        time.sleep(0)  # let the writer run between lines, as a daemon's I/O does
    logsetup.stop()
    assert out.getvalue().count("busy") == lines
    # 0.5 s of lines fit in a few dozen writes, not one per line
    assert out.writes < 100 < lines, (out.writes, lines)


STDERR_LINE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} tlsgate-test\[\d+\]: INFO: "


def test_a_line_reads_as_a_logged_message_and_keeps_its_place(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logsetup.configure(LogConfig(target="stderr", level="info"), "tlsgate-test")
    log = logging.getLogger("tlsgate.test")
    log.info("first %s", "record")
    logsetup.line(log, logging.INFO, "NOQUEUE: pass 100% {braces} and %s kept as they are")
    logsetup.line(log, logging.DEBUG, "below the level")
    log.info("last record")
    logsetup.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert all(re.match(STDERR_LINE, line) for line in lines), lines
    assert [line.split("INFO: ", 1)[1] for line in lines] == [
        "first record", "NOQUEUE: pass 100% {braces} and %s kept as they are", "last record"]


def test_a_line_under_systemd_carries_only_its_level(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setenv("INVOCATION_ID", "0123")
    logsetup.configure(LogConfig(target="stderr", level="info"), "tlsgate-test")
    log = logging.getLogger("tlsgate.test")
    logsetup.line(log, logging.INFO, "a decision")
    log.warning("a warning")
    logsetup.stop()
    assert out.getvalue() == "INFO: a decision\nWARNING: a warning\n"


def test_a_line_to_the_journal_starts_with_its_priority(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Under systemd with standard error on the journal, every line carries its syslog priority,
    a traceback's included: journalctl -p err shows the errors, and the syslog daemon the journal
    forwards to files each line at its level."""
    with (tmp_path / "journal").open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logsetup.configure(LogConfig(target="stderr", level="info"), "tlsgate-test")
        log = logging.getLogger("tlsgate.test")
        logsetup.line(log, logging.INFO, "a decision")
        log.warning("a warning")
        try:
            raise ValueError("a bug")
        except ValueError:
            log.exception("deciding failed")
        logsetup.stop()
    lines = (tmp_path / "journal").read_text().splitlines()
    assert lines[:3] == ["<6>INFO: a decision", "<4>WARNING: a warning", "<3>ERROR: deciding failed"]
    assert lines[3] == "<3>Traceback (most recent call last):" and lines[-1] == "<3>ValueError: a bug", lines
    assert all(line.startswith("<3>") for line in lines[2:]), lines


def test_no_priority_where_standard_error_is_not_the_journal(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    """A unit whose standard error goes to a file (StandardError=file:) keeps JOURNAL_STREAM
    from its manager's environment: the prefix would be written as it is."""
    with (tmp_path / "file").open("w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
        logsetup.configure(LogConfig(target="stderr", level="info"), "tlsgate-test")
        logsetup.line(logging.getLogger("tlsgate.test"), logging.INFO, "a decision")
        logsetup.stop()
    assert (tmp_path / "file").read_text() == "INFO: a decision\n"


def test_a_line_to_syslog_is_one_datagram_at_its_level(tmp_path: Path) -> None:
    with logging_to_syslog(tmp_path, 0) as syslog:
        log = logging.getLogger("tlsgate.test")
        logsetup.line(log, logging.INFO, "a decision")
        logsetup.line(log, logging.WARNING, "a warning")
        syslog.settimeout(5)
        got = [syslog.recv(4096) for _ in range(2)]
        logsetup.stop()
    # facility mail (2): info is <22>, warning <20>
    assert got == [f"<22>tlsgate-test[{os.getpid()}]: a decision\x00".encode(),
                   f"<20>tlsgate-test[{os.getpid()}]: a warning\x00".encode()]


def test_a_line_still_reaches_any_other_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    logsetup.configure(LogConfig(target="stderr", level="info"), "tlsgate-test")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log = logging.getLogger("tlsgate.test.other")
    keep = Keep()
    log.addHandler(keep)
    try:
        logsetup.line(log, logging.INFO, "50% done")
    finally:
        log.removeHandler(keep)
    logsetup.line(log, logging.INFO, "unseen")
    logsetup.stop()
    assert seen == ["50% done"]
    assert "50% done" in sys.stderr.getvalue() and "unseen" in sys.stderr.getvalue()


def test_a_line_without_a_writer_goes_through_logging(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        logsetup.line(logging.getLogger("tlsgate.test"), logging.INFO, "100% as is")
    assert [r.getMessage() for r in caplog.records] == ["100% as is"]


def _records() -> list[logging.LogRecord]:
    """Plain, multi-line, ending in a newline, with a traceback, with a stack, at odd moments."""
    log = logging.getLogger("tlsgate.test.records")
    out: list[logging.LogRecord] = []
    keep = logging.Handler()
    keep.emit = out.append  # type: ignore[method-assign]
    log.addHandler(keep)
    log.propagate = False
    log.setLevel(logging.DEBUG)
    try:
        log.info("plain %d", 1)
        log.warning("two\nlines")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("ends in a newline\n")
            log.error("with traceback", exc_info=True)
        log.info("with stack", stack_info=True)
    finally:
        log.removeHandler(keep)
        log.propagate = True
        log.setLevel(logging.NOTSET)
    for record, created in zip(out, (0.0, 1_700_000_000.9995, 1_700_000_000.0001, 1_799_999_999.5, 86_399.999),
                               strict=True):
        record.created, record.msecs = created, (created - int(created)) * 1000
    return out


@pytest.mark.parametrize(("ours", "theirs"), [
    (logsetup._LineFormatter("tlsgate-test[7]: ", timed=True, levelled=True),
     logging.Formatter("%(asctime)s tlsgate-test[7]: %(levelname)s: %(message)s")),
    (logsetup._LineFormatter("", timed=False, levelled=True), logging.Formatter("%(levelname)s: %(message)s")),
    (logsetup._LineFormatter("tlsgate-test[7]: ", timed=False, levelled=False),
     logging.Formatter("tlsgate-test[7]: %(message)s")),
])
def test_the_line_formatter_writes_what_logging_s_own_would(ours: logging.Formatter,
                                                          theirs: logging.Formatter) -> None:
    for record in _records():
        theirs_text = theirs.format(logging.makeLogRecord(record.__dict__))
        assert ours.format(logging.makeLogRecord(record.__dict__)) == theirs_text


def test_a_line_obeys_what_would_silence_a_logged_message(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logsetup.configure(LogConfig(target="stderr", level="info"), "tlsgate-test")
    log = logging.getLogger("tlsgate.test.quiet")
    writer = logsetup._writer
    assert writer is not None
    logging.disable(logging.INFO)
    try:
        logsetup.line(log, logging.INFO, "disabled")
    finally:
        logging.disable(logging.NOTSET)
    writer.setLevel(logging.WARNING)
    logsetup.line(log, logging.INFO, "below the writer's level")
    logsetup.line(log, logging.WARNING, "at the writer's level")
    writer.setLevel(logging.NOTSET)
    log.propagate = False
    try:
        logsetup.line(log, logging.INFO, "not propagated")
    finally:
        log.propagate = True
    logsetup.line(log, logging.INFO, "kept")
    logsetup.stop()
    assert [line.split(": ", 2)[2] for line in out.getvalue().splitlines()] == ["at the writer's level", "kept"]



def _fail(exc: Exception) -> None:
    raise exc


def test_a_repeated_fault_shows_its_traceback_once_an_interval(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    monkeypatch.setattr(logsetup, "_clock", lambda: now[0])
    monkeypatch.setattr(logsetup, "_tracebacks_shown", {})
    log = logging.getLogger("tlsgate.test")

    def fault(queue_id: str, exc: Exception) -> logging.LogRecord:
        try:
            _fail(exc)
        except Exception:
            logsetup.failure(log, "%s: deciding failed", queue_id)
        return caplog.records[-1]

    first = fault("Q1", ValueError("bad"))
    assert (first.levelno, first.getMessage(), first.exc_info is not None) == (logging.ERROR, "Q1: deciding failed", True)
    again = fault("Q2", ValueError("100% bad"))  # the same type raised at the same line
    assert again.exc_info is None
    assert again.getMessage() == "Q2: deciding failed (ValueError: 100% bad; its traceback was logged at most 60 s ago)"
    assert fault("Q3", KeyError("x")).exc_info is not None  # another kind of fault
    now[0] += logsetup.TRACEBACK_INTERVAL
    assert fault("Q4", ValueError("bad")).exc_info is not None  # an interval later, shown again
    assert fault("Q5", ValueError("bad")).exc_info is None


def test_a_failure_outside_an_exception_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    logsetup.failure(logging.getLogger("tlsgate.test"), "%s: no exception", "Q1")
    assert [(r.getMessage(), r.exc_info) for r in caplog.records] == [("Q1: no exception", None)]
