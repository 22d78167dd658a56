"""``tlsgate postfix-config`` and ``tlsgate doctor``: plugging tlsgate into an existing Postfix.

``postfix-config`` prints the main.cf lines for this installation's sockets. Sockets under
Postfix's queue directory are written relative to it (``unix:tlsgate/policy.sock``): every
Postfix daemon runs with the queue directory as its working directory, chrooted or not, so
the same line works in Debian's chrooted smtpd and in an unchrooted one.

``doctor`` reads a Postfix configuration with ``postconf -c DIR`` and the rule database and
reports each problem with its fix.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import stat
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tlsgate.cli import CommandError
from tlsgate.config import Config
from tlsgate.model import CertRequirement
from tlsgate.outbound import TLS_POLICY_MAP, TRANSPORT_MAP, OutboundIndex
from tlsgate.snapshot import Snapshot
from tlsgate.socketmap import Status
from tlsgate.store import StoreError, load

if TYPE_CHECKING:
    from tlsgate.cli import Context

TLS_MACROS = ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}")
DEFAULT_QUEUE = "/var/spool/postfix"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("postfix-config", help="print the main.cf lines that plug tlsgate into Postfix")
    p.add_argument("--queue-directory", default=None,
                   help=f"Postfix's queue_directory (default: asked from postconf, else {DEFAULT_QUEUE})")
    p.add_argument("--no-milter", action="store_true", help="leave out the milter lines")
    p.add_argument("--no-outbound", action="store_true", help="leave out the outbound (socketmap) lines")
    p.set_defaults(func=cmd_postfix_config)
    d = sub.add_parser("doctor", help="check a Postfix configuration against tlsgate's rules and sockets")
    d.add_argument("--postfix-dir", default="/etc/postfix", help="Postfix configuration directory (postconf -c)")
    d.set_defaults(func=cmd_doctor)


def _postconf(postfix_dir: str | None, *args: str) -> str:
    cmd = ["postconf"]
    if postfix_dir:
        cmd += ["-c", postfix_dir]
    try:
        r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise CommandError("postconf is not installed: is Postfix?") from None
    except subprocess.TimeoutExpired:
        raise CommandError("postconf did not answer within 30 seconds") from None
    if r.returncode != 0:
        first = (r.stderr.strip().splitlines() or ["failed"])[0]
        raise CommandError(f"postconf -c {postfix_dir}: {first}")
    return r.stdout


def _socket_path(listen: str) -> str | None:
    return listen[5:] if listen.startswith("unix:") else None


def postfix_endpoint(listen: str, queue_dir: str) -> str:
    """How Postfix names a socket: relative to the queue directory when it is inside it."""
    path = _socket_path(listen)
    if path is None:
        return listen  # inet:host:port is the same for both
    prefix = queue_dir.rstrip("/") + "/"
    if path.startswith(prefix):
        return "unix:" + path[len(prefix):]
    return "unix:" + path


def _first_unix(listens: tuple[str, ...]) -> str:
    for listen in listens:
        if listen.startswith("unix:"):
            return listen
    return listens[0]


def socketmap_listen(config: Config) -> str:
    section = getattr(config, "socketmap", None)
    listen = getattr(section, "listen", None)
    if isinstance(listen, tuple):
        return _first_unix(listen)
    return listen if isinstance(listen, str) else "unix:/var/spool/postfix/tlsgate/socketmap.sock"


def main_cf_lines(config: Config, queue_dir: str, *, milter: bool = True, outbound: bool = True) -> list[str]:
    policy = postfix_endpoint(_first_unix(config.policyd.listen), queue_dir)
    lines = [
        "# --- tlsgate: inbound TLS connectors (policy daemon) ---",
        "# Offer STARTTLS, ask clients for a certificate, and trust the CAs partners' certificates chain to.",
        "smtpd_tls_security_level = may",
        "smtpd_tls_ask_ccert = yes",
        "smtpd_tls_CAfile = /etc/ssl/certs/ca-certificates.crt",
        "smtpd_tls_fingerprint_digest = sha256",
        "smtpd_tls_received_header = yes",
        "# Relay control stays in smtpd_relay_restrictions; tlsgate answers DUNNO or REJECT/DEFER per recipient.",
        "# A policy service that does not answer within the timeout gets default_action: a 4xx, never a pass.",
        "smtpd_recipient_restrictions =",
        "    reject_unauth_destination,",
        f"    check_policy_service {{ {policy}, timeout=10s, default_action=DEFER_IF_PERMIT, max_idle=300s }}",
    ]
    if milter:
        sock = postfix_endpoint(config.milter.listen, queue_dir)
        lines += [
            "",
            "# --- tlsgate: the milter (header From connectors, trace header) ---",
            f"smtpd_milters = {sock}",
            "milter_default_action = tempfail",
            "milter_protocol = 6",
            "# The TLS macros at HELO (Postfix's default) and again at MAIL FROM, so clients that skip",
            "# the second EHLO after STARTTLS are still judged with their TLS facts.",
            f"milter_helo_macros = {' '.join(TLS_MACROS)}",
            "milter_mail_macros = i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} "
            "{mail_mailer} " + " ".join(TLS_MACROS),
        ]
    if outbound:
        sm = postfix_endpoint(socketmap_listen(config), queue_dir)
        lines += [
            "",
            "# --- tlsgate: outbound connectors (Postfix's SMTP client) ---",
            f"smtp_tls_policy_maps = socketmap:{sm}:tls_policy",
            f"transport_maps = socketmap:{sm}:transport",
            "smtp_tls_CAfile = /etc/ssl/certs/ca-certificates.crt",
        ]
    return lines


def cmd_postfix_config(args: argparse.Namespace, ctx: Context) -> int:
    queue_dir = args.queue_directory
    if queue_dir is None:
        try:
            queue_dir = _postconf(None, "-h", "queue_directory").strip() or DEFAULT_QUEUE
        except CommandError:
            queue_dir = DEFAULT_QUEUE
    print("# main.cf lines for tlsgate; `postconf -e` them or paste them, then `postfix reload`.")
    print("\n".join(main_cf_lines(ctx.config, queue_dir, milter=not args.no_milter, outbound=not args.no_outbound)))
    print("\n# master.cf: nothing to add; the daemons run as systemd services (systemd/ in the sources).")
    return 0


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning" | "ok"
    what: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.severity}: {self.what}" + (f"\n    fix: {self.fix}" if self.fix else "")


def _params(postfix_dir: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in _postconf(postfix_dir, "-x").splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            out[name.strip()] = value.strip()
        elif line.endswith(" ="):
            out[line[:-2].strip()] = ""
    return out


def _reachable_by_postfix(path: str) -> str | None:
    """None when user postfix can connect to the unix socket at ``path``; else why not."""
    try:
        pw = pwd.getpwnam("postfix")
    except KeyError:
        return "there is no user postfix"
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if "postfix" in g.gr_mem}
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path} does not exist ({exc.strerror}): is the daemon running?"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"

    def can(st_: os.stat_result, bits: tuple[int, int, int]) -> bool:
        if st_.st_uid == pw.pw_uid:
            return bool(st_.st_mode & bits[0])
        if st_.st_gid in groups:
            return bool(st_.st_mode & bits[1])
        return bool(st_.st_mode & bits[2])

    if not can(st, (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH)):
        return f"{path} is not writable by user postfix (mode {stat.S_IMODE(st.st_mode):04o})"
    parent = os.path.dirname(path)
    while parent and parent != "/":
        pst = os.stat(parent)
        if not can(pst, (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
            return f"directory {parent} is not searchable by user postfix (mode {stat.S_IMODE(pst.st_mode):04o})"
        parent = os.path.dirname(parent)
    return None


def diagnose(config: Config, params: dict[str, str], ctx: Context | None) -> list[Finding]:
    found: list[Finding] = []
    queue_dir = params.get("queue_directory", DEFAULT_QUEUE)
    restrictions = " ".join(params.get(p, "") for p in (
        "smtpd_client_restrictions", "smtpd_helo_restrictions", "smtpd_sender_restrictions",
        "smtpd_relay_restrictions", "smtpd_recipient_restrictions", "smtpd_end_of_data_restrictions"))
    policy_paths = [p for p in (_socket_path(listen) for listen in config.policyd.listen) if p]
    policy_names = {postfix_endpoint(listen, queue_dir) for listen in config.policyd.listen}
    uses_policyd = any(name in restrictions for name in policy_names)
    milter_name = postfix_endpoint(config.milter.listen, queue_dir)
    uses_milter = milter_name in params.get("smtpd_milters", "")

    needs_cert = needs_tls = False
    pinned: list[str] = []
    snap: Snapshot | None = None
    if ctx is not None:
        try:
            snap = load(ctx.engine).snapshot
        except StoreError as exc:
            found.append(Finding("error", f"cannot read the rule database: {exc}",
                                 "check [database] url in the configuration and that the database is up"))
            snap = None
        if snap is not None:
            for c in snap.inbound:
                if not c.enabled:
                    continue
                needs_tls = needs_tls or c.require_tls
                if c.certificate is not CertRequirement.NONE or c.cert_names or c.issuer_names:
                    needs_cert = True
                if c.certificate is CertRequirement.PINNED:
                    pinned.append(c.name)
    if not uses_policyd and not uses_milter:
        found.append(Finding("error", "neither the policy daemon nor the milter is in the Postfix configuration: "
                             "no connector is enforced",
                             "add the lines `tlsgate postfix-config` prints"))
    if pinned and uses_milter and not uses_policyd:
        found.append(Finding("error", f"pinned connectors ({', '.join(pinned)}) are enforced only by the milter, "
                             "which never sees a certificate fingerprint: their mail is deferred",
                             "add check_policy_service for the policy daemon to smtpd_recipient_restrictions"))
    if needs_tls and params.get("smtpd_tls_security_level", "") in ("", "none") and \
            params.get("smtpd_use_tls", "no") != "yes":
        found.append(Finding("error", "connectors require TLS but smtpd offers no STARTTLS "
                             f"(smtpd_tls_security_level = {params.get('smtpd_tls_security_level', '')!r})",
                             "smtpd_tls_security_level = may, with smtpd_tls_cert_file and smtpd_tls_key_file"))
    if needs_cert and params.get("smtpd_tls_ask_ccert", "no") != "yes":
        found.append(Finding("error", "connectors require client certificates but smtpd_tls_ask_ccert = no: "
                             "Postfix never asks for one, so those connectors fail every session",
                             "smtpd_tls_ask_ccert = yes"))
    if needs_cert and not (params.get("smtpd_tls_CAfile") or params.get("smtpd_tls_CApath")):
        found.append(Finding("error", "connectors require trusted client certificates but neither "
                             "smtpd_tls_CAfile nor smtpd_tls_CApath is set: no certificate can verify",
                             "smtpd_tls_CAfile = the CA bundle your partners' certificates chain to"))
    digest = params.get("smtpd_tls_fingerprint_digest", "")
    if pinned and digest.lower() not in ("sha256", "sha1", "md5"):
        found.append(Finding("error", f"smtpd_tls_fingerprint_digest = {digest!r}: tlsgate pins sha256, sha1 and md5 fingerprints",
                             "smtpd_tls_fingerprint_digest = sha256"))
    elif pinned and digest.lower() != "sha256":
        found.append(Finding("warning", f"smtpd_tls_fingerprint_digest = {digest}: pins still match, but "
                             f"{digest} is weaker than sha256", "smtpd_tls_fingerprint_digest = sha256"))
    if uses_milter:
        helo = params.get("milter_helo_macros", "")
        mail = params.get("milter_mail_macros", "")
        missing = [m for m in TLS_MACROS if m not in helo and m not in mail]
        if missing:
            found.append(Finding("error", f"the milter never receives {' '.join(missing)}: it cannot see TLS",
                                 f"milter_helo_macros = {' '.join(TLS_MACROS)}"))
        elif any(m not in mail for m in TLS_MACROS):
            found.append(Finding("warning", "milter_mail_macros lacks the TLS macros: a client that skips the "
                                 "second EHLO after STARTTLS is judged as plaintext",
                                 "add " + " ".join(TLS_MACROS) + " to milter_mail_macros"))
        connect_macros = params.get("milter_connect_macros", "v").replace(",", " ").split()
        macro_v = params.get("milter_macro_v", "Postfix")  # postconf -x: $mail_name $mail_version expanded
        if needs_cert and ("v" not in connect_macros or macro_v.split(" ", 1)[0] != "Postfix"):
            found.append(Finding("error", "the milter cannot tell that the MTA is Postfix (milter_connect_macros "
                                 f"lacks v, or milter_macro_v = {macro_v!r} does not start with Postfix): it counts "
                                 "no client certificate name, so connectors that require a certificate fail every "
                                 "session it judges",
                                 "add v to milter_connect_macros; leave milter_macro_v and mail_name at their "
                                 "defaults ($mail_name $mail_version, Postfix)"))
        if params.get("milter_default_action", "tempfail") not in ("tempfail", "reject"):
            found.append(Finding("error", f"milter_default_action = {params.get('milter_default_action')}: "
                                 "mail passes unjudged whenever the milter is down",
                                 "milter_default_action = tempfail"))
        path = _socket_path(config.milter.listen)
        if path:
            why = _reachable_by_postfix(path)
            if why:
                found.append(Finding("error", f"milter socket: {why}",
                                     "start tlsgate-milter; the socket must be group postfix, mode 0660, in a "
                                     "directory postfix can search"))
    if uses_policyd:
        for path in policy_paths:
            why = _reachable_by_postfix(path)
            if why:
                found.append(Finding("error", f"policy socket: {why}",
                                     "start tlsgate-policyd (or its .socket unit); the socket must be group "
                                     "postfix, mode 0660, in a directory postfix can search"))
        if "timeout=" not in restrictions:
            found.append(Finding("warning", "the policy service has no explicit timeout",
                                 "check_policy_service { ..., timeout=10s, default_action=DEFER_IF_PERMIT }"))
    found += _outbound_findings(config, params, snap)
    if not found:
        found.append(Finding("ok", "no problems found"))
    return found


# Domains this Postfix delivers itself: an outbound connector's "smtp:" would send them away.
_LOCAL_DOMAIN_PARAMS = ("mydestination", "virtual_mailbox_domains", "virtual_alias_domains")


def _table_names(value: str) -> list[str]:
    return [v for v in value.replace(",", " ").split() if v]


def _outbound_findings(config: Config, params: dict[str, str], snap: Snapshot | None) -> list[Finding]:
    """The socketmap's place in main.cf: routes that could bypass it, domains it must not route."""
    queue_dir = params.get("queue_directory", DEFAULT_QUEUE)
    policy_tables = _table_names(params.get("smtp_tls_policy_maps", ""))
    transport_tables = _table_names(params.get("transport_maps", ""))

    def tlsgate_table(tables: list[str], map_name: str) -> str | None:
        # Any socketmap serving tlsgate's map name: the socket may be spelt in several ways.
        return next((t for t in tables if t.startswith("socketmap:") and t.endswith(":" + map_name)), None)

    ours = tlsgate_table(transport_tables, TRANSPORT_MAP)
    if tlsgate_table(policy_tables, TLS_POLICY_MAP) is None and ours is None:
        return []
    found: list[Finding] = []
    if ours is None:
        table = f"socketmap:{postfix_endpoint(socketmap_listen(config), queue_dir)}:{TRANSPORT_MAP}"
        found.append(Finding("error", "smtp_tls_policy_maps asks tlsgate but transport_maps does not: smart hosts "
                             "are not used, and relayhost or relay_transport can take a connector's mail to a "
                             "next hop whose TLS policy tlsgate does not know",
                             f"transport_maps = {table}"))
    elif transport_tables[0] != ours:
        earlier = ", ".join(transport_tables[: transport_tables.index(ours)])
        found.append(Finding("warning", f"transport_maps asks {earlier} before tlsgate: an entry there for a "
                             "connector's domain routes its mail to a next hop whose TLS policy tlsgate may not know",
                             f"list {ours} first in transport_maps, or keep the other tables free of those domains"))
    service = params.get("default_transport", "smtp").split(":", 1)[0].strip()
    if service and service != config.socketmap.transport:
        found.append(Finding("warning", f"default_transport = {params.get('default_transport')}, but tlsgate's transport "
                             f"answers name the {config.socketmap.transport} service ([socketmap] transport): mail to "
                             "a connector's domains leaves through it, with its own master.cf settings",
                             f"[socketmap] transport = {service}, if connectors' mail should leave that way"))
    relays = [f"{name} = {params[name]}" for name in ("relayhost", "sender_dependent_relayhost_maps")
              if params.get(name)]
    if relays:
        found.append(Finding("warning", f"{' and '.join(relays)}: mail to an outbound connector's domains does "
                             "not go there. tlsgate's transport answer (the connector's smart hosts, or smtp: for "
                             "the domain's own MX hosts) overrides it, so the connector's TLS policy applies to the "
                             "host that really receives the mail; if this server cannot reach those MX hosts "
                             "directly, that mail waits in the queue",
                             "to send a connector's mail through the relay, add the relay as its smart host "
                             "(outbound_smart_host): the relay must then meet the connector's TLS level"))
    if snap is not None:
        index = OutboundIndex(snap, config.socketmap.transport)
        for name in _LOCAL_DOMAIN_PARAMS:
            for domain in _table_names(params.get(name, "")):
                if ":" in domain or "/" in domain:
                    continue  # a lookup table: its domains are not known here
                answer = index.transport(f"postmaster@{domain}")
                if answer.reply.status is not Status.NOTFOUND:
                    found.append(Finding("error", f"outbound connector {answer.connector} covers {domain}, which "
                                         f"this Postfix delivers itself ({name}): tlsgate would route its mail "
                                         "away by SMTP",
                                         f"remove {domain} from the outbound_domain rows of {answer.connector}"))
        # Relayed domains: as a backup MX, tlsgate's route is Postfix's own (the best MX), but
        # a gateway that hands them to an inside host by another route would lose that route.
        for domain in _table_names(params.get("relay_domains", "")):
            if ":" in domain or "/" in domain:
                continue
            answer = index.transport(f"postmaster@{domain}")
            if answer.reply.status is not Status.NOTFOUND:
                found.append(Finding("warning", f"outbound connector {answer.connector} covers {domain}, which "
                                     "this Postfix relays for (relay_domains): tlsgate routes its mail to the "
                                     f"connector's smart hosts or the domain's MX hosts ({answer.reply.data}), over "
                                     "any other route; if this server is that MX, the mail loops back here",
                                     f"remove {domain} from the outbound_domain rows of {answer.connector}, or "
                                     "give the connector the inside host as its smart host"))
    return found


def cmd_doctor(args: argparse.Namespace, ctx: Context) -> int:
    params = _params(args.postfix_dir)
    findings = diagnose(ctx.config, params, ctx)
    for f in findings:
        print(f)
    errors = sum(1 for f in findings if f.severity == "error")
    return 1 if errors else 0
