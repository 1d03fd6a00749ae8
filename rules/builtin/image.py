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
from typing import Any, NoReturn

from dtbuild.rules import attrs
from dtbuild.rules.api import Dependency, LayerPlan, RuleContext, rule
from dtbuild.rules.artifacts import Artifact
from dtbuild.rules.builtin.sbom import SBOM_ATTR, declare_sbom_layer
from dtbuild.rules.providers import DefaultInfo, ImageInfo, LayerInfo, PackageInfo, Provider

DEFAULT_CREATED = "1970-01-01T00:00:01Z"
_CREATED_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
ARCHITECTURES = ("amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64", "mips64le")
#: Other spellings of ARCHITECTURES (the kernel's ``uname -m``, Debian's), and each one
#: itself: the one table from a machine name to the image config's (GOARCH) spelling.
ARCHITECTURE_ALIASES: dict[str, str] = {
    **{arch: arch for arch in ARCHITECTURES},
    "x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm", "armhf": "arm", "i686": "386",
    "i386": "386", "mips64": "mips64le",
}
_OS_RE = re.compile(r"^[a-z0-9]+$")


def host_architecture() -> str:
    """This machine's architecture in GOARCH spelling (``uname -m`` mapped: x86_64 is
    amd64, aarch64 arm64); the machine name itself when no alias is known."""
    import platform

    machine = platform.machine()
    return ARCHITECTURE_ALIASES.get(machine, machine)


# --------------------------------------------------------------------------- the image config

#: The fields of the image config's ``config`` object users may set: every field of the
#: OCI image spec's config, and the Docker ones its image format adds. The value is what
#: a field holds: "string", "strings" (a list of strings), "bool", "int", "set" (a dict
#: whose values are all ``{}``: ExposedPorts, Volumes), "labels" (strings to strings),
#: "healthcheck".
CONFIG_FIELDS: dict[str, str] = {
    # OCI image spec, config
    "User": "string", "ExposedPorts": "set", "Env": "strings", "Entrypoint": "strings", "Cmd": "strings",
    "Volumes": "set", "WorkingDir": "string", "Labels": "labels", "StopSignal": "string", "ArgsEscaped": "bool",
    "Memory": "int", "MemorySwap": "int", "CpuShares": "int", "Healthcheck": "healthcheck",
    # Docker's image format (docker/docker api/types/container.Config)
    "Hostname": "string", "Domainname": "string", "AttachStdin": "bool", "AttachStdout": "bool",
    "AttachStderr": "bool", "Tty": "bool", "OpenStdin": "bool", "StdinOnce": "bool", "Image": "string",
    "NetworkDisabled": "bool", "MacAddress": "string", "OnBuild": "strings", "StopTimeout": "int", "Shell": "strings",
}
#: The fields of ``config.Healthcheck`` (durations are integers of nanoseconds, as in Docker).
HEALTHCHECK_FIELDS: dict[str, str] = {"Test": "strings", "Interval": "int", "Timeout": "int", "StartPeriod": "int",
                                      "StartInterval": "int", "Retries": "int"}
_TYPE_WORDS = {"string": "a string", "strings": "a list of strings", "bool": "True or False",
               "int": "an integer", "set": "a dict whose values are {}", "labels": "a dict of strings to strings",
               "healthcheck": "a dict"}
