"""The systemd units: hardened ("OK" or better) and clean under systemd-analyze."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

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
    assert "d /var/spool/postfix/tlsgate 0750 tlsgate postfix -" in (UNITS / "tlsgate.tmpfiles").read_text()


def test_the_state_directory_exists_before_any_service_starts() -> None:
    # `tlsgate db init` writes /var/lib/tlsgate/rules.sqlite before the first service start,
    # which is when StateDirectory= would have made the directory.
    assert "d /var/lib/tlsgate 0750 tlsgate tlsgate -" in (UNITS / "tlsgate.tmpfiles").read_text()
    for unit in UNITS.glob("*.service"):
        assert "StateDirectory=tlsgate" in unit.read_text(), unit.name
