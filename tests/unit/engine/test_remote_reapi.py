"""The store's results and trees as REAPI messages (engine/remote/reapi.py): what dtbuild
writes round-trips, other REAPI clients can read it, and whatever a remote cache hands
back that dtbuild would not write is refused with :class:`BadRemoteEntry` (never another
exception, never a node in the store that the store would not accept itself)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from dtbuild.engine.execution import build_tree
from dtbuild.engine.remote import Digest
from dtbuild.engine.remote._reapi.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb
from dtbuild.engine.remote.reapi import (
    MAX_TREE_DEPTH,
    META_TYPE_URL,
    SALT_PREFIX,
    BadRemoteEntry,
    RemoteOutput,
    action_digest,
    digest_of,
    encode_action_result,
    export_tree,
    import_tree,
    parse_action_result,
)
from dtbuild.engine.store import Store, check_directory_node
from dtbuild.plugins.interfaces import TreeEntry
from google.protobuf import any_pb2, struct_pb2

A = "a" * 64
B = "b" * 64


@pytest.fixture
def src(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "src"))


@pytest.fixture
def dst(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "dst"))


def _sample_tree(store: Store) -> tuple[str, int]:
    """Files of modes 0644/0755/0600, nested directories of their own modes, symlinks
    and an empty directory."""
    blobs = {name: store.put_bytes(data) for name, data in
             {"plain": b"plain\n", "tool": b"#!/bin/sh\necho hi\n", "secret": b"key\n"}.items()}
    entries = [
        TreeEntry("etc", "dir", 0o755),
        TreeEntry("etc/motd", "file", 0o644, blobs["plain"], 6),
        TreeEntry("etc/secret", "file", 0o600, blobs["secret"], 4),
        TreeEntry("usr/bin/tool", "file", 0o755, blobs["tool"], 18),
        TreeEntry("usr/bin/alias", "symlink", target="tool"),
        TreeEntry("usr/lib/private", "dir", 0o700),
        TreeEntry("usr/lib/private/deep/er", "dir", 0o750),
        TreeEntry("usr/lib/private/deep/er/same", "file", 0o644, blobs["plain"], 6),
        TreeEntry("var/empty", "dir", 0o1777 & 0o777),
        TreeEntry("link-out", "symlink", target="../elsewhere"),
    ]
    return build_tree(store, entries)


def _walk(store: Store, root: str) -> list[TreeEntry]:
    return list(store.walk_tree(root))


def _dg(message: Any) -> Any:
    d = digest_of(message.SerializeToString(deterministic=True))
    return pb.Digest(hash=d.hash, size_bytes=d.size)


def _tree(root: Any, *children: Any) -> bytes:
    return pb.Tree(root=root, children=list(children)).SerializeToString(deterministic=True)


# --------------------------------------------------------------------------- round trips


def test_a_tree_round_trips_to_the_same_root_digest_in_another_store(src: Store, dst: Store) -> None:
    root, total = _sample_tree(src)
    data, _, _, files = export_tree(src, root)
    got_root, got_total, got_files = import_tree(dst, data)
    assert got_root == root
    assert got_total == total == 6 + 4 + 18 + 6
    assert _walk(dst, got_root) == _walk(src, root)
    # each file blob named once, even when two files share it
    assert sorted(files) == sorted(set(files)) == sorted(got_files)
    assert {d.hash for d in files} == {e.digest for e in _walk(src, root) if e.kind == "file"}
    modes = {e.path: e.mode for e in _walk(dst, got_root)}
    assert modes["etc/secret"] == 0o600 and modes["usr/bin/tool"] == 0o755 and modes["etc/motd"] == 0o644
    assert modes["usr/lib/private"] == 0o700 and modes["usr/lib/private/deep/er"] == 0o750
    assert modes["var/empty"] == 0o777


def test_an_empty_tree_round_trips(src: Store, dst: Store) -> None:
    root, _ = build_tree(src, [])
    data, _, _, files = export_tree(src, root)
    assert import_tree(dst, data) == (root, 0, [])
    assert files == []


def test_export_is_deterministic(src: Store) -> None:
    root, _ = _sample_tree(src)
    assert export_tree(src, root) == export_tree(src, root)


def test_an_action_result_round_trips() -> None:
    outputs = {
        "bin": RemoteOutput(Digest(A, 10), False, True),
        "doc": RemoteOutput(Digest(B, 0), False, False),
        "tree": RemoteOutput(Digest("c" * 64, 120), True),
    }
    meta = {"mnemonic": "LayerWrite", "uses": {"compressors": {"gz": "1+abc"}, "layer_kinds": {"tar": "2"}}}
    got_outputs, got_meta = parse_action_result(encode_action_result(outputs, meta), set(outputs))
    assert got_outputs == outputs
    assert got_meta == meta


def test_an_action_result_is_what_other_reapi_clients_read(src: Store) -> None:
    root, _ = _sample_tree(src)
    tree_data, _, _, _ = export_tree(src, root)
    tree_digest = digest_of(tree_data)
    outputs = {"out.tar": RemoteOutput(Digest(A, 3), False, True),
               "rootfs": RemoteOutput(tree_digest, True)}
    message = pb.ActionResult.FromString(encode_action_result(outputs, {"mnemonic": "X"}))
    assert message.exit_code == 0
    assert [(f.path, f.digest.hash, f.digest.size_bytes, f.is_executable) for f in message.output_files] == [
        ("out.tar", A, 3, True)]
    assert [(d.path, d.tree_digest.hash, d.tree_digest.size_bytes) for d in message.output_directories] == [
        ("rootfs", tree_digest.hash, tree_digest.size)]
    [packed] = message.execution_metadata.auxiliary_metadata
    assert packed.type_url == META_TYPE_URL
    assert struct_pb2.Struct.FromString(packed.value)["mnemonic"] == "X"

    tree = pb.Tree.FromString(tree_data)
    assert tree.root.node_properties.HasField("unix_mode") and tree.root.node_properties.unix_mode.value == 0o755
    assert [d.name for d in tree.root.directories] == ["etc", "usr", "var"]
    assert [(s.name, s.target) for s in tree.root.symlinks] == [("link-out", "../elsewhere")]
    children = {_dg(c).hash: c for c in tree.children}
    for entry in tree.root.directories:  # every directory's digest names one of the children
        assert entry.digest.hash in children
        assert len(children[entry.digest.hash].SerializeToString(deterministic=True)) == entry.digest.size_bytes
    etc = children[next(d.digest.hash for d in tree.root.directories if d.name == "etc")]
    files = {f.name: f for f in etc.files}
    assert files["secret"].node_properties.unix_mode.value == 0o600 and not files["secret"].is_executable
    assert (files["secret"].digest.hash, files["secret"].digest.size_bytes) == (hashlib.sha256(b"key\n").hexdigest(), 4)
    usr = children[next(d.digest.hash for d in tree.root.directories if d.name == "usr")]
    bin_ = children[next(d.digest.hash for d in usr.directories if d.name == "bin")]
    assert {f.name: f.is_executable for f in bin_.files} == {"tool": True}
    assert all(c.node_properties.HasField("unix_mode") for c in tree.children)


def test_action_digest_is_stable_and_differs_per_key() -> None:
    one = action_digest("kind/1:abc")
    assert one == action_digest("kind/1:abc")
    assert one != action_digest("kind/1:abd")
    assert len(one.hash) == 64 and one.size > 0
    assert pb.Action.FromString(pb.Action(salt=SALT_PREFIX + b"kind/1:abc").SerializeToString()).salt.startswith(
        SALT_PREFIX)
    assert one == digest_of(pb.Action(salt=SALT_PREFIX + b"kind/1:abc").SerializeToString(deterministic=True))


# --------------------------------------------------------------------------- hostile trees


def _stored_nodes(store: Store) -> set[str]:
    return {name for _, _, names in os.walk(store.cas_dir) for name in names}


def _refused(store: Store, data: bytes, match: str | None = None) -> None:
    before = _stored_nodes(store)
    with pytest.raises(BadRemoteEntry, match=match):
        import_tree(store, data)
    for digest in _stored_nodes(store) - before:  # what it wrote before refusing is valid
        store.read_directory(digest)


def _file_node(name: str, digest: str = A, size: int = 1, mode: int | None = None) -> Any:
    d = pb.Directory()
    entry = d.files.add(name=name, digest=pb.Digest(hash=digest, size_bytes=size))
    if mode is not None:
        entry.node_properties.unix_mode.value = mode
    return d


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "a\x00b", "/abs", "../../../tmp/x"])
@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_a_name_that_is_not_one_path_component_is_refused(dst: Store, tmp_path: Path, name: str, kind: str) -> None:
    empty = pb.Directory()
    root = pb.Directory()
    if kind == "file":
        root.files.add(name=name, digest=pb.Digest(hash=A, size_bytes=1))
    elif kind == "directory":
        root.directories.add(name=name, digest=_dg(empty))
    else:
        root.symlinks.add(name=name, target="x")
    _refused(dst, _tree(root, empty), "path component")
    assert sorted(os.listdir(tmp_path)) == ["dst"]


def test_a_directory_missing_from_the_tree_is_refused(dst: Store) -> None:
    child = _file_node("f")
    root = pb.Directory()
    root.directories.add(name="d", digest=_dg(child))
    _refused(dst, _tree(root), "not among the tree's children")


def test_a_child_whose_digest_does_not_match_is_refused(dst: Store) -> None:
    child = _file_node("f")
    other = _file_node("g")
    root = pb.Directory()
    root.directories.add(name="d", digest=_dg(child))
    _refused(dst, _tree(root, other), "not among the tree's children")


def test_a_child_digest_with_the_wrong_size_is_refused(dst: Store) -> None:
    child = _file_node("f")
    digest = _dg(child)
    digest.size_bytes += 7
    root = pb.Directory()
    root.directories.add(name="d", digest=digest)
    _refused(dst, _tree(root, child))


def _nested(depth: int) -> bytes:
    node = pb.Directory()
    children = []
    for _ in range(depth):
        children.append(node)
        parent = pb.Directory()
        parent.directories.add(name="d", digest=_dg(node))
        node = parent
    return _tree(node, *children)


def test_nesting_up_to_the_limit_is_imported_and_deeper_is_refused(dst: Store) -> None:
    root, _, _ = import_tree(dst, _nested(MAX_TREE_DEPTH))
    assert len(_walk(dst, root)) == MAX_TREE_DEPTH
    _refused(dst, _nested(MAX_TREE_DEPTH + 1), "nests deeper")
    _refused(dst, _nested(MAX_TREE_DEPTH * 5), "nests deeper")


class _CountingStore(Store):
    """A store that gives up after a bounded number of Directory nodes."""

    limit = 5000

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.nodes = 0

    def put_directory_node(self, *args: Any, **kwargs: Any) -> str:
        self.nodes += 1
        if self.nodes > self.limit:
            raise AssertionError(f"more than {self.limit} Directory nodes written for a small Tree")
        return super().put_directory_node(*args, **kwargs)


def test_a_tree_that_names_one_child_many_times_is_imported_in_linear_time(tmp_path: Path) -> None:
    store = _CountingStore(str(tmp_path / "dst"))
    node = _file_node("f")
    children = []
    for _ in range(60):
        children.append(node)
        parent = pb.Directory()
        parent.directories.add(name="a", digest=_dg(node))
        parent.directories.add(name="b", digest=_dg(node))
        node = parent
    try:
        import_tree(store, _tree(node, *children))
    except BadRemoteEntry:
        pass
    assert store.nodes <= 61


@pytest.mark.parametrize("where", ["files", "directories", "symlinks", "file-and-dir", "dir-and-link"])
def test_duplicate_names_are_refused(dst: Store, where: str) -> None:
    empty = pb.Directory()
    root = pb.Directory()
    if where == "files":
        root.files.add(name="x", digest=pb.Digest(hash=A, size_bytes=1))
        root.files.add(name="x", digest=pb.Digest(hash=B, size_bytes=1))
    elif where == "directories":
        root.directories.add(name="x", digest=_dg(empty))
        root.directories.add(name="x", digest=_dg(empty))
    elif where == "symlinks":
        root.symlinks.add(name="x", target="a")
        root.symlinks.add(name="x", target="b")
    elif where == "file-and-dir":
        root.files.add(name="x", digest=pb.Digest(hash=A, size_bytes=1))
        root.directories.add(name="x", digest=_dg(empty))
    else:
        root.directories.add(name="x", digest=_dg(empty))
        root.symlinks.add(name="x", target="b")
    _refused(dst, _tree(root, empty), "appears twice")


@pytest.mark.parametrize(("digest", "size"), [
    ("a" * 63, 1), ("a" * 65, 1), ("A" * 64, 1), ("g" * 64, 1), ("", 0), ("../" + "a" * 61, 1),
    (A, -1), (A, 1 << 62), (A, -(1 << 63)),
])
def test_a_file_with_a_bad_digest_is_refused(dst: Store, digest: str, size: int) -> None:
    _refused(dst, _tree(_file_node("f", digest, size)), "not a sha256 digest")


@pytest.mark.parametrize(("digest", "size"), [("a" * 63, 1), ("Z" * 64, 1), (A, -1)])
def test_a_directory_with_a_bad_digest_is_refused(dst: Store, digest: str, size: int) -> None:
    root = pb.Directory()
    root.directories.add(name="d", digest=pb.Digest(hash=digest, size_bytes=size))
    _refused(dst, _tree(root, pb.Directory()), "not a sha256 digest")


@pytest.mark.parametrize("mode", [0o10000, 0o100644, 0xFFFFFFFF])
def test_a_mode_out_of_range_is_refused(dst: Store, mode: int) -> None:
    _refused(dst, _tree(_file_node("f", mode=mode)), "mode")
    root = pb.Directory()
    root.node_properties.unix_mode.value = mode
    _refused(dst, _tree(root), "mode")


def test_a_symlink_without_a_target_is_refused(dst: Store) -> None:
    root = pb.Directory()
    root.symlinks.add(name="l", target="")
    _refused(dst, _tree(root), "target")
    root = pb.Directory()
    root.symlinks.add(name="l", target="a\x00b")
    _refused(dst, _tree(root), "target")


def test_modes_default_from_the_executable_bit_when_a_client_sends_none(dst: Store) -> None:
    root = pb.Directory()
    root.files.add(name="run", digest=pb.Digest(hash=A, size_bytes=1), is_executable=True)
    root.files.add(name="data", digest=pb.Digest(hash=B, size_bytes=2))
    digest, total, files = import_tree(dst, _tree(root))
    assert {e.path: e.mode for e in _walk(dst, digest)} == {"data": 0o644, "run": 0o755}
    assert dst.read_directory(digest)["mode"] == 0o755
    assert total == 3 and sorted(files) == [Digest(A, 1), Digest(B, 2)]


@pytest.mark.parametrize("data", [b"\xff" * 10, b"\x0a\x05abc", b"\x12", os.urandom(64), b"\x0a\x02\x0a\x00" * 3])
def test_garbage_bytes_are_refused(dst: Store, data: bytes) -> None:
    try:
        import_tree(dst, data)
    except BadRemoteEntry:
        pass
    try:
        parse_action_result(data, {"out"})
    except BadRemoteEntry:
        pass


def test_every_written_node_is_one_the_store_accepts(src: Store, dst: Store) -> None:
    root, _ = _sample_tree(src)
    import_tree(dst, export_tree(src, root)[0])
    for digest in _stored_nodes(dst):
        check_directory_node(dst.read_directory(digest))


# --------------------------------------------------------------------------- hostile results


def _file_result(path: str = "out", digest: str = A, size: int = 1) -> Any:
    result = pb.ActionResult()
    result.output_files.add(path=path, digest=pb.Digest(hash=digest, size_bytes=size))
    return result


def _parse(result: Any, slots: set[str] | None = None) -> tuple[dict[str, RemoteOutput], dict[str, Any]]:
    return parse_action_result(result.SerializeToString(), {"out"} if slots is None else slots)


@pytest.mark.parametrize("code", [1, -1, 137])
def test_a_failed_command_is_refused(code: int) -> None:
    result = _file_result()
    result.exit_code = code
    with pytest.raises(BadRemoteEntry, match=f"status {code}"):
        _parse(result)


@pytest.mark.parametrize("paths", [[], ["other"], ["out", "extra"], ["out", "out"], ["../out"], [""]])
def test_outputs_that_are_not_the_slots_are_refused(paths: list[str]) -> None:
    result = pb.ActionResult()
    for path in paths:
        result.output_files.add(path=path, digest=pb.Digest(hash=A, size_bytes=1))
    with pytest.raises(BadRemoteEntry, match="outputs"):
        _parse(result)


def test_a_slot_that_is_both_a_file_and_a_directory_is_refused() -> None:
    result = _file_result()
    result.output_directories.add(path="out", tree_digest=pb.Digest(hash=B, size_bytes=1))
    with pytest.raises(BadRemoteEntry, match="twice"):
        _parse(result)


def test_a_directory_output_twice_is_refused() -> None:
    result = pb.ActionResult()
    result.output_directories.add(path="out", tree_digest=pb.Digest(hash=A, size_bytes=1))
    result.output_directories.add(path="out", tree_digest=pb.Digest(hash=B, size_bytes=1))
    with pytest.raises(BadRemoteEntry):
        _parse(result)


@pytest.mark.parametrize("field", ["output_symlinks", "output_file_symlinks", "output_directory_symlinks"])
def test_symlink_outputs_are_refused(field: str) -> None:
    result = _file_result()
    getattr(result, field).add(path="link", target="/etc/passwd")
    with pytest.raises(BadRemoteEntry, match="symlink"):
        _parse(result)


@pytest.mark.parametrize(("digest", "size"), [("a" * 63, 1), ("A" * 64, 1), (A, -5), ("", 0)])
@pytest.mark.parametrize("tree", [False, True])
def test_an_output_with_a_bad_digest_is_refused(digest: str, size: int, tree: bool) -> None:
    result = pb.ActionResult()
    if tree:
        result.output_directories.add(path="out", tree_digest=pb.Digest(hash=digest, size_bytes=size))
    else:
        result.output_files.add(path="out", digest=pb.Digest(hash=digest, size_bytes=size))
    with pytest.raises(BadRemoteEntry, match="not a sha256 digest"):
        _parse(result)


def _with_meta(value: bytes, type_url: str = META_TYPE_URL) -> Any:
    result = _file_result()
    result.execution_metadata.auxiliary_metadata.append(any_pb2.Any(type_url=type_url, value=value))
    return result


def test_metadata_that_is_not_a_struct_is_refused() -> None:
    with pytest.raises(BadRemoteEntry, match="metadata"):
        _parse(_with_meta(b"\xff\xff\xff"))


def test_metadata_of_another_type_is_ignored() -> None:
    assert _parse(_with_meta(b"\xff\xff", "type.googleapis.com/other.Thing"))[1] == {}
    assert _parse(_file_result())[1] == {}


@pytest.mark.parametrize("number", [float("nan"), float("inf")])
def test_metadata_with_a_number_json_cannot_hold_is_refused(number: float) -> None:
    struct = struct_pb2.Struct()
    struct.fields["seconds"].number_value = number
    with pytest.raises(BadRemoteEntry):
        _parse(_with_meta(struct.SerializeToString()))
