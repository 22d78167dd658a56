"""End-to-end proof that the test harness works against a real private Postfix: mail is
delivered to maildirs in plaintext and over STARTTLS with a client certificate, two
instances run side by side, reload applies new settings, and a tiny in-test policy server
sees exactly the TLS attributes (`ccert_subject`, fingerprints, `encryption_protocol`,
`client_address`) that tests/support/pki.py predicts. Later end-to-end tests build on these
facts, so they are pinned here."""

from __future__ import annotations

import datetime
import socketserver
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.pki import Pki, cert_fingerprint, pubkey_fingerprint
from tests.support.postfix import PrivatePostfix, send, swaks

SENDER = "sender@example.test"


def xtext_decode(value: str) -> str:
    """Undo Postfix's xtext encoding of policy attributes (`Lab+20Test+20CA`)."""
    out = bytearray()
    index = 0
    while index < len(value):
        if value[index] == "+":
            out.append(int(value[index + 1 : index + 3], 16))
            index += 3
        else:
            out += value[index].encode()
            index += 1
    return out.decode()


class PolicyRecorder(socketserver.ThreadingUnixStreamServer):
    """A policy server that records every request and answers `action=DUNNO`."""

    daemon_threads = True
    # Postfix keeps policy connections open; shutdown must not wait for those threads.
    block_on_close = False

    def __init__(self, path: Path) -> None:
        self.requests: list[dict[str, str]] = []
        self.lock = threading.Lock()
        super().__init__(str(path), _PolicyHandler)
        # smtpd runs as user postfix and must be able to connect.
        path.chmod(0o666)

    def find(self, recipient: str) -> dict[str, str]:
        """The RCPT-stage request for `recipient` (the test's unique address)."""
        with self.lock:
            matches = [
                request
                for request in self.requests
                if request.get("recipient") == recipient and request.get("protocol_state") == "RCPT"
            ]
        assert len(matches) == 1, f"expected one RCPT request for {recipient}, got {matches}"
        return matches[0]


class _PolicyHandler(socketserver.StreamRequestHandler):
    server: PolicyRecorder

    def handle(self) -> None:
        attributes: dict[str, str] = {}
        for raw in self.rfile:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line:
                name, _, value = line.partition("=")
                attributes[name] = value
                continue
            with self.server.lock:
                self.server.requests.append(attributes)
            self.wfile.write(b"action=DUNNO\n\n")
            self.wfile.flush()
            attributes = {}



@pytest.fixture(scope="module")
def postfix(pki: Pki) -> Iterator[PrivatePostfix]:
    with PrivatePostfix(pki) as instance:
        yield instance


@pytest.fixture(scope="module")
def policy_postfix(pki: Pki) -> Iterator[tuple[PrivatePostfix, PolicyRecorder]]:
    instance = PrivatePostfix(pki)
    try:
        socket_path = instance.socket_dir / "policy"
        recorder = PolicyRecorder(socket_path)
        thread = threading.Thread(target=recorder.serve_forever, name="policy-recorder", daemon=True)
        thread.start()
        try:
            instance.start({"smtpd_recipient_restrictions": f"check_policy_service unix:{socket_path}"})
            yield instance, recorder
        finally:
            recorder.shutdown()
            recorder.server_close()
            thread.join(timeout=5)
    finally:
        instance.stop()


def _days(offset: int) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=offset)


def _received(message: bytes) -> str:
    head = message.split(b"\n\n", 1)[0].decode()
    return head.split("Received:", 1)[1].split("\nFrom:", 1)[0]


# ------------------------------------------------------------------ delivery


@pytest.mark.postfix
def test_plaintext_message_is_delivered_to_maildir(postfix: PrivatePostfix) -> None:
    result = send(postfix.port, SENDER, ["plain@tlsgate.test", "Other@example.test"])

    assert result.data is not None and result.data.code == 250, result
    assert result.tls_version is None
    [message] = postfix.wait_delivered("plain@tlsgate.test")
    assert b"Subject: tlsgate test" in message
    assert "with ESMTP id" in _received(message)
    # The other recipient lands in its own domain's maildir, matched case-insensitively.
    assert len(postfix.wait_delivered("other@example.test")) == 1
    assert postfix.delivered("nobody-else@tlsgate.test") == []


@pytest.mark.postfix
def test_relay_to_foreign_domain_is_refused(postfix: PrivatePostfix) -> None:
    result = send(postfix.port, SENDER, ["someone@elsewhere.invalid"])

    assert result.rcpt["someone@elsewhere.invalid"].code == 454
    assert result.data is None


