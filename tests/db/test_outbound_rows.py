"""Outbound rows as an administrator's SQL writes them, read into connectors and answered by
the socketmap index: smart hosts given as addresses, unreadable domain rows (wider, never
narrower), and connectors that share a smart host with different TLS policies."""

from __future__ import annotations

from pathlib import Path

from tests.support.pki import Pki
from tests.support.rulesdb import load_unchecked
from tlsgate.outbound import NOT_FOUND, OutboundIndex
from tlsgate.socketmap import Reply, Status
from tlsgate.store import LoadResult


def loaded(tmp_path: Path, *statements: str) -> LoadResult:
    return load_unchecked(tmp_path / "r.sqlite", *statements)


def connector(name: str, level: str, *domains: str, hosts: tuple[tuple[str, int, int], ...] = ()) -> list[str]:
    return [
        f"INSERT INTO outbound_connector (name, tls_level) VALUES ('{name}', '{level}')",
        *(f"INSERT INTO outbound_domain (connector, pattern) VALUES ('{name}', '{d}')" for d in domains),
        *(f"INSERT INTO outbound_smart_host (connector, host, port, mx_lookup) VALUES ('{name}', '{h}', {p}, {m})"
          for h, p, m in hosts),
    ]


def test_smart_hosts_may_be_addresses(tmp_path: Path) -> None:
    result = loaded(tmp_path, *connector("v4", "encrypt", "v4.test", hosts=(("192.0.2.10", 25, 0),)),
                    *connector("v6", "encrypt", "v6.test", hosts=(("[IPv6:2001:DB8:0::1]", 2525, 1),)))
    assert [str(p) for p in result.errors] == []
    assert [str(p) for p in result.problems] == [
        "warning: outbound_smart_host ('v6', '[IPv6:2001:DB8:0::1]', 2525) column mx_lookup: "
        "is ignored for the address 2001:db8::1: an address has no MX records"]
    index = OutboundIndex(result.snapshot)
    assert index.transport("a@v4.test").reply == Reply(Status.OK, "smtp:[192.0.2.10]:25")
    assert index.transport("a@v6.test").reply == Reply(Status.OK, "smtp:[2001:db8::1]:2525")
    assert index.tls_policy("[192.0.2.10]").reply == Reply(Status.OK, "encrypt")
    assert index.tls_policy("[ipv6:2001:db8::1]:2525").reply == Reply(Status.OK, "encrypt")


def test_an_unreadable_domain_row_widens_its_connector_to_any_domain(tmp_path: Path) -> None:
    # The typo'd domain cannot be known: every domain no other connector covers waits (TEMP)
    # rather than leave with less TLS than the connector asks.
    result = loaded(tmp_path, *connector("delta", "secure", "delta..test"),
                    *connector("good", "verify", "good.test"))
    assert any("outbound_domain ('delta', 'delta..test') column pattern" in str(p) for p in result.errors)
    index = OutboundIndex(result.snapshot)
    for key in ("delta.test", "anything.example", ".example"):
        answer = index.tls_policy(key)
        assert answer.reply.status is Status.TEMP and answer.connector == "delta", key
    assert index.tls_policy("good.test").reply == Reply(Status.OK, "verify")
    # Routing is left alone: local mail keeps flowing, and content filters are not touched.
    assert index.transport("root@localhost") == NOT_FOUND
    assert index.tls_policy("[127.0.0.1]:10024") == NOT_FOUND


def test_connectors_sharing_a_smart_host_must_agree(tmp_path: Path) -> None:
    hub = (("relay.hub.test", 25, 0),)
    result = loaded(
        tmp_path,
        *connector("a-weak", "encrypt", "alpha.test", hosts=hub),
        *connector("b-strict", "secure", "beta.test", hosts=hub),
        "INSERT INTO outbound_match_name (connector, name) VALUES ('b-strict', 'mx.beta.test')",
        *connector("c-same", "encrypt", "gamma.test", hosts=(("relay.same.test", 25, 0),)),
        *connector("d-same", "encrypt", "delta.test", hosts=(("relay.same.test", 25, 0),)),
    )
    assert [str(p) for p in result.errors] == [
        "error: outbound_smart_host ('[relay.hub.test]:25') column host: outbound connectors a-weak, b-strict "
        "share this smart host with different TLS policies: mail through it is deferred until they agree"]
    index = OutboundIndex(result.snapshot)
    assert index.tls_policy("[relay.hub.test]:25").reply.status is Status.TEMP
    assert index.tls_policy("[relay.same.test]:25").reply == Reply(Status.OK, "encrypt")


