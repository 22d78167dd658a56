"""Shared pieces of the benchmarks: the machine and versions, summary statistics, connector
rows written with plain SQL ``executemany``, realistic Postfix 3.7 policy requests with their
expected verdicts, postfwd's equivalent rule set, and child processes stopped by pid.

Rule shape everywhere: connector ``pN`` requires TLS (reject 5.7.10) for senders in
``partnerN.test`` from its address range ``10.x.y.0/24`` (a connector with both is selected
by both; the partner's requests come from its range, so postfwd's sender-only rules are
equivalent on this mix); ``change-in`` (sender ``change.test``) exists for
the change-latency measurement and starts with TLS not required.
"""

from __future__ import annotations

import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, text

from tlsgate.store import init_schema, open_engine

BIN = Path(sys.executable).parent
#: how each daemon is started: its module run by this interpreter (what the console scripts
#: call), so that a PYTHONPATH pointing at a source snapshot is honoured by the children too.
DAEMONS = {
    "tlsgate-policyd": [sys.executable, "-m", "tlsgate_policyd"],
    "tlsgate-milter": [sys.executable, "-m", "tlsgate_milter"],
    "tlsgate-socketmap": [sys.executable, "-c", "from tlsgate.socketmapd import main; main()"],
}
ROOT = Path(__file__).resolve().parent.parent
REJECT = "REJECT 5.7.10"
DUNNO = "DUNNO"


@dataclass(frozen=True)
class Summary:
    runs: int
    minimum: float
    median: float
    maximum: float

    def cell(self, fmt: str = "{:,.0f}") -> str:
        return f"{fmt.format(self.median)} ({fmt.format(self.minimum)}–{fmt.format(self.maximum)})"


def summarize(values: Sequence[float]) -> Summary:
    return Summary(len(values), min(values), statistics.median(values), max(values))


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


def machine() -> dict[str, str]:
    """What the figures were measured on: CPU, cores, memory, OS and every version that matters."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        memory = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        memory = "unknown"
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory.split(":", 1)[-1].strip(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    for name, args in {
        "postfix": ["postconf", "-dh", "mail_version"],
        "postfwd": ["postfwd1", "--version"],
        "sqlite": [sys.executable, "-c", "import sqlite3; print(sqlite3.sqlite_version)"],
        "sqlalchemy": [sys.executable, "-c", "import sqlalchemy; print(sqlalchemy.__version__)"],
        "pymilter": [sys.executable, "-c", "import importlib.metadata as m; print(m.version('pymilter'))"],
        "tlsgate": [sys.executable, "-c", "import tlsgate, subprocess, pathlib; d = pathlib.Path(tlsgate.__file__).parent.parent; "
                    "print(subprocess.run(['git', '-C', str(d), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True)"
                    ".stdout.strip() or f'source at {d}, not a git checkout')"],
    }.items():
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
            info[name] = (out.stdout.strip() or out.stderr.strip()).splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            info[name] = "unknown"
    return info


def yardstick(repeats: int = 7, rounds: int = 20_000) -> float:
    """Microseconds for one fixed piece of pure-Python work, best of ``repeats``: a Postfix
    policy request split into a dict of its 30 attributes.

    Every figure here is CPU-bound Python on shared cores, and the same host can run twice as
    slowly from one hour to the next. Taken at the start and the end of a run, this says how fast
    the host was meanwhile, so that reports can be compared by it (lower is faster).
    """
    lines = policy_request("someone@example.net", True, 1).decode().rstrip("\n").split("\n")
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(rounds):
            dict([line.split("=", 1) for line in lines])
        best = min(best, time.perf_counter() - began)
    return best / rounds * 1e6


# ----------------------------------------------------------------------------- rules


def partner_domain(index: int) -> str:
    return f"partner{index}.test"


def address_range(index: int) -> str:
    return f"10.{(index >> 8) & 255}.{index & 255}.0/24"


def fill_rules(engine: Engine, connectors: int, *, outbound: int = 0) -> None:
    """Schema plus ``connectors`` inbound (and ``outbound``) connectors, in batches of plain SQL."""
    init_schema(engine)
    batch = 5000
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO inbound_connector (name, require_tls, on_failure) VALUES ('change-in', :f, 'reject')"),
                     {"f": False})
        conn.execute(text("INSERT INTO inbound_domain (connector, scope, pattern) VALUES ('change-in', 'sender', 'change.test')"))
        for start in range(0, connectors, batch):
            ids = range(start, min(connectors, start + batch))
            conn.execute(text("INSERT INTO inbound_connector (name, on_failure) VALUES (:n, 'reject')"),
                         [{"n": f"p{i}"} for i in ids])
            conn.execute(text("INSERT INTO inbound_domain (connector, scope, pattern) VALUES (:n, 'sender', :d)"),
                         [{"n": f"p{i}", "d": partner_domain(i)} for i in ids])
            conn.execute(text("INSERT INTO inbound_address (connector, address) VALUES (:n, :a)"),
                         [{"n": f"p{i}", "a": address_range(i)} for i in ids])
        for start in range(0, outbound, batch):
            ids = range(start, min(outbound, start + batch))
            conn.execute(text("INSERT INTO outbound_connector (name, tls_level) VALUES (:n, 'secure')"),
                         [{"n": f"o{i}"} for i in ids])
            conn.execute(text("INSERT INTO outbound_domain (connector, pattern) VALUES (:n, :d)"),
                         [{"n": f"o{i}", "d": f"out{i}.test"} for i in ids])


def sqlite_rules(path: Path, connectors: int, *, outbound: int = 0) -> str:
    """A fresh SQLite rule database at ``path``; returns its URL."""
    path.unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    engine = open_engine(url)
    try:
        fill_rules(engine, connectors, outbound=outbound)
    finally:
        engine.dispose()
    return url


def postfwd_rules(path: Path, connectors: int) -> Path:
    """postfwd's equivalent: one rule per connector, TLS required for its sender domain."""
    with path.open("w") as out:
        for i in range(connectors):
            out.write(f"id=R{i}; sender=~@partner{i}\\.test$; encryption_protocol=!!(.+); action=REJECT 5.7.10 TLS required\n")
    return path