@pytest.mark.postfix
def test_starttls_with_partner_certificate_is_delivered(postfix: PrivatePostfix, pki: Pki) -> None:
    result = send(
        postfix.port, SENDER, ["tls@tlsgate.test"],
        starttls=True, cert=pki.partner.cert_path, key=pki.partner.key_path,
    )

    assert result.starttls is not None and result.starttls.code == 220
    assert result.tls_version == "TLSv1.3"
    assert result.delivered, result
    [message] = postfix.wait_delivered("tls@tlsgate.test")
    received = _received(message)
    assert "with ESMTPS id" in received
    assert '(Client CN "mail.partner.test", Issuer "Lab Test CA" (verified OK))' in received


@pytest.mark.postfix
def test_mail_without_ehlo_after_starttls_is_refused(postfix: PrivatePostfix) -> None:
    # smtpd forgets the EHLO at STARTTLS and smtpd_helo_required is set: a client must greet
    # again, which is also when a milter gets the TLS macros.
    result = send(postfix.port, SENDER, ["no-ehlo@tlsgate.test"], starttls=True, ehlo_after_tls=False)

    assert result.mail is not None and result.mail.code == 503
    assert result.data is None


@pytest.mark.postfix
def test_swaks_starttls_from_second_loopback_address(postfix: PrivatePostfix, pki: Pki) -> None:
    offset = postfix.log_offset()
    result = swaks(
        postfix.port, sender=SENDER, recipients=["swaks@tlsgate.test"], tls=True,
        cert=pki.partner.cert_path, key=pki.partner.key_path, local_interface="127.0.0.2",
    )

    assert result.returncode == 0, result.output
    assert "TLS started with cipher TLSv1.3" in result.output
    postfix.wait_delivered("swaks@tlsgate.test")
    postfix.wait_for_log(r"Trusted TLS connection established from \S+\[127\.0\.0\.2\]", since=offset)


@pytest.mark.postfix
def test_two_instances_run_side_by_side(
    postfix: PrivatePostfix, policy_postfix: tuple[PrivatePostfix, PolicyRecorder]
) -> None:
    other, _ = policy_postfix
    assert postfix.port != other.port
    assert postfix.directory != other.directory
    assert postfix.postconf("myhostname") != other.postconf("myhostname")

    send(other.port, SENDER, ["side@tlsgate.test"])

    other.wait_delivered("side@tlsgate.test")
    assert postfix.delivered("side@tlsgate.test") == []
    assert f" {other.name}/smtpd[" in other.maillog()
    assert f" {other.name}/" not in postfix.maillog()


@pytest.mark.postfix
def test_reload_applies_new_main_cf_settings(pki: Pki) -> None:
    with PrivatePostfix(pki) as instance:
        assert send(instance.port, SENDER, []).banner == send(instance.port, SENDER, []).banner

        instance.reload({"smtpd_banner": "$myhostname ESMTP reloaded"})

        assert instance.postconf("smtpd_banner") == f"{instance.myhostname} ESMTP reloaded"
        banner = send(instance.port, SENDER, []).banner
        assert banner is not None and banner.text == f"{instance.myhostname} ESMTP reloaded"


# ------------------------------------------------------------------ what a policy server sees


@pytest.mark.postfix
def test_policy_sees_trusted_partner_certificate(
    policy_postfix: tuple[PrivatePostfix, PolicyRecorder], pki: Pki
) -> None:
    instance, recorder = policy_postfix
    result = send(
        instance.port, SENDER, ["policy-partner@tlsgate.test"],
        starttls=True, cert=pki.partner.cert_path, key=pki.partner.key_path,
    )

    assert result.delivered, result
    request = recorder.find("policy-partner@tlsgate.test")
    assert request["request"] == "smtpd_access_policy"
    assert request["sender"] == SENDER
    assert request["helo_name"] == "client.tlsgate.test"
    assert request["client_address"] == "127.0.0.1"
    assert xtext_decode(request["ccert_subject"]) == "mail.partner.test"
    assert request["ccert_issuer"] == "Lab+20Test+20CA"
    assert xtext_decode(request["ccert_issuer"]) == "Lab Test CA"
    assert request["ccert_fingerprint"] == pki.partner.fingerprint
    assert request["ccert_pubkey_fingerprint"] == pki.partner.pubkey_fingerprint
    assert request["encryption_protocol"] == "TLSv1.3"
    assert request["encryption_cipher"] == "TLS_AES_256_GCM_SHA384"
    assert request["encryption_keysize"] == "256"


