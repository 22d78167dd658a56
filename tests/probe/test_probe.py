"""``tlsgate probe`` against SMTP servers and a DNS server started on loopback by the tests."""

from __future__ import annotations

import datetime
import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.probe.probe_servers import DnsServer, SmtpServer, Trickle
from tests.socketmap.socketmap_daemon import make_database, outbound_rows
from tests.support.pki import Pki
from tests.support.postfix import free_port
from tlsgate.cli import main

B_NAME = "mx.tlsgate.test"  # the names in pki.server's certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def dns_for(port_domains: dict[str, str]) -> DnsServer:
    """Each domain gets one MX host mx.<domain>, which resolves to 127.0.0.1."""
    records: dict[str, list[tuple[str, str]]] = {}
    for domain in port_domains:
        records[domain] = [("MX", f"10 mx.{domain}.")]
        records[f"mx.{domain}"] = [("A", "127.0.0.1")]
    return DnsServer(records)


def run_probe(tmp_path: Path, pki: Pki, dns: DnsServer, port: int, *args: str, rows: list[str] | None = None) -> list[str]:
    db = make_database(tmp_path / "rules.sqlite", rows or [])
    return ["--database-url", db, "probe", "--nameserver", dns.address, "--port", str(port),
            "--cafile", str(pki.ca.cert_path), "--timeout", "5", *args]


def probe_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, list[dict[str, Any]]]:
    status = main(argv)
    out = capsys.readouterr().out
    return status, json.loads(out)


def checks(result: dict[str, Any]) -> dict[str, bool]:
    return {c["name"]: c["ok"] for c in result["hosts"][0]["checks"]}


SECURE = outbound_rows("partner", ["partner.test"], match=[B_NAME], min_version="TLSv1.2")


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with dns_for({"partner.test": ""}) as server:
        yield server


def test_matching_server_passes(tmp_path: Path, pki: Pki, dns: DnsServer, capsys: pytest.CaptureFixture[str]) -> None:
    with SmtpServer(pki.server.cert_path, pki.server.key_path) as smtp:
        status, doc = probe_json(capsys, run_probe(tmp_path, pki, dns, smtp.port, "--json", "partner.test", rows=SECURE))
    assert status == 0
    result = doc[0]
    assert (result["domain"], result["connector"], result["level"], result["source"]) == ("partner.test", "partner", "secure", "mx")
    host = result["hosts"][0]
    assert (host["host"], host["address"], host["starttls"], host["verified"]) == ("mx.partner.test", "127.0.0.1", True, True)
    assert host["tls_version"] == "TLSv1.3" and host["cipher"]
    assert host["chain"][0]["dns_names"] == [B_NAME]
    assert "Lab Test CA" in host["chain"][0]["issuer"]
    assert host["chain"][0]["key"] == "RSA 2048"
    assert checks(result) == {"starttls": True, "min_tls_version": True, "expiry": True, "key_strength": True, "chain": True, "name": True}
    assert ("partner.test.", "MX") in dns.queries and ("mx.partner.test.", "A") in dns.queries


