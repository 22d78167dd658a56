"""The load generator: several client processes, each driving its share of persistent
connections with a selectors loop (one request in flight per connection, as each smtpd
process has), for a bounded count and a bounded time. Each process reports its latencies
and its own CPU time, so the report can show whether the clients were the bottleneck.
"""

from __future__ import annotations

import multiprocessing
import resource
import selectors
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

Address = str | tuple[str, int]


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    latencies_us: list[int]
    client_cpu_seconds: float
    client_processes: int
    errors: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def latency_ms(self, fraction: float) -> float:
        ordered = sorted(self.latencies_us)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] / 1000


def _answer_end(buffer: bytes, netstring: bool) -> int:
    """Index just past the first complete answer in ``buffer``, or -1."""
    if not netstring:
        end = buffer.find(b"\n\n")
        return end + 2 if end >= 0 else -1
    colon = buffer.find(b":")
    if colon < 0:
        return -1
    end = colon + 1 + int(buffer[:colon]) + 1
    return end if len(buffer) >= end else -1


def connect(address: Address, timeout: float = 30.0) -> socket.socket:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    return sock


def ask_all(address: Address, requests: Sequence[bytes], timeout: float = 120.0) -> list[str]:
    """Answers to ``requests`` over one connection, in order (the verdict check)."""
    answers = []
    with connect(address, timeout) as sock:
        buffer = b""
        for request in requests:
            sock.sendall(request)
            while b"\n\n" not in buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed by the server")
                buffer += chunk
            answer, _, buffer = buffer.partition(b"\n\n")
            answers.append(answer.decode(errors="replace"))
    return answers


def _worker(address: Address, connections: int, requests: Sequence[bytes], max_requests: int,
            duration: float, start_at: float, out: multiprocessing.Queue, netstring: bool) -> None:  # type: ignore[type-arg]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    socks = [connect(address) for _ in range(connections)]
    selector = selectors.DefaultSelector()
    state: dict[int, list] = {}  # fileno -> [sock, buffer, sent_at_ns, next_index]
    latencies: list[int] = []
    errors = 0
    sent = 0
    while time.time() < start_at:
        time.sleep(0.001)
    began = time.perf_counter()
    stop_at = began + duration
    for n, sock in enumerate(socks):
        sock.setblocking(False)
        request = requests[n % len(requests)]
        state[sock.fileno()] = [sock, b"", time.perf_counter_ns(), n + connections]
        sock.send(request)
        sent += 1
        selector.register(sock, selectors.EVENT_READ)
    in_flight = len(socks)
    while in_flight:
        for key, _ in selector.select(timeout=5):
            entry = state[key.fd]
            sock = entry[0]
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                errors += 1
                selector.unregister(sock)
                in_flight -= 1
                continue
            entry[1] += chunk
            end = _answer_end(entry[1], netstring)
            if end < 0:
                continue
            now = time.perf_counter_ns()
            latencies.append((now - entry[2]) // 1000)
            entry[1] = entry[1][end:]
            if sent < max_requests and time.perf_counter() < stop_at:
                request = requests[entry[3] % len(requests)]
                entry[3] += connections
                entry[2] = time.perf_counter_ns()
                sock.send(request)
                sent += 1
            else:
                selector.unregister(sock)
                in_flight -= 1
    elapsed = time.perf_counter() - began
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for sock in socks:
        sock.close()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    out.put((len(latencies), elapsed, latencies, cpu, errors))


def run_load(address: Address, connections: int, requests: Sequence[bytes], *, processes: int = 2,
             max_requests: int = 200_000, duration: float = 2.0, netstring: bool = False) -> LoadResult:
    """Drive ``connections`` persistent connections spread over ``processes`` client processes
    for at most ``duration`` seconds and ``max_requests`` requests in total."""
    processes = max(1, min(processes, connections))
    shares = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 0.3
    workers = []
    for index, share in enumerate(shares):
        mine = requests[index::processes] or requests
        worker = multiprocessing.Process(
            target=_worker, args=(address, share, mine, max_requests // processes, duration, start_at, queue, netstring))
        worker.start()
        workers.append(worker)
    results = [queue.get(timeout=duration + 120) for _ in workers]
    for worker in workers:
        worker.join(30)
    latencies = [lat for r in results for lat in r[2]]
    seconds = max(r[1] for r in results)
    return LoadResult(requests=sum(r[0] for r in results), seconds=seconds, latencies_us=latencies,
                      client_cpu_seconds=sum(r[3] for r in results), client_processes=processes,
                      errors=sum(r[4] for r in results))
