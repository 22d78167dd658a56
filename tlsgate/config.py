"""The configuration file shared by every tlsgate daemon and the CLI.

An INI file (default ``/etc/tlsgate/tlsgate.conf``, or ``TLSGATE_CONFIG``) parsed once, at
start, into frozen dataclasses. An unknown section or key, or a value of the wrong kind, is a
:class:`ConfigError` naming the file, the key and the value; daemons exit with status 78
(EX_CONFIG) on it. ``TLSGATE_DATABASE_URL`` overrides ``[database] url``.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from tlsgate.patterns import PatternError, to_a_label
from tlsgate.store import DEFAULT_DATABASE_URL, StoreError, check_url

log = logging.getLogger("tlsgate.config")

DEFAULT_PATH = "/etc/tlsgate/tlsgate.conf"
#: where postconf is when PATH does not say (spawn(8) passes export_environment only)
POSTCONF = "/usr/sbin/postconf"
EX_CONFIG = 78


class ConfigError(Exception):
    """A configuration problem, worded as one line for an administrator."""


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = DEFAULT_DATABASE_URL
    poll_interval: float = 2.0
    connect_timeout: float = 5.0
    #: seconds any one statement may take, lock waits included; a daemon whose poll has had no
    #: answer for connect_timeout + 1.5 x this long reports the database unreachable
    query_timeout: float = 30.0


@dataclass(frozen=True)
class EngineConfig:
    #: what to answer before any rules could ever be loaded: never a pass
    unknown_rules_action: str = "defer"
    unknown_rules_text: str = "TLS policy rules are not available, try again later"
    #: the domain Postfix appends to an address without one: "auto" (asked from postconf when
    #: a daemon starts), a domain, or "none"
    myorigin: str = "auto"


@dataclass(frozen=True)
class PolicydConfig:
    listen: tuple[str, ...] = ("unix:/var/spool/postfix/tlsgate/policy.sock",)
    socket_mode: int = 0o660
    socket_group: str = "postfix"
    max_line: int = 8192
    max_attributes: int = 256
    max_request: int = 65536
    idle_timeout: float = 300.0
    request_timeout: float = 30.0
    max_connections: int = 2000
    monitor_prepend: bool = False
    #: loopback HOST:PORT for Prometheus metrics; empty: none
    metrics: str = ""


@dataclass(frozen=True)
class MilterConfig:
    listen: str = "unix:/var/spool/postfix/tlsgate/milter.sock"
    socket_mode: int = 0o660
    socket_group: str = "postfix"
    timeout: float = 600.0
    trace_header: bool = True
    header_name: str = "X-TLSgate"
    #: loopback HOST:PORT for Prometheus metrics; empty: none
    metrics: str = ""
    #: what the milter does with a connector that needs a certificate fingerprint, which
    #: Postfix never gives a milter: "tempfail", or "policyd" to leave it to the policy daemon
    pinned_action: str = "tempfail"


@dataclass(frozen=True)
class SocketmapConfig:
    listen: tuple[str, ...] = ("unix:/var/spool/postfix/tlsgate/socketmap.sock",)
    socket_mode: int = 0o660
    socket_group: str = "postfix"
    idle_timeout: float = 300.0
    #: seconds a request may take to arrive whole, from its first byte, and an answer to be taken
    request_timeout: float = 10.0
    max_connections: int = 2000
    #: the master.cf service the transport answers name: the one outbound mail leaves by
    transport: str = "smtp"


@dataclass(frozen=True)
class DnsConfig:
    """The resolver for address entries that name DNS (a:, mx:, spf:)."""

    #: nameservers to ask, IP addresses; empty: the system's /etc/resolv.conf
    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 3.0
    min_ttl: int = 60
    max_ttl: int = 86400
    #: seconds an entry keeps its last ranges once DNS answers it with no addresses
    empty_grace: int = 86400


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    target: str = "auto"  # auto: stderr under systemd, syslog otherwise
    syslog_socket: str = "/dev/log"


@dataclass(frozen=True)
class Config:
    path: str | None = None
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    policyd: PolicydConfig = field(default_factory=PolicydConfig)
    milter: MilterConfig = field(default_factory=MilterConfig)
    log: LogConfig = field(default_factory=LogConfig)
    socketmap: SocketmapConfig = field(default_factory=SocketmapConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)


_SECTIONS: dict[str, type[Any]] = {
    "database": DatabaseConfig,
    "engine": EngineConfig,
    "policyd": PolicydConfig,
    "milter": MilterConfig,
    "log": LogConfig,
    "socketmap": SocketmapConfig,
    "dns": DnsConfig,
}

_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("engine", "unknown_rules_action"): ("defer", "reject"),
    ("milter", "pinned_action"): ("tempfail", "policyd"),
    ("log", "level"): ("debug", "info", "warning", "error"),
    ("log", "target"): ("auto", "syslog", "stderr"),
}

_LISTEN = re.compile(r"^(unix:/\S+|inet:(\[[0-9a-fA-F:.]+\]|[0-9.]+|localhost):\d{1,5})$")
_METRICS = re.compile(r"^(127\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[::1\]):\d{1,5}$")
_HEADER = re.compile(r"^[!-9;-~]{1,64}$")
_SERVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _convert(path: str, section: str, key: str, raw: str, default: Any) -> Any:
    where = f"{path}: [{section}] {key} = {raw!r}"
    value = raw.strip()
    choices = _CHOICES.get((section, key))
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}")
    if isinstance(default, bool):
        low = value.lower()
        if low in ("yes", "true", "on", "1"):
            return True
        if low in ("no", "false", "off", "0"):
            return False
        raise ConfigError(f"{where}: must be yes or no")
    if key.endswith("_mode"):
        if not re.fullmatch(r"0?[0-7]{3}", value):
            raise ConfigError(f"{where}: must be an octal mode such as 0660")
        return int(value, 8)
    if isinstance(default, int):
        if not re.fullmatch(r"\d+", value) or int(value) <= 0:
            raise ConfigError(f"{where}: must be a positive whole number")
        return int(value)
    if isinstance(default, float):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: must be a number of seconds") from None
        if not number > 0 or number > 86400:
            raise ConfigError(f"{where}: must be between 0 and 86400 seconds")
        return number
    if key == "nameservers":
        servers = tuple(v for v in re.split(r"[\s,]+", value) if v)
        for server in servers:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise ConfigError(f"{where}: {server!r} is not an IP address") from None
        return servers
    if isinstance(default, tuple):
        items = tuple(v for v in re.split(r"[\s,]+", value) if v)
        if not items:
            raise ConfigError(f"{where}: must name at least one socket")
        for item in items:
            if not _LISTEN.match(item):
                raise ConfigError(f"{where}: {item!r} is not unix:/PATH or inet:HOST:PORT")
        return items
    if key == "metrics":
        if value and not _METRICS.match(value):
            raise ConfigError(f"{where}: not a loopback HOST:PORT such as 127.0.0.1:9560")
        return value
    if key == "listen" and not _LISTEN.match(value):
        raise ConfigError(f"{where}: not unix:/PATH or inet:HOST:PORT")
    if section == "socketmap" and key == "transport" and not _SERVICE.match(value):
        raise ConfigError(f"{where}: not a master.cf service name")
    if key == "header_name" and not _HEADER.match(value):
        raise ConfigError(f"{where}: not a valid header field name")
    if key == "myorigin" and value.lower() not in ("auto", "none"):
        try:
            return to_a_label(value)
        except PatternError as exc:
            raise ConfigError(f"{where}: must be auto, none or a domain name ({exc})") from None
    if key == "myorigin":
        return value.lower()
    if not value and key != "unknown_rules_text":
        raise ConfigError(f"{where}: must not be empty")
    return value


def postconf_command() -> str:
    """postconf as PATH finds it, else where Postfix installs it (spawn(8) passes no PATH)."""
    return shutil.which("postconf") or POSTCONF


def resolve_myorigin(cfg: EngineConfig) -> str | None:
    """The domain Postfix appends to an address without one (``MAIL FROM:<root>``), so that
    the daemons judge the address Postfix will deliver; None when it cannot be known, and
    such addresses then get a temporary failure wherever a connector could apply."""
    if cfg.myorigin == "none":
        return None
    if cfg.myorigin != "auto":
        return cfg.myorigin
    try:
        done = subprocess.run([postconf_command(), "-xh", "myorigin"], capture_output=True, text=True, timeout=30,
                              check=False)
        if done.returncode == 0:
            value = done.stdout.strip()
            if value.startswith("/"):
                # Debian's Postfix takes a file here, and the first line of it: its default
                # main.cf has myorigin = /etc/mailname.
                with open(value, encoding="utf-8", errors="replace") as named:
                    value = named.readline().strip()
            return to_a_label(value)
        why = (done.stderr.strip().splitlines() or ["no answer"])[-1]
    except (OSError, subprocess.TimeoutExpired) as exc:
        why = str(exc)
    except PatternError as exc:
        why = f"{value!r}: {exc}"
    log.warning("cannot learn myorigin from postconf (%s): set [engine] myorigin; addresses without a domain "
                "get a temporary failure where a connector could apply", why)
    return None


def check_database_url(cfg: Config, environ: dict[str, str] | None = None) -> None:
    """Refuse a ``[database] url`` no engine can be made of (its syntax, its driver, the driver's
    settings), as a configuration error: a daemon would otherwise start, and answer temporary
    failures for ever. Nothing is connected to; a database that is down is no such error. The
    daemons call this; the CLI, whose ``--database-url`` may replace the URL and whose commands
    may need no database, finds such a URL when it opens the database."""
    try:
        check_url(cfg.database.url)
    except StoreError as exc:
        env = os.environ if environ is None else environ
        where = "TLSGATE_DATABASE_URL" if env.get("TLSGATE_DATABASE_URL") else f"{cfg.path or 'defaults'}: [database] url"
        raise ConfigError(f"{where}: {exc}") from None


def load_config(path: str | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read the configuration. With no explicit ``path`` a missing default file is fine."""
    env = os.environ if environ is None else environ
    explicit = path or env.get("TLSGATE_CONFIG")
    file_path = explicit or DEFAULT_PATH
    parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    if os.path.exists(file_path):
        try:
            with open(file_path, encoding="utf-8") as fh:
                parser.read_file(fh)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file_path}: cannot read: {exc}") from None
        except configparser.Error as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"{file_path}: {first}") from None
        for section in parser.sections():
            cls = _SECTIONS.get(section)
            if cls is None:
                raise ConfigError(
                    f"{file_path}: unknown section [{section}]; known: {', '.join(_SECTIONS)}"
                )
            defaults = {f.name: f.default for f in dataclasses.fields(cls)}
            for key, raw in parser.items(section):
                if key not in defaults:
                    raise ConfigError(
                        f"{file_path}: [{section}] unknown key {key!r} (value {raw!r}); "
                        f"known: {', '.join(defaults)}"
                    )
                sections[section][key] = _convert(file_path, section, key, raw, defaults[key])
    elif explicit:
        raise ConfigError(f"{file_path}: no such file")
    url = env.get("TLSGATE_DATABASE_URL")
    if url:
        sections["database"]["url"] = url
    cfg = Config(
        path=file_path if os.path.exists(file_path) else None,
        **{name: cls(**sections[name]) for name, cls in _SECTIONS.items()},
    )
    if cfg.dns.min_ttl > cfg.dns.max_ttl:
        raise ConfigError(f"{file_path}: [dns] min_ttl = {cfg.dns.min_ttl} is above max_ttl = "
                          f"{cfg.dns.max_ttl}: every answer would be kept longer than the most allowed")
    return cfg
