"""`tlsgate cert inspect | add | list | remove` and the certificate part of `tlsgate lint`,
run through `tlsgate.cli.main` against an SQLite database in tmp_path."""

from __future__ import annotations

import io
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.certs import certgen
from tlsgate.certs import fingerprint, pubkey_fingerprint
from tlsgate.cli import main

NOW = certgen.NOW
DAY = certgen.DAY


# Nothing in /etc/tlsgate or the environment counts.
pytestmark = pytest.mark.usefixtures("own_config")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "rules.sqlite"
    assert run(path, "db", "init") == 0
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO inbound_connector (name, certificate) VALUES ('partner', 'pinned')")
        conn.execute("INSERT INTO inbound_connector (name, certificate) VALUES ('plain', 'none')")
        conn.execute("INSERT INTO inbound_domain VALUES ('partner', 'sender', 'partner.test')")
        conn.execute("INSERT INTO inbound_domain VALUES ('plain', 'sender', 'plain.test')")
    return path


def run(db: Path | None, *args: str) -> int:
    prefix = ["--database-url", f"sqlite:///{db}"] if db else []
    return main([*prefix, *args])


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def rows(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT id, connector, cert_sha256, pubkey_sha256, subject_cn, organization, unit, issuer_cn, "
            "key_type, key_bits, not_before, not_after, comment, pem FROM inbound_certificate ORDER BY id"
        ).fetchall()


# --------------------------------------------------------------------------- inspect


def test_inspect_text_shows_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, _ = certgen.make(private_key=certgen.key("ec", 384), san=("mail.partner.test", "mx2.partner.test"))
    assert run(None, "cert", "inspect", write(tmp_path, "c.pem", certgen.pem(cert))) == 0
    out = capsys.readouterr().out
    for line in (
        "certificate 1 of 1 (leaf)",
        "subject:",
        "CN=mail.partner.test,OU=Mail,O=Partner Org",
        "organization:",
        "organizational unit:",
        "DNS names:                   mail.partner.test, mx2.partner.test",
        "self-signed:                 yes",
        "key:                         EC 384 bits (secp384r1), about RSA 7680",
        "signature algorithm:         ecdsa-with-SHA256",
        f"fingerprint (sha256):        {fingerprint(cert)}",
        f"pubkey fingerprint (sha256): {pubkey_fingerprint(cert)}",
        "chain root: mail.partner.test (certificate 1)",
    ):
        assert line in out


@pytest.mark.parametrize("digest", ["md5", "sha1"])
def test_inspect_other_digest_der_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], digest: str) -> None:
    cert, _ = certgen.make()
    assert run(None, "cert", "inspect", "--digest", digest, write(tmp_path, "c.der", certgen.der(cert))) == 0
    out = capsys.readouterr().out
    assert f"fingerprint ({digest}):" in out and fingerprint(cert, digest) in out
    assert pubkey_fingerprint(cert, digest) in out
    assert fingerprint(cert, "sha256") not in out


def test_inspect_json_chain_from_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    root = certgen.make("Partner Root CA", o="Partner Org", ou=None, private_key=certgen.key("rsa", 4096), ca=True)
    leaf, _ = certgen.make(issuer=root, not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(certgen.pem(leaf, root[0]))))
    assert run(None, "cert", "inspect", "--json", "-") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["file"] == "<stdin>"
    first, second = doc["certificates"]
    assert first["validity"] == "expired"
    assert first["issuer_name"] == "Partner Root CA"
    assert first["organizational_units"] == ["Mail"]
    assert first["fingerprints"] == {d: fingerprint(leaf, d) for d in ("sha256", "sha1", "md5", "sha224", "sha384", "sha512")}
    assert first["pubkey_fingerprints"]["sha256"] == pubkey_fingerprint(leaf)
    assert (second["key_type"], second["key_bits"], second["self_issued"]) == ("RSA", 4096, True)
    assert doc["root"] == {"name": "Partner Root CA", "subject": "CN=Partner Root CA,O=Partner Org",
                           "in_file": True, "index": 1}


