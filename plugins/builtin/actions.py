"""Action kinds of the built-in ``files`` and ``genrule`` rules."""

from __future__ import annotations

import os
import shlex

from dtbuild.plugins.interfaces import ActionContext, ActionFailed, ActionKind, CommandRequest, TreeEntry
from dtbuild.rules.builtin.genrule import COMMAND_PATH, COMMAND_PROLOGUE, COMMAND_SHELL, genrule_layout

#: The environment of sandboxed commands: nothing of the user's leaks in.
SANDBOX_PATH = COMMAND_PATH


class FilesTree(ActionKind):
    """Builds the tree of a ``files`` target from its inputs' digests: nothing is copied.
    The tree names sources by their digests; the store reads them in place from the
    workspace (``store_file``), checking their bytes whenever they are read."""

    NAME = "FilesTree"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        prefix = ctx.params["prefix"]
        mode = ctx.params["mode"]
        srcs = ctx.inputs("srcs")
        entries: list[TreeEntry] = []
        for index, rel in ctx.params["entries"]:
            art = srcs[index]
            if art.is_tree:
                base = prefix
                for e in ctx.walk_tree(art):
                    path = f"{base}/{e.path}" if base else e.path
                    if e.kind == "file" and mode is not None:
                        e = TreeEntry(e.path, "file", mode, e.digest, e.size)
                    entries.append(TreeEntry(path, e.kind, e.mode, e.digest, e.size, e.target))
                continue
            dest = f"{prefix}/{rel}" if prefix else rel
            if art.symlink is not None:
                entries.append(TreeEntry(dest, "symlink", 0o777, target=art.symlink))
                continue
            ctx.store_file(art)
            file_mode = mode if mode is not None else (0o755 if art.executable else 0o644)
            entries.append(TreeEntry(dest, "file", file_mode, art.digest, art.size))
        ctx.output_tree("tree", entries)


class Genrule(ActionKind):
    """Runs a genrule's command in a private execution root holding only its inputs."""

    NAME = "Genrule"
    #: 2: commands run with umask 022 (the builder's umask changed bytes before).
    VERSION = "2"
    #: Its command may run on the remote executor: every input is in the execroot and
    #: the outputs are declared.
    COMMAND = True

    def run(self, ctx: ActionContext) -> None:
        execroot = os.path.join(ctx.scratch_dir, "execroot")
        home = os.path.join(ctx.scratch_dir, "home")
        tmp = os.path.join(ctx.scratch_dir, "tmp")
        for d in (execroot, home, tmp):
            os.makedirs(d)
        paths: dict[str, list[str]] = {}
        for slot in ("srcs", "tools"):
            paths[slot] = []
            for art in ctx.inputs(slot):
                dest = os.path.join(execroot, art.path)
                if not os.path.lexists(dest):
                    ctx.materialize(art, dest)
                paths[slot].append(art.path)
        # The layout the genrule's CommandInfo describes too (shell_image reproduces it).
        layout = genrule_layout(srcs=paths["srcs"], tools=paths["tools"], outs=ctx.params["outs"],
                                out_dir=ctx.params["out_dir"])
        outs = list(layout.outputs)
        for d in layout.dirs:
            os.makedirs(os.path.join(execroot, d), exist_ok=True)
        env = {**dict(layout.env), "HOME": home, "TMPDIR": tmp}
        cmd = ctx.params["cmd"]
        # Where the executor sandboxes commands, the command sees its execroot (the
        # inputs and the output directory), its HOME and TMPDIR, and the host's tools.
        result = ctx.run_command(CommandRequest(
            argv=[COMMAND_SHELL, "-c", COMMAND_PROLOGUE + cmd], cwd=execroot, env=env, network=False,
            writable=[home, tmp], outputs=outs))
        if result.exit_code != 0:
            raise ActionFailed(f"command exited with status {result.exit_code}", output_tail=result.output,
                               exit_code=result.exit_code, command=shlex.quote(cmd) if "\n" in cmd else cmd)
        for name, out in zip(ctx.params["outs"], outs, strict=True):
            produced = os.path.join(execroot, out)
            if not os.path.isfile(produced) or os.path.islink(produced):
                raise ActionFailed(f"the command did not create declared output '{name}' ({out})",
                                   output_tail=result.output, command=cmd)
            os.replace(produced, ctx.output_path(name))
