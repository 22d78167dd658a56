"""Address entries that name DNS, against a DNS server the tests run on loopback."""

from __future__ import annotations

import ipaddress
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.dns.dnsserver import DnsServer, running
from tlsgate.config import DatabaseConfig, DnsConfig
from tlsgate.dnsranges import (
    DnsCache,
    DnsFailure,
    ResolverSettings,
    apply_dns,
    make_resolver,
    parse_entry,
    resolve_entry,
)
from tlsgate.engine import decide
from tlsgate.model import FailAction, InboundConnector, SessionFacts
from tlsgate.patterns import DomainPattern, PatternError, parse_address
from tlsgate.rules import RuleHolder
from tlsgate.store import init_schema, load, open_engine

ZONE = {
    ("mail.partner.test", "A"): ["127.0.0.2"],
    ("mail.partner.test", "AAAA"): ["2001:db8::25"],
    ("alias.partner.test", "CNAME"): ["mail.partner.test"],
    ("alias2.partner.test", "CNAME"): ["alias.partner.test"],
    ("partner.test", "MX"): ["10 mx1.partner.test.", "20 mx2.partner.test."],
    ("mx1.partner.test", "A"): ["198.51.100.1"],
    ("mx2.partner.test", "A"): ["198.51.100.2"],
    ("partner.test", "TXT"): ['"v=spf1 ip4:192.0.2.0/24 ip6:2001:db8:1::/48 include:_spf.partner.test a:mail.partner.test mx -all"'],
    ("_spf.partner.test", "TXT"): ['"v=spf1 ip4:203.0.113.0/25 ~ip4:10.9.9.9 ptr -all"'],
    ("redir.test", "TXT"): ['"v=spf1 redirect=partner.test"'],
    ("loop.test", "TXT"): ['"v=spf1 include:loop2.test -all"'],
    ("loop2.test", "TXT"): ['"v=spf1 include:loop.test -all"'],
    ("nospf.test", "TXT"): ['"hello"'],
    ("twospf.test", "TXT"): ['"v=spf1 -all"', '"v=spf1 ip4:1.2.3.4 -all"'],
    ("diamond.test", "TXT"): ['"v=spf1 include:left.test include:right.test -all"'],
    ("left.test", "TXT"): ['"v=spf1 include:shared.test -all"'],
    ("right.test", "TXT"): ['"v=spf1 include:shared.test ip4:192.0.2.88 -all"'],
    ("shared.test", "TXT"): ['"v=spf1 ip4:192.0.2.77 -all"'],
    ("wide.test", "TXT"): ['"v=spf1 ip4:0.0.0.0/1 ip4:128.0.0.0/1 ip6:2000::/3 ip4:40.92.0.0/15 a:wide.test/0 -all"'],
    ("wide.test", "A"): ["192.0.2.1"],
}
for i in range(12):
    ZONE[(f"chain{i}.test", "TXT")] = [f'"v=spf1 ip4:10.0.{i}.0/24 include:chain{i + 1}.test -all"']


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with running(ZONE, ttl=120) as s:
        yield s


def settings(server: DnsServer, **kw: object) -> ResolverSettings:
    base: dict[str, object] = dict(nameservers=("127.0.0.1",), port=server.port, timeout=1.0, min_ttl=60,
                                   max_ttl=3600)
    base.update(kw)
    return ResolverSettings(**base)  # type: ignore[arg-type]


def resolve(server: DnsServer, entry: str, **kw: object) -> tuple[set[str], tuple[str, ...], int]:
    s = settings(server, **kw)
    r = resolve_entry(entry, make_resolver(s), s)
    return {str(n) for n in r.networks}, r.problems, r.ttl


def test_parse_entry() -> None:
    assert parse_entry("a:Mail.Partner.Test.") == "a:mail.partner.test"
    assert parse_entry("MX:partner.test") == "mx:partner.test"
    assert parse_entry("192.0.2.0/24") is None
    assert parse_entry("2001:db8::/32") is None
    assert parse_entry("a:b::/32") is None and parse_entry("a::1") is None  # IPv6, not DNS
    with pytest.raises(PatternError):
        parse_entry("spf:bad name.test")
    with pytest.raises(PatternError):
        parse_entry("spf:_spf\n.example.com")
    assert parse_entry("spf:_spf.Example.com") == "spf:_spf.example.com"
    with pytest.raises(PatternError, match="is an address, not a name"):
        parse_entry("a:192.0.2.1")


