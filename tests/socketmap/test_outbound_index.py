"""The outbound index as a table: socketmap keys Postfix sends and the answers they get."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.pki import Pki
from tlsgate.certs import pin_from_pem
from tlsgate.model import InboundConnector, OutboundConnector, SmartHost, TlsLevel
from tlsgate.outbound import OutboundIndex, lookup
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
    ("user@contoso.com", Status.NOTFOUND, ""),  # no smart host: Postfix's own MX routing
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
    assert index.tls_policy("[192.0.2.1]").connector == "all"


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
