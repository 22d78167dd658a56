"""Reliability suite: every test here carries the ``reliability`` marker, and the figures the
tests record are written out at the end of the session (see results.py)."""

from __future__ import annotations

import os

import pytest

from tests.reliability import results


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.reliability)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not results.RESULTS:
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        results.write_json(factory.getbasetemp() / "reliability-results.json")
    if os.environ.get("TLSGATE_WRITE_REPORT") == "1":
        results.write_report()
