"""``tlsgate connector list | show | add | set | remove`` and ``tlsgate outbound add | remove``.

The commands write the same rows an administrator would write by hand, after checking every
value with the parsers the daemons use, so a typo is refused with one line before it reaches
the database, and each value is stored in the normalised spelling the daemons compare (an
A-label domain), so that a hand-written ``WHERE pattern = ...`` finds it. ``list`` and ``show``
print the connectors as the daemons see them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from tlsgate import schema
from tlsgate.cli import CommandError
from tlsgate.model import InboundConnector, OutboundConnector
from tlsgate.patterns import (
    CertNamePattern,
    DomainPattern,
    IssuerPattern,
    PatternError,
    parse_address,
    parse_network,
    to_a_label,
)
from tlsgate.store import NAME_RE, describe_db_error, load

if TYPE_CHECKING:
    from tlsgate.cli import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("connector", help="list, show, add, change or remove connectors")
    csub = p.add_subparsers(dest="connector_command", metavar="ACTION", required=True)
    lst = csub.add_parser("list", help="one line per connector")
    lst.set_defaults(func=cmd_list)
    show = csub.add_parser("show", help="every setting of one connector")
    show.add_argument("name")
    show.set_defaults(func=cmd_show)
    add = csub.add_parser("add", help="create an inbound connector")
    add.add_argument("name")
    _inbound_options(add, creating=True)
    add.set_defaults(func=cmd_add)
    change = csub.add_parser("set", help="change an inbound connector; list options add to its rows")
    change.add_argument("name")
    _inbound_options(change, creating=False)
    change.set_defaults(func=cmd_set)
    rm = csub.add_parser("remove", help="delete an inbound connector and all its rows "
                                        "(an outbound one of the same name stays: `outbound remove`)")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_remove)

    out = sub.add_parser("outbound", help="create or remove outbound connectors")
    osub = out.add_subparsers(dest="outbound_command", metavar="ACTION", required=True)
    oadd = osub.add_parser("add", help="create an outbound connector")
    oadd.add_argument("name")
    oadd.add_argument("--domain", action="append", default=[], metavar="PATTERN", required=True,
                      help="recipient domain (repeatable) [RecipientDomains]")
    oadd.add_argument("--tls-level", choices=schema.TLS_LEVELS, default="secure", help="[TlsSettings]")
    oadd.add_argument("--match", action="append", default=[], metavar="NAME",
                      help="certificate name the partner's server must present (repeatable) [TlsDomain]")
    oadd.add_argument("--min-tls", choices=schema.TLS_VERSIONS)
    oadd.add_argument("--smart-host", action="append", default=[], metavar="HOST[:PORT]",
                      help="relay to this host instead of the MX (repeatable) [SmartHosts]")
    oadd.add_argument("--comment")
    oadd.add_argument("--disabled", action="store_true")
    oadd.set_defaults(func=cmd_outbound_add)
    orm = osub.add_parser("remove", help="delete an outbound connector and all its rows "
                                         "(an inbound one of the same name stays)")
    orm.add_argument("name")
    orm.set_defaults(func=cmd_outbound_remove)


def _yes_no(text: str) -> bool:
    low = text.lower()
    if low in ("yes", "true", "on", "1"):
        return True
    if low in ("no", "false", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not yes or no")


def _checked(parser: Callable[[str], Any]) -> Callable[[str], str]:
    """An argument type that refuses what ``parser`` refuses and gives its normalised spelling:
    the form the daemons compare, so the row is what an administrator's query looks for."""
    def check(text: str) -> str:
        try:
            return str(parser(text))
        except PatternError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return check


