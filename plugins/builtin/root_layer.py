"""Root layers (dockerTools' mkRootLayer / runWithOverlay): the action kinds
``RootfsUnpack`` and ``RootLayerWrite``, the job they hand to an executor, and the
conversion of an overlay's upper directory into a layer.

How a root layer is built (docs/root-layers.md tells the whole story):

1. ``RootfsUnpack`` flattens the base image's layers (whiteouts applied) into a tree of
   the store, plus an *owners sidecar*: trees hold files, directories and symlinks with
   their modes, but not owners or device nodes, so those go into a JSON file next to
   the tree (:data:`OWNERS_FORMAT`). It is cached like any action: a new script does not
   unpack the base again.
2. ``RootLayerWrite`` materializes the tree as the overlay's lower directory, places
   ``copy_to_root`` in a *seed* directory (the upper directory's first contents) and
   hands a :class:`RootLayerJob` to an executor through
   :class:`RootLayerRequest` (``ctx.run_command``). The executor (``namespace`` or
   ``vm``) applies the owners, mounts the overlay, runs the script as root chrooted in
   it, runs ``extra_commands`` in the upper directory and packs the upper directory
   with :func:`pack_upper_directory` (read on disk) or :func:`pack_upper_tar` (a tar of
   it, from the VM) into the layer tar.
3. Packing (:func:`upper_layer_entries`) converts overlayfs' markers into the image
   format's: a 0/0 character device (overlayfs' whiteout, often many hard links to one
   inode) becomes an empty file ``.wh.NAME``; a directory with an opaque xattr
   (``trusted.overlay.opaque``, ``user.overlay.opaque``) gets an empty
   ``.wh..wh..opq`` file. Neither the device nor the xattr is ever copied, and markers
   that hide nothing in the lower directory are dropped, so every executor and overlay
   implementation gives the same bytes.

This module also runs as a program (``python -m dtbuild.plugins.builtin.root_layer
prepare|remove ...``) so that executors can run these steps inside a user
namespace, where the owners the script set are visible as they are in the image.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Protocol

from dtbuild.plugins.builtin import tar_extract
from dtbuild.plugins.builtin.flatten import OPAQUE_MARKER, WHITEOUT_PREFIX, Flattener, FlattenError
from dtbuild.plugins.builtin.image_actions import materialize_nodes, place_artifact
from dtbuild.plugins.builtin.layer_contents import ContentConflict, MergedTree
from dtbuild.plugins.builtin.layertar import LayerDigests, LayerEntry, sorted_entries, write_layer
from dtbuild.plugins.builtin.tar_extract import ArchiveEntry
from dtbuild.plugins.builtin.toolbox import TOOLBOX_BIN, HostVersion, build_toolbox, toolbox_fingerprint
from dtbuild.plugins.interfaces import (
    ActionContext,
    ActionFailed,
    ActionKind,
    CommandRequest,
    LayerKind,
    TreeEntry,
)

#: The ``format`` field of the owners sidecar written by RootfsUnpack::
#:
#:     {"format": "dtbuild-rootfs-owners/1",
#:      "owners": [[path, uid, gid], ...],          # every entry not owned by 0:0
#:      "specials": [[path, kind, mode, uid, gid, major, minor], ...]}  # char, block, fifo
#:
#: Paths are relative to the root, sorted; the tree itself holds every file, directory
#: and symlink with its mode (setuid/setgid/sticky bits included).
OWNERS_FORMAT = "dtbuild-rootfs-owners/1"

#: The xattrs overlayfs (and fuse-overlayfs) mark an opaque directory with.
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")

#: The environment of the run_as_root script (inside the chroot): the toolbox's programs
#: come last on PATH, so the image's own tools win.
SCRIPT_ENV = {
    "PATH": f"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{TOOLBOX_BIN}",
    "HOME": "/root",
    "SOURCE_DATE_EPOCH": "1",
    "TZ": "UTC",
}

#: What an executor that knows nothing of root layers (``local``) would run.
_NO_ROOT_LAYERS_ARGV = ("/bin/sh", "-c",
                        "echo 'this executor cannot build root layers: use executor = \"namespace\" or \"vm\"' >&2;"
                        " exit 70")

_SMALL_FILE = 1 << 20

#: The mode of every directory a root layer works in (scratch, job, home, tmp).
PRIVATE_MODE = 0o700


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True, slots=True)
class RootLayerJob:
    """Everything an executor needs to build one root layer. Paths are absolute; the
    directories exist when the executor gets the job."""

    #: A private directory for the executor's own files (job.json, status.json, logs).
    job_dir: str
    #: The base's root file system as the lower directory: files owned by the invoking
    #: user until the executor applies ``owners``.
    lower: str
    #: The owners sidecar (:data:`OWNERS_FORMAT`) of ``lower``.
    owners: str
    #: copy_to_root, placed: the upper directory's first contents.
    seed: str
    seed_uid: int
    seed_gid: int
    script: str
    extra_commands: str
    network: bool
    disk_size: int
    memory_size: int
    #: Where the packed layer tar goes, and its {"diff_id", "size"}.
    layer_tar: str
    layer_meta: str
    #: The toolbox (:mod:`~dtbuild.plugins.builtin.toolbox`), mounted read-only at
    #: ``/.dtbuild-toolbox`` for the script; "" for none.
    toolbox: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> RootLayerJob:
        return RootLayerJob(**{k: data[k] for k in RootLayerJob.__dataclass_fields__ if k in data})

    def save(self, path: str, **extra: Any) -> None:
        with open(path, "w") as f:
            json.dump({**self.to_json(), **extra}, f, indent=1, sort_keys=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class RootLayerRequest(CommandRequest):
    """A :class:`CommandRequest` that asks for a root layer. Executors that build root
    layers (``namespace``, ``vm``) recognise it; any other runs ``argv``, which fails
    with a message saying which executors can."""

    job: RootLayerJob
    #: Progress lines for the user (the action's ``ctx.log``).
    log: Callable[[str], None] = field(default=lambda message: None, compare=False)


def write_status(job_dir: str, stage: str, exit_code: int, message: str = "") -> None:
    """Record how the job ended: ``stage`` is prepare, mount, run_as_root,
    extra_commands, pack or done."""
    path = os.path.join(job_dir, "status.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"stage": stage, "exit_code": exit_code, "message": message}, f)
    os.replace(path + ".tmp", path)


def read_status(job_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(job_dir, "status.json")) as f:
            status: dict[str, Any] = json.load(f)
            return status
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- flattening a base


def _member_path(name: str) -> str | None:
    path = posixpath.normpath("/" + name).lstrip("/")
    return path or None


class RootfsState:
    """A root file system being built from layer tars, applied in order by
    :class:`~dtbuild.plugins.builtin.flatten.Flattener` (the OCI image spec's whiteout
    rules, overlayfs' rule that a directory hides a non-directory below it), kept as a
    tree plus the owners sidecar."""

    def __init__(self) -> None:
        self.flat = Flattener()

    def begin_layer(self, layer: int) -> None:
        """Start layer ``layer``, so that :meth:`holds_file` answers for it."""
        self.flat.begin_layer(layer)

    def apply(self, entry: ArchiveEntry, layer: int, content: Callable[[], tuple[str, int]]) -> None:
        """Apply one entry of layer number ``layer`` (validated by tar_extract, which
        leaves whiteouts to the flattener); ``content`` stores a regular file's bytes
        and returns (digest, size)."""
        try:
            self.flat.apply(entry, layer, content)
        except FlattenError as e:
            raise ActionFailed(f"base image layer {layer}: {e}") from None

    def holds_file(self, path: str) -> bool:
        """Whether a hard link of the layer being applied may share ``path``."""
        return self.flat.holds_file(path)

    def tree_entries(self) -> list[TreeEntry]:
        out = []
        for path, n in self.flat.sorted_entries():
            if n.kind == "file":
                digest, size = n.content
                out.append(TreeEntry(path, "file", n.mode, digest, size))
            elif n.kind == "dir":
                out.append(TreeEntry(path, "dir", n.mode))
            elif n.kind == "symlink":
                out.append(TreeEntry(path, "symlink", 0o777, target=n.target))
        return out

    def owners(self) -> dict[str, Any]:
        owners, specials = [], []
        for path, n in self.flat.sorted_entries():
            if n.kind in tar_extract.SPECIAL_KINDS:
                specials.append([path, n.kind, n.mode, n.uid, n.gid, n.devmajor, n.devminor])
            elif (n.uid, n.gid) != (0, 0):
                owners.append([path, n.uid, n.gid])
        return {"format": OWNERS_FORMAT, "owners": owners, "specials": specials}


class RootfsUnpack(ActionKind):
    """The flattened root file system of a base image (and of extra layers on top of it)
    as a tree, with the owners sidecar."""

    NAME = "RootfsUnpack"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        from dtbuild.plugins.builtin.image_actions import ImageTree

        openers: list[Callable[[], IO[bytes]]] = []
        for art in ctx.inputs("base"):
            base = ImageTree(ctx, art)
            openers.extend(base.layer_opener(d) for d in base.config["rootfs"]["diff_ids"])
        for art in ctx.inputs("layers"):
            openers.append(lambda a=art: ctx.open_input(a))

        def content(entry: ArchiveEntry, source: IO[bytes] | None) -> tuple[str, int]:
            assert source is not None
            if entry.size <= _SMALL_FILE:
                data = source.read()
                return ctx.put_blob(data), len(data)
            return ctx.put_stream(source)

        state = RootfsState()
        for number, opener in enumerate(openers):
            state.begin_layer(number)
            try:
                with opener() as stream:
                    state.flat.apply_layer(tar_extract.archive_entries(stream, lower_files=state.holds_file),
                                           number, content)
            except tar_extract.UnsafeArchive as e:
                raise ActionFailed("cannot flatten the base: " + e.message(f"layer {number + 1}")) from None
            except FlattenError as e:
                raise ActionFailed(f"base image layer {number}: {e}") from None
        ctx.output_tree("rootfs", state.tree_entries())
        with open(ctx.output_path("owners"), "w") as f:
            json.dump(state.owners(), f, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- RootLayerWrite


class RootLayerWrite(ActionKind):
    """A layer made by a script run as root in an overlay over a base (mkRootLayer)."""

    NAME = "RootLayerWrite"
    #: 2: the toolbox. Each action's key also holds the host's busybox and the wrappers.
    VERSION = HostVersion("3", toolbox_fingerprint)  # type: ignore[assignment]

    def run(self, ctx: ActionContext) -> None:
        p = ctx.params
        # The base's setuid binaries sit in ``lower`` while the script runs: no other user
        # may reach them, whatever the modes of the directories above.
        os.chmod(ctx.scratch_dir, PRIVATE_MODE)
        job_dir = os.path.join(ctx.scratch_dir, "job")
        lower = os.path.join(ctx.scratch_dir, "lower")
        seed = os.path.join(ctx.scratch_dir, "seed")
        os.mkdir(job_dir, PRIVATE_MODE)
        rootfs = ctx.inputs("rootfs")
        if rootfs:
            ctx.materialize(rootfs[0], lower)
            restore_special_bits(lower, ctx.walk_tree(rootfs[0]))
        else:
            os.mkdir(lower)
        owners_path = os.path.join(job_dir, "owners.json")
        if ctx.inputs("owners"):
            ctx.materialize(ctx.inputs("owners")[0], owners_path)
        else:
            with open(owners_path, "w") as f:
                json.dump({"format": OWNERS_FORMAT, "owners": [], "specials": []}, f)
        packages = self._write_seed(ctx, seed)
        toolbox = os.path.join(ctx.scratch_dir, "toolbox")
        build_toolbox(ctx, toolbox, ctx.inputs("tools"))
        job = RootLayerJob(
            job_dir=job_dir, lower=lower, owners=owners_path, seed=seed, seed_uid=p["uid"], seed_gid=p["gid"],
            script=p["script"], extra_commands=p["extra_commands"], network=p["network"],
            disk_size=p["disk_size"], memory_size=p["memory_size"],
            layer_tar=ctx.output_path("tar"), layer_meta=os.path.join(job_dir, "layer.json"), toolbox=toolbox)
        if p["network"]:
            ctx.log("run_as_root may use the network: this layer is not reproducible")
        result = ctx.run_command(RootLayerRequest(
            argv=_NO_ROOT_LAYERS_ARGV, cwd=job_dir, env=dict(SCRIPT_ENV), network=p["network"], job=job,
            log=ctx.log))
        status = read_status(job_dir) or {}
        if result.exit_code != 0 or status.get("stage") != "done":
            raise _failure(p, status, result.exit_code, result.output)
        with open(job.layer_meta) as f:
            digests = json.load(f)
        with open(ctx.output_path("meta"), "w") as f:
            json.dump({"diff_id": digests["diff_id"], "size": digests["size"], "packages": packages}, f,
                      sort_keys=True, separators=(",", ":"))

    @staticmethod
    def _write_seed(ctx: ActionContext, seed: str) -> list[str]:
        """Place copy_to_root in ``seed`` (as LayerWrite merges packages); return the
        packages' labels."""
        keep = ctx.params["keep_contents_dirlinks"]
        tree = MergedTree(keep_dirlinks=keep, copy_dirlinks=not keep)  # rsync -aK / -ak, as LayerWrite
        contents = ctx.inputs("contents")
        packages: list[str] = []
        try:
            for index, dest, label in ctx.params["placements"]:
                if label not in packages:
                    packages.append(label)
                place_artifact(ctx, tree, contents[index], dest.strip("/"), label)
        except ContentConflict as e:
            raise ActionFailed(str(e)) from None
        special = materialize_nodes(ctx, tree.nodes, seed)
        # The seed becomes part of the upper directory, packed from disk: its special
        # bits go back on, inside the action's 0700 scratch directory (as the base's do).
        for path, mode in special.items():
            os.chmod(os.path.join(seed, path), mode & 0o7777)
        return packages


def _failure(params: Mapping[str, Any], status: Mapping[str, Any], exit_code: int, output: str) -> ActionFailed:
    stage = status.get("stage")
    code = int(status.get("exit_code", exit_code) or exit_code)
    if stage == "run_as_root":
        return ActionFailed(f"run_as_root exited with status {code}", output_tail=output, exit_code=code,
                            command=params["script"].strip())
    if stage == "extra_commands":
        return ActionFailed(f"extra_commands exited with status {code}", output_tail=output, exit_code=code,
                            command=params["extra_commands"].strip())
    message = status.get("message") or f"the executor exited with status {exit_code} before the layer was packed"
    where = f" ({stage})" if stage and stage != "done" else ""
    return ActionFailed(f"building the root layer failed{where}: {message}", output_tail=output,
                        exit_code=exit_code)


class RootLayer(LayerKind):
    NAME = "root_layer"
    ACTION_KIND = "RootLayerWrite"
    DOC = "A layer made by a script run as root in an overlay over a base image (mkRootLayer)."


ROOT_LAYER_ACTION_KINDS: list[type[ActionKind]] = [RootfsUnpack, RootLayerWrite]


# --------------------------------------------------------------------------- preparing lower and seed


def apply_owners(root: str, owners_path: str, *, log: Callable[[str], None] = lambda m: None) -> None:
    """Give the materialized base tree at ``root`` the owners (and device nodes) of the
    sidecar. Needs root (or root in a user namespace that maps the ids)."""
    with open(owners_path) as f:
        sidecar = json.load(f)
    if sidecar.get("format") != OWNERS_FORMAT:
        raise ValueError(f"{owners_path}: not a {OWNERS_FORMAT} file")
    for path, uid, gid in sidecar["owners"]:
        full = os.path.join(root, path)
        if not _parent_is_inside(root, path):
            continue
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            continue
        os.lchown(full, uid, gid)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(full, stat.S_IMODE(st.st_mode))  # chown clears setuid/setgid bits
    skipped = []
    for path, kind, mode, uid, gid, _major, _minor in sidecar["specials"]:
        full = os.path.join(root, path)
        if kind != "fifo":
            # A device node made here would be a device on the host (in the cache), so
            # the base's devices stay in the sidecar only: see docs/root-layers.md.
            if not path.startswith("dev/"):
                skipped.append("/" + path)
            continue
        if not _parent_is_inside(root, path):
            continue
        try:
            os.mkfifo(full, mode & 0o777)
            os.lchown(full, uid, gid)
        except OSError:
            continue
    if skipped:
        log(f"the base image's device nodes {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''} "
            "are not in the overlay: run_as_root does not see them (they stay in the base's layers)")


def _parent_is_inside(root: str, path: str) -> bool:
    """Whether the directory of ``path`` is a real directory of the tree at ``root``
    (no symlink on the way that could lead a chown, chmod or mkfifo to the host)."""
    parent = os.path.dirname(os.path.join(root, path))
    expected = os.path.join(os.path.realpath(root), os.path.dirname(path))
    return os.path.isdir(parent) and os.path.realpath(parent) == os.path.normpath(expected)


def restore_special_bits(root: str, entries: Iterable[TreeEntry]) -> None:
    """Give the files and directories of a materialized base tree their setuid, setgid
    and sticky bits, which the store does not put on host files. The tree is under a
    0700 directory: only root (or the invoking user) can reach them."""
    for e in entries:
        if e.kind == "symlink" or not e.mode & 0o7000:
            continue
        full = os.path.join(root, e.path)
        if not _parent_is_inside(root, e.path):
            continue
        st = os.lstat(full)
        if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != e.mode & 0o7777:
            os.chmod(full, e.mode & 0o7777)


def match_seed_directories(seed: str, lower: str, uid: int, gid: int) -> None:
    """Owners of the seed (copy_to_root): ``uid``/``gid``, except that a directory the
    base already has keeps the base's mode and owner (as in pure layers), so that the
    upper directory does not change it."""
    for dirpath, dirnames, filenames in os.walk(seed):
        rel = os.path.relpath(dirpath, seed)
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            os.lchown(full, uid, gid)
            st = os.lstat(full)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(full, stat.S_IMODE(st.st_mode))
        if rel == ".":
            continue
        try:
            base = os.lstat(os.path.join(lower, rel))
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(base.st_mode):
            os.lchown(dirpath, base.st_uid, base.st_gid)
            os.chmod(dirpath, stat.S_IMODE(base.st_mode))


def prepare(job: RootLayerJob, log: Callable[[str], None] = lambda m: None) -> None:
    """The steps that need (namespace) root before the overlay is mounted."""
    apply_owners(job.lower, job.owners, log=log)
    match_seed_directories(job.seed, job.lower, job.seed_uid, job.seed_gid)


def remove_tree_as_owner(path: str) -> None:
    """Remove a tree whatever its modes (run as root or namespace root)."""
    def onerror(func: Any, p: str, exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError:
            pass

    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=onerror)
        else:
            os.unlink(path)


# --------------------------------------------------------------------------- upper directory -> layer


class UpperDirError(ValueError):
    """The upper directory holds something a layer cannot (a device node, a FIFO)."""


@dataclass(frozen=True, slots=True)
class UpperEntry:
    """One entry of an overlay's upper directory, as read from disk or from a tar of it.

    ``kind`` is file, dir, symlink, hardlink (a tar's link to an earlier entry, named by
    ``linkname``), char, block, fifo or socket. ``inode`` groups hard links read from
    disk. ``opaque`` marks a directory overlayfs made opaque.
    """

    path: str
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    linkname: str = ""
    major: int = 0
    minor: int = 0
    inode: Any = None
    opaque: bool = False
    open: Callable[[], IO[bytes]] | None = None


def _sort_key(path: str) -> tuple[bytes, ...]:
    return tuple(part.encode("utf-8", "surrogateescape") for part in path.split("/"))


class LowerView(Protocol):
    """What the conversion asks of the overlay's lower directory."""

    def exists(self, path: str) -> bool: ...

    def is_dir(self, path: str) -> bool: ...


class LowerDirectory:
    """A lower directory on disk. Paths are looked up component by component without
    following symlinks, as overlayfs merges directories only where both are real."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._cache: dict[str, int | None] = {}

    def _mode(self, path: str) -> int | None:
        if path in self._cache:
            return self._cache[path]
        parent = posixpath.dirname(path)
        mode: int | None = None
        if not parent or (self._mode(parent) is not None and stat.S_ISDIR(self._mode(parent) or 0)):
            try:
                mode = os.lstat(os.path.join(self.root, path)).st_mode
            except OSError:
                mode = None
        self._cache[path] = mode
        return mode

    def exists(self, path: str) -> bool:
        return self._mode(path) is not None

    def is_dir(self, path: str) -> bool:
        mode = self._mode(path)
        return mode is not None and stat.S_ISDIR(mode)


def upper_layer_entries(entries: Iterable[UpperEntry], lower: LowerView | None = None) -> list[LayerEntry]:
    """The layer entries (in tar order) for an overlay's upper directory.

    * A 0/0 character device is overlayfs' whiteout (kernel overlayfs often makes them
      hard links to one inode: they never become hardlink entries); an empty file
      ``.wh.NAME`` is one too (fuse-overlayfs writes those where it cannot make
      devices). Each becomes the image format's ``.wh.NAME``.
    * A directory with an opaque xattr, or holding a ``.wh..wh..opq`` file, gets the
      image format's ``.wh..wh..opq``.
    * Markers are empty files, mode 0, owner 0:0 (as containerd writes whiteouts),
      whatever the overlay made them with. With ``lower``, markers that hide nothing are
      dropped: a whiteout of a path the lower directory lacks, an opaque mark on a
      directory the lower directory does not have as a directory, and marks below an
      opaque directory. So kernel overlayfs, fuse-overlayfs (which marks every new
      directory opaque) and the VM's probe give the same bytes.
    * Hard links of regular files: the first path in tar order holds the data, the others
      link to it.
    * Other devices and FIFOs are an error; sockets are left out (tar cannot hold them).
    """
    by_path: dict[str, UpperEntry] = {}
    for e in entries:
        by_path[e.path] = e

    def resolve(e: UpperEntry) -> UpperEntry:
        seen = set()
        while e.kind == "hardlink":
            if e.linkname in seen or e.linkname not in by_path:
                raise UpperDirError(f"/{e.path} is a hard link to /{e.linkname}, which the upper directory lacks")
            seen.add(e.linkname)
            e = by_path[e.linkname]
        return e

    opaque: set[str] = set()
    whiteouts: set[str] = set()
    devices: set[str] = set()  # whiteouts that are overlayfs' devices (at the path they hide)
    groups: dict[Any, list[str]] = {}
    out: list[LayerEntry] = []
    for path, entry in by_path.items():
        target = resolve(entry) if entry.kind == "hardlink" else entry
        kind = target.kind
        parent, name = posixpath.split(path)
        if kind == "char" and target.major == 0 and target.minor == 0:
            whiteouts.add(path)
            devices.add(path)
        elif kind == "file" and name == OPAQUE_MARKER:
            if parent:
                opaque.add(parent)
        elif kind == "file" and name.startswith(WHITEOUT_PREFIX) and target.size == 0:
            whiteouts.add(posixpath.join(parent, name[len(WHITEOUT_PREFIX):]))
        elif kind == "dir":
            out.append(LayerEntry(path, "dir", entry.mode & 0o7777, entry.uid, entry.gid))
            if entry.opaque:
                opaque.add(path)
        elif kind == "symlink":
            out.append(LayerEntry(path, "symlink", 0o777, target.uid, target.gid, linkname=target.linkname))
        elif kind == "file":
            key = ("inode", target.inode) if target.inode is not None else ("path", target.path)
            groups.setdefault(key, []).append(path)
        elif kind == "socket":
            continue
        else:
            raise UpperDirError(f"/{path}: run_as_root left a {kind} device node; a layer holds no device nodes "
                                "or FIFOs (use a directory the image mounts at run time, such as /dev)"
                                if kind in ("char", "block") else
                                f"/{path}: run_as_root left a FIFO; a layer holds no FIFOs")
    if lower is not None:
        opaque = {d for d in opaque if lower.is_dir(d)}
        whiteouts = {w for w in whiteouts if lower.exists(w)}
    opaque = {d for d in opaque if not any(a in opaque for a in _ancestors(d))}
    for d in opaque:
        out.append(LayerEntry(posixpath.join(d, OPAQUE_MARKER), "file", 0))
    for w in whiteouts:
        replaced = w in by_path and w not in devices  # the upper directory has something else there
        if replaced or any(a in opaque for a in _ancestors(w)):
            continue
        parent, name = posixpath.split(w)
        out.append(LayerEntry(posixpath.join(parent, WHITEOUT_PREFIX + name), "file", 0))
    for paths in groups.values():
        paths.sort(key=_sort_key)
        first = paths[0]
        data = resolve(by_path[first])
        out.append(LayerEntry(first, "file", data.mode & 0o7777, data.uid, data.gid, size=data.size, open=data.open))
        for other in paths[1:]:
            out.append(LayerEntry(other, "hardlink", data.mode & 0o7777, data.uid, data.gid, linkname=first))
    try:
        return sorted_entries(out)
    except ValueError as e:
        raise UpperDirError(str(e)) from None


def _ancestors(path: str) -> Iterator[str]:
    parent = posixpath.dirname(path)
    while parent:
        yield parent
        parent = posixpath.dirname(parent)


def _is_opaque(path: str) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) in (b"y", b"y\0"):
                return True
        except OSError:
            continue
    return False


def upper_entries_from_directory(root: str) -> Iterator[UpperEntry]:
    """Read an upper directory from disk (owners as this process sees them, opaque
    xattrs, whiteout devices, hard links by inode)."""
    def walk(directory: str, prefix: str) -> Iterator[UpperEntry]:
        with os.scandir(directory) as it:
            names = sorted((e.name for e in it), key=os.fsencode)
        for name in names:
            full = os.path.join(directory, name)
            rel = prefix + name
            st = os.lstat(full)
            mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
            if stat.S_ISDIR(st.st_mode):
                yield UpperEntry(rel, "dir", mode, uid, gid, opaque=_is_opaque(full))
                yield from walk(full, rel + "/")
            elif stat.S_ISLNK(st.st_mode):
                yield UpperEntry(rel, "symlink", mode, uid, gid, linkname=os.readlink(full))
            elif stat.S_ISREG(st.st_mode):
                inode = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
                yield UpperEntry(rel, "file", mode, uid, gid, size=st.st_size, inode=inode,
                                 open=lambda p=full: open(p, "rb"))  # noqa: SIM115 - the tar writer closes it
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                yield UpperEntry(rel, "char" if stat.S_ISCHR(st.st_mode) else "block", mode, uid, gid,
                                 major=os.major(st.st_rdev), minor=os.minor(st.st_rdev))
            elif stat.S_ISFIFO(st.st_mode):
                yield UpperEntry(rel, "fifo", mode, uid, gid)
            else:
                yield UpperEntry(rel, "socket", mode, uid, gid)

    yield from walk(root, "")


def upper_entries_from_tar(upper_tar: str, opaque_dirs: Iterable[str]) -> Iterator[UpperEntry]:
    """Read a plain tar of an upper directory (as busybox tar writes it in the VM: from
    a guest, so checked by tar_extract like any archive) with the list of its opaque
    directories. ``upper_tar`` is opened again for each file's bytes, read at its offset.

    :raises UpperDirError: for a member tar_extract refuses.
    """
    opaque = {_member_path(d) for d in opaque_dirs} - {None}
    try:
        with open(upper_tar, "rb") as f:
            entries = [entry for entry, _ in tar_extract.read_entries(f, compressed=False)]
    except tar_extract.UnsafeArchive as e:
        raise UpperDirError(e.message("the upper directory's tar")) from None
    for entry in entries:
        path, mode, uid, gid = entry.path, entry.mode, entry.uid, entry.gid
        if entry.kind == "dir":
            yield UpperEntry(path, "dir", mode, uid, gid, opaque=path in opaque)
        elif entry.kind == "symlink":
            yield UpperEntry(path, "symlink", mode, uid, gid, linkname=entry.target)
        elif entry.kind == "hardlink":
            yield UpperEntry(path, "hardlink", mode, uid, gid, linkname=entry.target)
        elif entry.kind == "file":
            yield UpperEntry(path, "file", mode, uid, gid, size=entry.size,
                             open=lambda e=entry: tar_extract.open_content(open(upper_tar, "rb"), e))  # noqa: SIM115
        else:  # char, block, fifo: upper_layer_entries turns 0/0 devices into whiteouts, refuses the rest
            yield UpperEntry(path, entry.kind, mode, uid, gid, major=entry.devmajor, minor=entry.devminor)


def _write(entries: list[LayerEntry], layer_tar: str, layer_meta: str) -> LayerDigests:
    with open(layer_tar, "wb") as out:
        digests = write_layer(entries, tar_out=out)
    with open(layer_meta, "w") as f:
        json.dump({"diff_id": digests.diff_id, "size": digests.tar_size}, f)
    return digests


def pack_upper_directory(upper: str, lower: str, layer_tar: str, layer_meta: str) -> LayerDigests:
    """Pack an upper directory on disk into a layer tar (run where owners are seen as in
    the image: as root, or as root of the user namespace that built it)."""
    entries = upper_layer_entries(upper_entries_from_directory(upper), LowerDirectory(lower))
    return _write(entries, layer_tar, layer_meta)


def pack_upper_tar(upper_tar: str, opaque_list: str, lower: str, layer_tar: str, layer_meta: str) -> LayerDigests:
    """Pack a tar of an upper directory plus its NUL-separated list of opaque
    directories (what the VM's guest writes) into a layer tar."""
    with open(opaque_list, "rb") as f:
        opaque = [os.fsdecode(p) for p in f.read().split(b"\0") if p]
    entries = upper_layer_entries(upper_entries_from_tar(upper_tar, opaque), LowerDirectory(lower))
    try:
        return _write(entries, layer_tar, layer_meta)
    except tar_extract.UnsafeArchive as e:  # a member's bytes not there when packed
        raise UpperDirError(e.message("the upper directory's tar")) from None


# --------------------------------------------------------------------------- as a program


def main(argv: list[str]) -> int:
    """``prepare JOB.json``, ``remove PATH...``: steps an executor runs inside a user
    namespace."""
    if len(argv) >= 2 and argv[0] == "prepare":
        with open(argv[1]) as f:
            job = RootLayerJob.from_json(json.load(f))
        try:
            prepare(job, log=lambda m: print(f"dtbuild: {m}", file=sys.stderr))
        except (OSError, ValueError) as e:
            write_status(job.job_dir, "prepare", 1, f"preparing the base's owners failed: {e}")
            print(f"dtbuild: preparing the base's owners failed: {e}", file=sys.stderr)
            return 1
        return 0
    if argv and argv[0] == "remove":
        for path in argv[1:]:
            remove_tree_as_owner(path)
        return 0
    print("usage: python -m dtbuild.plugins.builtin.root_layer prepare JOB.json | remove PATH...",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