def test_a_entry_with_aaaa_and_cname_chain(server: DnsServer) -> None:
    nets, problems, _ = resolve(server, "a:mail.partner.test")
    assert nets == {"127.0.0.2/32", "2001:db8::25/128"} and problems == ()
    nets, _, _ = resolve(server, "a:alias2.partner.test")
    assert nets == {"127.0.0.2/32", "2001:db8::25/128"}


def test_mx_entry(server: DnsServer) -> None:
    nets, _, _ = resolve(server, "mx:partner.test")
    assert nets == {"198.51.100.1/32", "198.51.100.2/32"}


def test_spf_follows_include_a_and_mx(server: DnsServer) -> None:
    nets, problems, _ = resolve(server, "spf:partner.test")
    assert nets == {"192.0.2.0/24", "2001:db8:1::/48", "203.0.113.0/25", "127.0.0.2/32", "2001:db8::25/128",
                    "198.51.100.1/32", "198.51.100.2/32"}
    assert "10.9.9.9/32" not in nets  # ~ (softfail) authorizes nothing
    assert any("ptr" in p and "cannot be turned into address ranges" in p for p in problems)


def test_spf_redirect(server: DnsServer) -> None:
    nets, _, _ = resolve(server, "spf:redir.test")
    assert "192.0.2.0/24" in nets


def test_spf_loop_and_limit_and_bad_records(server: DnsServer) -> None:
    _, problems, _ = resolve(server, "spf:loop.test")
    assert any("loop" in p for p in problems)
    nets, problems, _ = resolve(server, "spf:chain0.test")
    assert "10.0.0.0/24" in nets and "10.0.10.0/24" in nets and "10.0.11.0/24" not in nets
    assert any("SPF lookup limit of 10 reached" in p for p in problems)
    nets, problems, _ = resolve(server, "spf:nospf.test")
    assert nets == set() and any("no SPF record" in p for p in problems)
    nets, problems, _ = resolve(server, "spf:twospf.test")
    assert nets == set() and any("2 SPF records" in p for p in problems)


def test_spf_include_of_one_domain_twice_is_no_loop(server: DnsServer) -> None:
    nets, problems, _ = resolve(server, "spf:diamond.test")
    assert nets == {"192.0.2.77/32", "192.0.2.88/32"}
    assert problems == ()


def test_spf_ranges_wider_than_any_mail_provider_uses_are_reported(server: DnsServer) -> None:
    # Used, since dropping them could refuse the partner's own servers, but named: half the
    # Internet twice over is +all in disguise.
    nets, problems, _ = resolve(server, "spf:wide.test")
    assert nets == {"0.0.0.0/1", "128.0.0.0/1", "2000::/3", "40.92.0.0/15", "0.0.0.0/0"}
    assert problems == tuple(
        f"the SPF of wide.test authorises {net}, wider than a /{wide}: every client in it counts as the partner's server"
        for net, wide in (("0.0.0.0/1", 8), ("128.0.0.0/1", 8), ("2000::/3", 16), ("0.0.0.0/0", 8)))


def test_nxdomain_is_an_answer_servfail_and_timeout_are_failures(server: DnsServer) -> None:
    nets, problems, _ = resolve(server, "a:gone.partner.test")
    assert nets == set() and problems == ("gone.partner.test has no A or AAAA records",)
    server.servfail.add("broken.test")
    with pytest.raises(DnsFailure, match=r"broken\.test"):
        resolve(server, "a:broken.test")
    server.silent.add("slow.test")
    with pytest.raises(DnsFailure, match="timed out"):
        resolve(server, "a:slow.test", timeout=0.3)


def test_ttl_is_clamped(server: DnsServer) -> None:
    assert resolve(server, "a:mail.partner.test", min_ttl=600)[2] == 600
    assert resolve(server, "a:mail.partner.test", min_ttl=1, max_ttl=30)[2] == 30
    assert resolve(server, "a:mail.partner.test", min_ttl=1)[2] == 120


