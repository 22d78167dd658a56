"""The manual pages: built from docs/man/*.rst, current, and rendered by man without warnings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MAN = Path(__file__).resolve().parents[2] / "docs" / "man"
SOURCES = sorted(MAN.glob("*.rst"))


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_built_page_is_current(source: Path, tmp_path: Path) -> None:
    pytest.importorskip("docutils")
    built = tmp_path / source.stem
    subprocess.run([sys.executable, "-m", "docutils", "--writer=manpage", str(source), str(built)], check=True)
    committed = MAN / source.stem
    assert committed.exists(), f"run `make man`: {committed.name} is missing"
    assert committed.read_text() == built.read_text(), f"run `make man`: {committed.name} is stale"


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_page_renders_cleanly(source: Path) -> None:
    page = MAN / source.stem
    r = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                       env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "SEE ALSO" in r.stdout