def test_fingerprint_connectors_sharing_a_smart_host_agree_when_they_pin_the_same_certificates(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    partner = pki.partner.cert_path.read_text()
    other = pki.self_signed.cert_path.read_text()

    def pinned(name: str, pem: str, host: str) -> list[str]:
        return [
            f"INSERT INTO inbound_connector (name, certificate) VALUES ('{name}', 'pinned')",
            f"INSERT INTO inbound_domain (connector, scope, pattern) VALUES ('{name}', 'sender', '{name}.test')",
            f"INSERT INTO inbound_certificate (connector, pem) VALUES ('{name}', '{pem}')",
            *connector(name, "fingerprint", f"{name}.test", hosts=((host, 25, 0),)),
        ]

    result = loaded(tmp_path, *pinned("a", partner, "relay.same.test"), *pinned("b", partner, "relay.same.test"),
                    *pinned("c", partner, "relay.hub.test"), *pinned("d", other, "relay.hub.test"))
    assert [str(p) for p in result.errors] == [
        "error: outbound_smart_host ('[relay.hub.test]:25') column host: outbound connectors c, d "
        "share this smart host with different TLS policies: mail through it is deferred until they agree"]
    index = OutboundIndex(result.snapshot)
    assert index.tls_policy("[relay.same.test]:25").reply == Reply(
        Status.OK, f"fingerprint match={pki.partner.pubkey_fingerprint}|{pki.partner.fingerprint}")
    assert index.tls_policy("[relay.hub.test]:25").reply.status is Status.TEMP


def test_any_domain_connector_with_smart_hosts_is_told_to_use_relayhost(tmp_path: Path) -> None:
    result = loaded(tmp_path, *connector("all", "encrypt", "*", hosts=(("gw.example", 25, 0),)))
    assert result.errors == []
    assert [p.message for p in result.problems] == [
        "covers '*' and has smart hosts: tlsgate never routes '*' (local mail would go too), so its smart "
        "hosts only get its TLS policy; set relayhost to them in main.cf"]


def test_mx_smart_host_named_like_another_connectors_domain_must_agree(tmp_path: Path) -> None:
    # Postfix asks for mail to contoso.com and for mail through the smart host contoso.com
    # (MX lookup, port 25) with the same key.
    result = loaded(
        tmp_path,
        *connector("contoso", "secure", "contoso.com"),
        "INSERT INTO outbound_match_name (connector, name) VALUES ('contoso', 'mail.contoso.com')",
        *connector("subsidiary", "encrypt", "subsidiary.example", hosts=(("contoso.com", 25, 1),)),
        *connector("contoso-subs", "secure", "*.contoso.com"),
        *connector("fabrikam", "encrypt", "fabrikam.com", hosts=(("relay.contoso.com", 25, 1),)),
        *connector("same", "secure", "same.example", hosts=(("relay.same.example", 25, 1),)),
        *connector("same-subs", "secure", "*.same.example"),
    )
    assert [str(p) for p in result.errors] == [
        "error: outbound_smart_host ('relay.contoso.com') column host: is also a recipient domain of outbound "
        "connector contoso-subs, whose TLS policy differs from that of outbound connector fabrikam: Postfix asks "
        "for both by this one name, so mail to it and through it is deferred until they agree",
        "error: outbound_smart_host ('contoso.com') column host: is also a recipient domain of outbound "
        "connector contoso, whose TLS policy differs from that of outbound connector subsidiary: Postfix asks "
        "for both by this one name, so mail to it and through it is deferred until they agree"]
    index = OutboundIndex(result.snapshot)
    assert index.tls_policy("contoso.com").reply.status is Status.TEMP
    assert index.tls_policy("relay.contoso.com").reply.status is Status.TEMP
    assert index.tls_policy("relay.same.example").reply == Reply(Status.OK, "secure")


def test_mx_smart_host_under_a_misconfigured_any_domain_connector_waits_without_a_second_error(tmp_path: Path) -> None:
    # The unreadable row widens delta to "*": the smart host's name is one of the domains that
    # wait, and delta's own error is the one to fix.
    result = loaded(tmp_path, *connector("delta", "secure", "delta..test"),
                    *connector("partner", "encrypt", "partner.test", hosts=(("hub.partner.test", 25, 1),)))
    assert [p.connector for p in result.errors] == ["delta"]
    answer = OutboundIndex(result.snapshot).tls_policy("hub.partner.test")
    assert answer.reply.status is Status.TEMP and answer.connector == "delta"
    # Connectors that share the smart host and disagree are still told so.
    (tmp_path / "shared").mkdir()
    result = loaded(tmp_path / "shared", *connector("delta", "secure", "delta..test"),
                    *connector("a", "encrypt", "a.test", hosts=(("hub.partner.test", 25, 1),)),
                    *connector("b", "verify", "b.test", hosts=(("hub.partner.test", 25, 1),)))
    assert [str(p) for p in result.errors][1:] == [
        "error: outbound_smart_host ('hub.partner.test') column host: outbound connectors a, b share this smart "
        "host with different TLS policies: mail through it is deferred until they agree"]
    answer = OutboundIndex(result.snapshot).tls_policy("hub.partner.test")
    assert answer.reply.status is Status.TEMP and answer.connector == "delta"
