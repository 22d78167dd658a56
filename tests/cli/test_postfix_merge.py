"""How `tlsgate postfix-config` adds tlsgate's check to an administrator's restriction list, and
how `tlsgate doctor` reads the settings of the service connector mail leaves by, without Postfix."""

from __future__ import annotations

import pytest

from tlsgate.cli.postfix import (
    _outbound_findings,
    honours_tls_required,
    postfix_version,
    recipient_restrictions,
    split_list,
    tlsgate_check,
)
from tlsgate.config import load_config
from tlsgate.model import OutboundConnector, TlsLevel
from tlsgate.patterns import DomainPattern
from tlsgate.snapshot import Snapshot

CHECK = "check_policy_service { unix:tlsgate/policy.sock, timeout=10s }"


@pytest.mark.parametrize(("current", "merged"), [
    ("", [CHECK]),
    # Relay control in the recipient list, after permits: tlsgate before the permits, or
    # mynetworks and SASL clients would skip it; the admin's entries kept in order.
    ("permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
     [CHECK, "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"]),
    # Leading entries that never accept stay first.
    ("reject_unauth_destination", ["reject_unauth_destination", CHECK]),
    ("reject_unauth_pipelining reject_unauth_destination, check_client_access hash:/etc/postfix/access",
     ["reject_unauth_pipelining reject_unauth_destination", CHECK, "check_client_access hash:/etc/postfix/access"]),
    ("defer_unauth_destination, check_policy_service { unix:private/spf, timeout=5s }, permit",
     ["defer_unauth_destination", CHECK, "check_policy_service { unix:private/spf, timeout=5s }, permit"]),
    # An entry with an argument is not skipped: its argument must stay with it.
    ("reject_rbl_client zen.spamhaus.org, reject_unauth_destination",
     [CHECK, "reject_rbl_client zen.spamhaus.org, reject_unauth_destination"]),
    ("warn_if_reject reject_unauth_destination", [CHECK, "warn_if_reject reject_unauth_destination"]),
])
def test_recipient_restrictions(current: str, merged: list[str]) -> None:
    assert recipient_restrictions(current, CHECK) == merged


def test_split_list_keeps_braces_whole() -> None:
    value = "a, { unix:x, timeout=1s },b inline:{ k=v, l=w }\n  c"
    assert [item for _, item in split_list(value)] == ["a", "{ unix:x, timeout=1s }", "b", "inline:{ k=v, l=w }", "c"]


@pytest.mark.parametrize(("current", "accepting"), [
    ("check_policy_service { unix:tlsgate/policy.sock, timeout=10s }, permit_mynetworks", None),
    ("reject_unauth_destination check_policy_service unix:tlsgate/policy.sock", None),
    ("permit_mynetworks, check_policy_service { unix:tlsgate/policy.sock }", "permit_mynetworks"),
    ("check_recipient_access hash:/etc/postfix/rcpt, check_policy_service unix:tlsgate/policy.sock",
     "check_recipient_access"),
])
def test_where_tlsgate_check_stands(current: str, accepting: str | None) -> None:
    found = tlsgate_check(split_list(current), "unix:tlsgate/policy.sock")
    assert found is not None and found[2] == accepting
    start, end, _ = found
    assert current[start:end].startswith("check_policy_service") and current[start:end].endswith(("}", ".sock"))


def test_another_policy_service_is_not_tlsgate() -> None:
    assert tlsgate_check(split_list("check_policy_service { unix:tlsgate/policy.sock.old }"),
                         "unix:tlsgate/policy.sock") is None
    assert tlsgate_check(split_list("check_policy_service unix:private/policyd-spf"), "unix:tlsgate/policy.sock") is None


# How doctor reads the settings of the SMTP client service connector mail leaves by
# ([socketmap] transport, "smtp" by default): main.cf's value, or the service's -o in master.cf.

def _conn(name: str, level: TlsLevel) -> OutboundConnector:
    return OutboundConnector(name=name, recipient_domains=(DomainPattern.parse(f"{name}.example"),), tls_level=level)


_BASE = {
    "queue_directory": "/nonexistent-queue",
    "smtp_tls_policy_maps": "socketmap:inet:127.0.0.1:1:tls_policy",
    "transport_maps": "socketmap:inet:127.0.0.1:1:transport",
    "smtp_dns_support_level": "",
    "smtp_host_lookup": "dns",
    "ignore_mx_lookup_error": "no",
    "smtp_tls_fingerprint_digest": "sha256",
    "mail_version": "3.7.11",
}
DNSSEC = {"smtp_dns_support_level": "dnssec"}


