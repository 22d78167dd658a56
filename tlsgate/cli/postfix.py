"""``tlsgate postfix-config`` and ``tlsgate doctor``: plugging tlsgate into an existing Postfix.

``postfix-config`` prints the main.cf lines for this installation's sockets, merged with the
configuration postconf reads: tlsgate is added to the administrator's lists (restrictions,
milters, lookup tables), never put in their place, and settings that already suit it are kept;
without postconf it prints tlsgate's parts alone, marked to be merged by hand. Sockets under
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
import re
import socket
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tlsgate.cli import CommandError
from tlsgate.config import Config, postconf_command
from tlsgate.model import CertRequirement, TlsLevel
from tlsgate.outbound import TLS_POLICY_MAP, TRANSPORT_MAP, OutboundIndex
from tlsgate.snapshot import Snapshot
from tlsgate.socketmap import Status
from tlsgate.store import StoreError, load, server_warnings

if TYPE_CHECKING:
    from tlsgate.cli import Context

TLS_MACROS = ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}")
#: milter macro lists: the value this file starts from, and the macros tlsgate's milter needs in it
MACRO_LISTS = {
    "milter_helo_macros": ("", TLS_MACROS),
    "milter_mail_macros": ("i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}",
                           (*TLS_MACROS, "{mail_addr}")),
    "milter_rcpt_macros": ("i {rcpt_addr} {rcpt_host} {rcpt_mailer}", ("{rcpt_addr}",)),
}
DEFAULT_QUEUE = "/var/spool/postfix"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("postfix-config", help="print the main.cf lines that plug tlsgate into Postfix, merged "
                       "with the configuration postconf reads")
    p.add_argument("--queue-directory", default=None,
                   help=f"Postfix's queue_directory (default: asked from postconf, else {DEFAULT_QUEUE})")
    p.add_argument("--postfix-dir", default=None,
                   help="the Postfix configuration to merge with (postconf -c; default: postconf's own)")
    p.add_argument("--no-milter", action="store_true", help="leave out the milter lines")
    p.add_argument("--no-outbound", action="store_true", help="leave out the outbound (socketmap) lines")
    p.set_defaults(func=cmd_postfix_config)
    d = sub.add_parser("doctor", help="check a Postfix configuration against tlsgate's rules and sockets")
    d.add_argument("--postfix-dir", default="/etc/postfix", help="Postfix configuration directory (postconf -c)")
    d.set_defaults(func=cmd_doctor)


def _postconf(postfix_dir: str | None, *args: str) -> str:
    cmd = [postconf_command()]
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
        raise CommandError(f"postconf{' -c ' + postfix_dir if postfix_dir else ''}: {first}")
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


#: Restrictions that never accept (they answer DUNNO or refuse) and take no argument: tlsgate's
#: check may come after a leading run of them and still judge every recipient Postfix accepts.
_NEVER_ACCEPT = frozenset({
    "reject_unauth_destination", "defer_unauth_destination", "reject_unauth_pipelining",
    "reject_non_fqdn_recipient", "reject_non_fqdn_sender", "reject_unknown_recipient_domain",
    "reject_unknown_sender_domain", "reject_unlisted_recipient", "reject_unlisted_sender",
    "reject_unverified_recipient", "reject_unverified_sender",
})
#: Where smtpd finds its server certificate; all empty: no STARTTLS ("No server certs available").
_CERT_PARAMS = ("smtpd_tls_chain_files", "smtpd_tls_cert_file", "smtpd_tls_eccert_file", "smtpd_tls_dcert_file")
#: The main.cf parameters postfix-config merges with or checks.
_MERGED = (
    "queue_directory", "smtpd_recipient_restrictions", "smtpd_milters", "non_smtpd_milters",
    "milter_default_action", "milter_protocol", "milter_helo_macros", "milter_mail_macros",
    "smtpd_tls_security_level", "smtpd_use_tls", "smtpd_enforce_tls", "smtpd_tls_ask_ccert",
    "smtpd_tls_CAfile", "smtpd_tls_CApath", "smtpd_tls_fingerprint_digest", "smtpd_tls_received_header",
    *_CERT_PARAMS, "smtp_tls_policy_maps", "transport_maps", "smtp_tls_CAfile", "smtp_tls_CApath",
    "smtp_fallback_relay", "default_transport", "mail_version", "smtp_tls_fingerprint_digest",
    "smtp_dns_support_level", "smtp_host_lookup", "ignore_mx_lookup_error",
    # Postfix >= 3.10 only: older ones warn (on stderr) and print nothing for it.
    "tls_required_enable",
)
#: The master.cf service postfix-config proposes for connector mail when a fallback relay is set.
DEDICATED_SERVICE = "tlsgate-smtp"


def split_list(value: str) -> list[tuple[int, str]]:
    """Postfix's list syntax: items separated by commas or white space, ``{ ... }`` kept whole.
    Each item with its offset in ``value``."""
    items: list[tuple[int, str]] = []
    i, n = 0, len(value)
    while i < n:
        if value[i] in " \t\r\n,":
            i += 1
            continue
        start, depth = i, 0
        while i < n and (depth > 0 or value[i] not in " \t\r\n,"):
            depth += {"{": 1, "}": -1}.get(value[i], 0)
            i += 1
        items.append((start, value[start:i]))
    return items


def _items(value: str) -> list[str]:
    return [item for _, item in split_list(value)]


@dataclass(frozen=True)
class Current:
    """The Postfix configuration postfix-config adds tlsgate to: main.cf values as written
    (``raw``, ``$name`` references kept) and expanded, and master.cf services."""

    raw: dict[str, str]
    expanded: dict[str, str]
    #: ``service/type/parameter`` -> value of each ``-o`` (postconf -xP)
    service_params: dict[str, str]
    #: ``service/type`` -> its master.cf entry on one line (postconf -M)
    services: dict[str, str]
    where: str


def _name_values(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            out[name.strip()] = value.strip()
        elif line.endswith(" ="):
            out[line[:-2].strip()] = ""
    return out


def read_current(postfix_dir: str | None) -> Current:
    """What postconf says of the configuration in ``postfix_dir`` (None: postconf's default)."""
    services = {}
    for line in _postconf(postfix_dir, "-M").splitlines():
        fields = line.split()
        if len(fields) >= 2:
            services[f"{fields[0]}/{fields[1]}"] = line.strip()
    return Current(raw=_name_values(_postconf(postfix_dir, *_MERGED)),
                   expanded=_name_values(_postconf(postfix_dir, "-x", *_MERGED)),
                   service_params=_name_values(_postconf(postfix_dir, "-xP")),
                   services=services, where=postfix_dir or "postconf's default configuration")


def service_param(params: dict[str, str], service: str, name: str, default: str = "") -> tuple[str, str]:
    """(where it is set, value) of parameter ``name`` for the ``service`` (type unix) of master.cf,
    given main.cf's expanded parameters and master.cf's ``service/type/name`` ones: the
    service's ``-o`` when it has one, else main.cf's value, else ``default``."""
    key = f"{service}/unix/{name}"
    if key in params:
        return f"master.cf {service} -o {name}", params[key]
    return f"main.cf {name}", params.get(name, default)


def fallback_relay(params: dict[str, str], service: str) -> tuple[str, str]:
    """(where it is set, value) of smtp_fallback_relay for the ``service`` of master.cf; value '' if none."""
    return service_param(params, service, "smtp_fallback_relay")


def postfix_version(params: dict[str, str]) -> tuple[int, int] | None:
    """(major, minor) of postconf's mail_version (``3.10.2``, ``3.11-20250601``), None if unknown."""
    found = re.match(r"(\d+)\.(\d+)", params.get("mail_version", ""))
    return (int(found[1]), int(found[2])) if found else None


def honours_tls_required(params: dict[str, str]) -> bool:
    """Whether this Postfix obeys a ``TLS-Required: no`` message header (RFC 8689): 3.10 and
    later, where the SMTP client then skips smtp_tls_policy_maps and caps the TLS level at may
    (smtp_tls_policy.c, STATE_TLS_NOT_REQUIRED) unless tls_required_enable = no."""
    version = postfix_version(params)
    if version is None:
        return "tls_required_enable" in params  # postconf -x lists only the parameters it knows
    return version >= (3, 10)


#: What Postfix's dane_init() (smtp_tls_policy.c) needs before it uses DANE at all; without it
#: a "dane" policy falls back to "may" (opportunistic: plaintext when STARTTLS is not offered)
#: and a "dane-only" one defers every message. (parameter, its default, value to set, is the
#: value fine, what Postfix logs)
_DANE_NEEDS: tuple[tuple[str, str, str, Callable[[str], bool], str], ...] = (
    ("smtp_dns_support_level", "", "dnssec", lambda v: v.lower() == "dnssec",
     "dane configured with dnssec lookups disabled"),
    ("smtp_host_lookup", "dns", "dns", lambda v: "dns" in _items(v.lower()),
     "dane configured with dnssec lookups disabled"),
    ("ignore_mx_lookup_error", "no", "no", lambda v: v.lower() != "yes",
     "dane configured with MX lookup errors ignored"),
)
_DANE_LEVELS = (TlsLevel.DANE, TlsLevel.DANE_ONLY)


def recipient_restrictions(current: str, check: str) -> list[str]:
    """``current`` with tlsgate's ``check`` before the first entry that could accept a recipient
    (permit_*, an access table, another policy service): after a leading run of entries that
    never accept, so relay control stays first and tlsgate still judges every recipient."""
    items = split_list(current)
    cut = next((offset for offset, item in items if item not in _NEVER_ACCEPT), len(current))
    head = current[:cut].strip().rstrip(",").strip()
    tail = current[cut:].strip()
    return [part for part in (head, check, tail) if part]


def tlsgate_check(items: list[tuple[int, str]], policy: str) -> tuple[int, int, str | None] | None:
    """Where tlsgate's check_policy_service stands in a restriction list (its span in the
    list's text, and the first entry before it that could accept a recipient, which would let
    mail skip it), or None when the list does not ask tlsgate."""
    for i, (offset, item) in enumerate(items):
        # `check_policy_service ENDPOINT`, or `check_policy_service { ENDPOINT, options }`
        named = item == policy or (item.startswith("{") and policy in _items(item.strip("{}")))
        if named and i > 0 and items[i - 1][1] == "check_policy_service":
            accepting = next((entry for _, entry in items[: i - 1] if entry not in _NEVER_ACCEPT), None)
            return items[i - 1][0], offset + len(item), accepting
    return None


def _tables_first(current: str, ours: str) -> str:
    others = [t for t in _items(current) if t != ours]
    return ", ".join([ours, *others])


def _setting(name: str, lines: list[str], *, fold: bool = False) -> str:
    if len(lines) == 1 and not fold:
        return f"{name} = {lines[0]}"
    return f"{name} =\n    " + ",\n    ".join(lines)


def _kept(name: str, value: str, why: str) -> str:
    return f"# {name} = {value}: kept{(' (' + why + ')') if why else ''}"


def main_cf_lines(config: Config, queue_dir: str, current: Current | None = None, *,
                  milter: bool = True, outbound: bool = True,
                  outbound_levels: frozenset[TlsLevel] | None = None) -> list[str]:
    """tlsgate's main.cf lines, merged with ``current`` (lists extended, settings that already
    suit tlsgate kept); without it, tlsgate's parts alone with comments to merge them by hand.
    ``outbound_levels``: the TLS levels of the enabled outbound connectors, None when unknown."""
    raw = current.raw if current else {}
    now = current.expanded if current else {}
    policy = postfix_endpoint(_first_unix(config.policyd.listen), queue_dir)
    check = f"check_policy_service {{ {policy}, timeout=10s, default_action=DEFER_IF_PERMIT, max_idle=300s }}"
    lines = [
        "# --- tlsgate: inbound TLS connectors (policy daemon) ---",
        "# Offer STARTTLS, ask clients for a certificate, and trust the CAs partners' certificates chain to.",
    ]
    level = now.get("smtpd_tls_security_level", "")
    if level in ("may", "encrypt"):
        lines.append(_kept("smtpd_tls_security_level", level, "tlsgate needs may or encrypt"))
    elif not level and now.get("smtpd_enforce_tls") == "yes":
        lines.append("smtpd_tls_security_level = encrypt")
    else:
        lines.append("smtpd_tls_security_level = may")
    for name, value in (("smtpd_tls_ask_ccert", "yes"), ("smtpd_tls_received_header", "yes")):
        lines.append(_kept(name, value, "") if now.get(name) == value else f"{name} = {value}")
    if now.get("smtpd_tls_CAfile") or now.get("smtpd_tls_CApath"):
        lines.append(_kept("smtpd_tls_CAfile", raw.get("smtpd_tls_CAfile") or "",
                           "with smtpd_tls_CApath = " + raw["smtpd_tls_CApath"] if now.get("smtpd_tls_CApath") else
                           "partners' certificates must chain to a CA in it"))
    else:
        lines.append("smtpd_tls_CAfile = /etc/ssl/certs/ca-certificates.crt")
    digest = now.get("smtpd_tls_fingerprint_digest", "").lower()
    if digest in ("sha1", "md5"):
        lines.append(_kept("smtpd_tls_fingerprint_digest", digest, "tlsgate pins it too; sha256 is stronger, "
                           "but a change breaks fingerprint tables"))
    elif digest == "sha256":
        lines.append(_kept("smtpd_tls_fingerprint_digest", digest, ""))
    else:
        lines.append("smtpd_tls_fingerprint_digest = sha256")
    if current is None or not any(now.get(p) for p in _CERT_PARAMS):
        lines += [
            "# smtpd needs a server certificate, or it offers no STARTTLS (\"No server certs available\")"
            + ("" if current is None else ": none is configured") + ". For example:",
            "# smtpd_tls_chain_files = /etc/postfix/mx-key-and-chain.pem",
        ]
    lines += [
        "# Relay control stays in smtpd_relay_restrictions, which Postfix evaluates first. tlsgate comes",
        "# before anything that could accept a recipient (permit_*, access tables), so it judges every",
        "# recipient, and it never answers OK (only DUNNO, REJECT, DEFER): your entries keep deciding the rest.",
        "# A policy service that does not answer within the timeout gets default_action: a 4xx, never a pass.",
    ]
    existing = raw.get("smtpd_recipient_restrictions", "")
    if current is None:
        lines += [
            "# MERGE BY HAND: put check_policy_service first in your smtpd_recipient_restrictions, or",
            "# after relay control and before any permit_* or access table, keeping your entries.",
            _setting("smtpd_recipient_restrictions", [check], fold=True),
        ]
    else:
        flat = " ".join(existing.split())
        found = tlsgate_check(split_list(flat), policy)
        if found is not None and found[2] is None:
            lines.append("# smtpd_recipient_restrictions: already asks tlsgate before anything that accepts, kept")
        else:
            if found is not None:  # after a permit: what that accepts skips tlsgate; move it
                start, end, accepting = found
                lines.append(f"# smtpd_recipient_restrictions asked tlsgate after {accepting}, which can accept a "
                             "recipient that then skips tlsgate: moved before it")
                flat = re.sub(r"\s*,(\s*,)+\s*", ", ", flat[:start] + flat[end:]).strip(" ,")
            merged = recipient_restrictions(flat, check)
            lines.append(_setting("smtpd_recipient_restrictions", merged, fold=True))
    if milter:
        lines += ["", "# --- tlsgate: the milter (header From connectors, trace header) ---"]
        lines += _milter_lines(config, queue_dir, current)
    if outbound:
        sm = postfix_endpoint(socketmap_listen(config), queue_dir)
        lines += ["", "# --- tlsgate: outbound connectors (Postfix's SMTP client) ---",
                  "# tlsgate's table first: it must win for connector domains; your tables answer the rest."]
        if current is None:
            lines.append("# MERGE BY HAND: tlsgate's table first, then the tables you have.")
        for name, map_name in (("smtp_tls_policy_maps", TLS_POLICY_MAP), ("transport_maps", TRANSPORT_MAP)):
            ours = f"socketmap:{sm}:{map_name}"
            tables = _items(raw.get(name, ""))
            if tables[:1] == [ours]:
                lines.append(_kept(name, ", ".join(tables), "tlsgate's table first"))
            else:
                lines.append(_setting(name, [_tables_first(raw.get(name, ""), ours)]))
        if now.get("smtp_tls_CAfile") or now.get("smtp_tls_CApath"):
            # Debian's main.cf names a CApath (/etc/ssl/certs) and no CAfile.
            ca = "smtp_tls_CAfile" if now.get("smtp_tls_CAfile") else "smtp_tls_CApath"
            lines.append(_kept(ca, raw.get(ca) or now[ca], "the CAs verify and secure connectors check against"))
        else:
            lines.append("smtp_tls_CAfile = /etc/ssl/certs/ca-certificates.crt")
        lines += _client_lines(current, outbound_levels)
    return lines


def _client_lines(current: Current | None, levels: frozenset[TlsLevel] | None) -> list[str]:
    """The SMTP client settings the socketmap's answers rely on (see _client_findings)."""
    now = current.expanded if current else {}
    lines: list[str] = []
    # Printed whatever the connectors are today: a fingerprint connector is one SQL row away,
    # nobody runs postfix-config again for it, and a digest other than sha256 then defers all
    # its mail. sha256 is also Postfix's own default from compatibility_level 3.6.
    digest = now.get("smtp_tls_fingerprint_digest", "").lower()
    if digest == "sha256":
        lines.append(_kept("smtp_tls_fingerprint_digest", digest, "the fingerprints tlsgate answers are sha256"))
    else:
        if digest:
            lines.append(f"# smtp_tls_fingerprint_digest was {digest}: fingerprint connectors pin sha256; fingerprints "
                         "in your own TLS policy tables must become sha256 ones too")
        lines.append("smtp_tls_fingerprint_digest = sha256")
    if levels is None:
        lines += ["# The outbound connectors could not be read. If any is at tls_level dane or dane-only, also set",
                  "# smtp_dns_support_level = dnssec (with a DNSSEC-validating resolver): without it Postfix",
                  "# treats dane as opportunistic (plaintext possible) and defers all dane-only mail."]
    elif levels & set(_DANE_LEVELS):
        lines += ["# Connectors at tls_level dane or dane-only: Postfix uses DANE only with DNSSEC lookups, which",
                  "# need a DNSSEC-validating resolver in /etc/resolv.conf. Without them dane is opportunistic",
                  "# (plaintext possible) and dane-only mail is all deferred."]
        for name, default, needed, fine, _ in _DANE_NEEDS:
            value = now.get(name, default)
            if not fine(value):
                lines.append(f"{name} = {needed}")
            elif value != default:  # set by the administrator, and suits DANE
                lines.append(_kept(name, value, ""))
    if current is None:
        lines += ["# Postfix 3.10 or later only (older ones warn about an unknown parameter): a \"TLS-Required: no\"",
                  "# header would make Postfix skip tlsgate's TLS policy for that message.",
                  "# tls_required_enable = no"]
    elif honours_tls_required(now):
        if now.get("tls_required_enable", "yes").lower() == "no":
            lines.append(_kept("tls_required_enable", "no", "a TLS-Required: no header cannot bypass the connectors"))
        else:
            lines += ["# Postfix >= 3.10 obeys a \"TLS-Required: no\" message header (RFC 8689) by skipping",
                      "# smtp_tls_policy_maps: any sender could bypass every outbound connector with it.",
                      "tls_required_enable = no"]
    return lines


def _milter_lines(config: Config, queue_dir: str, current: Current | None) -> list[str]:
    raw = current.raw if current else {}
    now = current.expanded if current else {}
    sock = postfix_endpoint(config.milter.listen, queue_dir)
    options = []
    action = now.get("milter_default_action", "tempfail")
    protocol = now.get("milter_protocol", "6")
    if action not in ("tempfail", "reject"):
        options.append("default_action=tempfail")  # for tlsgate's milter only: yours keep theirs
    if protocol != "6":
        options.append("protocol=6")
    entry = f"{{ {sock}, {', '.join(options)} }}" if options else sock
    lines: list[str] = []
    existing = raw.get("smtpd_milters", "")
    if current is None:
        lines.append("# MERGE BY HAND: append tlsgate's milter to the smtpd_milters you have.")
        lines.append(f"smtpd_milters = {sock}")
    elif sock in existing:
        lines.append("# smtpd_milters: already has tlsgate's milter, kept")
    else:
        lines.append(_setting("smtpd_milters", [", ".join([*_items(existing), entry])]))
        non_smtpd = raw.get("non_smtpd_milters", "")
        if re.search(r"\$(smtpd_milters\b|\{smtpd_milters\}|\(smtpd_milters\))", non_smtpd):
            # Locally submitted mail has no TLS session: tlsgate's milter has nothing to judge there.
            kept = re.sub(r"\$(smtpd_milters\b|\{smtpd_milters\}|\(smtpd_milters\))", lambda _: existing, non_smtpd)
            lines += ["# non_smtpd_milters named $smtpd_milters: it keeps the milters it had (tlsgate's judges SMTP only)",
                      f"non_smtpd_milters = {' '.join(kept.split())}".rstrip()]
    if current is None or action in ("tempfail", "reject"):
        lines.append("milter_default_action = tempfail" if current is None else
                     _kept("milter_default_action", action, "a milter that does not answer gives a 4xx"))
    if current is None:
        lines.append("milter_protocol = 6")
    lines += ["# The TLS macros at HELO (Postfix's default) and again at MAIL FROM, so clients that skip",
              "# the second EHLO after STARTTLS are still judged with their TLS facts; the envelope",
              "# addresses as Postfix read them (in its defaults)."]
    for name, (default, needed) in MACRO_LISTS.items():
        have = (raw.get(name, default) if current else default).replace(",", " ").split()
        missing = [m for m in needed if m not in have]
        if missing:
            lines.append(f"{name} = {' '.join([*have, *missing])}")
        elif name != "milter_rcpt_macros" or have != default.split():
            lines.append(_kept(name, " ".join(have), "has the macros tlsgate reads"))
    return lines


def master_cf_lines(config: Config, current: Current | None, *, outbound: bool = True) -> list[str]:
    """master.cf advice: nothing, unless a fallback relay would take connectors' mail (Postfix adds
    smtp_fallback_relay after every next hop, and tlsgate has no TLS policy for it)."""
    lines = ["# master.cf: the daemons run as systemd services (systemd/ in the sources)."]
    if not outbound:
        return lines
    service = config.socketmap.transport
    if current is None:
        return [*lines, f"# If smtp_fallback_relay is set, add -o smtp_fallback_relay= to the {service} service",
                "# tlsgate's transport answers name, or give connector mail a service of its own",
                "# ([socketmap] transport): see docs/outbound.md."]
    where, policy = service_param({**current.expanded, **current.service_params}, service, "smtp_tls_policy_maps")
    if where.startswith("master.cf") and not any(t.startswith("socketmap:") and t.endswith(":" + TLS_POLICY_MAP)
                                                 for t in _table_names(policy)):
        # The -o replaces main.cf's list for connector mail: the main.cf line above would not apply.
        lines += [f"# {where}={policy} replaces main.cf's smtp_tls_policy_maps for connector mail",
                  "# and does not ask tlsgate: remove that -o, or put tlsgate's table first in it."]
    where, relay = fallback_relay({**current.expanded, **current.service_params}, service)
    if not relay:
        return [*lines, "# No smtp_fallback_relay applies to connector mail."]
    default_service = current.expanded.get("default_transport", "smtp").split(":", 1)[0].strip() or "smtp"
    template = current.services.get(f"{service}/unix") or current.services.get("smtp/unix") or \
        f"{service} unix - - y - - smtp"
    fields = template.split()
    args: list[str] = []
    i = 8
    while i < len(fields):
        if fields[i] == "-o" and i + 1 < len(fields) and fields[i + 1].startswith("smtp_fallback_relay="):
            i += 2
            continue
        args.append(fields[i])
        i += 1
    if service == default_service:
        name = DEDICATED_SERVICE
        lines += [f"# {where} = {relay}: Postfix would hand connector mail that fails the connector's",
                  "# TLS check to that relay, under main.cf's default TLS level. Keep the fallback for your other",
                  f"# mail and give connector mail a service of its own without it (a copy of {service}):",
                  f"#   in tlsgate.conf: [socketmap] transport = {name}, then restart tlsgate-socketmap"]
    else:
        name = service
        lines += [f"# {where} = {relay}: Postfix would hand connector mail that fails the connector's",
                  "# TLS check to that relay, under main.cf's default TLS level. The service for connector mail:"]
    lines.append(" ".join([name, *fields[1:8]]) + "".join(f"\n  {a}" if a == "-o" else f" {a}" for a in args)
                 + "\n  -o smtp_fallback_relay=")
    return lines


def cmd_postfix_config(args: argparse.Namespace, ctx: Context) -> int:
    current: Current | None
    try:
        current = read_current(args.postfix_dir)
        why = ""
    except CommandError as exc:
        current, why = None, str(exc)
    queue_dir = args.queue_directory or (current.expanded.get("queue_directory") if current else None) \
        or DEFAULT_QUEUE
    if current is not None:
        print(f"# main.cf lines for tlsgate, merged with {current.where}: your entries are kept and tlsgate's")
        print("# added. Paste them (each replaces the line of the same name) or `postconf -e` them, then `postfix reload`.")
    else:
        print(f"# main.cf lines for tlsgate. postconf could not read the Postfix configuration ({why}),")
        print("# so these are tlsgate's parts alone: each REPLACES a line of the same name you may have.")
        print("# Merge them by hand where marked, then `postfix reload` and run `tlsgate doctor`.")
    levels: frozenset[TlsLevel] | None = None
    if not args.no_outbound:
        try:
            levels = frozenset(c.tls_level for c in load(ctx.engine).snapshot.outbound if c.enabled)
        except StoreError:
            pass  # postfix-config works before the database does: the lines then say what to check
    print("\n".join(main_cf_lines(ctx.config, queue_dir, current, milter=not args.no_milter,
                                  outbound=not args.no_outbound, outbound_levels=levels)))
    print()
    print("\n".join(master_cf_lines(ctx.config, current, outbound=not args.no_outbound)))
    return 0


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning" | "ok"
    what: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.severity}: {self.what}" + (f"\n    fix: {self.fix}" if self.fix else "")


