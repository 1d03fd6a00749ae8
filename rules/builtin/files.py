"""``files``: a package made of source files (and other targets' outputs) placed under
a prefix in the image."""

from __future__ import annotations

from dtbuild.rules import attrs
from dtbuild.rules.api import Dependency, RuleContext, rule
from dtbuild.rules.artifacts import Artifact
from dtbuild.rules.providers import DefaultInfo, PackageEntry, PackageInfo, Provider


def parse_mode(ctx: RuleContext, attr: str) -> int | None:
    """An octal mode string attribute ('0755') as an int, or None when unset."""
    value = ctx.attr[attr]
    if value is None:
        return None
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        ctx.fail(f"must be an octal mode such as '0644' or '0755', but was {value!r}", attr=attr)
    return mode


def normalize_prefix(ctx: RuleContext, attr: str) -> str:
    """An absolute image path attribute, without its trailing slash ('' for '/')."""
    prefix = ctx.attr[attr]
    if not prefix.startswith("/"):
        ctx.fail(f"must be an absolute path in the image, such as '/app', but was {prefix!r}", attr=attr,
                 hint=f"did you mean '/{prefix}'?")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        ctx.fail(f"may not contain '.' or '..', but was {prefix!r}", attr=attr)
    return "/".join(parts)


def _files_impl(ctx: RuleContext) -> list[Provider]:
    prefix = normalize_prefix(ctx, "prefix")
    mode = parse_mode(ctx, "mode")
    strip = ctx.attr.strip_prefix.strip("/")
    sources: list[Artifact] = []
    for item in ctx.attr.srcs:
        sources.extend([item] if isinstance(item, Artifact) else item.files)
    entries: list[list[object]] = []
    seen: dict[str, str] = {}
    for index, art in enumerate(sources):
        if art.is_tree:
            entries.append([index, ""])
            continue
        rel = art.package_path
        if strip:
            if not (rel == strip or rel.startswith(strip + "/")):
                ctx.fail(f"'{strip}' is not a leading directory of source '{rel}'", attr="strip_prefix",
                         hint="strip_prefix removes a directory every source path starts with")
            rel = rel[len(strip):].lstrip("/")
            if not rel:
                ctx.fail(f"stripping '{strip}' leaves nothing of source '{art.package_path}'", attr="strip_prefix")
        dest = f"{prefix}/{rel}" if prefix else rel
        if dest in seen:
            ctx.fail(f"'{seen[dest]}' and '{art.path}' would both be placed at /{dest}", attr="srcs",
                     hint="use strip_prefix or separate files() targets with different prefixes")
        seen[dest] = art.path
        entries.append([index, rel])
    tree = ctx.declare_directory(ctx.name)
    ctx.actions.declare(
        "FilesTree", inputs={"srcs": sources}, outputs={"tree": tree},
        params={"prefix": prefix, "mode": mode, "entries": entries},
        description=f"FilesTree {ctx.label} ({len(sources)} files)")
    deps = tuple(dep[PackageInfo] for dep in ctx.attr.deps if isinstance(dep, Dependency))
    return [DefaultInfo(files=(tree,)),
            PackageInfo(label=ctx.label, entries=(PackageEntry("/", tree),), deps=deps)]


files = rule(
    "files", _files_impl,
    doc="A package: source files (and other targets' outputs) placed under `prefix` in the image. "
        "Modes are normalized to 0755 for directories and executables and 0644 for other files "
        "unless `mode` says otherwise; symlinks are kept.",
    attrs={
        "srcs": attrs.source_list(doc="Files to include: paths relative to the package, glob() results, "
                                      "or labels of targets whose outputs to include.", default=[]),
        "prefix": attrs.string(doc="Absolute directory in the image under which the files are placed.",
                               default="/"),
        "strip_prefix": attrs.string(doc="Leading directory removed from each source's package-relative path.",
                                     default=""),
        "mode": attrs.string(doc="Octal mode for every file (such as '0755'); None normalizes by the "
                                 "executable bit.", default=None, allow_none=True),
        "deps": attrs.label_list(doc="Runtime dependencies: packages this one needs in the image "
                                     "(the closure used by layered images).", default=[],
                                 providers=[PackageInfo]),
    })
