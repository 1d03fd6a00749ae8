"""The store against a hostile cache: Directory nodes are hashed and checked when read
(an invalid node is a miss, deleted), and what the store writes on the host is never
setuid, setgid or sticky and is never written through a symlink."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from dtbuild.engine.errors import StoreError
from dtbuild.engine.execution import build_tree
from dtbuild.engine.store import SENTINEL_MTIME_NS, Store, canonical_json, remove_tree
from dtbuild.plugins.interfaces import TreeEntry


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "cache"))


def _put_raw_node(store: Store, node: Any) -> str:
    """A node stored under its true digest, bypassing put_directory_node (as a remote
    or shared cache could hand it over)."""
    return store.put_bytes(canonical_json(node))


def _file(store: Store, name: str, mode: int = 0o644) -> dict[str, Any]:
    digest = store.put_bytes(b"payload\n")
    return {"name": name, "digest": digest, "size": 8, "mode": mode}


@pytest.mark.parametrize("name", ["../../../../tmp/x", "..", ".", "", "a/b", "a\x00b", "/abs"])
def test_a_node_with_a_name_that_is_not_one_path_component_is_a_miss_and_deleted(
        store: Store, tmp_path: Path, name: str) -> None:
    digest = _put_raw_node(store, {"files": [_file(store, name)], "directories": [], "symlinks": [], "mode": 0o755})
    with pytest.raises(StoreError, match="invalid"):
        store.read_directory(digest)
    assert not os.path.exists(store.blob_path(digest))
    assert not store.tree_blobs_present(digest)
    with pytest.raises(StoreError):
        store.materialize_tree(digest, str(tmp_path / "out" / "a" / "b"))
    assert not (tmp_path / "tmp").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("node", [
    {"files": [], "directories": [], "symlinks": [], "mode": "0755"},
    {"files": [], "directories": [], "symlinks": [], "mode": True},
    {"files": [], "directories": [], "symlinks": [], "mode": 0o755, "extra": 1},
    {"files": [], "directories": []},
    {"files": {}, "directories": [], "symlinks": []},
    {"files": [], "directories": [{"name": "d", "digest": "../" + "0" * 61}], "symlinks": []},
    {"files": [], "directories": [{"name": "d", "digest": "A" * 64}], "symlinks": []},
    {"files": [], "directories": [], "symlinks": [{"name": "l", "target": ""}]},
    {"files": [], "directories": [], "symlinks": [{"name": "l"}]},
    ["not", "a", "node"],
])
def test_a_node_of_the_wrong_shape_is_a_miss(store: Store, node: Any) -> None:
    digest = _put_raw_node(store, node)
    with pytest.raises(StoreError, match="invalid"):
        store.read_directory(digest)
    assert not os.path.exists(store.blob_path(digest))


def test_a_name_used_twice_across_files_directories_and_symlinks_is_a_miss(store: Store) -> None:
    child = store.put_directory_node([], [], [])
    for node in ({"files": [_file(store, "x")], "directories": [{"name": "x", "digest": child}], "symlinks": []},
                 {"files": [_file(store, "x")], "directories": [], "symlinks": [{"name": "x", "target": "y"}]},
                 {"files": [_file(store, "x"), _file(store, "x", 0o755)], "directories": [], "symlinks": []}):
        with pytest.raises(StoreError, match="appears twice"):
            store.read_directory(_put_raw_node(store, node))


def test_a_node_rewritten_in_place_is_hashed_on_read_and_deleted(tmp_path: Path) -> None:
    """Rewritten with the sentinel mtime and the same size, a blob passes the cheap
    checks; a Directory node is hashed anyway when it is read."""
    store = Store(str(tmp_path / "cache"))
    digest, _ = build_tree(store, [TreeEntry("a", "file", 0o644, store.put_bytes(b"x"), 1)])
    path = store.blob_path(digest)
    good = Path(path).read_bytes()
    evil = json.loads(good)
    evil["files"][0]["name"] = "b"  # same length
    os.chmod(path, 0o644)
    Path(path).write_bytes(canonical_json(evil))
    os.chmod(path, 0o444)  # the mode, size and mtime the store gave it
    os.utime(path, ns=(SENTINEL_MTIME_NS, SENTINEL_MTIME_NS))
    fresh = Store(str(tmp_path / "cache"))
    assert fresh.has_blob(digest, len(good))  # the cheap check cannot tell
    with pytest.raises(StoreError, match="do not match its digest"):
        fresh.read_directory(digest)
    assert not os.path.exists(path)
    assert not fresh.tree_blobs_present(digest)


def test_valid_nodes_still_read_and_walk(store: Store) -> None:
    digest, total = build_tree(store, [TreeEntry("d/f", "file", 0o4755, store.put_bytes(b"su"), 2),
                                       TreeEntry("d/l", "symlink", 0o777, target="/bin/sh"),
                                       TreeEntry("t", "dir", 0o1777)])
    assert total == 2
    assert [(e.path, e.kind, e.mode) for e in Store(store.root).walk_tree(digest)] == [
        ("d", "dir", 0o755), ("d/f", "file", 0o4755), ("d/l", "symlink", 0o777), ("t", "dir", 0o1777)]


# --------------------------------------------------------------------------- host files


def test_materialized_trees_never_carry_setuid_setgid_or_sticky_bits(store: Store, tmp_path: Path) -> None:
    blob = store.put_bytes(b"bin")
    digest, _ = build_tree(store, [TreeEntry("bin/su", "file", 0o4755, blob, 3),
                                   TreeEntry("bin/sg", "file", 0o2711, blob, 3),
                                   TreeEntry("tmp", "dir", 0o1777), TreeEntry("ro", "dir", 0o555),
                                   TreeEntry("ro/f", "file", 0o444, blob, 3)])
    out = tmp_path / "out"
    store.materialize_tree(digest, str(out))
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.lstat().st_mode) for p in out.rglob("*")}
    assert modes == {"bin": 0o755, "bin/su": 0o755, "bin/sg": 0o711, "tmp": 0o777, "ro": 0o555, "ro/f": 0o444}
    assert [e.mode for e in store.walk_tree(digest) if e.path == "bin/su"] == [0o4755]  # metadata keeps it
    remove_tree(str(out))
    assert not out.exists()


def test_materializing_never_writes_through_a_symlink(store: Store, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_text("secret\n")
    os.chmod(canary, 0o600)
    before = canary.stat()
    blob = store.put_bytes(b"evil\n")
    digest, _ = build_tree(store, [TreeEntry("f", "file", 0o4777, blob, 5)])
    link = tmp_path / "link"
    link.symlink_to(canary)
    with pytest.raises(FileExistsError):
        store.materialize_tree(digest, str(link))
    with pytest.raises(FileExistsError):
        store.copy_blob_to(blob, str(link), 0o4777)
    # A temporary name of materialize_blob left behind as a symlink is removed, not followed.
    dest = tmp_path / "out"
    import threading

    (tmp_path / f"out.dtbuild-tmp-{os.getpid()}-{threading.get_ident()}").symlink_to(canary)
    store.materialize_blob(blob, str(dest), executable=True)
    assert dest.read_bytes() == b"evil\n" and stat.S_IMODE(dest.stat().st_mode) == 0o755
    after = canary.stat()
    assert canary.read_text() == "secret\n"
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (before.st_mode, before.st_uid, before.st_mtime_ns)


def test_remove_tree_never_chmods_through_a_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = tmp_path / "canary"
    canary.write_text("secret\n")
    os.chmod(canary, 0o600)
    tree = tmp_path / "tree"
    (tree / "ro").mkdir(parents=True)
    (tree / "ro" / "link").symlink_to(canary)
    os.chmod(tree / "ro", 0o555)
    # Removing the link from a read-only directory fails for a non-root user (root is
    # let through, so the failure is simulated): the retry must not chmod the link's target.
    real_unlink, failed = os.unlink, []

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if not failed and str(path).endswith("link"):
            failed.append(path)
            raise PermissionError(13, "Permission denied", str(path))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    remove_tree(str(tree))
    assert failed
    assert not tree.exists()
    assert stat.S_IMODE(canary.stat().st_mode) == 0o600


def test_the_cache_tmp_directory_is_private(tmp_path: Path) -> None:
    (tmp_path / "cache" / "tmp").mkdir(parents=True)
    os.chmod(tmp_path / "cache" / "tmp", 0o777)
    store = Store(str(tmp_path / "cache"))
    assert stat.S_IMODE(os.stat(store.tmp_dir).st_mode) == 0o700
    store.gc(0)
    assert stat.S_IMODE(os.stat(store.tmp_dir).st_mode) == 0o700

