"""``genrule``: a shell command run in a sandbox, whose outputs form a package."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dtbuild.rules import attrs
from dtbuild.rules.api import Dependency, RuleContext, rule
from dtbuild.rules.providers import CommandInfo, DefaultInfo, PackageEntry, PackageInfo, Provider

#: The PATH of sandboxed commands: nothing of the user's environment leaks in.
COMMAND_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The shell that runs a genrule's command, with ``-c``.
COMMAND_SHELL = "/bin/bash"
#: What runs before the user's command.
COMMAND_PROLOGUE = "set -e -o pipefail\numask 022\n"


@dataclass(frozen=True, slots=True)
class GenruleLayout:
    """What a genrule's command sees, relative to its working directory (the execution
    root): the one description of the sandbox, used by the Genrule action that runs the
    command and by the CommandInfo that images reproducing it read."""

    #: The declared outputs' paths (``$OUT_DIR/name``), in ``outs`` order.
    outputs: tuple[str, ...]
    #: Directories made before the command runs: ``$OUT_DIR`` and the outputs' parents.
    dirs: tuple[str, ...]
    #: The environment, but for HOME and TMPDIR: private directories of each run.
    env: tuple[tuple[str, str], ...]


def genrule_layout(*, srcs: Sequence[str], tools: Sequence[str], outs: Sequence[str], out_dir: str) -> GenruleLayout:
    """The sandbox of a genrule whose inputs sit at ``srcs`` and ``tools`` (paths below
    the working directory) and whose outputs ``outs`` go to ``out_dir``."""
    outputs = tuple(f"{out_dir}/{out}" for out in outs)
    dirs = tuple(dict.fromkeys([out_dir, *(out.rsplit("/", 1)[0] for out in outputs)]))
    env = [("PATH", COMMAND_PATH), ("LANG", "C.UTF-8"), ("LC_ALL", "C.UTF-8"), ("TZ", "UTC"),
           ("SOURCE_DATE_EPOCH", "1"), ("SRCS", " ".join(srcs)), ("TOOLS", " ".join(tools)),
           ("OUTS", " ".join(outputs)), ("OUT_DIR", out_dir)]
    if len(outputs) == 1:
        env.append(("OUT", outputs[0]))
    return GenruleLayout(outputs=outputs, dirs=dirs, env=tuple(env))


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
    srcs, tools = ctx.files("srcs"), ctx.files("tools")
    ctx.actions.declare(
        "Genrule", inputs={"srcs": srcs, "tools": tools}, outputs=declared,
        params={"cmd": ctx.attr.cmd, "outs": list(outs), "out_dir": out_dir},
        description=f"Genrule {ctx.label}")
    deps = tuple(dep[PackageInfo] for dep in ctx.attr.deps if isinstance(dep, Dependency))
    # The action materializes each input at its own path below the execution root.
    layout = genrule_layout(srcs=[a.path for a in srcs], tools=[a.path for a in tools], outs=outs, out_dir=out_dir)
    inputs = tuple({art.path: (art.path, art) for art in (*srcs, *tools)}.values())
    return [DefaultInfo(files=tuple(declared.values())),
            PackageInfo(label=ctx.label, entries=tuple(PackageEntry("/" + out, art) for out, art in declared.items()),
                        deps=deps),
            CommandInfo(label=ctx.label, kind="genrule", shell=(COMMAND_SHELL, "-c"),
                        script=COMMAND_PROLOGUE + ctx.attr.cmd, env=layout.env, inputs=inputs,
                        outputs=layout.outputs, dirs=layout.dirs)]


genrule = rule(
    "genrule", _genrule_impl,
    doc="Runs `cmd` with bash in a private sandbox directory holding only the declared inputs, "
        "without network access, in a bubblewrap sandbox where only that directory is writable and the "
        "host's tools are read-only (docs/security.md; `[sandbox] commands = \"none\"` turns it off). "
        "`$SRCS`, `$OUTS` and `$TOOLS` hold "
        "space-separated paths relative to the working directory, `$OUT_DIR` the directory of the "
        "outputs. Outputs are placed at /OUT in images that include the target. A `shell_image` of the "
        "target reproduces its sandbox, to debug the command by hand (docs/run.md).",
    attrs={
        "srcs": attrs.source_list(doc="Input files: paths, glob() results or labels.", default=[]),
        "outs": attrs.string_list(doc="Output files the command must create, relative to $OUT_DIR."),
        "cmd": attrs.string(doc="The bash command. It runs with `set -e -o pipefail`."),
        "tools": attrs.source_list(doc="Programs the command runs (labels or paths), listed in $TOOLS.",
                                   default=[]),
        "deps": attrs.label_list(doc="Runtime dependencies of the outputs, as packages.", default=[],
                                 providers=[PackageInfo]),
    })