_PORT_RE = re.compile(r"^[0-9]{1,5}(?:-[0-9]{1,5})?(?:/(?:tcp|udp|sctp))?$")


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
        settings = {"uid": ctx.attr.uid, "gid": ctx.attr.gid, **contents_dirlinks(ctx),
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


def contents_dirlinks(ctx: RuleContext) -> dict[str, bool]:
    """LayerWrite's parameters for the ``keep_contents_dirlinks`` attribute: dockerTools
    copies contents with ``rsync -aK`` with it, ``rsync -ak`` (copy_dirlinks) without."""
    keep = bool(ctx.attr.keep_contents_dirlinks)
    return {"keep_contents_dirlinks": keep, "copy_dirlinks": not keep}


def check_ids(ctx: RuleContext) -> None:
    for attr in ("uid", "gid"):
        value = ctx.attr[attr]
        if not 0 <= value < 2**32:
            ctx.fail(f"must be between 0 and 4294967295, but was {value}", attr=attr)


def created_value(value: str) -> str | None:
    """``created`` as the config records it: an RFC 3339 date-time as given, a date
    (YYYY-MM-DD) as its midnight UTC, "now" as it is (the assembly reads the clock);
    None when it is none of these."""
    import datetime

    if value == "now":
        return value
    if _DATE_RE.match(value):
        text = f"{value}T00:00:00Z"
    elif _CREATED_RE.match(value):
        text = value
    else:
        return None
    try:  # a real day and time (not 2024-02-30 or 25:00)
        datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return text


def check_created(ctx: RuleContext) -> None:
    if created_value(ctx.attr.created) is None:
        ctx.fail(f"must be a date ('2024-05-01'), an RFC 3339 date-time ('{DEFAULT_CREATED}', "
                 f"'2024-05-01T12:00:00+02:00') or 'now', but was {ctx.attr.created!r}", attr="created")


def image_created(ctx: RuleContext) -> str:
    """The checked ``created`` attribute in the spelling the config gets."""
    value = created_value(ctx.attr.created)
    if value is None:
        check_created(ctx)
    return value or DEFAULT_CREATED


def _check_field(ctx: RuleContext, where: str, kind: str, value: Any) -> None:
    """Fail unless ``value`` is what a config field of ``kind`` holds (``where`` names it)."""
    ok = {"string": isinstance(value, str),
          "strings": isinstance(value, list) and all(isinstance(v, str) for v in value),
          "bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "set": isinstance(value, dict) and all(isinstance(k, str) and v == {} for k, v in value.items()),
          "labels": isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in value.items()),
          "healthcheck": isinstance(value, dict)}[kind]
    if not ok:
        ctx.fail(f"field {where} must be {_TYPE_WORDS[kind]}, but was {type(value).__name__} {value!r}",
                 attr="config",
                 hint='write it as {"80/tcp": {}}, as the image config does' if kind == "set" else
                 "durations are integers of nanoseconds (30 s: 30000000000)" if "Healthcheck." in where else None)


def _unknown_field(ctx: RuleContext, key: str, fields: Mapping[str, str], where: str) -> NoReturn:
    from difflib import get_close_matches

    close = get_close_matches(key, list(fields), n=1)
    if not close:  # 'healthcheck', 'workingdir': the field in another case
        lowered = {f.lower(): f for f in fields}
        close = [lowered[m] for m in get_close_matches(key.lower(), list(lowered), n=1)]
    ctx.fail(f"has the unknown field '{where}{key}'", attr="config",
             hint=f"did you mean '{close[0]}'?" if close else f"the fields are {', '.join(sorted(fields))}")


def check_config(ctx: RuleContext) -> dict[str, Any]:
    """The ``config`` attribute, checked field by field (docs/image-config.md): every
    field of the image config, None for "not inherited from the base image"."""
    config = ctx.attr.config
    for key, value in config.items():
        kind = CONFIG_FIELDS.get(key)
        if kind is None:
            _unknown_field(ctx, key, CONFIG_FIELDS, "")
        if value is None:
            continue  # the base image's value is dropped
        _check_field(ctx, repr(key), kind, value)
        if key == "Env":
            for item in value:
                if "=" not in item or item.startswith("="):
                    ctx.fail(f"Env entries are 'NAME=value', but one was {item!r}", attr="config")
        elif key == "ExposedPorts":
            for port in value:
                if not _PORT_RE.match(port):
                    ctx.fail(f"field 'ExposedPorts' has {port!r}, which is not a port such as '80/tcp', "
                             "'53/udp' or '8000-8010/tcp'", attr="config")
        elif key == "Volumes":
            for path in value:
                if not path.startswith("/"):
                    ctx.fail(f"field 'Volumes' has {path!r}, which is not an absolute path", attr="config")
        elif key in ("Memory", "MemorySwap", "CpuShares", "StopTimeout") and value < (-1 if key == "MemorySwap"
                                                                                      else 0):
            ctx.fail(f"field {key!r} must not be negative, but was {value}", attr="config")
        elif key == "Healthcheck":
            for field, item in value.items():
                if field not in HEALTHCHECK_FIELDS:
                    _unknown_field(ctx, field, HEALTHCHECK_FIELDS, "Healthcheck.")
                _check_field(ctx, f"'Healthcheck.{field}'", HEALTHCHECK_FIELDS[field], item)
                if field != "Test" and item < 0:
                    ctx.fail(f"field 'Healthcheck.{field}' must not be negative, but was {item}", attr="config")
            test = value.get("Test")
            if test and test[0] not in ("NONE", "CMD", "CMD-SHELL"):
                ctx.fail(f"field 'Healthcheck.Test' must start with 'CMD', 'CMD-SHELL' or 'NONE', but was {test!r}",
                         attr="config", hint="[\"CMD-SHELL\", \"curl -f http://localhost/\"] runs a shell command; "
                                             "[\"CMD\", \"/bin/check\", \"arg\"] a program")
    return config


