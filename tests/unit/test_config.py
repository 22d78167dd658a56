"""The configuration file: defaults, conversions, and one-line errors naming file, key, value."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from tlsgate import config
from tlsgate.config import (
    EX_CONFIG,
    ConfigError,
    EngineConfig,
    check_database_url,
    load_config,
    resolve_myorigin,
)


def write(tmp_path: pathlib.Path, text: str) -> str:
    path = tmp_path / "tlsgate.conf"
    path.write_text(text)
    return str(path)


def test_defaults_without_a_file(tmp_path: pathlib.Path) -> None:
    cfg = load_config(None, environ={})  # the default path does not exist on a test machine
    assert cfg.database.poll_interval == 2.0
    assert cfg.engine.unknown_rules_action == "defer"
    assert cfg.policyd.socket_mode == 0o660


def test_values_are_converted(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[database]\nurl = sqlite:////tmp/r.sqlite\npoll_interval = 0.5\n"
                           "[policyd]\nlisten = unix:/run/p.sock, inet:127.0.0.1:10040\nsocket_mode = 0600\n"
                           "monitor_prepend = yes\nmax_line = 4096\n[log]\nlevel = debug\n")
    cfg = load_config(path, environ={})
    assert cfg.path == path
    assert cfg.database.poll_interval == 0.5
    assert cfg.policyd.listen == ("unix:/run/p.sock", "inet:127.0.0.1:10040")
    assert cfg.policyd.socket_mode == 0o600 and cfg.policyd.monitor_prepend is True
    assert cfg.policyd.max_line == 4096 and cfg.log.level == "debug"


def test_environment_overrides_url(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[database]\nurl = sqlite:////tmp/a.sqlite\n")
    cfg = load_config(path, environ={"TLSGATE_DATABASE_URL": "postgresql://db/rules"})
    assert cfg.database.url == "postgresql://db/rules"


@pytest.mark.parametrize(("text", "message"), [
    ("[databse]\nurl = x\n", "unknown section [databse]"),
    ("[database]\nulr = x\n", "[database] unknown key 'ulr' (value 'x')"),
    ("[database]\npoll_interval = -1\n", "[database] poll_interval = '-1': must be between 0 and 86400 seconds"),
    ("[policyd]\nsocket_mode = 999\n", "[policyd] socket_mode = '999': must be an octal mode"),
    ("[policyd]\nmax_line = many\n", "[policyd] max_line = 'many': must be a positive whole number"),
    ("[policyd]\nlisten = /run/p.sock\n", "'/run/p.sock' is not unix:/PATH or inet:HOST:PORT"),
    # configparser keeps an inline comment as part of the value: never a socket of that name
    ("[milter]\nlisten = unix:/run/m.sock   ; or inet:127.0.0.1:8891\n",
     "[milter] listen = 'unix:/run/m.sock   ; or inet:127.0.0.1:8891': not unix:/PATH or inet:HOST:PORT"),
    ("[policyd]\nmonitor_prepend = perhaps\n", "[policyd] monitor_prepend = 'perhaps': must be yes or no"),
    ("[engine]\nunknown_rules_action = dunno\n", "must be one of defer, reject"),
    ("[log]\nlevel = loud\n", "[log] level = 'loud': must be one of debug, info, warning, error"),
    ("[milter]\nheader_name = X Bad\n", "not a valid header field name"),
    ("url = x\n", "File contains no section headers"),
    ("[dns]\nmin_ttl = 600\nmax_ttl = 60\n", "[dns] min_ttl = 600 is above max_ttl = 60"),
    ("[dns]\nmin_ttl = 90000\n", "[dns] min_ttl = 90000 is above max_ttl = 86400"),
])
def test_errors_name_file_key_and_value(tmp_path: pathlib.Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(path + ": ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_explicit_missing_file_is_an_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "nope.conf"), environ={})


@pytest.mark.parametrize(("value", "stored"), [("auto", "auto"), ("None", "none"), ("Example.ORG.", "example.org"),
                                               ("bücher.example", "xn--bcher-kva.example")])
def test_myorigin_values(tmp_path: pathlib.Path, value: str, stored: str) -> None:
    cfg = load_config(write(tmp_path, f"[engine]\nmyorigin = {value}\n"), environ={})
    assert cfg.engine.myorigin == stored


def test_myorigin_that_is_no_domain_is_an_error(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[engine]\nmyorigin = not a domain\n")
    with pytest.raises(ConfigError, match=r"\[engine\] myorigin = 'not a domain': must be auto, none or a domain"):
        load_config(path, environ={})


def fake_postconf(directory: pathlib.Path, monkeypatch: pytest.MonkeyPatch, script: str) -> pathlib.Path:
    """A postconf that runs the shell ``script``, first on PATH."""
    fake = directory / "postconf"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(directory))
    return fake


def test_myorigin_is_asked_from_postconf(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_myorigin(EngineConfig(myorigin="example.org")) == "example.org"
    assert resolve_myorigin(EngineConfig(myorigin="none")) is None
    fake = fake_postconf(tmp_path, monkeypatch, '[ "$*" = "-xh myorigin" ] && echo Mail.Example.NET')
    assert resolve_myorigin(EngineConfig()) == "mail.example.net"
    fake.write_text("#!/bin/sh\necho 'postconf: fatal: open /etc/postfix/main.cf: No such file' >&2\nexit 1\n")
    assert resolve_myorigin(EngineConfig()) is None
    assert "set [engine] myorigin" in caplog.text and "main.cf: No such file" in caplog.text
    monkeypatch.setenv("PATH", str(tmp_path / "none"))  # as under spawn(8): postconf where it usually is
    monkeypatch.setattr(config, "POSTCONF", str(fake))
    fake.write_text("#!/bin/sh\necho example.com\n")
    assert resolve_myorigin(EngineConfig()) == "example.com"
    monkeypatch.setattr(config, "POSTCONF", str(tmp_path / "none" / "postconf"))
    assert resolve_myorigin(EngineConfig()) is None  # no postconf at all


def test_myorigin_may_name_a_file_as_on_debian(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Debian's main.cf says myorigin = /etc/mailname, and its Postfix reads the first line."""
    mailname = tmp_path / "mailname"
    mailname.write_text("Mail.Example.ORG\nignored\n")
    fake_postconf(tmp_path, monkeypatch, f"echo {mailname}")
    assert resolve_myorigin(EngineConfig()) == "mail.example.org"
    mailname.write_text("not a domain!\n")
    assert resolve_myorigin(EngineConfig()) is None
    assert "'not a domain!'" in caplog.text and "set [engine] myorigin" in caplog.text
    mailname.unlink()
    assert resolve_myorigin(EngineConfig()) is None
    assert "No such file or directory" in caplog.text


