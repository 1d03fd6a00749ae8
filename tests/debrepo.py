"""A signed apt repository made on the fly, for the tests of `deb_packages` and `dtbuild lock`.

``make_repo(root, packages)`` builds real ``.deb`` files with ``dpkg-deb --build
--root-owner-group``, indexes them with ``apt-ftparchive packages`` (one ``Packages``,
``Packages.gz`` and ``Packages.xz`` per component and architecture, ``all`` packages listed
under every architecture as Debian does), writes ``Release`` with ``apt-ftparchive release``
and signs it into ``InRelease`` (and ``Release.gpg``) with a throwaway key made by
``gpg --quick-gen-key`` in a private GNUPGHOME. The public key is exported binary
(``gpg --export``), the keyring format ``gpgv --keyring`` reads.

The ``Repo`` it returns can then break itself the ways a mirror or an attacker would: a
``Packages`` index edited after signing, an ``InRelease`` signed by a key outside the
keyring or altered after signing, a ``.deb`` replaced by other bytes. ``serve(repo.root)``
serves the tree over HTTP on 127.0.0.1 (a threaded ``http.server`` on a free port) and
records the paths asked for.

Everything runs real programs (dpkg-deb, apt-ftparchive, gpg, gpgv): tests call
``require_tool`` for them first. This module is a plain helper (see tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import lzma
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

#: The programs a repository needs (tests pass each to ``require_tool``).
TOOLS = ("dpkg-deb", "apt-ftparchive", "gpg", "gpgv", "gpgconf")

#: Every .deb and index carries this time, so a repository made twice has the same bytes
#: (apart from the signatures and the Release date).
SOURCE_DATE_EPOCH = "1700000000"


@dataclass(frozen=True, slots=True)
class Symlink:
    """A symbolic link in a package's data (``target`` as the link holds it)."""

    target: str


#: A data file: its bytes (mode 0644), or (bytes, mode), or a Symlink.
DataFile = bytes | tuple[bytes, int] | Symlink


@dataclass(frozen=True, slots=True)
class Deb:
    """One binary package to build. ``files`` maps absolute paths in the image to their
    content; ``depends``, ``pre_depends`` and ``provides`` are relation fields as a
    control file spells them (``"a (>= 1) | b, c"``)."""

    name: str
    version: str = "1.0-1"
    architecture: str = "amd64"
    depends: str = ""
    pre_depends: str = ""
    provides: str = ""
    essential: bool = False
    priority: str = "optional"
    section: str = "misc"
    description: str = ""
    files: Mapping[str, DataFile] = field(default_factory=dict)
    #: dpkg-deb's -Z: xz, gzip, zstd or none (the data.tar's compression).
    compression: str = "xz"
    component: str | None = None

    @property
    def upstream_filename(self) -> str:
        """The pool file name: NAME_VERSION_ARCH.deb, without the epoch (as Debian names it)."""
        version = self.version.split(":", 1)[1] if ":" in self.version else self.version
        return f"{self.name}_{version}_{self.architecture}.deb"

    def control(self) -> str:
        """The DEBIAN/control paragraph."""
        fields = [("Package", self.name), ("Version", self.version), ("Architecture", self.architecture),
                  ("Maintainer", "dtbuild tests <tests@example.invalid>"), ("Priority", self.priority),
                  ("Section", self.section)]
        if self.essential:
            fields.append(("Essential", "yes"))
        for key, value in (("Pre-Depends", self.pre_depends), ("Depends", self.depends),
                           ("Provides", self.provides)):
            if value:
                fields.append((key, value))
        summary = self.description or f"{self.name} for tests"
        fields.append(("Description", f"{summary}\n A package made by tests/debrepo.py.\n .\n Second paragraph."))
        return "".join(f"{key}: {value}\n" for key, value in fields)


