"""Builds as an ordinary user, from a test process running as root: ``nobody``
(``setpriv --reuid=65534``) runs dtbuild on a copy of a workspace, with a cache, in a
home it owns (the ``nobody_home`` fixture of tests/e2e/conftest.py).

Two things of the machine are arranged for the run and put back afterwards:

* **Subordinate ids.** When /etc/subuid or /etc/subgid have no range for nobody, the
  line ``nobody:<start>:65536`` is added to both for the run's duration (the namespace
  executor maps them with newuidmap/newgidmap), and exactly that line is removed again.
* **An interpreter nobody can run.** When the test interpreter or its site-packages are
  not reachable by nobody (a pyenv under /root), a virtualenv of the system python of
  the same version is made in nobody's home. Its own site-packages hold what sandboxed
  ``python -I`` helper programs import (dtbuild's editable-install finder and pluggy):
  such a program sees the interpreter's installation and dtbuild's package
  directories, nothing a PYTHONPATH adds. A ``.pth`` adds the test virtualenv's
  site-packages for the rest.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

NOBODY = 65534


def as_nobody(*argv: str) -> list[str]:
    """``argv`` run as nobody, with no supplementary groups."""
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def reachable_by_others(path: str) -> bool:
    """Whether a user with no group in common can execute ``path`` (permission bits of
    the file and of every directory above it)."""
    real = Path(os.path.realpath(path))
    return all(p.stat().st_mode & 0o001 for p in [real, *real.parents])


def python_for_nobody(home: Path) -> str:
    """A python that nobody can run, that imports dtbuild, and whose sandboxed ``-I``
    programs import it too (made in ``home`` when the test interpreter will not do)."""
    site_packages = next(p for p in map(Path, site.getsitepackages())
                         if any(p.glob("__editable__*dtbuild*")) or (p / "dtbuild").is_dir())
    if reachable_by_others(sys.executable) and reachable_by_others(str(site_packages)):
        return sys.executable
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(f"python{version}", path="/usr/bin:/bin")
    if system is None:
        pytest.skip(f"nobody can run neither {sys.executable} nor a system python{version}")
    venv = home / "venv"
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    own = venv / "lib" / f"python{version}" / "site-packages"
    for entry in [*site_packages.glob("__editable__*"), site_packages / "dtbuild", site_packages / "pluggy"]:
        if entry.is_dir():
            shutil.copytree(entry, own / entry.name, symlinks=True)
        elif entry.exists():
            shutil.copy(entry, own / entry.name)
    (own / "zz-test-interpreter.pth").write_text(f"import site; site.addsitedir({str(site_packages)!r})\n")
    return str(venv / "bin" / "python")


def add_subordinate_ids(user: str) -> list[tuple[Path, str]]:
    """Give ``user`` 65536 subordinate ids where it has none; return the lines added."""
    added = []
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        text = path.read_text() if path.exists() else ""
        ranges = [line.split(":") for line in text.splitlines() if line.count(":") == 2]
        if any(r[0] in (user, str(NOBODY)) for r in ranges):
            continue
        start = max([100000] + [int(r[1]) + int(r[2]) for r in ranges])
        line = f"{user}:{start}:65536"
        with open(path, "a") as f:
            f.write(("" if not text or text.endswith("\n") else "\n") + line + "\n")
        added.append((path, line))
    return added


def remove_lines(added: list[tuple[Path, str]]) -> None:
    """Remove exactly the lines :func:`add_subordinate_ids` added."""
    for path, line in added:
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(x for x in lines if x.strip() != line))


def dtbuild_as_nobody(ws: Path, run_dtbuild, home: Path, args: Sequence[str], *, timeout: float = 900,
                      env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``dtbuild ARGS`` as nobody on a copy of ``ws`` at ``home/ws`` (its outputs and
    state left out), with ``HOME`` and the cache in ``home``; needs root."""
    if os.geteuid() != 0:
        pytest.skip("runs the build as nobody, which needs root to set up (as an ordinary user, every other "
                    "test here already is one)")
    copy = home / "ws"
    shutil.copytree(ws, copy, symlinks=True, ignore=shutil.ignore_patterns("dtbuild-out", ".dtbuild"))
    python = python_for_nobody(home)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(home)], check=True)
    added = add_subordinate_ids("nobody")
    try:
        return subprocess.run(
            as_nobody(python, "-m", "dtbuild.engine.cli", *args), cwd=copy, capture_output=True, text=True,
            timeout=timeout,
            env=run_dtbuild.env({"HOME": str(home), "DTBUILD_CACHE_DIR": str(home / "cache"), **(env or {})}))
    finally:
        remove_lines(added)