def _inbound_options(p: argparse.ArgumentParser, *, creating: bool) -> None:
    none = None
    p.add_argument("--sender", action="append", default=[], type=_checked(DomainPattern.parse), metavar="PATTERN",
                   help="envelope sender domain (repeatable) [SenderDomains]")
    p.add_argument("--recipient", action="append", default=[], type=_checked(DomainPattern.parse),
                   metavar="PATTERN", help="recipient domain on our side (repeatable) [AssociatedAcceptedDomains]")
    p.add_argument("--header-from", action="append", default=[], type=_checked(DomainPattern.parse),
                   metavar="PATTERN", help="header From domain, judged by the milter (repeatable)")
    p.add_argument("--address", action="append", default=[], type=_checked(parse_network), metavar="CIDR",
                   help="client address range (repeatable) [SenderIPAddresses]")
    p.add_argument("--cert-name", action="append", default=[], type=_checked(CertNamePattern.parse),
                   metavar="NAME", help="certificate name pattern (repeatable) [TlsSenderCertificateName]")
    p.add_argument("--issuer", action="append", default=[], type=_checked(IssuerPattern.parse), metavar="NAME",
                   help="issuer name pattern (repeatable)")
    p.add_argument("--require-tls", type=_yes_no, default=none, metavar="yes|no", help="[RequireTls]")
    p.add_argument("--min-tls", choices=schema.TLS_VERSIONS, default=none)
    p.add_argument("--forward-secrecy", type=_yes_no, default=none, metavar="yes|no")
    p.add_argument("--min-cipher-bits", type=int, default=none, metavar="N")
    p.add_argument("--certificate", choices=schema.CERT_REQUIREMENTS, default=none)
    p.add_argument("--organization", default=none, help="required subject O (pinned)")
    p.add_argument("--unit", default=none, help="required subject OU (pinned)")
    p.add_argument("--min-key-bits", type=int, default=none, metavar="N")
    p.add_argument("--restrict-to-addresses", type=_yes_no, default=none, metavar="yes|no",
                   help="[RestrictDomainsToIPAddresses]")
    p.add_argument("--on-failure", choices=schema.FAIL_ACTIONS, default=none)
    p.add_argument("--reply-text", default=none)
    p.add_argument("--mode", choices=schema.MODES, default=none, help="monitor: log only [TestMode]")
    p.add_argument("--enabled", type=_yes_no, default=none, metavar="yes|no")
    p.add_argument("--comment", default=none)


_COLUMNS = {
    "require_tls": "require_tls", "min_tls": "min_tls_version", "forward_secrecy": "require_forward_secrecy",
    "min_cipher_bits": "min_cipher_bits", "certificate": "certificate", "organization": "require_organization",
    "unit": "require_unit", "min_key_bits": "min_key_bits", "restrict_to_addresses": "restrict_to_addresses",
    "on_failure": "on_failure", "reply_text": "reply_text", "mode": "mode", "enabled": "enabled",
    "comment": "comment",
}


_INT_MAX = 2**31 - 1  # the INTEGER columns' range on every supported database


def _columns(args: argparse.Namespace) -> dict[str, Any]:
    values = {col: getattr(args, opt) for opt, col in _COLUMNS.items() if getattr(args, opt) is not None}
    for col in ("min_cipher_bits", "min_key_bits"):
        if col in values and not (0 if col == "min_cipher_bits" else 1) <= values[col] <= _INT_MAX:
            raise CommandError(f"--{col.replace('_', '-')} {values[col]} is out of range", 2)
    if "reply_text" in values and ("\n" in values["reply_text"] or len(values["reply_text"]) > 255):
        raise CommandError("--reply-text must be one line of at most 255 characters", 2)
    for col in ("comment", "require_organization", "require_unit"):
        if col in values:
            _check_length("inbound_connector", col, values[col], _option(col))
    return values


def _check_length(table: str, column: str, value: str, option: str) -> None:
    """Refuse a value longer than its column holds: PostgreSQL and MariaDB would refuse the row
    with their own message, SQLite would keep it for the other databases to refuse later."""
    limit = getattr(schema.Base.metadata.tables[table].c[column].type, "length", None)
    if limit is not None and len(value) > limit:
        raise CommandError(f"{option} is {len(value)} characters long; {table}.{column} holds at most {limit}", 2)


def _option(column: str) -> str:
    """The command-line option that sets ``column``."""
    return next(f"--{opt.replace('_', '-')}" for opt, col in _COLUMNS.items() if col == column)


def _check_pin_only(row: dict[str, Any]) -> None:
    """Refuse organization, unit and key size requirements on a connector that pins no
    certificate: Postfix reports none of them, so nothing could enforce them."""
    if row.get("certificate") == "pinned":
        return
    given = [_option(col) for col in schema.PIN_ONLY if row.get(col) is not None]
    if given:
        raise CommandError(f"{', '.join(given)} can be checked only against a pinned certificate (Postfix reports "
                           "no organization, unit or key size): add --certificate pinned and register the partner's "
                           "certificate with 'tlsgate cert add'", 2)


