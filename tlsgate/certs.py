"""Reading partner certificates with ``cryptography``: names, key, validity, fingerprints.

Fingerprints are computed exactly as Postfix prints ``ccert_fingerprint`` (digest of the DER
certificate) and ``ccert_pubkey_fingerprint`` (digest of the DER SubjectPublicKeyInfo):
uppercase hex bytes joined by colons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from tlsgate.model import Pin

DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha1": hashes.SHA1,
    "md5": hashes.MD5,
}

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL
)


class CertificateError(ValueError):
    """Input that is not a usable certificate; the message says what is wrong."""


def colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02X}" for b in data)


def fingerprint(cert: x509.Certificate, digest: str = "sha256") -> str:
    h = hashes.Hash(DIGESTS[digest]())
    h.update(cert.public_bytes(serialization.Encoding.DER))
    return colon_hex(h.finalize())


def pubkey_fingerprint(cert: x509.Certificate, digest: str = "sha256") -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    h = hashes.Hash(DIGESTS[digest]())
    h.update(spki)
    return colon_hex(h.finalize())


def _name_attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    if not values:
        return None
    value = values[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def key_info(cert: x509.Certificate) -> tuple[str, int]:
    """Key type (RSA, EC, DSA, Ed25519, Ed448) and size in bits."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return ("RSA", key.key_size)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ("EC", key.curve.key_size)
    if isinstance(key, dsa.DSAPublicKey):
        return ("DSA", key.key_size)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ("Ed25519", 256)
    if isinstance(key, ed448.Ed448PublicKey):
        return ("Ed448", 456)
    raise CertificateError(f"unsupported key type {type(key).__name__}")


def dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.value.get_values_for_type(x509.DNSName))


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in PEM or DER ``data``; CertificateError when there is none or a
    PEM block is not a certificate (a private key, say)."""
    stripped = data.strip()
    if not stripped:
        raise CertificateError("empty input")
    if b"-----BEGIN" not in stripped:
        try:
            return [x509.load_der_x509_certificate(stripped)]
        except ValueError as exc:
            raise CertificateError(f"neither PEM nor a DER certificate: {exc}") from None
    blocks = list(_PEM_BLOCK.finditer(stripped))
    if not blocks:
        raise CertificateError("a PEM header without a matching footer")
    certs = []
    for n, block in enumerate(blocks, 1):
        kind = block.group(1).decode()
        if kind != "CERTIFICATE":
            raise CertificateError(f"PEM block {n} is a {kind}, not a CERTIFICATE")
        try:
            certs.append(x509.load_pem_x509_certificate(block.group(0)))
        except ValueError as exc:
            raise CertificateError(f"PEM block {n} is not a valid certificate: {exc}") from None
    return certs


def pin_from_certificate(cert: x509.Certificate) -> Pin:
    key_type, key_bits = key_info(cert)
    sha256 = fingerprint(cert, "sha256")
    return Pin(
        cert_fingerprints=frozenset(fingerprint(cert, d) for d in DIGESTS),
        pubkey_fingerprints=frozenset(pubkey_fingerprint(cert, d) for d in DIGESTS),
        subject_cn=_name_attr(cert.subject, NameOID.COMMON_NAME),
        dns_names=dns_names(cert),
        organization=_name_attr(cert.subject, NameOID.ORGANIZATION_NAME),
        unit=_name_attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
        issuer_cn=_name_attr(cert.issuer, NameOID.COMMON_NAME)
        or _name_attr(cert.issuer, NameOID.ORGANIZATION_NAME),
        key_type=key_type,
        key_bits=key_bits,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        label="sha256 " + sha256[:11],
    )


def pin_from_pem(pem: str | bytes) -> Pin:
    """The pin for the first (leaf) certificate of a PEM text."""
    data = pem.encode() if isinstance(pem, str) else pem
    return pin_from_certificate(load_certificates(data)[0])


@dataclass(frozen=True, slots=True)
class Derived:
    """The columns of ``inbound_certificate`` that are derived from its PEM."""

    cert_sha256: str
    pubkey_sha256: str
    subject_cn: str | None
    organization: str | None
    unit: str | None
    issuer_cn: str | None
    key_type: str
    key_bits: int
    not_before: datetime
    not_after: datetime
