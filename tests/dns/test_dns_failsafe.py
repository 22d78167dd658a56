"""What DNS address entries do when DNS goes wrong: an answer with no addresses after a good
one, a connector left without ranges, a dead server at start and at a reload. The promises:
a partner's session never falls outside its connector by accident, and DNS trouble never
holds back the rules from the database."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.dns.dnsserver import DnsServer, Records, running
from tests.support.rulesdb import make_rules_db
from tlsgate.config import DatabaseConfig, DnsConfig
from tlsgate.dnsranges import (
    ALL_ADDRESSES,
    EMPTY_GRACE,
    DnsCache,
    DnsFailure,
    Resolution,
    ResolverSettings,
    apply_dns,
    make_resolver,
    resolve_entry,
)
from tlsgate.engine import decide
from tlsgate.model import Decision, FailAction, InboundConnector, SessionFacts
from tlsgate.outbound import lookup
from tlsgate.patterns import DomainPattern, Network, parse_address
from tlsgate.rules import RuleHolder
from tlsgate.snapshot import Snapshot
from tlsgate.socketmap import Status
from tlsgate.socketmapd import IndexHolder

NOW = datetime.now(UTC)
SERVER_IP = "198.51.100.7"  # the partner's server, as DNS gave it
SPF = f'"v=spf1 ip4:{SERVER_IP} -all"'
ZONE: Records = {
    ("onprem.partner.test", "A"): [SERVER_IP],
    ("partner.test", "MX"): ["10 onprem.partner.test."],
    ("partner.test", "TXT"): [SPF],
}


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with running(ZONE, ttl=60) as s:
        yield s


def settings(server: DnsServer, empty_grace: float = EMPTY_GRACE) -> ResolverSettings:
    return ResolverSettings(nameservers=("127.0.0.1",), port=server.port, timeout=1.0, empty_grace=empty_grace)


def plaintext(client: str = SERVER_IP, sender: str = "a@partner.test") -> SessionFacts:
    return SessionFacts(parse_address(client), sender, "b@x.test")


def decide_with(connectors: tuple[InboundConnector, ...], cache: DnsCache, facts: SessionFacts) -> Decision:
    return decide(Snapshot(inbound=apply_dns(connectors, cache)), facts, NOW)


ONPREM = InboundConnector("onprem", dns_entries=("a:onprem.partner.test",))
PARTNER = (DomainPattern.parse("partner.test"),)


def test_nxdomain_after_a_good_answer_keeps_the_connector_in_force(server: DnsServer) -> None:
    cache = DnsCache(settings(server))
    cache.refresh(["a:onprem.partner.test"])
    d = decide_with((ONPREM,), cache, plaintext())
    assert d.connector is not None and d.action is FailAction.DEFER and "TLS required" in (d.reason or "")
    del server.records[("onprem.partner.test", "A")]
    changed = cache.refresh(["a:onprem.partner.test"])
    d = decide_with((ONPREM,), cache, plaintext())
    assert d.connector is not None, "plaintext from the partner's server now matches no connector"
    assert d.action is FailAction.DEFER and "TLS required" in (d.reason or "")
    assert changed is False  # the ranges in force did not change


def _nxdomain(s: DnsServer) -> None:
    del s.records[("onprem.partner.test", "A")]


def _nodata(s: DnsServer) -> None:
    s.records[("onprem.partner.test", "TXT")] = ['"the name exists, its address does not"']
    del s.records[("onprem.partner.test", "A")]


def _no_mx(s: DnsServer) -> None:
    del s.records[("partner.test", "MX")]


def _no_spf(s: DnsServer) -> None:
    s.records[("partner.test", "TXT")] = ['"google-site-verification=x"']


def _two_spf(s: DnsServer) -> None:
    s.records[("partner.test", "TXT")] = [SPF, '"v=spf1 -all"']


@pytest.mark.parametrize(("entry", "break_it", "note"), [
    ("a:onprem.partner.test", _nxdomain, "has no A or AAAA records"),
    ("a:onprem.partner.test", _nodata, "has no A or AAAA records"),
    ("mx:partner.test", _no_mx, "has no MX records"),
    ("spf:partner.test", _no_spf, "has no SPF record"),
    ("spf:partner.test", _two_spf, "2 SPF records"),
], ids=["nxdomain", "nodata", "no-mx", "no-spf", "two-spf"])
def test_an_empty_answer_keeps_the_last_ranges_for_the_grace(
    server: DnsServer, caplog: pytest.LogCaptureFixture, entry: str, break_it: Callable[[DnsServer], None],
    note: str,
) -> None:
    cache = DnsCache(settings(server, empty_grace=3600))
    cache.refresh([entry])
    good = cache.entries[entry].networks
    assert good == (ipaddress.ip_network(f"{SERVER_IP}/32"),)
    break_it(server)
    for _ in range(2):
        assert cache.refresh([entry]) is False
        held = cache.entries[entry]
        assert held.networks == good and held.empty_since is not None
        assert any(note in p for p in held.problems)
    assert [r.getMessage() for r in caplog.records if "keeping the last ranges" in r.getMessage()] == [
        f"DNS entry {entry}: no addresses ({'; '.join(held.problems)}); keeping the last ranges for up to 3600s"
    ]


def test_after_the_grace_the_ranges_are_dropped_and_the_connector_covers_no_client(
    server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A day of answers without addresses is an answer: the partner has no servers by that name.
    # Covering every client instead would defer all of this host's inbound mail over one zone.
    cache = DnsCache(settings(server, empty_grace=3600))
    cache.refresh(["a:onprem.partner.test"])
    del server.records[("onprem.partner.test", "A")]
    cache.refresh(["a:onprem.partner.test"])
    held = cache.entries["a:onprem.partner.test"]
    cache.entries["a:onprem.partner.test"] = replace(held, held=tuple((net, since - 3601) for net, since in held.held))
    assert cache.refresh(["a:onprem.partner.test"]) is True
    assert cache.entries["a:onprem.partner.test"].networks == ()
    assert any(r.levelname == "ERROR" and "its last ranges are dropped" in r.getMessage() for r in caplog.records)
    for facts in (plaintext(), plaintext("203.0.113.9", "a@else.test")):
        d = decide_with((ONPREM,), cache, facts)
        assert d.connector is None and d.action is None, d


def test_addresses_coming_back_end_the_hold(server: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    cache = DnsCache(settings(server))
    cache.refresh(["a:onprem.partner.test"])
    del server.records[("onprem.partner.test", "A")]
    cache.refresh(["a:onprem.partner.test"])
    server.records[("onprem.partner.test", "A")] = ["198.51.100.8"]
    assert cache.refresh(["a:onprem.partner.test"]) is True
    got = cache.entries["a:onprem.partner.test"]
    assert got.networks == (ipaddress.ip_network("198.51.100.8/32"),) and got.empty_since is None
    assert any("has addresses again" in r.getMessage() for r in caplog.records)
    # The grace is counted afresh from the next empty answer, not from the first one.
    del server.records[("onprem.partner.test", "A")]
    cache.refresh(["a:onprem.partner.test"])
    held = cache.entries["a:onprem.partner.test"]
    assert held.networks == got.networks and held.empty_since == held.resolved_at


SECOND_IP = "198.51.100.9"  # the partner's second server


def _second_mx(s: DnsServer) -> None:
    s.records[("partner.test", "MX")] = ["10 onprem.partner.test.", "20 backup.partner.test."]
    s.records[("backup.partner.test", "A")] = [SECOND_IP]


def _second_include(s: DnsServer) -> None:
    s.records[("partner.test", "TXT")] = [f'"v=spf1 ip4:{SERVER_IP} include:_spf.partner.test -all"']
    s.records[("_spf.partner.test", "TXT")] = [f'"v=spf1 ip4:{SECOND_IP} -all"']


def _backup_loses_its_address(s: DnsServer) -> None:
    del s.records[("backup.partner.test", "A")]


def _include_loses_its_record(s: DnsServer) -> None:
    del s.records[("_spf.partner.test", "TXT")]


def _spf_past_the_lookup_limit(s: DnsServer) -> None:
    # Ten includes before the one that names the second server: it is no longer followed.
    includes = " ".join(f'" include:x{i}.partner.test"' for i in range(10))  # a string each: 255 bytes at most
    s.records[("partner.test", "TXT")] = [f'"v=spf1 ip4:{SERVER_IP}" {includes} " include:_spf.partner.test -all"']
    for i in range(10):
        s.records[(f"x{i}.partner.test", "TXT")] = ['"v=spf1 -all"']


RESTRICTED = InboundConnector("restricted", sender_domains=PARTNER, require_tls=False, restrict_to_ranges=True,
                              on_failure=FailAction.REJECT)


@pytest.mark.parametrize(("entry", "grow", "shrink", "note"), [
    ("mx:partner.test", _second_mx, _backup_loses_its_address, "MX host backup.partner.test of partner.test has no"),
    ("spf:partner.test", _second_include, _include_loses_its_record, "_spf.partner.test has no SPF record"),
    ("spf:partner.test", _second_include, _spf_past_the_lookup_limit, "SPF lookup limit of 10 reached"),
], ids=["mx-host-gone", "spf-include-gone", "spf-past-limit"])
def test_an_answer_that_loses_some_addresses_keeps_them_for_the_grace(
    server: DnsServer, caplog: pytest.LogCaptureFixture, entry: str, grow: Callable[[DnsServer], None],
    shrink: Callable[[DnsServer], None], note: str,
) -> None:
    """One server of two vanishing from the partner's zone is more often a mistake than a
    server that left: the partner held to its addresses is not refused for good from it."""
    connector = replace(RESTRICTED, dns_entries=(entry,))
    grow(server)
    cache = DnsCache(settings(server, empty_grace=3600))
    cache.refresh([entry])
    both = {ipaddress.ip_network(f"{SERVER_IP}/32"), ipaddress.ip_network(f"{SECOND_IP}/32")}
    assert set(cache.entries[entry].networks) == both
    shrink(server)
    for _ in range(2):
        assert cache.refresh([entry]) is False  # the ranges in force did not change
        got = cache.entries[entry]
        assert set(got.networks) == both and [str(net) for net, _ in got.held] == [f"{SECOND_IP}/32"]
        assert got.empty_since is None and any(note in p for p in got.problems), got.problems
        d = decide_with((connector,), cache, plaintext(SECOND_IP))
        assert d.connector is not None and d.action is None, d
    assert [r.getMessage() for r in caplog.records if "keeping them" in r.getMessage()] == [
        f"DNS entry {entry} no longer gives {SECOND_IP}/32 ({'; '.join(got.problems)}); keeping them for up to 3600s"
    ]
    # Past the grace the lost range is dropped; the one still given stays.
    cache.entries[entry] = replace(got, held=tuple((net, since - 3601) for net, since in got.held))
    assert cache.refresh([entry]) is True
    assert cache.entries[entry].networks == (ipaddress.ip_network(f"{SERVER_IP}/32"),)
    assert cache.entries[entry].held == ()
    assert any(f"has not given {SECOND_IP}/32 for 36" in r.getMessage() for r in caplog.records)
    d = decide_with((connector,), cache, plaintext(SECOND_IP))
    assert d.action is FailAction.REJECT and d.status == "5.7.1", d
    assert decide_with((connector,), cache, plaintext()).action is None


def backup_held(server: DnsServer, empty_grace: float = EMPTY_GRACE) -> DnsCache:
    """A cache that resolved mx:partner.test to two servers, then to one: the other is held."""
    _second_mx(server)
    cache = DnsCache(settings(server, empty_grace=empty_grace))
    cache.refresh(["mx:partner.test"])
    _backup_loses_its_address(server)
    cache.refresh(["mx:partner.test"])
    return cache


def test_an_answer_with_a_new_address_is_a_move_followed_at_once(
    server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    entry = "mx:partner.test"
    cache = backup_held(server)
    assert len(cache.entries[entry].held) == 1
    # The partner's servers move: the new address is in force, the old ones are not held.
    server.records[("onprem.partner.test", "A")] = ["198.51.100.10"]
    assert cache.refresh([entry]) is True
    got = cache.entries[entry]
    assert got.networks == (ipaddress.ip_network("198.51.100.10/32"),) and got.held == ()
    assert any("gives new addresses; the ranges it had lost are dropped" in r.getMessage() for r in caplog.records)
    d = decide_with((replace(RESTRICTED, dns_entries=(entry,)),), cache, plaintext())
    assert d.action is FailAction.REJECT, d


def test_lost_addresses_given_again_end_their_hold(server: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    entry = "mx:partner.test"
    cache = backup_held(server)
    server.records[("backup.partner.test", "A")] = [SECOND_IP]
    assert cache.refresh([entry]) is False
    assert cache.entries[entry].held == ()
    assert any(f"DNS entry {entry} has all its ranges again" in r.getMessage() for r in caplog.records)


def test_a_held_range_is_asked_again_when_its_grace_ends(server: DnsServer) -> None:
    # Held past its grace until the next refresh, a range would outlive empty_grace by up to
    # a TTL (max_ttl: a day): the entry is due when the grace ends, whatever its TTL.
    entry = "mx:partner.test"
    cache = backup_held(server, empty_grace=3600)
    got = cache.entries[entry]
    assert got.held and cache.due([entry], now=got.resolved_at + 1) == []
    assert cache.due([entry], now=got.resolved_at + 3600) == [entry]


def test_addresses_partly_back_after_none_are_logged(server: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    entry = "mx:partner.test"
    _second_mx(server)
    cache = DnsCache(settings(server))
    cache.refresh([entry])
    del server.records[("partner.test", "MX")]
    cache.refresh([entry])
    assert cache.entries[entry].empty_since is not None
    _second_mx(server)
    _backup_loses_its_address(server)
    cache.refresh([entry])
    got = cache.entries[entry]
    assert got.empty_since is None and [str(net) for net, _ in got.held] == [f"{SECOND_IP}/32"]
    assert any(f"DNS entry {entry} has addresses again (some still held)" in r.getMessage() for r in caplog.records)


def test_a_name_that_never_had_addresses_holds_up_no_one(server: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    cache = DnsCache(settings(server))
    ghost = InboundConnector("ghost", dns_entries=("a:ghost.partner.test",))
    assert cache.refresh(["a:ghost.partner.test"]) is True
    assert any(r.levelname == "ERROR" and "a:ghost.partner.test: no addresses" in r.getMessage() for r in caplog.records)
    d = decide_with((ghost,), cache, plaintext("203.0.113.9", "a@else.test"))
    assert d.connector is None and d.action is None, d


A = "a:onprem.partner.test"
B = "a:other.partner.test"
SHAPES = {
    # ranges alone select the partner's sessions
    "by address": InboundConnector("c", dns_entries=(A, B)),
    "by address, with a literal range too": InboundConnector(
        "c", client_ranges=(ipaddress.ip_network("192.0.2.0/24"),), dns_entries=(A, B)),
    # ranges narrow a domain scope
    "by domain and address": InboundConnector("c", sender_domains=PARTNER, dns_entries=(A, B)),
    # ranges restrict a domain scope: outside them, the connector's failure action
    "restricted to addresses": InboundConnector("c", sender_domains=PARTNER, dns_entries=(A, B),
                                                restrict_to_ranges=True, require_tls=False,
                                                on_failure=FailAction.REJECT),
}
ADDRS: tuple[Network, ...] = (ipaddress.ip_network(f"{SERVER_IP}/32"),)
STATES: dict[str, dict[str, tuple[Network, ...]]] = {
    "nothing resolved yet": {},
    "one entry resolved, one not yet": {B: (ipaddress.ip_network("198.51.100.8/32"),)},
}
EMPTY: dict[str, tuple[Network, ...]] = {A: (), B: ()}


def cache_in(state: dict[str, tuple[Network, ...]]) -> DnsCache:
    cache = DnsCache(ResolverSettings())
    for entry, nets in state.items():
        cache.entries[entry] = Resolution(entry, nets, 60, time.time())
    return cache


@pytest.mark.parametrize(("shape", "state"), [(sh, st) for sh in SHAPES for st in STATES])
def test_an_unknown_dns_scope_never_lets_the_partner_fall_outside(shape: str, state: str) -> None:
    """Whatever the connector's shape, while its DNS ranges are unknown the partner's
    plaintext session from its server (whose address DNS has not told) still meets the
    connector and gets a temporary failure: neither a pass nor a permanent refusal."""
    cache = cache_in(STATES[state])
    connector = SHAPES[shape]
    d = decide_with((connector,), cache, plaintext())
    assert d.connector is not None and d.connector.name == "c", "the partner's session matched no connector"
    assert d.action is FailAction.DEFER and d.status is not None and d.status.startswith("4.3")
    (c,) = apply_dns((connector,), cache)
    if not (connector.restrict_to_ranges and connector.has_domain_scope):
        assert c.client_ranges == ALL_ADDRESSES  # never narrower than with the ranges known


# When every entry resolved to nothing: the connector as its scope then reads, for the
# partner's plaintext session ("pass" when it matches nothing).
EMPTY_VERDICTS = {
    "by address": (None, None),  # no servers: covers no one, holds up no one
    "by address, with a literal range too": (None, None),  # its literal range alone stands
    "by domain and address": ("c", "4.7.10"),  # its domains, from any client
    "restricted to addresses": ("c", "4.3.5"),  # deferred, never refused for good
}


@pytest.mark.parametrize("shape", SHAPES)
def test_entries_that_resolve_to_nothing_leave_the_scope_the_connector_then_has(shape: str) -> None:
    cache = cache_in(EMPTY)
    d = decide_with((SHAPES[shape],), cache, plaintext())
    assert (d.connector and d.connector.name, d.status) == EMPTY_VERDICTS[shape], d
    if d.connector is not None:
        assert d.action is FailAction.DEFER
    other = decide_with((SHAPES[shape],), cache, plaintext("203.0.113.9", "a@else.test"))
    assert other.connector is None, "mail of nobody in the connector's scope was held up"


def test_ranges_known_are_applied_as_they_are() -> None:
    cache = DnsCache(ResolverSettings())
    cache.entries[A] = Resolution(A, ADDRS, 60, time.time())
    cache.entries[B] = Resolution(B, (), 60, time.time())
    for connector in SHAPES.values():
        (c,) = apply_dns((connector,), cache)
        assert set(c.client_ranges) == {*connector.client_ranges, *ADDRS} and not c.misconfigured


def test_a_lookup_past_the_round_deadline_asks_nothing(server: DnsServer) -> None:
    s = settings(server)
    with pytest.raises(DnsFailure, match="ran out of time"):
        resolve_entry("spf:partner.test", make_resolver(s), s, deadline=time.monotonic())
    assert server.queries == []


def test_a_dead_server_costs_one_timeout_for_all_entries(server: DnsServer) -> None:
    dead = [f"dead{i}.partner.test" for i in range(8)]
    server.silent.update(dead)
    cache = DnsCache(settings(server))
    changed = cache.refresh([*(f"a:{name}" for name in dead), "a:onprem.partner.test"])
    # One after another, the round's deadline (three timeouts) would have come after about
    # three of them, and the rest never been asked.
    assert {name for name, _ in server.queries} >= set(dead)
    assert changed and cache.failures == 8 and list(cache.entries) == ["a:onprem.partner.test"]


RULES = """
INSERT INTO outbound_connector (name, enabled, tls_level) VALUES ('partner-out', 1, 'secure');
INSERT INTO outbound_domain (connector, pattern) VALUES ('partner-out', 'partner.test');
INSERT INTO inbound_connector (name) VALUES ('onprem');
"""


class Swaps:
    """Every snapshot a rule holder swapped in, with how many queries DNS had seen by then."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.index = IndexHolder()
        self.seen: list[tuple[Snapshot, int]] = []
        self.first = threading.Event()

    def __call__(self, snap: Snapshot) -> None:
        self.index.swap(snap)
        self.seen.append((snap, len(self.server.queries)))
        self.first.set()