def _child_rows(name: str, args: argparse.Namespace) -> list[tuple[Any, dict[str, Any]]]:
    """The scope and name rows the options ask for, each once: two spellings of one pattern
    are one row once normalised."""
    t = schema.Base.metadata.tables
    rows: list[tuple[Any, dict[str, Any]]] = []
    for option, table, fixed, column, values in (
        ("--sender", "inbound_domain", {"scope": "sender"}, "pattern", args.sender),
        ("--recipient", "inbound_domain", {"scope": "recipient"}, "pattern", args.recipient),
        ("--header-from", "inbound_domain", {"scope": "header_from"}, "pattern", args.header_from),
        ("--address", "inbound_address", {}, "address", args.address),
        ("--cert-name", "inbound_cert_name", {"field": "subject"}, "pattern", args.cert_name),
        ("--issuer", "inbound_cert_name", {"field": "issuer"}, "pattern", args.issuer),
    ):
        for value in dict.fromkeys(values):
            _check_length(table, column, value, option)
            rows.append((t[table], {"connector": name, **fixed, column: value}))
    return rows


_NO_RANGES = ("--restrict-to-addresses yes needs the partner's client ranges (a connector restricted to none "
              "is misconfigured): give --address CIDR")


def _write(ctx: Context, work: Callable[[Any], None]) -> None:
    engine = ctx.engine
    try:
        with engine.begin() as conn:
            work(conn)
    except IntegrityError as exc:
        raise CommandError(describe_db_error(engine, exc)) from None
    except SQLAlchemyError as exc:
        raise CommandError(describe_db_error(engine, exc)) from None


def _refuse_taken_name(conn: Any, table: Any, name: str, what: str) -> None:
    """Refuse ``name`` when ``table`` has it under any spelling: two names differing only in
    case would make both connectors misconfigured (and their mail wait)."""
    taken = next((n for n in conn.execute(select(table.c.name)).scalars() if n.casefold() == name.casefold()), None)
    if taken is not None:
        raise CommandError(f"{what} named {taken!r} already exists")


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise CommandError(f"connector name {name!r}: 1 to 64 letters, digits, '.', '_' or '-'", 2)


def cmd_add(args: argparse.Namespace, ctx: Context) -> int:
    _check_name(args.name)
    values = _columns(args)
    children = _child_rows(args.name, args)
    if not children:
        raise CommandError("a connector needs a scope: --sender, --recipient, --header-from or --address", 2)
    if values.get("restrict_to_addresses") and not args.address:
        raise CommandError(_NO_RANGES, 2)
    _check_pin_only(values)
    table = schema.Base.metadata.tables["inbound_connector"]

    def work(conn: Any) -> None:
        _refuse_taken_name(conn, table, args.name, "a connector")
        conn.execute(insert(table).values(name=args.name, **values))
        for child, row in children:
            conn.execute(insert(child).values(**row))

    _write(ctx, work)
    print(f"added inbound connector {args.name}")
    return 0


def cmd_set(args: argparse.Namespace, ctx: Context) -> int:
    values = _columns(args)
    children = _child_rows(args.name, args)
    if not values and not children:
        raise CommandError("nothing to change: give at least one option", 2)
    table = schema.Base.metadata.tables["inbound_connector"]

    def work(conn: Any) -> None:
        current = conn.execute(select(table).where(table.c.name == args.name)).mappings().first()
        if current is None:
            raise CommandError(f"no inbound connector named {args.name!r}")
        if values.keys() & {"certificate", *schema.PIN_ONLY}:
            _check_pin_only({**current, **values})
        if values.get("restrict_to_addresses") and not args.address and not _has_addresses(conn, args.name):
            raise CommandError(_NO_RANGES, 2)
        if values:
            conn.execute(update(table).where(table.c.name == args.name).values(**values))
        for child, row in children:
            # As the database spells the name: a MariaDB table made before its columns compared
            # case exactly finds 'contoso-in' by 'CONTOSO-IN', and a row naming the latter would
            # belong to no connector.
            conn.execute(insert(child).values(**{**row, "connector": current["name"]}))

    _write(ctx, work)
    print(f"changed inbound connector {args.name}")
    return 0


def _has_addresses(conn: Any, name: str) -> bool:
    table = schema.Base.metadata.tables["inbound_address"]
    return conn.execute(select(table.c.address).where(table.c.connector == name).limit(1)).first() is not None


def _remove(ctx: Context, name: str, parent: str, children: tuple[str, ...]) -> bool:
    """Delete connector ``name`` from ``parent`` with its rows in ``children``; False when there
    was none. One direction only: partners often give both directions one name, and an outbound
    connector at level fingerprint needs the inbound one's registered certificates."""
    tables = schema.Base.metadata.tables
    removed = 0

    def work(conn: Any) -> None:
        nonlocal removed
        # Children first: SQLite databases opened without foreign keys do not cascade.
        for child in children:
            conn.execute(delete(tables[child]).where(tables[child].c.connector == name))
        removed = conn.execute(delete(tables[parent]).where(tables[parent].c.name == name)).rowcount

    _write(ctx, work)
    return removed > 0