@dataclass
class Repo:
    """A built repository: serve ``root``; ``keyring`` is the binary public keyring."""

    root: Path
    suite: str
    components: tuple[str, ...]
    architectures: tuple[str, ...]
    keyring: Path
    gnupghome: Path
    #: package name -> the .debs of that name (several versions possible), in build order.
    debs: dict[str, list[Path]]
    #: package name -> what each of those .debs was built from.
    specs: dict[str, list[Deb]]
    codename: str = ""

    @property
    def dist(self) -> Path:
        return self.root / "dists" / self.suite

    def source_line(self, url: str) -> str:
        """The `sources` entry for this repository served at ``url``."""
        return f"{url.rstrip('/')} {self.suite} {' '.join(self.components)}"

    def deb(self, name: str) -> Path:
        """The (last built) .deb of package ``name``."""
        return self.debs[name][-1]

    def packages_files(self, component: str | None = None, arch: str | None = None) -> list[Path]:
        """The Packages, Packages.gz and Packages.xz of one component and architecture."""
        base = self.dist / (component or self.components[0]) / f"binary-{arch or self.architectures[0]}"
        return [base / "Packages", base / "Packages.gz", base / "Packages.xz"]

    # ----------------------------------------------------------------- ways to break it

    def tamper_packages(self, component: str | None = None, arch: str | None = None) -> None:
        """Edit the Packages index (every compression of it) after Release was signed: a
        dependency is dropped, so the hashes in Release no longer match."""
        plain, gz, xz = self.packages_files(component, arch)
        text = plain.read_bytes().replace(b"\nDepends: ", b"\nX-Tampered: ", 1)
        assert text != plain.read_bytes(), "nothing to tamper with: no package has Depends"
        _write(plain, text)
        _write(gz, gzip.compress(text, mtime=0))
        _write(xz, lzma.compress(text))

    def sign_with_other_key(self) -> None:
        """Sign InRelease and Release.gpg with a new key that is not in ``keyring``."""
        other = _new_gnupghome()
        try:
            _gen_key(other, "someone else <other@example.invalid>")
            self._sign(other)
        finally:
            _stop_agent(other)
            shutil.rmtree(other, ignore_errors=True)

    def tamper_inrelease(self) -> None:
        """Change a signed line of InRelease (the signature then fails to verify)."""
        inrelease = self.dist / "InRelease"
        text = inrelease.read_text()
        changed = text.replace(f"Suite: {self.suite}\n", f"Suite: {self.suite}-tampered\n", 1)
        assert changed != text
        _write(inrelease, changed.encode())

    def replace_deb(self, name: str, data: bytes | None = None) -> bytes:
        """Put other bytes where package ``name``'s .deb was (its Packages entry and the
        signature untouched); returns the old bytes. By default the new bytes are the
        same package rebuilt with one more file, a valid .deb that is not the one in the
        index (so only its digest tells them apart)."""
        path = self.deb(name)
        old = path.read_bytes()
        if data is None:
            spec = self.specs[name][-1]
            evil = replace(spec, files={**spec.files, "/etc/injected": b"not what was locked\n"})
            with tempfile.TemporaryDirectory(prefix="debrepo-build-") as scratch:
                _build_deb(evil, Path(scratch) / "tree", path)
        else:
            _write(path, data)
        return old

    def resign(self) -> None:
        """Write Release again from the current indexes and sign it with the repository key."""
        self._release()
        self._sign(self.gnupghome)

    def close(self) -> None:
        """Stop the gpg-agent the key's GNUPGHOME started and remove that directory."""
        _stop_agent(self.gnupghome)
        shutil.rmtree(self.gnupghome, ignore_errors=True)

    # ----------------------------------------------------------------- building

    def _release(self) -> None:
        options = [f"-oAPT::FTPArchive::Release::{key}={value}" for key, value in (
            ("Origin", "dtbuild-tests"), ("Label", "dtbuild-tests"), ("Suite", self.suite),
            ("Codename", self.codename or self.suite), ("Architectures", " ".join(self.architectures)),
            ("Components", " ".join(self.components)), ("Description", "a repository for tests"))]
        for stale in ("Release", "InRelease", "Release.gpg"):
            (self.dist / stale).unlink(missing_ok=True)
        done = _run(["apt-ftparchive", *options, "release", "."], cwd=self.dist)
        _write(self.dist / "Release", done.stdout)

    def _sign(self, gnupghome: Path) -> None:
        release = self.dist / "Release"
        for out, how in ((self.dist / "InRelease", "--clearsign"), (self.dist / "Release.gpg", "--detach-sign")):
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.unlink(missing_ok=True)
            _run(["gpg", "--homedir", str(gnupghome), "--batch", "--yes", "--pinentry-mode", "loopback",
                  "--passphrase", "", "--digest-algo", "SHA512", how, "--output", str(tmp), str(release)])
            os.replace(tmp, out)


