"""What goes into a layer: packages' trees merged into one file system tree, as
dockerTools' rsync of each content path into the layer root does, and the directory
attributes a base image already gives (so a layer never resets them).

Pure data work: no store, no engine. Paths are relative, '/'-separated, without a
leading '/'.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import IO

from dtbuild.plugins.builtin import tar_extract
from dtbuild.plugins.builtin.flatten import Flattener
from dtbuild.plugins.interfaces import ActionFailed


class ContentConflict(ValueError):
    """Two packages disagree about a path in a way that cannot be merged."""


@dataclass(frozen=True, slots=True)
class Node:
    kind: str  # file | dir | symlink
    mode: int = 0o755
    digest: str = ""
    size: int = 0
    target: str = ""
    origin: str = ""  # the package (label) that placed it


class MergedTree:
    """Later packages override earlier ones path by path (rsync -a semantics): a file
    replaces a file or a symlink, a directory merges with a directory and replaces a
    symlink, unless ``keep_dirlinks`` (rsync -K), where a symlink to a directory is
    followed and the directory's contents land where it points."""

    def __init__(self, keep_dirlinks: bool = False) -> None:
        self.keep_dirlinks = keep_dirlinks
        self.nodes: dict[str, Node] = {}

    def _resolve(self, path: str) -> str:
        """With keep_dirlinks: rewrite leading components that are symlinks to
        directories of this tree into their targets."""
        if not self.keep_dirlinks:
            return path
        parts = path.split("/")
        for _ in range(40):  # symlink chains are bounded, as in the kernel
            for i in range(1, len(parts)):
                prefix = "/".join(parts[:i])
                node = self.nodes.get(prefix)
                if node is not None and node.kind == "symlink":
                    base = posixpath.dirname(prefix)
                    target = node.target
                    resolved = posixpath.normpath(target.lstrip("/") if target.startswith("/")
                                                  else posixpath.join(base, target))
                    if resolved.startswith("..") or resolved == ".":
                        break  # points outside the layer: leave it alone
                    target_node = self.nodes.get(resolved)
                    if target_node is not None and target_node.kind == "dir":
                        parts = [*resolved.split("/"), *parts[i:]]
                        break
            else:
                return "/".join(parts)
        return "/".join(parts)

    def _ensure_parents(self, path: str, origin: str) -> None:
        parent = posixpath.dirname(path)
        node = self.nodes.get(parent) if parent else None
        if node is not None and node.kind == "dir":
            return  # the common case: the parent is already a directory of the tree
        missing = []
        while parent:
            node = self.nodes.get(parent)
            if node is not None:
                if node.kind != "dir":
                    if node.kind == "symlink" and not self.keep_dirlinks:
                        self.nodes[parent] = Node("dir", 0o755, origin=origin)
                    else:
                        raise ContentConflict(f"/{parent} is a {node.kind} (from {node.origin}) but {origin} "
                                              f"places /{path} below it")
                break
            missing.append(parent)
            parent = posixpath.dirname(parent)
        for p in missing:
            self.nodes[p] = Node("dir", 0o755, origin=origin)

    def add(self, path: str, node: Node) -> None:
        path = self._resolve(path.strip("/"))
        if not path:
            return
        self._ensure_parents(path, node.origin)
        existing = self.nodes.get(path)
        if existing is None:
            self.nodes[path] = node
            return
        if existing.kind == "dir" and node.kind == "dir":
            self.nodes[path] = replace(existing, mode=node.mode)
            return
        if existing.kind == "dir":
            if any(p.startswith(path + "/") for p in self.nodes):
                raise ContentConflict(f"/{path} is a directory (from {existing.origin}) but {node.origin} "
                                      f"places a {node.kind} there")
        elif node.kind == "dir" and existing.kind == "symlink" and self.keep_dirlinks:
            return  # the symlink stays; contents are resolved through it
        self.nodes[path] = node

    def sorted_paths(self) -> list[str]:
        """GNU tar --sort=name order: every directory directly followed by its contents."""
        return sorted(self.nodes, key=lambda p: p.split("/"))


@dataclass(frozen=True, slots=True)
class DirAttrs:
    mode: int
    uid: int
    gid: int


def base_directories(layer_streams: Iterable[IO[bytes]]) -> dict[str, DirAttrs]:
    """The directories of an image's root file system (layers applied in order by
    :class:`~dtbuild.plugins.builtin.flatten.Flattener`, whiteouts honoured), with their
    modes and owners: the directories the layers hold entries for (not the parents an
    extractor would make for them).

    :raises ActionFailed: for a layer tar_extract refuses (base layers come from images
        of unknown origin).
    """
    # Only directories matter here: a hard link's target is not checked.
    flat = Flattener(keep_unresolved_links=True)
    for number, stream in enumerate(layer_streams):
        flat.begin_layer(number)
        try:
            with stream:
                flat.apply_layer(tar_extract.read_entries(stream, lower_files=lambda _path: True), number)
        except tar_extract.UnsafeArchive as e:
            raise ActionFailed("cannot read the base image: " + e.message(f"layer {number + 1}")) from None
    return {path: DirAttrs(node.mode, node.uid, node.gid) for path, node in flat.sorted_entries()
            if node.kind == "dir" and not node.implicit}
