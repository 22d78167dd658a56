"""The decision engine, table-driven: every field of a connector and every precedence rule."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.indexes import index_answers
from tlsgate.engine import (
    decide,
    decide_header_from,
    find_candidates,
    has_forward_secrecy,
    version_key,
    with_myorigin,
)
from tlsgate.model import (
    CertRequirement,
    FailAction,
    InboundConnector,
    Mode,
    Outcome,
    Pin,
    SessionFacts,
    Stage,
)
from tlsgate.patterns import CertNamePattern, DomainPattern, IssuerPattern, parse_network
from tlsgate.snapshot import Snapshot

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def conn(name: str, **kw: Any) -> InboundConnector:
    """A connector from short keyword arguments: sender=, rcpt=, hfrom= take pattern strings."""
    for key, field in (("sender", "sender_domains"), ("rcpt", "recipient_domains"), ("hfrom", "header_from_domains")):
        if key in kw:
            kw[field] = tuple(DomainPattern.parse(p) for p in kw.pop(key))
    if "ranges" in kw:
        kw["client_ranges"] = tuple(parse_network(n) for n in kw.pop("ranges"))
    if "names" in kw:
        kw["cert_names"] = tuple(CertNamePattern.parse(n) for n in kw.pop("names"))
    if "issuers" in kw:
        kw["issuer_names"] = tuple(IssuerPattern.parse(n) for n in kw.pop("issuers"))
    return InboundConnector(name=name, **kw)


def facts(**kw: Any) -> SessionFacts:
    kw.setdefault("client_address", "203.0.113.5")
    kw["client_address"] = ipaddress.ip_address(kw["client_address"])
    kw.setdefault("sender", "a@contoso.com")
    kw.setdefault("recipient", "b@example.org")
    return SessionFacts(**kw)


TLS13 = {"tls_protocol": "TLSv1.3", "tls_cipher": "TLS_AES_256_GCM_SHA384", "tls_cipher_bits": 256}
TLS12 = {"tls_protocol": "TLSv1.2", "tls_cipher": "ECDHE-RSA-AES256-GCM-SHA384", "tls_cipher_bits": 256}
TLS12_NOFS = {"tls_protocol": "TLSv1.2", "tls_cipher": "AES256-GCM-SHA384", "tls_cipher_bits": 256}
CERT = {"cert_subject": "mail.contoso.com", "cert_issuer": "Contoso Issuing CA 1"}


# (id, connectors, session, expected verdict "pass" | "reject" | "defer" | "monitor-…", winner, reason part)
CASES: list[tuple[str, list[InboundConnector], dict[str, Any], str, str | None, str]] = [
    ("no connector: plaintext passes", [], {}, "pass", None, ""),
    ("other domain: opportunistic", [conn("c", sender=["contoso.com"])], {"sender": "x@other.com"}, "pass", None, ""),
    ("require tls, plaintext, defer default", [conn("c", sender=["contoso.com"])], {}, "defer", "c", "TLS required by connector c"),
    ("require tls, plaintext, reject", [conn("c", sender=["contoso.com"], on_failure=FailAction.REJECT)], {}, "reject", "c", "TLS required"),
    ("require tls, tls used", [conn("c", sender=["contoso.com"])], TLS13, "pass", "c", ""),
    ("require_tls off and nothing else: plaintext passes", [conn("c", sender=["contoso.com"], require_tls=False)], {}, "pass", "c", ""),
    ("domain match is case-insensitive", [conn("c", sender=["Contoso.COM"])], {"sender": "A@CONTOSO.com"}, "defer", "c", ""),
    ("wildcard matches subdomain", [conn("c", sender=["*.contoso.com"])], {"sender": "a@eu.mail.contoso.com"}, "defer", "c", ""),
    ("wildcard does not match parent", [conn("c", sender=["*.contoso.com"])], {}, "pass", None, ""),
    ("star matches all", [conn("c", sender=["*"])], {"sender": "a@anything.test"}, "defer", "c", ""),
    ("IDN sender domain matches A-label pattern", [conn("c", sender=["bücher.example"])], {"sender": "a@xn--bcher-kva.example"}, "defer", "c", ""),
    # UTS 46 admits symbols IDNA 2008 forbids, as Postfix's ICU does.
    ("symbol IDN sender matches its A-label", [conn("c", sender=["xn--n3h.net"])], {"sender": "a@☃.net"}, "defer", "c", ""),
    # A domain that is no domain name matches no partner, but every '*' connector.
    ("address literal sender meets star", [conn("c", sender=["*"]), conn("p", sender=["contoso.com"])],
     {"sender": "a@[192.0.2.1]"}, "defer", "c", "TLS required by connector c"),
    ("unreadable sender domain meets star", [conn("c", sender=["*"])], {"sender": "a@under_score.test"}, "defer", "c", ""),
    ("unreadable sender domain meets no partner", [conn("p", sender=["contoso.com"])], {"sender": "a@contoso_com"}, "pass", None, ""),
    ("unreadable recipient domain meets star", [conn("c", rcpt=["*"])], {"recipient": "b@exa mple.org"}, "defer", "c", ""),
    ("address literal recipient with a recipient scope in force", [conn("r", rcpt=["example.org"])],
     {"recipient": "bob@[192.0.2.9]"}, "defer", None, "names a host by its address"),
    ("address literal recipient, no recipient scope", [conn("c", sender=["contoso.com"])],
     {"recipient": "bob@[192.0.2.9]"}, "defer", "c", "TLS required"),
    ("min version met", [conn("c", sender=["contoso.com"], min_tls_version="TLSv1.2")], TLS12, "pass", "c", ""),
    ("min version unmet", [conn("c", sender=["contoso.com"], min_tls_version="TLSv1.3")], TLS12, "defer", "c", "TLSv1.2 is below the minimum TLSv1.3"),
    ("forward secrecy ECDHE", [conn("c", sender=["contoso.com"], require_forward_secrecy=True)], TLS12, "pass", "c", ""),
    ("forward secrecy missing", [conn("c", sender=["contoso.com"], require_forward_secrecy=True)], TLS12_NOFS, "defer", "c", "lacks forward secrecy"),
    ("forward secrecy TLS 1.3", [conn("c", sender=["contoso.com"], require_forward_secrecy=True)], TLS13, "pass", "c", ""),
    ("cipher bits met", [conn("c", sender=["contoso.com"], min_cipher_bits=256)], TLS13, "pass", "c", ""),
    ("cipher bits unmet", [conn("c", sender=["contoso.com"], min_cipher_bits=256)], {**TLS13, "tls_cipher_bits": 128}, "defer", "c", "128 bits is below 256"),
    ("trusted cert present", [conn("c", sender=["contoso.com"], certificate=CertRequirement.TRUSTED)], {**TLS13, **CERT}, "pass", "c", ""),
    ("trusted cert absent", [conn("c", sender=["contoso.com"], certificate=CertRequirement.TRUSTED)], TLS13, "defer", "c", "no client certificate that chains"),
    ("unverified cert (fingerprint only) is not trusted", [conn("c", sender=["contoso.com"], certificate=CertRequirement.TRUSTED)], {**TLS13, "cert_fingerprint": "AA:BB"}, "defer", "c", "no client certificate"),
    ("cert name exact", [conn("c", sender=["contoso.com"], names=["mail.contoso.com"])], {**TLS13, **CERT}, "pass", "c", ""),
    ("cert name wildcard one label", [conn("c", sender=["contoso.com"], names=["*.contoso.com"])], {**TLS13, **CERT}, "pass", "c", ""),
    ("cert name wildcard not two labels", [conn("c", sender=["contoso.com"], names=["*.contoso.com"])], {**TLS13, "cert_subject": "a.mail.contoso.com"}, "defer", "c", "does not match *.contoso.com"),
    ("cert name mismatch reason", [conn("c", sender=["contoso.com"], names=["*.contoso.com"])], {**TLS13, "cert_subject": "mail.fabrikam.com"}, "defer", "c", "certificate name mail.fabrikam.com does not match *.contoso.com"),
    ("issuer glob match", [conn("c", sender=["contoso.com"], issuers=["contoso issuing ca*"])], {**TLS13, **CERT}, "pass", "c", ""),
    ("issuer mismatch", [conn("c", sender=["contoso.com"], issuers=["DigiCert*"])], {**TLS13, **CERT}, "defer", "c", "does not match DigiCert*"),
    ("client ranges as scope", [conn("c", ranges=["203.0.113.0/24"])], {}, "defer", "c", ""),
    ("client ranges as scope, outside", [conn("c", ranges=["198.51.100.0/24"])], {}, "pass", None, ""),
    ("restrict to ranges, inside", [conn("c", sender=["contoso.com"], ranges=["203.0.113.0/24"], restrict_to_ranges=True)], TLS13, "pass", "c", ""),
    ("restrict to ranges, outside", [conn("c", sender=["contoso.com"], ranges=["198.51.100.0/24"], restrict_to_ranges=True)], TLS13, "defer", "c", "outside the ranges of connector c"),
    ("restrict to ranges, IPv6 client vs IPv4 ranges", [conn("c", sender=["contoso.com"], ranges=["198.51.100.0/24"], restrict_to_ranges=True)], {**TLS13, "client_address": "2001:db8::1"}, "defer", "c", "outside"),
    ("restrict to ranges, none resolved (DNS entry without addresses)", [conn("c", sender=["contoso.com"], dns_entries=("a:gone.contoso.com",), restrict_to_ranges=True)], TLS13, "defer", "c", "outside the ranges"),
    ("IPv6 range scope", [conn("c", ranges=["2001:db8::/32"])], {"client_address": "2001:db8:1::5"}, "defer", "c", ""),
    ("recipient scope", [conn("c", rcpt=["example.org"])], {"sender": "x@other.com"}, "defer", "c", ""),
    ("recipient scope, other recipient", [conn("c", rcpt=["example.org"])], {"recipient": "b@else.org"}, "pass", None, ""),
    ("sender and recipient scopes are both required", [conn("c", sender=["contoso.com"], rcpt=["example.org"])], {"recipient": "b@else.org"}, "pass", None, ""),
    ("null sender skips sender-scoped connectors", [conn("c", sender=["*"])], {"sender": ""}, "pass", None, ""),
    ("null sender meets recipient-scoped connectors", [conn("c", rcpt=["example.org"])], {"sender": ""}, "defer", "c", ""),
    ("monitor mode never blocks", [conn("c", sender=["contoso.com"], mode=Mode.MONITOR, on_failure=FailAction.REJECT)], {}, "monitor-reject", "c", "TLS required"),
    ("disabled connector ignored", [conn("c", sender=["contoso.com"], enabled=False)], {}, "pass", None, ""),
    ("misconfigured connector defers in its scope", [conn("c", sender=["contoso.com"], problems=("bad row",))], TLS13, "defer", "c", "misconfigured"),
    ("misconfigured connector defers even reject ones", [conn("c", sender=["contoso.com"], on_failure=FailAction.REJECT, problems=("x",))], TLS13, "defer", "c", "misconfigured"),
    ("connector without scope matches nothing", [conn("c")], {}, "pass", None, ""),
    ("header From scope not judged at RCPT", [conn("c", hfrom=["contoso.com"])], {"sender": "x@other.com", "header_from": "a@contoso.com"}, "pass", None, ""),
    ("header From scope judged at DATA", [conn("c", hfrom=["contoso.com"])], {"sender": "x@other.com", "header_from": "a@contoso.com", "stage": Stage.DATA}, "defer", "c", ""),
    # precedence
    ("exact beats wildcard", [conn("wild", sender=["*.contoso.com"], require_tls=False), conn("exact", sender=["mail.contoso.com"])], {"sender": "a@mail.contoso.com"}, "defer", "exact", ""),
    ("exact beats wildcard (reverse)", [conn("wild", sender=["*.contoso.com"]), conn("exact", sender=["mail.contoso.com"], require_tls=False)], {"sender": "a@mail.contoso.com"}, "pass", "exact", ""),
    ("longer wildcard beats shorter", [conn("a", sender=["*.com"]), conn("b", sender=["*.contoso.com"], require_tls=False)], {"sender": "a@x.contoso.com"}, "pass", "b", ""),
    ("wildcard beats star", [conn("a", sender=["*"]), conn("b", sender=["*.com"], require_tls=False)], {}, "pass", "b", ""),
    ("sender scope beats recipient-only", [conn("r", rcpt=["example.org"]), conn("s", sender=["contoso.com"], require_tls=False)], {}, "pass", "s", ""),
    ("sender star beats recipient exact", [conn("r", rcpt=["example.org"], require_tls=False), conn("s", sender=["*"])], {}, "defer", "s", ""),
    ("ties by name", [conn("b", sender=["contoso.com"], require_tls=False), conn("a", sender=["contoso.com"])], {}, "defer", "a", ""),
    ("sender+recipient beats sender only", [conn("s", sender=["contoso.com"]), conn("sr", sender=["contoso.com"], rcpt=["example.org"], require_tls=False)], {}, "pass", "sr", ""),
    ("longer prefix beats shorter", [conn("wide", ranges=["203.0.0.0/8"]), conn("narrow", ranges=["203.0.113.0/24"], require_tls=False)], {}, "pass", "narrow", ""),
    ("a specific connector overrides a misconfigured broad one", [conn("broad", sender=["*"], problems=("bad",)), conn("c", sender=["contoso.com"], require_tls=False)], {}, "pass", "c", ""),
    # an address without a domain, Postfix's myorigin unknown: Postfix appends @$myorigin after
    # the restrictions, so no connector can be told
    ("sender without a domain", [conn("c", sender=["example.org"])], {**TLS13, "sender": "ceo"}, "defer", None,
     "sender <ceo> has no domain, so the connector that applies cannot be told (set [engine] myorigin, "
     "or Postfix's reject_non_fqdn_sender refuses such addresses)"),
    ("a percent-hack recipient may go elsewhere", [conn("c", rcpt=["example.org"])], {"recipient": "bob%example.org@mx.example.net"}, "defer", "c",
     "recipient <bob%example.org@mx.example.net> may be delivered to another domain than it shows"),
    ("a bang path sender may go elsewhere", [conn("c", sender=["example.org"])], {"sender": "example.org!ceo"}, "defer", None,
     "sender <example.org!ceo> may be delivered to another domain"),
    # a recipient whose domain Postfix strips, when it is this host's, then routes on (resolve.c)
    ("routed on by another @: refused there, passed here", [conn("c", rcpt=["example.org"])], {"recipient": "bob@example.org@localhost"}, "defer", "c",
     "as <bob@example.org>, connector c refuses it (TLS required by connector c), as <bob@example.org@localhost> it would pass"),
    ("routed on by a bang path", [conn("c", rcpt=["example.org"])], {"recipient": "example.org!bob@localhost"}, "defer", "c",
     "as <bob@example.org>, connector c refuses it"),
    ("routed on: passed everywhere", [conn("c", rcpt=["example.org"])], {**TLS13, "recipient": "bob@example.org@localhost"}, "pass", None, ""),
    ("routed on through a quoted local part with blanks", [conn("c", rcpt=["example.org"])], {"recipient": "bob@example . org@localhost"}, "defer", "c",
     "as <bob@example.org>, connector c refuses it"),
    ("routed on through quotes (the milter's spelling)", [conn("c", rcpt=["example.org"])], {"recipient": '"bob@example.org"@localhost'}, "defer", "c", "as <bob@example.org>"),
    ("routed on to no domain name at all", [conn("c", rcpt=["example.org"])], {**TLS13, "recipient": "bob@exa$mple.org@localhost"}, "defer", None,
     "recipient <bob@exa$mple.org> names no domain Postfix could deliver to"),
    ("routed on past the last route judged", [conn("c", rcpt=["example.org"])], {**TLS13, "recipient": "bob" + "@h.test" * 13}, "defer", None, "goes on through more than 10 addresses"),
    ("a source route is no route", [conn("c", rcpt=["example.org"], on_failure=FailAction.REJECT)], {"recipient": "@localhost:bob@example.org"}, "reject", "c", ""),
    ("routed on: refused everywhere, the weakest refusal stands", [conn("l", rcpt=["localhost"], on_failure=FailAction.REJECT), conn("c", rcpt=["example.org"])],
     {"recipient": "bob@example.org@localhost"}, "defer", "c", "TLS required by connector c"),
    ("routed on: a monitor connector's view is kept", [conn("m", rcpt=["example.org"], mode=Mode.MONITOR)], {"recipient": "bob@example.org@localhost"}, "monitor-defer", "m", ""),
    ("routed on: refused everywhere, the strongest stands", [conn("c", rcpt=["example.org"]), conn("s", sender=["contoso.com"], on_failure=FailAction.REJECT)],
     {"recipient": "bob@example.org@localhost"}, "reject", "s", "TLS required by connector s"),
    # a sender is never routed on: an @ keeps it as it is (rewrite.c rewrites none with an @)
    ("a percent in a sender with a domain is no route", [conn("c", sender=["partner.test"])], {"sender": "a%partner.test@gmail.com"}, "pass", None, ""),
    ("nor is a bang", [conn("c", sender=["partner.test"])], {"sender": "partner.test!a@gmail.com"}, "pass", None, ""),
    # a domain that is no host name for its characters alone is still under its parent
    ("an underscore label is under its parent", [conn("c", sender=["*.contoso.com"])], {"sender": "a@mx_1.contoso.com"}, "defer", "c", "TLS required"),
    ("an underscore label is under its parent (recipient)", [conn("c", rcpt=["*.example.org"])], {"recipient": "b@eu_west.example.org"}, "defer", "c", "TLS required"),
    ("an address literal is under no parent", [conn("c", sender=["*.contoso.com"])], {"sender": "a@[192.0.2.1]"}, "pass", None, ""),
    # a verified certificate without a subject CN: Postfix sends its issuer alone
    ("verified without a subject CN", [conn("c", sender=["contoso.com"], certificate=CertRequirement.TRUSTED)], {**TLS13, "cert_issuer": "Lab Test CA"}, "pass", "c", ""),
    ("verified without a subject CN, issuer pattern", [conn("c", sender=["contoso.com"], issuers=["Lab Test*"])], {**TLS13, "cert_issuer": "Lab Test CA"}, "pass", "c", ""),
    ("verified without a subject CN meets no name", [conn("c", sender=["contoso.com"], names=["mail.contoso.com"])], {**TLS13, "cert_issuer": "Lab Test CA"}, "defer", "c", "certificate name (none) does not match"),
    # a certificate name as the CA issued it: no Unicode case folding, no stripping
    ("a name with a trailing space is another name", [conn("c", sender=["contoso.com"], names=["mail.contoso.com"])], {**TLS13, "cert_subject": "mail.contoso.com "}, "defer", "c", "does not match"),
    ("a name with a no-break space is another name", [conn("c", sender=["contoso.com"], names=["mail.contoso.com"])], {**TLS13, "cert_subject": "mail.contoso.com\u00a0"}, "defer", "c", "does not match"),
    ("the Kelvin sign is no k", [conn("c", sender=["contoso.com"], names=["mail.k.contoso.com"])], {**TLS13, "cert_subject": "mail.\u212a.contoso.com"}, "defer", "c", "does not match"),
    ("ASCII case and a final dot are", [conn("c", sender=["contoso.com"], names=["mail.contoso.com"])], {**TLS13, "cert_subject": "MAIL.Contoso.COM."}, "pass", "c", ""),
    ("an empty domain is dropped, as Postfix drops it", [conn("c", rcpt=["example.org"])], {"recipient": "bob@example.org@"}, "defer", "c", "TLS required"),
    ("a bare postmaster is accepted (RFC 5321)", [conn("c", rcpt=["example.org"])], {"recipient": "Postmaster"}, "pass", None, ""),
    ("recipient without a domain", [conn("c", rcpt=["example.org"])], {**TLS13, "recipient": "<bob>"}, "defer", None,
     "recipient <bob> has no domain"),
    ("no recipient-scoped connector: a bare recipient is no one's", [conn("c", sender=["contoso.com"])], {**TLS13, "recipient": "postmaster"}, "pass", "c", ""),
    ("only monitor connectors in the scope: nothing refused", [conn("c", rcpt=["example.org"], mode=Mode.MONITOR)], {"recipient": "bob"}, "pass", None, ""),
    ("null sender is not an address without a domain", [conn("c", sender=["*"])], {"sender": "<>"}, "pass", None, ""),
    ("a domain literal is not one either: it meets '*'", [conn("c", sender=["*"])], {"sender": "a@[192.0.2.1]"}, "defer", "c", "TLS required by connector c"),
    # a monitor-mode connector never lifts a broader enforcing one
    ("monitor does not lift a broader enforcing connector", [conn("watch", sender=["contoso.com"], mode=Mode.MONITOR, require_tls=False), conn("wide", sender=["*.com"], on_failure=FailAction.REJECT)], {}, "reject", "wide", "TLS required by connector wide"),
    ("monitor's own verdict once the enforcing one passes", [conn("watch", sender=["contoso.com"], mode=Mode.MONITOR, min_tls_version="TLSv1.3"), conn("wide", sender=["*.com"])], TLS12, "monitor-defer", "watch", "below the minimum TLSv1.3"),
    ("monitor passing behind a passing enforcing one", [conn("watch", sender=["contoso.com"], mode=Mode.MONITOR), conn("wide", sender=["*.com"])], TLS13, "pass", "watch", ""),
    ("a misconfigured enforcing one defers behind a monitor", [conn("watch", sender=["contoso.com"], mode=Mode.MONITOR), conn("wide", sender=["*.com"], problems=("bad",))], TLS13, "defer", "wide", "misconfigured"),
    ("monitor over monitor: the best one's view", [conn("watch", sender=["contoso.com"], mode=Mode.MONITOR, require_tls=False), conn("wide", sender=["*.com"], mode=Mode.MONITOR)], {}, "pass", "watch", ""),
]


@pytest.mark.parametrize(("connectors", "session", "verdict", "winner", "reason"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decision_table(connectors: list[InboundConnector], session: dict[str, Any], verdict: str,
                        winner: str | None, reason: str) -> None:
    from tlsgate.decisionlog import verdict_word

    decision = decide(Snapshot(inbound=tuple(connectors)), facts(**session), NOW)
    assert verdict_word(decision) == verdict
    assert (decision.connector.name if decision.connector else None) == winner
    if reason:
        assert decision.reason is not None and reason in decision.reason


def test_an_address_without_a_domain_is_judged_at_myorigin() -> None:
    snap = Snapshot(inbound=(conn("own", sender=["example.org"], restrict_to_ranges=True, ranges=["192.0.2.0/24"]),
                             conn("rcpt", rcpt=["example.org"], on_failure=FailAction.REJECT)))
    spoof = with_myorigin(facts(sender="<ceo>", recipient="b@else.test", **TLS13), "example.org")
    assert (spoof.sender, spoof.recipient) == ("ceo@example.org", "b@else.test")
    d = decide(snap, spoof, NOW)  # from outside our own relays
    assert (d.connector and d.connector.name, d.status) == ("own", "4.7.1")
    bare = with_myorigin(facts(sender="a@else.test", recipient="postmaster"), "example.org")
    assert bare.recipient == "postmaster@example.org"
    assert decide(snap, bare, NOW).status == "5.7.10"  # as postmaster@example.org written in full
    for rerouted in ("bob%else.test", "else.test!bob"):  # not completed: Postfix may send it elsewhere
        assert with_myorigin(facts(recipient=rerouted), "example.org").recipient == rerouted
        assert decide(snap, facts(recipient=rerouted), NOW).status == "4.1.3"
    full = facts(sender="<>", recipient="b@example.org")
    assert with_myorigin(full, "example.org") is full and with_myorigin(facts(sender="ceo"), None).sender == "ceo"


def test_status_codes_follow_action_and_requirement() -> None:
    c = conn("c", sender=["contoso.com"], on_failure=FailAction.REJECT, names=["mail.contoso.com"])
    snap = Snapshot(inbound=(c,))
    assert decide(snap, facts(), NOW).status == "5.7.10"
    assert decide(snap, facts(**TLS13), NOW).status == "5.7.1"
    deferring = Snapshot(inbound=(replace(c, on_failure=FailAction.DEFER),))
    assert decide(deferring, facts(), NOW).status == "4.7.10"
    broken = Snapshot(inbound=(replace(c, problems=("x",)),))
    assert decide(broken, facts(), NOW).status == "4.3.5"
    both = Snapshot(inbound=(c, conn("r", rcpt=["example.org"])))
    assert decide(both, facts(sender="ceo"), NOW).status == "4.1.7"  # bad sender address syntax
    assert decide(both, facts(recipient="bob"), NOW).status == "4.1.3"  # bad destination address syntax


def test_reply_text_replaces_reason_for_the_client_only() -> None:
    c = conn("c", sender=["contoso.com"], reply_text="Contoso mail must use TLS")
    d = decide(Snapshot(inbound=(c,)), facts(), NOW)
    assert d.reply == "Contoso mail must use TLS"
    assert d.reason == "TLS required by connector c"


def test_candidates_show_the_override() -> None:
    snap = Snapshot(inbound=(conn("broad", sender=["*.com"]), conn("exact", sender=["contoso.com"])))
    cands = find_candidates(snap, facts())
    assert [c.connector.name for c in cands] == ["exact", "broad"]


BANK = {"sender": "x@mailer.test", "header_from": "ceo@bank.test", "stage": Stage.DATA}

# decide_header_from: the header-From connectors alone, ranked and judged as decide does
# (id, connectors, session, expected verdict, winner, reason part)
HEADER_FROM_CASES: list[tuple[str, list[InboundConnector], dict[str, Any], str, str | None, str]] = [
    ("a sender connector for * does not hide it", [conn("all", sender=["*"]), conn("bank", hfrom=["bank.test"], on_failure=FailAction.REJECT)], {**BANK, **TLS13, "sender": "x@mailer.test"}, "pass", "bank", ""),
    ("judged though a sender connector ranks first", [conn("all", sender=["*"], require_tls=False), conn("bank", hfrom=["bank.test"], on_failure=FailAction.REJECT)], BANK, "reject", "bank", "TLS required by connector bank"),
    ("a partner's sender connector does not hide it", [conn("partner", sender=["mailer.test"], require_tls=False), conn("bank", hfrom=["bank.test"])], BANK, "defer", "bank", ""),
    ("no header-From connector: nothing to say", [conn("all", sender=["*"])], BANK, "pass", None, ""),
    ("another author's domain", [conn("bank", hfrom=["bank.test"])], {**BANK, "header_from": "a@else.test"}, "pass", None, ""),
    ("never at RCPT", [conn("bank", hfrom=["bank.test"])], {**BANK, "stage": Stage.RCPT}, "pass", None, ""),
    ("the most specific header-From connector decides", [conn("wide", hfrom=["*.test"]), conn("bank", hfrom=["bank.test"], require_tls=False)], BANK, "pass", "bank", ""),
    ("a sender scope ranks first among them too", [conn("bank", hfrom=["bank.test"], require_tls=False), conn("both", sender=["mailer.test"], hfrom=["*.test"])], BANK, "defer", "both", ""),
    ("monitor does not lift an enforcing one", [conn("watch", hfrom=["bank.test"], mode=Mode.MONITOR, require_tls=False), conn("wide", hfrom=["*.test"], on_failure=FailAction.REJECT)], BANK, "reject", "wide", ""),
    ("monitor's view once the enforcing ones pass", [conn("watch", hfrom=["bank.test"], mode=Mode.MONITOR, min_tls_version="TLSv1.3"), conn("wide", hfrom=["*.test"]), conn("all", sender=["*"], on_failure=FailAction.REJECT)], {**BANK, **TLS12}, "monitor-defer", "watch", "below the minimum"),
    ("misconfigured: defers", [conn("bank", hfrom=["bank.test"], on_failure=FailAction.REJECT, problems=("bad",))], {**BANK, **TLS13}, "defer", "bank", "misconfigured"),
]


@pytest.mark.parametrize(("connectors", "session", "verdict", "winner", "reason"),
                         [c[1:] for c in HEADER_FROM_CASES], ids=[c[0] for c in HEADER_FROM_CASES])
def test_header_from_table(connectors: list[InboundConnector], session: dict[str, Any], verdict: str,
                           winner: str | None, reason: str) -> None:
    from tlsgate.decisionlog import verdict_word

    decision = decide_header_from(Snapshot(inbound=tuple(connectors)), facts(**session), NOW)
    assert verdict_word(decision) == verdict
    assert (decision.connector.name if decision.connector else None) == winner
    assert all(c.connector.header_from_domains for c in decision.candidates)
    if reason:
        assert decision.reason is not None and reason in decision.reason


def test_decide_still_lets_the_best_connector_of_all_decide() -> None:
    # What the policy daemon asks: unchanged, the sender connector ranks first.
    snap = Snapshot(inbound=(conn("all", sender=["*"], require_tls=False), conn("bank", hfrom=["bank.test"])))
    decision = decide(snap, facts(**BANK), NOW)
    assert decision.connector is not None and decision.connector.name == "all"
    assert [c.connector.name for c in decision.candidates] == ["all", "bank"]


def _pin(**kw: Any) -> Pin:
    base: dict[str, Any] = dict(
        cert_fingerprints=frozenset({"AA:01"}), pubkey_fingerprints=frozenset({"BB:01"}),
        subject_cn="mail.partner.test", dns_names=("mail.partner.test",), organization="Partner Org",
        units=("Mail",), issuer_cn="Lab Test CA", key_type="RSA", key_bits=2048,
        not_before=NOW - timedelta(days=10), not_after=NOW + timedelta(days=100), label="sha256 AA:01",
    )
    base.update(kw)
    return Pin(**base)


PIN_CASES: list[tuple[str, dict[str, Any], dict[str, Any], str, str]] = [
    ("certificate fingerprint", {}, {"cert_fingerprint": "aa:01"}, "pass", ""),
    ("public-key fingerprint", {}, {"pubkey_fingerprint": "BB:01"}, "pass", ""),
    ("unknown fingerprint", {}, {"cert_fingerprint": "CC:01", "pubkey_fingerprint": "DD:01"}, "defer", "is not registered"),
    ("no certificate", {}, {}, "defer", "no client certificate presented"),
    ("expired", {"pin": {"not_after": NOW - timedelta(days=1)}}, {"cert_fingerprint": "AA:01"}, "defer", "expired on"),
    ("not yet valid", {"pin": {"not_before": NOW + timedelta(days=1)}}, {"cert_fingerprint": "AA:01"}, "defer", "not valid before"),
    ("organization", {"conn": {"require_organization": "Partner Org"}}, {"cert_fingerprint": "AA:01"}, "pass", ""),
    ("organization mismatch", {"conn": {"require_organization": "Other"}}, {"cert_fingerprint": "AA:01"}, "defer", "is not Other"),
    ("unit mismatch", {"conn": {"require_unit": "Sales"}}, {"cert_fingerprint": "AA:01"}, "defer",
     "certificate organizational unit Mail is not Sales"),
    ("unit among several", {"pin": {"units": ("Domain Control Validated", "Mail")}, "conn": {"require_unit": "mail"}},
     {"cert_fingerprint": "AA:01"}, "pass", ""),
    ("unit in none of several", {"pin": {"units": ("Domain Control Validated", "Mail")}, "conn": {"require_unit": "Sales"}},
     {"cert_fingerprint": "AA:01"}, "defer", "certificate organizational units Domain Control Validated, Mail: none is Sales"),
    ("no unit", {"pin": {"units": ()}, "conn": {"require_unit": "Sales"}}, {"cert_fingerprint": "AA:01"}, "defer",
     "certificate organizational unit (none) is not Sales"),
    ("weak RSA key", {"pin": {"key_bits": 1024}}, {"cert_fingerprint": "AA:01"}, "defer", "weaker than 2048"),
    ("EC P-256 meets 2048", {"pin": {"key_type": "EC", "key_bits": 256}}, {"cert_fingerprint": "AA:01"}, "pass", ""),
    ("EC P-256 below 4096", {"pin": {"key_type": "EC", "key_bits": 256}, "conn": {"min_key_bits": 4096}}, {"cert_fingerprint": "AA:01"}, "defer", "weaker"),
    ("name vs SAN", {"conn": {"names": ["*.partner.test"]}}, {"cert_fingerprint": "AA:01"}, "pass", ""),
    ("name mismatch", {"conn": {"names": ["mail.other.test"]}}, {"cert_fingerprint": "AA:01"}, "defer", "does not match mail.other.test"),
    ("issuer", {"conn": {"issuers": ["Lab*"]}}, {"cert_fingerprint": "AA:01"}, "pass", ""),
]


@pytest.mark.parametrize(("setup", "session", "verdict", "reason"), [c[1:] for c in PIN_CASES],
                         ids=[c[0] for c in PIN_CASES])
def test_pinned(setup: dict[str, Any], session: dict[str, Any], verdict: str, reason: str) -> None:
    from tlsgate.decisionlog import verdict_word

    c = conn("p", sender=["partner.test"], certificate=CertRequirement.PINNED,
             pins=(_pin(**setup.get("pin", {})),), **setup.get("conn", {}))
    d = decide(Snapshot(inbound=(c,)), facts(sender="a@partner.test", **TLS13, **session), NOW)
    assert verdict_word(d) == verdict
    if reason:
        assert d.reason is not None and reason in d.reason


def test_renewal_with_same_key_passes_when_old_pin_expired() -> None:
    old = _pin(cert_fingerprints=frozenset({"AA:01"}), not_after=NOW - timedelta(days=1))
    new = _pin(cert_fingerprints=frozenset({"AA:02"}))
    c = conn("p", sender=["partner.test"], certificate=CertRequirement.PINNED, pins=(old, new))
    d = decide(Snapshot(inbound=(c,)), facts(sender="a@partner.test", pubkey_fingerprint="BB:01", **TLS13), NOW)
    assert d.outcome is Outcome.PASS


@pytest.mark.parametrize(("name", "key"), [("TLSv1", (1, 0)), ("TLSv1.3", (1, 3)), ("SSLv3", (0, 3)), ("bogus", None)])
def test_version_key(name: str, key: tuple[int, int] | None) -> None:
    assert version_key(name) == key


@pytest.mark.parametrize(("protocol", "cipher", "fs"), [
    ("TLSv1.3", "TLS_AES_128_GCM_SHA256", True),
    ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", True),
    ("TLSv1.2", "DHE-RSA-AES256-GCM-SHA384", True),
    ("TLSv1.2", "AES128-SHA", False),
    ("TLSv1.2", None, False),
])
def test_forward_secrecy(protocol: str, cipher: str | None, fs: bool) -> None:
    assert has_forward_secrecy(protocol, cipher) is fs


def test_decision_cost_does_not_grow_with_connectors() -> None:
    """100,000 connectors: the matching work is index probes, so the candidate set stays tiny."""
    many = tuple(conn(f"c{i}", sender=[f"d{i}.example"], ranges=[f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}/32"])
                 for i in range(100_000))
    snap = Snapshot(inbound=many)
    cands = find_candidates(snap, facts(sender="a@d99999.example", client_address="10.1.134.159"))
    assert [c.connector.name for c in cands] == ["c99999"]


def _lookups(snap: Snapshot) -> list[object]:
    return index_answers(snap, ("contoso.com", "mail.contoso.com", "fabrikam.com", "other.org"),
                         ("192.0.2.7", "198.51.100.9", "2001:db8::1"))


BASE = (
    conn("a", sender=["contoso.com"], require_tls=True),
    conn("b", sender=["*.contoso.com"], rcpt=["fabrikam.com"], ranges=["192.0.2.0/24"]),
    conn("c", ranges=["198.51.100.0/24", "2001:db8::/32"]),
    conn("d", sender=["fabrikam.com"], ranges=["192.0.2.0/25"], restrict_to_ranges=True),
)

# Each variant changes one connector: settings only (the indexes are shared), or what is indexed
# (they are rebuilt, and must answer as a snapshot built from scratch does).
INDEX_VARIANTS: list[tuple[str, tuple[InboundConnector, ...], bool]] = [
    ("same objects", BASE, True),
    ("settings only", (replace(BASE[0], require_tls=False, min_key_bits=4096), *BASE[1:]), True),
    ("an equal copy", (replace(BASE[0]), *BASE[1:]), True),
    ("sender domain changed", (conn("a", sender=["other.org"], require_tls=True), *BASE[1:]), False),
    ("disabled", (replace(BASE[0], enabled=False), *BASE[1:]), False),
    ("range changed", (*BASE[:2], conn("c", ranges=["198.51.100.0/25"]), BASE[3]), False),
    ("ranges stop restricting", (*BASE[:3], replace(BASE[3], restrict_to_ranges=False)), False),
    ("connector added", (*BASE, conn("e", sender=["contoso.com"])), False),
    ("connector removed", BASE[1:], False),
    ("order changed", (BASE[1], BASE[0], *BASE[2:]), False),
]


@pytest.mark.parametrize(("connectors", "shared"), [v[1:] for v in INDEX_VARIANTS], ids=[v[0] for v in INDEX_VARIANTS])
def test_a_snapshot_shares_the_previous_indexes_only_when_they_come_out_the_same(
        connectors: tuple[InboundConnector, ...], shared: bool) -> None:
    previous = Snapshot(inbound=BASE)
    snap = Snapshot(inbound=connectors, previous=previous)
    assert (snap.domains is previous.domains and snap.ranges is previous.ranges) is shared
    assert _lookups(snap) == _lookups(Snapshot(inbound=connectors))
    assert snap.by_name == {c.name: c for c in connectors}
    assert snap == Snapshot(inbound=connectors, loaded_at=snap.loaded_at)  # indexes are not compared


def test_a_header_from_connector_meets_a_recipient_routed_on() -> None:
    """At end of message the milter judges header-From connectors per recipient: one routed on
    from a local domain is judged where it goes too."""
    from tlsgate.engine import decide_header_from

    snap = Snapshot(inbound=(conn("bank", hfrom=["bank.test"], rcpt=["example.org"], on_failure=FailAction.REJECT),))
    at = {"header_from": "ceo@bank.test", "stage": Stage.DATA}
    assert decide_header_from(snap, facts(recipient="bob@example.org", **at), NOW).status == "5.7.10"
    for routed in ("bob@example.org@localhost", "example.org!bob@localhost"):
        d = decide_header_from(snap, facts(recipient=routed, **at), NOW)
        assert (d.action, d.status, d.connector and d.connector.name) == (FailAction.DEFER, "4.1.3", "bank"), routed
