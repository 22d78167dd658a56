"""A real, private Postfix instance on loopback for end-to-end tests, plus SMTP clients to
drive it. `PrivatePostfix` writes its own main.cf and master.cf into a fresh temp directory
(own queue, data and log directories, virtual maildirs, smtpd on a free 127.0.0.1 port with
the test PKI's server certificate and `smtpd_tls_ask_ccert = yes`), starts it with
`postfix -c DIR start`, waits until smtpd answers, and stops it by waiting on the master
pid. Tests add policy services and milters through extra main.cf parameters. `send` is an
smtplib client that records every reply instead of raising, with optional STARTTLS, a client
certificate, a TLS 1.2 cap and any 127.0.0.0/8 source address; `swaks` runs the swaks binary
for the same purposes."""

from __future__ import annotations

import email.message
import email.parser
import email.utils
import itertools
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from .pki import Pki

POSTFIX = Path("/usr/sbin/postfix")
POSTCONF = Path("/usr/sbin/postconf")
SWAKS = Path("/usr/bin/swaks")
# Where Debian installs master, smtpd & co. (daemon_directory) and postfix/postconf.
_POSTFIX_PROGRAMS = ("/usr/lib/postfix/", "/usr/sbin/post")

DEFAULT_DOMAINS = ("tlsgate.test", "example.test")
CLIENT_HELO = "client.tlsgate.test"

# virtual(8) delivers as this user, so it owns the mail directory. An unprivileged account
# other than postfix, with a uid above virtual_minimum_uid (100).
_MAIL_USER = "nobody"

_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 20.0
_POLL = 0.05
_LOG_TAIL_LINES = 40
_instance_numbers = itertools.count(1)


class PostfixError(Exception):
    """A private Postfix could not be configured, started, stopped or did not do what a
    test waited for. The message carries the command output and the maillog tail."""


def skip_reason() -> str | None:
    """Why the Postfix end-to-end tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    if not POSTFIX.exists():
        return f"{POSTFIX} is not installed"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no postfix user"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the caller must tolerate a rare race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _process_state(stat_path: Path) -> tuple[str, int] | None:
    """(state letter, process group) of a /proc/PID/stat file, None if the process is gone."""
    try:
        stat = stat_path.read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[2])


# A daemon reparented to an init that does not reap (as in some containers) stays a zombie;
# kill(pid, 0) would still succeed on it, so liveness is read from /proc instead.
_DEAD_STATES = ("Z", "X")


def _pid_alive(pid: int) -> bool:
    state = _process_state(Path(f"/proc/{pid}/stat"))
    return state is not None and state[0] not in _DEAD_STATES


def _is_postfix_program(proc_dir: Path) -> bool:
    try:
        return os.readlink(proc_dir / "exe").startswith(_POSTFIX_PROGRAMS)
    except OSError:
        return False


def _group_members(pgid: int) -> list[int]:
    """Live Postfix processes whose process group is `pgid`. Only Postfix programs count:
    a stale pid file must never get an unrelated process group killed."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = _process_state(entry / "stat")
            if (
                state is not None
                and state[1] == pgid
                and state[0] not in _DEAD_STATES
                and _is_postfix_program(entry)
            ):
                members.append(int(entry.name))
    return members


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def _run(args: Sequence[str], timeout: float = 60.0) -> tuple[int, str]:
    # Output goes to a file, not a pipe: `postfix start` leaves a daemon behind that could
    # inherit the pipe and keep subprocess waiting for an EOF that never comes.
    with tempfile.TemporaryFile() as output:
        completed = subprocess.run(
            list(args), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            timeout=timeout, check=False,
        )
        output.seek(0)
        return completed.returncode, output.read().decode("utf-8", "replace")


