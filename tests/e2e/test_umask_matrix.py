"""Same inputs, same bytes, whatever the builder's umask and environment: the workspace
``tests/fixtures/every_kind`` (whose targets together run every built-in action kind, a
pull_image from a registry served on 127.0.0.1 and fetch_url from file:// URLs included)
is built three times, each in a fresh copy with a fresh cache, under umask 000, 022 and
077 and with different locale, time-zone and unrelated variables. Every entry under
dtbuild-out/ (but the .dtbuild state directory) must have the same kind, mode and bytes
in all three: every action's sandbox has a fixed umask (022) and environment.

The three builds run once per test session (they take a while) and the tests below
compare their results target by target, so a bug in one action kind marks only the
targets it reaches. A registered action kind that none of the builds ran fails
``test_every_registered_action_kind_ran``: a new action kind must come with a target here.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

APPLETS = ["sh", "cat", "echo", "id", "ls", "mkdir", "rm", "chown", "chmod", "stat", "test", "touch", "sleep",
           "env", "wc"]

#: umask -> the environment the build runs with (besides the per-run cache).
BUILDS: dict[int, dict[str, str | None]] = {
    0o000: {"TZ": "Pacific/Chatham", "LANG": "C", "LC_ALL": "C", "HOME": None, "GREETING": "hello"},
    0o022: {"TZ": "UTC", "LANG": "C.UTF-8", "LC_ALL": None},
    0o077: {"TZ": "America/St_Johns", "LANG": "en_US.ISO-8859-1", "LC_ALL": "POSIX", "SOURCE_DATE_EPOCH": "99",
            "TMPDIR": None, "PYTHONHASHSEED": "12345"},
}

#: Registered action kinds no target here runs (pull_image runs against a local server):
#: DebLockProblem only ever fails (a missing or stale lock), so no build it is in succeeds.
SKIPPED_KINDS: frozenset[str] = frozenset({"DebLockProblem"})

#: Every target of the fixture (and of the remote/ package the test writes), with the bug
#: that makes it differ between umasks, if any (the test of that target is then an xfail).
TARGETS: dict[str, str | None] = {
    "//base:rootfs": None,
    "//base:busybox_bin": None,
    "//base:busybox": None,
    "//pkgs:site": None,
    "//pkgs:conf": None,
    "//pkgs:generated": None,
    "//pkgs:tarball": None,
    "//pkgs:merged": None,
    "//pkgs:deps_only": None,
    "//pkgs:sh": None,
    "//pkgs:env": None,
    "//pkgs:nss": None,
    "//pkgs:certs": None,
    "//images:site_layer": None,
    "//images:app": None,
    "//images:layered": None,
    "//images:layered_on_base": None,
    "//images:both": None,
    "//images:app_root": None,
    "//images:imported": None,
    "//images:on_imported": None,
    "//images:layered_on_imported": None,
    "//root:layer": None,
    "//root:with_layer": None,
    "//root:run_as_root": None,
    "//remote:payload": None,
    "//remote:note": None,
    "//remote:fetched": None,
    "//remote:pulled": None,
    "//remote:on_pulled": None,
    "//remote:debs": None,
    "//remote:debian": None,
    "//images:generated_shell": None,
}

_ACTION_LINE = re.compile(r"^\[\d+/\d+\] ([A-Z][A-Za-z0-9]*) ", re.MULTILINE)


# --------------------------------------------------------------------------- the workspace


def _add_busybox(ws: Path) -> None:
    bindir = ws / "base" / "rootfs" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", bindir / "busybox")
    for applet in APPLETS:
        (bindir / applet).symlink_to("busybox")


def _deterministic_tar_gz(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted({str(Path(p).parent) for p in files} - {"."}):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def _serve_files(directory: Path) -> dict[str, str]:
    """Files for fetch_url's file:// URLs: name -> sha256."""
    directory.mkdir(parents=True)
    (directory / "payload.tar.gz").write_bytes(_deterministic_tar_gz(
        {"share/fetched/a.txt": b"fetched\n", "share/fetched/deeper/b.txt": b"deeper\n"}))
    (directory / "note.txt").write_bytes(b"a plain fetched file\n")
    _build_deb(directory / "hello-data_1.0_all.deb")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def _build_deb(out: Path) -> None:
    """A Debian package made by dpkg-deb: a script, a data file, a directory and its md5sums."""
    root = out.parent / "deb-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: hello-data\nVersion: 1.0\nArchitecture: all\nMaintainer: Test <test@example.invalid>\n"
        "Installed-Size: 4\nDescription: files for the umask matrix\n compared under every umask.\n")
    files = {"usr/share/hello/greeting": (b"hello from a .deb\n", 0o644),
             "usr/bin/hello-data": (b"#!/bin/sh\ncat /usr/share/hello/greeting\n", 0o755)}
    for path, (data, mode) in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        (root / path).chmod(mode)
    (root / "DEBIAN" / "md5sums").write_text(
        "".join(f"{hashlib.md5(data).hexdigest()}  {path}\n" for path, (data, _) in sorted(files.items())))
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(out)], check=True,
                   capture_output=True, env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"})
    shutil.rmtree(root)


