"""The analysis half of an image's software bill of materials (``sbom = True`` on
``image`` and ``layered_image``; docs/sbom.md).

An image with an sbom is assembled twice: first without it (the image the document
describes), then with one more layer on top holding the SPDX 2.3 document at
:data:`SBOM_PATH`. The ``SpdxDocument`` action (``plugins/builtin/spdx.py``) reads the
first image's layers, writes the document as ``NAME.spdx.json`` and the layer that holds
it, in one pass; the second assembly is ``ImageAssemble`` over the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dtbuild.rules import attrs
from dtbuild.rules.api import RuleContext
from dtbuild.rules.artifacts import Artifact
from dtbuild.rules.providers import ImageInfo, LayerInfo, PackageInfo

#: Where the document is in the image (without the leading '/', as layers name paths).
SBOM_PATH = "var/lib/dtbuild/sbom.spdx.json"

#: The ``sbom`` attribute of ``image`` and ``layered_image``.
SBOM_ATTR = attrs.boolean(
    doc="Put a software bill of materials in the image: an SPDX 2.3 JSON document at "
        f"/{SBOM_PATH}, in a layer of its own on top, listing every regular file of the image with "
        "its SHA256 and the package (target) and layer it comes from; also written as NAME.spdx.json. "
        "See docs/sbom.md.", default=False)


def package_version(package: PackageInfo) -> str | None:
    """A package's version, where its provider knows one (a ``version`` field that
    package-source rules may give their PackageInfo); None otherwise."""
    version = getattr(package, "version", None)
    return version if isinstance(version, str) and version else None


def sbom_packages(packages: Sequence[PackageInfo]) -> tuple[list[Artifact], list[list[Any]], list[dict[str, Any]]]:
    """What the document needs to know of ``packages`` and their runtime closure: their
    artifacts, where each is placed (``[input index, destination, label]``) and each
    package's ``{"label", "version", "deps"}``, in closure order."""
    arts: list[Artifact] = []
    placements: list[list[Any]] = []
    described: list[dict[str, Any]] = []
    seen: set[str] = set()
    for top in packages:
        for pkg in top.closure():
            if pkg.label in seen:
                continue
            seen.add(pkg.label)
            described.append({"label": pkg.label, "version": package_version(pkg),
                              "deps": sorted({d.label for d in pkg.deps})})
            for entry in pkg.entries:
                placements.append([len(arts), entry.dest, pkg.label])
                arts.append(entry.artifact)
    return arts, placements, described


def declare_sbom_layer(ctx: RuleContext, *, image: Artifact, base: ImageInfo | None,
                       packages: Sequence[PackageInfo], compressor: str, created: str) -> tuple[LayerInfo, Artifact]:
    """Declare the SpdxDocument action of ``image`` (the image tree without its sbom):
    the document ``NAME.spdx.json`` and the layer that holds it (compressed by
    ``compressor`` in the same pass unless it is none). ``created``: the image's, as its
    config has it (or "now"), for the document's creation time. ``packages``: the packages the
    rule put into the image (with their closure), so each file is attributed to the
    package that placed it; ``base`` names the files of base layers dtbuild did not write."""
    arts, placements, described = sbom_packages(packages)
    spdx = ctx.declare_file(f"{ctx.name}.spdx.json")
    meta = ctx.declare_internal("sbom/layer.json")
    outputs = {"spdx": spdx, "meta": meta}
    compressed = compressor != "none"
    tar = blob = blob_meta = None
    if compressed:
        blob = outputs["blob"] = ctx.declare_internal(f"sbom/layer.{compressor}")
        blob_meta = outputs["blob_meta"] = ctx.declare_internal(f"sbom/layer.{compressor}.json")
    else:
        tar = outputs["tar"] = ctx.declare_internal("sbom/layer.tar")
    ctx.actions.declare(
        "SpdxDocument", inputs={"image": [image], "contents": arts}, outputs=outputs,
        params={"label": ctx.label, "base_label": base.label if base is not None else None,
                "packages": described, "placements": placements, "created": created, "path": SBOM_PATH,
                "compressor": compressor if compressed else None},
        description=f"SpdxDocument {ctx.label}", cacheable=created != "now",
        uses={"compressors": [compressor]} if compressed else None)
    layer = LayerInfo(label=f"{ctx.label} sbom", tar=tar, meta=meta, blob=blob, blob_meta=blob_meta,
                      blob_compressor=compressor if compressed else None)
    return layer, spdx
