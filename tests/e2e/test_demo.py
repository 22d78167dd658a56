"""`make demo` runs and shows each example connector doing its job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.postfix import skip_reason

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.postfix


def test_demo() -> None:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    r = subprocess.run([sys.executable, "-m", "tests.support.demo"], cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.splitlines()
    results = {out[i]: out[i + 1].strip() for i in range(len(out) - 1) if out[i + 1].startswith("    ")
               and "->" in out[i + 1]}
    assert results["Fabrikam's server, TLS with its certificate"].endswith(": delivered")
    assert "refused: 554 5.7.10" in results["a spoofer claiming fabrikam.com, plaintext"]
    assert "refused: 554 5.7.1 " in results["a spoofer claiming fabrikam.com, TLS, no certificate"]
    assert results["Contoso over TLS"].endswith(": delivered")
    assert results["an ordinary sender, plaintext (no connector)"].endswith(": delivered")
    assert results["Woodgrove plaintext (monitor mode)"].endswith(": delivered")
    assert any("monitor-defer connector=woodgrove-in" in line for line in out)
