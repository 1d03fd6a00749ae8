"""Hostile tarballs and cache entries never reach the host.

Each test builds with the real CLI (as root in CI, as many users build) and then checks
that a canary file keeps its content, owner, mode and mtime, that nothing appeared
outside the workspace, ``dtbuild-out/`` and the cache, and that nothing under those
is setuid, setgid, sticky or a device, while image layers keep such entries in their
headers (checked with ``tar -tvf``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

D, SYM, LNK, CHR = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int | None = None,
            linkname: str = "", uid: int = 0, gid: int = 0, major: int = 0, minor: int = 0,
            ) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.uid, info.gid = kind, linkname, uid, gid
    info.mode = mode if mode is not None else 0o755 if kind == D else 0o644
    info.devmajor, info.devminor = major, minor
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mtime = 1
    return info, data


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


class Host:
    """A canary file and a listing of the test's temporary directory outside the
    workspace and the cache, taken before a build to compare with after it."""

    def __init__(self, tmp_path: Path, workspace: Path, cache: Path) -> None:
        self.tmp_path, self.workspace, self.cache = tmp_path, workspace, cache
        self.canary = tmp_path / "canary"
        self.canary.write_text("canary: secret\n")
        os.chmod(self.canary, 0o640)
        if os.geteuid() == 0:
            os.chown(self.canary, 4321, 4321)
        self._canary_stat = self._stat(self.canary)
        self._listing = self._outside()

    @staticmethod
    def _stat(path: Path) -> tuple[int, int, int, int]:
        st = os.lstat(path)
        return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns

    def _outside(self) -> set[str]:
        found = set()
        for dirpath, dirnames, filenames in os.walk(self.tmp_path):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if here / d not in (self.workspace, self.cache)]
            found.update(str((here / n).relative_to(self.tmp_path)) for n in dirnames + filenames
                         if not n.startswith((".run-", "summary-")))
        return found

    def assert_untouched(self) -> None:
        assert self.canary.read_text() == "canary: secret\n"
        assert self._stat(self.canary) == self._canary_stat
        assert self._outside() == self._listing, "files appeared outside the workspace and the cache"
        for root in (self.workspace / "dtbuild-out", self.cache):
            assert_no_special_files(root)


def assert_no_special_files(root: Path) -> None:
    """Nothing below ``root`` is setuid, setgid, sticky, a device, a fifo or a socket."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), f"{path}: {oct(st.st_mode)}"
            assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode), path


@pytest.fixture
def host_and_ws(tmp_path: Path, write_workspace: Any, cache_dir: Path) -> Any:
    def make(files: dict[str, str | bytes]) -> tuple[Host, Path]:
        ws = write_workspace(files)
        return Host(tmp_path, ws, cache_dir), ws

    return make


# --------------------------------------------------------------------------- fetch_url(extract = True)


@pytest.mark.parametrize("attack", ["absolute hard link", "relative hard link", "character device"])
def test_fetch_url_extract_of_a_hostile_tar_leaves_the_host_untouched(host_and_ws, run_dtbuild, tmp_path,
                                                                      attack) -> None:
    canary = tmp_path / "canary"
    hostile = {
        "absolute hard link": _member("pwn", LNK, linkname=str(canary), mode=0o4777, uid=0),
        # From the action's extraction directory (cache/tmp/<action>/out/<name>) up to tmp_path.
        "relative hard link": _member("pwn", LNK, linkname="../../../../../canary", mode=0o4777, uid=0),
        "character device": _member("pwn", CHR, mode=0o666, major=1, minor=3),
    }[attack]
    tarball = _tar(_member("ok/", D), _member("ok/readme", data=b"fine\n"), hostile)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "evil.tar").write_bytes(tarball)
    build = (f'fetch_url(name = "p", urls = ["{(downloads / "evil.tar").as_uri()}"], '
             f'sha256 = "{hashlib.sha256(tarball).hexdigest()}", extract = True)\n')
    host, ws = host_and_ws({"pkg/BUILD": build})
    code, _, err = run_dtbuild(ws, "build", "//pkg:p")
    assert code == 1, err
    assert "cannot extract the download" in err and "'pwn'" in err, err
    assert ("hard link" in err or "'..'" in err) if "link" in attack else "character device" in err
    assert "Traceback" not in err
    host.assert_untouched()
    assert not (ws / "dtbuild-out" / "pkg" / "p").exists()


