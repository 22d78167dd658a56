"""pymilter owns the top-level name ``milter``: nothing in this repository may shadow it."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_import_milter_is_pymilter_with_repo_root_on_path() -> None:
    # `python -c` puts the current directory first on sys.path, as `python -m pytest` does.
    out = subprocess.run(
        [sys.executable, "-c", "import milter, sys; print(milter.__file__); print(sys.path[0] == '')"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out[0].endswith(".so"), f"'import milter' resolved to {out[0]}, not pymilter's extension"
    assert out[1] == "True"


def test_source_folders_are_not_packages() -> None:
    for folder in ("milter", "policyd"):
        assert not (ROOT / folder / "__init__.py").exists()
