"""``genrule``: a shell command run in a sandbox, whose outputs form a package."""

from __future__ import annotations

from dtbuild.rules import attrs
from dtbuild.rules.api import Dependency, RuleContext, rule
from dtbuild.rules.providers import DefaultInfo, PackageEntry, PackageInfo, Provider


def _genrule_impl(ctx: RuleContext) -> list[Provider]:
    outs = ctx.attr.outs
    if not outs:
        ctx.fail("must name at least one output file", attr="outs")
    seen: set[str] = set()
    for out in outs:
        parts = out.split("/")
        if not out or out.startswith("/") or any(p in ("", ".", "..") for p in parts):
            ctx.fail(f"must hold relative file paths without '.' or '..', but has {out!r}", attr="outs")
        if out in seen:
            ctx.fail(f"names {out!r} twice", attr="outs")
        seen.add(out)
    if not ctx.attr.cmd.strip():
        ctx.fail("must be a non-empty shell command", attr="cmd")
    declared = {out: ctx.declare_file(out) for out in outs}
    out_dir = f"dtbuild-out/{ctx.package}" if ctx.package else "dtbuild-out"
    ctx.actions.declare(
        "Genrule", inputs={"srcs": ctx.files("srcs"), "tools": ctx.files("tools")}, outputs=declared,
        params={"cmd": ctx.attr.cmd, "outs": list(outs), "out_dir": out_dir},
        description=f"Genrule {ctx.label}")
    deps = tuple(dep[PackageInfo] for dep in ctx.attr.deps if isinstance(dep, Dependency))
    return [DefaultInfo(files=tuple(declared.values())),
            PackageInfo(label=ctx.label, entries=tuple(PackageEntry("/" + out, art) for out, art in declared.items()),
                        deps=deps)]


genrule = rule(
    "genrule", _genrule_impl,
    doc="Runs `cmd` with bash in a private sandbox directory holding only the declared inputs, "
        "without network access, in a bubblewrap sandbox where only that directory is writable and the "
        "host's tools are read-only (docs/security.md; `[sandbox] commands = \"none\"` turns it off). "
        "`$SRCS`, `$OUTS` and `$TOOLS` hold "
        "space-separated paths relative to the working directory, `$OUT_DIR` the directory of the "
        "outputs. Outputs are placed at /OUT in images that include the target.",
    attrs={
        "srcs": attrs.source_list(doc="Input files: paths, glob() results or labels.", default=[]),
        "outs": attrs.string_list(doc="Output files the command must create, relative to $OUT_DIR."),
        "cmd": attrs.string(doc="The bash command. It runs with `set -e -o pipefail`."),
        "tools": attrs.source_list(doc="Programs the command runs (labels or paths), listed in $TOOLS.",
                                   default=[]),
        "deps": attrs.label_list(doc="Runtime dependencies of the outputs, as packages.", default=[],
                                 providers=[PackageInfo]),
    })
