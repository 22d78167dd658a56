"""Part 1: the policy daemon against the floor server and postfwd1/postfwd2, same load, same run.

Every server first answers a sample of the request mix and its verdicts are compared with
the expected ones (REJECT 5.7.10 for a partner sender without TLS, DUNNO otherwise); a
server that disagrees is reported as such and its figures are not counted.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import DAEMONS, Child, cpu_seconds, postfwd_rules, request_mix, sqlite_rules, verdict
from bench.loadgen import Address, ask_all, run_load


@dataclass(frozen=True)
class Server:
    name: str
    kind: str
    connectors: int
    address: Address
    child: Child


def _connectable(address: Address) -> Callable[[], bool]:
    def probe() -> bool:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(address)
            except OSError:
                return False
            return True
    return probe


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_floor(work: Path) -> Server:
    path = str(work / "floor.sock")
    child = Child([sys.executable, "-m", "bench.floor_server", path], work / "floor.log")
    return Server("floor (asyncio DUNNO)", "floor", 0, path, child.start(_connectable(path)))


def tlsgate_config(work: Path, url: str, listen: str, poll: float = 2.0, extra: str = "") -> Path:
    config = work / f"tlsgate-{abs(hash((url, listen)))}.conf"
    config.write_text(f"[database]\nurl = {url}\npoll_interval = {poll}\n\n[policyd]\nlisten = {listen}\n"
                      f"socket_mode = 0666\nsocket_group = root\n{extra}\n[log]\ntarget = stderr\nlevel = info\n")
    return config


def start_tlsgate(work: Path, connectors: int, poll: float = 2.0) -> Server:
    db = work / f"rules-{connectors}.sqlite"
    url = sqlite_rules(db, connectors)
    path = str(work / f"policyd-{connectors}.sock")
    log = work / f"policyd-{connectors}.log"
    log.unlink(missing_ok=True)
    child = Child([*DAEMONS["tlsgate-policyd"], "--config", str(tlsgate_config(work, url, f"unix:{path}", poll))], log)
    child.start(lambda: "loaded rules generation" in log.read_text() and _connectable(path)())
    return Server(f"tlsgate-policyd, {connectors:,} connectors", "tlsgate", connectors, path, child)


def start_postfwd(work: Path, program: str, connectors: int) -> Server:
    rules = postfwd_rules(work / f"postfwd-{connectors}.cf", connectors)
    port = free_port()
    pidfile = work / f"{program}-{connectors}.pid"
    pidfile.unlink(missing_ok=True)
    # postfwd2 reads its rule file after switching to -u/-g (postfwd1 before): a user that cannot
    # read the work directory leaves it without rules, answering DUNNO. Both run as the bench's
    # own user, like every other server here. -c 0 turns the request cache off: every request
    # is judged.
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    args = [program, "-d", "-f", str(rules), "-i", "127.0.0.1", "-p", str(port), "--proto", "tcp", "-n",
            "-c", "0", "-u", user, "-g", group, "--pidfile", str(pidfile)]
    if program == "postfwd2":
        # postfwd2's cache daemon listens by default on /var/tmp/postfwd2-cache.socket, shared by
        # every instance: a private one, and no parent caches.
        args += ["--cache_socket", f"tcp:127.0.0.1:{free_port()}", "--no_parent_cache"]
    child = Child(args, work / f"{program}-{connectors}.log", pidfile=pidfile)
    child.start(_connectable(("127.0.0.1", port)), timeout=300)
    return Server(f"{program}, {connectors:,} rules", program, connectors, ("127.0.0.1", port), child)


def check_verdicts(server: Server, sample: int) -> tuple[bool, str]:
    mix = request_mix(max(server.connectors, 10), sample, seed=1)
    answers = ask_all(server.address, [r for r, _ in mix])
    if server.kind == "floor":
        return True, "answers DUNNO to everything by design (no rules)"
    wrong = [(verdict(a), e) for a, (_, e) in zip(answers, mix, strict=True) if verdict(a) != e]
    refused = sum(1 for _, e in mix if e != "DUNNO")
    if wrong:
        return False, f"{len(wrong)}/{sample} verdicts differ, e.g. answered {wrong[0][0]!r} where {wrong[0][1]!r} expected"
    return True, f"{sample}/{sample} verdicts as expected ({refused} REJECT 5.7.10)"


def _mix(server: Server) -> list[bytes]:
    return [r for r, _ in request_mix(max(server.connectors, 10), 4000, seed=2)]


def _one_run(server: Server, mix: list[bytes], connections: int, duration: float, max_requests: int) -> dict[str, Any]:
    pid = server.child.pid()
    assert pid is not None
    before = cpu_seconds(pid)
    result = run_load(server.address, connections, mix, processes=1 if connections == 1 else 2,
                      duration=duration, max_requests=max_requests)
    # The server is idle before the clients start and after they stop: its CPU time over the
    # requests answered is its cost per request, free of the clients' share of the cores.
    server_cpu = cpu_seconds(pid) - before
    return {"rate": result.rate, "p50_ms": result.latency_ms(0.5), "p99_ms": result.latency_ms(0.99),
            "requests": result.requests, "client_cpu_pct": 100 * result.client_cpu_seconds / result.seconds,
            "server_cpu_us": 1e6 * server_cpu / max(result.requests, 1),
            "client_processes": result.client_processes, "errors": result.errors}


def measure(server: Server, conns: tuple[int, ...], runs: int, duration: float, max_requests: int) -> dict[str, Any]:
    mix = _mix(server)
    return {str(c): [_one_run(server, mix, c, duration, max_requests) for _ in range(runs)] for c in conns}


def measure_interleaved(servers: list[Server], conns: tuple[int, ...], runs: int,
                        duration: float) -> list[dict[str, Any]]:
    """Every server's runs taken in turn, one run of each per round (the order reversed every
    other round): a host that slows down or speeds up during the bench then moves every
    server's figures alike, and the ratios between them hold."""
    mixes = [_mix(server) for server in servers]
    out: list[dict[str, Any]] = [{str(c): [] for c in conns} for _ in servers]
    for round_ in range(runs):
        for connections in conns:
            order = list(range(len(servers)))
            if round_ % 2:
                order.reverse()
            for i in order:
                out[i][str(connections)].append(_one_run(servers[i], mixes[i], connections, duration, 1_000_000))
    return out