def check_tag(ctx: RuleContext) -> str | None:
    """The ``tag`` attribute, checked (None: derived from the content)."""
    tag = ctx.attr.tag
    if tag is not None and not _TAG_RE.match(tag):
        ctx.fail(f"must be a valid image tag (letters, digits, '_', '.', '-'; at most 128), but was {tag!r}",
                 attr="tag")
    return tag


def check_architecture(ctx: RuleContext) -> None:
    """Check the ``architecture`` attribute (and ``os``, for rules that have it)."""
    image_architecture(ctx)
    if "os" in ctx.attr and not _OS_RE.match(ctx.attr.os):
        ctx.fail(f"must be an operating system name such as 'linux', but was {ctx.attr.os!r}", attr="os")


def architecture_value(ctx: RuleContext, attr: str, value: str | None, *, variant: bool = False) -> str:
    """``value`` of the architecture attribute ``attr`` in GOARCH spelling: None is this
    machine's, an alias (x86_64, aarch64) is normalised; with ``variant`` a '/variant'
    suffix is kept."""
    if value is None:
        return host_architecture()
    arch, sep, rest = value.partition("/") if variant else (value, "", "")
    found = ARCHITECTURE_ALIASES.get(arch)
    if found is None:
        from difflib import get_close_matches

        close = get_close_matches(arch, list(ARCHITECTURE_ALIASES), n=1)
        ctx.fail(f"must be one of {', '.join(ARCHITECTURES)} (or x86_64, aarch64"
                 f"{', optionally with a variant such as arm/v7' if variant else ''}), but was {value!r}",
                 attr=attr, hint=f"did you mean '{close[0]}'?" if close else None)
    return found + sep + rest


def image_architecture(ctx: RuleContext) -> str:
    """The ``architecture`` attribute, checked and in GOARCH spelling (None: this machine's)."""
    return architecture_value(ctx, "architecture", ctx.attr.architecture)


def image_os(ctx: RuleContext) -> str:
    """The ``os`` attribute (linux for rules without one)."""
    return ctx.attr.os if "os" in ctx.attr else "linux"


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
                            **contents_dirlinks(ctx), "extra_commands": ctx.attr.extra_commands},
                     packages=labels)


