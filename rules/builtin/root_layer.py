"""The ``root_layer`` rule (dockerTools' mkRootLayer) and :func:`declare_root_layer`,
which ``image(run_as_root = ...)`` uses too.

A root layer is declared as two actions: ``RootfsUnpack`` (the base image's layers
flattened into a tree plus an owners sidecar, cached per base) and ``RootLayerWrite``
(the script run as root in an overlay over that tree; the layer is the overlay's upper
directory). See docs/root-layers.md.
"""

from __future__ import annotations

from dtbuild.rules import attrs
from dtbuild.rules.api import RuleContext, rule
from dtbuild.rules.artifacts import Artifact
from dtbuild.rules.builtin.image import layer_placements
from dtbuild.rules.providers import DefaultInfo, ImageInfo, LayerInfo, PackageInfo, Provider

#: Smallest sizes a VM can work with (a Debian kernel and the initramfs need ~100 MiB).
MIN_DISK_SIZE = 16
MIN_MEMORY_SIZE = 128


def check_vm_sizes(ctx: RuleContext) -> None:
    if ctx.attr.disk_size < MIN_DISK_SIZE:
        ctx.fail(f"must be at least {MIN_DISK_SIZE} (MiB), but was {ctx.attr.disk_size}", attr="disk_size")
    if ctx.attr.build_vm_memory_size < MIN_MEMORY_SIZE:
        ctx.fail(f"must be at least {MIN_MEMORY_SIZE} (MiB), but was {ctx.attr.build_vm_memory_size}",
                 attr="build_vm_memory_size")


def check_executor(ctx: RuleContext, executor: str) -> None:
    names = list(ctx.registry.get("executors", ()))
    if executor != "auto" and names and executor not in names:
        from difflib import get_close_matches

        choices = ["auto", *sorted(names)]
        close = get_close_matches(executor, choices, n=1)
        ctx.fail(f"must be one of {', '.join(choices)}, but was {executor!r}", attr="executor",
                 hint=f"did you mean '{close[0]}'?" if close else None)


def declare_root_layer(ctx: RuleContext, *, tar: Artifact, meta: Artifact, base: ImageInfo | None,
                       lower_layers: list[LayerInfo], packages: list[PackageInfo], script: str,
                       extra_commands: str, disk_size: int, memory_size: int, executor: str = "auto",
                       network: bool = False, uid: int = 0, gid: int = 0,
                       keep_contents_dirlinks: bool = False, tools: list[Artifact] | None = None) -> LayerInfo:
    """Declare the actions of a root layer over ``base`` and ``lower_layers`` (applied
    in order): ``packages`` are copied to the root first, then ``script`` runs as root
    chrooted in the overlay, with the toolbox and ``tools`` (files of the ``tools``
    attribute) on its PATH, then ``extra_commands`` in the layer's directory."""
    inputs: dict[str, list[Artifact]] = {}
    if base is not None or lower_layers:
        rootfs = ctx.declare_internal("rootfs", is_tree=True)
        owners = ctx.declare_internal("rootfs-owners.json")
        lower_tars = [layer.tar for layer in lower_layers if layer.tar is not None]
        if len(lower_tars) != len(lower_layers):  # layers of `layers` attributes always have their tar
            ctx.fail("a lower layer of a root layer has no uncompressed tar", attr="layers")
        unpack_inputs: dict[str, list[Artifact]] = {"base": [base.image] if base is not None else [],
                                                    "layers": lower_tars}
        ctx.actions.declare("RootfsUnpack", inputs=unpack_inputs, outputs={"rootfs": rootfs, "owners": owners},
                            params={}, description=f"RootfsUnpack {ctx.label}")
        inputs = {"rootfs": [rootfs], "owners": [owners]}
    arts, placements = layer_placements(packages)
    inputs["contents"] = arts
    inputs["tools"] = list(tools or [])
    ctx.actions.declare(
        "RootLayerWrite", inputs=inputs, outputs={"tar": tar, "meta": meta},
        params={"placements": placements, "script": script, "extra_commands": extra_commands,
                "disk_size": disk_size, "memory_size": memory_size, "network": network, "uid": uid, "gid": gid,
                "keep_contents_dirlinks": keep_contents_dirlinks},
        description=f"RootLayerWrite {ctx.label}", executor=executor, network=network)
    return LayerInfo(label=ctx.label, tar=tar, meta=meta)


