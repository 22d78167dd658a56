"""Prometheus metrics of a tlsgate daemon, served on an optional loopback HTTP port.

Every daemon owns one :class:`Metrics` with its own registry: decisions by connector and
verdict, the decision latency histogram, the snapshot's generation and age, database errors
and DNS refresh failures. Nothing is exported unless ``metrics = HOST:PORT`` is configured;
the exporter refuses non-loopback addresses, since the figures name partners.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tlsgate.decisionlog import verdict_word
from tlsgate.model import Decision
from tlsgate.snapshot import Snapshot

log = logging.getLogger("tlsgate.metrics")

# Decisions take tens of microseconds; the buckets resolve that and still catch stalls.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot | None], errors: Callable[[], int],
                 dns_failures: Callable[[], int]) -> None:
        self._snapshot = snapshot
        self._errors = errors
        self._dns_failures = dns_failures

    def collect(self) -> Any:
        snap = self._snapshot()
        gen = GaugeMetricFamily("tlsgate_rules_generation", "Generation of the rules in use (-1: none loaded)")
        age = GaugeMetricFamily("tlsgate_rules_age_seconds", "Seconds since the rules in use were loaded")
        count = GaugeMetricFamily("tlsgate_connectors", "Connectors in the rules in use", labels=["direction"])
        if snap is None:
            gen.add_metric([], -1)
            age.add_metric([], float("nan"))
        else:
            gen.add_metric([], snap.generation)
            age.add_metric([], time.time() - snap.loaded_at.timestamp())
            count.add_metric(["inbound"], len(snap.inbound))
            count.add_metric(["outbound"], len(snap.outbound))
        errors = GaugeMetricFamily("tlsgate_database_errors", "Failed attempts to read the rule database")
        errors.add_metric([], self._errors())
        dns = GaugeMetricFamily("tlsgate_dns_refresh_failures", "Failed DNS refreshes of address entries")
        dns.add_metric([], self._dns_failures())
        yield from (gen, age, count, errors, dns)


class Metrics:
    def __init__(self, daemon: str) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry()
        self.decisions = Counter("tlsgate_decisions", "Decisions by connector and verdict",
                                 ["connector", "verdict"], registry=self.registry)
        self.latency = Histogram("tlsgate_decision_seconds", "Time to decide one request",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)

    def watch(self, snapshot: Callable[[], Snapshot | None], db_errors: Callable[[], int],
              dns_failures: Callable[[], int] = lambda: 0) -> None:
        self.registry.register(_SnapshotCollector(snapshot, db_errors, dns_failures))

    def record(self, decision: Decision | None, seconds: float) -> None:
        """One decision; None when no rules were loaded (verdict ``norules``)."""
        if decision is None:
            self.decisions.labels("", "norules").inc()
        else:
            name = decision.connector.name if decision.connector is not None else ""
            self.decisions.labels(name, verdict_word(decision)).inc()
        self.latency.observe(seconds)

    def record_error(self) -> None:
        """A request answered with a temporary failure because deciding failed (verdict ``error``)."""
        self.decisions.labels("", "error").inc()

    def serve(self, listen: str) -> None:
        """Export on ``HOST:PORT`` (loopback only)."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"metrics address {listen} is not a loopback address")
        start_http_server(int(port), addr=host, registry=self.registry)
        log.info("metrics on http://%s/metrics", listen)
