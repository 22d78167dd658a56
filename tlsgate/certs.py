"""Reading partner certificates with ``cryptography``: names, key, validity, fingerprints.

Fingerprints are computed exactly as Postfix prints ``ccert_fingerprint`` (digest of the DER
certificate) and ``ccert_pubkey_fingerprint`` (digest of the DER SubjectPublicKeyInfo):
uppercase hex bytes joined by colons. Input is read strictly: a file is either one DER
certificate or PEM ``CERTIFICATE`` blocks separated by nothing but white space, and anything
else (a private key, a request, text between blocks, an unsupported key) is a
:class:`CertificateError` that says what is wrong, so nothing half-understood is ever stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from tlsgate.model import Pin

# The digests smtpd_tls_fingerprint_digest may name (any OpenSSL digest; these are the ones in
# use): a pin holds its fingerprints in each, so that whichever Postfix is set to is recognised.
DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha1": hashes.SHA1,
    "md5": hashes.MD5,
    "sha224": hashes.SHA224,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

# A certificate chain is a few KiB; anything much larger is not what the administrator meant.
MAX_INPUT_BYTES = 1024 * 1024
MAX_CERTIFICATES = 16

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END ([A-Z0-9 ]+)-----", re.DOTALL
)

# Short names for subject attributes, as OpenSSL and RFC 4514 print them.
_ATTR_NAMES = {
    NameOID.COMMON_NAME: "CN",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COUNTRY_NAME: "C",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.LOCALITY_NAME: "L",
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.DOMAIN_COMPONENT: "DC",
}


class CertificateError(ValueError):
    """Input that is not a usable certificate; the message says what is wrong."""


def colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02X}" for b in data)


def _digest(data: bytes, digest: str) -> str:
    if digest not in DIGESTS:
        raise ValueError(f"unknown digest {digest!r}: use {', '.join(DIGESTS)}")
    h = hashes.Hash(DIGESTS[digest]())
    h.update(data)
    return colon_hex(h.finalize())


def fingerprint(cert: x509.Certificate, digest: str = "sha256") -> str:
    """Postfix's ``ccert_fingerprint``: the digest of the DER certificate."""
    return _digest(cert.public_bytes(serialization.Encoding.DER), digest)


def pubkey_fingerprint(cert: x509.Certificate, digest: str = "sha256") -> str:
    """Postfix's ``ccert_pubkey_fingerprint``: the digest of the DER SubjectPublicKeyInfo."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _digest(spki, digest)


def normalise_fingerprint(text: str) -> str:
    """``ab:cd...``, ``ABCD...`` or ``AB CD ...`` in Postfix's form ``AB:CD:...``; the
    empty string when ``text`` is not hex bytes."""
    raw = re.sub(r"[\s:]", "", text).upper()
    if not raw or len(raw) % 2 or not re.fullmatch(r"[0-9A-F]+", raw):
        return ""
    return ":".join(raw[i : i + 2] for i in range(0, len(raw), 2))


def _name_attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = _name_attrs(name, oid)
    return values[0] if values else None


def _name_attrs(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    out = []
    for attr in name.get_attributes_for_oid(oid):
        value = attr.value
        out.append(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return tuple(out)


def display_name(name: x509.Name) -> str:
    """The CN of a name, or its O when it has no CN, as Postfix names an issuer."""
    return _name_attr(name, NameOID.COMMON_NAME) or _name_attr(name, NameOID.ORGANIZATION_NAME) or (
        name.rfc4514_string() or "(empty name)"
    )


def key_info(cert: x509.Certificate) -> tuple[str, int]:
    """Key type (RSA, EC, Ed25519, Ed448) and size in bits; CertificateError for any other.

    DSA is refused: TLS 1.3 has no DSA and OpenSSL 3 gives it no strength rating we could
    compare with RSA; X25519/X448 are key-agreement keys that cannot sign a TLS handshake.
    """
    try:
        key = cert.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise CertificateError(f"unsupported public key algorithm: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return ("RSA", key.key_size)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ("EC", key.curve.key_size)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ("Ed25519", 256)
    if isinstance(key, ed448.Ed448PublicKey):
        return ("Ed448", 448)
    kind = type(key).__name__.removeprefix("_").replace("PublicKey", "") or "unknown"
    raise CertificateError(f"unsupported key type {kind}: use RSA, EC, Ed25519 or Ed448")


def curve_name(cert: x509.Certificate) -> str | None:
    key = cert.public_key()
    return key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else None


def signature_algorithm(cert: x509.Certificate) -> str:
    oid = cert.signature_algorithm_oid
    name = oid._name
    return name if name and name != "Unknown OID" else oid.dotted_string


def dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.value.get_values_for_type(x509.DNSName))


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _junk_error(data: bytes, start: int, end: int) -> CertificateError | None:
    """An error when ``data[start:end]`` (the text between PEM blocks) is not white space."""
    gap = data[start:end]
    if not gap.strip():
        return None
    skip = len(gap) - len(gap.lstrip())
    offset = start + skip
    snippet = gap.strip().splitlines()[0][:40].decode("utf-8", "replace")
    if b"-----BEGIN" in gap:
        return CertificateError(f"line {_line_of(data, offset)}: a PEM block without its END line")
    return CertificateError(
        f"line {_line_of(data, offset)}: unexpected text {snippet!r} outside the PEM blocks "
        "(keep only the -----BEGIN/END CERTIFICATE----- blocks)"
    )


def _looks_like_der_key(data: bytes) -> bool:
    try:
        serialization.load_der_private_key(data, password=None)
    except TypeError:
        return True  # an encrypted private key: it parsed far enough to ask for a password
    except (ValueError, UnsupportedAlgorithm):
        return False
    return True


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in PEM or DER ``data``, leaf first as given; CertificateError when
    there is none, when anything but white space lies between PEM blocks, when a block is not
    a certificate (a private key, say), or when a key type is not supported."""
    if len(data) > MAX_INPUT_BYTES:
        raise CertificateError(f"input is larger than {MAX_INPUT_BYTES} bytes")
    if not data.strip():
        raise CertificateError("empty input")
    if b"-----BEGIN" not in data and b"-----END" not in data:
        certs = [_load_der(data)]
    else:
        certs = _load_pem(data)
    for n, cert in enumerate(certs, 1):
        try:
            key_info(cert)
        except CertificateError as exc:
            where = "the certificate" if len(certs) == 1 else f"certificate {n}"
            raise CertificateError(f"{where} ({display_name(cert.subject)}): {exc}") from None
    return certs