class PrivatePostfix:
    """A private Postfix instance in its own temp directory, usable as a context manager.

    Layout under `directory`: `etc/` (main.cf, master.cf, vmailbox), `queue/`, `data/`
    (owned by postfix), `log/maillog`, `mail/<domain>/` (one catch-all maildir per virtual
    domain, so any local part is accepted and delivered), and `sockets/`.

    Policy and milter sockets: smtpd runs as user postfix and connects to them itself, so a
    socket must sit in a directory postfix can traverse (every parent at least o+x) and be
    connectable by postfix: mode 0666, or group postfix with mode 0660. `socket_dir` is such a
    directory (0755, on a path postfix can traverse); create sockets there and chmod them.
    pytest's `tmp_path` is not suitable: its parents are mode 0700.

    Extra main.cf parameters (`main_cf`) override or extend the defaults, e.g.
    `{"smtpd_recipient_restrictions": f"check_policy_service unix:{sock}",
    "smtpd_milters": f"unix:{sock}", "milter_default_action": "tempfail"}`;
    `master_cf` lines are appended to master.cf. Both can be given to the constructor,
    to `start()` and to `reload()`.
    """

    def __init__(
        self,
        pki: Pki,
        *,
        name: str | None = None,
        domains: Sequence[str] = DEFAULT_DOMAINS,
        main_cf: Mapping[str, str] | None = None,
        master_cf: Sequence[str] = (),
        keep: bool = False,
    ) -> None:
        self.pki = pki
        # The name becomes multi_instance_name, hence the syslog_name prefix of every log
        # line ("tg3/smtpd[...]"), and part of myhostname, so instances are told apart.
        self.name = name if name is not None else f"tg{os.getpid()}-{next(_instance_numbers)}"
        self.myhostname = f"{self.name}.tlsgate.test"
        self.domains = tuple(domain.lower() for domain in domains)
        self.keep = keep
        self.port = free_port()
        self._main_cf: dict[str, str] = dict(main_cf or {})
        self._master_cf: list[str] = list(master_cf)
        self._master_pid: int | None = None

        self.directory = Path(tempfile.mkdtemp(prefix=f"tlsgate-postfix-{self.name}-"))
        # mkdtemp makes 0700; postfix-owned processes must traverse into queue/ and sockets/.
        self.directory.chmod(0o755)
        self.config_dir = self.directory / "etc"
        self.queue_dir = self.directory / "queue"
        self.data_dir = self.directory / "data"
        self.log_dir = self.directory / "log"
        self.mail_dir = self.directory / "mail"
        self.socket_dir = self.directory / "sockets"
        for path in (self.config_dir, self.queue_dir, self.data_dir):
            path.mkdir(mode=0o755)
        for path in (self.log_dir, self.mail_dir, self.socket_dir):
            path.mkdir(mode=0o755)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        mail_user = pwd.getpwnam(_MAIL_USER)
        os.chown(self.mail_dir, mail_user.pw_uid, mail_user.pw_gid)
        self.log_path = self.log_dir / "maillog"

    # ----------------------------------------------------------------- configuration

    def main_cf_parameters(self) -> dict[str, str]:
        """The main.cf this instance writes: defaults updated with the extra parameters."""
        mail_user = pwd.getpwnam(_MAIL_USER)
        outbound_off = "error:outbound mail is disabled in the tlsgate test instance"
        params = {
            "compatibility_level": "3.6",
            "multi_instance_name": self.name,
            "myhostname": self.myhostname,
            "mydomain": "tlsgate.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            # Nothing relays: mail for other domains is refused at RCPT instead of queued.
            "mynetworks": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            # No syslog in containers: postlogd writes this file (see master.cf).
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.log_dir),
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "default_transport": outbound_off,
            "relay_transport": outbound_off,
            "virtual_mailbox_domains": " ".join(self.domains),
            "virtual_mailbox_base": str(self.mail_dir),
            "virtual_mailbox_maps": f"texthash:{self.config_dir / 'vmailbox'}",
            "virtual_uid_maps": f"static:{mail_user.pw_uid}",
            "virtual_gid_maps": f"static:{mail_user.pw_gid}",
            "default_process_limit": "20",
            "smtpd_banner": "$myhostname ESMTP tlsgate-test",
            "smtpd_helo_required": "yes",
            # Tests provoke rejects on purpose; past smtpd_soft_error_limit smtpd would start
            # delaying every reply of that session.
            "smtpd_error_sleep_time": "0",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(self.pki.server.cert_path),
            "smtpd_tls_key_file": str(self.pki.server.key_path),
            "smtpd_tls_CAfile": str(self.pki.ca.cert_path),
            "smtpd_tls_ask_ccert": "yes",
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_fingerprint_digest": "sha256",
            "smtpd_tls_received_header": "yes",
        }
        params.update(self._main_cf)
        return params

    def _master_cf_lines(self) -> list[str]:
        # Every service runs non-chrooted (column 5 = n): the instance lives in a temp dir
        # and the policy/milter sockets are outside any chroot.
        lines = [
            f"127.0.0.1:{self.port} inet n - n - - smtpd",
            "pickup     unix  n - n 60    1 pickup",
            "cleanup    unix  n - n -     0 cleanup",
            "qmgr       unix  n - n 300   1 qmgr",
            "tlsmgr     unix  - - n 1000? 1 tlsmgr",
            "rewrite    unix  - - n -     - trivial-rewrite",
            "bounce     unix  - - n -     0 bounce",
            "defer      unix  - - n -     0 bounce",
            "trace      unix  - - n -     0 bounce",
            "verify     unix  - - n -     1 verify",
            "flush      unix  n - n 1000? 0 flush",
            "proxymap   unix  - - n -     - proxymap",
            "proxywrite unix  - - n -     1 proxymap",
            "smtp       unix  - - n -     - smtp",
            "relay      unix  - - n -     - smtp",
            "showq      unix  n - n -     - showq",
            "error      unix  - - n -     - error",
            "retry      unix  - - n -     - error",
            "discard    unix  - - n -     - discard",
            "local      unix  - n n -     - local",
            "virtual    unix  - n n -     - virtual",
            "anvil      unix  - - n -     1 anvil",
            "scache     unix  - - n -     1 scache",
            "postlog    unix-dgram n - n - 1 postlogd",
        ]
        return lines + self._master_cf

    def write_config(self) -> None:
        """Write main.cf, master.cf and the virtual mailbox map from the current settings."""
        main = "".join(f"{key} = {value}\n" for key, value in self.main_cf_parameters().items())
        # One catch-all maildir per domain (trailing slash = maildir): any local part is a
        # valid recipient, and `delivered()` tells recipients apart by Delivered-To.
        vmailbox = "".join(f"@{domain} {domain}/\n" for domain in self.domains)
        files = {
            "main.cf": main,
            "master.cf": "\n".join(self._master_cf_lines()) + "\n",
            "vmailbox": vmailbox,
        }
        # Postfix refuses to read a file modified within the last second or so, polling
        # every 0.3 s until it looks "settled" (measured: +1.8 s on every command after a
        # rewrite). Back-dating the files we just wrote in full skips that wait.
        settled = time.time() - 60
        for file_name, text in files.items():
            path = self.config_dir / file_name
            path.write_text(text)
            os.utime(path, (settled, settled))

    def configure(self, main_cf: Mapping[str, str] | None = None, master_cf: Sequence[str] = ()) -> None:
        """Add or override main.cf parameters and append master.cf lines, and rewrite the
        files. A running instance needs `reload()` to pick them up."""
        self._main_cf.update(main_cf or {})
        self._master_cf.extend(master_cf)
        self.write_config()

    # ----------------------------------------------------------------- lifecycle

    def _postfix(self, *args: str) -> tuple[int, str]:
        return _run([str(POSTFIX), "-c", str(self.config_dir), *args])

    def start(self, main_cf: Mapping[str, str] | None = None, master_cf: Sequence[str] = ()) -> Self:
        """Write the configuration, run `postfix check` and `postfix start`, and return once
        smtpd answers on `port` with a 220 banner. Retries with another port if the chosen
        one was taken in the meantime."""
        self._main_cf.update(main_cf or {})
        self._master_cf.extend(master_cf)
        started = False
        try:
            self._wait_ready(self._start_master())
            started = True
        finally:
            # Whatever went wrong (including Ctrl-C), leave no daemon or temp dir behind;
            # the exception already carries the maillog tail.
            if not started:
                self.stop()
        return self

    def _start_master(self) -> int:
        """Start the master; return the maillog offset where the successful attempt began."""
        for attempt in range(3):
            self.write_config()
            status, output = self._postfix("check")
            if status != 0:
                raise PostfixError(self._describe(f"postfix check failed ({status}):\n{output}"))
            offset = self.log_offset()
            status, output = self._postfix("start")
            if status == 0:
                self._master_pid = self.master_pid()
                return offset
            port_taken = "Address already in use" in self.maillog()[offset:]
            if not port_taken or attempt == 2:
                raise PostfixError(self._describe(f"postfix start failed ({status}):\n{output}"))
            self.port = free_port()
        raise AssertionError("unreachable")

    def _wait_ready(self, log_offset: int) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        last_error = "no attempt"
        while time.monotonic() < deadline:
            # A daemon that dies on a configuration error is restarted by master forever;
            # fail at its first fatal line instead of at the deadline.
            fatal = re.search(r"^.*(?:fatal|panic): .*$", self.maillog()[log_offset:], re.MULTILINE)
            if fatal is not None:
                raise PostfixError(self._describe(f"Postfix failed while starting: {fatal.group(0)}"))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as conn:
                    banner = conn.makefile("rb").readline()
                    if banner.startswith(b"220"):
                        conn.sendall(b"QUIT\r\n")
                        return
                    last_error = f"unexpected banner {banner!r}"
            except OSError as error:
                last_error = str(error)
            time.sleep(_POLL)
        raise PostfixError(self._describe(f"smtpd on port {self.port} not ready: {last_error}"))

    def master_pid(self) -> int | None:
        """The master daemon's pid from `queue/pid/master.pid`, or None when absent."""
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self) -> None:
        """`postfix stop`, then wait until the master and every process of its process
        group (smtpd, qmgr, ... all share the master's pid as group id) have exited;
        SIGKILL what is left after a deadline. Removes the directory unless `keep`."""
        pid = self._master_pid or self.master_pid()
        self._master_pid = None
        try:
            if pid is not None:
                status, output = self._postfix("stop") if _pid_alive(pid) else (0, "")
                if not _wait_until(lambda: not _group_members(pid), _STOP_TIMEOUT):
                    for member in _group_members(pid):
                        _kill(member, signal.SIGKILL)
                    _wait_until(lambda: not _group_members(pid), 5.0)
                    raise PostfixError(
                        self._describe(f"master {pid} ignored postfix stop ({status}: {output}); killed")
                    )
        finally:
            if not self.keep:
                shutil.rmtree(self.directory, ignore_errors=True)

    def reload(self, main_cf: Mapping[str, str] | None = None, master_cf: Sequence[str] = ()) -> None:
        """Apply extra settings (if any) and `postfix reload`; returns once the master has
        logged the reload. smtpd processes already serving a client finish with the old
        settings; new connections get the new ones."""
        if main_cf or master_cf:
            self.configure(main_cf, master_cf)
        offset = self.log_offset()
        status, output = self._postfix("reload")
        if status != 0:
            raise PostfixError(self._describe(f"postfix reload failed ({status}):\n{output}"))
        self.wait_for_log(r"/master\[\d+\]: reload ", since=offset)

    def __enter__(self) -> Self:
        if self._master_pid is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- inspection

    def postconf(self, name: str) -> str:
        """The effective value of a main.cf parameter, with $names expanded (`postconf -c DIR -xh`)."""
        completed = subprocess.run(
            [str(POSTCONF), "-c", str(self.config_dir), "-xh", name],
            capture_output=True, text=True, timeout=30, check=False,
        )
        if completed.returncode != 0:
            raise PostfixError(f"postconf {name} failed: {completed.stderr.strip()}")
        return completed.stdout.rstrip("\n")

    def maillog(self) -> str:
        """The whole maillog written by postlogd so far ('' before the first line)."""
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_offset(self) -> int:
        """Current length of the maillog text, to pass as `since` to `wait_for_log`."""
        return len(self.maillog())

    def wait_for_log(self, pattern: str, timeout: float = 10.0, *, since: int = 0) -> re.Match[str]:
        """Poll the maillog (from text offset `since`) until `pattern` matches (re.MULTILINE)."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.maillog(), since)
            if match is not None:
                return match
            if time.monotonic() >= deadline:
                raise PostfixError(self._describe(f"no log line matched {pattern!r} within {timeout}s"))
            time.sleep(_POLL)

    def delivered(self, address: str) -> list[bytes]:
        """Messages delivered to `address`, oldest first: the files in its domain's maildir
        (new/ and cur/) whose Delivered-To header, added by virtual(8), is that address."""
        domain = address.rsplit("@", 1)[-1].lower()
        maildir = self.mail_dir / domain
        folders = [maildir / "new", maildir / "cur"]
        files = [path for folder in folders if folder.is_dir() for path in folder.iterdir()]
        files.sort(key=lambda path: (path.stat().st_mtime_ns, path.name))
        parser = email.parser.BytesHeaderParser()
        messages = []
        for path in files:
            raw = path.read_bytes()
            recipients = parser.parsebytes(raw).get_all("Delivered-To", [])
            if any(str(value).strip().lower() == address.lower() for value in recipients):
                messages.append(raw)
        return messages

    def wait_delivered(self, address: str, count: int = 1, timeout: float = 10.0) -> list[bytes]:
        """Poll until at least `count` messages were delivered to `address`; return them."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.delivered(address)
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise PostfixError(
                    self._describe(f"{len(messages)}/{count} messages for {address} after {timeout}s")
                )
            time.sleep(_POLL)

    def _describe(self, problem: str) -> str:
        tail = "\n".join(self.maillog().splitlines()[-_LOG_TAIL_LINES:])
        return f"{problem}\n--- {self.log_path} (tail) ---\n{tail}"


