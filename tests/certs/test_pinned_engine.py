"""Pinned-connector decisions, table-driven, with real generated certificates registered
by plain SQL (connector and PEM only: everything else is derived at load time) and the
fingerprints a client presenting each certificate would make Postfix send."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from sqlalchemy import text

from tests.certs import certgen
from tlsgate.certs import fingerprint, pubkey_fingerprint
from tlsgate.engine import decide
from tlsgate.model import FailAction, Outcome, SessionFacts
from tlsgate.store import init_schema, load, open_engine

NOW = certgen.NOW
DAY = certgen.DAY


@dataclass
class World:
    """Every certificate the table refers to, by name."""

    certs: dict[str, x509.Certificate] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world() -> World:
    w = World()
    partner_key = certgen.key("rsa", 2048, fresh=True)
    root = certgen.make("Partner Root CA", o="Partner Org", ou=None, private_key=certgen.key("rsa", 2048, fresh=True), ca=True)
    w.certs["partner"], _ = certgen.make(private_key=partner_key, san=("mail.partner.test",), issuer=root)
    w.certs["root"] = root[0]
    inter = certgen.make("Partner Issuing CA", o="Partner Org", ou=None, issuer=root, private_key=certgen.key("ec", 384), ca=True)
    w.certs["inter"] = inter[0]
    w.certs["deep"], _ = certgen.make(issuer=inter)
    # Same key, later dates: a renewal the administrator has not registered.
    w.certs["renewed"], _ = certgen.make(private_key=partner_key, san=("mail.partner.test",), issuer=root,
                                         not_after=NOW + 400 * DAY)
    w.certs["impostor"], _ = certgen.make(private_key=certgen.key("rsa", 2048, fresh=True), san=("mail.partner.test",))
    w.certs["expired"], _ = certgen.make(not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    w.certs["future"], _ = certgen.make(not_before=NOW + DAY, not_after=NOW + 400 * DAY)
    w.certs["other-org"], _ = certgen.make(o="Other Org", ou="Mail")
    w.certs["other-unit"], _ = certgen.make(o="Partner Org", ou="Sales")
    w.certs["two-units"], _ = certgen.make(o="Partner Org", ou=("Domain Control Validated", "Mail"))
    w.certs["rsa1024"], _ = certgen.make(private_key=certgen.key("rsa", 1024))
    w.certs["rsa4096"], _ = certgen.make(private_key=certgen.key("rsa", 4096))
    w.certs["p256"], _ = certgen.make(private_key=certgen.key("ec", 256))
    w.certs["p384"], _ = certgen.make(private_key=certgen.key("ec", 384))
    w.certs["san-only"], _ = certgen.make(cn=None, san=("relay.partner.test",))
    # An expired certificate whose key lives on in a registered renewal.
    rollover_key = certgen.key("ec", 256, fresh=True)
    w.certs["old-expired"], _ = certgen.make(private_key=rollover_key, not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    w.certs["old-renewed"], _ = certgen.make(private_key=rollover_key, not_after=NOW + 300 * DAY)
    w.certs["new-ca-cert"], _ = certgen.make(private_key=certgen.key("ec", 384, fresh=True),
                                             issuer=certgen.make("New Partner CA", o="Partner Org", ou=None, ca=True))
    return w


# name, connector settings, registered (cert names, with "+root" to store the chain),
# presented cert, digest Postfix uses, expected outcome, reason fragment
CASES: list[tuple[str, dict[str, Any], tuple[str, ...], str | None, str, str, str]] = [
    ("exact certificate", {}, ("partner",), "partner", "sha256", "pass", ""),
    ("md5 digest (older Postfix)", {}, ("partner",), "partner", "md5", "pass", ""),
    ("sha1 digest", {}, ("partner",), "partner", "sha1", "pass", ""),
    ("sha512 digest", {}, ("partner",), "partner", "sha512", "pass", ""),
    ("renewal with the same key", {}, ("partner",), "renewed", "sha256", "pass", ""),
    ("same CN, different key", {}, ("partner",), "impostor", "sha256", "fail", "is not registered with connector partner"),
    ("no certificate", {}, ("partner",), None, "sha256", "fail", "no client certificate presented"),
    ("no registered certificate", {}, (), "partner", "sha256", "fail", "is not registered"),
    ("expired pin", {}, ("expired",), "expired", "sha256", "fail", "expired on"),
    ("not yet valid pin", {}, ("future",), "future", "sha256", "fail", "is not valid before"),
    ("organization matches", {"require_organization": "partner org"}, ("partner",), "partner", "sha256", "pass", ""),
    ("organization mismatch", {"require_organization": "Partner Org"}, ("other-org",), "other-org", "sha256", "fail",
     "organization Other Org is not Partner Org"),
    ("unit mismatch", {"require_unit": "Mail"}, ("other-unit",), "other-unit", "sha256", "fail",
     "organizational unit Sales is not Mail"),
    ("unit second of two", {"require_unit": "Mail"}, ("two-units",), "two-units", "sha256", "pass", ""),
    ("unit in neither of two", {"require_unit": "Sales"}, ("two-units",), "two-units", "sha256", "fail",
     "organizational units Domain Control Validated, Mail: none is Sales"),
    ("RSA 1024 below the default", {}, ("rsa1024",), "rsa1024", "sha256", "fail", "RSA 1024 bits is weaker than 2048"),
    ("RSA 1024 allowed explicitly", {"min_key_bits": 1024}, ("rsa1024",), "rsa1024", "sha256", "pass", ""),
    ("RSA 2048 below 4096", {"min_key_bits": 4096}, ("partner",), "partner", "sha256", "fail", "weaker than 4096"),
    ("RSA 4096 meets 4096", {"min_key_bits": 4096}, ("rsa4096",), "rsa4096", "sha256", "pass", ""),
    ("P-256 meets 3072", {"min_key_bits": 3072}, ("p256",), "p256", "sha256", "pass", ""),
    ("P-256 below 4096", {"min_key_bits": 4096}, ("p256",), "p256", "sha256", "fail", "EC 256 bits (about RSA 3072) is weaker"),
    ("P-384 meets 4096", {"min_key_bits": 4096}, ("p384",), "p384", "sha256", "pass", ""),
    ("name matches the CN", {"names": ("mail.partner.test",)}, ("partner",), "partner", "sha256", "pass", ""),
    ("name matches a DNS SAN", {"names": ("*.partner.test",)}, ("san-only",), "san-only", "sha256", "pass", ""),
    ("name mismatch", {"names": ("mx.other.test",)}, ("partner",), "partner", "sha256", "fail", "does not match mx.other.test"),
    ("issuer matches", {"issuers": ("Partner Root CA",)}, ("partner",), "partner", "sha256", "pass", ""),
    ("root of the registered chain", {"issuers": ("Partner Root*",)}, ("deep+chain",), "deep", "sha256", "pass", ""),
    ("root unknown without the chain", {"issuers": ("Partner Root*",)}, ("deep",), "deep", "sha256", "fail",
     "issuer Partner Issuing CA does not match Partner Root*"),
    ("unrelated certificate in the file is no root", {"issuers": ("Partner Root*",)}, ("new-ca-cert+root",),
     "new-ca-cert", "sha256", "fail", "does not match"),
    ("issuer mismatch", {"issuers": ("Some Other CA",)}, ("partner",), "partner", "sha256", "fail", "does not match Some Other CA"),
    ("rollover: old certificate", {}, ("partner", "p384"), "partner", "sha256", "pass", ""),
    ("rollover: new certificate", {}, ("partner", "p384"), "p384", "sha256", "pass", ""),
    ("expired certificate refused although its key was renewed", {}, ("old-expired", "old-renewed"), "old-expired",
     "sha256", "fail", "expired on"),
    ("renewed certificate of that key", {}, ("old-expired", "old-renewed"), "old-renewed", "sha256", "pass", ""),
]


def _register(engine: Any, connector: str, settings: dict[str, Any], pems: list[bytes]) -> None:
    columns = {k: v for k, v in settings.items() if k in ("require_organization", "require_unit", "min_key_bits")}
    with engine.begin() as conn:
        names = ", ".join(["name", "certificate", "on_failure", *columns])
        marks = ", ".join([":name", "'pinned'", "'reject'", *(f":{k}" for k in columns)])
        conn.execute(text(f"INSERT INTO inbound_connector ({names}) VALUES ({marks})"), {"name": connector, **columns})
        conn.execute(text("INSERT INTO inbound_domain VALUES (:c, 'sender', 'partner.test')"), {"c": connector})
        for pattern in settings.get("names", ()):
            conn.execute(text("INSERT INTO inbound_cert_name VALUES (:c, 'subject', :p)"), {"c": connector, "p": pattern})
        for pattern in settings.get("issuers", ()):
            conn.execute(text("INSERT INTO inbound_cert_name VALUES (:c, 'issuer', :p)"), {"c": connector, "p": pattern})
        for pem in pems:
            conn.execute(text("INSERT INTO inbound_certificate (connector, pem) VALUES (:c, :p)"),
                         {"c": connector, "p": pem.decode()})


@pytest.mark.parametrize(("name", "settings", "registered", "presented", "digest", "outcome", "reason"), CASES,
                         ids=[c[0] for c in CASES])
def test_pinned_decision(world: World, tmp_path: Any, name: str, settings: dict[str, Any], registered: tuple[str, ...],
                         presented: str | None, digest: str, outcome: str, reason: str) -> None:
    engine = open_engine(f"sqlite:///{tmp_path}/rules.sqlite")
    init_schema(engine)
    pems = []
    for reg in registered:
        cert_name, _, extra = reg.partition("+")
        above = {"root": ["root"], "chain": ["inter", "root"]}.get(extra, [])
        chain = [world.certs[n] for n in (cert_name, *above)]
        pems.append(certgen.pem(*chain))
    _register(engine, "partner", settings, pems)
    snap = load(engine, now=NOW).snapshot
    cert = world.certs[presented] if presented else None
    facts = SessionFacts(
        client_address=ipaddress.ip_address("192.0.2.7"),
        sender="alice@partner.test",
        recipient="bob@example.org",
        tls_protocol="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        tls_cipher_bits=256,
        cert_fingerprint=fingerprint(cert, digest) if cert else None,
        pubkey_fingerprint=pubkey_fingerprint(cert, digest) if cert else None,
    )
    decision = decide(snap, facts, NOW)
    assert decision.connector is not None and decision.connector.name == "partner"
    assert decision.outcome.value == outcome, decision.reason
    if outcome == "pass":
        assert decision.action is None
    else:
        assert decision.outcome is Outcome.FAIL
        assert decision.action is FailAction.REJECT
        assert decision.status == "5.7.1"
        assert reason in (decision.reason or "")
    engine.dispose()
