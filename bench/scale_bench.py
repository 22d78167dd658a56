"""Part 3: scale of rules. Time and peak RSS to load 100,000 connectors (with their domains
and address ranges) from PostgreSQL and SQLite, each load in a fresh subprocess measured
from its /proc/self/status (VmRSS before, VmHWM after); time from a committed row change to a running
tlsgate-policyd answering by it; and the cost of the change-detection query.

PostgreSQL: a scratch database ``tlsgate_bench_<pid>`` is created on the server given by
TLSGATE_BENCH_PG (default the test server, postgresql+psycopg://postgres@127.0.0.1:5432/test)
and dropped afterwards.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench.common import DUNNO, REJECT, fill_rules, policy_request, sqlite_rules, summarize, verdict
from bench.loadgen import ask_all
from bench.policy_bench import start_tlsgate
from tlsgate.store import open_engine, read_generation

PG_ADMIN = os.environ.get("TLSGATE_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

# Memory from /proc/self/status: ru_maxrss survives execve on Linux, so a child's would start
# at the size of the bench process that forked it.
# The load is the daemons' own (tlsgate.rules.RuleHolder): with the cache that later reloads
# compare against, which a daemon holds for as long as it runs, and frozen out of the collector.
LOAD_PROBE = r"""
import json, sys, time
from tlsgate.store import LoadCache, load, open_engine
def status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
engine = open_engine(sys.argv[1])
before = status_mb("VmRSS")
began = time.perf_counter()
result = load(engine, cache=LoadCache(), freeze=True)
seconds = time.perf_counter() - began
print(json.dumps({"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": status_mb("VmHWM"),
                  "inbound": len(result.snapshot.inbound), "problems": len(result.problems)}))
"""


def measure_load(url: str, runs: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", LOAD_PROBE, url], capture_output=True, text=True,
                              timeout=600, check=True)
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def measure_generation_query(url: str, count: int) -> float:
    """Microseconds per change-detection query, as the rule holder runs it (pooled connection)."""
    engine = open_engine(url)
    try:
        read_generation(engine)
        began = time.perf_counter()
        for _ in range(count):
            read_generation(engine)
        return (time.perf_counter() - began) / count * 1e6
    finally:
        engine.dispose()


def measure_change(work: Path, connectors: int, runs: int) -> list[float]:
    """Seconds from COMMIT of a row change to the daemon's answers following it (poll 0.1 s)."""
    server = start_tlsgate(work, connectors, poll=0.1)
    db = work / f"rules-{connectors}.sqlite"
    request = policy_request("someone@change.test", False, 1)
    times = []
    try:
        for n in range(runs):
            require = n % 2 == 0  # alternately require TLS and drop the requirement
            expected = REJECT if require else DUNNO
            con = sqlite3.connect(db)
            con.execute("UPDATE inbound_connector SET require_tls = ? WHERE name = 'change-in'", (int(require),))
            con.commit()
            committed = time.perf_counter()
            con.close()
            deadline = committed + 30
            while verdict(ask_all(server.address, [request])[0]) != expected:
                if time.perf_counter() > deadline:
                    raise RuntimeError("change not applied within 30 s")
                time.sleep(0.005)
            times.append(time.perf_counter() - committed)
            time.sleep(0.3)
    finally:
        server.child.stop()
    return times


def run(work: Path, *, runs: int = 5, connectors: int = 100_000, query_count: int = 2000,
        postgresql: bool = True) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"connectors": connectors, "runs": runs, "databases": {}}
    began = time.perf_counter()
    sqlite_url = sqlite_rules(work / f"scale-{connectors}.sqlite", connectors)
    out["sqlite_fill_s"] = time.perf_counter() - began
    out["databases"]["SQLite"] = {"load": measure_load(sqlite_url, runs),
                                  "generation_query_us": measure_generation_query(sqlite_url, query_count)}
    if postgresql:
        out["databases"]["PostgreSQL"] = _postgresql(connectors, runs, query_count)
    out["change_applied_s"] = {str(n): measure_change(work, n, runs) for n in (10, connectors)}
    return out


def _postgresql(connectors: int, runs: int, query_count: int) -> dict[str, Any]:
    name = f"tlsgate_bench_{os.getpid()}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # any driver or server problem: report it, keep the rest of the bench
        admin.dispose()
        return {"skipped": f"PostgreSQL at {make_url(PG_ADMIN).host}: {exc.__class__.__name__}: {exc}"[:300]}
    url = make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    try:
        engine = open_engine(url)
        began = time.perf_counter()
        fill_rules(engine, connectors)
        fill = time.perf_counter() - began
        engine.dispose()
        return {"fill_s": fill, "load": measure_load(url, runs),
                "generation_query_us": measure_generation_query(url, query_count)}
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def describe(values: list[float]) -> str:
    return summarize(values).cell("{:.3f}")