_LAYER_ATTRS = {
    "copy_to_root": attrs.label_list(doc="Packages copied to the root of the layer, with their runtime closure.",
                                     default=[], providers=[PackageInfo]),
    "keep_contents_dirlinks": attrs.boolean(
        doc="How packages' symlinks to directories are copied, as dockerTools' rsync of each package into the "
            "layer: by default (rsync -ak) a package's symlink to one of its own directories arrives as a copy of "
            "that directory, so packages that bring `lib/` both as a directory and as a link to `usr/lib` all "
            "land in `lib/`; True (rsync -aK) copies symlinks as they are, and keeps a symlink to a directory that "
            "a later package places files below, putting them where it points. Absolute targets are taken from "
            "the image's root. See docs/image-tree.md.", default=False),
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
                  layer_count: int | None = -1, sbom: Sequence[PackageInfo] | None = None) -> list[Provider]:
    """Compress ``layers`` and declare the image tree (ImageAssemble, or ``mnemonic``
    built on it), the docker-archive, OCI layout and NAME.json; return the providers.
    ``layer_count``: how many layers the image has in all when the assembly may leave
    some of ``layers`` out (None: unknown until it runs); by default the base's and
    ``layers``. ``sbom`` (None: no sbom): the packages the rule put into the image; the
    image then gets one more layer holding its SPDX document, and NAME.spdx.json
    (:mod:`dtbuild.rules.builtin.sbom`)."""
    inputs = compress_layers(ctx, layers, compressor, names=layer_names)
    if base is not None:
        inputs["base"] = [base.image]
    for slot, arts in (extra_inputs or {}).items():
        inputs[slot] = list(arts)
    ext = {"none": "", "gz": ".gz", "zstd": ".zst"}.get(compressor, "." + compressor)
    params: dict[str, Any] = {"label": ctx.label, "repository": repository, "tag": tag, "config": config,
                              "architecture": image_architecture(ctx), "os": image_os(ctx),
                              "created": image_created(ctx), "compressor": compressor,
                              "layer_labels": [layer.label for layer in layers]}
    extra_files: list[Artifact] = []
    if sbom is not None:
        # The image the document describes, then the image with the document's layer on top.
        described = ctx.declare_internal("sbom/image", is_tree=True)
        ctx.actions.declare(
            mnemonic, inputs=inputs, outputs={"image": described,
                                              "description": ctx.declare_internal("sbom/image.json")},
            params={**params, **(extra_params or {})}, description=f"{mnemonic} {ctx.label} (without its sbom)",
            cacheable=ctx.attr.created != "now", uses={"compressors": [compressor]})
        sbom_layer, spdx = declare_sbom_layer(ctx, image=described, base=base, packages=sbom, compressor=compressor,
                                              created=params["created"])
        extra_files.append(spdx)
        inputs = compress_layers(ctx, [sbom_layer], compressor, names=["sbom/layer"])
        inputs["base"] = [described]
        # The described image has the config already: applied again it would be the same.
        params = {**params, "config": {}, "layer_labels": [sbom_layer.label]}
        mnemonic, extra_params = "ImageAssemble", None
    tree = ctx.declare_internal("image", is_tree=True)
    description = ctx.declare_file(f"{ctx.name}.json")
    ctx.actions.declare(
        mnemonic, inputs=inputs, outputs={"image": tree, "description": description},
        params={**params, "archive": f"{description.root}/{ctx.name}.tar{ext}",
                "oci_layout": f"{description.root}/{ctx.name}.oci", **(extra_params or {})},
        description=f"{mnemonic} {ctx.label}", cacheable=ctx.attr.created != "now",
        uses={"compressors": [compressor]})
    files = declare_image_outputs(ctx, image_tree=tree, description=description, compressor=compressor)
    if layer_count == -1:
        base_count = 0 if base is None else base.layers
        layer_count = None if base_count is None else base_count + len(layers)
    if sbom is not None and layer_count is not None:
        layer_count += 1
    return [DefaultInfo(files=(*files, *extra_files)),
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
            keep_contents_dirlinks=ctx.attr.keep_contents_dirlinks, tools=ctx.files("tools")))
    elif ctx.attr.tools:
        ctx.fail("is only used by run_as_root, which this image does not set", attr="tools",
                 hint="set run_as_root, or remove tools")
    elif packages or ctx.attr.extra_commands or not (layers or base):
        # Compressed, the layer is written as its blob only (no uncompressed copy).
        layers.append(declare_layer(ctx, tar=ctx.declare_internal("layer.tar") if ctx.attr.compressor == "none"
                                    else None,
                                    meta=ctx.declare_internal("layer.json"), packages=packages, base=base,
                                    compressor=ctx.attr.compressor))
    return declare_image(ctx, layers=layers, base=base, config=config, repository=repo, tag=tag,
                         compressor=ctx.attr.compressor, sbom=packages if ctx.attr.sbom else None)