def test_cache_keeps_the_last_good_answer_and_logs_once(server: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    cache = DnsCache(settings(server, min_ttl=1, max_ttl=1))
    assert cache.refresh(["a:mail.partner.test"]) is True
    assert cache.refresh(["a:mail.partner.test"]) is False  # same answer: nothing changed
    server.servfail.add("mail.partner.test")
    for _ in range(3):
        cache._retry_at.clear()  # retry at once instead of after min_ttl
        cache.refresh(["a:mail.partner.test"])
    assert {str(n) for n in cache.entries["a:mail.partner.test"].networks} == {"127.0.0.2/32", "2001:db8::25/128"}
    assert sum("keeping the ranges" in r.getMessage() for r in caplog.records) == 1
    assert cache.failures == 3
    server.servfail.clear()
    server.records[("mail.partner.test", "A")] = ["127.0.0.9"]
    assert cache.refresh(["a:mail.partner.test"]) is True
    assert "127.0.0.9/32" in {str(n) for n in cache.entries["a:mail.partner.test"].networks}
    assert any("resolves again" in r.getMessage() for r in caplog.records)


def test_due_follows_the_ttl(server: DnsServer) -> None:
    cache = DnsCache(settings(server, min_ttl=60))
    assert cache.due(["a:mail.partner.test"]) == ["a:mail.partner.test"]
    cache.refresh(["a:mail.partner.test"])
    assert cache.due(["a:mail.partner.test"]) == []
    assert cache.due(["a:mail.partner.test"], now=time.time() + 121) == ["a:mail.partner.test"]


def test_an_entry_that_never_resolved_is_retried_sooner(server: DnsServer) -> None:
    cache = DnsCache(settings(server, min_ttl=60))
    cache.refresh(["a:mail.partner.test"])
    server.servfail.update({"mail.partner.test", "new.partner.test"})
    now = time.time()
    assert cache.due(["a:mail.partner.test"], now=now + 121) == ["a:mail.partner.test"]  # TTL ran out
    cache.refresh(["a:mail.partner.test", "a:new.partner.test"])
    # The one with a last good answer waits min_ttl; the one whose connector defers does not.
    assert cache.due(["a:mail.partner.test", "a:new.partner.test"], now=now + 30) == ["a:new.partner.test"]
    assert cache.due(["a:new.partner.test"], now=now + 5) == []
    cache.forget(["a:new.partner.test"])
    assert list(cache.entries) == []


NOW = datetime.now(UTC)
TLS: dict[str, Any] = dict(tls_protocol="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384", tls_cipher_bits=256)


def test_never_resolved_fails_closed(server: DnsServer) -> None:
    restrict = InboundConnector("p", sender_domains=(DomainPattern.parse("partner.test"),),
                                dns_entries=("a:mail.partner.test",), restrict_to_ranges=True, require_tls=False,
                                on_failure=FailAction.REJECT)
    by_address = InboundConnector("onprem", dns_entries=("a:onprem.test",))
    cache = DnsCache(settings(server))
    from tlsgate.snapshot import Snapshot

    snap = Snapshot(inbound=apply_dns((restrict, by_address), cache))
    d = decide(snap, SessionFacts(parse_address("127.0.0.2"), "a@partner.test", "b@x.test"), NOW)
    assert d.action is FailAction.DEFER and "has not been resolved yet" in (d.reason or "")
    # A connector scoped only by a DNS entry covers every client until it resolves.
    d = decide(snap, SessionFacts(parse_address("203.0.113.1"), "a@else.test", "b@x.test", **TLS), NOW)
    assert d.action is FailAction.DEFER and d.connector is not None and d.connector.name == "onprem"
    cache.refresh(["a:mail.partner.test"])
    server.records[("onprem.test", "A")] = ["198.51.100.7"]
    cache.refresh(["a:onprem.test"])
    snap = Snapshot(inbound=apply_dns((restrict, by_address), cache))
    assert decide(snap, SessionFacts(parse_address("127.0.0.2"), "a@partner.test", "b@x.test"), NOW).action is None
    d = decide(snap, SessionFacts(parse_address("127.0.0.3"), "a@partner.test", "b@x.test"), NOW)
    assert d.action is FailAction.REJECT and "outside the ranges" in (d.reason or "")
    assert decide(snap, SessionFacts(parse_address("203.0.113.1"), "a@else.test", "b@x.test"), NOW).connector is None


def _db(path: Path) -> str:
    url = f"sqlite:///{path}"
    engine = open_engine(url)
    init_schema(engine)
    engine.dispose()
    con = sqlite3.connect(path)
    con.executescript(
        "INSERT INTO inbound_connector (name, require_tls, restrict_to_addresses, on_failure) VALUES ('p', 0, 1, 'reject');"
        "INSERT INTO inbound_domain VALUES ('p', 'sender', 'partner.test');"
        "INSERT INTO inbound_address VALUES ('p', 'a:Mail.Partner.Test');"
        "INSERT INTO inbound_address VALUES ('p', '192.0.2.0/24');"
        "INSERT INTO inbound_connector (name) VALUES ('bad');"
        "INSERT INTO inbound_domain VALUES ('bad', 'sender', 'bad.test');"
        "INSERT INTO inbound_address VALUES ('bad', 'mx:bad name');")
    con.commit()
    con.close()
    return url


def test_store_reads_entries_and_names_bad_ones(tmp_path: Path) -> None:
    engine = open_engine(_db(tmp_path / "r.sqlite"))
    result = load(engine)
    engine.dispose()
    p = result.snapshot.by_name["p"]
    assert p.dns_entries == ("a:mail.partner.test",)
    assert [str(n) for n in p.client_ranges] == ["192.0.2.0/24"]
    assert any("inbound_address ('bad', 'mx:bad name') column address" in str(e) for e in result.errors)


def test_rule_holder_follows_dns_changes_without_a_database_reload(server: DnsServer, tmp_path: Path) -> None:
    holder = RuleHolder(DatabaseConfig(url=_db(tmp_path / "r.sqlite")),
                        dns=DnsConfig(nameservers=("127.0.0.1",), port=server.port, timeout=1.0, min_ttl=1))
    assert holder.refresh() is True
    snap = holder.snapshot
    assert snap is not None
    assert ipaddress.ip_network("127.0.0.2/32") in snap.by_name["p"].client_ranges
    server.records[("mail.partner.test", "A")] = ["127.0.0.5"]
    assert holder.refresh() is False  # not due yet: the TTL has not run out
    for entry in list(holder.dns.entries):
        holder.dns.entries[entry] = holder.dns.entries[entry].__class__(
            entry, holder.dns.entries[entry].networks, 0, 0.0, ())  # expire it
    loads = holder.loads
    assert holder.refresh() is True
    assert holder.loads == loads  # the database was not read again
    snap = holder.snapshot
    assert snap is not None
    ranges = {str(n) for n in snap.by_name["p"].client_ranges}
    assert "127.0.0.5/32" in ranges and "127.0.0.2/32" not in ranges and "192.0.2.0/24" in ranges
    holder.stop()


def test_forced_reload_resolves_every_entry_and_forgets_deleted_ones(server: DnsServer, tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    holder = RuleHolder(DatabaseConfig(url=_db(path)),
                        dns=DnsConfig(nameservers=("127.0.0.1",), port=server.port, timeout=1.0))
    assert holder.refresh() is True
    server.records[("mail.partner.test", "A")] = ["127.0.0.6"]
    assert holder.refresh() is False  # the TTL has not run out
    before = holder.snapshot
    assert holder.refresh(force=True) is True  # SIGHUP: every entry asked again, TTL or not
    snap = holder.snapshot
    assert snap is not None and before is not None
    assert snap.domains is not before.domains  # everything built afresh, indexes included
    assert {str(n) for n in snap.by_name["p"].client_ranges} >= {"127.0.0.6/32", "192.0.2.0/24"}
    con = sqlite3.connect(path)
    con.execute("DELETE FROM inbound_address WHERE address LIKE 'a:%'")
    con.commit()
    con.close()
    assert holder.refresh() is True
    assert holder.dns.entries == {}
    snap = holder.snapshot
    assert snap is not None and [str(n) for n in snap.by_name["p"].client_ranges] == ["192.0.2.0/24"]
    holder.stop()


def test_lint_dns_names_what_could_not_be_followed(server: DnsServer, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tlsgate.cli import main

    url = _db(tmp_path / "r.sqlite")
    con = sqlite3.connect(tmp_path / "r.sqlite")
    con.executescript("DELETE FROM inbound_address WHERE connector = 'bad';"
                      "DELETE FROM inbound_domain WHERE connector = 'bad';"
                      "DELETE FROM inbound_connector WHERE name = 'bad';"
                      "INSERT INTO inbound_address VALUES ('p', 'spf:partner.test');"
                      "INSERT INTO inbound_address VALUES ('p', 'spf:nospf.test');")
    con.commit()
    con.close()
    conf = tmp_path / "tlsgate.conf"
    conf.write_text(f"[database]\nurl = {url}\n[dns]\nnameservers = 127.0.0.1\nport = {server.port}\ntimeout = 1\n")
    assert main(["-c", str(conf), "lint", "--dns", "--strict"]) == 1
    out = capsys.readouterr().out.splitlines()
    row = "warning: inbound_address ('p', 'spf:{}') column address: "
    assert row.format("nospf.test") + "resolves to no addresses (nospf.test has no SPF record)" in out
    assert any(line.startswith(row.format("partner.test") + "resolves to 7 ranges, but SPF mechanism ptr")
               for line in out), out
    assert not any("a:mail.partner.test" in line for line in out)
    assert out[-1].endswith("0 errors, 2 warnings"), out
