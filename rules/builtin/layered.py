"""Layered images and what is made of whole images: ``layered_image``
(buildLayeredImage / streamLayeredImage), ``merge_images`` (mergeImages) and
``export_image`` (exportImage).

It also owns the two pure algorithms of layering, documented in docs/layering.md:
:func:`popularity_order` (nixpkgs' referencesByPopularity) and :func:`plan_layers`
(how many packages get a layer of their own, as dockerTools computes it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dtbuild.rules import attrs
from dtbuild.rules.api import Dependency, RuleContext, rule
from dtbuild.rules.artifacts import Artifact
from dtbuild.rules.builtin.image import (
    IMAGE_COMMON_ATTRS,
    check_architecture,
    check_config,
    check_created,
    check_ids,
    check_tag,
    declare_image,
    declare_layer,
    layer_placements,
    repository_name,
)
from dtbuild.rules.builtin.sbom import SBOM_ATTR
from dtbuild.rules.providers import DefaultInfo, ImageInfo, LayerInfo, PackageInfo, Provider

# --------------------------------------------------------------------------- popularity


def popularity_counts(roots: Sequence[str], deps: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """The popularity of every node reachable from ``roots``, as nixpkgs'
    referencesByPopularity computes it for the closure of a single root whose
    references are ``roots`` (docs/layering.md gives the definition and examples).

    :param roots: the top-level nodes (an image's ``contents``).
    :param deps: each node's direct dependencies; nodes without an entry have none.
    :raises ValueError: when the graph has a cycle.
    """
    # below[n][x]: the contest score of x in the graph hanging below n, computed
    # children first with an explicit stack (closures can be deeper than Python's
    # recursion limit).
    below: dict[str, dict[str, int]] = {}
    on_path: set[str] = set()
    for root in dict.fromkeys(roots):
        if root in below:
            continue
        stack: list[tuple[str, bool]] = [(root, False)]
        while stack:
            node, children_done = stack.pop()
            if children_done:
                on_path.discard(node)
                scores: dict[str, int] = {}
                for child in dict.fromkeys(deps.get(node, ())):
                    if child == node:
                        continue  # a self-reference, as Nix paths often have
                    scores[child] = scores.get(child, 0) + 1
                    for descendant, score in below[child].items():
                        scores[descendant] = scores.get(descendant, 0) + score + 1
                below[node] = scores
                continue
            if node in below:
                continue
            if node in on_path:
                raise ValueError(f"dependency cycle through {node}")
            on_path.add(node)
            stack.append((node, True))
            for child in reversed(list(dict.fromkeys(deps.get(node, ())))):
                if child != node and child not in below:
                    if child in on_path:
                        raise ValueError(f"dependency cycle through {child}")
                    stack.append((child, False))
    popularity: dict[str, int] = {}
    for root in dict.fromkeys(roots):
        popularity[root] = popularity.get(root, 0) + 1
        for descendant, score in below[root].items():
            popularity[descendant] = popularity.get(descendant, 0) + score + 1
    return popularity


def popularity_order(roots: Sequence[str], deps: Mapping[str, Sequence[str]]) -> list[str]:
    """Every node reachable from ``roots``, most popular first; nodes of equal
    popularity in ascending order of their names (labels)."""
    popularity = popularity_counts(roots, deps)
    return sorted(popularity, key=lambda node: (-popularity[node], node))


# --------------------------------------------------------------------------- layer budget


class LayerBudgetError(ValueError):
    """``max_layers`` leaves no layer for the contents."""


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """How the packages of a layered image, most popular first, become layers."""

    #: The first ``singles`` packages get a layer each.
    singles: int
    #: The packages after them share one more layer.
    merged: bool


def plan_layers(max_layers: int, base_layers: int, packages: int, *, sbom: bool = False) -> LayerPlan:
    """dockerTools' split: ``max_layers`` minus the base image's layers minus the
    customisation layer (and the sbom's layer, with ``sbom``) are available; with more
    packages than that, all but the last available layer hold one package each and the
    last holds the rest.

    :raises LayerBudgetError: when no layer is left for the contents.
    """
    if max_layers <= 1:
        raise LayerBudgetError(f"max_layers must be greater than 1, but was {max_layers}")
    used = base_layers + 1 + (1 if sbom else 0)
    if used >= max_layers:
        by = (f"'from_image' ({base_layers}), the customisation layer (1) and the sbom layer (1)" if sbom
              else f"'from_image' ({base_layers}) and the customisation layer (1)")
        raise LayerBudgetError(
            f"{used} layers are used by {by}, but only "
            f"max_layers = {max_layers} were allowed: at least 1 layer is required to store the contents")
    available = max_layers - used
    if packages >= available:
        return LayerPlan(singles=available - 1, merged=True)
    return LayerPlan(singles=packages, merged=False)


# --------------------------------------------------------------------------- layered_image


def _layer_stem(label: str) -> str:
    """A package's directory among the image's internal outputs: its label without
    the leading '//' ('//lib/ssl:ssl' -> 'layers/lib/ssl:ssl')."""
    return "layers/" + label.removeprefix("//")


def _closure(contents: Sequence[PackageInfo]) -> tuple[dict[str, PackageInfo], dict[str, list[str]]]:
    packages: dict[str, PackageInfo] = {}
    deps: dict[str, list[str]] = {}
    for top in contents:
        for pkg in top.closure():
            if pkg.label not in packages:
                packages[pkg.label] = pkg
                deps[pkg.label] = [d.label for d in pkg.deps]
    return packages, deps


def _check_owner_name(ctx: RuleContext, attr: str) -> str:
    value: str = ctx.attr[attr]
    if any(c in value for c in ":\n\0") or len(value.encode()) > 32:
        ctx.fail(f"must be a user or group name of at most 32 bytes without ':' or newlines, but was {value!r}",
                 attr=attr)
    return value


def _layered_image_impl(ctx: RuleContext) -> list[Provider]:
    check_ids(ctx)
    check_created(ctx)
    config = check_config(ctx)
    repo = repository_name(ctx)
    tag = check_tag(ctx)
    check_architecture(ctx)
    uname = _check_owner_name(ctx, "uname")
    gname = _check_owner_name(ctx, "gname")
    max_layers = ctx.attr.max_layers
    if max_layers <= 1:
        ctx.fail(f"must be greater than 1 (one layer for the contents, one for the customisation), but was "
                 f"{max_layers}", attr="max_layers")
    if ctx.attr.enable_fakechroot and not ctx.attr.fakeroot_commands:
        ctx.fail("only changes how fakeroot_commands run, but fakeroot_commands is empty", attr="enable_fakechroot",
                 hint="set fakeroot_commands, or remove enable_fakechroot")
    seen: set[str] = set()
    for dep in ctx.attr.contents:
        if dep.label in seen:
            ctx.fail(f"lists {dep.label} twice", attr="contents")
        seen.add(dep.label)
    contents = [dep[PackageInfo] for dep in ctx.attr.contents]
    base_dep = ctx.attr.from_image
    base = base_dep[ImageInfo] if isinstance(base_dep, Dependency) else None

    packages, deps = _closure(contents)
    try:
        order = popularity_order([p.label for p in contents], deps)
    except ValueError as e:  # PackageInfo graphs come from targets, which analysis keeps acyclic
        ctx.fail(f"has a {e}", attr="contents")
        raise AssertionError("unreachable") from e
    # A package without files (merge_trees(only_deps = True)) only brings its
    # dependencies: it takes no layer.
    layered = [label for label in order if packages[label].entries] if ctx.attr.include_store_paths else []

    base_dirs: Artifact | None = None
    if base is not None:
        base_dirs = ctx.declare_internal("base_dirs.json")
        ctx.actions.declare("BaseDirectories", inputs={"base": [base.image]}, outputs={"out": base_dirs},
                            description=f"BaseDirectories {ctx.label}")
    settings = {"uid": ctx.attr.uid, "gid": ctx.attr.gid, "uname": uname, "gname": gname,
                "keep_contents_dirlinks": False, "extra_commands": ""}
    # The sbom's layer counts against max_layers (LayerWriteMerged and the assembly plan with it).
    sbom_budget = {"sbom": True} if ctx.attr.sbom else {}
    layers: list[LayerInfo] = []
    names: list[str] = []
    # How many layers the base has is known now unless a pulled or imported image is
    # below it: then the budget is known now and each layer action gets exactly its
    # packages.
    planned = base is None or base.layers is not None
    if planned:
        try:
            plan = plan_layers(max_layers, base.layers or 0 if base is not None else 0, len(layered),
                               sbom=ctx.attr.sbom)
        except LayerBudgetError as e:
            ctx.fail(str(e), hint="raise max_layers, or use a base image with fewer layers")
        singles, merged = plan.singles, plan.merged
    else:
        # How many layers the base has is known once it is built or imported: declare
        # a layer for each of the first max_layers - 2 packages (- 3 with an sbom: the
        # most that can fit) and a merged layer that picks its packages then; the assembly takes
        # the layers the budget allows.
        singles, merged = min(len(layered), max_layers - (3 if ctx.attr.sbom else 2)), bool(layered)
    for label in layered[:singles]:
        stem = _layer_stem(label)
        layers.append(declare_layer(
            ctx, tar=ctx.declare_internal(f"{stem}/layer.tar"), meta=ctx.declare_internal(f"{stem}/layer.json"),
            packages=[packages[label]], closure=False, settings=settings, base_dirs=base_dirs,
            description=f"LayerWrite {ctx.label} {label}"))
        names.append(f"{stem}/layer")
    if merged:
        merged_tar, merged_meta = ctx.declare_internal("merged/layer.tar"), ctx.declare_internal("merged/layer.json")
        if planned:
            rest = layered[singles:]
            layers.append(declare_layer(
                ctx, tar=merged_tar, meta=merged_meta, packages=[packages[label] for label in rest], closure=False,
                settings=settings, base_dirs=base_dirs,
                description=f"LayerWrite {ctx.label} merged ({len(rest)} packages)"))
        else:
            layers.append(declare_layer(
                ctx, tar=merged_tar, meta=merged_meta, packages=[packages[label] for label in layered],
                closure=False, base_dirs=base_dirs,
                settings={**settings, "max_layers": max_layers, "order": layered, **sbom_budget},
                mnemonic="LayerWriteMerged", description=f"LayerWriteMerged {ctx.label}"))
        names.append("merged/layer")

    # The commands of the customisation layer run in the union of every package of the
    # closure, so that layer reads them all; without commands it is the empty layer and
    # reads none, and the image assembly checks that the packages agree on every path.
    arts, placements = layer_placements(contents)
    commands = bool(ctx.attr.extra_commands or ctx.attr.fakeroot_commands)
    custom_tar = ctx.declare_internal("customisation/layer.tar")
    custom_meta = ctx.declare_internal("customisation/layer.json")
    inputs: dict[str, list[Artifact]] = {"contents": arts if commands else []}
    if base_dirs is not None and commands:
        inputs["base_dirs"] = [base_dirs]
    ctx.actions.declare(
        "CustomisationLayer", inputs=inputs, outputs={"tar": custom_tar, "meta": custom_meta},
        params={"placements": placements if commands else [], "uid": ctx.attr.uid, "gid": ctx.attr.gid,
                "uname": uname, "gname": gname, "extra_commands": ctx.attr.extra_commands,
                "fakeroot_commands": ctx.attr.fakeroot_commands, "enable_fakechroot": ctx.attr.enable_fakechroot},
        description=f"CustomisationLayer {ctx.label}")
    layers.append(LayerInfo(label=f"{ctx.label} customisation", tar=custom_tar, meta=custom_meta))
    names.append("customisation/layer")
    check: dict[str, list[Artifact]] = {}
    if not commands:
        check["contents"] = arts
        if base_dirs is not None:
            check["base_dirs"] = [base_dirs]

    return declare_image(
        ctx, layers=layers, base=base, config=config, repository=repo, tag=tag, compressor=ctx.attr.compressor,
        mnemonic="LayeredImageAssemble", layer_names=names, extra_inputs=check,
        layer_count=(base.layers or 0 if base is not None else 0) + len(layers) if planned else None,
        extra_params={"layering": {"max_layers": max_layers, "packages": len(layered), "singles": singles,
                                   "merged": merged, "planned": planned, **sbom_budget},
                      "union": [] if commands else placements},
        sbom=contents if ctx.attr.sbom else None)


layered_image = rule(
    "layered_image", _layered_image_impl,
    doc="A layered image (buildLayeredImage / streamLayeredImage): the base image's layers, then one layer "
        "per package of the runtime closure of `contents`, most popular first (nixpkgs' "
        "referencesByPopularity, see docs/layering.md), the packages beyond `max_layers` sharing the last "
        "one, then the customisation layer: what `extra_commands` and `fakeroot_commands` change in the "
        "union of the packages. Images sharing packages share those layers byte for byte. Outputs "
        "NAME.tar[.gz|.zst], NAME.oci/ and NAME.json; `dtbuild stream` writes the archive to stdout.",
    attrs={
        **IMAGE_COMMON_ATTRS,
        "contents": attrs.label_list(doc="Packages in the image, with their runtime closure (`deps`).", default=[],
                                     providers=[PackageInfo]),
        "max_layers": attrs.integer(doc="Most layers the image may have, base image and customisation layer "
                                        "included; must be greater than 1.", default=100),
        "extra_commands": attrs.string(doc="Shell commands run in the customisation root (the union of the "
                                           "packages) before fakeroot_commands; in the command sandbox, not as root.",
                                       default=""),
        "fakeroot_commands": attrs.string(doc="Shell commands run in the customisation root under fakeroot: "
                                              "chown, chmod and `mknod PATH c MAJOR MINOR` show in the "
                                              "customisation layer's tar headers, as root and as an ordinary "
                                              "user alike (fakeroot records them; no real device is made).",
                                          default=""),
        "enable_fakechroot": attrs.boolean(doc="Run fakeroot_commands with the customisation root as / (through "
                                               "proot), with the image's own /bin/sh and tools, and the build "
                                               "sandbox's /dev, /proc and /sys bound in (never in the layer).",
                                           default=False),
        "include_store_paths": attrs.boolean(doc="Put the packages in the image. False leaves out their layers: the "
                                                 "image holds only the customisation layer (what the commands made "
                                                 "or changed), for root file systems provided by other means.",
                                             default=True),
        "sbom": SBOM_ATTR,
        "uid": attrs.integer(doc="Numeric owner of the packages' files (and of what the commands create, unless "
                                 "fakeroot_commands changes it).", default=0),
        "gid": attrs.integer(doc="Numeric group of the packages' files.", default=0),
        "uname": attrs.string(doc="User name written with `uid` in the tar headers.", default="root"),
        "gname": attrs.string(doc="Group name written with `gid` in the tar headers.", default="root"),
    })


# --------------------------------------------------------------------------- merge_images


def _archive_extension(compressor: str) -> str:
    return {"none": "", "gz": ".gz", "zstd": ".zst"}.get(compressor, "." + compressor)


def _merge_images_impl(ctx: RuleContext) -> list[Provider]:
    if not ctx.attr.images:
        ctx.fail("must list at least one image", attr="images")
    seen: set[str] = set()
    for dep in ctx.attr.images:
        if dep.label in seen:
            ctx.fail(f"lists {dep.label} twice", attr="images")
        seen.add(dep.label)
    compressor = ctx.attr.compressor
    archive = ctx.declare_file(f"{ctx.name}.tar{_archive_extension(compressor)}")
    ctx.actions.declare("MergeImages", inputs={"images": [dep[ImageInfo].image for dep in ctx.attr.images]},
                        outputs={"archive": archive}, params={"compressor": compressor},
                        description=f"MergeImages {ctx.label} ({len(ctx.attr.images)} images)",
                        uses={"compressors": [compressor]})
    return [DefaultInfo(files=(archive,))]


merge_images = rule(
    "merge_images", _merge_images_impl,
    doc="One docker-archive (mergeImages) that `docker load` reads into every image of `images` with its "
        "tags; a layer several images share is stored once. Images whose layers were compressed "
        "differently merge as well: the archive holds every layer uncompressed, compressed as a whole.",
    attrs={
        "images": attrs.label_list(doc="Image targets to merge, in order.", providers=[ImageInfo]),
        "compressor": attrs.string(doc="Compressor of the archive: NAME.tar, NAME.tar.gz or NAME.tar.zst.",
                                   default="gz", values_from="compressors"),
    })


# --------------------------------------------------------------------------- export_image


def _export_image_impl(ctx: RuleContext) -> list[Provider]:
    out = ctx.declare_file(f"{ctx.name}.tar")
    ctx.actions.declare("ImageExport", inputs={"image": [ctx.attr.from_image[ImageInfo].image]},
                        outputs={"tar": out}, description=f"ImageExport {ctx.label}")
    return [DefaultInfo(files=(out,))]


export_image = rule(
    "export_image", _export_image_impl,
    doc="The flattened root file system of an image as one tar (exportImage): every layer applied in "
        "order, whiteouts and opaque directories included, hard links as copies, sorted entries, mtime 1.",
    attrs={
        "from_image": attrs.label(doc="The image to flatten: any image target.", providers=[ImageInfo]),
    })
