"""``tlsgate stats``: a summary of a running daemon's metrics endpoint."""

from __future__ import annotations

import argparse
import http.client
import math
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from tlsgate.cli import CommandError

#: the most read of a metrics page: a daemon's is a few KiB
MAX_METRICS = 1 << 20

if TYPE_CHECKING:
    from tlsgate.cli import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("stats", help="summarise the metrics of the running daemons")
    p.add_argument("--metrics", action="append", metavar="HOST:PORT",
                   help="a daemon's metrics address (default: [policyd] and [milter] metrics)")
    p.set_defaults(func=cmd_stats)


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of a cumulative histogram."""
    if not buckets or buckets[-1][1] == 0:
        return None
    target = q * buckets[-1][1]
    for bound, count in buckets:
        if count >= target:
            return bound
    return math.inf


def summary(text: str) -> list[str]:
    decisions: dict[str, dict[str, float]] = defaultdict(dict)
    buckets: list[tuple[float, float]] = []
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tlsgate_decisions_total":
                connector = sample.labels.get("connector") or "(no connector)"
                decisions[connector][sample.labels.get("verdict", "?")] = sample.value
            elif sample.name == "tlsgate_decision_seconds_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
            elif not sample.labels:
                values[sample.name] = sample.value
    lines = []
    gen = values.get("tlsgate_rules_generation", -1)
    if gen < 0:
        lines.append("rules: none loaded (answering temporary failures)")
    else:
        lines.append(f"rules: generation {int(gen)}, loaded {values.get('tlsgate_rules_age_seconds', 0):.0f}s ago")
    lines.append(f"database errors: {int(values.get('tlsgate_database_errors', 0))}, "
                 f"DNS refresh failures: {int(values.get('tlsgate_dns_refresh_failures', 0))}")
    total = sum(sum(v.values()) for v in decisions.values())
    lines.append(f"decisions: {int(total)}")
    for connector in sorted(decisions):
        verdicts = ", ".join(f"{v} {int(n)}" for v, n in sorted(decisions[connector].items()))
        lines.append(f"  {connector}: {verdicts}")
    buckets.sort()
    p50, p99 = _quantile(buckets, 0.5), _quantile(buckets, 0.99)
    if p50 is not None and p99 is not None:
        lines.append(f"latency: p50 <= {p50 * 1000:.2f} ms, p99 <= {p99 * 1000:.2f} ms")
    return lines


def cmd_stats(args: argparse.Namespace, ctx: Context) -> int:
    targets = args.metrics or [m for m in (ctx.config.policyd.metrics, ctx.config.milter.metrics) if m]
    if not targets:
        raise CommandError("no metrics address: set `metrics = 127.0.0.1:PORT` under [policyd] or [milter], "
                           "or give --metrics HOST:PORT")
    status = 0
    for target in targets:
        url = f"http://{target}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read(MAX_METRICS).decode()
            lines = summary(text)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # An error like any other command's (stderr, "tlsgate:"), and the next daemon's summary still.
            print(f"tlsgate: {target}: not answering ({getattr(exc, 'reason', exc)})", file=sys.stderr)
            status = 1
            continue
        except ValueError as exc:  # not UTF-8, not the Prometheus text format
            print(f"tlsgate: {target}: not a tlsgate metrics endpoint ({exc})", file=sys.stderr)
            status = 1
            continue
        print(f"{target}:")
        for line in lines:
            print(f"  {line}")
    return status
