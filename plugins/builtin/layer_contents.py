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


#: How many symbolic links one resolution follows (the kernel's limit, MAXSYMLINKS).
MAX_SYMLINK_FOLLOWS = 40
#: The most entries a package's tree may grow to when its symlinks to directories are
#: copied as directories (:func:`copy_dirlinks`): a few links to big directories multiply.
MAX_COPIED_ENTRIES = 1_000_000


def resolve_directory(nodes: dict[str, Node], parent: str, target: str) -> str | None:
    """The directory of ``nodes`` that a symbolic link in ``parent`` (a real directory
    path, '' for the root) with ``target`` leads to, following links on the way as the
    kernel does (an absolute target starts at the root of ``nodes``: the image's root);
    None when it leads to no directory of ``nodes``: dangling, to a file, out of the
    tree through '..', or more than :data:`MAX_SYMLINK_FOLLOWS` links deep."""
    follows = 0

    def walk(start: str, text: str) -> str | None:
        nonlocal follows
        current = "" if text.startswith("/") else start
        for part in text.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not current:
                    return None  # above the root: outside what this tree holds
                current = posixpath.dirname(current)
                continue
            candidate = f"{current}/{part}" if current else part
            node = nodes.get(candidate)
            if node is None or node.kind == "file":
                return None
            if node.kind == "symlink":
                follows += 1
                if follows > MAX_SYMLINK_FOLLOWS:
                    return None
                found = walk(current, node.target)
                if found is None:
                    return None
                current = found
            else:
                current = candidate
        return current

    return walk(parent, target)


def copy_dirlinks(nodes: dict[str, Node], what: str = "a package") -> dict[str, Node]:
    """rsync -k (--copy-dirlinks) on one package's tree: every symbolic link that leads
    to a directory of the same tree (:func:`resolve_directory`) becomes a directory
    with that directory's mode and a copy of its contents (links in them treated the
    same way, resolved where the contents really are), as dockerTools' ``rsync -ak``
    of each package into the layer sends it. Links that lead nowhere in the tree stay
    links. A link to a directory that holds the link itself (its own parent, the root)
    would make an endless tree, where rsync runs until it fails: it stays a link too.

    :raises ContentConflict: when the copies would pass :data:`MAX_COPIED_ENTRIES`.
    """
    children: dict[str, list[str]] = {}
    for path in sorted(nodes, key=lambda p: p.split("/")):
        children.setdefault(posixpath.dirname(path), []).append(path)
    out: dict[str, Node] = {}

    def emit(real_dir: str, out_dir: str, walked: tuple[str, ...]) -> None:
        for real in children.get(real_dir, ()):
            name = posixpath.basename(real)
            dest = f"{out_dir}/{name}" if out_dir else name
            node = nodes[real]
            if len(out) >= MAX_COPIED_ENTRIES:
                raise ContentConflict(f"copying the symbolic links to directories of {what} as directories (as "
                                      f"rsync -k does, keep_contents_dirlinks = False) makes more than "
                                      f"{MAX_COPIED_ENTRIES} entries; set keep_contents_dirlinks = True to keep "
                                      "them as links")
            if node.kind == "symlink":
                found = resolve_directory(nodes, real_dir, node.target)
                # A directory that holds one of the directories being copied holds this link.
                if found is not None and found and not any(w == found or w.startswith(found + "/") for w in walked):
                    out[dest] = Node("dir", nodes[found].mode, origin=node.origin)
                    emit(found, dest, (*walked, found))
                    continue
            out[dest] = node
            if node.kind == "dir":
                emit(real, dest, (*walked, real))

    emit("", "", ("",))
    return out


class MergedTree:
    """Packages merged into one tree, later ones over earlier ones path by path, as
    rsync -a copies each package into the layer root: a file replaces a file or a
    symlink, a directory merges with a directory and replaces a file or symlink, a
    file or symlink replaces an empty directory (a non-empty one is an error, where
    rsync says "cannot delete non-empty directory").

    ``keep_dirlinks`` (rsync -K, --keep-dirlinks): a symlink to a directory of the tree
    stays, and later contents below it land where it points. ``copy_dirlinks`` (rsync
    -k, with :func:`place_artifact`): a package's own symlinks to its directories arrive
    as directories (:func:`copy_dirlinks`). dockerTools copies contents with ``rsync
    -ak``, or ``rsync -aK`` with keepContentsDirlinks; layered images merge packages
    with neither.
    """

    def __init__(self, keep_dirlinks: bool = False, *, copy_dirlinks: bool = False) -> None:
        self.keep_dirlinks = keep_dirlinks
        self.copy_dirlinks = copy_dirlinks
        self.nodes: dict[str, Node] = {}

    def _resolve(self, path: str) -> str:
        """With keep_dirlinks: ``path`` with its leading components that are symlinks to
        directories of this tree replaced by where they lead (absolute targets from the
        image's root)."""
        if not self.keep_dirlinks or "/" not in path:
            return path
        *parents, name = path.split("/")
        current = ""
        for part in parents:
            candidate = f"{current}/{part}" if current else part
            node = self.nodes.get(candidate)
            if node is not None and node.kind == "symlink":
                found = resolve_directory(self.nodes, current, node.target)
                if found is not None:
                    current = found
                    continue
            current = candidate
        return f"{current}/{name}" if current else name

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
                    if node.kind == "symlink":  # one to a directory was resolved (keep_dirlinks)
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
                                      f"places a {node.kind} there, and a directory that holds files cannot be "
                                      "replaced (rsync: \"cannot delete non-empty directory\")")
        elif node.kind == "dir" and existing.kind == "symlink" and self.keep_dirlinks \
                and resolve_directory(self.nodes, posixpath.dirname(path), existing.target) is not None:
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