def rule_holder(tmp_path: Path, server: DnsServer, entries: list[str], timeout: float) -> tuple[RuleHolder, Swaps]:
    """A holder of rules with an outbound connector and the inbound ``onprem`` scoped by ``entries``."""
    sql = RULES + "".join(f"INSERT INTO inbound_address VALUES ('onprem', '{e}');\n" for e in entries)
    swaps = Swaps(server)
    holder = RuleHolder(DatabaseConfig(url=make_rules_db(tmp_path / "r.sqlite", sql), poll_interval=3600),
                        on_swap=swaps,
                        dns=DnsConfig(nameservers=("127.0.0.1",), port=server.port, timeout=timeout))
    return holder, swaps


def test_rules_are_in_force_before_dns_answers(server: DnsServer, tmp_path: Path) -> None:
    entries = [f"a:host{i}.dead.test" for i in range(5)]
    server.silent.update(e[2:] for e in entries)
    holder, swaps = rule_holder(tmp_path, server, entries, timeout=2.0)
    holder.start()
    try:
        assert swaps.first.wait(9), "no rules in force while DNS is asked, one entry after another"
        snap, queries = swaps.seen[0]
        assert queries == 0  # in force before DNS was asked at all
        assert lookup(swaps.index.index, "tls_policy", "partner.test").reply.status is Status.OK
        onprem = snap.by_name["onprem"]
        assert onprem.client_ranges == ALL_ADDRESSES and "has not been resolved yet" in onprem.problems[0]
        assert decide(snap, plaintext("203.0.113.9"), NOW).action is FailAction.DEFER
        assert holder.first_attempt.wait(10)
        assert {name for name, _ in server.queries} == {e[2:] for e in entries}  # all asked in one round
        assert len(swaps.seen) == 1 and holder.dns.failures == 5  # the failures changed no range
    finally:
        holder.stop()


