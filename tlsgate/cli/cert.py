"""``tlsgate cert inspect | add | list | remove``: partner certificates for pinned connectors.

``inspect`` reads a PEM or DER file (or ``-``) and shows what a pinned connector can require
of it, with the fingerprints exactly as Postfix sends them to a policy server. ``add`` stores
the PEM with its derived columns in ``inbound_certificate``; the daemons re-derive everything
from the PEM at load time, so the derived columns are for people reading the table. Bad input
ends in one line naming the file and the problem, and nothing is stored.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509
from sqlalchemy import Table, delete, insert, select
from sqlalchemy.exc import SQLAlchemyError

from tlsgate import schema
from tlsgate.certs import (
    DIGESTS,
    MAX_INPUT_BYTES,
    CertificateError,
    Derived,
    chain_path,
    describe,
    display_name,
    fingerprint,
    load_certificates,
    normalise_fingerprint,
    pin_from_pem,
    to_pem,
)
from tlsgate.cli import CommandError
from tlsgate.engine import DEFAULT_MIN_KEY_BITS, rsa_equivalent_bits
from tlsgate.store import StoreError, describe_db_error

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from tlsgate.cli import Context

# The declarative classes' tables, typed as the Core tables they are.
_CERTS = cast(Table, schema.InboundCertificate.__table__)
_CONNECTORS = cast(Table, schema.InboundConnector.__table__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cert", help="inspect and register partner certificates for pinned connectors")
    csub = p.add_subparsers(dest="cert_command", metavar="ACTION", required=True)

    ins = csub.add_parser("inspect", help="show a certificate or chain (PEM or DER; '-' reads stdin)")
    ins.add_argument("file", metavar="FILE")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.add_argument(
        "--digest", choices=tuple(DIGESTS), default="sha256",
        help="fingerprint digest, as smtpd_tls_fingerprint_digest (default sha256)",
    )
    ins.set_defaults(func=cmd_inspect)

    add = csub.add_parser("add", help="register a certificate with an inbound connector")
    add.add_argument("connector", metavar="CONNECTOR")
    add.add_argument("file", metavar="FILE", help="PEM or DER certificate, leaf first; '-' reads stdin")
    add.add_argument("--comment", default=None, help="a note kept with the certificate")
    add.set_defaults(func=cmd_add)

    lst = csub.add_parser("list", help="registered certificates, of one connector or all")
    lst.add_argument("connector", metavar="CONNECTOR", nargs="?")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.set_defaults(func=cmd_list)

    rm = csub.add_parser("remove", help="unregister a certificate by id or fingerprint")
    rm.add_argument("connector", metavar="CONNECTOR")
    rm.add_argument("which", metavar="FINGERPRINT-OR-ID", help="row id, or certificate fingerprint (sha256, sha1 or md5)")
    rm.set_defaults(func=cmd_remove)


# --------------------------------------------------------------------------- reading


def read_input(path: str) -> tuple[str, bytes]:
    """(name for messages, bytes) of FILE or stdin, bounded in size."""
    if path == "-":
        data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        return "<stdin>", data
    try:
        with open(path, "rb") as fh:
            return path, fh.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise CommandError(f"{path}: {exc.strerror or exc}") from None


def read_certificates(path: str) -> tuple[str, list[x509.Certificate]]:
    name, data = read_input(path)
    try:
        return name, load_certificates(data)
    except CertificateError as exc:
        raise CommandError(f"{name}: {exc}") from None


# --------------------------------------------------------------------------- inspect


def inspect_document(name: str, certs: list[x509.Certificate], now: datetime) -> dict[str, Any]:
    """The JSON document of ``cert inspect``: every certificate, and the chain's root."""
    path, rooted = chain_path(certs)
    top = path[-1]
    root: dict[str, Any] = {
        "name": display_name(top.subject if rooted else top.issuer),
        "subject": (top.subject if rooted else top.issuer).rfc4514_string(),
        "in_file": rooted,
    }
    if rooted:
        root["index"] = next(i for i, c in enumerate(certs) if c is top)
    return {
        "file": name,
        "certificates": [describe(c, now) for c in certs],
        "root": root,
    }


