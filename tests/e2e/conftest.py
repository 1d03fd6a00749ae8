"""End-to-end fixtures: every test here drives the real CLI on a copied workspace, so
each is marked ``e2e`` (``pytest -m "not e2e"`` runs only the fast unit tests)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

E2E_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def monorepo(workspace: Callable[..., Path]) -> Path:
    """A fresh copy of tests/fixtures/monorepo: four packages, a .bzl macro, a glob with an
    exclude and a chain of genrules (see its BUILD files)."""
    return workspace("monorepo")


@pytest.fixture
def nobody_home() -> Iterator[Path]:
    """A directory for builds as nobody (tests/nobody.py), outside pytest's 0700 base
    directory; removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="dtbuild-nobody-", dir="/tmp"))
    os.chmod(home, 0o755)
    yield home
    shutil.rmtree(home, ignore_errors=True)