_DEB_SOURCES = ["http://deb.example.invalid/debian stable main"]


def _write_deb_lock(package: Path, files: Path, sums: dict[str, str]) -> None:
    """remote/'s keyring (never read: the lock is given) and a lock naming the served .deb."""
    from dtbuild.rules.builtin.deb import inputs_digest

    deb = files / "hello-data_1.0_all.deb"
    (package / "keyring.gpg").write_bytes(b"")
    lock = {"version": 1, "inputs_digest": inputs_digest(_DEB_SOURCES, ["hello-data"], ["amd64"]),
            "keyring_sha256": hashlib.sha256(b"").hexdigest(),
            "sources": [{"url": "http://deb.example.invalid/debian", "suite": "stable", "components": ["main"],
                         "inrelease_sha256": "0" * 64, "date": "Sat, 10 May 2025 10:00:00 UTC"}],
            "architectures": {"amd64": [
                {"name": "hello-data", "version": "1.0", "architecture": "all", "url": deb.as_uri(),
                 "sha256": sums[deb.name], "size": deb.stat().st_size, "depends": []}]}}
    (package / "debian.lock.json").write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")


def _remote_build(files: Path, sums: dict[str, str], registry: tuple[str, str] | None) -> str:
    text = f"""# Written by the test: downloads from file:// URLs (a missing mirror first), and a pull.
fetch_url(
    name = "payload",
    urls = ["file://{files}/missing.tar.gz", "file://{files}/payload.tar.gz"],
    sha256 = "{sums['payload.tar.gz']}",
    extract = True,
    prefix = "/opt/fetched",
)

fetch_url(
    name = "note",
    urls = ["file://{files}/note.txt"],
    sha256 = "{sums['note.txt']}",
    executable = True,
)

image(
    name = "fetched",
    tag = "1",
    copy_to_root = [":payload", ":note"],
    compressor = "none",
)

# A Debian package from a lock (the test writes it): fetched by sha256, extracted with
# its dpkg entry, one layer.
deb_packages(
    name = "debs",
    sources = {json.dumps(_DEB_SOURCES)},
    keyring = "keyring.gpg",
    packages = ["hello-data"],
    lockfile = "debian.lock.json",
)

layered_image(
    name = "debian",
    tag = "1",
    contents = [":debs"],
    compressor = "none",
)
"""
    if registry is not None:
        host, digest = registry
        text += f"""
pull_image(
    name = "pulled",
    image_name = "{host}/every-kind/base",
    image_digest = "{digest}",
    final_image_tag = "pulled",
    tls_verify = False,
)

image(
    name = "on_pulled",
    tag = "1",
    from_image = ":pulled",
    copy_to_root = [":note"],
    compressor = "zstd",
)
"""
    return text


class _LayoutRegistry(http.server.ThreadingHTTPServer):
    """A read-only registry on 127.0.0.1 serving one OCI layout's blobs (GET and HEAD of
    /v2/, manifests and blobs by digest): enough for pull_image."""

    daemon_threads = True

    def __init__(self, layout: Path) -> None:
        self.blobs = layout / "blobs" / "sha256"
        super().__init__(("127.0.0.1", 0), _LayoutHandler)


class _LayoutHandler(http.server.BaseHTTPRequestHandler):
    server: _LayoutRegistry

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, head: bool) -> None:
        match = re.fullmatch(r"/v2/(?:[a-z0-9/_.-]+)/(manifests|blobs)/sha256:([0-9a-f]{64})", self.path)
        if self.path == "/v2/":
            body, kind = b"{}", "application/json"
        elif match and (self.server.blobs / match.group(2)).is_file():
            body = (self.server.blobs / match.group(2)).read_bytes()
            kind = "application/octet-stream"
            if match.group(1) == "manifests":
                kind = json.loads(body).get("mediaType", "application/vnd.oci.image.manifest.v1+json")
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Content-Digest", "sha256:" + hashlib.sha256(body).hexdigest())
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)


# --------------------------------------------------------------------------- the three builds


_RESULTS: dict[str, Any] = {}


