"""Fixtures shared by the end-to-end tests: the test PKI every private Postfix uses."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pki import Pki
from tests.support.postfix import skip_reason


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    """A fresh PKI per test module; skips when a private Postfix cannot run here."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    directory = Path(tempfile.mkdtemp(prefix="tlsgate-pki-"))
    directory.chmod(0o755)  # some Postfix processes read the CA and keys as user postfix
    try:
        yield Pki(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
