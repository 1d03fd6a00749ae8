"""buildbox-casd on loopback: a real REAPI v2 server (CAS, ActionCache, ByteStream,
Capabilities, and with ``runner=True`` local execution through buildbox-run) for tests
and benchmarks.

``start_casd(workdir)`` starts one on a free port of 127.0.0.1 with its storage under
``workdir`` and returns once the port accepts connections. casd keeps every blob as one
read-only file, ``STORAGE/cas/objects/<first 2 hex>/<other 62 hex>``, and every action
result as a file under ``STORAGE/actioncache/objects``; :meth:`CasdServer.blob_path`,
:meth:`CasdServer.corrupt_blob` and :meth:`CasdServer.ac_entries` read and break that
layout the way a test needs to.

Importable as ``servers_casd`` from tests (``tests/conftest.py`` puts ``tests/`` on
``sys.path``) and from ``bench/`` scripts (which add it themselves).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parent.parent
#: How long casd may take to accept connections.
START_TIMEOUT = 20.0


def buildbox_tool(name: str) -> str | None:
    """The path of buildbox program ``name`` (``buildbox-casd``, ``buildbox-run``): from
    ``$DTBUILD_BUILDBOX_DIR``, else ``build/tools/buildbox`` (scripts/setup.sh), else PATH."""
    dirs = [os.environ.get("DTBUILD_BUILDBOX_DIR"), str(REPO_ROOT / "build" / "tools" / "buildbox")]
    for directory in dirs:
        if directory:
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which(name)


def require_buildbox(name: str = "buildbox-casd") -> str:
    """The path of buildbox program ``name`` for a test: a missing one skips the test,
    but fails it when ``CI=true`` (the CI image must provide it)."""
    return require(buildbox_tool(name), name)


def require(found: str | None, name: str) -> str:
    """``found``, the path of program ``name``; when it is None the test skips, or fails
    when ``CI=true``."""
    import pytest

    if found is None:
        message = f"{name} is not installed (scripts/setup.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}, and CI=true: the CI image must provide it", pytrace=False)
        pytest.skip(message)
    return found


class CasdServer:
    """A running buildbox-casd. Stop it with :meth:`stop` or use it as a context manager."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, storage: Path, log: Path) -> None:
        self.proc = proc
        self.port = port
        #: The CACHE_PATH directory casd stores into.
        self.storage = storage
        #: casd's stdout and stderr.
        self.log = log

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_path(self, hash: str) -> Path:
        """Where casd keeps the blob of sha256 ``hash`` (it may not exist)."""
        return self.storage / "cas" / "objects" / hash[:2] / hash[2:]

    def has_blob(self, hash: str) -> bool:
        return self.blob_path(hash).is_file()

    def corrupt_blob(self, hash: str, data: bytes | None = None) -> Path:
        """Replace the stored bytes of blob ``hash`` (casd keeps them read-only) with
        ``data``, by default the same bytes with the first one flipped, so the size is
        unchanged and only the hash check can notice."""
        path = self.blob_path(hash)
        if data is None:
            old = path.read_bytes()
            data = bytes([old[0] ^ 0xFF]) + old[1:] if old else b"x"
        path.chmod(0o644)
        path.write_bytes(data)
        path.chmod(0o444)
        return path

    def blob_hashes(self) -> set[str]:
        """The hashes of every blob stored."""
        objects = self.storage / "cas" / "objects"
        if not objects.is_dir():
            return set()
        return {sub.name + f.name for sub in objects.iterdir() if sub.is_dir() for f in sub.iterdir()}

    def ac_entries(self) -> int:
        """How many action results are stored."""
        objects = self.storage / "actioncache" / "objects"
        if not objects.is_dir():
            return 0
        return sum(1 for p in objects.rglob("*") if p.is_file())

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then wait (SIGKILL after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL and wait: the server vanishes mid-conversation."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> CasdServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class CasdError(RuntimeError):
    """casd would not start."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_casd(workdir: Path, *, runner: bool = False, runner_args: Sequence[str] = (),
               extra_args: Sequence[str] = (), log_level: str = "warning") -> CasdServer:
    """Start buildbox-casd with storage ``workdir/casd-storage`` and its log at
    ``workdir/casd.log``; return once it accepts connections.

    :param runner: enable local execution (``--buildbox-run=`` the buildbox-run found
        by :func:`buildbox_tool`), each of ``runner_args`` passed as ``--runner-arg=ARG``.
    :param extra_args: more casd options (``--local-server-instance=NAME``, ...).
    :raises CasdError: casd or buildbox-run is missing, casd died, or it did not accept
        connections within 20 s (the message holds its log).
    """
    casd = buildbox_tool("buildbox-casd")
    if casd is None:
        raise CasdError("buildbox-casd is not installed (run scripts/setup.sh, or set $DTBUILD_BUILDBOX_DIR)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "casd-storage"
    log = workdir / "casd.log"
    args = [f"--log-level={log_level}"]
    if runner:
        run = buildbox_tool("buildbox-run")
        if run is None:
            raise CasdError("buildbox-run is not installed (run scripts/setup.sh, or set $DTBUILD_BUILDBOX_DIR)")
        args.append(f"--buildbox-run={run}")
        args.extend(f"--runner-arg={arg}" for arg in runner_args)
    args.extend(extra_args)
    last_log = ""
    for _attempt in range(3):  # another process may take the free port first
        port = _free_port()
        with open(log, "ab") as out:
            proc = subprocess.Popen([casd, f"--bind=127.0.0.1:{port}", *args, str(storage)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        server = CasdServer(proc, port, storage, log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _accepts(port):
                return server
            time.sleep(0.05)
        if proc.poll() is None:
            server.kill()
            raise CasdError(f"buildbox-casd did not accept connections on port {port} within "
                            f"{START_TIMEOUT:.0f} s; its log:\n{server.log_text()}")
        last_log = server.log_text()
        if "address already in use" not in last_log.lower() and "bind" not in last_log.lower():
            break
    raise CasdError(f"buildbox-casd exited with status {proc.returncode}; its log:\n{last_log}")
