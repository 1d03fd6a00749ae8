"""Image rules: ``image`` (buildImage), ``image_archive`` (a base image from a
docker-archive or OCI archive file) and the analysis half of the ``pure_layer`` layer
kind (mkPureLayer; its rule is made from the layer kind, see
:class:`dtbuild.plugins.builtin.image_actions.PureLayer`).

Every image, built or imported, is an *image tree* (see ImageInfo); the outputs users
get (docker-archive, OCI layout, name.json) are written from it by separate actions, so
each is cached on its own and `dtbuild stream` can write the archive from the tree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from dtbuild.rules import attrs
from dtbuild.rules.api import Dependency, LayerPlan, RuleContext, rule
from dtbuild.rules.artifacts import Artifact
from dtbuild.rules.providers import DefaultInfo, ImageInfo, LayerInfo, PackageInfo, Provider

DEFAULT_CREATED = "1970-01-01T00:00:01Z"
_CREATED_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
ARCHITECTURES = ("amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64", "mips64le")

#: The image config fields users may set, with the JSON type each takes.
CONFIG_FIELDS: dict[str, type[Any]] = {
    "Env": list, "Cmd": list, "Entrypoint": list, "ExposedPorts": dict, "WorkingDir": str, "User": str,
    "Labels": dict, "Volumes": dict, "StopSignal": str, "Healthcheck": dict, "OnBuild": list, "Shell": list,
    "ArgsEscaped": bool,
}


# --------------------------------------------------------------------------- shared pieces


def layer_placements(packages: Sequence[PackageInfo], *, closure: bool = True,
                     ) -> tuple[list[Artifact], list[list[Any]]]:
    """The artifacts of ``packages`` and their runtime closure (only ``packages``
    themselves with ``closure=False``), and where each goes: ``[input index,
    destination, package label]``, packages in closure order."""
    arts: list[Artifact] = []
    placements: list[list[Any]] = []
    seen: set[str] = set()
    for top in packages:
        for pkg in (top.closure() if closure else (top,)):
            if pkg.label in seen:
                continue
            seen.add(pkg.label)
            for entry in pkg.entries:
                placements.append([len(arts), entry.dest, pkg.label])
                arts.append(entry.artifact)
    return arts, placements


def declare_layer(ctx: RuleContext, *, tar: Artifact | None, meta: Artifact, packages: Sequence[PackageInfo],
                  base: ImageInfo | None = None, description: str | None = None,
                  settings: Mapping[str, Any] | None = None, closure: bool = True,
                  base_dirs: Artifact | None = None, mnemonic: str = "LayerWrite",
                  compressor: str | None = None) -> LayerInfo:
    """Declare a LayerWrite action for ``packages`` with this target's uid, gid,
    keep_contents_dirlinks and extra_commands attributes.

    For rules with other attributes, ``settings`` gives those parameters instead (and
    may add ``uname``/``gname``, or parameters of another ``mnemonic`` built on
    LayerWrite). ``closure=False`` places only ``packages``, not their runtime
    dependencies. ``base_dirs`` (a BaseDirectories output) stands for ``base`` when
    only the base's directories matter, so the base's layers are read once per image
    rather than once per layer. ``compressor`` (other than none) writes the compressed
    blob in the same pass instead of the tar: give ``tar=None`` then (the layer has no
    uncompressed copy; readers decompress the blob), or a ``tar`` to keep one as well.
    Without a compressor ``tar`` is required. The blob's outputs are named after
    ``meta`` (``layer.json`` -> ``layer.gz``, ``layer.gz.json``).
    """
    arts, placements = layer_placements(packages, closure=closure)
    inputs: dict[str, list[Artifact]] = {"contents": arts}
    if base_dirs is not None:
        inputs["base_dirs"] = [base_dirs]
    elif base is not None:
        inputs["base"] = [base.image]
    if settings is None:
        settings = {"uid": ctx.attr.uid, "gid": ctx.attr.gid,
                    "keep_contents_dirlinks": ctx.attr.keep_contents_dirlinks,
                    "extra_commands": ctx.attr.extra_commands}
    compressed = compressor is not None and compressor != "none"
    if tar is None and not compressed:
        raise ValueError("declare_layer: a layer without a compressor needs its tar")
    outputs = {"meta": meta}
    if tar is not None:
        outputs["tar"] = tar
    params = {"placements": placements, **settings}
    blob = blob_meta = None
    if compressed:
        stem = tar.basename.removesuffix(".tar") if tar is not None else meta.basename.removesuffix(".json")
        blob = outputs["blob"] = ctx.declare_internal(f"{stem}.{compressor}")
        blob_meta = outputs["blob_meta"] = ctx.declare_internal(f"{stem}.{compressor}.json")
        params["compressor"] = compressor
        if tar is not None:
            params["keep_tar"] = True
    ctx.actions.declare(mnemonic, inputs=inputs, outputs=outputs, params=params,
                        description=description or f"{mnemonic} {ctx.label}",
                        uses={"compressors": [compressor]} if compressor is not None and blob is not None else None)
    # A layer written compressed only has no tar (LayerInfo.tar is None: see compress_layers).
    return LayerInfo(label=ctx.label, tar=tar, meta=meta, blob=blob, blob_meta=blob_meta,
                     blob_compressor=compressor if blob is not None else None)


def check_ids(ctx: RuleContext) -> None:
    for attr in ("uid", "gid"):
        value = ctx.attr[attr]
        if not 0 <= value < 2**32:
            ctx.fail(f"must be between 0 and 4294967295, but was {value}", attr=attr)


def check_created(ctx: RuleContext) -> None:
    created = ctx.attr.created
    if created != "now" and not _CREATED_RE.match(created):
        ctx.fail(f"must be an RFC 3339 time such as '{DEFAULT_CREATED}', or 'now', but was {created!r}",
                 attr="created")


def check_config(ctx: RuleContext) -> dict[str, Any]:
    from difflib import get_close_matches

    config = ctx.attr.config
    for key, value in config.items():
        expected = CONFIG_FIELDS.get(key)
        if expected is None:
            close = get_close_matches(key, CONFIG_FIELDS, n=1)
            ctx.fail(f"has the unknown field {key!r}", attr="config",
                     hint=f"did you mean '{close[0]}'?" if close else
                     f"image config fields: {', '.join(sorted(CONFIG_FIELDS))}")
        if not isinstance(value, expected):
            ctx.fail(f"field {key!r} must be a {expected.__name__}, but was {type(value).__name__} {value!r}",
                     attr="config")
        if key in ("Env", "Cmd", "Entrypoint", "Shell", "OnBuild") and not all(isinstance(v, str) for v in value):
            ctx.fail(f"field {key!r} must be a list of strings", attr="config")
        if key == "Env":
            for item in value:
                if "=" not in item or item.startswith("="):
                    ctx.fail(f"Env entries are 'NAME=value', but one was {item!r}", attr="config")
        if key == "Labels" and not all(isinstance(v, str) for v in value.values()):
            ctx.fail("field 'Labels' must map strings to strings", attr="config")
    return config


def check_tag(ctx: RuleContext) -> str | None:
    """The ``tag`` attribute, checked (None: derived from the content)."""
    tag = ctx.attr.tag
    if tag is not None and not _TAG_RE.match(tag):
        ctx.fail(f"must be a valid image tag (letters, digits, '_', '.', '-'; at most 128), but was {tag!r}",
                 attr="tag")
    return tag


def check_architecture(ctx: RuleContext) -> None:
    if ctx.attr.architecture not in ARCHITECTURES:
        from difflib import get_close_matches

        close = get_close_matches(ctx.attr.architecture, ARCHITECTURES, n=1)
        ctx.fail(f"must be one of {', '.join(ARCHITECTURES)}, but was {ctx.attr.architecture!r}",
                 attr="architecture", hint=f"did you mean '{close[0]}'?" if close else None)


def repository_name(ctx: RuleContext) -> str:
    name = ctx.attr.image_name or ctx.name
    if not _REPO_RE.match(name):
        ctx.fail(f"{name!r} is not a valid image repository name (lowercase letters, digits, '.', '_', '-', '/')",
                 attr="image_name" if ctx.attr.image_name else None,
                 hint="set image_name = \"...\" to a lowercase name")
    return name


def declare_image_outputs(ctx: RuleContext, *, image_tree: Artifact, description: Artifact,
                          compressor: str) -> list[Artifact]:
    """The docker-archive and OCI layout of an image tree (name.tar[.ext], name.oci/)."""
    ext = {"none": "", "gz": ".gz", "zstd": ".zst"}.get(compressor, "." + compressor)
    archive = ctx.declare_file(f"{ctx.name}.tar{ext}")
    oci = ctx.declare_directory(f"{ctx.name}.oci")
    ctx.actions.declare("DockerArchive", inputs={"images": [image_tree]}, outputs={"archive": archive},
                        params={"compressor": compressor}, description=f"DockerArchive {ctx.label}",
                        uses={"compressors": [compressor]})
    ctx.actions.declare("OciLayout", inputs={"images": [image_tree]}, outputs={"layout": oci},
                        params={}, description=f"OciLayout {ctx.label}")
    return [archive, oci, description]


def compress_layers(ctx: RuleContext, layers: Sequence[LayerInfo], compressor: str, *,
                    names: Sequence[str] | None = None) -> dict[str, list[Artifact]]:
    """LayerCompress actions for new layers; the inputs ImageAssemble takes for them.
    ``names`` name the compressed outputs (default ``layer<i>``): names that do not
    shift when layers are added keep the actions' keys, and so their cache entries."""
    inputs: dict[str, list[Artifact]] = {"layer_tars": [], "layer_metas": [], "blobs": [], "blob_metas": []}
    for i, layer in enumerate(layers):
        inputs["layer_metas"].append(layer.meta)
        # The image tree holds a compressed layer as its blob only: the tars go to the
        # assembly only for an uncompressed image.
        if layer.blob is not None and layer.blob_meta is not None and layer.blob_compressor == compressor:
            inputs["blobs"].append(layer.blob)
            inputs["blob_metas"].append(layer.blob_meta)
            continue
        if layer.tar is None:
            ctx.fail(f"the layer of {layer.label} is stored {layer.blob_compressor}-compressed only, "
                     f"but this image is compressed with {compressor!r}")
        if compressor == "none":
            inputs["layer_tars"].append(layer.tar)
            continue
        stem = names[i] if names is not None else f"layer{i}"
        blob = ctx.declare_internal(f"{stem}.{compressor}")
        blob_meta = ctx.declare_internal(f"{stem}.{compressor}.json")
        ctx.actions.declare("LayerCompress", inputs={"tar": [layer.tar], "meta": [layer.meta]},
                            outputs={"blob": blob, "meta": blob_meta}, params={"compressor": compressor},
                            description=f"LayerCompress {ctx.label} layer {i} ({compressor})",
                            uses={"compressors": [compressor]})
        inputs["blobs"].append(blob)
        inputs["blob_metas"].append(blob_meta)
    return inputs


