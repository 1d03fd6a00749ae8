"""Sources stay inside the workspace: a path whose directories go through a symlink
that leaves the workspace is refused (at the BUILD line), a source that is itself a
symlink is kept as a symlink, and glob() never descends into a symlinked directory.

The attack: ``link_dir -> /somewhere/outside`` holding a root-only canary, and
``files(srcs = ["link_dir/secret"])``. The canary's bytes must appear nowhere under
dtbuild-out/ or the cache, and the canary itself must be untouched.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

CANARY = b"CANARY-root-only-5b1f0c7e\n"


def _canary(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(CANARY)
    secret.chmod(0o600)
    return secret


def _fingerprint(path: Path) -> tuple[bytes, int, int, int, int]:
    st = path.lstat()
    return path.read_bytes(), st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns


def _assert_nowhere(*roots: Path) -> None:
    for root in roots:
        if not root.exists():
            continue
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert CANARY.strip() not in path.read_bytes(), f"the canary leaked into {path}"


def _no_traceback(err: str) -> None:
    assert not re.search(r'^\s*File ".*", line \d+', err, re.M), "a Python traceback leaked:\n" + err


def test_a_source_through_a_symlinked_directory_outside_is_refused(tmp_path, write_workspace, run_dtbuild,
                                                                   cache_dir) -> None:
    secret = _canary(tmp_path)
    before = _fingerprint(secret)
    ws = write_workspace({"BUILD": 'files(\n    name = "leak",\n    srcs = ["link_dir/secret"],\n)\n'})
    (ws / "link_dir").symlink_to(secret.parent)
    code, out, err = run_dtbuild(ws, "build", "//:leak")
    assert code == 2, f"exit {code}\n{out}\n{err}"
    _no_traceback(err)
    assert "BUILD:1" in err and "//:leak" in err, err
    assert "'link_dir/secret'" in err and "outside the workspace" in err, err
    assert "hint:" in err
    _assert_nowhere(ws / "dtbuild-out", cache_dir)
    assert _fingerprint(secret) == before
    assert sorted(p.name for p in secret.parent.iterdir()) == ["secret"]


def test_a_label_path_through_a_symlinked_directory_outside_is_refused(tmp_path, write_workspace, run_dtbuild,
                                                                      cache_dir) -> None:
    secret = _canary(tmp_path)
    ws = write_workspace({"BUILD": 'files(\n    name = "leak",\n    srcs = ["//:link_dir/secret"],\n)\n',
                          "app/BUILD": 'files(\n    name = "up",\n    srcs = ["../link_dir/secret"],\n)\n'})
    (ws / "link_dir").symlink_to(secret.parent)
    code, _, err = run_dtbuild(ws, "build", "//:leak")
    assert code == 2 and "BUILD:1" in err and "outside the workspace" in err, err
    code, _, err = run_dtbuild(ws, "build", "//app:up")
    assert code == 2 and "app/BUILD:1" in err, err
    _no_traceback(err)
    _assert_nowhere(ws / "dtbuild-out", cache_dir)


def test_a_package_reached_through_a_symlink_outside_is_refused(tmp_path, write_workspace, run_dtbuild,
                                                               cache_dir) -> None:
    secret = _canary(tmp_path)
    (secret.parent / "BUILD").write_text('files(\n    name = "all",\n    srcs = glob(["*"]),\n)\n')
    ws = write_workspace({"BUILD": ""})
    (ws / "pkglink").symlink_to(secret.parent)
    code, _, err = run_dtbuild(ws, "build", "//pkglink:all")
    assert code == 2, err
    _no_traceback(err)
    assert "pkglink/BUILD" in err and "outside the workspace" in err, err
    _assert_nowhere(ws / "dtbuild-out", cache_dir)


def test_symlinks_are_kept_and_globs_do_not_descend_into_them(tmp_path, write_workspace, run_dtbuild,
                                                              cache_dir) -> None:
    """A symlink source (to a directory or a file outside) stays a symlink; a directory
    symlink that stays inside the workspace may be gone through."""
    secret = _canary(tmp_path)
    ws = write_workspace({
        "BUILD": 'files(\n    name = "tree",\n    srcs = glob(["**"]),\n)\n'
                 'files(\n    name = "inner",\n    srcs = ["inside/f.txt"],\n)\n',
        "real/f.txt": "inside\n",
    })
    (ws / "link_dir").symlink_to(secret.parent)
    (ws / "link_file").symlink_to(secret)
    (ws / "inside").symlink_to("real")
    run_dtbuild(ws, "build", "//:tree", "//:inner", check=True)
    tree = ws / "dtbuild-out" / "tree"
    assert os.readlink(tree / "link_dir") == str(secret.parent)
    assert os.readlink(tree / "link_file") == str(secret)
    assert os.readlink(tree / "inside") == "real"
    assert (tree / "real" / "f.txt").read_text() == "inside\n"
    assert (ws / "dtbuild-out" / "inner" / "inside" / "f.txt").read_text() == "inside\n"
    assert stat.S_ISREG((ws / "dtbuild-out" / "inner" / "inside" / "f.txt").lstat().st_mode)
    _assert_nowhere(ws / "dtbuild-out", cache_dir)

