"""Figures the reliability suite measures, collected per pytest session and rendered into
docs/reliability.md.

Each test calls :func:`record` with a section name and its counts. At the end of the session
the conftest writes every section to ``reliability-results.json`` under pytest's base temp
directory (machine-readable), and, when ``TLSGATE_WRITE_REPORT=1``, renders docs/reliability.md
from it with :func:`render`. Sections that did not run this session keep their previous text,
so running one test file never erases the figures of another.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

Figures = dict[str, "int | str"]

RESULTS: dict[str, Figures] = {}
REPORT = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"

_SECTION_ORDER = ("faults", "fuzzing", "atheris", "flood", "invalid-rows", "security")
_HEAD = """# Reliability figures

Written by the reliability suite (`tests/reliability/`); do not edit by hand. Regenerate with
`TLSGATE_WRITE_REPORT=1 pytest -m reliability` (or `make test-reliability`). Each section
below is replaced by the test that measures it; the raw figures of a run are in
`reliability-results.json` under pytest's temp directory.
"""
_BLOCK = re.compile(r"<!-- section:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- end:(?P=name) -->\n", re.DOTALL)


def record(section: str, figures: Figures) -> None:
    """Add ``figures`` to ``section`` (later values of the same key win)."""
    RESULTS.setdefault(section, {}).update(figures)


def write_json(path: Path) -> None:
    path.write_text(json.dumps(RESULTS, indent=2, sort_keys=True) + "\n")


def _table(figures: Figures) -> str:
    rows = [f"| {name} | {value} |" for name, value in figures.items()]
    return "\n".join(["| figure | value |", "|---|---|", *rows]) + "\n"


def render(results: dict[str, Figures], previous: str) -> str:
    """The report text: sections measured now, previous text for the others."""
    kept = {m.group("name"): m.group("body") for m in _BLOCK.finditer(previous)}
    for name, figures in results.items():
        title = str(figures.get("title", name))
        shown = {k: v for k, v in figures.items() if k not in ("title", "note")}
        note = f"\n{figures['note']}\n" if "note" in figures else ""
        kept[name] = f"## {title}\n\n{_table(shown)}{note}\n"
    names = [n for n in _SECTION_ORDER if n in kept] + sorted(set(kept) - set(_SECTION_ORDER))
    blocks = "".join(f"<!-- section:{n} -->\n{kept[n]}<!-- end:{n} -->\n" for n in names)
    return f"{_HEAD}\n{blocks}"


def write_report(path: Path = REPORT) -> None:
    previous = path.read_text() if path.exists() else ""
    path.write_text(render(RESULTS, previous))
