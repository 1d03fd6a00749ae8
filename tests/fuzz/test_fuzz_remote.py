"""Fuzzing what a remote cache hands back: serialized ``ActionResult`` and ``Tree``
messages (engine/remote/reapi.py).

Hypothesis feeds :func:`parse_action_result` and :func:`import_tree` random bytes,
valid messages with bytes flipped, cut short or inserted, and messages that parse but
are hostile: names that are not one path component or appear twice, digests that are
not sha256 digests, negative sizes, modes out of range, children missing from the Tree
or naming each other, outputs that are not the action's slots, failed commands, symlink
outputs, metadata of any shape. Each may only succeed or raise :class:`BadRemoteEntry`
(anything else would crash a build, since the remote cache turns only that into a
miss), and every Directory node ``import_tree`` writes is one the store itself accepts
(:func:`check_directory_node`, re-read through :meth:`Store.read_directory`).

Budget as in test_fuzz_readers.py: ``DTBUILD_FUZZ_EXAMPLES`` examples per test (200 by
default), derandomized unless ``DTBUILD_FUZZ_RANDOM=1``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from dtbuild.engine.execution import build_tree
from dtbuild.engine.remote import Digest
from dtbuild.engine.remote._reapi.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb
from dtbuild.engine.remote.reapi import (
    META_TYPE_URL,
    BadRemoteEntry,
    RemoteOutput,
    digest_of,
    encode_action_result,
    export_tree,
    import_tree,
    parse_action_result,
)
from dtbuild.engine.store import Store, check_directory_node
from dtbuild.plugins.interfaces import TreeEntry
from google.protobuf import any_pb2, struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("DTBUILD_FUZZ_EXAMPLES", "200"))
TIMEOUT_S = 120 + EXAMPLES // 4
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("DTBUILD_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
pytestmark = pytest.mark.timeout(TIMEOUT_S)

SLOTS = {"out", "rootfs"}


class _Stores:
    """A fresh store per example (a Hypothesis example cannot use a function fixture)."""

    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="dtbuild-fuzz-remote-")
        self.n = 0

    def new(self) -> Store:
        self.n += 1
        return Store(os.path.join(self.base, str(self.n)))

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def stores() -> Iterator[_Stores]:
    s = _Stores()
    yield s
    s.close()


def _nodes(store: Store) -> set[str]:
    return {name for _, _, names in os.walk(store.cas_dir) for name in names}


def imported_cleanly(store: Store, data: bytes) -> tuple[str, int, list[Digest]] | None:
    """``import_tree``: success or BadRemoteEntry only, and only valid nodes written."""
    before = _nodes(store)
    try:
        found: tuple[str, int, list[Digest]] | None = import_tree(store, data)
    except BadRemoteEntry as e:
        assert str(e)
        found = None
    for digest in _nodes(store) - before:
        check_directory_node(store.read_directory(digest))  # a bad node raises StoreError here
    assert not os.listdir(store.tmp_dir)
    if found is not None:
        root, total, files = found
        assert total >= 0 and all(len(d.hash) == 64 and d.size >= 0 for d in files)
        for entry in store.walk_tree(root):
            assert all(part not in ("", ".", "..") for part in entry.path.split("/")), entry.path
    return found


def parsed_cleanly(data: bytes, slots: set[str] = SLOTS) -> tuple[dict[str, RemoteOutput], dict[str, Any]] | None:
    try:
        outputs, meta = parse_action_result(data, slots)
    except BadRemoteEntry as e:
        assert str(e)
        return None
    assert set(outputs) == slots and isinstance(meta, dict)
    for out in outputs.values():
        assert len(out.digest.hash) == 64 and out.digest.size >= 0
    return outputs, meta


# --------------------------------------------------------------------------- valid seeds


def _seed_tree() -> tuple[bytes, str]:
    store = Store(tempfile.mkdtemp(prefix="dtbuild-fuzz-seed-"))
    try:
        blob = store.put_bytes(b"payload\n")
        root, _ = build_tree(store, [TreeEntry("a/b/c", "file", 0o755, blob, 8),
                                     TreeEntry("a/d", "file", 0o600, blob, 8),
                                     TreeEntry("e", "dir", 0o700),
                                     TreeEntry("l", "symlink", target="a/b/c")])
        return export_tree(store, root)[0], root
    finally:
        shutil.rmtree(store.root, ignore_errors=True)


SEED_TREE, SEED_ROOT = _seed_tree()
SEED_RESULT = encode_action_result(
    {"out": RemoteOutput(Digest("a" * 64, 5), False, True), "rootfs": RemoteOutput(digest_of(SEED_TREE), True)},
    {"mnemonic": "LayerWrite", "uses": {"compressors": {"gz": "1"}}})


def test_the_seeds_are_valid(stores: _Stores) -> None:
    assert imported_cleanly(stores.new(), SEED_TREE) is not None
    assert import_tree(stores.new(), SEED_TREE)[0] == SEED_ROOT
    assert parsed_cleanly(SEED_RESULT) is not None


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            del data[pos:pos + draw(st.integers(1, 8))]
    return bytes(data)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(stores: _Stores, data: bytes) -> None:
    imported_cleanly(stores.new(), data)
    parsed_cleanly(data)


@FUZZ
@given(mutated(SEED_TREE))
def test_mutated_trees(stores: _Stores, data: bytes) -> None:
    imported_cleanly(stores.new(), data)


@FUZZ
@given(mutated(SEED_RESULT))
def test_mutated_action_results(data: bytes) -> None:
    parsed_cleanly(data)


# --------------------------------------------------------------------------- hostile messages

NAMES = st.one_of(st.sampled_from(["a", "b", "x", "..", ".", "", "a/b", "/", "a\x00", "../../etc", "é", " "]),
                  st.text(max_size=6))
HEX = "0123456789abcdef"
DIGESTS = st.one_of(
    st.text(HEX, min_size=64, max_size=64),
    st.sampled_from(["", "A" * 64, "g" * 64, "a" * 63, "a" * 65, "../" + "a" * 61]),
    st.text(max_size=70),
)
SIZES = st.one_of(st.integers(0, 1 << 20), st.sampled_from([-1, -(1 << 63), (1 << 62) - 1, 1 << 62, (1 << 63) - 1]))
MODES = st.one_of(st.none(), st.sampled_from([0o644, 0o755, 0o600, 0o4755, 0o7777, 0o10000, 0o100644, 0xFFFFFFFF]),
                  st.integers(0, 0xFFFFFFFF))


def _digest(hash_: str, size: int) -> Any:
    return pb.Digest(hash=hash_, size_bytes=size)


def _set_mode(props: Any, mode: int | None) -> None:
    if mode is not None:
        props.unix_mode.value = mode


@st.composite
def hostile_trees(draw: st.DrawFn) -> bytes:
    """A Tree whose Directory messages are built bottom up, each naming earlier ones
    (by their true digest, a wrong one or a wrong size), some left out of the children."""
    made: list[Any] = []
    for _ in range(draw(st.integers(1, 6))):
        d = pb.Directory()
        for _ in range(draw(st.integers(0, 3))):
            f = d.files.add(name=draw(NAMES), digest=_digest(draw(DIGESTS), draw(SIZES)),
                            is_executable=draw(st.booleans()))
            _set_mode(f.node_properties, draw(MODES))
        for _ in range(draw(st.integers(0, 2))):
            how = draw(st.sampled_from(["child", "child", "wrong-size", "bogus"])) if made else "bogus"
            if how == "bogus":
                digest = _digest(draw(DIGESTS), draw(SIZES))
            else:
                true = digest_of(draw(st.sampled_from(made)).SerializeToString(deterministic=True))
                digest = _digest(true.hash, true.size + (draw(st.integers(1, 9)) if how == "wrong-size" else 0))
            d.directories.add(name=draw(NAMES), digest=digest)
        for _ in range(draw(st.integers(0, 2))):
            d.symlinks.add(name=draw(NAMES), target=draw(st.one_of(st.sampled_from(["", "x", "/etc/passwd",
                                                                                  "../../..", "a\x00b"]),
                                                                 st.text(max_size=8))))
        _set_mode(d.node_properties, draw(MODES))
        made.append(d)
    root = made.pop()
    children = [c for c in made if draw(st.booleans()) or draw(st.booleans())]
    extra = draw(st.lists(st.binary(max_size=8), max_size=2))
    tree = pb.Tree(root=root, children=children)
    for junk in extra:  # children that parse but nothing names
        c = tree.children.add()
        c.symlinks.add(name="j", target=junk.hex() or "t")
    return tree.SerializeToString(deterministic=True)


@FUZZ
@given(hostile_trees())
def test_hostile_trees(stores: _Stores, data: bytes) -> None:
    imported_cleanly(stores.new(), data)


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.text(max_size=10),
                        st.floats(allow_nan=False, allow_infinity=False))


def _meta_values(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                        max_leaves=10)


def _struct(value: dict[str, Any]) -> bytes:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct.SerializeToString(deterministic=True)


@st.composite
def hostile_results(draw: st.DrawFn, leaves: st.SearchStrategy[Any] = JSON_LEAVES) -> bytes:
    paths = st.one_of(st.sampled_from(sorted(SLOTS)), NAMES)
    if draw(st.booleans()):  # outputs as dtbuild writes them: the metadata is what is read
        result = pb.ActionResult()
        result.output_files.add(path="out", digest=_digest("a" * 64, 1))
        result.output_directories.add(path="rootfs", tree_digest=_digest("b" * 64, 1))
        _add_meta(draw, result, leaves)
        return result.SerializeToString(deterministic=True)
    result = pb.ActionResult(exit_code=draw(st.one_of(st.just(0), st.integers(-(1 << 31), (1 << 31) - 1))))
    for _ in range(draw(st.integers(0, 3))):
        result.output_files.add(path=draw(paths), digest=_digest(draw(DIGESTS), draw(SIZES)),
                                is_executable=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 2))):
        result.output_directories.add(path=draw(paths), tree_digest=_digest(draw(DIGESTS), draw(SIZES)))
    for field in ("output_symlinks", "output_file_symlinks", "output_directory_symlinks"):
        if draw(st.integers(0, 5)) == 0:
            getattr(result, field).add(path=draw(paths), target=draw(NAMES))
    _add_meta(draw, result, leaves)
    return result.SerializeToString(deterministic=True)


def _add_meta(draw: st.DrawFn, result: Any, leaves: st.SearchStrategy[Any]) -> None:
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["struct", "struct", "garbage", "other-type"]))
        if kind == "struct":
            value = _struct(draw(st.dictionaries(st.text(max_size=6), _meta_values(leaves), max_size=4)))
        else:
            value = draw(st.binary(max_size=32))
        url = "type.googleapis.com/other.Thing" if kind == "other-type" else META_TYPE_URL
        result.execution_metadata.auxiliary_metadata.append(any_pb2.Any(type_url=url, value=value))


@FUZZ
@given(hostile_results())
def test_hostile_action_results(data: bytes) -> None:
    parsed_cleanly(data)


@FUZZ
@given(hostile_results(st.one_of(st.sampled_from([float("nan"), float("inf"), float("-inf")]), st.floats(),
                                 JSON_LEAVES)))
def test_hostile_action_results_with_any_number(data: bytes) -> None:
    parsed_cleanly(data)


def _valid_result(draw: Callable[[st.SearchStrategy[Any]], Any]) -> tuple[dict[str, RemoteOutput], dict[str, Any]]:
    outputs = {slot: RemoteOutput(Digest(draw(st.text(HEX, min_size=64, max_size=64)), draw(st.integers(0, 1 << 40))),
                                  draw(st.booleans()), draw(st.booleans()))
               for slot in SLOTS}
    outputs = {k: RemoteOutput(v.digest, v.is_tree, v.executable and not v.is_tree) for k, v in outputs.items()}
    meta = draw(st.dictionaries(st.text(max_size=6), _meta_values(st.one_of(st.none(), st.booleans(),
                                                                            st.text(max_size=10))), max_size=4))
    return outputs, meta


@FUZZ
@given(st.data())
def test_what_dtbuild_writes_parses_back(data: st.DataObject) -> None:
    outputs, meta = _valid_result(data.draw)
    assert parse_action_result(encode_action_result(outputs, meta), SLOTS) == (outputs, meta)