@pytest.mark.postfix
@pytest.mark.parametrize("which", ["self_signed", "untrusted_client"])
def test_policy_sees_fingerprint_but_no_subject_for_untrusted_certificate(
    policy_postfix: tuple[PrivatePostfix, PolicyRecorder], pki: Pki, which: str
) -> None:
    instance, recorder = policy_postfix
    cert = getattr(pki, which)
    recipient = f"policy-{which.replace('_', '-')}@tlsgate.test"
    result = send(instance.port, SENDER, [recipient], starttls=True, cert=cert.cert_path, key=cert.key_path)

    assert result.delivered, result
    request = recorder.find(recipient)
    assert request["ccert_subject"] == ""
    assert request["ccert_issuer"] == ""
    assert request["ccert_fingerprint"] == cert.fingerprint
    assert request["ccert_pubkey_fingerprint"] == cert.pubkey_fingerprint


@pytest.mark.postfix
@pytest.mark.parametrize(
    ("name", "options", "trusted"),
    [
        # Postfix (OpenSSL security level 1 on Debian) still verifies an RSA-1024 chain, so
        # key-size rules cannot rely on Postfix: they need the registered certificate.
        ("rsa1024", {"key_size": 1024}, True),
        ("ec-p256", {"key_type": "ec", "key_size": 256}, True),
        ("expired", {"not_before": _days(-30), "not_after": _days(-1)}, False),
        ("not-yet-valid", {"not_before": _days(1), "not_after": _days(30)}, False),
    ],
)
def test_policy_sees_key_types_and_validity(
    policy_postfix: tuple[PrivatePostfix, PolicyRecorder],
    pki: Pki,
    name: str,
    options: dict[str, Any],
    trusted: bool,
) -> None:
    instance, recorder = policy_postfix
    cert = pki.issue(f"variant-{name}", common_name=f"{name}.partner.test", issuer=pki.ca, **options)
    recipient = f"policy-{name}@tlsgate.test"
    result = send(instance.port, SENDER, [recipient], starttls=True, cert=cert.cert_path, key=cert.key_path)

    assert result.delivered, result
    request = recorder.find(recipient)
    assert xtext_decode(request["ccert_subject"]) == (f"{name}.partner.test" if trusted else "")
    assert request["ccert_fingerprint"] == cert.fingerprint
    assert request["ccert_pubkey_fingerprint"] == cert.pubkey_fingerprint


@pytest.mark.postfix
def test_policy_sees_tls12_when_client_caps_the_version(
    policy_postfix: tuple[PrivatePostfix, PolicyRecorder]
) -> None:
    instance, recorder = policy_postfix
    result = send(
        instance.port, SENDER, ["policy-tls12@tlsgate.test"],
        starttls=True, tls_max_version=ssl.TLSVersion.TLSv1_2,
    )

    assert result.tls_version == "TLSv1.2"
    request = recorder.find("policy-tls12@tlsgate.test")
    assert request["encryption_protocol"] == "TLSv1.2"
    assert request["encryption_cipher"] == result.tls_cipher
    assert request["ccert_fingerprint"] == ""


@pytest.mark.postfix
def test_policy_sees_plaintext_session_and_second_source_address(
    policy_postfix: tuple[PrivatePostfix, PolicyRecorder]
) -> None:
    instance, recorder = policy_postfix
    send(instance.port, SENDER, ["policy-plain@tlsgate.test"], source_address="127.0.0.2")

    request = recorder.find("policy-plain@tlsgate.test")
    assert request["client_address"] == "127.0.0.2"
    assert request["encryption_protocol"] == ""
    assert request["encryption_keysize"] == "0"
    assert request["ccert_subject"] == ""
    assert request["ccert_fingerprint"] == ""


# ------------------------------------------------------------------ the PKI helpers alone


def test_renewal_with_same_key_keeps_pubkey_fingerprint(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    renewed = pki.issue(
        "partner-renewed", common_name="mail.partner.test", san=("mail.partner.test",),
        issuer=pki.ca, key=pki.partner.key,
    )

    assert renewed.pubkey_fingerprint == pki.partner.pubkey_fingerprint
    assert renewed.fingerprint != pki.partner.fingerprint
    assert cert_fingerprint(renewed.cert, "md5").count(":") == 15
    assert pubkey_fingerprint(renewed.cert) == renewed.pubkey_fingerprint


def test_issue_certificate_parameters(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    expired = pki.issue(
        "expired", common_name="old.partner.test", key_type="ec", key_size=384,
        issuer=pki.ca, not_before=past, not_after=past + datetime.timedelta(days=1),
    )

    assert expired.cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC)
    public_key = expired.cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp384r1"
    assert expired.cert.issuer == pki.ca.cert.subject
    assert pki.self_signed.cert.issuer == pki.self_signed.cert.subject
    assert expired.key_path.stat().st_mode & 0o777 == 0o600