def _params(postfix_dir: str) -> dict[str, str]:
    """main.cf's parameters, expanded, and master.cf's ``-o`` ones as ``service/type/name``."""
    return {**_name_values(_postconf(postfix_dir, "-x")), **_name_values(_postconf(postfix_dir, "-xP"))}


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
    # A socket file outlives a daemon killed without cleanup: only a connection shows a listener.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return f"nothing listens on {path} (connection refused): is the daemon running?"
        except OSError:
            pass  # not allowed to try, or too long a path: the checks above are all we know
    return None


def _listening(endpoint: str, queue_dir: str) -> str | None:
    """None when Postfix can connect to ``endpoint`` as main.cf names it (``unix:PATH``, relative
    to the queue directory, or ``inet:HOST:PORT``); else why not."""
    if endpoint.startswith("unix:"):
        return _reachable_by_postfix(os.path.join(queue_dir, endpoint[5:]))
    host, _, port = endpoint.removeprefix("inet:").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except (OSError, ValueError) as exc:
        return f"cannot connect to {endpoint}: {exc}"
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

    needs_cert = needs_tls = has_inbound = False
    pinned: list[str] = []
    snap: Snapshot | None = None
    if ctx is not None:
        try:
            snap = load(ctx.engine).snapshot
            found.extend(Finding("warning", w, "set sql_mode with STRICT_TRANS_TABLES in the MariaDB server's "
                                 "configuration and restart it") for w in server_warnings(ctx.engine))
        except StoreError as exc:
            found.append(Finding("error", f"cannot read the rule database: {exc}",
                                 "check [database] url in the configuration and that the database is up"))
            snap = None
        if snap is not None:
            for c in snap.inbound:
                if not c.enabled:
                    continue
                has_inbound = True
                needs_tls = needs_tls or c.require_tls
                if c.certificate is not CertRequirement.NONE or c.cert_names or c.issuer_names:
                    needs_cert = True
                if c.certificate is CertRequirement.PINNED:
                    pinned.append(c.name)
    if not uses_policyd and not uses_milter:
        found.append(Finding("error", "neither the policy daemon nor the milter is in the Postfix configuration: "
                             "no connector is enforced",
                             "add the lines `tlsgate postfix-config` prints"))
    # The recipient list is evaluated after smtpd_relay_restrictions: relay control there refuses
    # what the relay list permitted (an earlier `tlsgate postfix-config` printed such a line).
    recipient_items = _items(params.get("smtpd_recipient_restrictions", ""))
    guard = next((i for i, item in enumerate(recipient_items)
                  if item in ("reject_unauth_destination", "defer_unauth_destination")), len(recipient_items))
    relay_items = _items(params.get("smtpd_relay_restrictions", ""))
    lost = [p for p in ("permit_mynetworks", "permit_sasl_authenticated")
            if guard < len(recipient_items) and p in relay_items and p not in recipient_items[:guard]]
    if lost:
        item = recipient_items[guard]
        found.append(Finding("error", f"smtpd_recipient_restrictions has {item} without {' and '.join(lost)} before "
                             "it, which smtpd_relay_restrictions grants: those clients get \"Relay access denied\" "
                             "for mail to other domains",
                             f"remove {item} from smtpd_recipient_restrictions (relay control stays in "
                             f"smtpd_relay_restrictions), or put {', '.join(lost)} before it"))
    for listen in config.policyd.listen:
        placed = tlsgate_check(split_list(params.get("smtpd_recipient_restrictions", "")),
                               postfix_endpoint(listen, queue_dir))
        if placed is not None and placed[2] is not None:
            found.append(Finding("error", f"smtpd_recipient_restrictions asks tlsgate after {placed[2]}, which can "
                                 "accept a recipient: mail it accepts is never judged by tlsgate",
                                 f"move check_policy_service before {placed[2]} (`tlsgate postfix-config` prints "
                                 "the list with it moved)"))
    if pinned and uses_milter and not uses_policyd:
        found.append(Finding("error", f"pinned connectors ({', '.join(pinned)}) are enforced only by the milter, "
                             "which never sees a certificate fingerprint: their mail is deferred",
                             "add check_policy_service for the policy daemon to smtpd_recipient_restrictions"))
    if needs_tls and params.get("smtpd_tls_security_level", "") in ("", "none") and \
            params.get("smtpd_use_tls", "no") != "yes":
        found.append(Finding("error", "connectors require TLS but smtpd offers no STARTTLS "
                             f"(smtpd_tls_security_level = {params.get('smtpd_tls_security_level', '')!r})",
                             "smtpd_tls_security_level = may, with smtpd_tls_cert_file and smtpd_tls_key_file"))
    level = params.get("smtpd_tls_security_level", "")
    offers_tls = level in ("may", "encrypt") or (not level and "yes" in (params.get("smtpd_use_tls"),
                                                                        params.get("smtpd_enforce_tls")))
    if offers_tls and (has_inbound or snap is None) and not any(params.get(p) for p in _CERT_PARAMS):
        found.append(Finding("error", f"smtpd_tls_security_level = {level or 'may'} but smtpd has no server certificate "
                             f"({', '.join(_CERT_PARAMS[:3])} are empty): Postfix logs \"No server certs available. "
                             "TLS won't be enabled\" and answers STARTTLS with 454, so every connector that "
                             "requires TLS fails",
                             "smtpd_tls_chain_files = a PEM file with the key and the certificate chain (or "
                             "smtpd_tls_cert_file and smtpd_tls_key_file)"))
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
        for name, macro, status in (("milter_mail_macros", "{mail_addr}", "4.1.7"),
                                    ("milter_rcpt_macros", "{rcpt_addr}", "4.1.3")):
            value = params.get(name, MACRO_LISTS[name][0])
            if macro not in value.replace(",", " ").split():
                found.append(Finding("warning", f"{name} lacks {macro}: the milter sees the client's spelling only, "
                                     f"and one with RFC 822 syntax (a@example.com(x)) gets {status} where a "
                                     "connector could apply", f"add {macro} to {name}"))
        connect_macros = params.get("milter_connect_macros", "v").replace(",", " ").split()
        macro_v = params.get("milter_macro_v", "Postfix")  # postconf -x: $mail_name $mail_version expanded
        if needs_cert and ("v" not in connect_macros or macro_v.split(" ", 1)[0] != "Postfix"):
            found.append(Finding("error", "the milter cannot tell that the MTA is Postfix (milter_connect_macros "
                                 f"lacks v, or milter_macro_v = {macro_v!r} does not start with Postfix): it counts "
                                 "no client certificate name, so connectors that require a certificate fail every "
                                 "session it judges",
                                 "add v to milter_connect_macros; leave milter_macro_v and mail_name at their "
                                 "defaults ($mail_name $mail_version, Postfix)"))
        own = next((m for m in _items(params.get("smtpd_milters", "")) if milter_name in m), "")
        per_milter = re.search(r"default_action\s*=\s*(\w+)", own) if own.startswith("{") else None
        action = per_milter.group(1) if per_milter else params.get("milter_default_action", "tempfail")
        if action not in ("tempfail", "reject"):
            setting = f"default_action={action} in smtpd_milters" if per_milter else f"milter_default_action = {action}"
            found.append(Finding("error", f"{setting}: mail passes unjudged whenever the milter is down",
                                 "milter_default_action = tempfail, or { " + milter_name + ", default_action=tempfail } "
                                 "in smtpd_milters"))
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
    """The socketmap's place in main.cf and on the master.cf service connector mail leaves by:
    routes and settings that could bypass or weaken it, domains it must not route."""
    queue_dir = params.get("queue_directory", DEFAULT_QUEUE)
    service = config.socketmap.transport
    transport_tables = _table_names(params.get("transport_maps", ""))

    def tlsgate_table(tables: list[str], map_name: str) -> str | None:
        # Any socketmap serving tlsgate's map name: the socket may be spelt in several ways.
        return next((t for t in tables if t.startswith("socketmap:") and t.endswith(":" + map_name)), None)

    ours = tlsgate_table(transport_tables, TRANSPORT_MAP)
    main_policy = tlsgate_table(_table_names(params.get("smtp_tls_policy_maps", "")), TLS_POLICY_MAP)
    # The SMTP client that delivers connector mail reads smtp_tls_policy_maps for its own service:
    # a master.cf -o there replaces main.cf's list.
    policy_where, policy_value = service_param(params, service, "smtp_tls_policy_maps")
    ours_policy = tlsgate_table(_table_names(policy_value), TLS_POLICY_MAP)
    if ours_policy is None and main_policy is None and ours is None:
        return []
    found: list[Finding] = []
    # A transport_maps table that cannot answer makes smtpd answer 451 4.3.0 "Temporary lookup
    # failure" for every recipient, local ones too; a policy table, every delivery deferred.
    endpoints = {t[len("socketmap:"):t.rindex(":")] for t in (ours, main_policy, ours_policy) if t is not None}
    for endpoint in sorted(endpoints):
        why = _listening(endpoint, queue_dir)
        if why:
            found.append(Finding("error", f"socketmap socket ({endpoint}, in transport_maps or smtp_tls_policy_maps): "
                                 f"{why}; Postfix answers 451 4.3.0 Temporary lookup failure for every recipient, "
                                 "local ones too",
                                 "systemctl enable --now tlsgate-socketmap.socket tlsgate-socketmap.service; the "
                                 "socket must be group postfix, mode 0660, in a directory postfix can search"))
    in_use = snap is None or any(c.enabled for c in snap.outbound)
    if ours_policy is None:
        table = main_policy or f"socketmap:{postfix_endpoint(socketmap_listen(config), queue_dir)}:{TLS_POLICY_MAP}"
        level = service_param(params, service, "smtp_tls_security_level")[1] or "none"
        harm = ("no outbound connector's TLS level applies to the mail it delivers, which leaves under "
                f"smtp_tls_security_level = {level}" + (", possibly in plaintext" if level in ("none", "may") else ""))
        if policy_where.startswith("master.cf"):
            rest = [t for t in _table_names(policy_value) if t != table]
            found.append(Finding("error", f"{policy_where} = {policy_value or '(empty)'}: it replaces main.cf's "
                                 f"smtp_tls_policy_maps for the {service} service, by which connector mail leaves "
                                 f"([socketmap] transport), and does not ask tlsgate: {harm}",
                                 f"remove that -o from the {service} service in master.cf, or put tlsgate's table "
                                 f"first in it: -o smtp_tls_policy_maps={','.join([table, *rest])}"))
        else:
            found.append(Finding("error", "transport_maps asks tlsgate but smtp_tls_policy_maps does not: for the "
                                 f"{service} service, by which connector mail leaves, {harm}",
                                 f"smtp_tls_policy_maps = {table}"
                                 + "".join(", " + t for t in _table_names(policy_value))))
    found += _client_findings(params, service, snap, in_use)
    where, relay = fallback_relay(params, service)
    if in_use and relay:
        found.append(Finding("error", f"{where} = {relay}: Postfix adds the fallback relay after every next hop of "
                             f"the {config.socketmap.transport} service, which tlsgate's transport answers name "
                             "([socketmap] transport); tlsgate has no TLS policy for that relay, so a partner that "
                             "fails its connector's TLS check gets its mail through the relay under main.cf's "
                             "default TLS level, possibly in plaintext",
                             f"-o smtp_fallback_relay= on the {config.socketmap.transport} service in master.cf, or "
                             "a service of its own for connector mail named in [socketmap] transport "
                             "(`tlsgate postfix-config` prints one; docs/outbound.md)"))
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
                                     "any other route; if this server is that MX, Postfix bounces the mail (5.4.6, mail for "
                                     f"{domain} loops back to myself)",
                                     f"remove {domain} from the outbound_domain rows of {answer.connector}, or "
                                     "give the connector the inside host as its smart host"))
    return found


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:6])
    return shown + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def _set_it(where: str, service: str, name: str, value: str) -> str:
    """The fix for a parameter ``where`` sets: on the master.cf service when an -o sets it there."""
    if where.startswith("master.cf"):
        return f"-o {name}={value} on the {service} service in master.cf (or remove that -o and set it in main.cf)"
    return f"{name} = {value}"


