"""The store's results and trees as REAPI's own messages, and back.

A remote cache holds what any REAPI client can read:

* the action cache entry of an action is an ``ActionResult``: each file output an
  ``OutputFile`` (its path is the output's slot name, with ``is_executable``), each tree
  output an ``OutputDirectory`` whose ``tree_digest`` names a ``Tree`` message in the
  CAS; the facts the engine keeps about a result (its mnemonic, the versions of the
  plugins it used) travel as a ``google.protobuf.Struct`` in
  ``execution_metadata.auxiliary_metadata``;
* a tree is a ``Tree`` of ``Directory`` messages, modes in ``node_properties.unix_mode``
  (REAPI's field for them), so a tree converts to the store's Directory nodes and back
  without loss; file blobs are the same bytes under the same sha256 in both. A server
  that names an output directory only by its root ``Directory``
  (``root_directory_digest``, REAPI 2.3) is read through ``GetTree`` and
  :func:`tree_from_directories`, so both forms are checked by the same code.

The action cache key of an action is the digest of an ``Action`` message whose ``salt``
holds the engine's own key (kind version, parameters, inputs, plugin versions): it is a
valid REAPI action digest, and no other client's action can have it.

Everything read from a remote is hostile: :func:`parse_action_result` and
:func:`import_tree` check every name, digest, size and mode as the local store checks
its own nodes, and raise :class:`BadRemoteEntry` for anything else (the entry is then a
miss). Bytes are never trusted: the caller checks every blob against its digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dtbuild.engine.remote import Digest

if TYPE_CHECKING:
    from dtbuild.engine.store import ActionResult, Store

#: The salt prefix of the Action messages that name dtbuild's cache entries.
SALT_PREFIX = b"dtbuild-action-key/1:"
#: How deep a tree from a remote may nest (deeper is refused, not recursed into).
MAX_TREE_DEPTH = 200
#: How many entries (files, directories, symlinks) a tree from a remote may expand to.
MAX_TREE_ENTRIES = 10_000_000
META_TYPE_URL = "type.googleapis.com/google.protobuf.Struct"


class BadRemoteEntry(ValueError):
    """A remote action result or tree that is not what the engine writes."""


def _pb() -> Any:
    from dtbuild.engine.remote._reapi.build.bazel.remote.execution.v2 import remote_execution_pb2

    return remote_execution_pb2


def _parse(message: Any, data: bytes, what: str) -> Any:
    """``message`` filled from serialized ``data``.

    :raises BadRemoteEntry: when ``data`` is not such a message.
    """
    from google.protobuf.message import DecodeError

    try:
        message.ParseFromString(data)
    except DecodeError as e:
        raise BadRemoteEntry(f"not {what} ({e})") from None
    return message


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest(), len(data))


def action_digest(key: str) -> Digest:
    """The REAPI action digest under which the result of the action with engine key
    ``key`` is cached."""
    action = _pb().Action(salt=SALT_PREFIX + key.encode())
    return digest_of(action.SerializeToString(deterministic=True))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class RemoteOutput:
    """One output of a remote ActionResult: a file (its blob) or a tree (its Tree blob,
    or with ``root_directory`` its root Directory, read with GetTree)."""

    digest: Digest
    is_tree: bool
    executable: bool = False
    #: ``digest`` names the tree's root Directory (REAPI's ``root_directory_digest``,
    #: set without a ``tree_digest``), not a Tree.
    root_directory: bool = False
    #: Written beside a ``tree_digest``: the digest of the tree's root Directory.
    root_directory_digest: Digest | None = None


def _check_digest(d: Any, what: str) -> Digest:
    h, size = d.hash, d.size_bytes
    if len(h) != 64 or any(c not in "0123456789abcdef" for c in h) or not 0 <= size < 1 << 62:
        raise BadRemoteEntry(f"{what} has the digest {h!r}/{size}, not a sha256 digest")
    return Digest(h, size)


def encode_action_result(outputs: dict[str, RemoteOutput], meta: dict[str, Any]) -> bytes:
    """The serialized ActionResult of a result whose outputs are ``outputs`` (slot ->
    file or Tree digest)."""
    from google.protobuf import any_pb2, json_format, struct_pb2

    pb = _pb()
    result = pb.ActionResult(exit_code=0)
    for slot, out in sorted(outputs.items()):
        digest = pb.Digest(hash=out.digest.hash, size_bytes=out.digest.size)
        if out.is_tree:
            entry = result.output_directories.add(path=slot, tree_digest=digest)
            if out.root_directory_digest is not None:
                entry.root_directory_digest.hash = out.root_directory_digest.hash
                entry.root_directory_digest.size_bytes = out.root_directory_digest.size
        else:
            result.output_files.add(path=slot, digest=digest, is_executable=out.executable)
    struct = struct_pb2.Struct()
    json_format.ParseDict(json.loads(json.dumps(meta)), struct)
    packed = any_pb2.Any(type_url=META_TYPE_URL, value=struct.SerializeToString(deterministic=True))
    result.execution_metadata.auxiliary_metadata.append(packed)
    return result.SerializeToString(deterministic=True)


def parse_action_result(data: bytes, slots: set[str]) -> tuple[dict[str, RemoteOutput], dict[str, Any]]:
    """The outputs and meta of a serialized ActionResult, which must have exactly the
    output slots ``slots`` and exit code 0.

    :raises BadRemoteEntry: for anything else.
    """
    from google.protobuf import json_format, struct_pb2

    result = _parse(_pb().ActionResult(), data, "an ActionResult message")
    if result.exit_code != 0:
        raise BadRemoteEntry(f"it records a command that exited with status {result.exit_code}")
    outputs: dict[str, RemoteOutput] = {}
    for f in result.output_files:
        outputs[f.path] = RemoteOutput(_check_digest(f.digest, f"output {f.path!r}"), False, f.is_executable)
    for d in result.output_directories:
        if d.path in outputs:
            raise BadRemoteEntry(f"output {d.path!r} appears twice")
        if not d.tree_digest.hash and d.root_directory_digest.hash:
            outputs[d.path] = RemoteOutput(_check_digest(d.root_directory_digest, f"output {d.path!r}"), True,
                                           root_directory=True)
        else:
            outputs[d.path] = RemoteOutput(_check_digest(d.tree_digest, f"output {d.path!r}"), True)
    if len(outputs) != len(result.output_files) + len(result.output_directories) or set(outputs) != slots:
        raise BadRemoteEntry(f"its outputs {sorted(outputs)} are not the action's {sorted(slots)}")
    if result.output_symlinks or result.output_file_symlinks or result.output_directory_symlinks:
        raise BadRemoteEntry("it has symlink outputs, which dtbuild actions never declare")
    meta: dict[str, Any] = {}
    for packed in result.execution_metadata.auxiliary_metadata:
        if packed.type_url == META_TYPE_URL:
            struct = _parse(struct_pb2.Struct(), packed.value, "a Struct (its metadata)")
            try:
                meta = json_format.MessageToDict(struct)
            except (ValueError, json_format.Error) as e:  # NaN and infinities: not JSON
                raise BadRemoteEntry(f"its metadata is not JSON ({e})") from None
            break
    return outputs, meta


# --------------------------------------------------------------------------- trees


def export_tree(store: Store, root: str) -> tuple[bytes, Digest, dict[Digest, bytes], list[Digest]]:
    """The serialized ``Tree`` of the store's tree ``root``, the digest of its root
    Directory, every Directory of it serialized (servers that check a result's
    completeness, as buildbox-casd does, want each in the CAS, as REAPI's
    ``root_directory_digest`` readers do) and the file blobs it names (each once)."""
    pb = _pb()
    children: dict[str, Any] = {}
    directories: dict[Digest, bytes] = {}
    files: dict[str, Digest] = {}

    def convert(digest: str) -> Any:
        node = store.read_directory(digest)
        directory = pb.Directory()
        for f in node["files"]:
            entry = directory.files.add(name=f["name"], digest=pb.Digest(hash=f["digest"], size_bytes=f["size"]),
                                        is_executable=bool(f["mode"] & 0o100))
            entry.node_properties.unix_mode.value = f["mode"]
            files.setdefault(f["digest"], Digest(f["digest"], f["size"]))
        for d in node["directories"]:
            child = convert(d["digest"])
            data = child.SerializeToString(deterministic=True)
            child_digest = digest_of(data)
            children.setdefault(child_digest.hash, child)
            directories[child_digest] = data
            directory.directories.add(name=d["name"], digest=pb.Digest(hash=child_digest.hash,
                                                                       size_bytes=child_digest.size))
        for s in node["symlinks"]:
            directory.symlinks.add(name=s["name"], target=s["target"])
        directory.node_properties.unix_mode.value = node.get("mode", 0o755)
        return directory

    tree = pb.Tree(root=convert(root))
    for _, child in sorted(children.items()):
        tree.children.append(child)
    root_data = tree.root.SerializeToString(deterministic=True)
    root_digest = digest_of(root_data)
    directories[root_digest] = root_data
    return tree.SerializeToString(deterministic=True), root_digest, directories, list(files.values())


def tree_from_directories(root: bytes, children: list[bytes]) -> bytes:
    """The serialized ``Tree`` whose root is serialized Directory ``root`` and whose
    children are ``children`` (serialized Directories, as ``GetTree`` sends them; the
    root may be among them), for a result that names its output directory by its root
    Directory (REAPI's ``root_directory_digest``) instead of a Tree. The Tree is then
    read as any other (:func:`import_tree`), which takes a child only under the digest
    of its own bytes, so a child that is not what its parent names is never used.

    :raises BadRemoteEntry: for bytes that are not a Directory message.
    """
    from google.protobuf import message

    pb = _pb()
    tree = pb.Tree()
    try:
        tree.root.ParseFromString(root)
        for data in children:
            tree.children.add().ParseFromString(data)
    except message.DecodeError as e:
        raise BadRemoteEntry(f"not a Directory message ({e})") from None
    return tree.SerializeToString(deterministic=True)


def tree_of_root(root: Digest, directories: list[bytes]) -> bytes:
    """The serialized ``Tree`` of the directory ``root`` from ``directories`` (what
    ``GetTree`` sent for it): the one whose bytes hash to ``root`` is the root, the
    others its children (:func:`tree_from_directories`).

    :raises BadRemoteEntry: when none of them is the root, or one is not a Directory.
    """
    root_bytes = next((data for data in directories if digest_of(data) == root), None)
    if root_bytes is None:
        raise BadRemoteEntry(f"the tree of directory {root.hash} arrived without that directory")
    return tree_from_directories(root_bytes, [data for data in directories if data != root_bytes])


def import_tree(store: Store, data: bytes) -> tuple[str, int, list[Digest]]:
    """Put the store's Directory nodes of serialized ``Tree`` ``data`` into ``store``
    (checked as the store checks its own) and return (root digest, total file bytes,
    the file blobs it names).

    :raises BadRemoteEntry: for a Tree that is not a valid, complete tree.
    """
    from dtbuild.engine.store import check_directory_node

    tree = _parse(_pb().Tree(), data, "a Tree message")
    by_digest = {digest_of(c.SerializeToString(deterministic=True)): c for c in tree.children}
    files: dict[str, Digest] = {}
    #: Each child converted once, however many directories name it (a small hostile Tree
    #: naming one child twice at every level would otherwise take exponential time):
    #: digest -> (its node's digest, its file bytes, its height, its entries).
    done: dict[Digest, tuple[str, int, int, int]] = {}

    def convert(directory: Any, depth: int) -> tuple[str, int, int, int]:
        if depth > MAX_TREE_DEPTH:
            raise BadRemoteEntry(f"it nests deeper than {MAX_TREE_DEPTH} directories")
        total = 0
        height = 0
        # Entries as the tree expands on disk (a child named twice counts twice): a small
        # Tree must not stand for more files than any output could hold.
        entries = len(directory.files) + len(directory.directories) + len(directory.symlinks)
        node: dict[str, Any] = {"files": [], "directories": [], "symlinks": []}
        for f in directory.files:
            digest = _check_digest(f.digest, f"file {f.name!r}")
            mode = f.node_properties.unix_mode.value if f.node_properties.HasField("unix_mode") \
                else (0o755 if f.is_executable else 0o644)
            node["files"].append({"name": f.name, "digest": digest.hash, "size": digest.size, "mode": mode})
            files.setdefault(digest.hash, digest)
            total += digest.size
        for d in directory.directories:
            key = _check_digest(d.digest, f"directory {d.name!r}")
            converted = done.get(key)
            if converted is None:
                child = by_digest.get(key)
                if child is None:
                    raise BadRemoteEntry(f"directory {d.name!r} is not among the tree's children")
                converted = done[key] = convert(child, depth + 1)
            elif depth + 1 + converted[2] > MAX_TREE_DEPTH:
                raise BadRemoteEntry(f"it nests deeper than {MAX_TREE_DEPTH} directories")
            node["directories"].append({"name": d.name, "digest": converted[0]})
            total += converted[1]
            height = max(height, converted[2] + 1)
            entries += converted[3]
            if entries > MAX_TREE_ENTRIES or total >= 1 << 62:
                raise BadRemoteEntry(f"it expands to more than {MAX_TREE_ENTRIES:,} entries")
        for link in directory.symlinks:
            node["symlinks"].append({"name": link.name, "target": link.target})
        node["mode"] = directory.node_properties.unix_mode.value \
            if directory.node_properties.HasField("unix_mode") else 0o755
        try:
            check_directory_node(node)
        except ValueError as e:
            raise BadRemoteEntry(str(e)) from None
        node_digest = store.put_directory_node(node["files"], node["directories"], node["symlinks"], node["mode"])
        return node_digest, total, height, entries

    root, total, _, _ = convert(tree.root, 0)
    return root, total, list(files.values())


def result_blobs(store: Store, result: ActionResult
                 ) -> Iterator[tuple[str, RemoteOutput, dict[Digest, bytes], list[Digest]]]:
    """For each output of ``result``: (slot, its remote output, the small blobs a tree
    output adds (its Tree and every Directory; none for a file), the file blobs it needs
    in the CAS)."""
    for slot, value in sorted(result.outputs.items()):
        if value.is_tree:
            data, root, directories, files = export_tree(store, value.digest)
            yield slot, RemoteOutput(digest_of(data), True, root_directory_digest=root), \
                {digest_of(data): data, **directories}, files
        else:
            digest = Digest(value.digest, value.size)
            yield slot, RemoteOutput(digest, False, value.executable), {}, [digest]
