"""What a snapshot's indexes answer, for tests that compare two snapshots built differently."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from tlsgate.snapshot import Snapshot


def index_answers(snap: Snapshot, domains: Iterable[str], addresses: Iterable[str]) -> list[object]:
    """Every index lookup of ``domains`` (in each scope) and ``addresses``, by connector name:
    equal for two snapshots whose indexes find the same connectors, whatever their positions."""
    names = [c.name for c in snap.inbound]
    out: list[object] = []
    for domain in domains:
        for scope, index in snap.domains.items():
            out.append((scope, domain, sorted((names[i], v) for i, v in index.lookup(domain).items())))
    for address in addresses:
        found = snap.ranges.lookup(ipaddress.ip_address(address))
        out.append((address, sorted((names[i], v) for i, v in found.items())))
    return out
