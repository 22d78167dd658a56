"""Security checks behind docs/security.md: the daemons' sockets reach Postfix and nobody
else, the systemd units run them unprivileged, no database password ever reaches a log line
or an error message, and every SQL statement is parameterized (f-string SQL only where an
explicit allow-list says so). The trace header's resistance to forging is covered end to end
by tests/e2e/test_milter_postfix.py::test_forged_trace_header_is_stripped."""

from __future__ import annotations

import ast
import configparser
import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.milter.milterhelp import MILTER, POLICYD, MilterProcess
from tests.reliability.results import record
from tests.support.postfix import free_port
from tests.support.rulesdb import make_rules_db

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SOCKETMAP = str(BIN / "tlsgate-socketmap")
TLSGATE = str(BIN / "tlsgate")
PASSWORD = "S3cret-Passw0rd-x9"
# Unescaped, as an administrator may write it: SQLAlchemy ends the password at its first '@' and
# reads the rest as the host, which the drivers' messages name.
AT_PASSWORD = "S3cret@Passw0rd@W0rdTail"
# An '@' then a '/' and a '?': SQLAlchemy ends the host at the '/', which then has no '@'.
SLASH_PASSWORD = "S3cret@Pa5s/w0rd?Ta1l9"
PASSWORDS = pytest.mark.parametrize("password", [PASSWORD, AT_PASSWORD, SLASH_PASSWORD],
                                    ids=["password", "password-with-at", "password-with-at-and-slash"])
DAEMONS = {"policyd": POLICYD, "milter": MILTER, "socketmap": SOCKETMAP}


def note(figures: dict[str, int | str]) -> None:
    record("security", {"title": "Security checks (see security.md)", **figures})