# --------------------------------------------------------------------------- pure_layer


def pure_layer_plan(ctx: RuleContext) -> LayerPlan:
    """The analysis half of the ``pure_layer`` layer kind: the packages' files (with
    their runtime closure) as the ``contents`` slot and where each goes, with the uid,
    gid, keep_contents_dirlinks and extra_commands attributes (LayerWrite's parameters)."""
    check_ids(ctx)
    packages = [dep[PackageInfo] for dep in ctx.attr.copy_to_root]
    arts, placements = layer_placements(packages)
    labels: list[str] = []
    for _, _, label in placements:
        if label not in labels:
            labels.append(label)
    return LayerPlan(inputs={"contents": arts},
                     attrs={"placements": placements, "uid": ctx.attr.uid, "gid": ctx.attr.gid,
                            "keep_contents_dirlinks": ctx.attr.keep_contents_dirlinks,
                            "extra_commands": ctx.attr.extra_commands},
                     packages=labels)


_LAYER_ATTRS = {
    "copy_to_root": attrs.label_list(doc="Packages copied to the root of the layer, with their runtime closure.",
                                     default=[], providers=[PackageInfo]),
    "keep_contents_dirlinks": attrs.boolean(
        doc="When a package places files below a path that an earlier package made a symlink to a "
            "directory, keep the symlink and put the files where it points (rsync -K); by default the "
            "later directory replaces the symlink.", default=False),
    "extra_commands": attrs.string(doc="Shell commands run in the layer's root directory before it is "
                                       "packed (in the command sandbox, not chrooted, not as root).", default=""),
    "uid": attrs.integer(doc="Numeric owner of the layer's files.", default=0),
    "gid": attrs.integer(doc="Numeric group of the layer's files.", default=0),
}

