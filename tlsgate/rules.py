"""Keeps a daemon's rule snapshot current: the first load, change detection, atomic swaps.

A background thread reads the ``rules_generation`` counter every ``poll_interval`` seconds
and loads a new snapshot only when it moved; SIGHUP (``request_reload``) forces a load. The
snapshot reference is replaced in one assignment, so request handlers on any thread or event
loop always see a whole snapshot. When the database is unreachable the last good snapshot
keeps serving and the outage is logged once, with a second line when it ends. Until a first
snapshot exists, ``snapshot`` is None and front-ends answer a temporary failure.
Address entries that name DNS are re-resolved on the same thread when their TTL runs out,
and the snapshot is rebuilt with their ranges without reading the database again. New rules
are swapped in before DNS is asked (entries not resolved yet fail closed), and the answers
in a second swap: a slow or dead DNS server delays neither the rules nor outbound answers.

Every database call has a deadline (``query_timeout``, enforced by the driver and the server),
and a second thread watches the poll as well: one that has had no answer for longer than the
deadline allows (a peer that keeps the connection open and never answers defeats every timeout
a driver has) is reported as an outage while the call goes on. A SQLite file replaced on disk
(a backup restored, rules built aside and renamed into place) is opened anew.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine

from tlsgate import logsetup
from tlsgate.config import DatabaseConfig, DnsConfig
from tlsgate.dnsranges import DnsCache, ResolverSettings, apply_dns, dns_entries
from tlsgate.snapshot import Snapshot
from tlsgate.store import LoadCache, StoreError, load, open_engine, read_generation, safe_url

log = logging.getLogger("tlsgate.rules")


#: a poll without an answer for connect_timeout + STALL_FACTOR x query_timeout is reported as an
#: outage: each statement has query_timeout, a poll runs several, and a load builds its snapshot
STALL_FACTOR = 1.5


def stall_after(cfg: DatabaseConfig) -> float:
    """Seconds after which a poll still waiting for the database is reported as an outage."""
    return cfg.connect_timeout + STALL_FACTOR * cfg.query_timeout


def resolver_settings(cfg: DnsConfig) -> ResolverSettings:
    return ResolverSettings(tuple(cfg.nameservers), cfg.port, cfg.timeout, cfg.min_ttl, cfg.max_ttl,
                            float(cfg.empty_grace))


class RuleHolder:
    """The current snapshot of one daemon, and the thread that keeps it current.

    ``resolve_dns=False`` never asks DNS, for a daemon that decides no inbound mail (the
    socketmap daemon): its connectors with DNS entries stay unresolved, failing closed.
    """

    def __init__(
        self,
        cfg: DatabaseConfig,
        *,
        on_swap: Callable[[Snapshot], None] | None = None,
        engine: Engine | None = None,
        dns: DnsConfig | None = None,
        resolve_dns: bool = True,
    ) -> None:
        self._cfg = cfg
        self._engine = engine
        self._on_swap = on_swap
        self._snapshot: Snapshot | None = None
        self._base: Snapshot | None = None  # as loaded from the database, before DNS entries
        self._entries: set[str] = set()  # the DNS entries of _base, gathered once per load
        self._cache = LoadCache()  # a poll that sees a change rebuilds only what changed
        self.dns = DnsCache(resolver_settings(dns or DnsConfig()))
        self._resolve_dns = resolve_dns
        self._outage: str | None = None
        self._fault: str | None = None  # the unforeseen exception of this outage, logged with its traceback
        self._state = threading.Lock()  # the outage: the poll and the stall watch both record it
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one load at a time
        self._thread: threading.Thread | None = None
        self._watch: threading.Thread | None = None
        # One item per SIGHUP: the poll thread takes them all before it loads, so that a request
        # landing at any moment is served by the load that follows it (a flag read, then reset,
        # loses one that lands in between).
        self._reloads: queue.SimpleQueue[None] = queue.SimpleQueue()
        # The database part of the poll under way (when it started, which one), for the watch.
        self._busy = threading.Condition()
        self._busy_since: float | None = None
        self._polls = 0
        self._stalled = 0  # the last poll reported as stalled
        self._sqlite_file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file read
        self._reread = False  # the SQLite file was replaced: load it, whatever its counter says
        #: set once the first load has been tried, whatever its outcome
        self.first_attempt = threading.Event()
        self.loads = 0
        self.db_errors = 0

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def healthy(self) -> bool:
        return self._outage is None

    @property
    def status(self) -> str:
        """What the daemons tell systemd (``STATUS=``, shown by ``systemctl status``)."""
        snap = self._snapshot
        if snap is None:
            rules = "no rules loaded yet: answering temporary failures"
        else:
            rules = (f"rules generation {snap.generation}: {len(snap.inbound)} inbound, "
                     f"{len(snap.outbound)} outbound connectors")
        outage = self._outage
        return rules if outage is None else f"{rules}; rule database unreachable: {outage}"

    def _db(self) -> Engine:
        if self._engine is None:
            self._engine = open_engine(self._cfg.url, connect_timeout=self._cfg.connect_timeout,
                                       query_timeout=self._cfg.query_timeout)
        engine = self._engine
        if engine.dialect.name == "sqlite" and self._sqlite_replaced(engine):
            self._reread = True  # a backup restored may carry the very counter now in force
        return engine

    def _sqlite_replaced(self, engine: Engine) -> bool:
        """True when the SQLite file is another one than the pool has open, which is then closed.

        A pooled connection keeps reading the file it opened, even once another was renamed
        over it. One stat a poll (about 5 us) finds that; a connection per poll instead (NullPool)
        would cost about 1 ms a poll, at every poll_interval, for an event of once in a while.
        """
        path = engine.url.database
        if not path or path == ":memory:" or path.startswith("file:"):
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False  # gone: what the pool has open still reads; a new file is seen when it comes
        found = (st.st_dev, st.st_ino)
        before, self._sqlite_file = self._sqlite_file, found
        if before is None or before == found:
            return False
        log.info("rule database file %s was replaced: reading the new file", path)
        engine.dispose()
        return True

    def refresh(self, force: bool = False) -> bool:
        """Load a new snapshot if the rules changed (or ``force``), and re-resolve DNS address
        entries that are due (every one when ``force``); True when a new snapshot was swapped in.

        New rules are swapped in at once, with what DNS said so far; the DNS answers follow in
        a second swap when they change any range. Never raises for database or DNS trouble:
        each outage is logged once.

        A call from another thread while a poll is stuck in the database gives up after the
        time that poll is reported stalled in; a forced load is then left to the poll thread.
        """
        if not self._lock.acquire(timeout=stall_after(self._cfg)):
            if force:
                self.request_reload()
            return False
        try:
            loaded = self._load(force)
            base = self._base
            if base is None:
                return False
            # A forced load (SIGHUP) re-resolves every entry too: the way to follow a DNS change now.
            return self._refresh_dns(base, everything=force) or loaded
        finally:
            self._lock.release()

    def _load(self, force: bool) -> bool:
        """Read the rules when they changed (or ``force``) and put them in force, with the DNS
        ranges known so far; True when it did."""
        poll = self._begin()
        try:
            engine = self._db()
            current = self._base
            if (not (force or self._reread) and current is not None
                    and read_generation(engine) == current.generation):
                self._recovered()
                return False
            started = time.monotonic()
            if force:  # SIGHUP: build every connector afresh
                self._cache = LoadCache()
            result = load(engine, cache=self._cache, freeze=True)
        except StoreError as exc:
            self._failed(str(exc), poll)
            return False
        except Exception as exc:  # noqa: BLE001 - logged by logsetup.failure
            # A fault no check foresaw (a bug, a value of a type nobody expected): an outage
            # like any other, so the last rules keep deciding and the next poll tries again
            # from scratch. Letting it end this thread would freeze the rules for good.
            fault = f"loading rules failed: {type(exc).__name__}: {exc}"
            if fault != self._fault:  # once an outage, not once a poll; again when it changes
                self._fault = fault
                logsetup.failure(log, "loading rules failed")
            self._cache = LoadCache()
            self._failed(fault, poll)
            return False
        finally:
            self._end()
        self._recovered()
        self._reread = False
        base = result.snapshot
        for problem in result.errors:
            log.error("rules generation %d: %s", base.generation, problem)
        self._base = base
        self._entries = dns_entries(base.inbound)
        self.loads += 1
        took = time.monotonic() - started
        self._swap(base, fresh=force)
        # Logged once the new rules decide: the line tells that they are in force.
        log.info(
            "loaded rules generation %d: %d inbound, %d outbound connectors, %d errors, in %.3fs",
            base.generation,
            len(base.inbound),
            len(base.outbound),
            len(result.errors),
            took,
        )
        return True

    def _refresh_dns(self, base: Snapshot, everything: bool = False) -> bool:
        """Resolve the due DNS entries of ``base`` (all of them when ``everything``); swap in a
        snapshot when any range changed."""
        if not self._resolve_dns:
            return False
        wanted = self._entries
        self.dns.forget(wanted)
        due = sorted(wanted) if everything else self.dns.due(wanted)
        if not (due and self.dns.refresh(due)):
            return False
        self._swap(base, fresh=False)
        return True

    def _swap(self, base: Snapshot, fresh: bool) -> None:
        """Put ``base`` with the DNS ranges known now in force; ``fresh`` builds every index anew."""
        snap = base
        if self._entries:
            snap = Snapshot(inbound=apply_dns(base.inbound, self.dns), outbound=base.outbound,
                            generation=base.generation, loaded_at=base.loaded_at, errors=base.errors,
                            previous=None if fresh else self._snapshot)
        self._snapshot = snap
        if self._on_swap is not None:
            self._on_swap(snap)

    @property
    def dns_failures(self) -> int:
        return self.dns.failures

    def _failed(self, message: str, poll: int = 0) -> None:
        """Record an outage: counted once per failed poll, logged once until it ends."""
        # What changed meanwhile may not show in the counter: its row deleted and restored, a
        # database restored from a backup or failed over. The first poll that works loads.
        self._reread = True
        with self._state:
            if poll == 0 or poll != self._stalled:  # a stalled poll was counted when it stalled
                self.db_errors += 1
            known, self._outage = self._outage, message  # the status tells the latest cause
            if known is not None:
                return
            current = self._snapshot
            if current is None:
                log.error("cannot load rules: %s; answering temporary failures until it can", message)
            else:
                log.error(
                    "cannot reach the rule database: %s; still deciding with rules generation %d loaded at %s",
                    message,
                    current.generation,
                    current.loaded_at.strftime("%Y-%m-%d %H:%M:%S %Z"),
                )

    def _recovered(self) -> None:
        with self._state:
            self._fault = None
            if self._outage is not None:
                self._outage = None
                log.warning("rule database %s is reachable again", safe_url(self._cfg.url))

    def _begin(self) -> int:
        """Mark the start of a poll's database calls for the stall watch; the poll's number."""
        with self._busy:
            self._polls += 1
            self._busy_since = time.monotonic()
            self._busy.notify_all()
            return self._polls

    def _end(self) -> None:
        with self._busy:
            self._busy_since = None

    def _watch_stalls(self) -> None:
        """Report a poll that has waited for the database past its deadline, once, while it goes
        on waiting. The calls have deadlines of their own, but a peer that keeps the connection
        open and never answers (a frozen proxy, a firewall that lost its state without resetting
        the connection) can leave the driver waiting for ever, and nobody would know."""
        limit = stall_after(self._cfg)
        with self._busy:
            while not self._stop.is_set():
                since = self._busy_since
                if since is None or self._stalled == self._polls:
                    self._busy.wait()
                    continue
                left = since + limit - time.monotonic()
                if left > 0:
                    self._busy.wait(left)
                    continue
                self._stalled = self._polls  # counted here: its own failure, should it end so, is not
                self._failed(f"database {safe_url(self._cfg.url)}: no answer in {limit:g} s "
                             f"(query_timeout {self._cfg.query_timeout:g} s); the poll is still waiting")
                self.first_attempt.set()  # tried, with this outcome: a daemon waiting for it goes on

    def request_reload(self) -> None:
        """Ask the background thread for a full load now (SIGHUP)."""
        self._reloads.put(None)
        self._wake.set()

    def _reload_requested(self) -> bool:
        """Whether a SIGHUP came since the last call: every one is taken, none is lost."""
        asked = False
        while True:
            try:
                self._reloads.get_nowait()
            except queue.Empty:
                return asked
            asked = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tlsgate-rules", daemon=True)
        self._watch = threading.Thread(target=self._watch_stalls, name="tlsgate-rules-watch", daemon=True)
        self._thread.start()
        self._watch.start()

    @property
    def alive(self) -> bool:
        """False once the polling thread has ended: a daemon's watchdog stops then.

        A poll stuck in a database that stopped answering leaves it True, on purpose: the
        outage is reported (``healthy``, the log) and the daemon goes on deciding with the last
        rules it loaded. A restart by the watchdog would throw those away and answer temporary
        failures until the database is back.
        """
        return self._thread is None or self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            force = self._reload_requested()
            try:
                self.refresh(force=force)
            except Exception:  # noqa: BLE001 - logged by logsetup.failure; the thread must go on
                logsetup.failure(log, "refreshing the rules failed; trying again in %g s", self._cfg.poll_interval)
            self.first_attempt.set()
            self._wake.wait(self._cfg.poll_interval)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._busy:
            self._busy.notify_all()
        if self._watch is not None:
            self._watch.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._engine is not None:
            self._engine.dispose()