def _status_text(info: dict[str, Any], now: datetime) -> str:
    state = str(info["validity"])
    if state == "valid":
        left = datetime.strptime(info["not_after"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) - now
        return f"valid ({left.days} days left)"
    return state.upper()


def render_text(doc: dict[str, Any], digest: str, now: datetime) -> list[str]:
    lines: list[str] = []
    certs = doc["certificates"]
    for n, info in enumerate(certs):
        role = "leaf" if n == 0 else ("root" if info["self_issued"] else "intermediate")
        lines.append(f"certificate {n + 1} of {len(certs)} ({role})")
        rows = [
            ("subject", info["subject"] or "(empty)"),
            ("common name", info["common_name"] or "-"),
            ("organization", info["organization"] or "-"),
            ("organizational unit", ", ".join(info["organizational_units"]) or "-"),
        ]
        rows.extend(
            (f"subject {a['name']}", a["value"])
            for a in info["subject_attributes"]
            if a["name"] not in ("CN", "O", "OU")
        )
        key = f"{info['key_type']} {info['key_bits']} bits"
        if info["curve"]:
            key += f" ({info['curve']})"
        if info["key_type"] != "RSA":
            key += f", about RSA {rsa_equivalent_bits(info['key_type'], info['key_bits'])}"
        rows += [
            ("DNS names", ", ".join(info["dns_names"]) or "-"),
            ("issuer", info["issuer"] or "(empty)"),
            ("self-signed", "yes" if info["self_issued"] else "no"),
            ("serial", info["serial"]),
            ("key", key),
            ("signature algorithm", info["signature_algorithm"]),
            ("not before", info["not_before"]),
            ("not after", info["not_after"]),
            ("status", _status_text(info, now)),
            (f"fingerprint ({digest})", info["fingerprints"][digest]),
            (f"pubkey fingerprint ({digest})", info["pubkey_fingerprints"][digest]),
        ]
        width = max(len(label) for label, _ in rows) + 1
        lines.extend(f"  {label + ':':<{width}} {value}" for label, value in rows)
    root = doc["root"]
    where = f"certificate {root['index'] + 1}" if root["in_file"] else "not in the file"
    lines.append(f"chain root: {root['name']} ({where})")
    return lines


def cmd_inspect(args: argparse.Namespace, ctx: Context) -> int:
    name, certs = read_certificates(args.file)
    now = datetime.now(UTC)
    doc = inspect_document(name, certs, now)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(render_text(doc, args.digest, now)))
    return 0


# --------------------------------------------------------------------------- database


def _db(engine: Engine, what: str, exc: SQLAlchemyError) -> StoreError:
    return StoreError(f"{what}: {describe_db_error(engine, exc)}")


def _connector_row(engine: Engine, connector: str) -> dict[str, Any]:
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(_CONNECTORS.c.name, _CONNECTORS.c.certificate, _CONNECTORS.c.min_key_bits).where(
                    _CONNECTORS.c.name == connector
                )
            ).mappings().first()
    except SQLAlchemyError as exc:
        raise _db(engine, "reading inbound_connector", exc) from None
    if row is None:
        raise CommandError(
            f"inbound connector {connector!r} does not exist (see `tlsgate connector list`)"
        )
    return dict(row)


def _registered(engine: Engine, connector: str | None) -> list[dict[str, Any]]:
    query = select(_CERTS.c.id, _CERTS.c.connector, _CERTS.c.pem, _CERTS.c.comment).order_by(
        _CERTS.c.connector, _CERTS.c.id
    )
    if connector is not None:
        query = query.where(_CERTS.c.connector == connector)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]
    except SQLAlchemyError as exc:
        raise _db(engine, "reading inbound_certificate", exc) from None