def make_repo(root: str | os.PathLike[str], packages: Sequence[Deb], *, suite: str = "stable",
              codename: str = "", components: Sequence[str] = ("main",),
              arches: Sequence[str] = ("amd64",)) -> Repo:
    """Build a signed repository of ``packages`` under ``root`` (created; served as is)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    components, arches = tuple(components), tuple(arches)
    gnupghome = _new_gnupghome()
    try:
        _gen_key(gnupghome, "dtbuild test archive <archive@example.invalid>")
        keyring = root.parent / f"{root.name}-keyring.gpg"
        _write(keyring, _run(["gpg", "--homedir", str(gnupghome), "--batch", "--export"]).stdout)
        repo = Repo(root=root, suite=suite, components=components, architectures=arches, keyring=keyring,
                    gnupghome=gnupghome, debs={}, specs={}, codename=codename)
        with tempfile.TemporaryDirectory(prefix="debrepo-build-") as scratch:
            for deb in packages:
                component = deb.component or components[0]
                if component not in components:
                    raise ValueError(f"{deb.name}: component {component!r} is not one of {components}")
                pool = root / "pool" / component / deb.name[0] / deb.name
                pool.mkdir(parents=True, exist_ok=True)
                out = pool / deb.upstream_filename
                _build_deb(deb, Path(scratch) / f"{deb.name}-{len(repo.debs.get(deb.name, []))}", out)
                repo.debs.setdefault(deb.name, []).append(out)
                repo.specs.setdefault(deb.name, []).append(deb)
        for component in components:
            for arch in arches:
                index_dir = repo.dist / component / f"binary-{arch}"
                index_dir.mkdir(parents=True, exist_ok=True)
                text = b""
                if (root / "pool" / component).is_dir():
                    text = _run(["apt-ftparchive", "--arch", arch, "packages", f"pool/{component}"], cwd=root).stdout
                _write(index_dir / "Packages", text)
                _write(index_dir / "Packages.gz", gzip.compress(text, mtime=0))
                _write(index_dir / "Packages.xz", lzma.compress(text))
        repo.resign()
    except BaseException:
        _stop_agent(gnupghome)
        shutil.rmtree(gnupghome, ignore_errors=True)
        raise
    return repo


def _build_deb(deb: Deb, tree: Path, out: Path) -> None:
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(deb.control())
    md5sums = []
    for path, content in sorted(deb.files.items()):
        if not path.startswith("/"):
            raise ValueError(f"{deb.name}: data path {path!r} must be absolute")
        dest = tree / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Symlink):
            dest.symlink_to(content.target)
            continue
        data, mode = content if isinstance(content, tuple) else (content, 0o644)
        dest.write_bytes(data)
        dest.chmod(mode)
        md5sums.append(f"{hashlib.md5(data).hexdigest()}  {path.lstrip('/')}\n")
    if md5sums:
        (tree / "DEBIAN" / "md5sums").write_text("".join(md5sums))
    for dirpath, dirnames, _ in os.walk(tree):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
    os.chmod(tree, 0o755)
    tmp = out.with_name(f".{out.name}.tmp")
    _run(["dpkg-deb", "--root-owner-group", f"-Z{deb.compression}", "--build", str(tree), str(tmp)],
         env={"SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH})
    os.replace(tmp, out)


# --------------------------------------------------------------------------- gpg


def _new_gnupghome() -> Path:
    # Short and private: gpg-agent's socket lives here (a socket path is limited to ~108
    # bytes, which a pytest tmp_path can exceed) and gpg refuses a group-readable home.
    home = Path(tempfile.mkdtemp(prefix="dtb-gpg-"))
    home.chmod(0o700)
    return home


def _gen_key(gnupghome: Path, uid: str) -> None:
    _run(["gpg", "--homedir", str(gnupghome), "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
          "--quick-gen-key", uid, "ed25519", "sign", "never"])


def _stop_agent(gnupghome: Path) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["gpgconf", "--homedir", str(gnupghome), "--kill", "gpg-agent"], capture_output=True,
                       timeout=30)


def gpgv_verify(keyring: Path, inrelease: Path) -> bytes:
    """The signed text of ``inrelease`` as ``gpgv`` verifies it against ``keyring``; raises
    CalledProcessError when the signature does not verify."""
    return _run(["gpgv", "--keyring", str(keyring), "--output", "-", str(inrelease)]).stdout


# --------------------------------------------------------------------------- plain helpers


def _run(argv: list[str], *, cwd: Path | None = None,
         env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    full_env = {**os.environ, **(env or {})}
    done = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, argv, done.stdout,
                                            done.stderr + f"\n(command: {' '.join(argv)})".encode())
    return done


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def parse_paragraphs(text: str) -> list[dict[str, str]]:
    """A deb822 document's paragraphs (continuation lines joined with newlines): enough
    to read Release and Packages in the tests, independent of the code under test."""
    out: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                out.append(current)
            current, key = {}, ""
        elif line[0] in " \t" and key:
            current[key] += "\n" + line.strip()
        else:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    if current:
        out.append(current)
    return out


# --------------------------------------------------------------------------- serving


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests.append(self.path)
        super().do_GET()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, directory: Path) -> None:
        self.requests: list[str] = []
        self.lock = threading.Lock()

        super().__init__(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))


@dataclass
class Served:
    """A repository being served: ``url`` is its base URL; ``stop()`` ends the server
    (idempotent), after which requests are refused."""

    url: str
    requests: list[str]
    _server: _Server
    _thread: threading.Thread
    stopped: bool = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=30)


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[Served]:
    """Serve ``directory`` on 127.0.0.1 at a free port until the block ends."""
    server = _Server(directory)
    thread = threading.Thread(target=server.serve_forever, name="debrepo-http", daemon=True)
    thread.start()
    served = Served(url=f"http://127.0.0.1:{server.server_address[1]}", requests=server.requests,
                    _server=server, _thread=thread)
    try:
        yield served
    finally:
        served.stop()
