"""Certificates made in memory for the certificate tests: any key, names, validity and
issuer, including keys tlsgate refuses (DSA, X25519), which tests/support/pki.py does not make."""

from __future__ import annotations

import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)

_KEYS: dict[tuple[str, int], Any] = {}


def key(kind: str = "rsa", size: int = 2048, *, fresh: bool = False) -> Any:
    """A private key; cached per kind and size unless ``fresh`` (RSA 4096 is slow to make)."""
    if not fresh and (kind, size) in _KEYS:
        return _KEYS[(kind, size)]
    if kind == "rsa":
        made: Any = rsa.generate_private_key(public_exponent=65537, key_size=size)
    else:
        made = ec.generate_private_key({256: ec.SECP256R1(), 384: ec.SECP384R1()}[size])
    if not fresh:
        _KEYS[(kind, size)] = made
    return made


def name(cn: str | None, o: str | None = None, ou: str | tuple[str, ...] | None = None) -> x509.Name:
    """A subject name; ``ou`` may be several units, one attribute each, in that order."""
    attrs = []
    if o is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, o))
    for unit in (ou,) if isinstance(ou, str) else ou or ():
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def make(
    cn: str | None = "mail.partner.test",
    *,
    o: str | None = "Partner Org",
    ou: str | tuple[str, ...] | None = "Mail",
    private_key: Any = None,
    public_key: Any = None,
    san: tuple[str, ...] = (),
    issuer: tuple[x509.Certificate, Any] | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    ca: bool = False,
) -> tuple[x509.Certificate, Any]:
    """(certificate, private key); self-signed unless ``issuer`` = (certificate, key).
    ``public_key`` puts a key in the certificate that did not sign it (X25519, say)."""
    priv = private_key if private_key is not None else key()
    subject = name(cn, o, ou)
    issuer_name, signer = (subject, priv) if issuer is None else (issuer[0].subject, issuer[1])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key if public_key is not None else priv.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 90 * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False
        )
    return builder.sign(signer, hashes.SHA256()), priv


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def key_pem(private_key: Any, password: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return bytes(private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))


def key_der(private_key: Any) -> bytes:
    return bytes(
        private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