def test_fetch_url_extract_of_a_normal_tar_still_works(host_and_ws, run_dtbuild, tmp_path) -> None:
    tarball = _tar(_member("./", D), _member("./bin/", D), _member("./bin/tool", data=b"#!/bin/sh\n", mode=0o4755),
                   _member("./bin/alias", LNK, linkname="./bin/tool"), _member("./bin/sh", SYM, linkname="tool"))
    (tmp_path / "ok.tar").write_bytes(tarball)
    build = (f'fetch_url(name = "p", urls = ["{(tmp_path / "ok.tar").as_uri()}"], '
             f'sha256 = "{hashlib.sha256(tarball).hexdigest()}", extract = True)\n')
    host, ws = host_and_ws({"pkg/BUILD": build})
    run_dtbuild(ws, "build", "//pkg:p", check=True)
    out = ws / "dtbuild-out" / "pkg" / "p"
    assert (out / "bin" / "tool").read_bytes() == b"#!/bin/sh\n" == (out / "bin" / "alias").read_bytes()
    assert stat.S_IMODE((out / "bin" / "tool").stat().st_mode) == 0o555  # outputs are read-only, never setuid
    assert os.readlink(out / "bin" / "sh") == "tool"
    host.assert_untouched()


# --------------------------------------------------------------------------- merge_trees


def test_merge_trees_of_a_setuid_root_binary_is_not_setuid_on_the_host(host_and_ws, run_dtbuild) -> None:
    tarball = _tar(_member("bin/", D), _member("srv/", D, mode=0o2775), _member("tmp/", D, mode=0o1777),
                   _member("bin/su", data=b"\x7fELF pretend\n", mode=0o4755, uid=0, gid=0))
    host, ws = host_and_ws({"pkg/suid.tar": tarball,
                            "pkg/BUILD": 'merge_trees(name = "merged", srcs = ["suid.tar"])\n'})
    run_dtbuild(ws, "build", "//pkg:merged", check=True)
    su = ws / "dtbuild-out" / "pkg" / "merged" / "bin" / "su"
    assert su.read_bytes() == b"\x7fELF pretend\n"
    assert stat.S_IMODE(su.stat().st_mode) == 0o555  # outputs are read-only, never setuid
    assert stat.S_IMODE((su.parent.parent / "tmp").stat().st_mode) == 0o777
    host.assert_untouched()


@pytest.mark.timeout(300)
def test_merge_trees_of_a_tarball_with_several_files_finishes(host_and_ws, run_dtbuild) -> None:
    tarball = _tar(_member("opt/", D), *(_member(f"opt/f{n}", data=f"{n}\n".encode()) for n in range(5)))
    host, ws = host_and_ws({"pkg/five.tar": tarball,
                            "pkg/BUILD": 'merge_trees(name = "merged", srcs = ["five.tar"])\n'})
    run_dtbuild(ws, "build", "//pkg:merged", check=True)
    assert sorted(p.name for p in (ws / "dtbuild-out" / "pkg" / "merged" / "opt").iterdir()) == \
        [f"f{n}" for n in range(5)]
    host.assert_untouched()


# --------------------------------------------------------------------------- a hostile cache


def _cache_nodes(cache: Path) -> dict[str, dict[str, Any]]:
    """Directory nodes of the cache by digest."""
    nodes = {}
    for path in (cache / "cas").rglob("*"):
        if path.is_file():
            try:
                doc = json.loads(path.read_bytes())
            except ValueError:
                continue
            if isinstance(doc, dict) and "files" in doc and "symlinks" in doc:
                nodes[path.name] = doc
    return nodes


def _root_node(cache: Path, name: str) -> str:
    (digest,) = [d for d, node in _cache_nodes(cache).items() if [f["name"] for f in node["files"]] == [name]]
    return digest


ESCAPE = "../../../../tmp/x"  # from dtbuild-out/pkg/<tree>.<tmp> up to the test's tmp_path


def _replace_output(path: Path) -> None:
    """Replace an output file with other bytes, as a user would (outputs are read-only:
    the file is removed and written again), so the next build copies it again."""
    path.unlink()
    path.write_text("changed\n")