def _client_findings(params: dict[str, str], service: str, snap: Snapshot | None, in_use: bool) -> list[Finding]:
    """The SMTP client settings, on the ``service`` connector mail leaves by, that silently
    weaken or block what the socketmap answers: DNSSEC for dane, the fingerprint digest, and
    the TLS-Required header."""
    found: list[Finding] = []
    enabled = [c for c in snap.outbound if c.enabled] if snap is not None else []
    dane = [c.name for c in enabled if c.tls_level is TlsLevel.DANE]
    dane_only = [c.name for c in enabled if c.tls_level is TlsLevel.DANE_ONLY]
    if dane or dane_only:
        harm = "; ".join(part for part in (
            f"outbound connectors at tls_level dane ({_names(dane)}) get opportunistic TLS instead, and their "
            "mail leaves in plaintext where the partner offers no STARTTLS" if dane else "",
            f"those at dane-only ({_names(dane_only)}) get all their mail deferred" if dane_only else "") if part)
        for name, default, needed, fine, logged in _DANE_NEEDS:
            where, value = service_param(params, service, name, default)
            if not fine(value):
                found.append(Finding("error", f"{where} = {value!r} for the {service} service, by which connector "
                                     f"mail leaves: Postfix uses no DANE then (it logs \"{logged}\"): {harm}",
                                     _set_it(where, service, name, needed)
                                     + ("; DANE also needs a DNSSEC-validating resolver in /etc/resolv.conf "
                                        "(Postfix trusts its AD bit; glibc 2.31 and later pass it on only with "
                                        "options trust-ad)" if needed == "dnssec" else "")))
    pinned = [c.name for c in enabled if c.tls_level is TlsLevel.FINGERPRINT]
    where, digest = service_param(params, service, "smtp_tls_fingerprint_digest")
    if pinned and digest.lower() != "sha256":
        found.append(Finding("error", f"{where} = {digest!r} for the {service} service: outbound connectors at "
                             f"tls_level fingerprint ({_names(pinned)}) pin sha256 fingerprints, which no "
                             f"{digest or 'other'} digest of a certificate matches: all their mail is deferred",
                             _set_it(where, service, "smtp_tls_fingerprint_digest", "sha256")))
    if in_use and honours_tls_required(params):
        where, value = service_param(params, service, "tls_required_enable", "yes")
        if value.lower() != "no":
            connectors = f"outbound connector ({_names([c.name for c in enabled])})" if enabled else \
                "outbound connector"
            found.append(Finding("error", f"{where} = {value} for the {service} service: Postfix "
                                 f"{params.get('mail_version', '3.10 or later')} obeys a \"TLS-Required: no\" "
                                 "message header (RFC 8689) by skipping smtp_tls_policy_maps and capping TLS at may, "
                                 f"so any sender who adds that header gets past every {connectors}, possibly in "
                                 "plaintext",
                                 _set_it(where, service, "tls_required_enable", "no")))
    return found


def cmd_doctor(args: argparse.Namespace, ctx: Context) -> int:
    params = _params(args.postfix_dir)
    findings = diagnose(ctx.config, params, ctx)
    for f in findings:
        print(f)
    errors = sum(1 for f in findings if f.severity == "error")
    return 1 if errors else 0
