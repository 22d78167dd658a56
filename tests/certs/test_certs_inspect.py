"""What `describe` and `pin_from_pem` read from generated certificates: key type and size
(RSA 1024/2048/4096, EC P-256/P-384), names, self-signed or issued, validity state, the
signature algorithm, the root of a chain and the derived SQL columns."""

from __future__ import annotations

import pytest

from tests.certs import certgen
from tlsgate.certs import Derived, chain_path, describe, load_certificates, pin_from_pem
from tlsgate.engine import rsa_equivalent_bits

NOW = certgen.NOW


@pytest.mark.parametrize(
    ("kind", "size", "key_type", "curve", "signature"),
    [
        ("rsa", 1024, "RSA", None, "sha256WithRSAEncryption"),
        ("rsa", 2048, "RSA", None, "sha256WithRSAEncryption"),
        ("rsa", 4096, "RSA", None, "sha256WithRSAEncryption"),
        ("ec", 256, "EC", "secp256r1", "ecdsa-with-SHA256"),
        ("ec", 384, "EC", "secp384r1", "ecdsa-with-SHA256"),
    ],
)
def test_key_types_and_sizes(kind: str, size: int, key_type: str, curve: str | None, signature: str) -> None:
    cert, _ = certgen.make(private_key=certgen.key(kind, size))
    info = describe(cert, NOW)
    assert (info["key_type"], info["key_bits"], info["curve"]) == (key_type, size, curve)
    assert info["signature_algorithm"] == signature
    pin = pin_from_pem(certgen.pem(cert))
    assert (pin.key_type, pin.key_bits) == (key_type, size)


@pytest.mark.parametrize(
    ("key_type", "bits", "rsa_bits"),
    [("RSA", 1024, 1024), ("RSA", 4096, 4096), ("EC", 256, 3072), ("EC", 384, 7680), ("EC", 521, 15360),
     ("Ed25519", 256, 3072), ("DSA", 3072, 0)],
)
def test_rsa_equivalent_strength(key_type: str, bits: int, rsa_bits: int) -> None:
    assert rsa_equivalent_bits(key_type, bits) == rsa_bits


def test_self_signed_names_and_sans() -> None:
    cert, _ = certgen.make("mail.partner.test", o="Partner Org", ou="Mail", san=("mail.partner.test", "mx2.partner.test"))
    info = describe(cert, NOW)
    assert info["self_issued"] is True
    assert info["common_name"] == "mail.partner.test"
    assert info["organization"] == "Partner Org"
    assert info["organizational_units"] == ["Mail"]
    assert info["dns_names"] == ["mail.partner.test", "mx2.partner.test"]
    assert info["subject"] == "CN=mail.partner.test,OU=Mail,O=Partner Org"
    assert info["issuer"] == info["subject"]
    assert {a["name"] for a in info["subject_attributes"]} == {"CN", "O", "OU"}


@pytest.mark.parametrize(("o", "ou", "units"), [
    ("Partner Org", "Mail", ("Mail",)),
    ("Other Org", ("Domain Control Validated", "Sales"), ("Domain Control Validated", "Sales")),
    (None, None, ()),
])
def test_organization_and_units(o: str | None, ou: str | tuple[str, ...] | None, units: tuple[str, ...]) -> None:
    cert, _ = certgen.make(o=o, ou=ou)
    pin = pin_from_pem(certgen.pem(cert))
    assert (pin.organization, pin.units) == (o, units)
    assert Derived.of(cert).unit == (", ".join(units) or None)


@pytest.mark.parametrize(
    ("not_before", "not_after", "state"),
    [
        (NOW - 10 * certgen.DAY, NOW + 10 * certgen.DAY, "valid"),
        (NOW - 100 * certgen.DAY, NOW - 1 * certgen.DAY, "expired"),
        (NOW + 1 * certgen.DAY, NOW + 100 * certgen.DAY, "not yet valid"),
    ],
)
def test_validity(not_before, not_after, state: str) -> None:
    cert, _ = certgen.make(not_before=not_before, not_after=not_after)
    info = describe(cert, NOW)
    assert info["validity"] == state
    assert info["not_after"] == not_after.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_chain_root_and_issuers() -> None:
    root = certgen.make("Partner Root CA", o="Partner Org", ou=None, private_key=certgen.key("rsa", 2048, fresh=True), ca=True)
    inter = certgen.make("Partner Issuing CA", o="Partner Org", ou=None, issuer=root, private_key=certgen.key("ec", 384), ca=True)
    leaf, _ = certgen.make(issuer=inter)
    # Given out of order: the path is still found by issuer name.
    certs = load_certificates(certgen.pem(leaf, root[0], inter[0]))
    path, rooted = chain_path(certs)
    assert [c.subject for c in path] == [leaf.subject, inter[0].subject, root[0].subject]
    assert rooted
    pin = pin_from_pem(certgen.pem(leaf, inter[0], root[0]))
    assert pin.issuer_cn == "Partner Issuing CA"
    assert pin.chain_issuers == ("Partner Issuing CA", "Partner Root CA")
    # Leaf only: the root is unknown, only the issuer's name is.
    path, rooted = chain_path([leaf])
    assert not rooted and path == [leaf]
    assert pin_from_pem(certgen.pem(leaf)).chain_issuers == ("Partner Issuing CA",)


def test_derived_columns_are_naive_utc() -> None:
    cert, _ = certgen.make(o="Partner Org", ou="Mail")
    d = Derived.of(cert)
    assert d.not_after.tzinfo is None
    assert d.not_after == cert.not_valid_after_utc.replace(tzinfo=None)
    assert (d.subject_cn, d.organization, d.unit, d.key_type, d.key_bits) == (
        "mail.partner.test", "Partner Org", "Mail", "RSA", 2048,
    )
    assert len(d.cert_sha256) == 95 and len(d.pubkey_sha256) == 95