def _fingerprints_of(pem: object) -> frozenset[str]:
    """Every certificate fingerprint of a stored row's leaf; empty for an unreadable PEM,
    which `tlsgate lint` reports."""
    try:
        return pin_from_pem(str(pem or "")).cert_fingerprints
    except CertificateError:
        return frozenset()


def _first_is_a_leaf(name: str, certs: list[x509.Certificate]) -> None:
    """Refuse a file whose first certificate issued one of the others: the first one is the
    one pinned, and a partner never presents its CA as its own certificate. (A self-signed
    partner certificate may say CA:TRUE, as `openssl req -x509` makes them: that alone is no
    reason to refuse.)"""
    first = certs[0]
    if any(c.issuer == first.subject and c.subject != first.subject for c in certs[1:]):
        raise CommandError(
            f"{name}: the first certificate ({display_name(first.subject)}) is a CA certificate; the first one is "
            "the one registered: put the partner's own certificate first, then its chain"
        )


def cmd_add(args: argparse.Namespace, ctx: Context) -> int:
    name, certs = read_certificates(args.file)
    _first_is_a_leaf(name, certs)
    leaf = certs[0]
    engine = ctx.engine
    connector = _connector_row(engine, args.connector)
    # The name as stored: MariaDB compares names case-insensitively, and a row written under
    # another spelling would belong to no connector when the rules are loaded.
    owner = connector["name"]
    sha256 = fingerprint(leaf, "sha256")
    for row in _registered(engine, owner):
        if sha256 in _fingerprints_of(row["pem"]):
            raise CommandError(
                f"{name}: certificate {sha256} is already registered with connector "
                f"{owner} as id {row['id']}"
            )
    derived = Derived.of(leaf)
    if args.comment is not None and len(args.comment) > 255:
        raise CommandError("--comment is longer than 255 characters")
    values: dict[str, Any] = {
        "connector": owner,
        "pem": to_pem(certs),
        "cert_sha256": derived.cert_sha256,
        "pubkey_sha256": derived.pubkey_sha256,
        "subject_cn": derived.subject_cn,
        "organization": derived.organization,
        "unit": derived.unit,
        "issuer_cn": derived.issuer_cn,
        "key_type": derived.key_type,
        "key_bits": derived.key_bits,
        "not_before": derived.not_before,
        "not_after": derived.not_after,
        "comment": args.comment,
    }
    # Names in SQL columns are bounded; a longer one would fail in the database with a less
    # helpful message, or be truncated silently by MariaDB in non-strict mode.
    for column in ("subject_cn", "organization", "unit", "issuer_cn"):
        if values[column] is not None and len(values[column]) > 255:
            raise CommandError(f"{name}: the certificate's {column} is longer than 255 characters")
    try:
        with engine.begin() as conn:
            result = conn.execute(insert(_CERTS).values(**values))
            new_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
    except SQLAlchemyError as exc:
        raise _db(engine, "storing the certificate", exc) from None
    print(
        f"registered certificate {new_id} with connector {owner}: "
        f"CN={derived.subject_cn or '-'} O={derived.organization or '-'} OU={derived.unit or '-'} "
        f"{derived.key_type} {derived.key_bits}, valid until {derived.not_after:%Y-%m-%d}, sha256 {sha256}"
    )
    now = datetime.now(UTC)
    for note in _add_notes(connector, leaf, derived, now):
        print(f"tlsgate: warning: {note}", file=sys.stderr)
    return 0


