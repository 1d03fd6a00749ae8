"""Flattening a stack of image layers into one root file system: the single owner of
how whiteouts, opaque directories, hard links, device nodes and replaced paths combine.

Every consumer of a base's layers goes through :class:`Flattener`: ``RootfsUnpack``
(root layers' base tree and owners sidecar), ``ImageExport`` (export_image's tar) and
``base_directories`` (the directories a layered image's layers must not reset). Each
reads its layer tars with :mod:`~dtbuild.plugins.builtin.tar_extract` (names, links
and kinds validated there) and decides what to keep of the result; the rules are here.

The rules, as the OCI image spec's "Representing Changes" and "Applying Changesets" say:

* A whiteout ``DIR/.wh.NAME`` hides ``DIR/NAME`` and everything below it, and an opaque
  marker ``DIR/.wh..wh..opq`` hides everything below ``DIR`` -- in the layers *below*
  only. "Files that are present in the same layer as a whiteout file can only be hidden
  by whiteout files in subsequent layers": an entry of the same layer survives its own
  layer's whiteouts wherever the marker sits in the tar, before or after it. So entries
  are applied as they arrive, each remembering which layer set it, and a marker removes
  only what lower layers set. A lower directory whose subtree still holds entries of the
  marker's layer stays, as the directory an extractor creates for them (mode 0755, owner
  0:0), exactly as if the markers had been applied first. A whiteout that names no entry
  (``.wh.``, ``.wh..``, ``.wh...``) hides nothing. Any entry whose name starts with
  ``.wh.`` is a marker, whatever its kind: the image format cannot hold such names.
* An entry replaces what was at its path, except that a directory merges with a
  directory (the new mode and owner win, the contents stay). A non-directory replacing
  a directory removes the directory's contents. A path below a non-directory turns the
  non-directory into a directory (overlayfs' rule: a directory of an upper layer hides
  a file or symlink below it); missing parents are made as 0755 directories owned by
  0:0, marked ``implicit``.
* A hard link shares the content, mode and owner of a file of the same layer stored
  before it, or of a file the layers below hold at that path (as they hold it, even if
  its own layer hides or replaces it later): the result is a copy (``tar
  --hard-dereference``), set by the link's layer.
* Character and block devices and fifos are kept as metadata (kind, mode, owner, major,
  minor); consumers decide what to do with them (the owners sidecar keeps them, an
  export keeps only 0/0 character devices).

A file's bytes are never read here: the consumer gives each file entry a *content
reference* (a store digest, an offset in a layer blob), which hard links share.
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import IO, Any

from dtbuild.plugins.builtin.tar_extract import ArchiveEntry

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

#: The mode (and, with owner 0:0, the attributes) of a directory no entry made.
IMPLICIT_DIR_MODE = 0o755


class FlattenError(ValueError):
    """A layer entry that cannot be applied (a hard link to no file)."""


@dataclass(frozen=True, slots=True)
class FlatEntry:
    """One path of a flattened root file system."""

    kind: str  # file | dir | symlink | char | block | fifo
    mode: int
    uid: int = 0
    gid: int = 0
    #: A regular file's size as its tar header gives it (0 for other kinds).
    size: int = 0
    #: The consumer's reference to a regular file's bytes (shared by its hard links).
    content: Any = None
    #: A symbolic link's target, exactly as stored.
    target: str = ""
    devmajor: int = 0
    devminor: int = 0
    #: Which layer (its index, from 0) last set this path: whiteouts hide lower layers
    #: only. Bookkeeping of the flattening, not part of the entry's value.
    layer: int = field(default=-1, compare=False)
    #: A directory that no entry made: the parent of an entry, where the layers had
    #: none (or had a non-directory, or hid their directory).
    implicit: bool = False


def tar_order(path: str) -> list[str]:
    """GNU tar ``--sort=name`` order: every directory directly followed by its contents."""
    return path.split("/")


class Flattener:
    """A root file system being built from layers applied in order (layer indexes must
    not decrease): ``nodes`` maps each path (relative, '/'-separated) to its entry.

    :param nodes: a tree to go on from (as an earlier Flattener left it); shared, not copied.
    :param keep_unresolved_links: make a hard link whose target is no file of the image a
        file without content, instead of raising (for consumers that need directories only).
    """

    def __init__(self, nodes: dict[str, FlatEntry] | None = None, *, keep_unresolved_links: bool = False) -> None:
        self.nodes: dict[str, FlatEntry] = nodes if nodes is not None else {}
        self._keep_unresolved_links = keep_unresolved_links
        self._children: dict[str, set[str]] = {}
        for path in self.nodes:
            self._children.setdefault(posixpath.dirname(path), set()).add(path)
        self._layer = -1
        #: Files of lower layers that the current layer hid or replaced: what its hard
        #: links may still share.
        self._hidden: dict[str, FlatEntry] = {}

    # ------------------------------------------------------------------ applying

    def begin_layer(self, layer: int) -> None:
        """Start applying layer ``layer`` (:meth:`apply` does it when the index changes;
        call it before reading a layer so that :meth:`holds_file` answers for it)."""
        if layer != self._layer:
            self._layer = layer
            self._hidden = {}

    def apply_layer(self, entries: Iterable[tuple[ArchiveEntry, IO[bytes] | None]], layer: int,
                    content: Callable[[ArchiveEntry, IO[bytes] | None], Any] | None = None) -> None:
        """Apply every entry of layer ``layer`` (as :func:`tar_extract.read_entries`
        yields them: read it with ``lower_files=self.holds_file``). ``content`` gives a
        regular file's content reference from its entry and stream, while the stream is
        valid; markers' bytes are never asked for.

        :raises FlattenError: for a hard link to no file.
        """
        self.begin_layer(layer)
        for entry, source in entries:
            self.apply(entry, layer, None if content is None else functools.partial(content, entry, source))

    def apply(self, entry: ArchiveEntry, layer: int, content: Callable[[], Any] | None = None) -> None:
        """Apply one entry of layer ``layer``; ``content`` is called for a regular file
        (not for a marker) and gives its content reference.

        :raises FlattenError: for a hard link to no file.
        """
        self.begin_layer(layer)
        path = entry.path
        parent, base = posixpath.split(path)
        if base == OPAQUE_MARKER:
            for child in list(self._children.get(parent, ())):
                self._hide(child)
            return
        if base.startswith(WHITEOUT_PREFIX):
            name = base[len(WHITEOUT_PREFIX):]
            if name not in ("", ".", ".."):
                self._hide(posixpath.join(parent, name))
            return
        node = self._node(entry, layer, content)
        self._make_parents(path)
        existing = self.nodes.get(path)
        if existing is not None and existing.kind == "dir" and node.kind != "dir":
            self._remove_below(path)
        self._set(path, node)

    def _node(self, entry: ArchiveEntry, layer: int, content: Callable[[], Any] | None) -> FlatEntry:
        kind = entry.kind
        if kind == "hardlink":
            source = self.link_source(entry.target)
            if source is not None:
                return replace(source, layer=layer)
            if not self._keep_unresolved_links:
                raise FlattenError(f"/{entry.path} is a hard link to /{entry.target}, which is not a file of this "
                                   "layer or of the layers below")
            return FlatEntry("file", entry.mode, entry.uid, entry.gid, layer=layer)
        if kind == "dir":
            return FlatEntry("dir", entry.mode, entry.uid, entry.gid, layer=layer)
        if kind == "symlink":
            return FlatEntry("symlink", 0o777, entry.uid, entry.gid, target=entry.target, layer=layer)
        if kind == "file":
            return FlatEntry("file", entry.mode, entry.uid, entry.gid, entry.size,
                             content() if content is not None else None, layer=layer)
        return FlatEntry(kind, entry.mode, entry.uid, entry.gid, devmajor=entry.devmajor, devminor=entry.devminor,
                         layer=layer)

    # ------------------------------------------------------------------ hard links

    def link_source(self, path: str) -> FlatEntry | None:
        """The file a hard link of the current layer to ``path`` shares: the file there
        now (of this layer, stored earlier, or of a lower layer), else the lower layers'
        file this layer hid or replaced; None when there is none."""
        node = self.nodes.get(path)
        if node is not None and node.kind == "file":
            return node
        return self._hidden.get(path)

    def holds_file(self, path: str) -> bool:
        """Whether a hard link of the current layer may share ``path`` (tar_extract's
        ``lower_files``)."""
        return self.link_source(path) is not None

    # ------------------------------------------------------------------ the tree

    def sorted_entries(self) -> Iterator[tuple[str, FlatEntry]]:
        """(path, entry) in tar order."""
        for path in sorted(self.nodes, key=tar_order):
            yield path, self.nodes[path]

    def _set(self, path: str, node: FlatEntry) -> None:
        if path not in self.nodes:
            self._children.setdefault(posixpath.dirname(path), set()).add(path)
        self.nodes[path] = node

    def _delete(self, path: str) -> None:
        node = self.nodes.pop(path)
        siblings = self._children.get(posixpath.dirname(path))
        if siblings is not None:
            siblings.discard(path)
        self._children.pop(path, None)
        if node.kind == "file" and node.layer < self._layer:
            self._hidden.setdefault(path, node)

    def _subtree(self, path: str) -> list[str]:
        """``path`` and everything below it, each directory before its contents."""
        out, stack = [], [path]
        while stack:
            p = stack.pop()
            out.append(p)
            stack.extend(self._children.get(p, ()))
        return out

    def _remove_below(self, path: str) -> None:
        for p in reversed(self._subtree(path)[1:]):
            self._delete(p)

    def _make_parents(self, path: str) -> None:
        missing = []
        parent = posixpath.dirname(path)
        while parent:
            node = self.nodes.get(parent)
            if node is not None and node.kind == "dir":
                break
            if node is not None:
                self._delete(parent)  # a non-directory: it has nothing below it
            missing.append(parent)
            parent = posixpath.dirname(parent)
        for p in missing:
            self._set(p, FlatEntry("dir", IMPLICIT_DIR_MODE, layer=self._layer, implicit=True))

    def _hide(self, path: str) -> None:
        """What a whiteout of ``path`` removes: what lower layers set at and below it.
        Entries of the current layer stay, and so do the directories above them (as
        the current layer's implicit directories)."""
        if path not in self.nodes:
            return
        kept: set[str] = set()  # paths with entries of the current layer at or below them
        for p in reversed(self._subtree(path)):  # contents before their directory
            node = self.nodes[p]
            if node.layer >= self._layer:
                kept.add(posixpath.dirname(p))
            elif p in kept:
                self.nodes[p] = FlatEntry("dir", IMPLICIT_DIR_MODE, layer=self._layer, implicit=True)
                kept.add(posixpath.dirname(p))
            else:
                self._delete(p)