@pytest.fixture
def matrix(workspace, run_dtbuild, require_tool, tree_snapshot, tmp_path) -> Iterator[dict[str, Any]]:
    """The three builds (made by the first test that asks, then remembered): per umask, the
    build's summary, output (stdout and stderr) and dtbuild-out/ snapshot, and the registered action kinds."""
    if not _RESULTS:
        for tool in ("busybox", "unshare", "fakeroot", "bash", "tar", "dpkg-deb"):
            require_tool(tool)
        files = tmp_path / "served"
        sums = _serve_files(files)
        # A seed build gives the image the registry serves (any build of //base:busybox
        # gives these bytes: that is what the other tests check).
        seed = workspace("every_kind", tmp_path / "seed")
        _add_busybox(seed)
        (seed / "remote").mkdir()
        (seed / "remote" / "BUILD").write_text(_remote_build(files, sums, None))
        _write_deb_lock(seed / "remote", files, sums)
        run_dtbuild.build(seed, "//base:busybox", check=True)
        _, plugins, _ = run_dtbuild(seed, "plugins", check=True)
        layout = seed / "dtbuild-out" / "base" / "busybox.oci"
        digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
        server = _LayoutRegistry(layout)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            builds = {}
            for umask, env in BUILDS.items():
                ws = workspace("every_kind", tmp_path / f"umask-{umask:03o}")
                _add_busybox(ws)
                (ws / "remote").mkdir()
                (ws / "remote" / "BUILD").write_text(
                    _remote_build(files, sums, (f"127.0.0.1:{server.server_address[1]}", digest)))
                _write_deb_lock(ws / "remote", files, sums)
                cache = tmp_path / f"cache-{umask:03o}"
                build = run_dtbuild.build(ws, "//...", check=True, umask=umask, timeout=300,
                                          env={**env, "DTBUILD_CACHE_DIR": str(cache)})
                builds[umask] = {"summary": build.summary, "output": build.stdout + build.stderr,
                                 "tree": tree_snapshot(ws / "dtbuild-out")}
        finally:
            server.shutdown()
            server.server_close()
        section = plugins.split("action kinds:\n", 1)[1]
        kinds = set()
        for line in section.splitlines():
            if not line.startswith("  "):
                break
            kinds.add(line.split()[0])
        _RESULTS.update(builds=builds, kinds=kinds)
    yield _RESULTS


def _entries(tree: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
    prefixes = [p.removeprefix("dtbuild-out/") for p in outputs]
    return {k: v for k, v in tree.items() if any(k == p or k.startswith(p + "/") for p in prefixes)}


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for path in sorted(set(a) | set(b)):
        x, y = a.get(path), b.get(path)
        if x == y:
            continue
        if x is None or y is None:
            out.append(f"{path}: only in one build")
        elif x[:2] != y[:2]:
            out.append(f"{path}: {x[0]} mode {oct(x[1] or 0)} vs {y[0]} mode {oct(y[1] or 0)}")
        else:
            out.append(f"{path}: different bytes")
    return out


# --------------------------------------------------------------------------- the tests


def test_every_registered_action_kind_ran(matrix) -> None:
    registered = matrix["kinds"]
    assert "Genrule" in registered and "RootLayerWrite" in registered, registered
    for umask, build in matrix["builds"].items():
        assert build["summary"]["actions"]["cached"] == 0, f"umask {umask:03o}: the cache was not fresh"
        ran = set(_ACTION_LINE.findall(build["output"]))
        missing = registered - SKIPPED_KINDS - ran
        assert not missing, (f"umask {umask:03o}: no target of tests/fixtures/every_kind runs the action kind(s) "
                             f"{sorted(missing)}: add one, so their outputs are compared too")


def test_the_fixture_targets_are_the_ones_compared(matrix) -> None:
    for build in matrix["builds"].values():
        assert set(build["summary"]["targets"]) == set(TARGETS)


@pytest.mark.parametrize("label", [
    pytest.param(label, marks=pytest.mark.xfail(strict=True, reason=bug)) if bug else label
    for label, bug in TARGETS.items()])
def test_outputs_are_identical_under_every_umask(matrix, label) -> None:
    builds = matrix["builds"]
    outputs = builds[0o022]["summary"]["targets"][label]["outputs"]
    reference = _entries(builds[0o022]["tree"], outputs)
    assert reference, f"{label} has no output under dtbuild-out/"
    for umask in (0o000, 0o077):
        assert builds[umask]["summary"]["targets"][label]["outputs"] == outputs
        other = _entries(builds[umask]["tree"], outputs)
        assert _differences(reference, other) == [], f"{label}: umask {umask:03o} differs from umask 022"
        digest = builds[umask]["summary"]["targets"][label]["manifest_digest"]
        assert digest == builds[0o022]["summary"]["targets"][label]["manifest_digest"]


def test_the_directories_holding_outputs_do_not_depend_on_the_umask(matrix) -> None:
    builds = matrix["builds"]
    owned = [p for t in builds[0o022]["summary"]["targets"].values() for p in t["outputs"]]
    reference = {k: v for k, v in builds[0o022]["tree"].items() if k not in _entries(builds[0o022]["tree"], owned)}
    assert reference, "no directory holds outputs?"
    for umask in (0o000, 0o077):
        tree = builds[umask]["tree"]
        other = {k: v for k, v in tree.items() if k not in _entries(tree, owned)}
        assert _differences(reference, other) == [], f"umask {umask:03o} differs from umask 022"