def needs_root_and_users() -> None:
    if os.geteuid() != 0:
        pytest.skip("changing socket groups and connecting as other users needs root")
    for user in ("postfix", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            pytest.skip(f"there is no {user} user")


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not tmp_path: its parents are 0700, and the point is to let other users try the socket.
    directory = Path(tempfile.mkdtemp(prefix="tlsgate-security-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def default_config(directory: Path, url: str) -> Path:
    """Every daemon on a unix socket, socket_mode and socket_group left at their defaults."""
    path = directory / "tlsgate.conf"
    path.write_text(
        f"[database]\nurl = {url}\npoll_interval = 0.2\nconnect_timeout = 2\n\n"
        + "".join(f"[{name}]\nlisten = unix:{directory / name}.sock\n\n" for name in DAEMONS)
        + "[log]\ntarget = stderr\nlevel = debug\n"
    )
    return path


def connect_as(user: str, path: Path) -> int:
    """Exit status of a connect() to ``path`` by ``user``: 0 connected, 13 permission denied."""
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"try:\n    s.connect({str(path)!r})\nexcept PermissionError:\n    sys.exit(13)\n"
    )
    return subprocess.run(["runuser", "-u", user, "--", "/usr/bin/python3", "-c", script],
                          timeout=30, check=False).returncode


@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_sockets_reach_group_postfix_and_nobody_else(daemon: str, workdir: Path) -> None:
    needs_root_and_users()
    config = default_config(workdir, make_rules_db(workdir / "rules.sqlite"))
    sock = workdir / f"{daemon}.sock"
    process = MilterProcess(config, sock, workdir / f"{daemon}.log", program=DAEMONS[daemon]).start()
    try:
        info = sock.stat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660, oct(info.st_mode)
        assert info.st_gid == grp.getgrnam("postfix").gr_gid
        assert connect_as("postfix", sock) == 0
        assert connect_as("nobody", sock) == 13
    finally:
        assert process.stop() == 0
    note({f"{daemon} socket mode 0660 group postfix, other users refused": "yes"})


def unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


@pytest.mark.parametrize("service", sorted(p.name for p in (ROOT / "systemd").glob("*.service")))
def test_units_run_unprivileged(service: str) -> None:
    section = unit(ROOT / "systemd" / service)["Service"]
    assert section.get("User") == "tlsgate"
    assert section.get("Group") == "tlsgate"
    assert section.get("CapabilityBoundingSet") == ""
    assert section.get("AmbientCapabilities", "") == ""
    assert section.get("NoNewPrivileges") == "yes"
    assert "root" not in (section.get("SupplementaryGroups") or "")


def test_socket_directory_and_group_membership() -> None:
    """The socket directory is tlsgate:postfix 0750 (setgid, so that its sockets are group
    postfix from the start), so only Postfix (and tlsgate) get in; tlsgate is a member of group
    postfix so that it can hand its sockets to that group."""
    tmpfiles = (ROOT / "systemd" / "tlsgate.tmpfiles").read_text()
    assert re.search(r"^d /var/spool/postfix/tlsgate 2750 tlsgate postfix -$", tmpfiles, re.MULTILINE)
    sysusers = (ROOT / "systemd" / "tlsgate.sysusers").read_text()
    assert re.search(r"^m tlsgate postfix$", sysusers, re.MULTILINE)
    for socket_unit in (ROOT / "systemd").glob("*.socket"):
        section = unit(socket_unit)["Socket"]
        assert section.get("SocketMode") == "0660" and section.get("SocketGroup") == "postfix", socket_unit


# ------------------------------------------------------------------ no secret in logs


def unreachable_url(password: str = PASSWORD) -> str:
    return f"postgresql+psycopg://tlsgate:{password}@127.0.0.1:{free_port()}/rules"


def shows_password(text: str, password: str) -> bool:
    """Whether ``text`` holds the password or any piece of it between "@", "/" and "?"."""
    return any(piece in text for piece in [password, *re.split(r"[@/?]", password)])


@PASSWORDS
@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_daemon_logs_never_show_the_database_password(daemon: str, password: str, workdir: Path) -> None:
    config = default_config(workdir, unreachable_url(password))
    sock = workdir / f"{daemon}.sock"
    process = MilterProcess(config, sock, workdir / f"{daemon}.log", program=DAEMONS[daemon])
    if "@" in password:
        # Read as written, the rest of the password would be the host: refused at start, a
        # configuration error (78), rather than tried for ever.
        with pytest.raises(RuntimeError, match="exited 78"):
            process.start(wait_rules=False)
        assert "the password holds an '@': write it as %40" in process.log()
    else:
        process.start(wait_rules=False)
        try:
            process.wait_log("cannot load rules", timeout=30)
        finally:
            assert process.stop() == 0
    log = process.log()
    assert "127.0.0.1" in log  # the log does name the database it could not reach
    assert not shows_password(log, password), log


@PASSWORDS
@pytest.mark.parametrize("args", [["lint"], ["connector", "list"], ["db", "init"]], ids=" ".join)
@pytest.mark.parametrize("how", ["option", "environment", "config"])
def test_cli_errors_never_show_the_database_password(args: list[str], how: str, password: str,
                                                     workdir: Path) -> None:
    url = unreachable_url(password)
    config = default_config(workdir, url if how == "config" else "sqlite:///nonexistent/x.sqlite")
    env = dict(os.environ)
    argv = [TLSGATE, "-c", str(config)]
    if how == "option":
        argv += ["--database-url", url]
    if how == "environment":
        env["TLSGATE_DATABASE_URL"] = url
    done = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, env=env, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "127.0.0.1" in output or "rules" in output, output
    assert not shows_password(output, password), output


@pytest.mark.mariadb
def test_refused_login_never_shows_the_password() -> None:
    """A reachable server that refuses the login (MariaDB here) names the user, not the password."""
    url = f"mariadb+pymysql://tlsgate_nobody:{PASSWORD}@127.0.0.1:3306/test"
    done = subprocess.run([TLSGATE, "--database-url", url, "lint"], capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "TLSGATE_DATABASE_URL": ""})
    output = done.stdout + done.stderr
    if "Can't connect" in output or "Connection refused" in output:
        pytest.skip(f"MariaDB is not reachable: {output.strip()}")
    assert done.returncode != 0 and "tlsgate_nobody" in output, output
    assert PASSWORD not in output, output
    note({"database password in logs and errors (daemons, CLI, refused login)": "never"})


# ------------------------------------------------------------------ parameterized SQL

SQL_WORDS = re.compile(r"\b(SELECT|INSERT\s+INTO|UPDATE|DELETE\s+FROM|CREATE|DROP|ALTER|WHERE|VALUES|PRAGMA|TRUNCATE)\b")
SHIPPED = ("tlsgate", "policyd", "milter")
# Where SQL text is built from names rather than written out: never from a value.
ALLOWED = {
    ("tlsgate/store.py", "_select"),  # fixed table and column names from the callers' literals
    ("tlsgate/schema.py", "trigger_ddl"),  # trigger DDL over the fixed list of rule tables
    ("tlsgate/schema.py", "seed_rows"),  # the schema version constant
}


def built_sql(path: Path) -> Iterator[tuple[str, int, str]]:
    """(function, line, how) for every SQL text built with an f-string, % or + or .format()."""
    tree = ast.parse(path.read_text(), str(path))
    owner: dict[ast.AST, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                owner.setdefault(inner, node.name)
    for node in ast.walk(tree):
        text, how = None, ""
        if isinstance(node, ast.JoinedStr) and any(not isinstance(v, ast.Constant) for v in node.values):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
            how = "f-string"
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add)
              and isinstance(node.left, ast.Constant) and isinstance(node.left.value, str)):
            text, how = node.left.value, "% or +"
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
              and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)):
            text, how = node.func.value.value, ".format()"
        if text is not None and SQL_WORDS.search(text):
            yield owner.get(node, "<module>"), getattr(node, "lineno", 0), how


def test_every_sql_statement_is_parameterized() -> None:
    found: dict[tuple[str, str], list[str]] = {}
    files = 0
    for top in SHIPPED:
        for path in sorted((ROOT / top).rglob("*.py")):
            files += 1
            for function, line, how in built_sql(path):
                found.setdefault((str(path.relative_to(ROOT)), function), []).append(f"line {line} ({how})")
    assert set(found) == ALLOWED, found
    note({"source files scanned for SQL built from strings": files,
                        "places that build SQL text (all allow-listed names, no values)": len(found)})


def _literal_names(node: ast.expr, constants: dict[str, ast.expr]) -> bool:
    """A tuple of string literals, possibly through module-level tuple constants."""
    if isinstance(node, ast.Name):
        return node.id in constants and _literal_names(constants[node.id], constants)
    if isinstance(node, ast.Starred):
        return _literal_names(node.value, constants)
    if isinstance(node, ast.Tuple):
        return all(_literal_names(e, constants) for e in node.elts)
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def test_select_gets_only_literal_names() -> None:
    """The one f-string SELECT is only ever called with literal table and column names."""
    tree = ast.parse((ROOT / "tlsgate" / "store.py").read_text())
    constants = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name)}
    calls = [n for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "_select"]
    assert len(calls) >= 9
    for call in calls:
        _, table, columns = call.args
        assert isinstance(table, ast.Constant) and isinstance(table.value, str), ast.dump(call)
        assert isinstance(columns, ast.Tuple | ast.Name) and _literal_names(columns, constants), ast.dump(call)