def _root_layer_impl(ctx: RuleContext) -> list[Provider]:
    check_vm_sizes(ctx)
    check_executor(ctx, ctx.attr.executor)
    if not ctx.attr.run_as_root.strip():
        ctx.fail("must be a shell script, but is empty", attr="run_as_root",
                 hint="use pure_layer for a layer made of files only")
    tar = ctx.declare_file(f"{ctx.name}.tar")
    layer = declare_root_layer(
        ctx, tar=tar, meta=ctx.declare_internal("layer.json"),
        base=ctx.attr.from_image[ImageInfo], lower_layers=[],
        packages=[dep[PackageInfo] for dep in ctx.attr.copy_to_root], script=ctx.attr.run_as_root,
        extra_commands=ctx.attr.extra_commands, disk_size=ctx.attr.disk_size,
        memory_size=ctx.attr.build_vm_memory_size, executor=ctx.attr.executor, network=ctx.attr.network,
        tools=ctx.files("tools"))
    return [DefaultInfo(files=(tar,)), layer]


#: Attribute docs shared with ``image``'s run_as_root.
RUN_AS_ROOT_DOC = ("A shell script run (with `set -e`, by the image's /bin/sh, or the toolbox's busybox sh when "
                   "the image has none) as root, chrooted in an overlay over the base image, with /dev, /proc and "
                   "/sys mounted and no network. The toolbox (a static busybox with its applets, groupadd, useradd "
                   "and `tools`) is last on its PATH, mounted read-only at /.dtbuild-toolbox, never in the layer. "
                   "What the script adds, changes or deletes becomes the layer (deletions as whiteouts).")
TOOLS_DOC = ("Programs for run_as_root, added to its toolbox (never to the layer): each file (a fetch_url'd static "
             "binary, a genrule's output, a path) at /.dtbuild-toolbox/bin/NAME, each directory (a files target) "
             "merged at /.dtbuild-toolbox, so its bin/ holds its programs. A tool replaces busybox's applet or "
             "wrapper of the same name. The script runs chrooted: tools must be static or bring what they load.")
DISK_SIZE_DOC = "Size in MiB of the VM's disk that holds the new layer while the vm executor builds it."
MEMORY_SIZE_DOC = "Memory in MiB of the VM of the vm executor."

root_layer = rule(
    "root_layer", _root_layer_impl,
    doc="A layer made by a script run as root in an overlay over a base image (mkRootLayer): the overlay's "
        "upper directory, deletions as whiteouts. Runs in Linux namespaces (`namespace` executor, also as an "
        "ordinary user) or in a QEMU VM (`vm`). Use it in `image(layers = [...])` over the same base.",
    attrs={
        "from_image": attrs.label(doc="The image the script runs over (its root file system is the overlay's "
                                      "lower directory).", providers=[ImageInfo]),
        "copy_to_root": attrs.label_list(doc="Packages copied to the root of the layer before the script runs.",
                                         default=[], providers=[PackageInfo]),
        "run_as_root": attrs.string(doc=RUN_AS_ROOT_DOC),
        "tools": attrs.source_list(doc=TOOLS_DOC, default=[]),
        "extra_commands": attrs.string(doc="Shell commands run as root in the layer's directory (the upper "
                                           "directory, not chrooted) after run_as_root.", default=""),
        "disk_size": attrs.integer(doc=DISK_SIZE_DOC, default=1024),
        "build_vm_memory_size": attrs.integer(doc=MEMORY_SIZE_DOC, default=512),
        "executor": attrs.string(doc="Where the script runs: 'namespace' (Linux namespaces and overlayfs), "
                                     "'vm' (a QEMU virtual machine), or 'auto' (namespace where it works).",
                                 default="auto"),
        "network": attrs.boolean(doc="Let the script use the network. The layer is then not reproducible.",
                                 default=False),
    })