def _load_der(data: bytes) -> x509.Certificate:
    # DER is binary: its last bytes may well be 0x0A or 0x20, so it is never stripped.
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        if _looks_like_der_key(data):
            raise CertificateError(
                "this is a private key, not a certificate: give the certificate only"
            ) from None
        raise CertificateError(f"neither PEM nor a DER certificate ({exc})") from None


def _load_pem(data: bytes) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    position = 0
    for n, block in enumerate(_PEM_BLOCK.finditer(data), 1):
        junk = _junk_error(data, position, block.start())
        if junk is not None:
            raise junk
        position = block.end()
        kind, end_kind = block.group(1).decode(), block.group(3).decode()
        line = _line_of(data, block.start())
        if b"-----BEGIN" in block.group(2):
            raise CertificateError(f"PEM block {n} (line {line}) has no END line")
        if kind != end_kind:
            raise CertificateError(f"PEM block {n} (line {line}) begins with {kind} but ends with {end_kind}")
        if "PRIVATE KEY" in kind:
            raise CertificateError(
                f"PEM block {n} (line {line}) is a private key ({kind}), not a certificate: "
                "give the certificate only and keep the key secret"
            )
        if kind != "CERTIFICATE":
            raise CertificateError(f"PEM block {n} (line {line}) is a {kind}, not a CERTIFICATE")
        if len(certs) >= MAX_CERTIFICATES:
            raise CertificateError(f"more than {MAX_CERTIFICATES} certificates")
        try:
            certs.append(x509.load_pem_x509_certificate(block.group(0)))
        except ValueError as exc:
            raise CertificateError(f"PEM block {n} (line {line}) is not a valid certificate: {exc}") from None
    junk = _junk_error(data, position, len(data))
    if junk is not None:
        raise junk
    if not certs:
        raise CertificateError("no PEM block found")
    return certs


def chain_path(certs: list[x509.Certificate]) -> tuple[list[x509.Certificate], bool]:
    """The path from the leaf (the first certificate) up through the given certificates by
    issuer name, and whether it ends in a self-issued root."""
    path = [certs[0]]
    while True:
        current = path[-1]
        if current.issuer == current.subject:
            return path, True
        parent = next(
            (c for c in certs if c.subject == current.issuer and all(c is not p for p in path)), None
        )
        if parent is None:
            return path, False
        path.append(parent)


def validity_state(cert: x509.Certificate, now: datetime) -> str:
    if now > cert.not_valid_after_utc:
        return "expired"
    if now < cert.not_valid_before_utc:
        return "not yet valid"
    return "valid"


