"""The outbound index as a table: socketmap keys Postfix sends and the answers they get."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.pki import Pki
from tlsgate.certs import pin_from_pem
from tlsgate.model import InboundConnector, OutboundConnector, SmartHost, TlsLevel
from tlsgate.outbound import NOT_FOUND, Answer, OutboundIndex, lookup
from tlsgate.patterns import DomainPattern
from tlsgate.snapshot import Snapshot
from tlsgate.socketmap import Reply, Status


def conn(name: str, *domains: str, **kw: object) -> OutboundConnector:
    return OutboundConnector(name=name, recipient_domains=tuple(DomainPattern.parse(d) for d in domains), **kw)  # type: ignore[arg-type]


CONNECTORS = (
    conn("contoso", "contoso.com", match_names=("mail.contoso.com",), min_tls_version="TLSv1.2"),
    conn("contoso-subs", "*.contoso.com", match_names=("*.contoso.com", "contoso.com")),
    conn("deep", "*.eu.contoso.com", tls_level=TlsLevel.VERIFY),
    conn("fabrikam", "fabrikam.com", tls_level=TlsLevel.ENCRYPT,
         smart_hosts=(SmartHost("relay.fabrikam.com", 25), SmartHost("backup.fabrikam.com", 2525))),
    conn("mxhop", "mx.example", tls_level=TlsLevel.DANE,
         smart_hosts=(SmartHost("hub.mx.example", 25, mx_lookup=True), SmartHost("alt.mx.example", 587, mx_lookup=True))),
    conn("danger", "dane.example", tls_level=TlsLevel.DANE_ONLY, min_tls_version="TLSv1.3"),
    conn("off", "disabled.example", enabled=False),
    conn("broken", "broken.example", problems=("outbound_domain: bad pattern",)),
    conn("pinless", "pinless.example", tls_level=TlsLevel.FINGERPRINT),
)

POLICY = [
    ("contoso.com", Status.OK, "secure match=mail.contoso.com protocols=>=TLSv1.2", "contoso"),
    ("CONTOSO.COM.", Status.OK, "secure match=mail.contoso.com protocols=>=TLSv1.2", "contoso"),
    # A subdomain is answered at once, and Postfix's ".parent" retries get the same answer.
    ("a.contoso.com", Status.OK, "secure match=.contoso.com:contoso.com", "contoso-subs"),
    (".contoso.com", Status.OK, "secure match=.contoso.com:contoso.com", "contoso-subs"),
    ("x.eu.contoso.com", Status.OK, "verify", "deep"),
    (".eu.contoso.com", Status.OK, "verify", "deep"),
    ("eu.contoso.com", Status.OK, "secure match=.contoso.com:contoso.com", "contoso-subs"),
    (".com", Status.NOTFOUND, "", None),
    ("fabrikam.com", Status.OK, "encrypt", "fabrikam"),
    ("[relay.fabrikam.com]:25", Status.OK, "encrypt", "fabrikam"),
    ("[relay.fabrikam.com]", Status.OK, "encrypt", "fabrikam"),
    ("[Relay.Fabrikam.com]:25", Status.OK, "encrypt", "fabrikam"),
    ("[backup.fabrikam.com]:2525", Status.OK, "encrypt", "fabrikam"),
    ("[backup.fabrikam.com]", Status.NOTFOUND, "", None),
    ("backup.fabrikam.com:2525", Status.NOTFOUND, "", None),
    ("hub.mx.example", Status.OK, "dane", "mxhop"),
    ("alt.mx.example:587", Status.OK, "dane", "mxhop"),
    ("[hub.mx.example]", Status.NOTFOUND, "", None),
    ("dane.example", Status.OK, "dane-only protocols=>=TLSv1.3", "danger"),
    ("disabled.example", Status.NOTFOUND, "", None),
    ("broken.example", Status.TEMP, "outbound connector broken is misconfigured: outbound_domain: bad pattern", "broken"),
    ("pinless.example", Status.TEMP, None, "pinless"),
    ("nowhere.example", Status.NOTFOUND, "", None),
    ("[192.0.2.1]", Status.NOTFOUND, "", None),
    ("[ipv6:2001:db8::1]:25", Status.NOTFOUND, "", None),
    ("not a domain", Status.NOTFOUND, "", None),
]


@pytest.fixture(scope="module")
def index() -> OutboundIndex:
    return OutboundIndex(Snapshot(inbound=(), outbound=CONNECTORS, generation=7))


@pytest.mark.parametrize(("key", "status", "data", "connector"), POLICY)
def test_tls_policy_keys(index: OutboundIndex, key: str, status: Status, data: str | None, connector: str | None) -> None:
    answer = lookup(index, "tls_policy", key)
    assert answer.reply.status is status
    if data is not None:
        assert answer.reply.data == data
    assert answer.connector == connector


TRANSPORT = [
    ("user@fabrikam.com", Status.OK, "smtp:[relay.fabrikam.com]:25, [backup.fabrikam.com]:2525"),
    ("user+ext@FABRIKAM.com", Status.OK, "smtp:[relay.fabrikam.com]:25, [backup.fabrikam.com]:2525"),
    ("fabrikam.com", Status.OK, "smtp:[relay.fabrikam.com]:25, [backup.fabrikam.com]:2525"),
    ("user@mx.example", Status.OK, "smtp:hub.mx.example, alt.mx.example:587"),
    # No smart host: the recipient domain's MX hosts, pinned so that relayhost cannot take it.
    ("user@contoso.com", Status.OK, "smtp:"),
    ("user@a.contoso.com", Status.OK, "smtp:"),
    ("user@broken.example", Status.TEMP, "outbound connector broken is misconfigured: outbound_domain: bad pattern"),
    ("user@nowhere.example", Status.NOTFOUND, ""),
    ("user@disabled.example", Status.NOTFOUND, ""),
    ("*", Status.NOTFOUND, ""),
    ("user@[192.0.2.1]", Status.NOTFOUND, ""),
]


@pytest.mark.parametrize(("key", "status", "data"), TRANSPORT)
def test_transport_keys(index: OutboundIndex, key: str, status: Status, data: str) -> None:
    assert lookup(index, "transport", key).reply == Reply(status, data)


def test_no_snapshot_is_a_temporary_failure() -> None:
    for name in ("tls_policy", "transport"):
        assert lookup(None, name, "contoso.com").reply.status is Status.TEMP


def test_unknown_map_is_a_permanent_error(index: OutboundIndex) -> None:
    assert lookup(index, "tlspolicy", "contoso.com").reply.status is Status.PERM
    assert lookup(None, "tlspolicy", "contoso.com").reply.status is Status.PERM


def test_any_domain_connector_covers_everything_less_specific() -> None:
    index = OutboundIndex(Snapshot(inbound=(), outbound=(conn("all", "*", tls_level=TlsLevel.ENCRYPT), conn("one", "one.example"))))
    assert index.tls_policy("one.example").connector == "one"
    assert index.tls_policy("two.example").connector == "all"
    assert index.tls_policy(".example").connector == "all"


def test_equal_patterns_go_to_the_first_connector_by_name() -> None:
    index = OutboundIndex(Snapshot(inbound=(), outbound=(conn("b", "same.example"), conn("a", "same.example", tls_level=TlsLevel.VERIFY))))
    assert index.tls_policy("same.example").reply.data == "verify"


def test_fingerprint_level_pins_the_partner_certificates(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pin = pin_from_pem(pki.partner.cert_path.read_bytes())
    inbound = InboundConnector(name="partner", sender_domains=(DomainPattern.parse("partner.test"),), pins=(pin,))
    outbound = conn("partner", "partner.test", tls_level=TlsLevel.FINGERPRINT, min_tls_version="TLSv1.2")
    index = OutboundIndex(Snapshot(inbound=(inbound,), outbound=(outbound,)))
    reply = index.tls_policy("partner.test").reply
    assert reply.status is Status.OK
    assert reply.data == (
        f"fingerprint match={pki.partner.pubkey_fingerprint}|{pki.partner.fingerprint} protocols=>=TLSv1.2"
    )


def test_fingerprint_level_without_registered_certificate_is_misconfigured() -> None:
    index = OutboundIndex(Snapshot(inbound=(), outbound=CONNECTORS))
    reply = index.tls_policy("pinless.example").reply
    assert reply.status is Status.TEMP
    assert "no certificate is registered" in reply.data


RELAYHOST_KEYS = ("[localhost]:46015", "[relay.isp.example]", "relay.isp.example:587", "[192.0.2.1]:25")


def test_connector_without_smart_hosts_pins_the_route_to_the_recipient_domain() -> None:
    # With relayhost set, a NOTFOUND here would send the mail to the relay, whose TLS policy key
    # ([relay]:port) no connector covers: the mail would leave without TLS.
    index = OutboundIndex(Snapshot(inbound=(), outbound=(conn("partner", "partner.test", "*.partner.test"),)))
    for rcpt in ("a@partner.test", "MAILER-DAEMON@Partner.Test", "b@eu.partner.test"):
        assert index.transport(rcpt) == Answer(Reply(Status.OK, "smtp:"), "partner")
    # ... and the policy key Postfix then sends is the domain itself.
    assert index.tls_policy("partner.test").reply == Reply(Status.OK, "secure")
    for key in RELAYHOST_KEYS:
        assert index.tls_policy(key) == NOT_FOUND


def test_any_domain_connector_never_routes() -> None:
    # Postfix asks transport_maps for local and virtual domains too: "*" must leave them alone.
    gateway = conn("all", "*", tls_level=TlsLevel.ENCRYPT, smart_hosts=(SmartHost("gw.example", 25),))
    plain = conn("all", "*", tls_level=TlsLevel.VERIFY)
    for anyone in (gateway, plain):
        index = OutboundIndex(Snapshot(inbound=(), outbound=(anyone, conn("one", "one.example"))))
        for rcpt in ("root@localhost", "alice@our-own.example", "MAILER-DAEMON@mx.our-own.example", "x@two.example"):
            assert index.transport(rcpt) == NOT_FOUND, rcpt
        assert index.transport("x@one.example").reply == Reply(Status.OK, "smtp:")
        assert index.tls_policy("two.example").connector == "all"
    # Its smart host still gets its policy when main.cf's relayhost points there.
    index = OutboundIndex(Snapshot(inbound=(), outbound=(gateway,)))
    assert index.tls_policy("[gw.example]:25").reply == Reply(Status.OK, "encrypt")


@pytest.mark.parametrize("key", ["[127.0.0.1]:10024", "[127.0.0.1]", "localhost:10025", "[filter.example]:25",
                                 "[ipv6:::1]:10024", *RELAYHOST_KEYS])
def test_any_domain_connector_leaves_unknown_next_hops_alone(key: str) -> None:
    # A content filter reached by smtp (amavis on [127.0.0.1]:10024) would get "verify" and
    # every message would be deferred.
    index = OutboundIndex(Snapshot(inbound=(), outbound=(conn("all", "*", tls_level=TlsLevel.VERIFY),)))
    assert index.tls_policy(key) == NOT_FOUND
    assert index.tls_policy("anything.example").connector == "all"


def test_a_u_label_key_finds_the_connector_of_its_a_label() -> None:
    # With SMTPUTF8 Postfix asks with the U-label; names UTS 46 admits and IDNA 2008 forbids
    # ("☃.net") once got NOTFOUND, and the mail left with main.cf's TLS level.
    index = OutboundIndex(Snapshot(inbound=(), outbound=(conn("snow", "xn--n3h.net", tls_level=TlsLevel.VERIFY),)))
    assert index.tls_policy("☃.net") == Answer(Reply(Status.OK, "verify"), "snow")
    assert index.transport("u@☃.net") == Answer(Reply(Status.OK, "smtp:"), "snow")


def test_shared_smart_host_with_different_policies_is_a_temporary_failure() -> None:
    hub = (SmartHost("relay.hub.test", 25),)
    weak = conn("a-weak", "alpha.test", tls_level=TlsLevel.ENCRYPT, smart_hosts=hub)
    strict = conn("b-strict", "beta.test", match_names=("mx.beta.test",), min_tls_version="TLSv1.3", smart_hosts=hub)
    index = OutboundIndex(Snapshot(inbound=(), outbound=(weak, strict)))
    for key in ("[relay.hub.test]:25", "[relay.hub.test]", "[RELAY.hub.test]:25"):
        answer = index.tls_policy(key)
        assert answer.reply.status is Status.TEMP, key
        assert "a-weak, b-strict share the smart host" in answer.reply.data
    # The domains are still answered with their own connector (and routed to the hub).
    assert index.tls_policy("beta.test").reply.data == "secure match=mx.beta.test protocols=>=TLSv1.3"
    assert index.transport("x@alpha.test").reply == Reply(Status.OK, "smtp:[relay.hub.test]:25")


def test_shared_smart_host_with_equal_policies_is_answered() -> None:
    hub = (SmartHost("relay.hub.test", 2525),)
    one = conn("one", "one.test", tls_level=TlsLevel.VERIFY, smart_hosts=hub)
    two = conn("two", "two.test", tls_level=TlsLevel.VERIFY, smart_hosts=hub)
    off = conn("off", "off.test", tls_level=TlsLevel.ENCRYPT, smart_hosts=hub, enabled=False)
    index = OutboundIndex(Snapshot(inbound=(), outbound=(one, two, off)))
    assert index.tls_policy("[relay.hub.test]:2525") == Answer(Reply(Status.OK, "verify"), "one")


def test_shared_smart_host_with_fingerprint_policies_compares_the_certificates(tmp_path: Path) -> None:
    # Two connectors (say, two domains of one partner) pinning the same certificate agree;
    # pinning different certificates they cannot share one answer.
    pki = Pki(tmp_path)
    partner = pin_from_pem(pki.partner.cert_path.read_bytes())
    other = pin_from_pem(pki.self_signed.cert_path.read_bytes())
    hub = (SmartHost("relay.hub.test", 25),)

    def pinned(name: str, pin: object) -> tuple[InboundConnector, OutboundConnector]:
        inbound = InboundConnector(name=name, sender_domains=(DomainPattern.parse(f"{name}.test"),), pins=(pin,))  # type: ignore[arg-type]
        return inbound, conn(name, f"{name}.test", tls_level=TlsLevel.FINGERPRINT, smart_hosts=hub)

    (in_a, out_a), (in_b, out_b), (in_c, out_c) = pinned("a", partner), pinned("b", partner), pinned("c", other)
    agreeing = OutboundIndex(Snapshot(inbound=(in_a, in_b), outbound=(out_a, out_b)))
    answer = agreeing.tls_policy("[relay.hub.test]:25")
    assert answer == Answer(Reply(Status.OK, f"fingerprint match={pki.partner.pubkey_fingerprint}|{pki.partner.fingerprint}"), "a")
    clashing = OutboundIndex(Snapshot(inbound=(in_a, in_c), outbound=(out_a, out_c)))
    answer = clashing.tls_policy("[relay.hub.test]:25")
    assert answer.reply.status is Status.TEMP
    assert "a, c share the smart host" in answer.reply.data


def test_shared_smart_host_with_a_misconfigured_connector_gives_its_reason() -> None:
    hub = (SmartHost("relay.hub.test", 25),)
    good = conn("good", "good.test", smart_hosts=hub)
    broken = conn("broken", "broken.test", smart_hosts=hub, tls_level=TlsLevel.VERIFY, problems=("bad row",))
    answer = OutboundIndex(Snapshot(inbound=(), outbound=(good, broken))).tls_policy("[relay.hub.test]")
    assert answer == Answer(Reply(Status.TEMP, "outbound connector broken is misconfigured: bad row"), "broken")


def test_misconfigured_connector_wins_equal_patterns() -> None:
    # A connector that widened itself to "*" over an unreadable domain row keeps its claim
    # against a healthy "*" connector: the mail waits instead of leaving with less TLS.
    healthy = conn("a-all", "*", tls_level=TlsLevel.ENCRYPT)
    broken = conn("z-partner", "*", "partner.test", problems=("outbound_domain: bad pattern",))
    index = OutboundIndex(Snapshot(inbound=(), outbound=(healthy, broken)))
    assert index.tls_policy("delta.test").reply.status is Status.TEMP
    assert index.tls_policy("delta.test").connector == "z-partner"
    index = OutboundIndex(Snapshot(inbound=(), outbound=(conn("a", "same.test"), conn("b", "same.test", problems=("x",)))))
    assert index.tls_policy("same.test").reply.status is Status.TEMP


@pytest.mark.parametrize(("host", "port", "mx", "route", "keys"), [
    ("192.0.2.10", 25, False, "smtp:[192.0.2.10]:25", ("[192.0.2.10]:25", "[192.0.2.10]")),
    ("192.0.2.10", 2525, True, "smtp:[192.0.2.10]:2525", ("[192.0.2.10]:2525",)),
    ("2001:db8::1", 25, False, "smtp:[2001:db8::1]:25",
     ("[2001:db8::1]:25", "[2001:db8::1]", "[ipv6:2001:db8::1]:25", "[IPv6:2001:DB8::1]", "[2001:db8:0::1]:25")),
])
def test_smart_host_addresses(host: str, port: int, mx: bool, route: str, keys: tuple[str, ...]) -> None:
    index = OutboundIndex(Snapshot(inbound=(), outbound=(
        conn("ip", "ip.test", tls_level=TlsLevel.ENCRYPT, smart_hosts=(SmartHost(host, port, mx),)),)))
    assert index.transport("x@ip.test").reply == Reply(Status.OK, route)
    for key in keys:
        assert index.tls_policy(key) == Answer(Reply(Status.OK, "encrypt"), "ip"), key


def test_transport_answers_name_the_configured_service() -> None:
    relayed = conn("b", "b.example", smart_hosts=(SmartHost("relay.b.example", 25),))
    snap = Snapshot(inbound=(), outbound=(conn("a", "a.example"), relayed))
    index = OutboundIndex(snap, "smtp-out")
    assert index.transport("x@a.example").reply == Reply(Status.OK, "smtp-out:")
    assert index.transport("x@b.example").reply == Reply(Status.OK, "smtp-out:[relay.b.example]:25")


# A smart host with MX lookup on port 25 has the key Postfix sends for mail to the recipient
# domain of that name: the connector covering that domain must agree with it.
STRICT = conn("contoso", "contoso.com", match_names=("mail.contoso.com",))


def via(name: str, host: str, port: int = 25, mx: bool = True, **kw: object) -> OutboundConnector:
    kw.setdefault("tls_level", TlsLevel.ENCRYPT)
    return conn(name, f"{name}.example", smart_hosts=(SmartHost(host, port, mx),), **kw)


def test_mx_smart_host_named_like_another_connectors_domain_is_a_temporary_failure() -> None:
    index = OutboundIndex(Snapshot(inbound=(), outbound=(STRICT, via("subsidiary", "contoso.com"))))
    assert index.transport("user@contoso.com").reply == Reply(Status.OK, "smtp:")
    for key in ("contoso.com", "CONTOSO.com"):
        assert index.tls_policy(key) == Answer(Reply(Status.TEMP, (
            "the smart host contoso.com of outbound connector subsidiary is a recipient domain of "
            "outbound connector contoso, with a different TLS policy")), "subsidiary")
    # Only the bare name is shared: the other spelling and the domains' own keys keep theirs.
    assert index.tls_policy("contoso.com:25") == Answer(Reply(Status.OK, "encrypt"), "subsidiary")
    assert index.tls_policy("subsidiary.example").reply == Reply(Status.OK, "encrypt")
    assert index.tls_policy("mail.contoso.com") == NOT_FOUND
    assert index.transport("user@subsidiary.example").reply == Reply(Status.OK, "smtp:contoso.com")
    # Every other spelling of the smart host has a port or brackets, which no domain key has.
    for port, mx, hop in ((587, True, "contoso.com:587"), (25, False, "[contoso.com]:25"), (25, False, "[contoso.com]")):
        index = OutboundIndex(Snapshot(inbound=(), outbound=(STRICT, via("subsidiary", "contoso.com", port, mx))))
        assert index.tls_policy("contoso.com") == Answer(Reply(Status.OK, "secure match=mail.contoso.com"), "contoso")
        assert index.tls_policy(hop) == Answer(Reply(Status.OK, "encrypt"), "subsidiary")


def test_mx_smart_host_inside_another_connectors_wildcard_is_a_temporary_failure() -> None:
    subs = conn("contoso-subs", "*.contoso.com", match_names=("*.contoso.com",))
    index = OutboundIndex(Snapshot(inbound=(), outbound=(subs, via("fabrikam", "relay.contoso.com"))))
    answer = index.tls_policy("relay.contoso.com")
    assert answer.reply.status is Status.TEMP
    assert "recipient domain of outbound connector contoso-subs" in answer.reply.data
    assert index.tls_policy("other.contoso.com").reply == Reply(Status.OK, "secure match=.contoso.com")


def test_mx_smart_host_must_agree_with_the_connector_the_domain_lookup_picks() -> None:
    same = via("subsidiary", "contoso.com", tls_level=TlsLevel.SECURE, match_names=("mail.contoso.com",))
    wide = conn("all-com", "*.com", tls_level=TlsLevel.ENCRYPT)
    # The exact pattern agrees and wins over "*.com": answered.
    index = OutboundIndex(Snapshot(inbound=(), outbound=(STRICT, same, wide)))
    assert index.tls_policy("contoso.com").reply == Reply(Status.OK, "secure match=mail.contoso.com")
    # Without it, "*.com" covers contoso.com and does not agree.
    index = OutboundIndex(Snapshot(inbound=(), outbound=(same, wide)))
    answer = index.tls_policy("contoso.com")
    assert answer.reply.status is Status.TEMP
    assert "recipient domain of outbound connector all-com" in answer.reply.data


def test_any_domain_connector_must_agree_with_mx_smart_hosts() -> None:
    # "*" is a floor for every domain no other connector covers, hub.partner.test included.
    floor = conn("all", "*", tls_level=TlsLevel.VERIFY)
    partner = via("partner", "hub.partner.test")
    index = OutboundIndex(Snapshot(inbound=(), outbound=(floor, partner)))
    answer = index.tls_policy("hub.partner.test")
    assert answer.reply.status is Status.TEMP
    assert "recipient domain of outbound connector all" in answer.reply.data
    # Fixed by covering the smart host's name with its own connector (or one that agrees).
    covered = conn("partner", "partner.example", "hub.partner.test", tls_level=TlsLevel.ENCRYPT,
                   smart_hosts=(SmartHost("hub.partner.test", 25, True),))
    index = OutboundIndex(Snapshot(inbound=(), outbound=(floor, covered)))
    assert index.tls_policy("hub.partner.test") == Answer(Reply(Status.OK, "encrypt"), "partner")
    # A "*" connector's own smart host agrees with it.
    gateway = conn("all", "*", tls_level=TlsLevel.VERIFY, smart_hosts=(SmartHost("gw.example", 25, True),))
    index = OutboundIndex(Snapshot(inbound=(), outbound=(gateway,)))
    assert index.tls_policy("gw.example") == Answer(Reply(Status.OK, "verify"), "all")


def test_mx_smart_host_named_like_a_misconfigured_connectors_domain_gives_its_reason() -> None:
    # Equal settings, but the domain's connector is misconfigured: its mail must wait.
    broken = conn("contoso", "contoso.com", tls_level=TlsLevel.ENCRYPT, problems=("bad row",))
    index = OutboundIndex(Snapshot(inbound=(), outbound=(broken, via("subsidiary", "contoso.com"))))
    assert index.tls_policy("contoso.com") == Answer(
        Reply(Status.TEMP, "outbound connector contoso is misconfigured: bad row"), "contoso")


def test_an_encrypt_floor_is_raised_by_a_stricter_mx_smart_host_never_lowered() -> None:
    """A partner's MX smart host under an "encrypt everything" floor keeps its own stricter
    policy; one that would answer less than the floor (dane: opportunistic without TLSA
    records; an older TLS version) waits."""
    floor = conn("all", "*", tls_level=TlsLevel.ENCRYPT, min_tls_version="TLSv1.2")
    secure = conn("partner", "partner.example", tls_level=TlsLevel.SECURE, match_names=("hub.partner.test",),
                  min_tls_version="TLSv1.3", smart_hosts=(SmartHost("hub.partner.test", 25, True),))
    index = OutboundIndex(Snapshot(inbound=(), outbound=(floor, secure)))
    assert index.tls_policy("hub.partner.test") == index.tls_policy("partner.example")
    assert index.tls_policy("hub.partner.test").reply.status is Status.OK
    for weaker in ({"tls_level": TlsLevel.DANE}, {"tls_level": TlsLevel.SECURE, "min_tls_version": "TLSv1"}):
        partner = conn("partner", "partner.example", **{"match_names": ("hub.partner.test",), **weaker},
                       smart_hosts=(SmartHost("hub.partner.test", 25, True),))
        index = OutboundIndex(Snapshot(inbound=(), outbound=(floor, partner)))
        assert index.tls_policy("hub.partner.test").reply.status is Status.TEMP, weaker



@pytest.mark.parametrize(("floor", "smart_host", "agrees"), [
    ({"tls_level": TlsLevel.DANE}, {"tls_level": TlsLevel.DANE_ONLY}, True),
    ({"tls_level": TlsLevel.DANE}, {"tls_level": TlsLevel.SECURE, "match_names": ("hub.partner.test",)}, True),
    ({"tls_level": TlsLevel.DANE}, {"tls_level": TlsLevel.DANE, "min_tls_version": "TLSv1.3"}, True),
    # encrypt authenticates no server: less than DANE where the partner publishes TLSA records
    ({"tls_level": TlsLevel.DANE}, {"tls_level": TlsLevel.ENCRYPT}, False),
    ({"tls_level": TlsLevel.VERIFY}, {"tls_level": TlsLevel.VERIFY, "min_tls_version": "TLSv1.3"}, True),
    ({"tls_level": TlsLevel.VERIFY}, {"tls_level": TlsLevel.SECURE, "match_names": ("hub.partner.test",)}, False),
])
def test_floors_other_than_encrypt_agree_with_what_asks_at_least_as_much(
    floor: dict[str, object], smart_host: dict[str, object], agrees: bool
) -> None:
    everyone = conn("all", "*", **floor)
    partner = conn("partner", "partner.example", smart_hosts=(SmartHost("hub.partner.test", 25, True),), **smart_host)
    index = OutboundIndex(Snapshot(inbound=(), outbound=(everyone, partner)))
    answer = index.tls_policy("hub.partner.test")
    if agrees:
        assert answer == index.tls_policy("partner.example") and answer.reply.status is Status.OK
    else:
        assert answer.reply.status is Status.TEMP, answer


# Postfix's valid_hostname() admits "_": it delivers to a_b.partner.test and asks for its
# ".partner.test" policy. Such a name is under its parents as any other is; no exact pattern
# can be it. NOTFOUND once sent it through relayhost in plaintext, and the "*" floor answering
# its first key kept Postfix from ever asking ".partner.test".
SUBS = conn("partner", "*.partner.test", match_names=("mx.partner.test",))
FLOOR = conn("all", "*", tls_level=TlsLevel.ENCRYPT)


@pytest.mark.parametrize("name", ["a_b.partner.test", "mx_1.partner.test", "MX_1.Partner.Test.", "x.a_b.partner.test"])
@pytest.mark.parametrize("floor", [False, True])
@pytest.mark.parametrize("form", ["domain", ".parent", "transport"])
def test_underscore_name_meets_the_patterns_of_its_parents(name: str, floor: bool, form: str) -> None:
    index = OutboundIndex(Snapshot(inbound=(), outbound=(SUBS, FLOOR) if floor else (SUBS,)))
    secure = Answer(Reply(Status.OK, "secure match=mx.partner.test"), "partner")
    if form == "domain":
        assert index.tls_policy(name) == secure
    elif form == ".parent":  # the retry of a deeper name: x.a_b.partner.test, then .a_b.partner.test
        assert index.tls_policy("." + name.lower().rstrip(".")) == secure
    else:
        assert index.transport(f"u@{name}") == Answer(Reply(Status.OK, "smtp:"), "partner")


def test_underscore_name_meets_no_exact_pattern() -> None:
    exact = conn("partner", "partner.test", "a.partner.test", match_names=("mx.partner.test",))
    index = OutboundIndex(Snapshot(inbound=(), outbound=(exact,)))
    for name in ("a_b.partner.test", "a_.partner.test"):
        assert index.tls_policy(name) == NOT_FOUND
        assert index.tls_policy("." + name) == NOT_FOUND
        assert index.transport(f"u@{name}") == NOT_FOUND
    # Without a "*.parent" pattern over it, "*" is the floor for its TLS, and never routes it.
    index = OutboundIndex(Snapshot(inbound=(), outbound=(exact, FLOOR, SUBS)))
    for name in ("a_b.partner.test", "a_b.other.test", "under_score.test"):
        expected = "partner" if name.endswith(".partner.test") else "all"
        assert index.tls_policy(name).connector == expected, name
        assert index.tls_policy("." + name).connector == expected, name
    assert index.tls_policy("under_score.test") == Answer(Reply(Status.OK, "encrypt"), "all")
    assert index.transport("u@under_score.test") == NOT_FOUND


@pytest.mark.parametrize("key", ["[a_b.partner.test]", "[a_b.partner.test]:25", "a_b.partner.test:25",
                                 "[a_b.partner.test]:2525"])
def test_underscore_next_hops_in_brackets_or_with_a_port_stay_unknown(key: str) -> None:
    # As for any name: a next hop tlsgate did not route there is main.cf's, not a connector's.
    index = OutboundIndex(Snapshot(inbound=(), outbound=(SUBS, FLOOR)))
    assert index.tls_policy(key) == NOT_FOUND


def test_a_bare_relay_name_is_a_domain_key_and_gets_the_floor() -> None:
    # relayhost = relay.isp.example (MX-style) or a transport entry smtp:mx.example.org: Postfix
    # asks for their policy as for a recipient domain, with .parent retries, and "*" answers.
    index = OutboundIndex(Snapshot(inbound=(), outbound=(FLOOR,)))
    for key in ("relay.isp.example", ".isp.example", "mx.example.org"):
        assert index.tls_policy(key) == Answer(Reply(Status.OK, "encrypt"), "all"), key
    for key in ("[relay.isp.example]", "[relay.isp.example]:25", "relay.isp.example:587", "[mx.example.org]"):
        assert index.tls_policy(key) == NOT_FOUND, key