def test_inspect_not_yet_valid_and_missing_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = certgen.make("Elsewhere CA", o=None, ou=None, ca=True, private_key=certgen.key("ec", 256))
    cert, _ = certgen.make(issuer=ca, not_before=NOW + DAY, not_after=NOW + 10 * DAY)
    assert run(None, "cert", "inspect", write(tmp_path, "c.pem", certgen.pem(cert))) == 0
    out = capsys.readouterr().out
    assert "status:                      NOT YET VALID" in out
    assert "chain root: Elsewhere CA (not in the file)" in out


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: certgen.key_pem(certgen.key()), "is a private key"),
        (lambda: b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "is not a valid certificate"),
        (lambda: certgen.pem(certgen.make()[0]) + b"junk\n" + certgen.pem(certgen.make()[0]), "unexpected text 'junk'"),
    ],
    ids=["private-key", "malformed", "junk"],
)
def test_inspect_bad_input_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], data, message: str) -> None:
    path = write(tmp_path, "partner.pem", data())
    assert run(None, "cert", "inspect", path) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith(f"tlsgate: {path}: ") and message in err
    assert len(err.splitlines()) == 1


def test_inspect_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(None, "cert", "inspect", str(tmp_path / "nope.pem")) == 1
    assert "nope.pem: No such file or directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- add / list / remove