def _add_notes(connector: dict[str, Any], leaf: x509.Certificate, derived: Derived, now: datetime) -> list[str]:
    """What an administrator should know about a certificate just registered."""
    notes = []
    if connector["certificate"] != "pinned":
        notes.append(
            f"connector {connector['name']} has certificate = {connector['certificate']!r}: "
            "registered certificates are used only when it is 'pinned'"
        )
    if now > leaf.not_valid_after_utc:
        notes.append(f"the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}: sessions with it are refused")
    elif now < leaf.not_valid_before_utc:
        notes.append(f"the certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d}")
    minimum = connector["min_key_bits"] or DEFAULT_MIN_KEY_BITS
    if rsa_equivalent_bits(derived.key_type, derived.key_bits) < int(minimum):
        notes.append(
            f"its {derived.key_type} {derived.key_bits} key is weaker than the connector's minimum "
            f"{minimum}: sessions with it are refused"
        )
    return notes


def list_entries(engine: Engine, connector: str | None, now: datetime) -> list[dict[str, Any]]:
    entries = []
    for row in _registered(engine, connector):
        entry: dict[str, Any] = {"id": row["id"], "connector": row["connector"], "comment": row["comment"]}
        try:
            pin = pin_from_pem(str(row["pem"] or ""))
        except CertificateError as exc:
            entry.update(status="invalid", error=str(exc))
            entries.append(entry)
            continue
        if now > pin.not_after:
            status = "expired"
        elif now < pin.not_before:
            status = "not yet valid"
        else:
            status = "valid"
        sha256 = next(fp for fp in sorted(pin.cert_fingerprints) if len(fp) == 95)
        key256 = next(fp for fp in sorted(pin.pubkey_fingerprints) if len(fp) == 95)
        entry.update(
            status=status,
            subject_cn=pin.subject_cn,
            organization=pin.organization,
            unit=", ".join(pin.units) or None,
            issuer=pin.issuer_cn,
            key=f"{pin.key_type} {pin.key_bits}",
            not_before=pin.not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
            not_after=pin.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            fingerprint_sha256=sha256,
            pubkey_fingerprint_sha256=key256,
        )
        entries.append(entry)
    return entries


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    if args.connector is not None:
        _connector_row(ctx.engine, args.connector)
    entries = list_entries(ctx.engine, args.connector, datetime.now(UTC))
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print("no registered certificates")
        return 0
    for e in entries:
        if e["status"] == "invalid":
            print(f"{e['id']:>5} {e['connector']:<20} INVALID  {e['error']}")
            continue
        print(
            f"{e['id']:>5} {e['connector']:<20} {e['status']:<13} until {e['not_after'][:10]} "
            f"CN={e['subject_cn'] or '-'} O={e['organization'] or '-'} OU={e['unit'] or '-'} "
            f"{e['key']} sha256 {e['fingerprint_sha256']}"
            + (f"  # {e['comment']}" if e["comment"] else "")
        )
    return 0


def cmd_remove(args: argparse.Namespace, ctx: Context) -> int:
    engine = ctx.engine
    owner = _connector_row(engine, args.connector)["name"]
    rows = _registered(engine, owner)
    which = args.which.strip()
    if which.isdigit() and len(which) < 12:
        targets = [r for r in rows if int(r["id"]) == int(which)]
        label = f"id {which}"
    else:
        fp = normalise_fingerprint(which)
        if len(fp) not in (47, 59, 95):  # md5, sha1, sha256 in Postfix's form
            raise CommandError(
                f"{which!r} is neither a row id nor a complete md5, sha1 or sha256 fingerprint"
            )
        targets = [r for r in rows if fp in _fingerprints_of(r["pem"])]
        label = f"fingerprint {fp}"
    if not targets:
        raise CommandError(f"no certificate with {label} is registered with connector {owner}")
    ids = [int(r["id"]) for r in targets]
    try:
        with engine.begin() as conn:
            conn.execute(delete(_CERTS).where(_CERTS.c.id.in_(ids), _CERTS.c.connector == owner))
    except SQLAlchemyError as exc:
        raise _db(engine, "removing the certificate", exc) from None
    print(f"removed certificate {', '.join(map(str, ids))} from connector {owner}")
    return 0
