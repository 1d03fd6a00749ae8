"""Fixtures shared by every test directory.

* ``workspace(name)`` copies ``tests/fixtures/<name>`` into the test's ``tmp_path`` and
  returns the copy, so a test may edit, break and rebuild it freely.
* ``run_dtbuild(cwd, *args, env=None, check=None)`` runs the real CLI in a subprocess, the
  way a user would, with a private cache under ``tmp_path`` (``DTBUILD_CACHE_DIR``), and
  returns ``(exit_code, stdout, stderr)``. ``run_dtbuild.build(cwd, *targets)`` also
  passes ``--summary-json`` and returns the parsed summary.
* ``require_tool(name)`` skips a test when a program is missing, but fails it when
  ``CI=true``: in CI a missing tool is a broken image, not a reason to test less.
* ``write_workspace(files)`` makes a workspace from a dict of path -> text.
* ``tree_snapshot(path)`` maps every entry under a directory to its kind, mode and bytes,
  for byte-for-byte comparisons of output trees.

Tests use these through fixtures (pytest runs with ``--import-mode=importlib``, so test
modules do not import this file).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest

TESTS_DIR = Path(__file__).resolve().parent
FIXTURES_DIR = TESTS_DIR / "fixtures"
REPO_ROOT = TESTS_DIR.parent
# Plain helper modules that tests and bench/ both import (tests/servers_*.py: the remote
# cache servers a test or a benchmark starts on loopback).
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
# Before any test module imports grpc: engine.remote turns grpc's fork support off, which
# the sandbox tests that fork in this process (after gRPC tests ran here) need.
import dtbuild.engine.remote  # noqa: E402, F401

#: How long one CLI run may take before the test fails (a hung build is a bug, not a wait).
DEFAULT_TIMEOUT = 120.0


# --------------------------------------------------------------------------- plain helpers


def dtbuild_argv() -> list[str]:
    """The command that runs the CLI: ``python -m dtbuild.engine.cli`` with the test's own
    interpreter (so the editable install is the one tested), or the ``dtbuild`` script next
    to it when the module cannot be run. ``DTBUILD_TEST_CLI`` (a shell-quoted command)
    overrides both, to test an installed binary."""
    override = os.environ.get("DTBUILD_TEST_CLI")
    if override:
        import shlex

        return shlex.split(override)
    return list(_default_argv())


_ARGV_CACHE: list[tuple[str, ...]] = []


def _default_argv() -> tuple[str, ...]:
    if not _ARGV_CACHE:
        module = (sys.executable, "-m", "dtbuild.engine.cli")
        try:
            done = subprocess.run([*module, "--version"], capture_output=True, text=True, timeout=60)
            works = done.returncode == 0 and "dtbuild" in done.stdout
        except (OSError, subprocess.TimeoutExpired):
            works = False
        if works:
            _ARGV_CACHE.append(module)
        else:
            script = Path(sys.executable).with_name("dtbuild")
            _ARGV_CACHE.append((str(script),) if script.exists() else module)
    return _ARGV_CACHE[0]


def read_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The document ``--summary-json FILE`` wrote, checked for the fields SPEC.md promises."""
    summary = json.loads(Path(path).read_text())
    assert set(summary) >= {"targets", "actions"}, f"summary lacks targets/actions: {summary}"
    assert set(summary["actions"]) >= {"executed", "cached", "remote_cached"}, summary["actions"]
    return summary