#: The attributes of the ``pure_layer`` layer kind (image takes them too, for its own layer).
PURE_LAYER_ATTRS = _LAYER_ATTRS
PURE_LAYER_DOC = ("A layer made of packages' files (mkPureLayer): a deterministic tar with fixed mtimes and "
                  "numeric owners. Use it in `image(layers = [...])`.")


# --------------------------------------------------------------------------- image


def declare_image(ctx: RuleContext, *, layers: Sequence[LayerInfo], base: ImageInfo | None, config: dict[str, Any],
                  repository: str, tag: str | None, compressor: str, mnemonic: str = "ImageAssemble",
                  extra_params: Mapping[str, Any] | None = None, layer_names: Sequence[str] | None = None,
                  extra_inputs: Mapping[str, Sequence[Artifact]] | None = None,
                  layer_count: int | None = -1) -> list[Provider]:
    """Compress ``layers`` and declare the image tree (ImageAssemble, or ``mnemonic``
    built on it), the docker-archive, OCI layout and NAME.json; return the providers.
    ``layer_count``: how many layers the image has in all when the assembly may leave
    some of ``layers`` out (None: unknown until it runs); by default the base's and
    ``layers``."""
    inputs = compress_layers(ctx, layers, compressor, names=layer_names)
    if base is not None:
        inputs["base"] = [base.image]
    for slot, arts in (extra_inputs or {}).items():
        inputs[slot] = list(arts)
    tree = ctx.declare_internal("image", is_tree=True)
    description = ctx.declare_file(f"{ctx.name}.json")
    ext = {"none": "", "gz": ".gz", "zstd": ".zst"}.get(compressor, "." + compressor)
    ctx.actions.declare(
        mnemonic, inputs=inputs, outputs={"image": tree, "description": description},
        params={"label": ctx.label, "repository": repository, "tag": tag, "config": config,
                "architecture": ctx.attr.architecture, "os": "linux", "created": ctx.attr.created,
                "compressor": compressor, "layer_labels": [layer.label for layer in layers],
                "archive": f"{description.root}/{ctx.name}.tar{ext}",
                "oci_layout": f"{description.root}/{ctx.name}.oci", **(extra_params or {})},
        description=f"{mnemonic} {ctx.label}", cacheable=ctx.attr.created != "now",
        uses={"compressors": [compressor]})
    files = declare_image_outputs(ctx, image_tree=tree, description=description, compressor=compressor)
    if layer_count == -1:
        base_count = 0 if base is None else base.layers
        layer_count = None if base_count is None else base_count + len(layers)
    return [DefaultInfo(files=tuple(files)),
            ImageInfo(label=ctx.label, image=tree, description=description, layers=layer_count)]