def test_a_forced_reload_swaps_the_rules_first_and_asks_dns_at_once(server: DnsServer, tmp_path: Path) -> None:
    entries = [f"a:host{i}.partner.test" for i in range(6)]
    for i, entry in enumerate(entries):
        server.records[(entry[2:], "A")] = [f"198.51.100.{10 + i}"]
    holder, swaps = rule_holder(tmp_path, server, entries, timeout=1.0)
    try:
        assert holder.refresh() is True
        assert holder.snapshot is not None
        good = holder.snapshot.by_name["onprem"].client_ranges
        assert len(good) == 6
        server.silent.update(e[2:] for e in entries)
        swaps.seen.clear()
        asked = len(server.queries)
        assert holder.refresh(force=True) is True
        # all asked again in one round: one after another, the deadline would have cut it short
        assert {name for name, _ in server.queries[asked:]} == {e[2:] for e in entries}
        ((snap, queries),) = swaps.seen
        assert queries == asked  # the reloaded rules decided before DNS was asked again
        assert snap.by_name["onprem"].client_ranges == good  # kept while DNS fails
        assert len(server.queries) > asked and holder.dns.failures == 6
    finally:
        holder.stop()


def test_a_holder_without_dns_never_asks(server: DnsServer, tmp_path: Path) -> None:
    url = make_rules_db(tmp_path / "r.sqlite",
                        RULES + "INSERT INTO inbound_address VALUES ('onprem', 'a:onprem.partner.test');")
    holder = RuleHolder(DatabaseConfig(url=url), resolve_dns=False,
                        dns=DnsConfig(nameservers=("127.0.0.1",), port=server.port, timeout=1.0))
    try:
        assert holder.refresh() is True and holder.refresh(force=True) is True
        assert server.queries == []
        snap = holder.snapshot
        assert snap is not None and snap.by_name["onprem"].client_ranges == ALL_ADDRESSES
    finally:
        holder.stop()