def test_a_cache_node_rewritten_in_place_with_an_escaping_name_is_a_miss(host_and_ws, run_dtbuild, cache_dir,
                                                                        tmp_path) -> None:
    (tmp_path / "tmp").mkdir()  # where the escaping name points: it must stay empty
    host, ws = host_and_ws({"pkg/a.txt": "a\n", "pkg/BUILD": 'files(name = "tree", srcs = ["a.txt"])\n'})
    run_dtbuild(ws, "build", "//pkg:tree", check=True)
    digest = _root_node(cache_dir, "a.txt")
    blob = next((cache_dir / "cas").rglob(digest))
    node = json.loads(blob.read_bytes())
    node["files"][0]["name"] = ESCAPE
    os.chmod(blob, 0o644)
    blob.write_bytes(json.dumps(node).encode())
    os.utime(blob, ns=(10**18, 10**18))  # the store's sentinel mtime: the cheap check passes
    os.chmod(blob, 0o444)
    _replace_output(ws / "dtbuild-out" / "pkg" / "tree" / "a.txt")  # forces a new copy
    run = run_dtbuild.build(ws, "//pkg:tree", check=True)
    # The tree was rebuilt: the node is checked when it is read (the copy under
    # dtbuild-out/), and its action runs again (action rewinding).
    assert run.executed + run.summary["actions"].get("rewound", 0) >= 1
    assert not any((tmp_path / "tmp").iterdir())
    assert (ws / "dtbuild-out" / "pkg" / "tree" / "a.txt").read_text() == "a\n"
    host.assert_untouched()


def test_a_forged_cache_node_with_an_escaping_name_is_a_miss(host_and_ws, run_dtbuild, cache_dir,
                                                            tmp_path) -> None:
    """A node stored under its true digest (as a remote cache could serve it) and an
    action result naming it: the name is checked when the node is read."""
    from dtbuild.engine.store import canonical_json

    (tmp_path / "tmp").mkdir()
    host, ws = host_and_ws({"pkg/a.txt": "a\n", "pkg/BUILD": 'files(name = "tree", srcs = ["a.txt"])\n'})
    run_dtbuild(ws, "build", "//pkg:tree", check=True)
    old = _root_node(cache_dir, "a.txt")
    node = _cache_nodes(cache_dir)[old]
    node["files"][0]["name"] = ESCAPE
    data = canonical_json(node)
    new = hashlib.sha256(data).hexdigest()
    (cache_dir / "cas" / new[:2]).mkdir(exist_ok=True)
    (cache_dir / "cas" / new[:2] / new).write_bytes(data)
    for path in (cache_dir / "ac").rglob("*"):
        if path.is_file() and old in path.read_text():
            result = json.loads(path.read_text().replace(old, new))["result"]
            path.write_bytes(canonical_json({"result": result,
                                             "sha256": hashlib.sha256(canonical_json(result)).hexdigest()}))
    with sqlite3.connect(ws / "dtbuild-out" / ".dtbuild" / "state.db") as db:  # the results index
        db.execute("UPDATE results SET result = replace(result, ?, ?)", (old, new))
    db.close()
    _replace_output(ws / "dtbuild-out" / "pkg" / "tree" / "a.txt")
    run = run_dtbuild.build(ws, "//pkg:tree", check=True)
    assert run.executed + run.summary["actions"].get("rewound", 0) >= 1  # rebuilt when the node was read
    assert not any((tmp_path / "tmp").iterdir())
    assert not (cache_dir / "cas" / new[:2] / new).exists()  # deleted as invalid
    assert (ws / "dtbuild-out" / "pkg" / "tree" / "a.txt").read_text() == "a\n"
    host.assert_untouched()


# --------------------------------------------------------------------------- an image holding them


def _docker_archive(layer: bytes, tag: str) -> bytes:
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": ["l/layer.tar"]}]).encode()
    return _tar(_member("manifest.json", data=manifest), _member(config_name, data=config),
                _member("l/layer.tar", data=layer))