def test_socketmap_transport_is_a_service_name(tmp_path: pathlib.Path) -> None:
    assert load_config(write(tmp_path, "[socketmap]\ntransport = smtp-out\n"), environ={}).socketmap.transport == "smtp-out"
    with pytest.raises(ConfigError, match=r"\[socketmap\] transport = 'smtp out': not a master.cf service name"):
        load_config(write(tmp_path, "[socketmap]\ntransport = smtp out\n"), environ={})


BAD_URLS = [
    ("sqlite://relative.sqlite", "[database] url: invalid database URL sqlite://relative.sqlite"),
    ("mariadb://root@127.0.0.1/t?connect_timeout=abc", "[database] url: invalid database URL"),
    ("postgresql://u:secret@127.0.0.1:notaport/t", "[database] url: invalid database URL postgresql://u:***@"),
    ("oracle://db/rules", "[database] url: unsupported database 'oracle'"),
]


@pytest.mark.parametrize(("url", "message"), BAD_URLS)
def test_a_database_url_no_engine_can_be_made_of_is_a_daemon_s_configuration_error(
        tmp_path: pathlib.Path, url: str, message: str) -> None:
    path = write(tmp_path, f"[database]\nurl = {url}\n")
    cfg = load_config(path, environ={})  # the CLI loads it: --database-url may replace it
    with pytest.raises(ConfigError) as info:
        check_database_url(cfg, environ={})
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value) and "secret" not in str(info.value)


@pytest.mark.parametrize("daemon", [["-m", "tlsgate_policyd"], ["-m", "tlsgate_milter"],
                                    ["-c", "import sys; from tlsgate.socketmapd import main; sys.exit(main())"]],
                         ids=["policyd", "milter", "socketmap"])
def test_every_daemon_refuses_to_start_on_such_a_url(tmp_path: pathlib.Path, daemon: list[str]) -> None:
    path = write(tmp_path, "[database]\nurl = sqlite://relative.sqlite\n")
    r = subprocess.run([sys.executable, *daemon, "--config", path, "--check-config"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == EX_CONFIG and "invalid database URL" in r.stderr, r.stderr


def test_a_database_that_is_down_is_no_configuration_error(tmp_path: pathlib.Path) -> None:
    # Nothing is connected to: the daemons start and keep answering while the database is away.
    for url in ("postgresql://tlsgate@127.0.0.1:1/rules", f"sqlite:///{tmp_path}/no/such/dir/rules.sqlite"):
        check_database_url(load_config(write(tmp_path, f"[database]\nurl = {url}\n"), environ={}), environ={})