# ----------------------------------------------------------------------------- requests

TLS_FACTS = {
    "encryption_protocol": "TLSv1.3", "encryption_cipher": "TLS_AES_256_GCM_SHA384", "encryption_keysize": "256",
    "ccert_subject": "mail.partner.test", "ccert_issuer": "Lab Test CA",
    "ccert_fingerprint": "8E:3C:1A:0B:54:77:9D:21:A4:6F:33:C2:10:8B:7E:55:61:F0:2A:9C:4D:B8:13:E7:92:05:6A:CF:38:71:DE:04",
    "ccert_pubkey_fingerprint": "1F:AA:03:6B:92:4C:E8:5D:71:30:B6:0E:C9:28:47:F1:5A:83:DC:19:64:2B:A0:7E:35:C4:98:16:EF:52:0D:B3",
}
NO_TLS = {"encryption_protocol": "", "encryption_cipher": "", "encryption_keysize": "0", "ccert_subject": "",
          "ccert_issuer": "", "ccert_fingerprint": "", "ccert_pubkey_fingerprint": ""}


def policy_request(sender: str, tls: bool, serial: int, client: str | None = None) -> bytes:
    """Every attribute Postfix 3.7 sends at RCPT (smtpd_check.c), in its order."""
    attrs = {
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
        "helo_name": "mail.sender.test", "queue_id": "", "sender": sender,
        "recipient": f"user{serial % 97}@example.org", "recipient_count": "0",
        "client_address": client or f"198.51.100.{serial % 250 + 1}", "client_name": "mail.sender.test",
        "reverse_client_name": "mail.sender.test", "instance": f"{serial:x}.6560f3a1.{serial % 7}",
        "sasl_method": "", "sasl_username": "", "sasl_sender": "", "size": "4096",
        **(TLS_FACTS if tls else NO_TLS),
        "etrn_domain": "", "stress": "", "server_address": "127.0.0.1", "server_port": "25",
        "client_port": str(40000 + serial % 20000), "policy_context": "", "compatibility_level": "3.6",
        "mail_version": "3.7.11",
    }
    return "".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n"


def request_mix(connectors: int, count: int, seed: int = 9) -> list[tuple[bytes, str]]:
    """``count`` requests with their expected verdicts: half from partner domains spread over all
    connectors (half of those without TLS, hence refused), half from non-partner domains."""
    rng = random.Random(seed)
    out: list[tuple[bytes, str]] = []
    for serial in range(count):
        tls = rng.random() < 0.5
        if connectors and rng.random() < 0.5:
            index = rng.randrange(connectors)
            sender = f"user{serial}@{partner_domain(index)}"
            # A partner's mail comes from its own range: tlsgate selects a connector that
            # has both domains and ranges by both.
            client: str | None = address_range(index).replace(".0/24", f".{serial % 250 + 1}")
            expected = DUNNO if tls else REJECT
        else:
            sender = f"user{serial}@other{rng.randrange(1000)}.example"
            client = None
            expected = DUNNO
        out.append((policy_request(sender, tls, serial, client), expected))
    return out


def verdict(answer: str) -> str:
    """The comparable part of an answer: DUNNO, or the action and status code."""
    words = answer.removeprefix("action=").split()
    return " ".join(words[:2]) if words and words[0].upper() in ("REJECT", "DEFER") else " ".join(words[:1])


# ----------------------------------------------------------------------------- processes


class Child:
    """A benchmarked server process, stopped by its pid (or its pidfile for daemonising peers)."""

    def __init__(self, args: Sequence[str], log: Path, *, pidfile: Path | None = None) -> None:
        self.args = list(args)
        self.log = log
        self.pidfile = pidfile
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: Callable[[], bool], timeout: float = 120.0) -> Child:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not ready():
            if self.pidfile is None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[0]} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.args[0]} not ready in {timeout}s: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def pid(self) -> int | None:
        if self.pidfile is not None:
            try:
                return int(self.pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return None
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.wait(20)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a running process (all its threads) and of its descendants
    (postfwd2's preforked servers and cache daemon): those running, and those that ended and
    were waited for (their time is their parent's cutime and cstime); 0 for one that is gone."""
    stats: dict[int, tuple[int, int]] = {}  # pid -> (parent pid, ticks)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue  # ended meanwhile
            stats[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
    ticks = 0
    for other, (_, used) in stats.items():
        node = other
        for _ in range(len(stats)):  # a pid reused during the scan cannot loop forever
            if node <= 1 or node == pid:
                break
            node = stats[node][0] if node in stats else 0
        if node == pid:
            ticks += used
    return ticks / os.sysconf("SC_CLK_TCK")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
    except IndexError:
        return True
    # a zombie child of ours is reaped by Popen.wait in stop()
