"""Coverage-guided fuzzing with atheris, when it is installed (it is not a test dependency:
`pip install atheris` adds it). Runs atheris_harness.py in a child process for a fixed number
of inputs in a temp dir, so a crash report lands there, and records the number of runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.results import record

RUNS = 30000
HARNESS = Path(__file__).with_name("atheris_harness.py")


def test_atheris_finds_no_crash(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    done = subprocess.run(
        [sys.executable, str(HARNESS), f"-runs={RUNS}", f"-artifact_prefix={tmp_path}/", "-seed=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    runs = re.search(r"Done (\d+) runs", output)
    assert runs is not None, output[-2000:]
    assert list(tmp_path.glob("crash-*")) == []
    record("atheris", {
        "title": "Coverage-guided fuzzing (atheris)",
        "inputs (policy reader + mapping, netstrings, milter From and macros, each)": int(runs.group(1)),
        "crashes": 0,
    })
