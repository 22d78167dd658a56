"""Reading certificate input strictly: PEM and DER, chains, and every kind of bad input
ending in one CertificateError that says what is wrong; fingerprints in Postfix's format."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, x25519

from tests.certs import certgen
from tests.support.pki import cert_fingerprint as pki_cert_fp
from tests.support.pki import pubkey_fingerprint as pki_key_fp
from tlsgate.certs import (
    MAX_INPUT_BYTES,
    CertificateError,
    fingerprint,
    load_certificates,
    normalise_fingerprint,
    pubkey_fingerprint,
)


@pytest.fixture(scope="module")
def chain() -> tuple[object, object]:
    ca = certgen.make("Partner CA", o="Partner Org", ou=None, private_key=certgen.key("rsa", 2048, fresh=True), ca=True)
    leaf, _ = certgen.make(issuer=ca, san=("mail.partner.test",))
    return leaf, ca[0]


def test_pem_single_and_chain_keep_order(chain: tuple) -> None:
    leaf, ca = chain
    assert load_certificates(certgen.pem(leaf)) == [leaf]
    assert load_certificates(certgen.pem(leaf, ca)) == [leaf, ca]
    # CRLF line ends and white space around blocks are fine.
    crlf = certgen.pem(leaf, ca).replace(b"\n", b"\r\n")
    assert load_certificates(b"\n\n" + crlf + b"\n  \n") == [leaf, ca]


def test_der() -> None:
    cert, _ = certgen.make()
    assert load_certificates(certgen.der(cert)) == [cert]


def test_der_ending_in_a_whitespace_byte_is_not_stripped() -> None:
    # An ECDSA signature is random: re-sign until the DER ends in a byte bytes.strip() removes.
    k = certgen.key("ec", 256)
    for _ in range(2000):
        cert, _ = certgen.make(private_key=k)
        data = certgen.der(cert)
        if data[-1:] in (b" ", b"\n", b"\t", b"\r", b"\x0b", b"\x0c"):
            break
    else:
        pytest.skip("no signature ended in a white-space byte")
    assert load_certificates(data) == [cert]


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda leaf, ca, k: b"", "empty input"),
        (lambda leaf, ca, k: b"  \n", "empty input"),
        (lambda leaf, ca, k: b"hello world\n", "neither PEM nor a DER certificate"),
        (
            lambda leaf, ca, k: b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            "PEM block 1 (line 1) is not a valid certificate",
        ),
        (lambda leaf, ca, k: certgen.pem(leaf)[:-30], "without its END line"),
        (
            lambda leaf, ca, k: certgen.pem(leaf)[:-26] + certgen.pem(ca),
            "PEM block 1 (line 1) has no END line",
        ),
        (lambda leaf, ca, k: certgen.key_pem(k), "is a private key (PRIVATE KEY), not a certificate"),
        (lambda leaf, ca, k: certgen.pem(leaf) + certgen.key_pem(k), "PEM block 2 (line"),
        (lambda leaf, ca, k: certgen.key_pem(k, b"secret"), "private key (ENCRYPTED PRIVATE KEY)"),
        (lambda leaf, ca, k: certgen.key_der(k), "this is a private key, not a certificate"),
        (
            lambda leaf, ca, k: certgen.pem(leaf) + b"subject=CN = Partner CA\n" + certgen.pem(ca),
            "unexpected text 'subject=CN = Partner CA' outside the PEM blocks",
        ),
        (lambda leaf, ca, k: b"Certificate:\n    Data:\n" + certgen.pem(leaf), "line 1: unexpected text"),
        (lambda leaf, ca, k: certgen.pem(leaf) + b"trailing junk", "unexpected text 'trailing junk'"),
        (
            lambda leaf, ca, k: certgen.pem(leaf).replace(b"END CERTIFICATE", b"END X509 CRL"),
            "begins with CERTIFICATE but ends with X509 CRL",
        ),
    ],
    ids=[
        "empty", "blank", "text", "bad-base64-body", "no-end-line", "begin-inside-block",
        "private-key", "cert-then-key", "encrypted-key", "der-private-key", "junk-between-blocks",
        "text-before", "text-after", "mismatched-end",
    ],
)
def test_bad_input_is_one_clear_error(chain: tuple, make_input, message: str) -> None:
    leaf, ca = chain
    with pytest.raises(CertificateError) as err:
        load_certificates(make_input(leaf, ca, certgen.key()))
    assert message in str(err.value)


def test_certificate_request_is_not_a_certificate() -> None:
    from cryptography import x509

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(certgen.name("mail.partner.test"))
        .sign(certgen.key(), hashes.SHA256())
    )
    with pytest.raises(CertificateError, match="is a CERTIFICATE REQUEST, not a CERTIFICATE"):
        load_certificates(csr.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize(
    ("public_key", "kind"),
    [
        (lambda: x25519.X25519PrivateKey.generate().public_key(), "X25519"),
        (lambda: dsa.generate_private_key(2048).public_key(), "DSA"),
    ],
)
def test_unsupported_key_type(public_key, kind: str) -> None:
    cert, _ = certgen.make(public_key=public_key())
    with pytest.raises(CertificateError, match=f"unsupported key type {kind}"):
        load_certificates(certgen.pem(cert))


def test_unsupported_key_in_a_chain_names_the_certificate(chain: tuple) -> None:
    leaf, _ = chain
    odd, _ = certgen.make("Odd CA", public_key=dsa.generate_private_key(2048).public_key())
    with pytest.raises(CertificateError, match=r"certificate 2 \(Odd CA\): unsupported key type DSA"):
        load_certificates(certgen.pem(leaf, odd))


def test_oversized_input() -> None:
    with pytest.raises(CertificateError, match="larger than"):
        load_certificates(b"A" * (MAX_INPUT_BYTES + 1))


@pytest.mark.parametrize("key_spec", [("rsa", 2048), ("ec", 256), ("ec", 384)])
@pytest.mark.parametrize(("digest", "length"), [("sha256", 32), ("sha1", 20), ("md5", 16)])
def test_fingerprints_are_postfix_format(key_spec: tuple[str, int], digest: str, length: int) -> None:
    cert, _ = certgen.make(private_key=certgen.key(*key_spec))
    der = certgen.der(cert)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    want = ":".join(f"{b:02X}" for b in hashlib.new(digest, der).digest())
    want_key = ":".join(f"{b:02X}" for b in hashlib.new(digest, spki).digest())
    assert fingerprint(cert, digest) == want
    assert pubkey_fingerprint(cert, digest) == want_key
    assert len(want) == 3 * length - 1
    # The e2e harness's helpers (checked there against what Postfix sends) agree.
    assert fingerprint(cert, digest) == pki_cert_fp(cert, digest)  # type: ignore[arg-type]
    assert pubkey_fingerprint(cert, digest) == pki_key_fp(cert, digest)  # type: ignore[arg-type]


def test_renewal_with_same_key_keeps_the_pubkey_fingerprint_only() -> None:
    k = certgen.key("ec", 256)
    old, _ = certgen.make(private_key=k)
    new, _ = certgen.make(private_key=k, not_after=certgen.NOW + 400 * certgen.DAY)
    assert fingerprint(old) != fingerprint(new)
    assert pubkey_fingerprint(old) == pubkey_fingerprint(new)
    other, _ = certgen.make(private_key=ec.generate_private_key(ec.SECP256R1()))
    assert pubkey_fingerprint(other) != pubkey_fingerprint(old)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("ab:cd:01", "AB:CD:01"),
        ("ABCD01", "AB:CD:01"),
        (" AB CD 01 ", "AB:CD:01"),
        ("ABC", ""),
        ("zz:01", ""),
        ("", ""),
    ],
)
def test_normalise_fingerprint(text: str, want: str) -> None:
    assert normalise_fingerprint(text) == want
