"""An example plugin: the ``write_file`` rule and its ``WriteFile`` action kind.

Everything a plugin needs is here: a rule (attribute schema + pure implementation), an
action kind that does the work, and the two hooks that register them. Copy it as a
starting point; docs/plugins.md walks through it.

Use it from a workspace by listing this file (or your copy) in ``dtbuild.toml``::

    [plugins]
    modules = ["tools/write_file.py"]

and in a BUILD file::

    write_file(name = "motd", content = "hello\\n", prefix = "/etc")
"""

from __future__ import annotations

import os

from dtbuild.plugins import hookimpl
from dtbuild.plugins.interfaces import ActionContext, ActionKind
from dtbuild.rules import attrs
from dtbuild.rules.api import Rule, RuleContext, rule
from dtbuild.rules.providers import DefaultInfo, PackageEntry, PackageInfo, Provider


def _write_file_impl(ctx: RuleContext) -> list[Provider]:
    if not ctx.attr.prefix.startswith("/"):
        ctx.fail(f"must be an absolute path, but was {ctx.attr.prefix!r}", attr="prefix")
    out = ctx.declare_file(ctx.name)
    ctx.actions.declare("WriteFile", outputs={"out": out},
                        params={"content": ctx.attr.content, "executable": ctx.attr.executable})
    dest = ctx.attr.prefix.rstrip("/") + "/" + ctx.name
    return [DefaultInfo(files=(out,)), PackageInfo(label=ctx.label, entries=(PackageEntry(dest, out),))]


write_file = rule(
    "write_file", _write_file_impl,
    doc="A file with the given content, placed at PREFIX/NAME in images.",
    attrs={
        "content": attrs.string(doc="The file's text."),
        "executable": attrs.boolean(doc="Make the file executable.", default=False),
        "prefix": attrs.string(doc="Directory in the image.", default="/"),
    })


class WriteFile(ActionKind):
    NAME = "WriteFile"
    VERSION = "1"  # bump when the same params would give other bytes

    def run(self, ctx: ActionContext) -> None:
        path = ctx.output_path("out")
        with open(path, "w", encoding="utf-8") as f:
            f.write(ctx.params["content"])
        # Only the executable bit is the action's to choose: the layer writers normalise
        # every other mode bit, so a checkout's umask never changes a digest.
        os.chmod(path, 0o755 if ctx.params["executable"] else 0o644)


@hookimpl
def dtbuild_register_rules() -> list[Rule]:
    return [write_file]


@hookimpl
def dtbuild_register_action_kinds() -> list[type[ActionKind]]:
    return [WriteFile]