def _image_impl(ctx: RuleContext) -> list[Provider]:
    check_ids(ctx)
    check_created(ctx)
    config = check_config(ctx)
    repo = repository_name(ctx)
    tag = check_tag(ctx)
    check_architecture(ctx)
    base_dep = ctx.attr.from_image
    base = base_dep[ImageInfo] if isinstance(base_dep, Dependency) else None
    layers = [dep[LayerInfo] for dep in ctx.attr.layers]
    packages = [dep[PackageInfo] for dep in ctx.attr.copy_to_root]
    if ctx.attr.run_as_root is not None:
        # buildImage with runAsRoot: the new layer is a root layer (mkRootLayer) over the
        # base and `layers`, holding copy_to_root and what the script and extra_commands change.
        from dtbuild.rules.builtin.root_layer import check_vm_sizes, declare_root_layer

        check_vm_sizes(ctx)
        layers.append(declare_root_layer(
            ctx, tar=ctx.declare_internal("layer.tar"), meta=ctx.declare_internal("layer.json"), base=base,
            lower_layers=list(layers), packages=packages, script=ctx.attr.run_as_root,
            extra_commands=ctx.attr.extra_commands, disk_size=ctx.attr.disk_size,
            memory_size=ctx.attr.build_vm_memory_size, uid=ctx.attr.uid, gid=ctx.attr.gid,
            keep_contents_dirlinks=ctx.attr.keep_contents_dirlinks))
    elif packages or ctx.attr.extra_commands or not (layers or base):
        # Compressed, the layer is written as its blob only (no uncompressed copy).
        layers.append(declare_layer(ctx, tar=ctx.declare_internal("layer.tar") if ctx.attr.compressor == "none"
                                    else None,
                                    meta=ctx.declare_internal("layer.json"), packages=packages, base=base,
                                    compressor=ctx.attr.compressor))
    return declare_image(ctx, layers=layers, base=base, config=config, repository=repo, tag=tag,
                         compressor=ctx.attr.compressor)


