"""How `tlsgate postfix-config` adds tlsgate's check to an administrator's restriction list."""

from __future__ import annotations

import pytest

from tlsgate.cli.postfix import recipient_restrictions, split_list, tlsgate_check

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
