"""Action kinds that build images: LayerWrite, LayerKindWrite (the layers of layer
kinds, such as ``pure_layer``'s), LayerCompress, ImageAssemble, DockerArchive,
OciLayout and ImageImport.

An image travels between actions as an *image tree* (docs/image-tree.md) whose files
are blobs of the store: ``image.json``, ``config.json``, ``manifest.json``,
``layers/<diff_id hex>`` and ``blobs/<digest hex>``. Building one copies no layer bytes.
The documents themselves (config, manifest, index, archives) are written by
:mod:`dtbuild.plugins.builtin.imageformat`, the description by
:class:`dtbuild.plugins.image_description.ImageDescription`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import IO, Any

from dtbuild.plugins.builtin import imageformat
from dtbuild.plugins.builtin.layer_contents import (
    ContentConflict,
    DirAttrs,
    MergedTree,
    Node,
    base_directories,
    copy_dirlinks,
)
from dtbuild.plugins.builtin.layertar import LayerEntry, hashes_itself, sorted_entries, write_layer
from dtbuild.plugins.canonical import canonical_json
from dtbuild.plugins.image_description import ImageDescription, ImageDescriptionError, LayerDescriptor
from dtbuild.plugins.interfaces import (
    ActionContext,
    ActionFailed,
    ActionKind,
    CommandRequest,
    Compressor,
    InputArtifact,
    LayerMember,
    TreeEntry,
)

#: The one canonical JSON (:mod:`dtbuild.plugins.canonical`), under the name the action
#: kinds built on these use.
canonical = canonical_json


class _Hashing:
    """A write-through stream that counts and (unless ``hashing`` is off: the sink hashes
    itself) hashes what passes."""

    def __init__(self, sink: IO[bytes], *, hashing: bool = True) -> None:
        self.sink = sink
        self.hash = hashlib.sha256() if hashing else None
        self.size = 0

    def hexdigest(self) -> str:
        if self.hash is not None:
            return self.hash.hexdigest()
        return self.sink.hexdigest()  # type: ignore[attr-defined]

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.hash is not None:
            self.hash.update(data)
        n = memoryview(data).nbytes
        self.size += n
        self.sink.write(data)
        return n

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass


# --------------------------------------------------------------------------- image trees


class ImageTree:
    """Read access to an image tree input. ``compressors`` decompress the layers the
    tree holds only compressed: by default an action's registered ones (or, for a
    reader without them, the built-in ones)."""

    def __init__(self, ctx: ActionContext, artifact: InputArtifact,
                 compressors: imageformat.Compressors | None = None) -> None:
        self.ctx = ctx
        self._compressors = compressors
        self.files = {e.path: e for e in ctx.walk_tree(artifact) if e.kind == "file"}
        try:
            self.description = ImageDescription.from_json(self.read("image.json"), "the image tree's image.json")
        except ImageDescriptionError as e:
            raise ActionFailed(f"{artifact.path}: {e}") from None
        self.config_bytes = self.read("config.json")
        self.config = json.loads(self.config_bytes)
        self.manifest_bytes = self.read("manifest.json")
        self._sizes: dict[str, int] | None = None

    def entry(self, path: str) -> TreeEntry:
        """The tree's file at ``path``. ``layers/<hex>`` of a layer the tree holds only
        compressed is the plain tar written into the store from its blob first (only
        in an action; a reader gets the entry of a tar that is not stored, right in its
        digest and size): readers that stream the tar use :meth:`layer_opener` and
        :meth:`layer_size` instead, which write nothing."""
        try:
            return self.files[path]
        except KeyError:
            if path.startswith("layers/"):
                found = self._stored_layer_tar("sha256:" + path.removeprefix("layers/"))
                if found is not None:
                    return found
            raise ActionFailed(f"image tree has no {path}") from None

    def read(self, path: str) -> bytes:
        with self.ctx.open_blob(self.entry(path).digest) as f:
            return f.read()

    def _descriptor(self, diff_id: str) -> LayerDescriptor | None:
        return next((d for d in self.description.layers if d.diff_id == diff_id), None)

    def layer_sizes(self) -> dict[str, int]:
        """The sizes of the plain tars of the layers the tree holds only compressed
        (:data:`LAYER_SIZES_FILE`), by diff_id."""
        if self._sizes is None:
            self._sizes = {}
            if LAYER_SIZES_FILE in self.files:
                try:
                    doc = json.loads(self.read(LAYER_SIZES_FILE))
                    self._sizes = {str(k): int(v) for k, v in doc["sizes"].items()}
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise ActionFailed(f"the image tree's {LAYER_SIZES_FILE} is not a map of sizes") from None
        return self._sizes

    def layer_size(self, diff_id: str) -> int:
        """The size of a layer's plain tar."""
        entry = self.files.get("layers/" + diff_id.removeprefix("sha256:"))
        if entry is not None:
            return entry.size
        size = self.layer_sizes().get(diff_id)
        if size is None:
            raise ActionFailed(f"image tree has no layers/{diff_id.removeprefix('sha256:')} and no size for it")
        return size

    def layer_opener(self, diff_id: str) -> Callable[[], IO[bytes]]:
        """Opens a layer's plain tar: the stored tar, or (for a layer the tree holds only
        compressed) its blob decompressed while it is read. Either is checked against its
        digest by the store as it is read."""
        entry = self.files.get("layers/" + diff_id.removeprefix("sha256:"))
        if entry is not None:
            digest = entry.digest
            return lambda: self.ctx.open_blob(digest)
        descriptor = self._descriptor(diff_id)
        if descriptor is None or diff_id not in self.layer_sizes():
            raise ActionFailed(f"image tree has no layers/{diff_id.removeprefix('sha256:')}")
        blob = self.entry("blobs/" + descriptor.digest.removeprefix("sha256:")).digest
        media_type = descriptor.media_type

        def open_plain() -> IO[bytes]:
            compressor = self._compressor(media_type)
            source = self.ctx.open_blob(blob)
            try:
                plain = compressor.decompress_from(source)
            except BaseException:
                source.close()
                raise
            return _ClosingBoth(plain, source)  # type: ignore[return-value]

        return open_plain

    def _compressor(self, media_type: str) -> Compressor:
        compressors = self._compressors
        if compressors is None:
            compressors = (imageformat.Compressors.of(self.ctx) if hasattr(self.ctx, "compressors")
                           else imageformat.Compressors.builtin())
        try:
            name = imageformat.layer_compressor_name(media_type, compressors)
            return compressors.named(name)
        except ValueError as e:
            raise ActionFailed(f"cannot read a layer of media type {media_type!r}: {e}") from None

    def _stored_layer_tar(self, diff_id: str) -> TreeEntry | None:
        """A layer the tree holds only compressed, as the entry of its plain tar: in an
        action, the tar is written into the store from the blob (once per tree) and its
        digest checked against the diff_id; elsewhere the entry names the digest only."""
        if self._descriptor(diff_id) is None or diff_id not in self.layer_sizes():
            return None
        path = "layers/" + diff_id.removeprefix("sha256:")
        size = self.layer_sizes()[diff_id]
        put_stream = getattr(self.ctx, "put_stream", None)
        if put_stream is not None:
            with self.layer_opener(diff_id)() as plain:
                digest, written = put_stream(plain)
            if "sha256:" + digest != diff_id or written != size:
                raise ActionFailed(f"layer {diff_id} decompresses to {written} bytes with sha256:{digest}, "
                                   f"not its diff_id and size {size}")
        entry = TreeEntry(path, "file", 0o644, diff_id.removeprefix("sha256:"), size)
        self.files[path] = entry
        return entry

    def blob_opener(self, digest: str) -> Callable[[], IO[bytes]]:
        blob = self.entry("blobs/" + digest.removeprefix("sha256:")).digest
        return lambda: self.ctx.open_blob(blob)

    def tree_entries(self) -> list[TreeEntry]:
        return list(self.files.values())