# --------------------------------------------------------------------- SMTP clients


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: code and text (continuation lines joined with newlines)."""

    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400


@dataclass
class SendResult:
    """Everything the server answered during one `send` session."""

    banner: Reply | None = None
    ehlo: Reply | None = None
    starttls: Reply | None = None
    ehlo_after_tls: Reply | None = None
    mail: Reply | None = None
    rcpt: dict[str, Reply] = field(default_factory=dict)
    # None when no recipient was accepted (DATA is then not attempted).
    data: Reply | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    # The TLS handshake failed after "220 Ready to start TLS"; the session ends there.
    tls_error: str | None = None
    # Set when the server closed the connection (e.g. after a 421) before the session ended.
    disconnected: bool = False

    @property
    def accepted(self) -> list[str]:
        return [rcpt for rcpt, reply in self.rcpt.items() if reply.ok]

    @property
    def delivered(self) -> bool:
        """True when the server accepted the message (DATA answered 2xx)."""
        return self.data is not None and self.data.ok


class _Client(smtplib.SMTP):
    def open(self, port: int) -> tuple[int, bytes]:
        # starttls() uses the host given to the constructor as server_hostname and fails on
        # an empty one; connecting here keeps the banner reply, which the constructor drops.
        self._host = "127.0.0.1"
        return self.connect(self._host, port)


def _reply(code: int, text: bytes | str) -> Reply:
    return Reply(code, text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


def client_tls_context(
    cert: Path | None = None,
    key: Path | None = None,
    tls_max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client TLS context for talking to the test server: no server verification (the
    server uses a test certificate), an optional client certificate, optional version cap."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls_max_version is not None:
        context.maximum_version = tls_max_version
    if cert is not None:
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError:
            # Debian's OpenSSL security level 2 refuses to even load an RSA-1024 key; tests
            # present such weak keys on purpose, so lower the level for this context only.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.load_cert_chain(cert, key)
    return context


def default_message(sender: str, recipients: Sequence[str], subject: str = "tlsgate test") -> bytes:
    """A small RFC 5322 message with a unique Message-ID."""
    message = email.message.EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = email.utils.formatdate(localtime=False)
    message["Message-ID"] = email.utils.make_msgid(domain="client.tlsgate.test")
    message.set_content("Test message sent by the tlsgate end-to-end tests.\n")
    return message.as_bytes()


def _quit(client: smtplib.SMTP, result: SendResult) -> None:
    try:
        client.quit()
    except smtplib.SMTPServerDisconnected:
        result.disconnected = True


def send(
    port: int,
    sender: str,
    recipients: Sequence[str],
    *,
    starttls: bool = False,
    cert: Path | None = None,
    key: Path | None = None,
    source_address: str = "127.0.0.1",
    tls_max_version: ssl.TLSVersion | None = None,
    ehlo_after_tls: bool = True,
    data: bytes | str | None = None,
    helo: str = CLIENT_HELO,
    timeout: float = 30.0,
) -> SendResult:
    """One SMTP session to 127.0.0.1:`port` from `source_address`: EHLO, optional STARTTLS
    (with an optional client certificate and TLS version cap), MAIL, one RCPT per recipient
    and DATA if any recipient was accepted. 4xx/5xx replies are recorded, never raised; a
    refused STARTTLS or a failed handshake (`tls_error`) ends the session early.

    With `ehlo_after_tls=False` no EHLO follows STARTTLS; commands are sent raw so that
    smtplib does not slip one in on its own.
    """
    result = SendResult()
    client = _Client(local_hostname=helo, timeout=timeout, source_address=(source_address, 0))
    try:
        code, text = client.open(port)
        result.banner = _reply(code, text)
        code, text = client.ehlo(helo)
        result.ehlo = _reply(code, text)
        if starttls:
            context = client_tls_context(cert, key, tls_max_version)
            # smtplib.starttls raises if STARTTLS was not advertised; send it anyway so
            # that the server's own refusal is recorded.
            client.esmtp_features.setdefault("starttls", "")
            try:
                code, text = client.starttls(context=context)
            except smtplib.SMTPResponseException as error:
                # Refused (e.g. 454 "TLS not available"): record it and end the session
                # rather than carry on in plaintext.
                result.starttls = _reply(error.smtp_code, error.smtp_error)
                _quit(client, result)
                return result
            except (ssl.SSLError, ConnectionError) as error:
                result.starttls = Reply(220, "")
                result.tls_error = str(error)
                return result
            result.starttls = _reply(code, text)
            if isinstance(client.sock, ssl.SSLSocket):
                result.tls_version = client.sock.version()
                cipher = client.sock.cipher()
                result.tls_cipher = cipher[0] if cipher else None
            if ehlo_after_tls:
                code, text = client.ehlo(helo)
                result.ehlo_after_tls = _reply(code, text)
        code, text = client.docmd("MAIL", f"FROM:<{sender}>")
        result.mail = _reply(code, text)
        for recipient in recipients:
            code, text = client.docmd("RCPT", f"TO:<{recipient}>")
            result.rcpt[recipient] = _reply(code, text)
        if result.mail.ok and result.accepted:
            body = data if data is not None else default_message(sender, recipients)
            try:
                code, text = client.data(body)
                result.data = _reply(code, text)
            except smtplib.SMTPDataError as error:
                # smtplib raises when DATA itself is refused (anything but 354).
                result.data = _reply(error.smtp_code, error.smtp_error)
        _quit(client, result)
    except smtplib.SMTPServerDisconnected:
        result.disconnected = True
    finally:
        client.close()
    return result


@dataclass(frozen=True)
class SwaksResult:
    """Exit status and the combined transcript (stdout and stderr) of one swaks run."""

    returncode: int
    output: str


def swaks(
    port: int,
    *,
    sender: str,
    recipients: Sequence[str],
    tls: bool = False,
    cert: Path | None = None,
    key: Path | None = None,
    local_interface: str = "127.0.0.1",
    helo: str = CLIENT_HELO,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> SwaksResult:
    """Run swaks against 127.0.0.1:`port` from `local_interface`; `tls` means STARTTLS
    (required), `cert`/`key` a client certificate, `extra_args` anything else (for example
    `("--tls-protocol", "tlsv1_2")`). swaks exits non-zero when the server rejects."""
    args = [
        str(SWAKS),
        "--server", f"127.0.0.1:{port}",
        "--local-interface", local_interface,
        "--ehlo", helo,
        "--from", sender,
        "--to", ",".join(recipients),
    ]
    if tls:
        args.append("--tls")
    if cert is not None:
        args += ["--tls-cert", str(cert)]
    if key is not None:
        args += ["--tls-key", str(key)]
    args += list(extra_args)
    status, output = _run(args, timeout=timeout)
    return SwaksResult(status, output)
