"""``tlsgate probe``: connect to a partner's mail servers the way Postfix would and judge them.

For each domain it finds the MX hosts with dnspython (the system resolver, or ``--nameserver``),
or the smart hosts of the domain's outbound connector, connects to each on port 25, says
EHLO, STARTTLS, and reports the TLS version, the cipher and the certificate chain, then
whether the outbound connector's requirements would pass: the name (RFC 6125, SANs before
the CN), the chain against a CA bundle, the minimum TLS version, the key strength, the
validity dates and, at the fingerprint level, the registered pins. Like Exchange's
Validate-OutboundConnector. DNS errors, timeouts and refusals are per-host results, never
tracebacks. The exit status is 0 when every probed host passes, 1 otherwise.
"""

from __future__ import annotations

import _ssl  # the certificate encoding constant of get_unverified_chain()
import argparse
import io
import json
import smtplib
import socket
import ssl
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.resolver
from cryptography import x509

from tlsgate import certs
from tlsgate.cli import CommandError, Context
from tlsgate.model import OutboundConnector, TlsLevel, tls_version_rank
from tlsgate.outbound import OutboundIndex
from tlsgate.patterns import CertNamePattern, DomainKind, PatternError, normalise_domain, parse_address
from tlsgate.snapshot import Snapshot
from tlsgate.store import StoreError, load

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MIN_KEY_BITS = {"RSA": 2048, "EC": 256, "Ed25519": 256, "Ed448": 448}
MAX_HOSTS = 10  # per domain: more MX hosts than this are not probed


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class HostResult:
    host: str
    port: int
    address: str | None = None
    error: str | None = None
    starttls: bool | None = None
    tls_version: str | None = None
    cipher: str | None = None
    chain: list[dict[str, Any]] = field(default_factory=list)
    verified: bool | None = None
    verify_error: str | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.ok for c in self.checks)


@dataclass
class DomainResult:
    domain: str
    connector: str | None
    level: str | None
    source: str  # "mx", "implicit mx", "smart host" or "none"
    error: str | None = None
    hosts: list[HostResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.hosts) and all(h.ok for h in self.hosts)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "probe",
        help="connect to partner mail servers and check them against the outbound connectors",
        description="Look up the MX hosts of each DOMAIN (or the smart hosts of its outbound "
        "connector), connect, STARTTLS and report the TLS version, cipher and certificate, and "
        "whether the outbound connector's requirements would pass.",
    )
    p.add_argument("domains", nargs="*", metavar="DOMAIN")
    p.add_argument("--all", action="store_true", help="probe every domain of every enabled outbound connector")
    p.add_argument("--nameserver", metavar="IP[:PORT]", help="DNS server to ask instead of the system resolver")
    p.add_argument("--port", type=int, default=25, help="SMTP port (default 25)")
    p.add_argument("--cafile", help="CA bundle for chain validation (default: the system bundle)")
    p.add_argument("--timeout", type=float, default=20.0,
                   help="seconds each connection step may take in all (default 20)")
    p.add_argument("--helo", default=None, help="EHLO name (default: this host's name)")
    p.add_argument("--no-rules", action="store_true", help="do not read the rule database; default requirements")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=cmd_probe)


# --------------------------------------------------------------------------- DNS


def make_resolver(nameserver: str | None, timeout: float) -> dns.resolver.Resolver:
    if nameserver is None:
        try:
            resolver = dns.resolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration as exc:
            raise CommandError(f"no system DNS resolver: {exc}; use --nameserver") from None
    else:
        host, port = nameserver, 53
        if nameserver.count(":") == 1:  # IPv4:port; a bare IPv6 address has several colons
            host, _, raw_port = nameserver.partition(":")
            if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
                raise CommandError(f"--nameserver {nameserver!r}: bad port", 2)
            port = int(raw_port)
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [host.strip("[]")]
        resolver.port = port
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, 5.0)
    return resolver


def _dns_error(what: str, exc: Exception) -> str:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return f"{what}: no such domain"
    if isinstance(exc, dns.resolver.NoNameservers):
        return f"{what}: no DNS server answered (SERVFAIL or refused)"
    if isinstance(exc, dns.exception.Timeout):
        return f"{what}: DNS timeout"
    return f"{what}: DNS error: {exc}"