def require_tool(name: str) -> str:
    """The path of program ``name``; skip the test when it is missing, fail under CI=true."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}, and CI=true: the CI image must provide it", pytrace=False)
    pytest.skip(message)
    raise AssertionError("unreachable")


def tree_snapshot(root: str | os.PathLike[str], *, exclude: Sequence[str] = (".dtbuild",),
                  dir_modes: bool = True) -> dict[str, tuple[str, int | None, bytes | str | None]]:
    """Every entry below ``root`` (relative path -> (kind, mode, content)): files with their
    bytes, symlinks with their target, directories with their mode (or None without
    ``dir_modes``). Entries whose first path component is in ``exclude`` are left out."""
    root = Path(root)
    out: dict[str, tuple[str, int | None, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in exclude]
            filenames = [f for f in filenames if f not in exclude]
        for name in sorted([*dirnames, *filenames]):
            p = Path(dirpath) / name
            rel = str(rel_dir / name) if rel_dir != Path(".") else name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", None, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode) if dir_modes else None, None)
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


class Run(NamedTuple):
    """One CLI run: unpacks as ``code, stdout, stderr``."""

    exit_code: int
    stdout: str
    stderr: str


class BuildRun(NamedTuple):
    exit_code: int
    stdout: str
    stderr: str
    #: The --summary-json document, or None when the build wrote none.
    summary: dict[str, Any] | None

    @property
    def executed(self) -> int:
        assert self.summary is not None, f"no summary was written; stderr:\n{self.stderr}"
        return int(self.summary["actions"]["executed"])

    @property
    def cached(self) -> int:
        assert self.summary is not None, f"no summary was written; stderr:\n{self.stderr}"
        return int(self.summary["actions"]["cached"])


class DtbuildRunner:
    """``run_dtbuild``: runs the CLI with a per-test cache. Keyword arguments:

    * ``env``: variables added to (or, with value None, removed from) the environment;
      ``DTBUILD_CACHE_DIR`` here overrides the per-test cache.
    * ``check``: None accepts any exit code; True expects 0; an int expects that code.
      A mismatch fails the test with the run's stderr.
    * ``umask``: run the CLI under this umask.
    * ``measure_rss``: record the child's peak RSS in ``last_max_rss_kb``.
    * ``timeout``: seconds before the run is killed and the test fails.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.cache_dir = tmp_path / "dtbuild-cache"
        self._tmp_path = tmp_path
        self._summaries = 0
        self.last_max_rss_kb: int | None = None

    def env(self, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
        """The environment a run gets: ours without DTBUILD_* settings, a private cache."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DTBUILD_")}
        env["DTBUILD_CACHE_DIR"] = str(self.cache_dir)
        for key, value in (extra or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def argv(self, *args: str) -> list[str]:
        return [*dtbuild_argv(), *map(str, args)]

    def __call__(self, cwd: str | os.PathLike[str], *args: str, env: Mapping[str, str | None] | None = None,
                 check: bool | int | None = None, umask: int | None = None, measure_rss: bool = False,
                 timeout: float = DEFAULT_TIMEOUT) -> Run:
        out_path = self._tmp_path / f".run-{os.getpid()}-{time.monotonic_ns()}"
        with open(f"{out_path}.out", "w+b") as out, open(f"{out_path}.err", "w+b") as err:
            argv = self.argv(*args)
            if measure_rss:  # through a small parent: see _RSS_PARENT
                argv = [sys.executable, "-c", _RSS_PARENT, f"{out_path}.rss", *argv]
            proc = subprocess.Popen(argv, cwd=cwd, env=self.env(env), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, preexec_fn=_umask_setter(umask),
                                    start_new_session=measure_rss)
            try:
                code, _ = _wait(proc, timeout)
            finally:
                if measure_rss:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)  # dtbuild too, after a timeout
            out.seek(0)
            err.seek(0)
            result = Run(code, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"))
        os.unlink(f"{out_path}.out")
        os.unlink(f"{out_path}.err")
        if measure_rss:
            rss_path = Path(f"{out_path}.rss")
            self.last_max_rss_kb = int(rss_path.read_text())
            rss_path.unlink()
        if check is not None:
            expected = 0 if check is True else int(check)
            if result.exit_code != expected:
                pytest.fail(f"dtbuild {' '.join(map(str, args))} exited with {result.exit_code}, expected "
                            f"{expected}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}",
                            pytrace=False)
        return result

    def build(self, cwd: str | os.PathLike[str], *targets_and_flags: str, check: bool | int | None = None,
              **kwargs: Any) -> BuildRun:
        """``dtbuild build TARGETS... --summary-json F``; the summary is parsed."""
        self._summaries += 1
        summary_path = self._tmp_path / f"summary-{self._summaries}.json"
        code, out, err = self(cwd, "build", *targets_and_flags, "--summary-json", str(summary_path),
                              check=check, **kwargs)
        summary = read_summary(summary_path) if summary_path.exists() else None
        return BuildRun(code, out, err, summary)

    def popen(self, cwd: str | os.PathLike[str], *args: str, env: Mapping[str, str | None] | None = None,
              **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start the CLI without waiting (for concurrency and kill tests). The caller waits."""
        return subprocess.Popen(self.argv(*args), cwd=cwd, env=self.env(env), stdin=subprocess.DEVNULL, **kwargs)


#: The parent a measured run goes through. Linux keeps a process's peak RSS across exec, and
#: a child forked from this test process starts with the test process's pages: measured
#: directly, dtbuild's peak would be at least the test runner's (hundreds of MiB late in a
#: long run). Forked from this small interpreter instead, its peak is dtbuild's own.
_RSS_PARENT = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _umask_setter(umask: int | None) -> Callable[[], None] | None:
    if umask is None:
        return None

    def set_umask() -> None:
        os.umask(umask)

    return set_umask


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, int]:
    """Wait for ``proc`` with ``wait4`` (to read its peak RSS); kill it after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"dtbuild did not finish within {timeout:.0f} s: {proc.args}", pytrace=False)
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def workspace(tmp_path: Path) -> Callable[..., Path]:
    """``workspace(name, dest=None)``: a fresh copy of ``tests/fixtures/<name>`` (without any
    ``dtbuild-out``), at ``dest`` or under ``tmp_path``. Each call makes a new copy."""
    copies: dict[str, int] = {}

    def copy(name: str, dest: str | os.PathLike[str] | None = None) -> Path:
        source = FIXTURES_DIR / name
        if not (source / "dtbuild.toml").is_file():
            raise FileNotFoundError(f"{source} is not a fixture workspace (no dtbuild.toml)")
        if dest is None:
            copies[name] = copies.get(name, 0) + 1
            suffix = "" if copies[name] == 1 else f"-{copies[name]}"
            dest = tmp_path / "workspaces" / f"{name}{suffix}"
        target = Path(dest)
        shutil.copytree(source, target, symlinks=True,
                        ignore=shutil.ignore_patterns("dtbuild-out", "__pycache__"))
        return target

    return copy


@pytest.fixture
def write_workspace(tmp_path: Path) -> Callable[..., Path]:
    """``write_workspace({"pkg/BUILD": "...", ...}, name="ws", config="")``: a new workspace
    under ``tmp_path`` holding these files (text; a ``bytes`` value is written as is) and a
    ``dtbuild.toml`` with ``config``. Returns its root. The directory may exist already if
    it is empty (a file system mounted there)."""

    def make(files: Mapping[str, str | bytes], name: str = "ws", config: str = "") -> Path:
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            raise FileExistsError(f"workspace directory {root} is not empty")
        (root / "dtbuild.toml").write_text(config)
        for rel, content in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        return root

    return make


@pytest.fixture
def run_dtbuild(tmp_path: Path) -> DtbuildRunner:
    """Run the dtbuild CLI: ``code, out, err = run_dtbuild(ws, "build", "//app:app")``."""
    return DtbuildRunner(tmp_path)


@pytest.fixture
def cache_dir(run_dtbuild: DtbuildRunner) -> Path:
    """The per-test cache directory ``run_dtbuild`` uses (it may not exist yet)."""
    return run_dtbuild.cache_dir


@pytest.fixture(name="require_tool")
def require_tool_fixture() -> Callable[[str], str]:
    """``require_tool("skopeo")``: skip without the tool (fail when CI=true)."""
    return require_tool


@pytest.fixture(name="read_summary")
def read_summary_fixture() -> Callable[[str | os.PathLike[str]], dict[str, Any]]:
    return read_summary


@pytest.fixture(name="tree_snapshot")
def tree_snapshot_fixture() -> Callable[..., dict[str, tuple[str, int | None, bytes | str | None]]]:
    return tree_snapshot


@pytest.fixture
def reaped() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list to append started processes to: any still running at teardown are killed
    (with their process group when they lead one), so a failing test leaves no build behind."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    import signal

    for proc in procs:
        if proc.poll() is None:
            try:
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            except ProcessLookupError:
                pass
            proc.wait()