class _ClosingBoth(io.RawIOBase):
    """Reads ``stream`` (a decompressor); closing closes it and then ``source`` (the blob
    it reads, which checks its digest then)."""

    def __init__(self, stream: IO[bytes], source: IO[bytes]) -> None:
        self._stream = stream
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        readinto = getattr(self._stream, "readinto", None)
        view = memoryview(buffer).cast("B")
        if readinto is not None:
            return readinto(view) or 0
        data = self._stream.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._stream.close()
        finally:
            try:
                self._source.close()
            finally:
                super().close()


#: The file of an image tree that gives the size of the plain tar of each layer the tree
#: holds only compressed (those have a ``blobs/`` entry but no ``layers/`` one). Not part
#: of the image, as :data:`LAYER_NOTES_FILE`.
LAYER_SIZES_FILE = "layer-sizes.json"


#: The file of an image tree that says, per layer dtbuild wrote, which target and packages
#: it holds (for ``dtbuild inspect``). Not part of the image: no archive, layout or push
#: carries it, so image bytes do not depend on it.
LAYER_NOTES_FILE = "layer-notes.json"


@dataclass(frozen=True, slots=True)
class LayerNote:
    """What dtbuild knows of a layer it wrote: the target it came from, the packages it
    holds, and whether it is a layered image's customisation layer."""

    label: str
    packages: tuple[str, ...] = ()
    customisation: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "packages": list(self.packages), "customisation": self.customisation}