def test_an_image_keeps_setuid_bits_and_devices_in_layer_headers_only(host_and_ws, run_dtbuild, require_tool,
                                                                      cache_dir) -> None:
    tar = require_tool("tar")
    base_layer = _tar(_member("dev/", D), _member("dev/null", CHR, mode=0o666, major=1, minor=3),
                      _member("usr/", D), _member("usr/bin/", D),
                      _member("usr/bin/passwd", data=b"passwd\n", mode=0o4755))
    suid = _tar(_member("opt/", D), _member("opt/tmp/", D, mode=0o1777), _member("opt/sgid", data=b"g\n", mode=0o2755),
                _member("opt/su", data=b"su\n", mode=0o4755, uid=0, gid=0))
    host, ws = host_and_ws({
        "pkg/base.tar": _docker_archive(base_layer, "base:1"), "pkg/suid.tar": suid,
        "pkg/with_dev.tar": _tar(_member("opt/", D), _member("opt/su", data=b"su\n", mode=0o4755),
                                 _member("dev/console", CHR, mode=0o600, major=5, minor=1)),
        "pkg/BUILD": 'image_archive(name = "base", src = "base.tar")\n'
                     'merge_trees(name = "merged", srcs = ["suid.tar"])\n'
                     'merge_trees(name = "merged_dev", srcs = ["with_dev.tar"])\n'
                     'image(name = "img", tag = "t", from_image = ":base", copy_to_root = [":merged"], '
                     'compressor = "none")\n'})
    run_dtbuild(ws, "build", "//pkg:img", "//pkg:merged", check=True)
    out = ws / "dtbuild-out" / "pkg"
    description = json.loads((out / "img.json").read_text())
    listings = []
    for layer in description["layers"]:
        blob = out / "img.oci" / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        done = subprocess.run([tar, "-tvf", str(blob)], capture_output=True, text=True, check=True)
        listings.append({line.split()[-1]: line.split()[0] for line in done.stdout.splitlines()})
    base, mine = listings
    assert base["dev/null"].startswith("c") and base["usr/bin/passwd"] == "-rwsr-xr-x"
    assert mine["opt/su"] == "-rwsr-xr-x" and mine["opt/sgid"] == "-rwxr-sr-x"
    assert mine["opt/tmp/"] == "drwxrwxrwt"
    host.assert_untouched()  # no setuid, setgid, sticky bit or device under dtbuild-out/ or the cache
    # merge_trees keeps no devices (a package is files, directories and symlinks): a clear error.
    code, _, err = run_dtbuild(ws, "build", "//pkg:merged_dev")
    assert code == 1 and "dev/console is a device or fifo" in err and "with_dev.tar" in err
    host.assert_untouched()


def _layer_listings(out: Path, name: str, tar: str) -> list[dict[str, str]]:
    description = json.loads((out / f"{name}.json").read_text())
    listings = []
    for layer in description["layers"]:
        blob = out / f"{name}.oci" / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        done = subprocess.run([tar, "-tvf", str(blob)], capture_output=True, text=True, check=True)
        listings.append({line.split()[-1]: line.split()[0] for line in done.stdout.splitlines()})
    return listings


def test_commands_see_no_setuid_files_and_layers_keep_them(host_and_ws, run_dtbuild, require_tool) -> None:
    """extra_commands and fakeroot_commands run over files written without their special
    bits; the layer still has them, and a customisation layer does not re-add files the
    commands did not touch."""
    tar = require_tool("tar")
    suid = _tar(_member("opt/", D), _member("opt/su", data=b"su\n", mode=0o4755),
                _member("opt/tmp/", D, mode=0o1777))
    host, ws = host_and_ws({
        "pkg/suid.tar": suid,
        "pkg/BUILD": 'merge_trees(name = "merged", srcs = ["suid.tar"])\n'
                     'image(name = "img", tag = "t", copy_to_root = [":merged"], compressor = "none", '
                     'extra_commands = "test ! -u opt/su && test ! -k opt/tmp && touch opt/new")\n'
                     'layered_image(name = "lay", tag = "t", contents = [":merged"], compressor = "none", '
                     'extra_commands = "test ! -u opt/su && touch opt/new", fakeroot_commands = "touch opt/fake")\n'})
    run_dtbuild(ws, "build", "//pkg:img", "//pkg:lay", check=True)
    out = ws / "dtbuild-out" / "pkg"
    (image_layer,) = _layer_listings(out, "img", tar)
    assert image_layer["opt/su"] == "-rwsr-xr-x" and image_layer["opt/tmp/"] == "drwxrwxrwt"
    assert "opt/new" in image_layer
    *packages, customisation = _layer_listings(out, "lay", tar)
    assert any(layer.get("opt/su") == "-rwsr-xr-x" for layer in packages)
    assert "opt/su" not in customisation and "opt/new" in customisation and "opt/fake" in customisation
    host.assert_untouched()