_IMAGE_COMMON = {
    "tag": attrs.string(doc="Image tag; None derives it from the image's content (as dockerTools does).",
                        default=None, allow_none=True),
    "image_name": attrs.string(doc="Repository name in the image's tags; default: the target name.",
                               default=None, allow_none=True),
    "from_image": attrs.label(doc="Base image: any image target (image, layered_image, image_archive, "
                                  "pull_image).", default=None, allow_none=True, providers=[ImageInfo]),
    "config": attrs.dictionary(doc="Image config: Env (appended to the base's, replacing same-named "
                                   "variables), Cmd, Entrypoint, ExposedPorts, WorkingDir, User, Labels, "
                                   "Volumes, StopSignal, Healthcheck.", default={}),
    "architecture": attrs.string(doc="Image architecture (GOARCH spelling).", default="amd64"),
    "created": attrs.string(doc="Creation time recorded in the config only (layers never change with it); "
                                "'now' makes the image deliberately non-reproducible.", default=DEFAULT_CREATED),
    "compressor": attrs.string(doc="Compressor of the docker-archive and of OCI layer blobs.", default="gz",
                               values_from="compressors"),
}
#: The attributes every built image shares (layered_image takes them too).
IMAGE_COMMON_ATTRS = _IMAGE_COMMON

image = rule(
    "image", _image_impl,
    doc="An image (buildImage): the base image's layers, then `layers`, then one layer with "
        "`copy_to_root` and `extra_commands`. Outputs NAME.tar[.gz|.zst] (docker-archive), "
        "NAME.oci/ (OCI layout) and NAME.json.",
    attrs={
        **_IMAGE_COMMON,
        **_LAYER_ATTRS,
        "layers": attrs.label_list(doc="Extra layers added after the base image's: pure_layer, root_layer or "
                                       "any other layer kind's targets.", default=[], providers=[LayerInfo]),
        "run_as_root": attrs.string(doc="A shell script run (with `set -e`, by the image's /bin/sh) as root, "
                                        "chrooted in an overlay over the base image and `layers`, with /dev, "
                                        "/proc and /sys mounted and no network; the new layer is then the "
                                        "overlay's upper directory (copy_to_root, what the script changed, "
                                        "deletions as whiteouts, then extra_commands run in it). See root_layer "
                                        "for the executor and the network.", default=None, allow_none=True),
        "disk_size": attrs.integer(doc="Size in MiB of the VM's disk that holds the new layer while the vm "
                                       "executor builds it (run_as_root).", default=1024),
        "build_vm_memory_size": attrs.integer(doc="Memory in MiB of the VM of the vm executor (run_as_root).",
                                              default=512),
    })


# --------------------------------------------------------------------------- image_archive


def _image_archive_impl(ctx: RuleContext) -> list[Provider]:
    srcs = ctx.files("src")
    if len(srcs) != 1:
        ctx.fail(f"must name exactly one archive file (or an OCI layout directory, as a files() target), "
                 f"but names {len(srcs)} files", attr="src")
    tree = ctx.declare_internal("image", is_tree=True)
    description = ctx.declare_file(f"{ctx.name}.json")
    ctx.actions.declare("ImageImport", inputs={"src": srcs}, outputs={"image": tree, "description": description},
                        params={"label": ctx.label, "index": ctx.attr.index},
                        description=f"ImageImport {ctx.label}")
    return [DefaultInfo(files=(description,)), ImageInfo(label=ctx.label, image=tree, description=description)]


image_archive = rule(
    "image_archive", _image_archive_impl,
    doc="A base image read from a docker-archive (plain, gzip or zstd), an OCI archive or an OCI layout.",
    attrs={
        "src": attrs.source(doc="The archive: a path in the package, or a label whose output it is."),
        "index": attrs.integer(doc="Which image of a multi-image archive to take (0: the first).", default=0),
    })