@pytest.mark.parametrize(("level", "params", "expected"), [
    # Postfix's dane_init(): no DNSSEC lookups, so dane is opportunistic and dane-only defers.
    (TlsLevel.DANE, {}, "error: main.cf smtp_dns_support_level = '' for the smtp service"),
    (TlsLevel.DANE_ONLY, {}, "those at dane-only (c) get all their mail deferred"),
    (TlsLevel.DANE, DNSSEC, None),
    (TlsLevel.DANE, {**DNSSEC, "smtp/unix/smtp_dns_support_level": "enabled"},
     "fix: -o smtp_dns_support_level=dnssec on the smtp service in master.cf"),
    (TlsLevel.DANE, {"smtp/unix/smtp_dns_support_level": "dnssec"}, None),
    (TlsLevel.DANE, {**DNSSEC, "smtp_host_lookup": "native"}, "main.cf smtp_host_lookup = 'native'"),
    (TlsLevel.DANE, {**DNSSEC, "smtp_host_lookup": "native, dns"}, None),
    (TlsLevel.DANE, {**DNSSEC, "ignore_mx_lookup_error": "yes"}, "MX lookup errors ignored"),
    (TlsLevel.SECURE, {}, None),
    # The socketmap answers sha256 fingerprints only.
    (TlsLevel.FINGERPRINT, {"smtp_tls_fingerprint_digest": "md5"},
     "error: main.cf smtp_tls_fingerprint_digest = 'md5' for the smtp service: outbound connectors at "
     "tls_level fingerprint (c) pin sha256"),
    (TlsLevel.FINGERPRINT, {"smtp/unix/smtp_tls_fingerprint_digest": "sha1"},
     "fix: -o smtp_tls_fingerprint_digest=sha256 on the smtp service in master.cf"),
    (TlsLevel.DANE, {**DNSSEC, "smtp_tls_fingerprint_digest": "md5"}, None),
    # Postfix >= 3.10: "TLS-Required: no" skips smtp_tls_policy_maps (tls_required_enable = yes by default).
    (TlsLevel.SECURE, {"mail_version": "3.10.2", "tls_required_enable": "yes"},
     "error: main.cf tls_required_enable = yes for the smtp service: Postfix 3.10.2 obeys a \"TLS-Required: no\""),
    (TlsLevel.SECURE, {"mail_version": "3.11-20250601", "tls_required_enable": "yes"}, "fix: tls_required_enable = no"),
    (TlsLevel.SECURE, {"mail_version": "3.10.2", "tls_required_enable": "no"}, None),
    (TlsLevel.SECURE, {"mail_version": "3.10.2", "tls_required_enable": "no", "smtp/unix/tls_required_enable": "yes"},
     "fix: -o tls_required_enable=no on the smtp service in master.cf"),
    (TlsLevel.SECURE, {"mail_version": "3.7.11", "smtp/unix/tls_required_enable": "yes"}, None),
    # A -o smtp_tls_policy_maps on the connector service replaces main.cf's list.
    (TlsLevel.SECURE, {"smtp/unix/smtp_tls_policy_maps": ""},
     "error: master.cf smtp -o smtp_tls_policy_maps = (empty): it replaces main.cf's smtp_tls_policy_maps"),
    (TlsLevel.SECURE, {"smtp/unix/smtp_tls_policy_maps": "hash:/etc/postfix/tls_policy"},
     "-o smtp_tls_policy_maps=socketmap:inet:127.0.0.1:1:tls_policy,hash:/etc/postfix/tls_policy"),
    (TlsLevel.SECURE, {"smtp/unix/smtp_tls_policy_maps": "socketmap:inet:127.0.0.1:1:tls_policy"}, None),
    (TlsLevel.SECURE, {"relay/unix/smtp_tls_policy_maps": ""}, None),
    (TlsLevel.SECURE, {"smtp_tls_policy_maps": "hash:/etc/postfix/tls_policy"},
     "error: transport_maps asks tlsgate but smtp_tls_policy_maps does not"),
    (TlsLevel.SECURE, {"smtp_tls_policy_maps": "", "smtp/unix/smtp_tls_policy_maps": "socketmap:inet:127.0.0.1:1:tls_policy"},
     None),
])
def test_doctor_reads_the_connector_service(level: TlsLevel, params: dict[str, str], expected: str | None) -> None:
    config = load_config(None, environ={"TLSGATE_CONFIG": ""})
    snap = Snapshot(inbound=(), outbound=(_conn("c", level),), generation=1)
    findings = [str(f) for f in _outbound_findings(config, {**_BASE, **params}, snap)
                if "socketmap socket" not in f.what]  # nothing listens on port 1: expected
    if expected is None:
        assert findings == []
    else:
        assert any(expected in f for f in findings), findings


def test_postfix_version() -> None:
    assert postfix_version({"mail_version": "3.10.2"}) == (3, 10)
    assert postfix_version({"mail_version": "3.11-20250601"}) == (3, 11)
    assert postfix_version({}) is None
    assert honours_tls_required({"mail_version": "3.10.0"}) and not honours_tls_required({"mail_version": "3.9.4"})
    # Without mail_version: postconf -x lists tls_required_enable only where Postfix knows it.
    assert honours_tls_required({"tls_required_enable": "yes"}) and not honours_tls_required({})