def test_add_stores_pem_and_derived_columns(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = certgen.make("Partner Root CA", o="Partner Org", ou=None, ca=True, private_key=certgen.key("rsa", 2048, fresh=True))
    cert, _ = certgen.make(issuer=root, private_key=certgen.key("ec", 256))
    path = write(tmp_path, "chain.pem", b"\n" + certgen.pem(cert, root[0]))
    assert run(db, "cert", "add", "partner", path, "--comment", "2026 certificate") == 0
    out = capsys.readouterr()
    assert "registered certificate 1 with connector partner" in out.out
    assert out.err == ""
    (row,) = rows(db)
    assert row[1:10] == ("partner", fingerprint(cert), pubkey_fingerprint(cert), "mail.partner.test", "Partner Org",
                         "Mail", "Partner Root CA", "EC", 256)
    assert row[11].startswith(cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S"))
    assert row[12] == "2026 certificate"
    assert row[13] == certgen.pem(cert, root[0]).decode()


def test_add_refuses_duplicate_unknown_connector_and_bad_input(db: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = certgen.make()
    good = write(tmp_path, "c.pem", certgen.pem(cert))
    assert run(db, "cert", "add", "partner", good) == 0
    capsys.readouterr()
    assert run(db, "cert", "add", "partner", good) == 1
    assert "is already registered with connector partner as id 1" in capsys.readouterr().err
    # The DER form of the same certificate is the same certificate.
    assert run(db, "cert", "add", "partner", write(tmp_path, "c.der", certgen.der(cert))) == 1
    assert "already registered" in capsys.readouterr().err
    assert run(db, "cert", "add", "nobody", good) == 1
    assert "inbound connector 'nobody' does not exist" in capsys.readouterr().err
    bad = {
        "key.pem": certgen.key_pem(key),
        "cert-and-key.pem": certgen.pem(cert) + certgen.key_pem(key),
        "junk.pem": certgen.pem(certgen.make()[0]) + b"Bag Attributes\n" + certgen.pem(cert),
        "broken.pem": certgen.pem(cert)[:200],
    }
    for file_name, data in bad.items():
        path = write(tmp_path, file_name, data)
        assert run(db, "cert", "add", "partner", path) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"tlsgate: {path}: "), err
    assert len(rows(db)) == 1


def test_add_refuses_a_file_that_starts_with_the_ca(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The first certificate is the one pinned: a CA first would refuse every session.
    root = certgen.make("Partner Root CA", ca=True)
    leaf, _ = certgen.make(issuer=root)
    path = write(tmp_path, "root-first.pem", certgen.pem(root[0], leaf))
    assert run(db, "cert", "add", "partner", path) == 1
    err = capsys.readouterr().err
    assert "the first certificate (Partner Root CA) is a CA certificate" in err and "put the partner's own" in err
    assert rows(db) == []
    assert run(db, "cert", "add", "partner", write(tmp_path, "leaf-first.pem", certgen.pem(leaf, root[0]))) == 0


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def test_add_stores_the_connector_name_as_the_database_has_it(
    request: pytest.FixtureRequest, tmp_path: Path, dialect: str
) -> None:
    # A MariaDB schema made before its tables compared names exactly (utf8mb4_bin) finds
    # 'partner' by 'Partner' (its collation ignored case); a row written as 'Partner' would then
    # belong to no connector, and 'partner' would have no certificate.
    from sqlalchemy import create_engine, text

    from tlsgate import schema
    from tlsgate.store import load, schema_statements

    url = f"sqlite:///{tmp_path}/r.sqlite" if dialect == "sqlite" else request.getfixturevalue("mariadb_url")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if dialect == "sqlite":
                assert main(["--database-url", url, "db", "init"]) == 0
            else:
                for statement in schema_statements("mariadb"):
                    conn.exec_driver_sql(statement.replace(f" COLLATE={schema.MARIADB_COLLATION}", ""))
            conn.execute(text("INSERT INTO inbound_connector (name, certificate) VALUES ('partner', 'pinned')"))
            conn.execute(text("INSERT INTO inbound_domain VALUES ('partner', 'sender', 'partner.test')"))
        cert, _ = certgen.make()
        rc = main(["--database-url", url, "cert", "add", "Partner", write(tmp_path, "c.pem", certgen.pem(cert))])
        result = load(engine)
    finally:
        engine.dispose()
    if dialect == "sqlite":  # names compare exactly: 'Partner' is no connector
        assert rc == 1
        return
    assert rc == 0
    assert [str(p) for p in result.errors] == []
    assert len(result.snapshot.by_name["partner"].pins) == 1


def test_add_warns_about_unused_expired_and_weak(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, _ = certgen.make(private_key=certgen.key("rsa", 1024), not_before=NOW - 90 * DAY, not_after=NOW - DAY)
    assert run(db, "cert", "add", "plain", write(tmp_path, "old.pem", certgen.pem(cert))) == 0
    err = capsys.readouterr().err
    assert "has certificate = 'none'" in err
    assert "expired on" in err
    assert "RSA 1024 key is weaker than the connector's minimum 2048" in err


def test_list_and_remove(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, _ = certgen.make()
    second, _ = certgen.make(o="Partner Org", ou="Mail", private_key=certgen.key("ec", 384))
    other, _ = certgen.make("mail.plain.test", o=None, ou=None)
    assert run(db, "cert", "add", "partner", write(tmp_path, "1.pem", certgen.pem(first))) == 0
    assert run(db, "cert", "add", "partner", write(tmp_path, "2.pem", certgen.pem(second))) == 0
    assert run(db, "cert", "add", "plain", write(tmp_path, "3.pem", certgen.pem(other))) == 0
    # A row an administrator wrote by hand with a broken PEM is listed as invalid.
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO inbound_certificate (connector, pem) VALUES ('plain', 'not a certificate')")
    capsys.readouterr()

    assert run(db, "cert", "list") == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    assert "partner" in out[0] and fingerprint(first) in out[0] and "valid" in out[0]
    assert "INVALID" in out[3]

    assert run(db, "cert", "list", "partner", "--json") == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["fingerprint_sha256"] for e in entries] == [fingerprint(first), fingerprint(second)]
    assert entries[1]["key"] == "EC 384"
    assert run(db, "cert", "list", "nobody") == 1
    capsys.readouterr()

    # By md5 fingerprint, lower case without colons, as someone may paste it.
    md5 = fingerprint(second, "md5").replace(":", "").lower()
    assert run(db, "cert", "remove", "partner", md5) == 0
    assert "removed certificate 2 from connector partner" in capsys.readouterr().out
    # An id of another connector's certificate is not this connector's.
    assert run(db, "cert", "remove", "partner", "3") == 1
    assert "no certificate with id 3 is registered with connector partner" in capsys.readouterr().err
    assert run(db, "cert", "remove", "partner", "AB:CD") == 1
    assert "neither a row id nor a complete" in capsys.readouterr().err
    assert run(db, "cert", "remove", "partner", fingerprint(first)) == 0
    assert [r[1] for r in rows(db)] == ["plain", "plain"]


# --------------------------------------------------------------------------- lint


def test_lint_expiry_warning_and_error(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    soon, _ = certgen.make(not_after=NOW + 20 * DAY)
    later, _ = certgen.make(not_after=NOW + 200 * DAY)
    assert run(db, "cert", "add", "partner", write(tmp_path, "soon.pem", certgen.pem(soon))) == 0
    assert run(db, "cert", "add", "partner", write(tmp_path, "later.pem", certgen.pem(later))) == 0
    capsys.readouterr()

    assert run(db, "lint") == 0
    out = certificate_lines(capsys.readouterr().out)
    assert len(out) == 1
    assert out[0].startswith("warning: inbound_certificate (1) column pem: certificate sha256")
    assert "expires on" in out[0] and "in 19 days" in out[0]

    assert run(db, "lint", "--expiry-days", "10") == 0
    assert certificate_lines(capsys.readouterr().out) == []
    assert run(db, "lint", "--expiry-days", "365", "--strict") == 1
    out = certificate_lines(capsys.readouterr().out)
    assert [line.split(" column")[0] for line in out] == [
        "warning: inbound_certificate (1)", "warning: inbound_certificate (2)",
    ]

    # Expired since yesterday (inserted by plain SQL, as an administrator may): an error.
    old, _ = certgen.make(not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO inbound_certificate (connector, pem) VALUES ('partner', ?)", (certgen.pem(old).decode(),))
    assert run(db, "lint") == 1
    out = certificate_lines(capsys.readouterr().out)
    assert len(out) == 2
    assert out[1].startswith("error: inbound_certificate (3) column pem: certificate sha256") and "expired on" in out[1]


def certificate_lines(output: str) -> list[str]:
    """Lint's lines about registered certificates (other checks may add their own lines)."""
    return [line for line in output.splitlines() if "inbound_certificate" in line]


def test_lint_rejects_a_bad_day_count(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run(db, "lint", "--expiry-days", "soon")
    assert exit_.value.code == 2
    assert "is not a whole number of days" in capsys.readouterr().err


def test_lint_warns_when_derived_columns_disagree_with_the_pem(db: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cert, _ = certgen.make()
    replacement, _ = certgen.make(private_key=certgen.key("ec", 256))
    assert run(db, "cert", "add", "partner", write(tmp_path, "c.pem", certgen.pem(cert))) == 0
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE inbound_certificate SET pem = ? WHERE id = 1", (certgen.pem(replacement).decode(),))
    capsys.readouterr()
    assert run(db, "lint", "--expiry-days", "0") == 0
    out = capsys.readouterr().out
    assert "warning: inbound_certificate (1) column cert_sha256: does not match the PEM" in out


def test_add_list_remove_on_every_database(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = db_url
    assert main(["--database-url", url, "db", "init"]) == 0
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO inbound_connector (name, certificate) VALUES ('partner', 'pinned')"))
    engine.dispose()
    cert, _ = certgen.make()
    path = write(tmp_path, "c.pem", certgen.pem(cert))
    assert main(["--database-url", url, "cert", "add", "partner", path]) == 0
    assert main(["--database-url", url, "cert", "add", "partner", path]) == 1
    capsys.readouterr()
    assert main(["--database-url", url, "cert", "list", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["fingerprint_sha256"] == fingerprint(cert)
    assert entry["not_after"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert main(["--database-url", url, "cert", "remove", "partner", fingerprint(cert, "sha1")]) == 0
    assert main(["--database-url", url, "cert", "list"]) == 0
    assert "no registered certificates" in capsys.readouterr().out
