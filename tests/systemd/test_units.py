"""The systemd units: hardened ("OK" or better) and clean under systemd-analyze."""

from __future__ import annotations

import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.milter.milterhelp import MILTER, MilterProcess, make_rules_db, write_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
SERVICES = sorted(p.name for p in UNITS.glob("*.service"))
BIN = pathlib.Path(sys.executable).parent

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


@pytest.mark.parametrize("unit", SERVICES)
def test_exposure_is_ok_or_better(unit: str) -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(UNITS / unit)],
                       capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, m.group(0)
    assert r.returncode == 0


def test_units_verify_cleanly(tmp_path: pathlib.Path) -> None:
    """verify checks that ExecStart exists: point the units at this installation's scripts."""
    for unit in UNITS.glob("tlsgate-*"):
        (tmp_path / unit.name).write_text(unit.read_text().replace("/usr/bin/", f"{BIN}/"))
    files = sorted(str(p) for p in tmp_path.iterdir())
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *files], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_every_service_is_notify_with_reload_and_watchdog() -> None:
    for unit in SERVICES:
        text = (UNITS / unit).read_text()
        assert "Type=notify" in text and "WatchdogSec=" in text and "ExecReload=/bin/kill -HUP $MAINPID" in text
        assert "\nCapabilityBoundingSet=\n" in text and "User=tlsgate" in text


def test_sockets_are_inside_the_postfix_chroot_for_group_postfix_only() -> None:
    for unit in UNITS.glob("*.socket"):
        text = unit.read_text()
        assert re.search(r"^ListenStream=/var/spool/postfix/tlsgate/\w+\.sock$", text, re.M), unit.name
        assert "SocketGroup=postfix" in text and "SocketMode=0660" in text
    # setgid: the sockets made in it belong to group postfix without a chown (see below)
    assert "d /var/spool/postfix/tlsgate 2750 tlsgate postfix -" in (UNITS / "tlsgate.tmpfiles").read_text()


def test_the_state_directory_exists_before_any_service_starts() -> None:
    # `tlsgate db init` writes /var/lib/tlsgate/rules.sqlite before the first service start,
    # which is when StateDirectory= would have made the directory.
    assert "d /var/lib/tlsgate 0750 tlsgate tlsgate -" in (UNITS / "tlsgate.tmpfiles").read_text()
    for unit in UNITS.glob("*.service"):
        assert "StateDirectory=tlsgate" in unit.read_text(), unit.name


def test_units_log_to_the_mail_facility_and_name_installed_manuals() -> None:
    """The journal forwards a unit's lines to syslog under its SyslogFacility=: mail, so that
    the decision lines reach mail.log beside Postfix's; the manuals are what the package installs."""
    installed = {"man:{}({})".format(*page.name.rsplit(".", 1)) for page in (ROOT / "docs" / "man").glob("*.[158]")}
    for unit in UNITS.glob("tlsgate-*.s*"):
        text = unit.read_text()
        if unit.suffix == ".service":
            assert "\nSyslogFacility=mail\n" in text, unit.name
        docs = re.search(r"^Documentation=(.*)$", text, re.M)
        assert docs and set(docs.group(1).split()) <= installed, (unit.name, installed)


def test_units_start_before_debians_postfix_instance_and_stop_on_a_configuration_error() -> None:
    for unit in SERVICES:
        text = (UNITS / unit).read_text()
        assert re.search(r"^Before=.*\bpostfix@-\.service\b", text, re.M), unit
        assert "\nRestartPreventExitStatus=78\n" in text, unit


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter uses x86_64 call numbers")
def test_the_milter_starts_where_chown_is_refused() -> None:
    """Under its unit the milter runs with chown(2) refused (@privileged), unless let through
    again; in the setgid socket directory tmpfiles makes it needs none."""
    text = (UNITS / "tlsgate-milter.service").read_text()
    assert text.index("SystemCallFilter=@chown") > text.index("SystemCallFilter=~@privileged")
    work = pathlib.Path(tempfile.mkdtemp(prefix="tgc-"))
    try:
        work.chmod(0o2755)
        wrapper = work / "milter"
        deny = ROOT / "tests" / "support" / "denychown.py"
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {deny} {MILTER} \"$@\"\n")
        wrapper.chmod(0o755)
        sock = work / "milter.sock"
        config = write_config(work, make_rules_db(work / "rules.sqlite", ""), f"unix:{sock}")
        process = MilterProcess(config, sock, work / "milter.log", program=str(wrapper))
        try:
            process.start()
            assert sock.stat().st_gid == work.stat().st_gid
        finally:
            process.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
