"""The content-addressed store: atomic blob writes, verification, the action cache,
Merkle trees and garbage collection."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

import pytest
from dtbuild.engine.store import (
    EMPTY_SHA256,
    SENTINEL_MTIME_NS,
    ActionResult,
    OutputValue,
    Store,
    canonical_json,
    hash_file,
)
from dtbuild.plugins.interfaces import TreeEntry


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "cache"))


def _tmp_entries(store: Store) -> list[str]:
    return os.listdir(store.tmp_dir)


# --------------------------------------------------------------------------- blobs


def test_put_bytes_stores_a_read_only_blob_under_its_sha256(store: Store) -> None:
    digest = store.put_bytes(b"hello\n")
    assert digest == sha(b"hello\n")
    path = Path(store.blob_path(digest))
    assert path == Path(store.root) / "cas" / digest[:2] / digest
    assert path.read_bytes() == b"hello\n"
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o444
    assert st.st_mtime_ns == SENTINEL_MTIME_NS
    assert store.has_blob(digest)
    assert store.read_blob(digest) == b"hello\n"
    assert _tmp_entries(store) == []
    assert store.put_bytes(b"") == EMPTY_SHA256


def test_a_blob_is_invisible_until_committed_and_an_abort_leaves_nothing(store: Store) -> None:
    data = b"x" * (3 << 20)
    digest = sha(data)
    writer = store.writer()
    writer.write(data[: 1 << 20])
    assert not os.path.exists(store.blob_path(digest))
    assert len(_tmp_entries(store)) == 1  # partial bytes live only under a temporary name
    writer.write(data[1 << 20:])
    assert writer.commit() == digest
    assert _tmp_entries(store) == []
    assert Path(store.blob_path(digest)).read_bytes() == data

    aborted = store.writer()
    aborted.write(b"half a blob")
    aborted.abort()
    assert _tmp_entries(store) == []
    assert not store.has_blob(sha(b"half a blob"))


def test_writing_the_same_blob_twice_is_harmless(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "f.bin"
    source.write_bytes(b"same bytes")
    first = store.put_file(str(source))
    second = store.put_file(str(source))
    again = Store(store.root).put_bytes(b"same bytes")  # another process, same entry
    assert first == second == (sha(b"same bytes"), 10)
    assert again == first[0]
    assert Path(store.blob_path(again)).read_bytes() == b"same bytes"
    assert _tmp_entries(store) == []


def test_put_file_rejects_a_source_that_does_not_match_its_expected_digest(store: Store, tmp_path: Path) -> None:
    from dtbuild.engine.errors import StoreError

    source = tmp_path / "f.txt"
    source.write_bytes(b"new content")
    with pytest.raises(StoreError, match="changed while it was being read"):
        store.put_file(str(source), sha(b"old content"))


def test_a_corrupt_blob_is_deleted_when_verified(store: Store) -> None:
    digest = store.put_bytes(b"precious bytes")
    path = store.blob_path(digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"PRECIOUS")  # same size, new bytes, new mtime
    fresh = Store(store.root)  # a later process: nothing trusted yet
    assert not fresh.has_blob(digest)
    assert not os.path.exists(path)
    assert not fresh.verify_blob(digest)


def test_a_blob_that_still_matches_is_kept_when_verified(store: Store) -> None:
    digest = store.put_bytes(b"intact")
    path = store.blob_path(digest)
    os.utime(path, (1_000_000, 1_000_000))  # touched, not changed
    fresh = Store(store.root)
    assert fresh.has_blob(digest)
    assert os.stat(path).st_mtime_ns == SENTINEL_MTIME_NS


def test_a_truncated_blob_is_not_trusted(store: Store) -> None:
    digest = store.put_bytes(b"0123456789")
    path = store.blob_path(digest)
    os.chmod(path, 0o644)
    os.truncate(path, 4)
    os.utime(path, ns=(SENTINEL_MTIME_NS, SENTINEL_MTIME_NS))  # even with the sentinel mtime
    fresh = Store(store.root)
    assert not fresh.has_blob(digest, size=10)
    assert not os.path.exists(path)


def test_hash_file(tmp_path: Path) -> None:
    path = tmp_path / "big"
    data = os.urandom(3 * (1 << 20) + 17)
    path.write_bytes(data)
    assert hash_file(str(path)) == (sha(data), len(data))


# --------------------------------------------------------------------------- action cache


def _result(digest: str, size: int) -> ActionResult:
    return ActionResult({"out": OutputValue(digest, size, False, True)}, {"mnemonic": "Test"})


def test_action_results_round_trip(store: Store) -> None:
    digest = store.put_bytes(b"output")
    result = _result(digest, 6)
    key = sha(b"action key")
    assert store.get_action(key) is None
    store.put_action(key, result)
    assert store.get_action(key) == result
    assert _tmp_entries(store) == []


@pytest.mark.parametrize("damage", ["garbage", "truncate", "edit_body", "empty"])
def test_a_corrupt_action_cache_entry_is_a_miss_and_is_removed(store: Store, damage: str) -> None:
    key = sha(b"action key")
    store.put_action(key, _result(store.put_bytes(b"output"), 6))
    path = Path(store.root) / "ac" / key[:2] / key
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00\xffnot json")
    elif damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "edit_body":
        doc = json.loads(raw)
        doc["result"]["outputs"]["out"]["size"] = 7  # a plausible but wrong result
        path.write_bytes(canonical_json(doc))
    else:
        path.write_bytes(b"")
    assert store.get_action(key) is None
    assert not path.exists()


# --------------------------------------------------------------------------- trees


def _make_dir(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(root / "bin" / "tool", 0o700)  # owner-executable under a strict umask
    (root / "etc").mkdir()
    (root / "etc" / "conf").write_bytes(b"key = value\n")
    os.chmod(root / "etc" / "conf", 0o600)
    (root / "etc" / "empty.d").mkdir()
    (root / "README").write_bytes(b"readme\n")
    (root / "bin" / "alias").symlink_to("tool")
    (root / "dangling").symlink_to("/nowhere/at/all")
    (root / "a-dir-link").symlink_to("etc")


EXPECTED_ENTRIES = [
    ("README", "file", 0o644, b"readme\n", ""),
    ("a-dir-link", "symlink", 0o777, None, "etc"),
    ("bin", "dir", 0o755, None, ""),
    ("bin/alias", "symlink", 0o777, None, "tool"),
    ("bin/tool", "file", 0o755, b"#!/bin/sh\necho tool\n", ""),
    ("dangling", "symlink", 0o777, None, "/nowhere/at/all"),
    ("etc", "dir", 0o755, None, ""),
    ("etc/conf", "file", 0o644, b"key = value\n", ""),
    ("etc/empty.d", "dir", 0o755, None, ""),
]


def test_tree_round_trip_keeps_modes_and_symlinks(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "src"
    _make_dir(source)
    root, total = store.put_tree_from_dir(str(source))
    assert total == len(b"readme\n") + len(b"#!/bin/sh\necho tool\n") + len(b"key = value\n")

    entries = list(store.walk_tree(root))
    got = [(e.path, e.kind, e.mode, store.read_blob(e.digest) if e.kind == "file" else None, e.target)
           for e in entries]
    assert got == EXPECTED_ENTRIES
    for e in entries:
        if e.kind == "file":
            assert e.digest == sha(store.read_blob(e.digest)) and e.size == len(store.read_blob(e.digest))
    assert store.tree_blobs_present(root)

    dest = tmp_path / "out"
    store.materialize_tree(root, str(dest))
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert (dest / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    assert stat.S_IMODE((dest / "bin" / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "etc" / "conf").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "README").stat().st_mode) == 0o644
    assert os.readlink(dest / "bin" / "alias") == "tool"
    assert os.readlink(dest / "dangling") == "/nowhere/at/all"
    assert os.readlink(dest / "a-dir-link") == "etc"
    assert (dest / "etc" / "empty.d").is_dir()
    # The materialized copy is its own file, not the read-only blob.
    (dest / "README").write_bytes(b"edited")
    assert store.read_blob(sha(b"readme\n")) == b"readme\n"

    # Ingesting the copy gives the same root: the digest depends on content only.
    (dest / "README").write_bytes(b"readme\n")
    assert store.put_tree_from_dir(str(dest))[0] == root


def test_tree_digest_ignores_umask_and_mtimes_but_not_the_executable_bit(store: Store, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _make_dir(one)
    _make_dir(two)
    os.chmod(two / "etc" / "conf", 0o664)
    os.chmod(two / "bin" / "tool", 0o775)
    os.utime(two / "README", (5, 5))
    assert store.put_tree_from_dir(str(one))[0] == store.put_tree_from_dir(str(two))[0]
    os.chmod(two / "etc" / "conf", 0o755)
    assert store.put_tree_from_dir(str(one))[0] != store.put_tree_from_dir(str(two))[0]


def test_tree_with_a_missing_file_blob_is_not_present(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "src"
    _make_dir(source)
    root, _ = store.put_tree_from_dir(str(source))
    conf = store.blob_path(sha(b"key = value\n"))
    os.chmod(conf, 0o644)
    os.unlink(conf)
    assert not Store(store.root).tree_blobs_present(root)


def test_walk_tree_orders_like_gnu_tar_sort_name(store: Store) -> None:
    from dtbuild.engine.execution import build_tree

    a = store.put_bytes(b"a")
    entries = [TreeEntry("b/z", "file", 0o644, a, 1), TreeEntry("a.txt", "file", 0o644, a, 1),
               TreeEntry("b/a", "file", 0o755, a, 1), TreeEntry("a", "dir", 0o700),
               TreeEntry("c", "symlink", 0o777, target="b/a")]
    root, total = build_tree(store, entries)
    assert total == 3
    walked = [(e.path, e.kind, e.mode) for e in store.walk_tree(root)]
    assert walked == [("a", "dir", 0o700), ("a.txt", "file", 0o644), ("b", "dir", 0o755),
                      ("b/a", "file", 0o755), ("b/z", "file", 0o644), ("c", "symlink", 0o777)]


# --------------------------------------------------------------------------- gc


def test_gc_keeps_referenced_blobs_and_drops_the_rest(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "src"
    _make_dir(source)
    tree, _ = store.put_tree_from_dir(str(source))
    kept_file = store.put_bytes(b"a file output")
    old_file = store.put_bytes(b"an old output")
    orphan = store.put_bytes(b"referenced by nothing")
    live_key, old_key = sha(b"live"), sha(b"old")
    store.put_action(live_key, ActionResult({"tree": OutputValue(tree, 1, True),
                                             "file": OutputValue(kept_file, 13, False)}, {}))
    store.put_action(old_key, ActionResult({"file": OutputValue(old_file, 13, False)}, {}))
    long_ago = time.time() - 90 * 86400
    os.utime(Path(store.root) / "ac" / old_key[:2] / old_key, (long_ago, long_ago))
    (Path(store.tmp_dir) / "99999999-1-1-blob").write_bytes(b"left by a crash")

    removed = store.gc(max_age_seconds=30 * 86400)

    assert removed["actions"] == 1
    assert store.get_action(live_key) is not None
    assert store.get_action(old_key) is None
    fresh = Store(store.root)
    assert fresh.has_blob(kept_file)
    assert fresh.tree_blobs_present(tree)
    assert [e.path for e in fresh.walk_tree(tree)] == [e[0] for e in EXPECTED_ENTRIES]
    assert not os.path.exists(store.blob_path(old_file))
    assert not os.path.exists(store.blob_path(orphan))
    assert removed["blobs"] == 2
    assert removed["bytes"] == len(b"an old output") + len(b"referenced by nothing")
    assert _tmp_entries(store) == []
    assert store.stats()["actions"] == 1


def test_stale_temporaries_of_dead_processes_are_removed(store: Store) -> None:
    dead = Path(store.tmp_dir) / "99999999-1-1-action"
    (dead / "out").mkdir(parents=True)
    (dead / "out" / "partial").write_bytes(b"partial")
    os.chmod(dead / "out", 0o500)  # even a read-only directory
    mine = Path(store.temp_path("blob"))
    mine.write_bytes(b"in use")
    store.clean_stale_temps()
    assert not dead.exists()
    assert mine.exists()
