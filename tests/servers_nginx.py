"""nginx as a Bazel HTTP remote cache on loopback, for tests and benchmarks.

``start_nginx_cache(workdir)`` runs nginx (``/usr/sbin/nginx`` on Debian) in the foreground (``daemon off``)
with a configuration of its own, serving a WebDAV ``location /`` with ``PUT`` and
``DELETE``: exactly what people put in front of Bazel as a remote cache. Clients write
``<url>/ac/<sha256>`` and ``<url>/cas/<sha256>``; the files land in ``<root>/ac/`` and
``<root>/cas/``. With ``users`` the location wants basic auth (``auth_basic_user_file``
with ``{PLAIN}`` entries).

Where things live:

* ``workdir`` holds what only the master process touches: ``nginx.conf``, ``nginx.pid``,
  ``error.log`` and ``access.log`` (the master opens the logs; workers inherit them). It
  stays after ``stop()``, so a failing test can show the logs.
* The storage root, the ``*_temp_path`` directories and the password file are read and
  written by the *workers*. Run as root, nginx's workers run as ``nobody``, who cannot
  traverse pytest's ``/tmp/pytest-of-root`` (mode 0700). So as root these live in a fresh
  ``tempfile.mkdtemp(prefix="dtbuild-nginx-")`` in ``/tmp`` (not ``$TMPDIR``; mode
  0755, its contents owned by ``nobody``), removed by ``stop()``; as any other user they
  live under ``workdir/data``. The temp paths share the storage root's file system, so
  nginx moves an upload into place with a rename.

nginx details a client sees (checked with 1.22): a ``PUT`` answers 201 for a new file and
204 for one that existed (the file is replaced, by a rename from the body temp file, so a
reader never sees half a file; an aborted upload leaves nothing); ``HEAD`` of a present
file is 200 with its ``Content-Length``, of a missing one 404; a missing or wrong password
is 401 with ``WWW-Authenticate: Basic``; files are written mode 0664 (``dav_access``).

``kill()`` sends SIGKILL to the master and its workers (one process group), for tests of a
server that dies; ``stop()`` (also the context manager's exit) ends it gracefully if it
still runs and cleans up. Both may be called more than once.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

#: The nginx binary: the one on PATH, else Debian's.
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin") or "/usr/sbin/nginx"
#: How long nginx may take to answer on its port.
START_TIMEOUT = 10.0
_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class NginxCache:
    """A running nginx remote cache (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, root: Path, workdir: Path,
                 private_dir: Path | None) -> None:
        self.proc = proc
        self.port = port
        #: ``http://127.0.0.1:PORT``
        self.url = f"http://127.0.0.1:{port}"
        #: The storage root, holding ``ac/`` and ``cas/``.
        self.root = root
        self.workdir = workdir
        self._private_dir = private_dir

    @property
    def error_log(self) -> str:
        try:
            return (self.workdir / "error.log").read_text(errors="replace")
        except OSError:
            return ""

    @property
    def access_log(self) -> str:
        try:
            return (self.workdir / "access.log").read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the master and every worker at once (a server that dies)."""
        _signal_group(self.proc, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """End nginx (fast shutdown; SIGKILL after 10 s) and remove the private storage."""
        if self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # Workers left behind by a master that died are in its group too.
        _signal_group(self.proc, signal.SIGKILL)
        self.proc.wait()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None

    def __enter__(self) -> NginxCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_nginx_cache(workdir: Path, *, users: Mapping[str, str] | None = None) -> NginxCache:
    """Start nginx serving a WebDAV remote cache on a free loopback port.

    :param workdir: where the configuration and the logs go (created if missing).
    :param users: user name -> password; when given, every request needs basic auth.
    :raises RuntimeError: when nginx exits or does not answer within 10 s (with its error log).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    as_root = os.geteuid() == 0
    private_dir: Path | None
    if as_root:
        # /tmp itself, not $TMPDIR: a TMPDIR below a 0700 directory would shut nobody out.
        data = Path(tempfile.mkdtemp(prefix="dtbuild-nginx-", dir="/tmp"))
        os.chmod(data, 0o755)
        private_dir = data
    else:
        private_dir = None
        data = workdir / "data"
        data.mkdir(exist_ok=True)
    try:
        root = data / "root"
        for sub in (root / "ac", root / "cas", *(data / f"{kind}_temp" for kind in _TEMP_KINDS)):
            sub.mkdir(parents=True, exist_ok=True)
        htpasswd = None
        if users is not None:
            htpasswd = data / "htpasswd"
            htpasswd.write_text("".join(f"{name}:{{PLAIN}}{password}\n" for name, password in users.items()))
            os.chmod(htpasswd, 0o600)
        worker_user = ""
        if as_root:
            nobody = pwd.getpwnam("nobody")
            group = grp.getgrgid(nobody.pw_gid).gr_name
            worker_user = f"user nobody {group};\n"
            for dirpath, dirnames, filenames in os.walk(data):
                for name in [*dirnames, *filenames]:
                    os.chown(os.path.join(dirpath, name), nobody.pw_uid, nobody.pw_gid)
        last_error = ""
        for _attempt in range(5):
            port = _free_port()
            conf = workdir / "nginx.conf"
            conf.write_text(_config(workdir, data, root, port, worker_user, htpasswd))
            (workdir / "error.log").write_text("")
            proc = subprocess.Popen([NGINX, "-p", f"{workdir}/", "-c", str(conf), "-e", str(workdir / "error.log")],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            cache = NginxCache(proc, port, root, workdir, private_dir)
            if _wait_until_listening(proc, port):
                return cache
            last_error = cache.error_log
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            if "Address already in use" not in last_error:
                break  # another port would not help
        raise RuntimeError(f"nginx did not start (exit {proc.returncode}); its error log:\n{last_error}")
    except BaseException:
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
        raise


def _config(workdir: Path, data: Path, root: Path, port: int, worker_user: str, htpasswd: Path | None) -> str:
    temp_paths = "".join(f"    {kind}_temp_path {data / f'{kind}_temp'};\n" for kind in _TEMP_KINDS)
    auth = (f'        auth_basic "dtbuild remote cache";\n        auth_basic_user_file {htpasswd};\n'
            if htpasswd is not None else "")
    return f"""\
daemon off;
master_process on;
worker_processes 2;
{worker_user}pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{
    worker_connections 256;
}}
http {{
    access_log {workdir / "access.log"};
{temp_paths}    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        location / {{
            root {root};
            dav_methods PUT DELETE;
            create_full_put_path on;
            dav_access user:rw group:rw all:r;
            client_max_body_size 0;
{auth}        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_listening(proc: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                # Not another program that took the port first: nginx must still run.
                time.sleep(0.05)
                return proc.poll() is None
        time.sleep(0.02)
    return False


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