def mx_hosts(resolver: dns.resolver.Resolver, domain: str) -> tuple[list[str], str]:
    """MX hosts by preference, or the domain itself when it has no MX (RFC 5321 5.1)."""
    try:
        answer = resolver.resolve(domain, "MX")
    except dns.resolver.NoAnswer:
        return [domain], "implicit mx"
    records = sorted(answer, key=lambda r: (r.preference, str(r.exchange)))
    hosts = [str(r.exchange).rstrip(".").lower() for r in records]
    if hosts == [""]:
        raise LookupError("null MX: the domain accepts no mail")
    return hosts, "mx"


def address_of(resolver: dns.resolver.Resolver, host: str) -> str:
    if parse_address(host) is not None:
        return host  # a smart host given by its address
    try:
        answer = resolver.resolve(host, "A")
    except dns.resolver.NoAnswer:
        answer = resolver.resolve(host, "AAAA")
    return str(sorted(answer, key=str)[0])


# --------------------------------------------------------------------------- SMTP + TLS


class _Smtp(smtplib.SMTP):
    """smtplib with a deadline per step, and the peer's certificate chain kept after STARTTLS.

    smtplib's timeout bounds each read, not a reply: a server sending a byte now and then would
    hold the probe for ever. Here a step (``begin``) has ``timeout`` seconds in all, and each
    read and the TLS handshake wait only for what is left of them.
    """

    step: str
    _deadline: float

    def __init__(self, timeout: float, helo: str) -> None:
        super().__init__(timeout=timeout, local_hostname=helo)
        self.begin("connect")

    def begin(self, step: str) -> None:
        self.step = step
        self._deadline = time.monotonic() + self.timeout
        if self.sock is not None:
            self.sock.settimeout(self.timeout)

    def left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        """smtplib's hook between the connection and the greeting."""
        sock = socket.create_connection((host, port), timeout, self.source_address)
        self.begin("greeting")
        return sock

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:
            self.file = io.BufferedReader(_DeadlineReader(self.sock, self.left))
        return super().getreply()

    def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """smtplib's starttls(), with the handshake in the step's time."""
        code, text = self.docmd("STARTTLS")
        if code != 220:
            raise smtplib.SMTPResponseException(code, text)
        assert self.sock is not None
        self.step = "TLS handshake"
        self.sock.settimeout(self.left())
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        self.file = self.helo_resp = self.ehlo_resp = None
        self.esmtp_features, self.does_esmtp = {}, False

    def raw_chain(self) -> list[bytes]:
        sock = self.sock
        if not isinstance(sock, ssl.SSLSocket):
            return []
        # Python < 3.13 has the chain only on the private object; the leaf is always there.
        getter = getattr(getattr(sock, "_sslobj", None), "get_unverified_chain", None)
        if getter is not None:
            chain = getter() or []
            return [c.public_bytes(_ssl.ENCODING_DER) for c in chain]
        leaf = sock.getpeercert(binary_form=True)
        return [leaf] if leaf else []


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, the timeout of each re-armed to what is left of the step."""

    def __init__(self, sock: socket.socket, left: Callable[[], float]) -> None:
        super().__init__()
        self._sock = sock
        self._left = left

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        self._sock.settimeout(self._left())
        return self._sock.recv_into(buffer)


def _handshake(smtp: _Smtp, host: str, address: str, port: int, context: ssl.SSLContext) -> bool:
    """Connect, EHLO and STARTTLS; whether the server offers STARTTLS."""
    code, text = smtp.connect(address, port)
    if code != 220:
        raise smtplib.SMTPResponseException(code, text)
    smtp.begin("EHLO")
    smtp.ehlo()
    if not smtp.has_extn("starttls"):
        return False
    smtp.begin("STARTTLS")
    smtp.start_tls(context, host)  # the SNI name, as Postfix sends the MX host name
    return True


def _contexts(cafile: str | None) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    verifying = ssl.create_default_context(cafile=cafile)
    verifying.check_hostname = False  # names are judged below, with the connector's rules
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    for ctx in (verifying, lax):
        # Report old servers as they are rather than failing the handshake: the version
        # check below says whether the connector accepts it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    return verifying, lax


def probe_host(result: HostResult, helo: str, timeout: float, cafile: str | None) -> list[x509.Certificate]:
    """Fill ``result`` with what the server offers; returns the chain (leaf first)."""
    assert result.address is not None
    verifying, lax = _contexts(cafile)
    smtp = _Smtp(timeout, helo)
    try:
        try:
            offered = _handshake(smtp, result.host, result.address, result.port, verifying)
            result.verified = offered or None
        except ssl.SSLCertVerificationError as exc:
            result.verified = False
            result.verify_error = exc.verify_message or str(exc)
            smtp.close()
            smtp = _Smtp(timeout, helo)
            offered = _handshake(smtp, result.host, result.address, result.port, lax)
        result.starttls = offered
        if not offered:
            return []
        sock = smtp.sock
        assert isinstance(sock, ssl.SSLSocket)
        result.tls_version = sock.version()
        cipher = sock.cipher()
        result.cipher = cipher[0] if cipher else None
        chain = [x509.load_der_x509_certificate(der) for der in smtp.raw_chain()]
        smtp.begin("QUIT")
        with _suppress_smtp():
            smtp.quit()
        return chain
    except TimeoutError:
        result.error = f"timed out after {timeout:g}s ({smtp.step})"
    except ConnectionRefusedError:
        result.error = "connection refused"
    except smtplib.SMTPResponseException as exc:
        text = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        result.error = f"server said {exc.smtp_code} {text}"
    except smtplib.SMTPServerDisconnected as exc:
        if isinstance(exc.__context__, TimeoutError):  # smtplib's word for a read or write that timed out
            result.error = f"timed out after {timeout:g}s ({smtp.step})"
        else:
            result.error = f"server disconnected: {exc}"
    except ssl.SSLError as exc:
        result.error = f"TLS handshake failed: {exc.reason or exc}"
    except OSError as exc:
        result.error = f"cannot connect: {exc.strerror or exc}"
    finally:
        smtp.close()
    return []


class _suppress_smtp:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        return exc_type is not None and issubclass(exc_type, (smtplib.SMTPException, OSError))


# --------------------------------------------------------------------------- judging


def describe_cert(cert: x509.Certificate, now: datetime) -> dict[str, Any]:
    try:
        key_type, key_bits = certs.key_info(cert)
    except certs.CertificateError as exc:
        key_type, key_bits = str(exc), 0
    return {
        "subject": cert.subject.rfc4514_string(),
        "dns_names": list(certs.dns_names(cert)),
        "issuer": cert.issuer.rfc4514_string(),
        "key": f"{key_type} {key_bits}",
        "not_before": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "validity": certs.validity_state(cert, now),
        "sha256": certs.fingerprint(cert, "sha256"),
        "pubkey_sha256": certs.pubkey_fingerprint(cert, "sha256"),
    }


def presented_names(cert: x509.Certificate) -> list[str]:
    """RFC 6125: DNS SANs when there are any, else the subject CN."""
    names = list(certs.dns_names(cert))
    if names:
        return names
    cn = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return [v if isinstance(v, str) else v.decode("utf-8", "replace") for v in cn]


def name_matches(reference: str, presented: list[str]) -> bool:
    if reference.startswith("."):  # Postfix's suffix form: any subdomain
        suffix = reference.lower()
        return any(p.lower().rstrip(".").endswith(suffix) and not p.startswith("*") for p in presented)
    try:
        pattern = CertNamePattern.parse(reference)
    except PatternError:
        return False
    return any(pattern.matches(p) for p in presented)


def reference_names(conn: OutboundConnector | None, domain: str, host: str, via_smart_host: bool) -> list[str]:
    if conn is not None and conn.match_names:
        return list(conn.match_names)
    level = conn.tls_level if conn is not None else TlsLevel.SECURE
    if level is TlsLevel.VERIFY or via_smart_host:
        return [host]  # Postfix's "hostname" strategy; with [relay] the next hop is the host
    return [domain, "." + domain]  # "nexthop:dot-nexthop", Postfix's default for secure


def judge(
    result: HostResult,
    chain: list[x509.Certificate],
    conn: OutboundConnector | None,
    snapshot: Snapshot | None,
    domain: str,
    via_smart_host: bool,
    now: datetime,
) -> None:
    checks = result.checks
    level = conn.tls_level if conn is not None else TlsLevel.SECURE
    checks.append(Check("starttls", bool(result.starttls), "offered" if result.starttls else "not offered: mail would stay queued"))
    if not result.starttls:
        return
    minimum = (conn.min_tls_version if conn is not None else None) or "TLSv1.2"
    have = tls_version_rank(result.tls_version or "")
    need = tls_version_rank(minimum)
    checks.append(Check(
        "min_tls_version",
        have is not None and need is not None and have >= need,
        f"{result.tls_version} (requires {minimum} or later)",
    ))
    if not chain:
        checks.append(Check("certificate", False, "the server sent no certificate"))
        return
    leaf = chain[0]
    state = certs.validity_state(leaf, now)
    days = (leaf.not_valid_after_utc - now).days
    checks.append(Check("expiry", state == "valid", f"{state}, expires {leaf.not_valid_after_utc:%Y-%m-%d} ({days} days)"))
    try:
        key_type, bits = certs.key_info(leaf)
        floor = MIN_KEY_BITS.get(key_type, 2048)
        checks.append(Check("key_strength", bits >= floor, f"{key_type} {bits} bits (at least {floor})"))
    except certs.CertificateError as exc:
        checks.append(Check("key_strength", False, str(exc)))
    if level in (TlsLevel.VERIFY, TlsLevel.SECURE):
        detail = "chains to a trusted CA" if result.verified else f"not trusted: {result.verify_error}"
        checks.append(Check("chain", bool(result.verified), detail))
        refs = reference_names(conn, domain, result.host, via_smart_host)
        names = presented_names(leaf)
        ok = any(name_matches(r, names) for r in refs)
        checks.append(Check("name", ok, f"certificate names {', '.join(names) or '(none)'}; required {' or '.join(refs)}"))
    elif level is TlsLevel.FINGERPRINT:
        partner = snapshot.by_name.get(conn.name) if snapshot is not None and conn is not None else None
        pins = partner.pins if partner is not None else ()
        ok = any(
            certs.fingerprint(leaf, "sha256") in p.cert_fingerprints
            or certs.pubkey_fingerprint(leaf, "sha256") in p.pubkey_fingerprints
            for p in pins
        )
        detail = "matches a registered certificate" if ok else (
            "does not match any registered certificate" if pins else "no certificate registered"
        )
        checks.append(Check("fingerprint", ok, detail))
    elif level in (TlsLevel.DANE, TlsLevel.DANE_ONLY):
        # dane-only sends nothing without a DNSSEC-validated TLSA match, which the probe does not
        # check: it cannot say such a connector's mail will go. dane falls back to encrypt.
        checks.append(Check("dane", level is TlsLevel.DANE,
                            "not checked: DANE needs DNSSEC-validated TLSA records"
                            + ("; at dane-only Postfix defers the mail without them" if level is TlsLevel.DANE_ONLY else "")))
        info = "chains to a trusted CA" if result.verified else f"not trusted: {result.verify_error}"
        checks.append(Check("chain (informational)", True, info))
    else:
        info = "chains to a trusted CA" if result.verified else f"not trusted: {result.verify_error}"
        checks.append(Check("chain (informational)", True, info))


# --------------------------------------------------------------------------- driving


def probe_domain(
    domain: str,
    conn: OutboundConnector | None,
    snapshot: Snapshot | None,
    resolver: dns.resolver.Resolver,
    args: argparse.Namespace,
    now: datetime,
) -> DomainResult:
    res = DomainResult(domain, conn.name if conn else None, conn.tls_level.value if conn else None, "none")
    targets: list[tuple[str, int]] = []
    via_smart_host = bool(conn and conn.smart_hosts)
    try:
        if conn is not None and conn.smart_hosts:
            res.source = "smart host"
            for h in conn.smart_hosts:
                hosts = mx_hosts(resolver, h.host)[0] if h.mx_lookup else [h.host]
                port = h.port if args.port == 25 else args.port
                targets += [(x, port) for x in hosts]
        else:
            hosts, res.source = mx_hosts(resolver, domain)
            targets = [(h, args.port) for h in hosts]
    except LookupError as exc:
        res.error = str(exc)
        return res
    except dns.exception.DNSException as exc:
        res.error = _dns_error(f"MX lookup for {domain}", exc)
        return res
    for host, port in targets[:MAX_HOSTS]:
        result = HostResult(host, port)
        res.hosts.append(result)
        try:
            result.address = address_of(resolver, host)
        except dns.exception.DNSException as exc:
            result.error = _dns_error(f"address of {host}", exc)
            continue
        chain = probe_host(result, args.helo, args.timeout, args.cafile)
        if result.error is None:
            result.chain = [describe_cert(c, now) for c in chain]
            judge(result, chain, conn, snapshot, domain, via_smart_host, now)
    return res


def _load_rules(ctx: Context) -> Snapshot:
    try:
        return load(ctx.engine).snapshot
    except StoreError as exc:
        raise CommandError(f"cannot read the rules: {exc} (use --no-rules to probe without them)") from None


def plan(args: argparse.Namespace, snapshot: Snapshot | None) -> list[tuple[str, OutboundConnector | None]]:
    index = OutboundIndex(snapshot) if snapshot is not None else None
    work: list[tuple[str, OutboundConnector | None]] = []
    if args.all:
        assert snapshot is not None
        for conn in sorted((c for c in snapshot.outbound if c.enabled), key=lambda c: c.name):
            exact = [p.domain for p in conn.recipient_domains if p.kind is DomainKind.EXACT]
            if not exact and conn.smart_hosts:
                exact = [conn.smart_hosts[0].host]
            work += [(d, conn) for d in exact]
    for raw in args.domains:
        domain = normalise_domain(raw)
        if domain is None:
            raise CommandError(f"{raw!r} is not a domain name", 2)
        work.append((domain, index.for_domain(domain) if index is not None else None))
    return work


def cmd_probe(args: argparse.Namespace, ctx: Context) -> int:
    if not args.domains and not args.all:
        raise CommandError("name at least one DOMAIN, or --all", 2)
    if args.all and args.no_rules:
        raise CommandError("--all needs the rules; drop --no-rules", 2)
    if not 0 < args.port < 65536:
        raise CommandError(f"--port {args.port} is not a port number", 2)
    if args.helo is None:
        args.helo = socket.getfqdn()  # here, not at parser build: it may ask DNS
    snapshot = None if args.no_rules else _load_rules(ctx)
    resolver = make_resolver(args.nameserver, args.timeout)
    work = plan(args, snapshot)
    now = datetime.now(UTC)
    results: list[DomainResult] = []
    progress = len(work) > 1
    for n, (domain, conn) in enumerate(work, 1):
        if progress:
            print(f"[{n}/{len(work)}] probing {domain} ...", file=sys.stderr, flush=True)
        results.append(probe_domain(domain, conn, snapshot, resolver, args, now))
    if args.json:
        doc = [dict(asdict(r), ok=r.ok, hosts=[dict(asdict(h), ok=h.ok) for h in r.hosts]) for r in results]
        print(json.dumps(doc, indent=2))
    else:
        for r in results:
            print(render(r))
    return 0 if all(r.ok for r in results) else 1


def render(r: DomainResult) -> str:
    head = f"{r.domain}: {'PASS' if r.ok else 'FAIL'}"
    head += f" (connector {r.connector}, level {r.level})" if r.connector else " (no outbound connector; judged as secure)"
    lines = [head]
    if r.error:
        lines.append(f"  error: {r.error}")
    for h in r.hosts:
        lines.append(f"  {h.host} [{h.address or '?'}]:{h.port}: {'PASS' if h.ok else 'FAIL'}")
        if h.error:
            lines.append(f"    error: {h.error}")
            continue
        if h.tls_version:
            lines.append(f"    tls: {h.tls_version} {h.cipher}")
        for i, c in enumerate(h.chain):
            lines.append(f"    cert[{i}]: {c['subject']} names={','.join(c['dns_names']) or '-'}")
            lines.append(f"             issuer={c['issuer']} key={c['key']} {c['not_before']}..{c['not_after']} ({c['validity']})")
        for check in h.checks:
            lines.append(f"    {'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    return "\n".join(lines)