def describe(cert: x509.Certificate, now: datetime) -> dict[str, Any]:
    """Everything ``tlsgate cert inspect`` shows about one certificate, JSON-ready.

    Fingerprints are given for every digest Postfix may be configured with.
    """
    key_type, key_bits = key_info(cert)
    subject = cert.subject
    attributes = [
        {"name": _ATTR_NAMES.get(attr.oid, attr.oid.dotted_string), "value": _name_attrs(x509.Name([attr]), attr.oid)[0]}
        for attr in subject
    ]
    return {
        "subject": subject.rfc4514_string(),
        "subject_attributes": attributes,
        "common_name": _name_attr(subject, NameOID.COMMON_NAME),
        "organization": _name_attr(subject, NameOID.ORGANIZATION_NAME),
        "organizational_units": list(_name_attrs(subject, NameOID.ORGANIZATIONAL_UNIT_NAME)),
        "dns_names": list(dns_names(cert)),
        "issuer": cert.issuer.rfc4514_string(),
        "issuer_name": display_name(cert.issuer),
        "self_issued": cert.issuer == subject,
        "serial": format(cert.serial_number, "X"),
        "key_type": key_type,
        "key_bits": key_bits,
        "curve": curve_name(cert),
        "signature_algorithm": signature_algorithm(cert),
        "not_before": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "validity": validity_state(cert, now),
        "fingerprints": {d: fingerprint(cert, d) for d in DIGESTS},
        "pubkey_fingerprints": {d: pubkey_fingerprint(cert, d) for d in DIGESTS},
    }


def pin_from_certificate(cert: x509.Certificate, chain: list[x509.Certificate] | None = None) -> Pin:
    """The pin of a leaf certificate; ``chain`` (leaf first) adds the names above it."""
    key_type, key_bits = key_info(cert)
    sha256 = fingerprint(cert, "sha256")
    issuers: tuple[str, ...] = ()
    if chain:
        path, _ = chain_path(chain)
        # Each certificate's issuer: the leaf's issuer, the intermediates', the root's own.
        issuers = tuple(dict.fromkeys(display_name(c.issuer) for c in path))
    return Pin(
        cert_fingerprints=frozenset(fingerprint(cert, d) for d in DIGESTS),
        pubkey_fingerprints=frozenset(pubkey_fingerprint(cert, d) for d in DIGESTS),
        subject_cn=_name_attr(cert.subject, NameOID.COMMON_NAME),
        dns_names=dns_names(cert),
        organization=_name_attr(cert.subject, NameOID.ORGANIZATION_NAME),
        units=_name_attrs(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
        issuer_cn=display_name(cert.issuer),
        key_type=key_type,
        key_bits=key_bits,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        label="sha256 " + sha256[:11],
        chain_issuers=issuers,
    )


def pin_from_pem(pem: str | bytes) -> Pin:
    """The pin for the first (leaf) certificate of a PEM text, with the chain after it."""
    data = pem.encode() if isinstance(pem, str) else pem
    certs = load_certificates(data)
    return pin_from_certificate(certs[0], certs)


def to_pem(certs: list[x509.Certificate]) -> str:
    """Certificates as clean PEM text, the form stored in ``inbound_certificate.pem``."""
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)


@dataclass(frozen=True, slots=True)
class Derived:
    """The columns of ``inbound_certificate`` that are derived from its PEM.

    Times are naive UTC: the schema's DateTime columns carry no zone in every dialect.
    """

    cert_sha256: str
    pubkey_sha256: str
    subject_cn: str | None
    organization: str | None
    unit: str | None  # every OU of the subject, joined by ", "
    issuer_cn: str | None
    key_type: str
    key_bits: int
    not_before: datetime
    not_after: datetime

    @classmethod
    def of(cls, cert: x509.Certificate) -> Derived:
        key_type, key_bits = key_info(cert)
        return cls(
            cert_sha256=fingerprint(cert, "sha256"),
            pubkey_sha256=pubkey_fingerprint(cert, "sha256"),
            subject_cn=_name_attr(cert.subject, NameOID.COMMON_NAME),
            organization=_name_attr(cert.subject, NameOID.ORGANIZATION_NAME),
            unit=", ".join(_name_attrs(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)) or None,
            issuer_cn=display_name(cert.issuer),
            key_type=key_type,
            key_bits=key_bits,
            not_before=cert.not_valid_before_utc.astimezone(UTC).replace(tzinfo=None),
            not_after=cert.not_valid_after_utc.astimezone(UTC).replace(tzinfo=None),
        )