def test_text_output_from_the_console_script(tmp_path: Path, pki: Pki, dns: DnsServer) -> None:
    with SmtpServer(pki.server.cert_path, pki.server.key_path) as smtp:
        argv = run_probe(tmp_path, pki, dns, smtp.port, "partner.test", rows=SECURE)
        done = subprocess.run([str(Path(sys.executable).parent / "tlsgate"), *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("partner.test: PASS (connector partner, level secure)")
    assert f"ok   name: certificate names {B_NAME}; required {B_NAME}" in done.stdout
    assert "Traceback" not in done.stderr


def test_wrong_name_fails(tmp_path: Path, pki: Pki, dns: DnsServer, capsys: pytest.CaptureFixture[str]) -> None:
    rows = outbound_rows("partner", ["partner.test"], match=["wrong.partner.test"])
    with SmtpServer(pki.server.cert_path, pki.server.key_path) as smtp:
        status, doc = probe_json(capsys, run_probe(tmp_path, pki, dns, smtp.port, "--json", "partner.test", rows=rows))
    assert status == 1
    assert checks(doc[0])["name"] is False and checks(doc[0])["chain"] is True


def test_default_secure_names_are_the_next_hop_domain(tmp_path: Path, pki: Pki, dns: DnsServer, capsys: pytest.CaptureFixture[str]) -> None:
    rows = outbound_rows("partner", ["partner.test"])
    with SmtpServer(pki.partner.cert_path, pki.partner.key_path) as smtp:  # mail.partner.test
        status, doc = probe_json(capsys, run_probe(tmp_path, pki, dns, smtp.port, "--json", "partner.test", rows=rows))
    assert status == 0, doc  # "mail.partner.test" matches the dot-nexthop ".partner.test"


def test_untrusted_chain_fails_with_the_verify_reason(tmp_path: Path, pki: Pki, dns: DnsServer, capsys: pytest.CaptureFixture[str]) -> None:
    with SmtpServer(pki.untrusted_client.cert_path, pki.untrusted_client.key_path) as smtp:
        status, doc = probe_json(capsys, run_probe(tmp_path, pki, dns, smtp.port, "--json", "partner.test", rows=SECURE))
    assert status == 1
    host = doc[0]["hosts"][0]
    assert host["verified"] is False and "unable to get local issuer certificate" in host["verify_error"]
    assert "CN=Untrusted Test CA" in host["chain"][0]["issuer"]
    assert checks(doc[0])["chain"] is False


def test_encrypt_level_does_not_require_a_trusted_chain(tmp_path: Path, pki: Pki, dns: DnsServer, capsys: pytest.CaptureFixture[str]) -> None:
    rows = outbound_rows("partner", ["partner.test"], level="encrypt")
    with SmtpServer(pki.self_signed.cert_path, pki.self_signed.key_path) as smtp:
        status, doc = probe_json(capsys, run_probe(tmp_path, pki, dns, smtp.port, "--json", "partner.test", rows=rows))
    assert status == 0
    assert "name" not in checks(doc[0])


def test_no_starttls_fails(tmp_path: Path, pki: Pki, dns: DnsServer, capsys: pytest.CaptureFixture[str]) -> None:
    with SmtpServer(None, None) as smtp:
        status, doc = probe_json(capsys, run_probe(tmp_path, pki, dns, smtp.port, "--json", "partner.test", rows=SECURE))
    assert status == 1
    assert doc[0]["hosts"][0]["starttls"] is False
    assert checks(doc[0]) == {"starttls": False}


def test_minimum_version(tmp_path: Path, pki: Pki, dns: DnsServer, capsys: pytest.CaptureFixture[str]) -> None:
    rows = outbound_rows("partner", ["partner.test"], match=[B_NAME], min_version="TLSv1.3")
    with SmtpServer(pki.server.cert_path, pki.server.key_path, tls_max=ssl.TLSVersion.TLSv1_2) as smtp:
        status, doc = probe_json(capsys, run_probe(tmp_path, pki, dns, smtp.port, "--json", "partner.test", rows=rows))
    assert status == 1
    assert doc[0]["hosts"][0]["tls_version"] == "TLSv1.2"
    assert checks(doc[0])["min_tls_version"] is False


def test_expired_certificate_and_weak_key(tmp_path: Path, pki: Pki, dns: DnsServer, capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.datetime.now(datetime.UTC)
    old = pki.issue("expired", common_name=B_NAME, san=(B_NAME,), issuer=pki.ca, key_size=1024,
                    not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1))
    rows = outbound_rows("partner", ["partner.test"], level="encrypt")
    with SmtpServer(old.cert_path, old.key_path) as smtp:
        status, doc = probe_json(capsys, run_probe(tmp_path, pki, dns, smtp.port, "--json", "partner.test", rows=rows))
    assert status == 1
    found = checks(doc[0])
    assert found["expiry"] is False and found["key_strength"] is False
    assert doc[0]["hosts"][0]["chain"][0]["validity"] == "expired"


def test_refused_connection_is_a_per_host_result(tmp_path: Path, pki: Pki, dns: DnsServer, capsys: pytest.CaptureFixture[str]) -> None:
    status, doc = probe_json(capsys, run_probe(tmp_path, pki, dns, free_port(), "--json", "partner.test", rows=SECURE))
    assert status == 1
    assert doc[0]["hosts"][0]["error"] == "connection refused"


def test_server_refusing_at_the_banner(tmp_path: Path, pki: Pki, dns: DnsServer, capsys: pytest.CaptureFixture[str]) -> None:
    with SmtpServer(None, None, banner="554 5.7.1 go away") as smtp:
        status, doc = probe_json(capsys, run_probe(tmp_path, pki, dns, smtp.port, "--json", "partner.test", rows=SECURE))
    assert status == 1
    assert doc[0]["hosts"][0]["error"].startswith("server said 554")


@pytest.mark.parametrize(("trickle", "step"), [("greeting", "greeting"), ("ehlo", "EHLO"), ("handshake", "TLS handshake")])
def test_a_trickling_server_times_out_as_a_whole(tmp_path: Path, pki: Pki, dns: DnsServer, capsys: pytest.CaptureFixture[str],
                                                 trickle: Trickle, step: str) -> None:
    # A byte every 0.2 s keeps each read within --timeout 1: only a deadline per step ends it.
    # The next host is probed all the same.
    with (SmtpServer(pki.server.cert_path, pki.server.key_path, trickle=trickle) as slow,
          SmtpServer(pki.server.cert_path, pki.server.key_path) as good):
        rows = outbound_rows("partner", ["partner.test"], match=[B_NAME],
                             hosts=[("127.0.0.1", slow.port, False), ("127.0.0.1", good.port, False)])
        argv = run_probe(tmp_path, pki, dns, 25, "--json", "--timeout", "1", "partner.test", rows=rows)
        status, doc = probe_json(capsys, argv)  # without a deadline: 200 s, then no timeout at all
        assert slow.trickled.is_set()
    assert status == 1
    stalled, fine = doc[0]["hosts"]
    assert (stalled["port"], stalled["error"]) == (slow.port, f"timed out after 1s ({step})")
    assert (fine["port"], fine["ok"], fine["tls_version"]) == (good.port, True, "TLSv1.3")


def test_dns_errors_are_per_domain_results(tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    records = {"nomx.test": [("A", "127.0.0.1")], "noaddr.test": [("MX", "10 ghost.noaddr.test.")]}
    with DnsServer(records, silent=["slow.test"]) as dns, SmtpServer(None, None) as smtp:
        argv = run_probe(tmp_path, pki, dns, smtp.port, "--json", "--timeout", "1",
                         "missing.test", "slow.test", "nomx.test", "noaddr.test")
        status = main(argv)
        captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert status == 1
    by = {d["domain"]: d for d in doc}
    assert by["missing.test"]["error"] == "MX lookup for missing.test: no such domain"
    assert by["slow.test"]["error"] == "MX lookup for slow.test: DNS timeout"
    assert by["nomx.test"]["source"] == "implicit mx" and by["nomx.test"]["hosts"][0]["address"] == "127.0.0.1"
    assert by["noaddr.test"]["hosts"][0]["error"] == "address of ghost.noaddr.test: no such domain"
    # the progress display, one line per domain, on stderr only
    assert "[1/4] probing missing.test" in captured.err and "[4/4] probing noaddr.test" in captured.err


def test_all_probes_every_connector_and_its_smart_hosts(tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    records = {"partner.test": [("MX", "10 mx.partner.test.")], "mx.partner.test": [("A", "127.0.0.1")],
               "relay.other.test": [("A", "127.0.0.1")]}
    with DnsServer(records) as dns, SmtpServer(pki.server.cert_path, pki.server.key_path) as smtp:
        rows = SECURE + outbound_rows("other", ["other.test", "*.other.test"], match=[B_NAME],
                                      hosts=[("relay.other.test", smtp.port, False)])
        status, doc = probe_json(capsys, run_probe(tmp_path, pki, dns, smtp.port, "--json", "--all", rows=rows))
    assert status == 0, doc
    assert [(d["domain"], d["connector"], d["source"]) for d in doc] == [
        ("other.test", "other", "smart host"), ("partner.test", "partner", "mx")]
    assert doc[0]["hosts"][0]["host"] == "relay.other.test"


def test_fingerprint_level_checks_the_registered_certificate(tmp_path: Path, pki: Pki, dns: DnsServer, capsys: pytest.CaptureFixture[str]) -> None:
    pem = pki.server.cert_path.read_text()
    rows = [
        *outbound_rows("partner", ["partner.test"], level="fingerprint"),
        "INSERT INTO inbound_connector (name) VALUES ('partner')",
        f"INSERT INTO inbound_certificate (connector, pem) VALUES ('partner', '{pem}')",
    ]
    with SmtpServer(pki.server.cert_path, pki.server.key_path) as smtp:
        status, doc = probe_json(capsys, run_probe(tmp_path, pki, dns, smtp.port, "--json", "partner.test", rows=rows))
    (tmp_path / "b").mkdir()
    with SmtpServer(pki.partner.cert_path, pki.partner.key_path) as smtp:
        status2, doc2 = probe_json(capsys, run_probe(tmp_path.joinpath("b"), pki, dns, smtp.port, "--json", "partner.test", rows=rows))
    assert (status, checks(doc[0])["fingerprint"]) == (0, True)
    assert (status2, checks(doc2[0])["fingerprint"]) == (1, False)


def test_usage_errors_are_one_line(tmp_path: Path, pki: Pki, dns: DnsServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(run_probe(tmp_path, pki, dns, 25)) == 2
    assert main(run_probe(tmp_path, pki, dns, 25, "not a domain!")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err


@pytest.mark.parametrize(("level", "passes"), [("dane", True), ("dane-only", False)])
def test_an_unchecked_dane_only_level_is_no_pass(tmp_path: Path, pki: Pki, dns: DnsServer,
                                                  capsys: pytest.CaptureFixture[str], level: str, passes: bool) -> None:
    # The probe checks no TLSA record: at dane-only Postfix defers the mail without one, so a
    # pass would promise mail that waits; dane falls back to encrypt.
    rows = outbound_rows("partner", ["partner.test"], level=level)
    with SmtpServer(pki.self_signed.cert_path, pki.self_signed.key_path) as smtp:
        status, doc = probe_json(capsys, run_probe(tmp_path, pki, dns, smtp.port, "--json", "partner.test", rows=rows))
    assert checks(doc[0])["dane"] is passes and (status == 0) is passes


def test_a_smart_host_given_by_its_address_is_probed_there(tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    # No name to look up: it was asked of DNS as one, and failed.
    with DnsServer({}) as empty, SmtpServer(pki.self_signed.cert_path, pki.self_signed.key_path) as smtp:
        rows = outbound_rows("partner", ["partner.test"], level="encrypt", hosts=[("127.0.0.1", smtp.port, False)])
        status, doc = probe_json(capsys, run_probe(tmp_path, pki, empty, smtp.port, "--json", "partner.test", rows=rows))
    assert status == 0, doc
    assert doc[0]["hosts"][0]["address"] == "127.0.0.1"
