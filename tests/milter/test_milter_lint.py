"""`tlsgate lint` warns about pinned connectors the milter would only defer, unless the
configuration leaves them to the policy daemon ([milter] pinned_action = policyd)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.milter.milterhelp import make_rules_db

TLSGATE = str(Path(sys.executable).parent / "tlsgate")
RULES = """
INSERT INTO inbound_connector (name, require_tls, certificate) VALUES ('pinned-in', 1, 'pinned');
INSERT INTO inbound_domain VALUES ('pinned-in', 'sender', 'pinned.test');
"""


def lint(tmp_path: Path, pinned_action: str) -> str:
    url = make_rules_db(tmp_path / "rules.sqlite", RULES)
    config = tmp_path / "tlsgate.conf"
    config.write_text(f"[database]\nurl = {url}\n[milter]\npinned_action = {pinned_action}\n")
    result = subprocess.run([TLSGATE, "--config", str(config), "lint"], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_lint_warns_when_the_milter_would_defer_a_pinned_connector(tmp_path: Path) -> None:
    out = lint(tmp_path, "tempfail")
    assert (
        "warning: inbound_connector ('pinned-in') column certificate: is 'pinned', which only "
        "tlsgate-policyd can check"
    ) in out


def test_lint_is_quiet_when_pinned_connectors_are_left_to_the_policy_daemon(tmp_path: Path) -> None:
    assert "only tlsgate-policyd can check" not in lint(tmp_path, "policyd")