def cmd_remove(args: argparse.Namespace, ctx: Context) -> int:
    children = ("inbound_domain", "inbound_address", "inbound_cert_name", "inbound_certificate")
    if not _remove(ctx, args.name, "inbound_connector", children):
        raise CommandError(f"no inbound connector named {args.name!r}")
    print(f"removed inbound connector {args.name}")
    return 0


def cmd_outbound_remove(args: argparse.Namespace, ctx: Context) -> int:
    if not _remove(ctx, args.name, "outbound_connector", ("outbound_domain", "outbound_match_name",
                                                           "outbound_smart_host")):
        raise CommandError(f"no outbound connector named {args.name!r}")
    print(f"removed outbound connector {args.name}")
    return 0


def _smart_host(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or Postfix's ``[HOST]:PORT``, where HOST is a name or an IPv4 or
    IPv6 address (``[2001:db8::1]:25``, ``IPv6:2001:db8::1``), spelt as the loader spells it."""
    raw = text.strip()
    if parse_address(raw) is not None:  # a bare address: an IPv6 one has colons of its own
        host, port = raw, ""
    elif raw.startswith("["):  # Postfix's [host]:port spelling
        host, closed, rest = raw[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            host = ""  # no ']', or text after it that is not a port: refused below
        port = rest.removeprefix(":")
    else:
        host, _, port = raw.partition(":")
    try:
        number = int(port) if port else 25
        if not 0 < number < 65536:
            raise ValueError(port)
        address = parse_address(host)
        return (str(address) if address is not None else to_a_label(host)), number
    except (PatternError, ValueError):
        raise CommandError(f"--smart-host {text!r} is not HOST, HOST:PORT or [HOST]:PORT "
                           "(HOST a name or an IP address)", 2) from None


def _match_name(text: str) -> str:
    """A ``--match`` name as the loader reads it: a certificate name pattern, or Postfix's
    ``.domain`` (any subdomain) whose domain is checked like any other."""
    raw = text.strip()
    if raw.startswith("."):
        return "." + to_a_label(raw[1:])
    return str(CertNamePattern.parse(raw))


def cmd_outbound_add(args: argparse.Namespace, ctx: Context) -> int:
    _check_name(args.name)
    try:
        domains = list(dict.fromkeys(str(DomainPattern.parse(d)) for d in args.domain))
        matches = list(dict.fromkeys(_match_name(m) for m in args.match))
    except PatternError as exc:
        raise CommandError(str(exc), 2) from None
    hosts = list(dict.fromkeys(_smart_host(h) for h in args.smart_host))
    if args.comment is not None:
        _check_length("outbound_connector", "comment", args.comment, "--comment")
    t = schema.Base.metadata.tables

    def work(conn: Any) -> None:
        _refuse_taken_name(conn, t["outbound_connector"], args.name, "an outbound connector")
        conn.execute(insert(t["outbound_connector"]).values(
            name=args.name, tls_level=args.tls_level, min_tls_version=args.min_tls, comment=args.comment,
            enabled=not args.disabled))
        for d in domains:
            conn.execute(insert(t["outbound_domain"]).values(connector=args.name, pattern=d))
        for m in matches:
            conn.execute(insert(t["outbound_match_name"]).values(connector=args.name, name=m))
        for host, port in hosts:
            conn.execute(insert(t["outbound_smart_host"]).values(connector=args.name, host=host, port=port))

    _write(ctx, work)
    print(f"added outbound connector {args.name}")
    return 0


def _scope(c: InboundConnector) -> str:
    parts = []
    if c.sender_domains:
        parts.append("from " + ",".join(str(p) for p in c.sender_domains))
    if c.header_from_domains:
        parts.append("header-from " + ",".join(str(p) for p in c.header_from_domains))
    if c.recipient_domains:
        parts.append("to " + ",".join(str(p) for p in c.recipient_domains))
    if c.client_ranges:
        word = "only-from" if c.restrict_to_ranges and c.has_domain_scope else "client"
        parts.append(f"{word} " + ",".join(str(n) for n in c.client_ranges))
    return "; ".join(parts) or "(no scope)"


def _needs(c: InboundConnector) -> str:
    parts = []
    if c.require_tls:
        parts.append("tls")
    if c.min_tls_version:
        parts.append(f">={c.min_tls_version}")
    if c.require_forward_secrecy:
        parts.append("pfs")
    if c.min_cipher_bits:
        parts.append(f"bits>={c.min_cipher_bits}")
    if c.certificate.value != "none":
        parts.append(f"cert={c.certificate.value}")
    if c.cert_names:
        parts.append("name=" + ",".join(str(p) for p in c.cert_names))
    if c.issuer_names:
        parts.append("issuer=" + ",".join(str(p) for p in c.issuer_names))
    return " ".join(parts) or "nothing"


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    snap = load(ctx.engine).snapshot
    for c in snap.inbound:
        state = "disabled" if not c.enabled else ("MISCONFIGURED" if c.misconfigured else c.mode.value)
        print(f"inbound  {c.name:<24} {state:<13} {c.on_failure.value:<6} {_scope(c)} => {_needs(c)}")
    for o in snap.outbound:
        state = "disabled" if not o.enabled else ("MISCONFIGURED" if o.problems else "enabled")
        hosts = ",".join(f"[{h.host}]:{h.port}" for h in o.smart_hosts) or "MX"
        doms = ",".join(str(p) for p in o.recipient_domains) or "(no domains)"
        print(f"outbound {o.name:<24} {state:<13} {o.tls_level.value:<6} to {doms} via {hosts}")
    if not snap.inbound and not snap.outbound:
        print("no connectors: every session is opportunistic TLS")
    return 0


def describe_inbound(c: InboundConnector) -> list[str]:
    lines = [
        f"inbound connector {c.name}",
        f"  enabled:            {'yes' if c.enabled else 'no'}",
        f"  mode:               {c.mode.value}",
        f"  comment:            {c.comment or '-'}",
        f"  sender domains:     {', '.join(sorted(str(p) for p in c.sender_domains)) or '-'}",
        f"  recipient domains:  {', '.join(sorted(str(p) for p in c.recipient_domains)) or '-'}",
        f"  header From:        {', '.join(sorted(str(p) for p in c.header_from_domains)) or '-'}",
        f"  client ranges:      {', '.join(sorted(str(n) for n in c.client_ranges)) or '-'}"
        + (" (restricts the domains to these ranges)" if c.restrict_to_ranges else ""),
        f"  require TLS:        {'yes' if c.require_tls else 'no'}",
        f"  minimum TLS:        {c.min_tls_version or '-'}",
        f"  forward secrecy:    {'required' if c.require_forward_secrecy else '-'}",
        f"  minimum cipher:     {c.min_cipher_bits or '-'}",
        f"  certificate:        {c.certificate.value}",
        f"  certificate names:  {', '.join(sorted(str(p) for p in c.cert_names)) or '-'}",
        f"  issuer names:       {', '.join(sorted(str(p) for p in c.issuer_names)) or '-'}",
    ]
    if c.certificate.value == "pinned":
        lines.append(f"  organization:       {c.require_organization or '-'}")
        lines.append(f"  organizational unit:{' ' if c.require_unit else ''}{c.require_unit or ' -'}")
        lines.append(f"  minimum key bits:   {c.min_key_bits or 2048}")
        for pin in c.pins:
            lines.append(
                f"  pinned:             {pin.label} CN={pin.subject_cn} {pin.key_type} {pin.key_bits} "
                f"until {pin.not_after:%Y-%m-%d}"
            )
    lines.append(f"  on failure:         {c.on_failure.value}" + (f" ({c.reply_text})" if c.reply_text else ""))
    for problem in c.problems:
        lines.append(f"  PROBLEM:            {problem}")
    return lines


def _host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets so that its port stays apart from it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_outbound(o: OutboundConnector) -> list[str]:
    lines = [
        f"outbound connector {o.name}",
        f"  enabled:            {'yes' if o.enabled else 'no'}",
        f"  comment:            {o.comment or '-'}",
        f"  recipient domains:  {', '.join(str(p) for p in o.recipient_domains) or '-'}",
        f"  TLS level:          {o.tls_level.value}",
        f"  match names:        {', '.join(o.match_names) or '-'}",
        f"  minimum TLS:        {o.min_tls_version or '-'}",
        f"  smart hosts:        {', '.join(_host_port(h.host, h.port) for h in o.smart_hosts) or '- (MX)'}",
    ]
    for problem in o.problems:
        lines.append(f"  PROBLEM:            {problem}")
    return lines


def cmd_show(args: argparse.Namespace, ctx: Context) -> int:
    snap = load(ctx.engine).snapshot
    found = False
    for c in snap.inbound:
        if c.name == args.name:
            print("\n".join(describe_inbound(c)))
            found = True
    for o in snap.outbound:
        if o.name == args.name:
            print("\n".join(describe_outbound(o)))
            found = True
    if not found:
        raise CommandError(f"no connector named {args.name!r} (see `tlsgate connector list`)")
    return 0
