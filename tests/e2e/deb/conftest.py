"""Fixtures for the Debian package tests: ``apt_repo(packages, ...)`` builds a signed apt
repository with tests/debrepo.py under the test's tmp_path and serves it on 127.0.0.1
until the test ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import debrepo
import pytest


@dataclass
class ServedRepo:
    """A repository and the server it is on. ``url`` is the archive's base URL (like
    http://deb.debian.org/debian), ``source`` the `sources` entry for it."""

    repo: debrepo.Repo
    served: debrepo.Served
    url: str

    @property
    def source(self) -> str:
        return self.repo.source_line(self.url)

    @property
    def requests(self) -> list[str]:
        return self.served.requests

    def stop(self) -> None:
        self.served.stop()


@pytest.fixture
def apt_repo(tmp_path: Path, require_tool: Callable[[str], str]) -> Iterator[Callable[..., ServedRepo]]:
    """``apt_repo(packages, suite=..., components=..., arches=...)`` -> ServedRepo; the
    archive is served at ``http://127.0.0.1:PORT/debian``."""
    for tool in debrepo.TOOLS:
        require_tool(tool)
    made: list[tuple[debrepo.Repo, Any]] = []

    def make(packages: Sequence[debrepo.Deb], **kwargs: Any) -> ServedRepo:
        www = tmp_path / f"www{len(made)}"
        repo = debrepo.make_repo(www / "debian", packages, **kwargs)
        server = debrepo.serve(www)
        served = server.__enter__()
        made.append((repo, server))
        return ServedRepo(repo=repo, served=served, url=f"{served.url}/debian")

    yield make
    for repo, server in reversed(made):
        server.__exit__(None, None, None)
        repo.close()
