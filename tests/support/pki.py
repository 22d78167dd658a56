"""Test PKI for the end-to-end tests: a trusted "Lab Test CA", an untrusted second CA, the
server certificate a private Postfix presents, and client certificates (trusted partner,
self-signed, issued by the untrusted CA), all written as PEM files with the `cryptography`
library. `issue_certificate` makes any other certificate a test needs (weak or EC keys,
expired or not-yet-valid, renewed with the same key), and the fingerprint helpers reproduce
byte for byte the `ccert_fingerprint` and `ccert_pubkey_fingerprint` strings Postfix sends
to a policy server."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["rsa", "ec"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
Digest = Literal["sha256", "md5", "sha1", "sha512"]

RSA_SIZES = (1024, 2048, 3072, 4096)
EC_CURVES: dict[int, type[ec.EllipticCurve]] = {256: ec.SECP256R1, 384: ec.SECP384R1}

# Certificates are back-dated so that a clock a little behind on either side of a TLS
# handshake never makes a "valid" test certificate look not-yet-valid.
_BACKDATE = datetime.timedelta(hours=1)
_DEFAULT_LIFETIME = datetime.timedelta(days=30)

PARTNER_CN = "mail.partner.test"
SERVER_CN = "mx.tlsgate.test"


@dataclass(frozen=True)
class IssuedCert:
    """A certificate and its private key, in memory and as PEM files."""

    name: str
    cert: x509.Certificate
    key: PrivateKey
    cert_path: Path
    key_path: Path

    @property
    def fingerprint(self) -> str:
        """SHA-256 fingerprint of the DER certificate, formatted like Postfix."""
        return cert_fingerprint(self.cert)

    @property
    def pubkey_fingerprint(self) -> str:
        """SHA-256 fingerprint of the DER SubjectPublicKeyInfo, formatted like Postfix."""
        return pubkey_fingerprint(self.cert)


def generate_key(key_type: KeyType = "rsa", key_size: int = 2048) -> PrivateKey:
    """Make a private key: RSA of `key_size` bits, or EC on P-256 / P-384 (`key_size` 256/384)."""
    if key_type == "rsa":
        if key_size not in RSA_SIZES:
            raise ValueError(f"unsupported RSA key size {key_size}, expected one of {RSA_SIZES}")
        return rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    curve = EC_CURVES.get(key_size)
    if curve is None:
        raise ValueError(f"unsupported EC key size {key_size}, expected one of {sorted(EC_CURVES)}")
    return ec.generate_private_key(curve())


def _name(common_name: str, organization: str | None, organizational_unit: str | None) -> x509.Name:
    attributes = []
    if organization is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if organizational_unit is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, organizational_unit))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _san(names: tuple[str, ...]) -> list[x509.GeneralName]:
    general: list[x509.GeneralName] = []
    for value in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError:
            general.append(x509.DNSName(value))
    return general


def issue_certificate(
    directory: Path,
    name: str,
    *,
    common_name: str,
    san: tuple[str, ...] = (),
    organization: str | None = None,
    organizational_unit: str | None = None,
    key_type: KeyType = "rsa",
    key_size: int = 2048,
    issuer: IssuedCert | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    key: PrivateKey | None = None,
    is_ca: bool = False,
) -> IssuedCert:
    """Issue a certificate and write `<name>.crt` and `<name>.key` (PEM) into `directory`.

    `san` entries that parse as IP addresses become IP SANs, the others DNS SANs.
    `issuer=None` makes the certificate self-signed. `not_before`/`not_after` default to a
    validity window around now; pass past or future datetimes (timezone-aware, UTC) for
    expired or not-yet-valid certificates. `key` reuses an existing private key (a renewal
    that keeps the public key, hence the same `pubkey_fingerprint`); otherwise a fresh key
    of `key_type`/`key_size` is generated.
    """
    directory.mkdir(parents=True, exist_ok=True)
    private_key = key if key is not None else generate_key(key_type, key_size)
    now = datetime.datetime.now(datetime.UTC)
    start = not_before if not_before is not None else now - _BACKDATE
    end = not_after if not_after is not None else now + _DEFAULT_LIFETIME
    subject = _name(common_name, organization, organizational_unit)
    if issuer is None:
        issuer_name, signing_key = subject, private_key
        authority_key = private_key.public_key()
    else:
        issuer_name, signing_key = issuer.cert.subject, issuer.key
        authority_key = issuer.key.public_key()

    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority_key), critical=False)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        # OpenSSL checks the purpose of a presented certificate; listing both usages lets
        # any leaf serve as an SMTP server or client certificate.
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san(san)), critical=False)
    cert = builder.sign(signing_key, hashes.SHA256())

    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_bytes = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create the key file 0600 from the start rather than chmod after writing it.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_bytes)
    return IssuedCert(name=name, cert=cert, key=private_key, cert_path=cert_path, key_path=key_path)


def postfix_fingerprint(data: bytes, digest: Digest = "sha256") -> str:
    """Hash `data` and format it the way Postfix prints fingerprints: `AB:CD:...`."""
    return ":".join(f"{byte:02X}" for byte in hashlib.new(digest, data).digest())


def cert_fingerprint(cert: x509.Certificate, digest: Digest = "sha256") -> str:
    """Postfix `ccert_fingerprint`: digest of the DER-encoded certificate."""
    return postfix_fingerprint(cert.public_bytes(serialization.Encoding.DER), digest)


def pubkey_fingerprint(cert: x509.Certificate, digest: Digest = "sha256") -> str:
    """Postfix `ccert_pubkey_fingerprint`: digest of the DER SubjectPublicKeyInfo."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return postfix_fingerprint(spki, digest)


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate file."""
    return x509.load_pem_x509_certificate(path.read_bytes())


class Pki:
    """The standard set of test certificates, generated into `directory` on construction.

    Attributes: `ca` (Lab Test CA, the one Postfix trusts), `untrusted_ca`, `server`
    (mx.tlsgate.test with DNS and 127.0.0.1 SANs), `partner` (mail.partner.test, O "Partner
    Org", OU "Mail", issued by `ca`), `self_signed` and `untrusted_client` (same CN, the
    latter issued by `untrusted_ca`). `issue()` adds more certificates in the same directory.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = issue_certificate(
            directory, "ca", common_name="Lab Test CA", organization="tlsgate Lab", is_ca=True
        )
        self.untrusted_ca = issue_certificate(
            directory, "untrusted-ca", common_name="Untrusted Test CA", organization="Elsewhere", is_ca=True
        )
        self.server = self.issue(
            "server", common_name=SERVER_CN, san=(SERVER_CN, "127.0.0.1"), issuer=self.ca
        )
        self.partner = self.issue(
            "partner",
            common_name=PARTNER_CN,
            san=(PARTNER_CN,),
            organization="Partner Org",
            organizational_unit="Mail",
            issuer=self.ca,
        )
        self.self_signed = self.issue(
            "self-signed", common_name=PARTNER_CN, san=(PARTNER_CN,), organization="Partner Org"
        )
        self.untrusted_client = self.issue(
            "untrusted-client",
            common_name=PARTNER_CN,
            san=(PARTNER_CN,),
            organization="Partner Org",
            issuer=self.untrusted_ca,
        )

    def issue(
        self,
        name: str,
        *,
        common_name: str,
        san: tuple[str, ...] = (),
        organization: str | None = None,
        organizational_unit: str | None = None,
        key_type: KeyType = "rsa",
        key_size: int = 2048,
        issuer: IssuedCert | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key: PrivateKey | None = None,
    ) -> IssuedCert:
        """`issue_certificate` into this PKI's directory (issuer=None means self-signed)."""
        return issue_certificate(
            self.directory,
            name,
            common_name=common_name,
            san=san,
            organization=organization,
            organizational_unit=organizational_unit,
            key_type=key_type,
            key_size=key_size,
            issuer=issuer,
            not_before=not_before,
            not_after=not_after,
            key=key,
        )