_IMAGE_COMMON = {
    "tag": attrs.string(doc="Image tag; None derives it from the image's content (as dockerTools does).",
                        default=None, allow_none=True),
    "image_name": attrs.string(doc="Repository name in the image's tags; default: the target name.",
                               default=None, allow_none=True),
    "from_image": attrs.label(doc="Base image: any image target (image, layered_image, image_archive, "
                                  "pull_image).", default=None, allow_none=True, providers=[ImageInfo]),
    "config": attrs.dictionary(doc="Image config (the image config's `config` object): Env, Cmd, Entrypoint, "
                                   "User, WorkingDir, ExposedPorts, Volumes, Labels, StopSignal, StopTimeout, "
                                   "Healthcheck, Hostname, Domainname, Shell, OnBuild, ArgsEscaped, Memory, "
                                   "MemorySwap, CpuShares and Docker's other fields. Merged with the base image's: "
                                   "Env by variable name (the base's kept, in order, unless set again), Labels, "
                                   "ExposedPorts and Volumes by key, other fields replaced; a field set to None "
                                   "drops the base's. See docs/image-config.md.", default={}),
    "architecture": attrs.string(doc="Image architecture in GOARCH spelling (amd64, arm64, ...; x86_64 and aarch64 "
                                     "are taken as amd64 and arm64). None: the architecture of the machine that "
                                     "builds it, so the same BUILD file gives another image on an arm64 machine; "
                                     "set it to build the same bytes everywhere.", default=None, allow_none=True),
    "os": attrs.string(doc="Operating system recorded in the config.", default="linux"),
    "created": attrs.string(doc="Creation time recorded in the config only (layers never change with it): an RFC "
                                "3339 date-time, or a date ('2024-05-01', midnight UTC). 'now' is the time of the "
                                "build: the image is deliberately not reproducible and its assembly is never "
                                "cached (each build assembles it again).", default=DEFAULT_CREATED),
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
        "sbom": SBOM_ATTR,
        "layers": attrs.label_list(doc="Extra layers added after the base image's: pure_layer, root_layer or "
                                       "any other layer kind's targets.", default=[], providers=[LayerInfo]),
        "run_as_root": attrs.string(doc="A shell script run (with `set -e`, by the image's /bin/sh) as root, "
                                        "chrooted in an overlay over the base image and `layers`, with /dev, "
                                        "/proc and /sys mounted and no network; the new layer is then the "
                                        "overlay's upper directory (copy_to_root, what the script changed, "
                                        "deletions as whiteouts, then extra_commands run in it). See root_layer "
                                        "for the executor, the network and the toolbox (the shell and tools "
                                        "the script gets when the image has none).", default=None,
                                    allow_none=True),
        "tools": attrs.source_list(doc="Programs added to run_as_root's toolbox, never to the image: see "
                                       "root_layer's tools.", default=[]),
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
    params: dict[str, Any] = {"label": ctx.label, "index": ctx.attr.index}
    image_name, tag = ctx.attr.image_name, ctx.attr.tag
    if image_name is not None or tag is not None:
        if ctx.attr.index != 0:
            ctx.fail("picks an image by position, but image_name/tag pick one by name", attr="index",
                     hint="give either index, or image_name and tag")
        if image_name is not None and (not image_name or "@" in image_name
                                       or ":" in image_name.rsplit("/", 1)[-1]):
            ctx.fail(f"must be a repository name without a tag or digest, but was {image_name!r}", attr="image_name",
                     hint="put the tag in tag")
        if tag is not None and not _TAG_RE.match(tag):
            ctx.fail(f"must be a valid image tag (letters, digits, '_', '.', '-'; at most 128), but was {tag!r}",
                     attr="tag")
        # Only when given: the keys of archives picked by index stay as they were.
        params["image_name"], params["tag"] = image_name, tag
    tree = ctx.declare_internal("image", is_tree=True)
    description = ctx.declare_file(f"{ctx.name}.json")
    ctx.actions.declare("ImageImport", inputs={"src": srcs}, outputs={"image": tree, "description": description},
                        params=params, description=f"ImageImport {ctx.label}")
    return [DefaultInfo(files=(description,)), ImageInfo(label=ctx.label, image=tree, description=description)]


image_archive = rule(
    "image_archive", _image_archive_impl,
    doc="A base image read from a docker-archive (plain, gzip or zstd), an OCI archive or an OCI layout. An "
        "archive of several images gives the one `image_name`/`tag` name (buildImage's fromImageName and "
        "fromImageTag), else the one at `index`.",
    attrs={
        "src": attrs.source(doc="The archive: a path in the package, or a label whose output it is."),
        "index": attrs.integer(doc="Which image of a multi-image archive to take (0: the first), when image_name "
                                   "and tag are None.", default=0),
        "image_name": attrs.string(doc="Take the image tagged with this repository name (fromImageName): "
                                       "'app', 'registry.example.com/team/app' ('docker.io/library/' may be left "
                                       "out). With tag None, its first tag.", default=None, allow_none=True),
        "tag": attrs.string(doc="Take the image with this tag (fromImageTag), of image_name's repository, or of "
                                "any repository when image_name is None.", default=None, allow_none=True),
    })