def test_a_resolv_conf_without_nameservers_is_a_dns_outage_not_a_crash(
        monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    # dnspython refuses a resolv.conf that names no nameserver; the daemons, the socketmap one
    # included, which never looks anything up, stopped at their start with a traceback.
    import dns.resolver

    def no_nameservers(self: dns.resolver.Resolver, f: object) -> None:
        raise dns.resolver.NoResolverConfiguration("no nameservers")

    monkeypatch.setattr(dns.resolver.Resolver, "read_resolv_conf", no_nameservers)
    holder = RuleHolder(DatabaseConfig(url=sqlite_url), resolve_dns=False)
    holder.stop()
    cache = DnsCache(ResolverSettings(timeout=1.0))
    assert cache.refresh(["a:partner.test"]) is False
    assert cache.failures == 1 and "partner.test" not in str(cache.entries)


def test_a_connector_whose_entries_have_not_resolved_loses_to_no_narrower_range() -> None:
    # Until its entries resolve a connector covers every client (0.0.0.0/0): ranked by that,
    # a connector for a narrower range won, and its weaker requirements let mail pass that the
    # first one, resolved, refuses.
    from tlsgate.patterns import parse_network
    from tlsgate.snapshot import Snapshot

    onprem = InboundConnector("onprem", dns_entries=("a:onprem.partner.test",), require_tls=True)
    dmz = InboundConnector("dmz-relays", client_ranges=(parse_network("198.51.100.0/24"),), require_tls=False)
    session = plaintext("198.51.100.7", "a@x.test")
    unresolved = Snapshot(inbound=apply_dns((onprem, dmz), DnsCache(ResolverSettings(nameservers=("127.0.0.1",)))))
    d = decide(unresolved, session, datetime.now(UTC))
    assert (d.action, d.status, d.connector and d.connector.name) == (FailAction.DEFER, "4.3.5", "onprem")
    # Once resolved, it has its own range, and the narrower one wins where it is narrower.
    known = DnsCache(ResolverSettings(nameservers=("127.0.0.1",)))
    known.entries["a:onprem.partner.test"] = Resolution("a:onprem.partner.test", (parse_network("198.51.100.0/25"),),
                                                         300, time.time())
    d = decide(Snapshot(inbound=apply_dns((onprem, dmz), known)), session, datetime.now(UTC))
    assert (d.outcome.value, d.connector and d.connector.name) == ("fail", "onprem")