def _start(starter: Callable[[], Server], sample: int) -> tuple[Server, dict[str, Any]]:
    began = time.monotonic()
    server = starter()
    entry: dict[str, Any] = {"name": server.name, "kind": server.kind, "connectors": server.connectors,
                             "startup_s": time.monotonic() - began}
    try:
        slow = server.kind.startswith("postfwd") and server.connectors > 100
        ok, note = check_verdicts(server, 40 if slow else sample)
    except BaseException:
        server.child.stop()
        raise
    entry.update(valid=ok, check=note)
    print(f"  {server.name}: {note}", flush=True)
    return server, entry


def run(work: Path, *, runs: int = 5, duration: float = 2.0, connector_counts: tuple[int, ...] = (10, 10_000, 100_000),
        postfwd_counts: tuple[int, ...] = (10, 1000), conns: tuple[int, ...] = (1, 16, 64),
        sample: int = 200, postfwd: bool = True) -> dict[str, Any]:
    """The floor and tlsgate-policyd at every connector count run side by side, interleaved (the
    targets are ratios between them); postfwd1 and postfwd2 follow one after the other."""
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"runs": runs, "duration": duration, "servers": [], "interleaved": True}
    side_by_side: list[Callable[[], Server]] = [lambda: start_floor(work)]
    side_by_side += [lambda n=n: start_tlsgate(work, n) for n in connector_counts]
    started: list[tuple[Server, dict[str, Any]]] = []
    try:
        for starter in side_by_side:
            started.append(_start(starter, sample))
        valid = [(server, entry) for server, entry in started if entry["valid"]]
        figures = measure_interleaved([server for server, _ in valid], conns, runs, duration)
        for (_, entry), result in zip(valid, figures, strict=True):
            entry["results"] = result
    finally:
        for server, _ in started:
            server.child.stop()
    results["servers"] += [entry for _, entry in started]
    if postfwd:
        for program in ("postfwd1", "postfwd2"):
            for n in postfwd_counts:
                server, entry = _start(lambda p=program, n=n: start_postfwd(work, p, n), sample)
                try:
                    if entry["valid"]:
                        # postfwd with many rules takes a large fraction of a second per request:
                        # bound its count so a run stays short, and say so in the report.
                        slow = n > 100
                        entry["results"] = measure(server, conns, 1 if slow else runs, duration,
                                                   400 if slow else 1_000_000)
                finally:
                    server.child.stop()
                results["servers"].append(entry)
    return results