def layer_notes(tree: ImageTree) -> dict[str, LayerNote]:
    """The notes of an image tree's layers, by diff_id ({} for trees without them, such
    as pulled and imported images, or trees of other shapes: notes are only for display)."""
    if LAYER_NOTES_FILE not in tree.files:
        return {}
    try:
        doc = json.loads(tree.read(LAYER_NOTES_FILE))
        return {diff_id: LayerNote(str(n["label"]), tuple(str(p) for p in n["packages"]), n["customisation"] is True)
                for diff_id, n in doc["layers"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def _notes_json(notes: Mapping[str, LayerNote]) -> bytes:
    return canonical({"version": 1, "layers": {diff_id: note.to_json() for diff_id, note in notes.items()}})


def image_tree_entries(ctx: ActionContext, *, description: ImageDescription, config: bytes, manifest: bytes,
                       layers: Sequence[tuple[str, str, int]], blobs: Sequence[tuple[str, str, int]],
                       notes: Mapping[str, LayerNote] | None = None,
                       layer_sizes: Mapping[str, int] | None = None) -> list[TreeEntry]:
    """Entries of an image tree. ``layers``: (diff_id, store digest of the tar, size) of
    the layers whose plain tar is stored; ``blobs``: (digest, store digest, size);
    ``notes``: :data:`LAYER_NOTES_FILE` by diff_id; ``layer_sizes``: the tar sizes of the
    layers stored only compressed (:data:`LAYER_SIZES_FILE`), by diff_id."""
    entries = []
    files = [("image.json", description.to_canonical_json()), ("config.json", config), ("manifest.json", manifest)]
    if notes:
        files.append((LAYER_NOTES_FILE, _notes_json(notes)))
    if layer_sizes:
        files.append((LAYER_SIZES_FILE, canonical({"version": 1, "sizes": dict(layer_sizes)})))
    for name, data in files:
        entries.append(TreeEntry(name, "file", 0o644, ctx.put_blob(data), len(data)))
    seen = set()
    for diff_id, digest, size in layers:
        path = "layers/" + diff_id.removeprefix("sha256:")
        if path not in seen:
            seen.add(path)
            entries.append(TreeEntry(path, "file", 0o644, digest, size))
    for blob_digest, digest, size in blobs:
        path = "blobs/" + blob_digest.removeprefix("sha256:")
        if path not in seen:
            seen.add(path)
            entries.append(TreeEntry(path, "file", 0o644, digest, size))
    return entries


def describe_image(*, label: str, repo_tags: Sequence[str], config: bytes, layers: Sequence[LayerDescriptor],
                   archive: str | None = None, oci_layout: str | None = None) -> tuple[ImageDescription, bytes]:
    """The description of an image of ``config`` and ``layers``, and its OCI manifest
    (written by :func:`imageformat.make_manifest`, whose digest the description holds)."""
    config_digest = imageformat.sha256_digest(config)
    try:
        manifest = imageformat.make_manifest(config_digest, len(config),
                                             [(d.digest, d.size, d.media_type) for d in layers], oci=True)
    except ValueError as e:
        raise ActionFailed(f"cannot write the image's manifest: {e}") from None
    description = ImageDescription(label=label, repo_tags=tuple(repo_tags),
                                   manifest_digest=imageformat.sha256_digest(manifest), config_digest=config_digest,
                                   layers=tuple(layers), archive=archive, oci_layout=oci_layout)
    return description, manifest


def write_image(ctx: ActionContext, *, description: ImageDescription, config: bytes, manifest: bytes,
                layers: Sequence[tuple[str, str, int]], blobs: Sequence[tuple[str, str, int]],
                notes: Mapping[str, LayerNote] | None = None, layer_sizes: Mapping[str, int] | None = None) -> None:
    """Write an image action's two outputs: the image tree (``image``, see
    :func:`image_tree_entries`) and NAME.json (``description``)."""
    ctx.output_tree("image", image_tree_entries(ctx, description=description, config=config, manifest=manifest,
                                                layers=layers, blobs=blobs, notes=notes, layer_sizes=layer_sizes))
    with open(ctx.output_path("description"), "wb") as f:
        f.write(description.to_json())


# --------------------------------------------------------------------------- LayerWrite


def materialize_nodes(ctx: ActionContext, nodes: Mapping[str, Node], root: str) -> dict[str, int]:
    """Write merged-tree ``nodes`` as a new directory ``root`` (files copied out of the
    store), for commands that must see them on disk. Nothing written is setuid, setgid
    or sticky (SPEC: those bits live in layer headers only), and no write follows a
    symlink; returns the full modes of the paths whose special bits were held back, for
    :func:`entries_from_directory` to give them back."""
    os.mkdir(root)
    special = {path: node.mode for path, node in nodes.items() if node.kind != "symlink" and node.mode & 0o7000}
    paths = sorted(nodes, key=lambda q: q.split("/"))
    for path in paths:
        node = nodes[path]
        full = os.path.join(root, path)
        if node.kind == "dir":
            os.makedirs(full, exist_ok=True)
        elif node.kind == "symlink":
            os.symlink(node.target, full)
        else:
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with ctx.open_blob(node.digest) as src, open(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.chmod(full, node.mode & 0o777)
    for path in reversed(paths):  # directories last, deepest first: a 0555 one must not stop the copies
        if nodes[path].kind == "dir":
            os.chmod(os.path.join(root, path), nodes[path].mode & 0o777)
    return special


def place_artifact(ctx: ActionContext, tree: MergedTree, art: InputArtifact, dest: str, label: str) -> None:
    """Add a package's artifact to ``tree`` at ``dest`` (relative; '' is the root): a
    tree's entries below it, a file or symlink at it. Nothing is copied. With the
    tree's ``copy_dirlinks`` (rsync -k), the artifact's symlinks to its own directories
    arrive as copies of those directories (absolute targets are taken from the image's
    root, as the artifact is placed)."""
    if art.is_tree:
        if tree.copy_dirlinks:
            own = MergedTree()
            place_artifact(ctx, own, art, dest, label)
            copied = copy_dirlinks(own.nodes, label)
            for path in sorted(copied, key=lambda p: p.split("/")):
                tree.add(path, copied[path])
            return
        for e in ctx.walk_tree(art):
            path = f"{dest}/{e.path}" if dest else e.path
            tree.add(path, Node(e.kind, e.mode, e.digest, e.size, e.target, label))
        return
    if not dest:
        raise ContentConflict(f"{label} places the file {art.path} at / (the image root)")
    if art.symlink is not None:
        tree.add(dest, Node("symlink", 0o777, target=art.symlink, origin=label))
    else:
        ctx.store_file(art)
        tree.add(dest, Node("file", 0o755 if art.executable else 0o644, art.digest, art.size, origin=label))


def read_base_dirs(ctx: ActionContext) -> dict[str, DirAttrs]:
    """The base image's directories: from a ``base_dirs`` input (BaseDirectories'
    JSON) when there is one, else from the ``base`` image tree's layers, else none."""
    if ctx.inputs("base_dirs"):
        with ctx.open_input(ctx.inputs("base_dirs")[0]) as f:
            doc = json.loads(f.read())
        return {path: DirAttrs(*attrs) for path, attrs in doc["directories"].items()}
    if ctx.inputs("base"):
        base = ImageTree(ctx, ctx.inputs("base")[0])
        return base_directories(
            opener() for opener in (base.layer_opener(d) for d in base.config["rootfs"]["diff_ids"]))
    return {}


def write_layer_outputs(ctx: ActionContext, entries: Iterable[LayerEntry], *, packages: Sequence[str],
                        compressor_name: str | None = None, keep_tar: bool = False) -> None:
    """Write a layer action's outputs from its members, in one pass that writes each
    byte once: without ``compressor_name``, ``tar`` (sorted, streamed into the store,
    which hashes it: that is its diff_id); with it, ``blob`` (the tar hashed for its
    diff_id and compressed on the way; no uncompressed copy is kept: readers that need
    the plain tar decompress the blob, see :meth:`ImageTree.layer_opener`) and
    ``blob_meta`` (and ``tar`` too with ``keep_tar``, for a rule that declared both);
    and ``meta`` (``{"diff_id", "size", "packages"}``, the size of the tar) in both cases."""
    try:
        ordered = sorted_entries(entries)
    except ValueError as e:
        raise ActionFailed(str(e)) from None
    if compressor_name and keep_tar:
        with ctx.output_writer("tar") as out, ctx.output_writer("blob") as blob_out:
            digests = write_layer(ordered, tar_out=out, compressor=ctx.compressor(compressor_name),
                                  blob_out=blob_out)
    elif compressor_name:
        with ctx.output_writer("blob") as blob_out:
            digests = write_layer(ordered, compressor=ctx.compressor(compressor_name), blob_out=blob_out)
    else:
        with ctx.output_writer("tar") as out:
            digests = write_layer(ordered, tar_out=out, compressor=None, blob_out=None)
    meta = {"diff_id": digests.diff_id, "size": digests.tar_size, "packages": list(packages)}
    with open(ctx.output_path("meta"), "wb") as f:
        f.write(canonical(meta))
    if compressor_name:
        blob_meta = {"digest": digests.blob_digest, "size": digests.blob_size, "media_type": digests.media_type,
                     "diff_id": digests.diff_id}
        with open(ctx.output_path("blob_meta"), "wb") as f:
            f.write(canonical(blob_meta))


class LayerWrite(ActionKind):
    """A deterministic layer tar from packages (and extra_commands), streamed into the
    store while its diff_id is computed. Optional parameters ``uname``/``gname`` name
    the owners in the tar headers (numeric owners only by default)."""

    NAME = "LayerWrite"
    #: 2: a layer written with a compressor has no ``tar`` output (its blob only).
    VERSION = "2"

    def run(self, ctx: ActionContext) -> None:
        entries, packages = self.package_entries(ctx, ctx.params)
        write_layer_outputs(ctx, entries, packages=packages, compressor_name=ctx.params.get("compressor"),
                            keep_tar=bool(ctx.params.get("keep_tar")))

    @classmethod
    def package_entries(cls, ctx: ActionContext, params: Mapping[str, Any]) -> tuple[list[LayerEntry], list[str]]:
        """The members of a layer of placed packages (``params``: placements, uid, gid,
        keep_contents_dirlinks, extra_commands, optional copy_dirlinks, uname/gname; input slots
        ``contents`` and ``base_dirs``/``base``), and the labels of the packages placed."""
        uid, gid = params["uid"], params["gid"]
        # copy_dirlinks: rsync -k, the image rules' default (keep_contents_dirlinks = False).
        tree = MergedTree(keep_dirlinks=params["keep_contents_dirlinks"],
                          copy_dirlinks=bool(params.get("copy_dirlinks")))
        contents = ctx.inputs("contents")
        packages: list[str] = []
        try:
            for index, dest, label in params["placements"]:
                if label not in packages:
                    packages.append(label)
                cls._place(ctx, tree, contents[index], dest.strip("/"), label)
        except ContentConflict as e:
            raise ActionFailed(str(e)) from None
        base_dirs = read_base_dirs(ctx)
        if params["extra_commands"]:
            entries = cls._run_extra_commands(ctx, tree, params["extra_commands"], uid, gid)
        else:
            entries = cls._entries(ctx, tree, uid, gid)
        if base_dirs:
            entries = [cls._with_base_dir(e, base_dirs) for e in entries]
        uname, gname = params.get("uname", ""), params.get("gname", "")
        if uname or gname:
            from dataclasses import replace

            entries = [replace(e, uname=uname, gname=gname) for e in entries]
        return entries, packages

    @staticmethod
    def _with_base_dir(entry: LayerEntry, base_dirs: dict[str, Any]) -> LayerEntry:
        if entry.kind != "dir" or entry.path not in base_dirs:
            return entry
        attrs = base_dirs[entry.path]
        from dataclasses import replace

        return replace(entry, mode=attrs.mode, uid=attrs.uid, gid=attrs.gid)

    _place = staticmethod(place_artifact)

    @staticmethod
    def _entries(ctx: ActionContext, tree: MergedTree, uid: int, gid: int) -> list[LayerEntry]:
        out = []
        nodes, open_blob = tree.nodes, ctx.open_blob
        for path in tree.sorted_paths():
            node = nodes[path]
            if node.kind == "file":
                out.append(LayerEntry(path=path, kind="file", mode=node.mode, uid=uid, gid=gid, size=node.size,
                                      open=functools.partial(open_blob, node.digest)))
            elif node.kind == "dir":
                out.append(LayerEntry(path=path, kind="dir", mode=node.mode, uid=uid, gid=gid))
            else:
                out.append(LayerEntry(path=path, kind="symlink", mode=0o777, uid=uid, gid=gid, linkname=node.target))
        return out

    @staticmethod
    def _run_extra_commands(ctx: ActionContext, tree: MergedTree, commands: str, uid: int,
                            gid: int) -> list[LayerEntry]:
        root = os.path.join(ctx.scratch_dir, "root")
        special = materialize_nodes(ctx, tree.nodes, root)
        home = os.path.join(ctx.scratch_dir, "home")
        os.mkdir(home)
        result = ctx.run_command(CommandRequest(
            argv=["/bin/bash", "-c", "set -e -o pipefail\numask 022\n" + commands], cwd=root,
            env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home,
                 "TMPDIR": ctx.scratch_dir, "LANG": "C.UTF-8", "TZ": "UTC", "SOURCE_DATE_EPOCH": "1",
                 "out": root},
            # The action's scratch directory (the root, HOME, TMPDIR): where the executor
            # sandboxes commands, all they may write.
            writable=[ctx.scratch_dir]))
        if result.exit_code != 0:
            raise ActionFailed(f"extra_commands exited with status {result.exit_code}", output_tail=result.output,
                               exit_code=result.exit_code, command=commands)
        return list(entries_from_directory(root, uid, gid, special))


def entries_from_directory(root: str, uid: int | None, gid: int | None,
                           special: Mapping[str, int] | None = None) -> Iterator[LayerEntry]:
    """Layer entries for a directory on disk, in tar order; hard links kept as such.
    Owners are ``uid``/``gid`` when given, else the files' own. ``special`` holds full
    modes held back from disk (:func:`materialize_nodes`): a path whose mode the commands
    left as written gets its setuid, setgid and sticky bits back."""
    special = special or {}
    seen_inodes: dict[tuple[int, int], str] = {}

    def walk(directory: str, prefix: str) -> Iterator[LayerEntry]:
        with os.scandir(directory) as it:
            names = sorted(e.name for e in it)
        for name in names:
            full = os.path.join(directory, name)
            rel = prefix + name
            st = os.lstat(full)
            owner = (uid if uid is not None else st.st_uid, gid if gid is not None else st.st_gid)
            mode = stat.S_IMODE(st.st_mode)
            held = special.get(rel)
            if held is not None and held & 0o777 == mode and not stat.S_ISLNK(st.st_mode):
                mode = held
            if stat.S_ISDIR(st.st_mode):
                yield LayerEntry(path=rel, kind="dir", mode=mode, uid=owner[0], gid=owner[1])
                yield from walk(full, rel + "/")
            elif stat.S_ISLNK(st.st_mode):
                yield LayerEntry(path=rel, kind="symlink", mode=0o777, uid=owner[0], gid=owner[1],
                                 linkname=os.readlink(full))
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen_inodes:
                    yield LayerEntry(path=rel, kind="hardlink", mode=mode, uid=owner[0], gid=owner[1],
                                     linkname=seen_inodes[key])
                    continue
                seen_inodes[key] = rel
                yield LayerEntry(path=rel, kind="file", mode=mode, uid=owner[0], gid=owner[1], size=st.st_size,
                                 open=lambda p=full: open(p, "rb"))  # noqa: SIM115 - the tar writer closes it
            else:
                raise ActionFailed(f"/{rel}: only files, directories and symlinks can go into a layer")

    yield from walk(root, "")


# --------------------------------------------------------------------------- layer kinds


class LayerKindWrite(ActionKind):
    """The layer of a target of a layer kind (the rule the engine made from it): the
    kind's ``entries(ctx, attrs)``, with the parent directories it left out, written by
    :func:`write_layer_outputs` exactly as LayerWrite writes its layers."""

    NAME = "LayerKindWrite"
    #: 2: a hard link that sorts before its target is turned around (layertar).
    VERSION = "2"

    def run(self, ctx: ActionContext) -> None:
        params = ctx.params
        name = params["layer_kind"]
        kind = ctx.layer_kind(name)
        attrs: dict[str, Any] = dict(params["attrs"])
        for slot in params["slots"]:
            attrs[slot] = tuple(ctx.inputs(slot))
        try:
            entries = [layer_entry(ctx, item) for item in kind.entries(ctx, MappingProxyType(attrs))]
            entries = with_parent_directories(entries)
            write_layer_outputs(ctx, entries, packages=params["packages"])
        except ValueError as e:  # a bad member (path, kind, owner) or two with one path
            raise ActionFailed(f"the layer kind {name!r} gave a bad layer entry: {e}") from None


def layer_entry(ctx: ActionContext, item: LayerMember | LayerEntry) -> LayerEntry:
    """The tar member for what a layer kind's ``entries()`` yielded: a
    :class:`LayerMember` (or, from built-in kinds, a ready :class:`LayerEntry`)."""
    if isinstance(item, LayerEntry):
        return item
    if not isinstance(item, LayerMember):
        raise ValueError(f"{item!r} is not a dtbuild.plugins.interfaces.LayerMember")
    path = item.path.removeprefix("/")
    if not isinstance(item.mode, int) or not 0 <= item.mode <= 0o7777:
        raise ValueError(f"/{path}: mode {item.mode!r} is not a permission mode (0 to 0o7777)")
    from dataclasses import replace

    base = LayerEntry(path=path, kind="file", mode=item.mode, uid=item.uid, gid=item.gid)
    if item.kind == "dir":
        return replace(base, kind="dir")
    if item.kind in ("symlink", "hardlink"):
        if not item.target:
            raise ValueError(f"/{path}: a {item.kind} needs a target")
        if item.kind == "symlink":
            return replace(base, kind="symlink", mode=0o777, linkname=item.target)
        return replace(base, kind="hardlink", linkname=item.target.removeprefix("/"))
    if item.kind != "file":
        raise ValueError(f"/{path}: kind {item.kind!r} is not one of file, dir, symlink, hardlink")
    given = [what for what, value in (("data", item.data), ("source", item.source), ("digest", item.digest or None))
             if value is not None]
    if len(given) > 1:
        raise ValueError(f"/{path}: a file's bytes come from one of data, source or digest, not {' and '.join(given)}")
    if item.data is not None:
        data = bytes(item.data)
        return replace(base, size=len(data), open=lambda: io.BytesIO(data))
    if item.source is not None:
        art = item.source
        if art.is_tree or art.symlink is not None:
            raise ValueError(f"/{path}: source {art.path} is a {'directory' if art.is_tree else 'symlink'}, "
                             "not a file (walk a tree with ctx.walk_tree and yield its files)")
        return replace(base, size=art.size, open=lambda: ctx.open_input(art))
    if item.digest:
        digest = item.digest
        return replace(base, size=item.size, open=lambda: ctx.open_blob(digest))
    return base


def with_parent_directories(entries: Sequence[LayerEntry]) -> list[LayerEntry]:
    """``entries`` and a 0755 root:root directory for each parent none of them is."""
    paths = {e.path for e in entries}
    added: list[LayerEntry] = []
    for entry in entries:
        parts = entry.path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in paths:
                paths.add(parent)
                added.append(LayerEntry(path=parent, kind="dir", mode=0o755))
    return [*entries, *added]


# --------------------------------------------------------------------------- LayerCompress


class LayerCompress(ActionKind):
    NAME = "LayerCompress"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        tar = ctx.inputs("tar")[0]
        with ctx.open_input(ctx.inputs("meta")[0]) as f:
            layer_meta = json.loads(f.read())
        compressor = ctx.compressor(ctx.params["compressor"])
        with ctx.output_writer("blob") as out:
            # The store's writer hashes the blob; another writer is hashed here.
            hashing = _Hashing(out, hashing=not hashes_itself(out))
            stream = compressor.compress_to(hashing)  # type: ignore[arg-type]
            with ctx.open_input(tar) as src:
                while chunk := src.read(1 << 20):
                    stream.write(chunk)
            stream.close()
        meta = {"digest": "sha256:" + hashing.hexdigest(), "size": hashing.size,
                "media_type": compressor.OCI_LAYER_MEDIA_TYPE, "diff_id": layer_meta["diff_id"]}
        with open(ctx.output_path("meta"), "wb") as f:
            f.write(canonical(meta))


# --------------------------------------------------------------------------- ImageAssemble


#: Config fields whose value is a set of keys: the base's keys stay, the image's are added.
MERGED_BY_KEY = ("Labels", "ExposedPorts", "Volumes")


def merge_config(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The base image's config with the image's ``new`` fields applied, as
    docs/image-config.md says: Env by variable name (the base's variables stay in their
    order, one set again takes the new value in its place, new ones follow in the
    image's order); Labels, ExposedPorts and Volumes by key; every other field the
    image sets replaces the base's (Healthcheck as a whole). As in a Dockerfile, an
    Entrypoint set without a Cmd drops the base's Cmd (it was the base entrypoint's
    arguments), and the base's OnBuild triggers are not inherited (Docker runs them when
    it builds from the base, then drops them). A field set to None drops the base's."""
    merged = {key: value for key, value in base.items() if key != "OnBuild"}
    if "Entrypoint" in new and "Cmd" not in new:
        merged.pop("Cmd", None)
    for key, value in new.items():
        if value is None:
            merged.pop(key, None)
        elif key == "Env":
            values = {item.split("=", 1)[0]: item for item in value}
            env = [values.pop(item.split("=", 1)[0], item) for item in base.get("Env") or []]
            merged["Env"] = env + [item for item in value if values.get(item.split("=", 1)[0]) == item]
        elif key in MERGED_BY_KEY and isinstance(base.get(key), dict):
            merged[key] = {**base[key], **value}
        else:
            merged[key] = value
    return merged


#: Past this many layers Docker's overlay2 storage driver refuses to run an image (it
#: stacks at most 128 overlayfs lower directories: "max depth exceeded"): a warning.
OVERLAY_LAYER_WARNING = 127
#: ``[image] max_layers`` unless dtbuild.toml says otherwise: the kernel's overlayfs stack
#: limit (OVL_MAX_STACK), which podman's and containerd's overlay storage hit.
DEFAULT_MAX_LAYERS = 500


def check_layer_count(ctx: ActionContext, label: str, count: int) -> None:
    """Warn past :data:`OVERLAY_LAYER_WARNING` layers; fail past ``[image] max_layers``
    (docs/configuration.md), naming the fix.

    :raises ActionFailed: past the limit, or for a limit that is not a positive integer.
    """
    limit = ctx.settings.setting("image", "max_layers", DEFAULT_MAX_LAYERS)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ActionFailed(f"{ctx.settings.origin('image', 'max_layers')} must be a positive integer "
                           "(the most layers an image may have)")
    fix = ("put fewer layers in it: a layered_image's max_layers merges the least popular packages into one, "
           "and a base image with fewer layers (export_image, then image_archive) helps too")
    if count > limit:
        raise ActionFailed(f"{label} has {count} layers, more than [image] max_layers = {limit} allows (the most "
                           f"your container runtime stacks); {fix}, or raise [image] max_layers in dtbuild.toml "
                           "if your runtime takes more")
    if count > OVERLAY_LAYER_WARNING:
        ctx.log(f"warning: {label} has {count} layers; Docker's overlay2 storage runs at most "
                f"{OVERLAY_LAYER_WARNING} (\"max depth exceeded\"): {fix}")


class ImageAssemble(ActionKind):
    """The image tree of a built image: the base's layers and config, then the new
    layers, the config merged (:func:`merge_config`), the layer count checked
    (:func:`check_layer_count`)."""

    NAME = "ImageAssemble"
    #: 2: image trees carry layer-notes.json (for inspect); image bytes are unchanged.
    #: 3: compressed layers are in the tree as blobs only (sizes in layer-sizes.json).
    #: 4: the config merge: Env in place, Healthcheck whole, Entrypoint drops the base's
    #: Cmd, OnBuild not inherited, None drops a field.
    VERSION = "4"

    def run(self, ctx: ActionContext) -> None:
        p = ctx.params
        created = p["created"]
        if created == "now":
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        base = ImageTree(ctx, ctx.inputs("base")[0]) if ctx.inputs("base") else None
        base_config = base.config if base else {}
        diff_ids: list[str] = list(base_config.get("rootfs", {}).get("diff_ids", []))
        history = [h for h in base_config.get("history", [])]
        if sum(1 for h in history if not h.get("empty_layer")) != len(diff_ids):
            # A base whose history does not match its layers would make registries reject the
            # manifest; give each base layer one entry instead.
            history = [{"created": base_config.get("created", created), "created_by": "base image layer"}
                       for _ in diff_ids]
        descriptors: list[LayerDescriptor] = list(base.description.layers) if base else []
        layer_files: list[tuple[str, str, int]] = []
        blob_files: list[tuple[str, str, int]] = []
        layer_sizes: dict[str, int] = {}  # of the layers stored only compressed
        if base:
            for d in descriptors:
                tar_entry = base.files.get("layers/" + d.diff_id[7:])
                if tar_entry is not None:
                    layer_files.append((d.diff_id, tar_entry.digest, tar_entry.size))
                else:
                    layer_sizes[d.diff_id] = base.layer_size(d.diff_id)
                blob_files.append((d.digest, base.entry("blobs/" + d.digest[7:]).digest,
                                   base.entry("blobs/" + d.digest[7:]).size))
        new_history: list[dict[str, Any]] = []
        notes: dict[str, LayerNote] = dict(layer_notes(base)) if base else {}
        tars = ctx.inputs("layer_tars")
        metas = ctx.inputs("layer_metas")
        blobs = ctx.inputs("blobs")
        blob_metas = ctx.inputs("blob_metas")
        if not blobs and len(tars) != len(metas):
            raise ActionFailed(f"internal error: {len(metas)} layers but {len(tars)} layer tars")
        for i, meta_art in enumerate(metas):
            with ctx.open_input(meta_art) as f:
                meta = json.loads(f.read())
            diff_ids.append(meta["diff_id"])
            packages = ", ".join(meta.get("packages", [])) or "no packages"
            new_history.append({"created": created, "created_by": f"dtbuild {p['layer_labels'][i]} ({packages})",
                                "comment": "dtbuild"})
            # layered_image labels its last layer "LABEL customisation" (rules/builtin/layered.py).
            notes.setdefault(meta["diff_id"], LayerNote(
                p["layer_labels"][i], tuple(meta.get("packages", [])),
                customisation=p["layer_labels"][i].endswith(" customisation")))
            if blobs:
                # A compressed layer is stored as its blob only: readers of the plain tar
                # decompress it (ImageTree.layer_opener).
                with ctx.open_input(blob_metas[i]) as f:
                    bmeta = json.loads(f.read())
                descriptors.append(LayerDescriptor(digest=bmeta["digest"], diff_id=meta["diff_id"],
                                                   size=bmeta["size"], media_type=bmeta["media_type"]))
                blob_files.append((bmeta["digest"], blobs[i].digest, blobs[i].size))
                layer_sizes[meta["diff_id"]] = meta["size"]
            else:
                tar = tars[i]
                layer_files.append((meta["diff_id"], tar.digest, tar.size))
                descriptors.append(LayerDescriptor(digest=meta["diff_id"], diff_id=meta["diff_id"], size=meta["size"],
                                                   media_type=imageformat.PLAIN_LAYER_MEDIA_TYPE))
                blob_files.append((meta["diff_id"], tar.digest, tar.size))
        check_layer_count(ctx, p["label"], len(diff_ids))
        try:
            config_bytes = imageformat.make_config(
                p["architecture"], p["os"], merge_config(base_config.get("config") or {}, p["config"]), diff_ids,
                new_history, created, inherited_history=history)
        except ValueError as e:
            raise ActionFailed(f"cannot write the image config: {e}") from None
        tag = p["tag"] or imageformat.content_tag(imageformat.sha256_digest(config_bytes))
        description, manifest_bytes = describe_image(
            label=p["label"], repo_tags=[f"{p['repository']}:{tag}"], config=config_bytes, layers=descriptors,
            archive=p.get("archive"), oci_layout=p.get("oci_layout"))
        write_image(ctx, description=description, config=config_bytes, manifest=manifest_bytes, layers=layer_files,
                    blobs=blob_files, notes={d.diff_id: notes[d.diff_id] for d in descriptors if d.diff_id in notes},
                    layer_sizes={d.diff_id: layer_sizes[d.diff_id] for d in descriptors
                                 if d.diff_id in layer_sizes and not any(f[0] == d.diff_id for f in layer_files)})


# --------------------------------------------------------------------------- outputs


def archive_images(ctx: ActionContext,
                   compressors: imageformat.Compressors | None = None) -> list[imageformat.ArchiveImage]:
    """The images of the ``images`` input slot, to write as a docker-archive (``compressors``
    as :class:`ImageTree` takes them)."""
    images = []
    for art in ctx.inputs("images"):
        tree = ImageTree(ctx, art, compressors)
        layers = []
        for d in tree.description.layers:
            blob = tree.blob_opener(d.digest) if d.compressed else None
            layers.append(imageformat.ArchiveLayer(
                diff_id=d.diff_id, tar_size=tree.layer_size(d.diff_id), open_tar=tree.layer_opener(d.diff_id),
                open_blob=blob, blob_media_type=d.media_type))
        images.append(imageformat.ArchiveImage(config=tree.config_bytes, repo_tags=list(tree.description.repo_tags),
                                               layers=layers))
    return images


class DockerArchive(ActionKind):
    NAME = "DockerArchive"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        compressor = ctx.compressor(ctx.params["compressor"])
        with ctx.output_writer("archive") as out:
            imageformat.write_docker_archive(out, archive_images(ctx), compressor)


class OciLayout(ActionKind):
    NAME = "OciLayout"
    #: 2: index.json gives each manifest its platform (layouts cached before are rebuilt).
    VERSION = "2"

    def run(self, ctx: ActionContext) -> None:
        # The layout's files are the image trees' blobs: nothing is copied.
        images: list[imageformat.OciImage] = []
        stored: dict[str, TreeEntry] = {}  # blob digest -> the tree entry holding it
        for art in ctx.inputs("images"):
            tree = ImageTree(ctx, art)
            images.append(imageformat.OciImage(tree.manifest_bytes, tree.config_bytes, tree.description.repo_tags))
            for name in ("config.json", "manifest.json"):
                stored.setdefault("sha256:" + tree.entry(name).digest, tree.entry(name))
            for d in tree.description.layers:
                stored.setdefault(d.digest, tree.entry("blobs/" + d.digest[7:]))
        try:
            plan = imageformat.plan_oci_layout(images)
        except ValueError as e:
            raise ActionFailed(f"cannot write the OCI layout: {e}") from None
        entries = []
        for digest in [d for d, _ in plan.documents] + list(plan.layer_blobs):
            entry = stored[digest]
            entries.append(TreeEntry("blobs/sha256/" + digest[7:], "file", 0o644, entry.digest, entry.size))
        for name, data in (("index.json", plan.index), ("oci-layout", plan.oci_layout)):
            entries.append(TreeEntry(name, "file", 0o644, ctx.put_blob(data), len(data)))
        ctx.output_tree("layout", entries)


class ImageImport(ActionKind):
    """An image from a docker-archive, OCI archive or OCI layout, as an image tree: the
    one ``image_name``/``tag`` name (parameters present only when the rule gives them),
    else the one at ``index``."""

    NAME = "ImageImport"
    #: 2: Docker layer media types of an OCI layout are written as their OCI equivalents.
    VERSION = "2"

    def run(self, ctx: ActionContext) -> None:
        src = ctx.inputs("src")[0]
        path = ctx.materialize(src, os.path.join(ctx.scratch_dir, "src", os.path.basename(src.path)))
        dest = os.path.join(ctx.scratch_dir, "extracted")
        os.mkdir(dest)
        try:
            images = imageformat.extract_image_archive(path, dest, imageformat.Compressors.of(ctx))
        except (ValueError, OSError) as e:
            raise ActionFailed(f"cannot read {src.path} as a docker-archive or OCI image: {e}") from None
        try:
            index = imageformat.pick_archive_image(
                [image.repo_tags for image in images], image_name=ctx.params.get("image_name"),
                tag=ctx.params.get("tag"), index=ctx.params["index"], what=src.path)
        except ValueError as e:
            raise ActionFailed(str(e)) from None
        image = images[index]
        compressors = imageformat.Compressors.of(ctx)
        layer_files: list[tuple[str, str, int]] = []
        blob_files: list[tuple[str, str, int]] = []
        descriptors: list[LayerDescriptor] = []
        for layer in image.layers:
            digest, size = ctx.put_file(layer.tar_path)
            layer_files.append((layer.diff_id, digest, size))
            if layer.blob_path is not None:
                bdigest, bsize = ctx.put_file(layer.blob_path)
                blob_files.append(("sha256:" + bdigest, bdigest, bsize))
                # The image's manifest is OCI: a Docker layer type (an OCI layout may list
                # them) is written as its OCI equivalent, in the manifest and the description.
                try:
                    media_type = imageformat.oci_layer_media_type(layer.media_type, compressors)
                except ValueError as e:
                    raise ActionFailed(f"{src.path}: layer {layer.diff_id}: {e}") from None
                descriptors.append(LayerDescriptor(digest="sha256:" + bdigest, diff_id=layer.diff_id, size=bsize,
                                                   media_type=media_type))
            else:
                blob_files.append((layer.diff_id, digest, size))
                descriptors.append(LayerDescriptor(digest=layer.diff_id, diff_id=layer.diff_id, size=size,
                                                   media_type=imageformat.PLAIN_LAYER_MEDIA_TYPE))
        # An imported image writes no archive or layout of its own: its description has neither.
        description, manifest = describe_image(label=ctx.params["label"], repo_tags=image.repo_tags,
                                               config=image.config, layers=descriptors)
        write_image(ctx, description=description, config=image.config, manifest=manifest, layers=layer_files,
                    blobs=blob_files)


IMAGE_ACTION_KINDS = [LayerWrite, LayerKindWrite, LayerCompress, ImageAssemble, DockerArchive, OciLayout, ImageImport]
