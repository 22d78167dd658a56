"""Part 4: tlsgate-socketmap lookups per second (Postfix's smtp_tls_policy_maps queries) at
10 and 100,000 outbound connectors, over a unix socket with 1 and 16 persistent connections;
half the keys name a connector's domain, half no connector."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from bench.common import DAEMONS, Child, sqlite_rules
from bench.loadgen import run_load
from tlsgate.socketmap import encode_request


def start_socketmap(work: Path, outbound: int) -> tuple[Child, str]:
    url = sqlite_rules(work / f"socketmap-{outbound}.sqlite", 0, outbound=outbound)
    path = str(work / f"socketmap-{outbound}.sock")
    conf = work / f"socketmap-{outbound}.conf"
    conf.write_text(f"[database]\nurl = {url}\npoll_interval = 5\n\n[socketmap]\nlisten = unix:{path}\n"
                    "socket_mode = 0666\nsocket_group = root\n\n[log]\ntarget = stderr\nlevel = info\n")
    log = work / f"socketmap-{outbound}.log"
    log.unlink(missing_ok=True)
    child = Child([*DAEMONS["tlsgate-socketmap"], "--config", str(conf)], log)
    child.start(lambda: "loaded rules generation" in log.read_text() and Path(path).exists())
    return child, path


def run(work: Path, *, runs: int = 5, counts: tuple[int, ...] = (10, 100_000), conns: tuple[int, ...] = (1, 16),
        duration: float = 2.0) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(4)
    out: dict[str, Any] = {"runs": runs, "results": {}}
    for count in counts:
        keys = [f"out{rng.randrange(count)}.test" if rng.random() < 0.5 else f"other{n}.example" for n in range(4000)]
        requests = [encode_request("tls_policy", key) for key in keys]
        child, path = start_socketmap(work, count)
        try:
            sample = run_load(path, 1, requests[:50], processes=1, max_requests=50, duration=10, netstring=True)
            if sample.errors:
                raise RuntimeError(f"socketmap answered with errors: {sample.errors}")
            for c in conns:
                rows = []
                for _ in range(runs):
                    r = run_load(path, c, requests, processes=1 if c == 1 else 2, duration=duration, netstring=True)
                    rows.append({"rate": r.rate, "p50_ms": r.latency_ms(0.5), "p99_ms": r.latency_ms(0.99),
                                 "client_cpu_pct": 100 * r.client_cpu_seconds / r.seconds})
                out["results"].setdefault(str(count), {})[str(c)] = rows
        finally:
            child.stop()
    return out
