"""Action kinds of layered images, merged and exported images and dockerTools' helper
packages: BaseDirectories, LayerWriteMerged, CustomisationLayer, LayeredImageAssemble,
MergeImages, ImageExport, MergeTrees and TreeWrite.

Package layers are plain LayerWrite actions (one package each), so images that share a
package share its layer's bytes. Without a base image the rule assigns packages to
layers at analysis (the merged layer is a LayerWrite of its packages too). What depends
on a base image's layer count, known only when the base is built or imported (how many
packages get a layer of their own), is decided here, at execution, with the rule's pure
:func:`plan_layers`: by LayerWriteMerged and LayeredImageAssemble.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import IO, Any

from dtbuild.plugins.builtin import imageformat, tar_extract
from dtbuild.plugins.builtin.flatten import WHITEOUT_PREFIX, FlatEntry, Flattener
from dtbuild.plugins.builtin.image_actions import (
    ImageAssemble,
    ImageTree,
    LayerWrite,
    archive_images,
    canonical,
    materialize_nodes,
    place_artifact,
    read_base_dirs,
)
from dtbuild.plugins.builtin.layer_contents import ContentConflict, DirAttrs, MergedTree, Node, base_directories
from dtbuild.plugins.builtin.layertar import LayerEntry, sorted_entries, write_layer
from dtbuild.plugins.builtin.sandbox import interpreter_paths
from dtbuild.plugins.interfaces import (
    ActionContext,
    ActionFailed,
    ActionKind,
    CommandRequest,
    InputArtifact,
    TreeEntry,
)
from dtbuild.rules.builtin.layered import LayerBudgetError, LayerPlan, plan_layers

#: The environment of extra_commands and fakeroot_commands (as LayerWrite's).
COMMAND_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class _ContextView:
    """An action context with some parameters and input slots replaced, so that one
    action kind can run another's logic on a selection of its inputs."""

    def __init__(self, ctx: ActionContext, *, params: Mapping[str, Any] | None = None,
                 inputs: Mapping[str, Sequence[InputArtifact]] | None = None) -> None:
        self._ctx = ctx
        self.params = params if params is not None else ctx.params
        self._inputs = dict(inputs or {})

    def inputs(self, name: str) -> Sequence[InputArtifact]:
        return self._inputs[name] if name in self._inputs else self._ctx.inputs(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def _write_json(ctx: ActionContext, slot: str, value: Any) -> None:
    with open(ctx.output_path(slot), "wb") as f:
        f.write(canonical(value))


# --------------------------------------------------------------------------- layered images


class BaseDirectories(ActionKind):
    """The base image's layer count and its directories (mode and owner): what every
    layer of a layered image needs from the base, read from its layers once."""

    NAME = "BaseDirectories"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        base = ImageTree(ctx, ctx.inputs("base")[0])
        diff_ids = base.config["rootfs"]["diff_ids"]
        dirs = base_directories(base.layer_opener(d)() for d in diff_ids)
        _write_json(ctx, "out", {"layers": len(diff_ids),
                                 "directories": {p: [a.mode, a.uid, a.gid] for p, a in sorted(dirs.items())}})


def _base_layer_count(ctx: ActionContext) -> int:
    if ctx.inputs("base_dirs"):
        with ctx.open_input(ctx.inputs("base_dirs")[0]) as f:
            return int(json.loads(f.read())["layers"])
    if ctx.inputs("base"):
        return len(ImageTree(ctx, ctx.inputs("base")[0]).config["rootfs"]["diff_ids"])
    return 0


def _plan(ctx: ActionContext, max_layers: int, packages: int, *, sbom: bool = False) -> LayerPlan:
    try:
        return plan_layers(max_layers, _base_layer_count(ctx), packages, sbom=sbom)
    except LayerBudgetError as e:
        raise ActionFailed(f"{e} (raise max_layers, or use a base image with fewer layers)") from None


class LayerWriteMerged(LayerWrite):
    """The layer of the packages beyond the layer budget of an image on a base image:
    LayerWrite of the packages of ``order`` after the first ``plan_layers(...).singles``
    (none when all have a layer of their own), the base's layer count read from
    ``base_dirs``."""

    NAME = "LayerWriteMerged"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        params = ctx.params
        order = params["order"]
        plan = _plan(ctx, params["max_layers"], len(order), sbom=bool(params.get("sbom")))
        keep = set(order[plan.singles:]) if plan.merged else set()
        placements = [p for p in params["placements"] if p[2] in keep]
        super().run(_ContextView(ctx, params={**params, "placements": placements}))  # type: ignore[arg-type]


class LayeredImageAssemble(ImageAssemble):
    """ImageAssemble of a layered image: of the declared package layers, the ones the
    layer budget allows once the base image's layer count is known (all of them
    without a base image). With ``union`` (placements of the ``contents`` slot, when
    no customisation layer lays the packages out as one tree), it first checks that
    no two packages provide a path differently, as :func:`union_of_packages`."""

    NAME = "LayeredImageAssemble"
    #: 2: image trees carry layer-notes.json (for inspect), as ImageAssemble's do.
    #: 3: the ``union`` check of the packages' paths.
    #: 4: a compressed layer is held in the tree as its blob only (layer-sizes.json).
    #: 5: ImageAssemble's config merge (its version 4).
    VERSION = "5"

    def run(self, ctx: ActionContext) -> None:
        params = ctx.params
        if params.get("union"):
            check_union(ctx, params["union"])
        layering = params["layering"]
        plan = _plan(ctx, layering["max_layers"], layering["packages"], sbom=bool(layering.get("sbom")))
        declared = layering["singles"]
        if layering.get("planned") and (plan.singles, plan.merged) != (declared, layering["merged"]):
            raise ActionFailed(f"internal error: analysis planned {declared} single layers (merged: "
                               f"{layering['merged']}), but the base image's layers give {plan}")
        keep = list(range(plan.singles))
        if plan.merged:
            if not layering["merged"]:
                raise ActionFailed("internal error: the layer plan needs a merged layer that was not declared")
            keep.append(declared)
        keep.append(declared + (1 if layering["merged"] else 0))  # the customisation layer
        inputs = {slot: [ctx.inputs(slot)[i] for i in keep] if ctx.inputs(slot) else []
                  for slot in ("layer_tars", "layer_metas", "blobs", "blob_metas")}
        labels = [params["layer_labels"][i] for i in keep]
        super().run(_ContextView(ctx, params={**params, "layer_labels": labels}, inputs=inputs))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the customisation layer


def union_of_packages(trees: Iterable[tuple[str, MergedTree]],
                      base_dirs: Mapping[str, DirAttrs] | None = None) -> dict[str, Node]:
    """The union of packages' trees (label, tree), in order. Directories merge; a path
    that two packages provide differently (other contents, mode, symlink target or
    kind) is an error naming both. Directories the base image has take its mode, as
    in the packages' own layers.

    :raises ContentConflict: naming both packages and the path.
    """
    base_dirs = base_dirs or {}
    union: dict[str, Node] = {}
    for label, tree in trees:
        for path in tree.sorted_paths():
            node = tree.nodes[path]
            if node.kind == "dir" and path in base_dirs:
                node = replace(node, mode=base_dirs[path].mode)
            node = replace(node, origin=label)
            have = union.get(path)
            if have is None:
                union[path] = node
                continue
            problem = None
            if have.kind != node.kind:
                problem = f"a {have.kind} in {have.origin} but a {node.kind} in {label}"
            elif node.kind == "file" and have.digest != node.digest:
                problem = f"with different contents (sha256 {have.digest[:12]}… in {have.origin}, " \
                          f"{node.digest[:12]}… in {label})"
            elif node.kind == "symlink" and have.target != node.target:
                problem = f"as symlinks to different targets ({have.target!r} in {have.origin}, " \
                          f"{node.target!r} in {label})"
            elif have.mode != node.mode:
                problem = f"with different modes ({have.mode:04o} in {have.origin}, {node.mode:04o} in {label})"
            if problem:
                raise ContentConflict(f"{have.origin} and {label} both provide /{path} {problem}; the image's "
                                      "content would depend on the layer order")
    return union


def _place_listed(ctx: ActionContext, tree: MergedTree, art: InputArtifact, dest: str, label: str) -> None:
    """Add a package's artifact to ``tree`` at ``dest`` as :func:`place_artifact` does,
    from its listing alone (nothing is stored: only paths, kinds, modes and digests
    matter here)."""
    if art.is_tree:
        for e in ctx.walk_tree(art):
            tree.add(f"{dest}/{e.path}" if dest else e.path, Node(e.kind, e.mode, e.digest, e.size, e.target, label))
    elif not dest:
        raise ContentConflict(f"{label} places the file {art.path} at / (the image root)")
    elif art.symlink is not None:
        tree.add(dest, Node("symlink", 0o777, target=art.symlink, origin=label))
    else:
        tree.add(dest, Node("file", 0o755 if art.executable else 0o644, art.digest, art.size, origin=label))


def check_union(ctx: ActionContext, placements: Sequence[Sequence[Any]]) -> None:
    """Fail when two packages (``[input index, destination, label]`` of the
    ``contents`` slot) provide a path differently, as their union would
    (:func:`union_of_packages`; the base image's directories from ``base_dirs``)."""
    contents = ctx.inputs("contents")
    trees: dict[str, MergedTree] = {}
    try:
        for index, dest, label in placements:
            _place_listed(ctx, trees.setdefault(label, MergedTree()), contents[index], dest.strip("/"), label)
        union_of_packages(trees.items(), read_base_dirs(ctx))
    except ContentConflict as e:
        raise ActionFailed(str(e)) from None


@dataclass(frozen=True, slots=True)
class _Seen:
    """A file-system entry as a walk of the customisation root found it."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int = 0
    target: str = ""
    inode: tuple[int, int] = (0, 0)
    nlink: int = 1


#: The programs CustomisationLayer runs as processes of their own (see each module):
#: the walk of the root (under fakeroot, it sees owners as fakeroot recorded them) and
#: the start of fakeroot_commands (owners of the packages' layers, then the commands).
_WALKER = (sys.executable, "-I", "-m", "dtbuild.plugins.builtin.tree_walk")
_PROLOGUE = (sys.executable, "-I", "-m", "dtbuild.plugins.builtin.fakeroot_prologue")


#: What proot binds over the customisation root under enable_fakechroot (those that
#: exist): the sandbox's own /dev, /proc and /sys, as nixpkgs binds the build
#: sandbox's. Binds, not copies: nothing of them reaches the root, so none the layer.
_FAKECHROOT_BINDS = ("/dev", "/proc", "/sys")


def _fake_owners(fakechroot: bool) -> bool:
    """Whether owners after fakeroot_commands are fakeroot's records (read by a walk
    under ``fakeroot -i``) rather than the real file system's: always, except as root
    under enable_fakechroot, where the image's own programs (which fakeroot does not
    reach) change the real owners and fakeroot shows inodes it has no record of as 0:0."""
    return os.geteuid() != 0 or not fakechroot


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class CustomisationLayer(ActionKind):
    """The customisation layer of a layered image.

    The packages of the closure are laid out as one tree (the customisation root);
    ``extra_commands`` run in it, then ``fakeroot_commands`` under fakeroot (with
    ``enable_fakechroot``, through proot with the root as / and the sandbox's /dev,
    /proc and /sys bound over it, as nixpkgs does). The layer holds what the commands
    changed: new and changed entries with their parent directories, and a whiteout for
    each removed path. Without commands it is empty. Owners are ``uid``/``gid``, or what
    fakeroot reports after fakeroot_commands.

    Owners, modes and device nodes that fakeroot_commands make are fakeroot's records
    alone, as root as well as an ordinary user: fakeroot never tries a real chown, its
    ``mknod`` leaves an empty file on disk, and the walk of the root runs under fakeroot
    to read the records. So a build gives the same layer whoever runs it, and makes no
    real device. (Under enable_fakechroot as root the commands are the image's own
    programs, which fakeroot does not reach: there the real file system is what counts.)
    """

    NAME = "CustomisationLayer"
    #: 2: device nodes made under fakeroot are character devices in the layer (they were
    #: empty files as root, an error otherwise).
    VERSION = "2"

    def run(self, ctx: ActionContext) -> None:
        p = ctx.params
        contents = ctx.inputs("contents")
        trees: dict[str, MergedTree] = {}
        try:
            for index, dest, label in p["placements"]:
                place_artifact(ctx, trees.setdefault(label, MergedTree()), contents[index], dest.strip("/"), label)
            base_dirs = read_base_dirs(ctx)
            union = union_of_packages(trees.items(), base_dirs)
        except ContentConflict as e:
            raise ActionFailed(str(e)) from None
        entries: list[LayerEntry] = []
        if p["extra_commands"] or p["fakeroot_commands"]:
            entries = self._customise(ctx, union, base_dirs)
        try:
            ordered = sorted_entries(entries)
        except ValueError as e:
            raise ActionFailed(str(e)) from None
        with ctx.output_writer("tar") as out:
            digests = write_layer(ordered, tar_out=out)
        _write_json(ctx, "meta", {"diff_id": digests.diff_id, "size": digests.tar_size, "packages": []})

    # ------------------------------------------------------------------ running the commands

    def _customise(self, ctx: ActionContext, union: Mapping[str, Node],
                   base_dirs: Mapping[str, DirAttrs]) -> list[LayerEntry]:
        p = ctx.params
        uid, gid = p["uid"], p["gid"]
        # What the packages' layers give each path: the baseline the commands change.
        baseline: dict[str, _Seen] = {}
        for path, node in union.items():
            if node.kind == "dir" and path in base_dirs:
                attrs = base_dirs[path]
                baseline[path] = _Seen("dir", attrs.mode, attrs.uid, attrs.gid)
            else:
                baseline[path] = _Seen(node.kind, node.mode, uid, gid, node.size, node.target)
        root = os.path.join(ctx.scratch_dir, "root")
        special = materialize_nodes(ctx, union, root)
        home = os.path.join(ctx.scratch_dir, "home")
        os.mkdir(home)
        env = {"PATH": COMMAND_PATH, "HOME": home, "TMPDIR": ctx.scratch_dir, "LANG": "C.UTF-8", "TZ": "UTC",
               "SOURCE_DATE_EPOCH": "1", "out": root}
        if p["extra_commands"]:
            self._run(ctx, ["/bin/bash", "-c", "set -e -o pipefail\numask 022\n" + p["extra_commands"]], root, env,
                      "extra_commands", p["extra_commands"])
        state = None
        if p["fakeroot_commands"]:
            state = self._run_fakeroot(ctx, root, env, base_dirs)
        walk_json = os.path.join(ctx.scratch_dir, "walk.json")
        walker = [*_WALKER, root, walk_json]
        if state is not None and _fake_owners(p["enable_fakechroot"]):
            walker = ["fakeroot", "-i", state, "--", *walker]
        self._run(ctx, walker, ctx.scratch_dir, env, "the walk of the customisation root", None,
                  readonly=interpreter_paths())
        with open(walk_json) as f:
            walked = json.load(f)
        final: dict[str, _Seen] = {}
        for path, kind, mode, e_uid, e_gid, size, target, dev, ino, nlink in walked:
            if kind not in ("dir", "file", "symlink", "char"):
                what = "a block device" if kind == "block" else "a fifo or socket"
                raise ActionFailed(f"/{path}: the commands made {what}; a layer holds only files, directories, "
                                   f"symlinks and character devices (remove /{path} at the end of the commands)")
            held = special.get(path)
            if held is not None and kind != "symlink" and mode == held & 0o777:
                mode = held  # setuid/setgid/sticky bits never reach the disk: as the package has them
            if state is None:  # owners cannot change without fakeroot
                have = baseline.get(path)
                e_uid, e_gid = (have.uid, have.gid) if have is not None else (uid, gid)
            final[path] = _Seen(kind, mode, e_uid, e_gid, size, target, (dev, ino), nlink)
        return self._changes(ctx, union, baseline, final, root, base_dirs)


    @staticmethod
    def _run(ctx: ActionContext, argv: list[str], cwd: str, env: Mapping[str, str], what: str,
             commands: str | None, readonly: Sequence[str] = ()) -> None:
        # Confined to the action's scratch directory (the root, HOME, TMPDIR, fakeroot's
        # state) where the executor sandboxes commands.
        result = ctx.run_command(CommandRequest(argv=argv, cwd=cwd, env=dict(env), writable=[ctx.scratch_dir],
                                                readonly=readonly))
        if result.exit_code != 0:
            raise ActionFailed(f"{what} exited with status {result.exit_code}", output_tail=result.output,
                               exit_code=result.exit_code, command=commands)

    def _run_fakeroot(self, ctx: ActionContext, root: str, env: Mapping[str, str],
                      base_dirs: Mapping[str, DirAttrs]) -> str:
        p = ctx.params
        if shutil.which("fakeroot") is None:
            raise ActionFailed("fakeroot_commands need fakeroot, which is not installed (apt-get install fakeroot)")
        commands = p["fakeroot_commands"]
        if p["enable_fakechroot"]:
            if shutil.which("proot") is None:
                raise ActionFailed("enable_fakechroot needs proot, which is not installed (apt-get install proot)")
            if not os.path.lexists(os.path.join(root, "bin", "sh")):
                raise ActionFailed("enable_fakechroot runs fakeroot_commands with the image's own /bin/sh, but no "
                                   "package of the contents provides /bin/sh (add a shell, such as bin_sh)")
            binds = [arg for d in _FAKECHROOT_BINDS if os.path.isdir(d) for arg in ("-b", d)]
            command = ["proot", "-r", root, *binds, "-w", "/", "/bin/sh", "-c", "set -e\numask 022\n" + commands]
        else:
            command = ["/bin/bash", "-c", "set -e -o pipefail\numask 022\n" + commands]
        owners = os.path.join(ctx.scratch_dir, "owners.json")
        with open(owners, "w") as f:
            json.dump({"default": [p["uid"], p["gid"]],
                       "owners": {path: [a.uid, a.gid] for path, a in base_dirs.items()}}, f)
        state = os.path.join(ctx.scratch_dir, "fakeroot.state")
        readonly = interpreter_paths()
        if p["enable_fakechroot"] and os.path.isdir("/sys"):
            readonly = (*readonly, "/sys")  # for proot to bind (the sandbox has /dev and /proc of its own)
        if _fake_owners(p["enable_fakechroot"]):
            # Owners are fakeroot's alone, read back by the walk under fakeroot. A real
            # chown would fail in a user namespace (EINVAL for an unmapped owner, which
            # fakeroot passes on) and, as root, make the layer depend on who built it.
            env = {**env, "FAKEROOTDONTTRYCHOWN": "1"}
        self._run(ctx, ["fakeroot", "-s", state, "--", *_PROLOGUE, owners, "--", *command], root, env,
                  "fakeroot_commands", commands, readonly=readonly)
        return state

    # ------------------------------------------------------------------ the difference

    @staticmethod
    def _changes(ctx: ActionContext, union: Mapping[str, Node], baseline: Mapping[str, _Seen],
                 final: Mapping[str, _Seen], root: str, base_dirs: Mapping[str, DirAttrs]) -> list[LayerEntry]:
        p = ctx.params
        uid, gid, uname, gname = p["uid"], p["gid"], p["uname"], p["gname"]

        def changed(path: str, now: _Seen) -> bool:
            before = baseline.get(path)
            if before is None or (before.kind, before.uid, before.gid) != (now.kind, now.uid, now.gid):
                return True
            if now.kind == "symlink":  # a symlink's own mode means nothing
                return before.target != now.target
            if before.mode != now.mode:
                return True
            if now.kind == "file":
                return before.size != now.size or union[path].digest != _sha256_file(os.path.join(root, path))
            return False

        emit = {path for path, now in final.items() if changed(path, now)}
        whiteouts = []
        for path in baseline:
            parent = posixpath.dirname(path)
            # Only the topmost removed path needs a whiteout; below a path that is no
            # longer a directory, the replacement hides everything.
            if path not in final and (not parent or (parent in final and final[parent].kind == "dir")):
                whiteouts.append(path)
        for path in [*emit, *whiteouts]:
            parent = posixpath.dirname(path)
            while parent and parent not in emit:
                emit.add(parent)
                parent = posixpath.dirname(parent)

        entries: list[LayerEntry] = []
        links: dict[tuple[int, int], str] = {}
        for path in sorted(emit, key=lambda q: q.split("/")):
            now = final[path]
            if now.kind == "dir" and path not in baseline and path in base_dirs:
                attrs = base_dirs[path]  # a directory the base has: never reset its mode or owner
                now = replace(now, mode=attrs.mode, uid=attrs.uid, gid=attrs.gid)
            names = {"uname": uname if now.uid == uid else "", "gname": gname if now.gid == gid else ""}
            if now.kind == "dir":
                entries.append(LayerEntry(path=path, kind="dir", mode=now.mode, uid=now.uid, gid=now.gid, **names))
            elif now.kind == "symlink":
                entries.append(LayerEntry(path=path, kind="symlink", mode=0o777, uid=now.uid, gid=now.gid,
                                          linkname=now.target, **names))
            elif now.kind == "char":
                major, minor = (int(n) for n in now.target.split(","))
                entries.append(LayerEntry(path=path, kind="char", mode=now.mode, uid=now.uid, gid=now.gid,
                                          devmajor=major, devminor=minor, **names))
            elif now.nlink > 1 and now.inode in links:
                entries.append(LayerEntry(path=path, kind="hardlink", mode=now.mode, uid=now.uid, gid=now.gid,
                                          linkname=links[now.inode], **names))
            else:
                links.setdefault(now.inode, path)
                full = os.path.join(root, path)
                entries.append(LayerEntry(path=path, kind="file", mode=now.mode, uid=now.uid, gid=now.gid,
                                          size=now.size, open=lambda f=full: open(f, "rb"), **names))  # noqa: SIM115
        for path in whiteouts:
            parent, name = posixpath.split(path)
            entries.append(LayerEntry(path=posixpath.join(parent, ".wh." + name), kind="file", mode=0o644))
        return entries


# --------------------------------------------------------------------------- merge_images


class MergeImages(ActionKind):
    """One docker-archive of several image trees (mergeImages).

    The inputs are image trees, whose layers are kept both uncompressed and as the blobs
    their manifests list (gzip, zstd or plain, image by image). The archive holds every
    layer uncompressed once (by diff_id, whatever each image compressed it with) and is
    compressed as a whole; a layer whose blob is already in the archive's compression
    (told by the media type and checked by the blob's magic bytes) is copied as
    compressed members instead of being compressed again.
    """

    NAME = "MergeImages"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        owners: dict[str, str] = {}
        for art in ctx.inputs("images"):
            description = ImageTree(ctx, art).description
            for repo_tag in description.repo_tags:
                if repo_tag in owners:
                    raise ActionFailed(f"the tag {repo_tag} names two of the images ({owners[repo_tag]} and "
                                       f"{description.label}), so `docker load` would keep only one; give "
                                       "them different tags (tag) or names (image_name)")
                owners[repo_tag] = description.label
        compressor = ctx.compressor(ctx.params["compressor"])
        with ctx.output_writer("archive") as out:
            imageformat.write_docker_archive(out, archive_images(ctx), compressor)


# --------------------------------------------------------------------------- export_image


@dataclass(frozen=True, slots=True)
class _LayerBytes:
    """Where an exported file's bytes are: ``size`` bytes at ``offset`` in layer
    ``layer``, or the store's blob ``blob`` when the layer did not hold them in one piece
    (a sparse member)."""

    layer: int
    offset: int
    blob: str = ""


def _exportable(entries: Iterable[tuple[tar_extract.ArchiveEntry, IO[bytes] | None]],
                ) -> Iterator[tuple[tar_extract.ArchiveEntry, IO[bytes] | None]]:
    """``entries``, refusing what an exported root file system cannot hold (markers,
    whatever their kind, are the flattener's)."""
    for member, source in entries:
        marker = posixpath.basename(member.path).startswith(WHITEOUT_PREFIX)
        if member.kind in tar_extract.SPECIAL_KINDS and not marker and not (
                member.kind == "char" and member.devmajor == 0 and member.devminor == 0):
            raise ValueError(f"/{member.path} is a {tar_extract.kind_text(member.kind)}; an exported root file "
                             "system holds only files, directories, symlinks and 0/0 character devices")
        yield member, source


def apply_layer(tree: dict[str, FlatEntry], entries: Sequence[tar_extract.ArchiveEntry], layer: int,
                stored: Mapping[str, str] | None = None) -> None:
    """Apply one layer, read by :func:`tar_extract.read_entries` (names validated, hard
    links to earlier files), to a flattened tree (path -> entry), as
    :class:`~dtbuild.plugins.builtin.flatten.Flattener` applies layers (the OCI image
    spec's whiteouts and opaque markers hide what lower layers had; hard links become
    copies). A file's content is a :class:`_LayerBytes`; ``stored``: the store blobs of
    files whose bytes are not at one offset of the layer, by path.

    :raises ValueError: for entries a root file system export cannot hold.
    """
    stored = stored or {}
    Flattener(tree).apply_layer(_exportable((member, None) for member in entries), layer,
                                lambda e, _: _LayerBytes(layer, e.offset, stored.get(e.path, "")))


class ImageExport(ActionKind):
    """The flattened root file system of an image as one deterministic tar."""

    NAME = "ImageExport"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        image = ImageTree(ctx, ctx.inputs("image")[0])
        diff_ids = image.config["rootfs"]["diff_ids"]
        blobs = [image.entry("layers/" + d.removeprefix("sha256:")).digest for d in diff_ids]
        flat = Flattener()
        for number, digest in enumerate(blobs):
            def content(entry: tar_extract.ArchiveEntry, source: IO[bytes] | None, n: int = number) -> _LayerBytes:
                if source is not None and entry.offset < 0:
                    return _LayerBytes(n, entry.offset, ctx.put_stream(source)[0])
                return _LayerBytes(n, entry.offset)

            flat.begin_layer(number)
            try:
                # Layers of an image tree are plain tars (checked against their diff_ids):
                # offsets are positions in the blob.
                with ctx.open_blob(digest) as f:
                    flat.apply_layer(_exportable(tar_extract.read_entries(f, compressed=False,
                                                                          lower_files=flat.holds_file)),
                                     number, content)
            except tar_extract.UnsafeArchive as e:
                raise ActionFailed(e.message(f"layer {number + 1} ({diff_ids[number]})")) from None
            except ValueError as e:
                raise ActionFailed(f"layer {number + 1} ({diff_ids[number]}): {e}") from None

        def opener(where: _LayerBytes, size: int) -> Callable[[], IO[bytes]]:
            if where.blob:
                return lambda: ctx.open_blob(where.blob)
            entry = tar_extract.ArchiveEntry("", "file", 0, size=size, offset=where.offset)
            return lambda: tar_extract.open_content(ctx.open_blob(blobs[where.layer]), entry)

        entries = []
        for path, node in flat.nodes.items():
            if node.kind == "file":
                entries.append(LayerEntry(path=path, kind="file", mode=node.mode, uid=node.uid, gid=node.gid,
                                          size=node.size, open=opener(node.content, node.size)))
            else:
                entries.append(LayerEntry(path=path, kind=node.kind, mode=node.mode, uid=node.uid,  # type: ignore[arg-type]
                                          gid=node.gid, linkname=node.target))
        with ctx.output_writer("tar") as out:
            write_layer(sorted_entries(entries), tar_out=out)


# --------------------------------------------------------------------------- merge_trees


class _TreeMerge:
    """Entries merged in order as ``cp -rf`` and ``tar -x`` merge them: a later file
    or symlink replaces an earlier one, directories merge (the later mode wins), and a
    directory never becomes a file or the other way round."""

    def __init__(self) -> None:
        self.entries: dict[str, TreeEntry] = {}
        self.origins: dict[str, str] = {}

    def add(self, entry: TreeEntry, origin: str) -> None:
        parent = posixpath.dirname(entry.path)
        while parent:
            have = self.entries.get(parent)
            if have is not None and have.kind != "dir":
                raise ActionFailed(f"{origin} puts /{entry.path} below /{parent}, which is a {have.kind} "
                                   f"in {self.origins[parent]}")
            parent = posixpath.dirname(parent)
        have = self.entries.get(entry.path)
        if have is not None and (have.kind == "dir") != (entry.kind == "dir"):
            raise ActionFailed(f"/{entry.path} is a {have.kind} in {self.origins[entry.path]} but a {entry.kind} "
                               f"in {origin}: a directory and a non-directory cannot be merged")
        self.entries[entry.path] = entry
        self.origins[entry.path] = origin


class MergeTrees(ActionKind):
    """merge_trees: packages copied (by reference) and tarballs extracted into one tree,
    in order; or, with ``only_deps``, a file listing the inputs."""

    NAME = "MergeTrees"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        sources = ctx.params["sources"]
        if ctx.params["only_deps"]:
            with open(ctx.output_path("out"), "w") as f:
                f.write("".join(origin + "\n" for origin in sources))
            return
        srcs = ctx.inputs("srcs")
        merged = _TreeMerge()
        for kind, origin, index, dest in sources:
            if kind == "tree":
                self._add_artifact(ctx, merged, srcs[index], dest.strip("/"), origin)
            else:
                self._extract(ctx, merged, srcs[index], dest.strip("/"), origin)
        ctx.output_tree("out", list(merged.entries.values()))

    @staticmethod
    def _add_artifact(ctx: ActionContext, merged: _TreeMerge, art: InputArtifact, dest: str, origin: str) -> None:
        if art.is_tree:
            for e in ctx.walk_tree(art):
                merged.add(replace(e, path=f"{dest}/{e.path}" if dest else e.path), origin)
        elif art.symlink is not None:
            merged.add(TreeEntry(dest, "symlink", 0o777, target=art.symlink), origin)
        else:
            ctx.store_file(art)
            merged.add(TreeEntry(dest, "file", 0o755 if art.executable else 0o644, art.digest, art.size), origin)

    @staticmethod
    def _extract(ctx: ActionContext, merged: _TreeMerge, art: InputArtifact, dest: str, origin: str) -> None:
        """Add a tarball's entries below ``dest``. Members are checked by
        :mod:`~dtbuild.plugins.builtin.tar_extract` (no escaping names, hard links only to
        earlier members, nothing below a symlink); modes keep their setuid, setgid and
        sticky bits as tree metadata (for layer headers; the store never puts them on
        host files)."""
        files: dict[str, TreeEntry] = {}  # by member path: what a later hard link shares
        try:
            with ctx.open_input(art) as raw:
                for member, content in tar_extract.archive_entries(raw):
                    path = f"{dest}/{member.path}" if dest else member.path
                    if member.kind == "dir":
                        entry = TreeEntry(path, "dir", member.mode)
                    elif member.kind == "symlink":
                        entry = TreeEntry(path, "symlink", 0o777, target=member.target)
                    elif member.kind == "hardlink":
                        entry = replace(files[member.target], path=path)
                        files[member.path] = entry
                    elif member.kind == "file":
                        assert content is not None
                        digest, size = ctx.put_stream(content, member.size)
                        entry = TreeEntry(path, "file", member.mode, digest, size)
                        files[member.path] = entry
                    else:
                        raise ActionFailed(f"{art.path}: /{path} is a device or fifo; a package holds only "
                                           "files, directories and symlinks")
                    merged.add(entry, origin)
        except tar_extract.UnsafeArchive as e:
            if e.member is None:  # not a tar at all
                raise ActionFailed(f"{art.path} is neither a package nor a tar archive ({e.reason})") from None
            raise ActionFailed(e.message(art.path)) from None


# --------------------------------------------------------------------------- helper packages


def _package_listing(ctx: ActionContext) -> dict[str, TreeEntry]:
    """The files a package input places (slot ``package``, params ``package``)."""
    listing: dict[str, TreeEntry] = {}
    arts = ctx.inputs("package")
    for index, dest in ctx.params["package"]:
        art = arts[index]
        dest = dest.strip("/")
        if art.is_tree:
            for e in ctx.walk_tree(art):
                listing[f"{dest}/{e.path}" if dest else e.path] = e
        elif art.symlink is not None:
            listing[dest] = TreeEntry(dest, "symlink", 0o777, target=art.symlink)
        else:
            listing[dest] = TreeEntry(dest, "file", 0o755 if art.executable else 0o644, art.digest, art.size)
    return listing


def resolve_binary(listing: Mapping[str, TreeEntry], *, link: str, names: Sequence[str], explicit: str | None,
                   what: str) -> str:
    """The absolute path, in a package's listing, of the binary a helper links to:
    ``explicit`` when given (it must be there), else the first of ``names`` found in a
    bin/ or sbin/ directory, else the package's only executable file there.

    :raises ActionFailed: naming the candidates when there is no single answer.
    """
    if explicit is not None:
        path = explicit.strip("/")
        if path not in listing or listing[path].kind == "dir":
            raise ActionFailed(f"{what} has no file {explicit}")
        return "/" + path
    in_bin = {path: e for path, e in listing.items()
              if posixpath.basename(posixpath.dirname(path)) in ("bin", "sbin") and path != link
              and e.kind != "dir"}
    for name in names:
        for path in sorted(in_bin):
            if posixpath.basename(path) == name:
                return "/" + path
    executables = sorted(p for p, e in in_bin.items() if e.kind == "file" and e.mode & 0o111)
    if len(executables) == 1:
        return "/" + executables[0]
    found = ", ".join("/" + p for p in executables) or "none"
    raise ActionFailed(f"cannot tell which binary of {what} /{link} should point to (executables in bin/ "
                       f"directories: {found}); set the 'binary' attribute to its path in the image")


class TreeWrite(ActionKind):
    """A small tree described by parameters: text files, directories, symlinks, copies
    of input files and symlinks to a binary of a package (the helper packages)."""

    NAME = "TreeWrite"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        p = ctx.params
        entries: list[TreeEntry] = []
        for path, mode in p.get("dirs", []):
            entries.append(TreeEntry(path, "dir", mode))
        for path, mode, text in p.get("files", []):
            data = text.encode()
            entries.append(TreeEntry(path, "file", mode, ctx.put_blob(data), len(data)))
        copies = ctx.inputs("copies")
        for path, mode, index in p.get("copies", []):
            art = copies[index]
            if art.is_tree:
                raise ActionFailed(f"{art.path} is a directory, but one file is needed for /{path}")
            ctx.store_file(art)
            entries.append(TreeEntry(path, "file", mode, art.digest, art.size))
        for path, target in p.get("symlinks", []):
            entries.append(TreeEntry(path, "symlink", 0o777, target=target))
        link = p.get("binary_link")
        if link is not None:
            target = resolve_binary(_package_listing(ctx), link=link["path"], names=link["names"],
                                    explicit=link["binary"], what=link["package"])
            entries.append(TreeEntry(link["path"], "symlink", 0o777, target=target))
        ctx.output_tree("out", entries)


LAYERED_ACTION_KINDS: list[type[ActionKind]] = [
    BaseDirectories, LayerWriteMerged, CustomisationLayer, LayeredImageAssemble, MergeImages, ImageExport,
    MergeTrees, TreeWrite,
]
