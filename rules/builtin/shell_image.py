"""``shell_image`` (buildNixShellImage / streamNixShellImage): an image that reproduces
the build environment of a command action, so that a failing genrule can be debugged
by hand: ``dtbuild run //pkg:gen_shell`` drops into a shell where its command runs as
it runs in the sandbox.

What the sandbox looks like comes from the target's :class:`CommandInfo` (for a genrule:
:func:`dtbuild.rules.builtin.genrule.genrule_layout`, which the Genrule action uses too),
never from a second description here. The image is built with the image rule's pieces
(:func:`declare_layer`, :func:`declare_image`) from two layers:

1. *tools*, owned by root: the host's static busybox in ``/bin`` (one link per applet;
   ``busybox``), the ``tools`` packages, ``/etc/passwd`` and ``/etc/group`` (root, the
   build user, nobody) and a world-writable ``/tmp``;
2. *build*, owned by the build user: ``/build`` (the working directory and the user's
   home, as nixpkgs' ``/build``) with every input at its path below the command's
   working directory, the command's output directories, and three scripts:
   ``.dtbuild-env.sh`` (the command's environment), ``.dtbuild-rc.sh`` (what an
   interactive shell reads: the environment, ``cd /build``, a prompt) and
   ``.dtbuild-cmd.sh`` (the command, with its prologue, in ``/build``).

The config runs as the build user in ``/build`` with the command's environment
(``HOME=/build``, ``TMPDIR=/tmp``), and ``Cmd`` is an interactive shell.
"""

from __future__ import annotations

import shlex
from typing import Any

from dtbuild.rules import attrs
from dtbuild.rules.api import Dependency, RuleContext, rule
from dtbuild.rules.builtin.image import (
    IMAGE_COMMON_ATTRS,
    check_architecture,
    check_config,
    check_created,
    check_tag,
    declare_image,
    declare_layer,
    repository_name,
)
from dtbuild.rules.providers import CommandInfo, ImageInfo, PackageEntry, PackageInfo, Provider

#: The command's working directory in the image, and the build user's home.
BUILD_DIR = "/build"
#: The scripts in BUILD_DIR (names relative to it).
ENV_SCRIPT = ".dtbuild-env.sh"
RC_SCRIPT = ".dtbuild-rc.sh"
CMD_SCRIPT = ".dtbuild-cmd.sh"
#: TMPDIR in the image (the sandbox gives each run a private one).
TMP_DIR = "/tmp"

_USER_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")


def _check(ctx: RuleContext) -> None:
    user = ctx.attr.user
    if not user or user[0] in "-0123456789" or not set(user) <= _USER_CHARS or len(user) > 32:
        ctx.fail(f"must be a user name of lowercase letters, digits, '_' and '-' (not starting with a digit or "
                 f"'-', at most 32), but was {user!r}", attr="user")
    if user in ("root", "nobody"):
        ctx.fail(f"names the image's own user {user!r}; the build user needs a name of its own", attr="user")
    for attr in ("uid", "gid"):
        value = ctx.attr[attr]
        if not 1 <= value < 65534:
            ctx.fail(f"must be between 1 and 65533 (the build user is neither root nor nobody), but was {value}",
                     attr=attr)
    shell = ctx.attr.shell
    if not shell.startswith("/") or any(c.isspace() for c in shell):
        ctx.fail(f"must be the absolute path of a shell in the image, such as '/bin/sh', but was {shell!r}",
                 attr="shell")


def _env_script(info: CommandInfo, env: list[tuple[str, str]]) -> str:
    lines = [f"# The environment of the command of {info.label} ({info.kind}), as its sandbox gives it."]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env]
    return "\n".join(lines) + "\n"


def _rc_script(info: CommandInfo) -> str:
    prompt = "[" + info.label + "] \\w \\$ "
    hello = f"{info.label}: its command is {BUILD_DIR}/{CMD_SCRIPT} (run it with: sh {BUILD_DIR}/{CMD_SCRIPT})"
    return "\n".join([
        f"# Read by interactive shells of this image: the environment of {info.label}'s command, in its",
        "# working directory.",
        f". {BUILD_DIR}/{ENV_SCRIPT}",
        f"cd {BUILD_DIR}",
        f"PS1={shlex.quote(prompt)}",
        f"echo {shlex.quote(hello)} >&2",
    ]) + "\n"


def _cmd_script(info: CommandInfo, shell: str) -> str:
    ran_by = " ".join(info.shell)
    return "\n".join([
        f"#!{shell}",
        f"# The command of {info.label} ({info.kind}; its sandbox runs it with {ran_by}), in its working",
        "# directory with its environment.",
        f". {BUILD_DIR}/{ENV_SCRIPT}",
        f"cd {BUILD_DIR}",
        info.script.rstrip("\n"),
    ]) + "\n"


def _tree(ctx: RuleContext, name: str, params: dict[str, Any]) -> PackageInfo:
    tree = ctx.declare_internal(name, is_tree=True)
    ctx.actions.declare("TreeWrite", outputs={"out": tree}, params=params, description=f"TreeWrite {ctx.label} {name}")
    return PackageInfo(label=f"{ctx.label} {name}", entries=(PackageEntry("/", tree),))


def _shell_image_impl(ctx: RuleContext) -> list[Provider]:
    _check(ctx)
    check_created(ctx)
    check_architecture(ctx)
    user_config = check_config(ctx)
    repo = repository_name(ctx)
    tag = check_tag(ctx)
    info: CommandInfo = ctx.attr.target[CommandInfo]
    base_dep = ctx.attr.from_image
    base = base_dep[ImageInfo] if isinstance(base_dep, Dependency) else None
    with_busybox = ctx.attr.busybox if ctx.attr.busybox is not None else base is None
    user, uid, gid, shell = ctx.attr.user, ctx.attr.uid, ctx.attr.gid, ctx.attr.shell
    build = BUILD_DIR.lstrip("/")

    # Layer 1, root's: the tools and the user database.
    tools: list[PackageInfo] = []
    if with_busybox:
        tree = ctx.declare_internal("busybox", is_tree=True)
        # It reads a host file: the kind's version holds that file's digest.
        ctx.actions.declare("HostBusybox", outputs={"out": tree}, params={"dir": "bin"},
                            description=f"HostBusybox {ctx.label}")
        tools.append(PackageInfo(label=f"{ctx.label} busybox", entries=(PackageEntry("/", tree),)))
    tools += [dep[PackageInfo] for dep in ctx.attr.tools]
    passwd = (f"root:x:0:0:root user:/var/empty:/bin/sh\n{user}:x:{uid}:{gid}:Build user:{BUILD_DIR}:{shell}\n"
              "nobody:x:65534:65534:nobody:/var/empty:/bin/sh\n")
    group = f"root:x:0:\n{user}:x:{gid}:\nnobody:x:65534:\n"
    tools.append(_tree(ctx, "etc", {
        "files": [["etc/passwd", 0o644, passwd], ["etc/group", 0o644, group]],
        "dirs": [["etc", 0o755], [TMP_DIR.lstrip("/"), 0o1777], ["var", 0o755], ["var/empty", 0o755]]}))
    compressor = ctx.attr.compressor
    layers = [declare_layer(
        ctx, tar=ctx.declare_internal("tools.tar") if compressor == "none" else None,
        meta=ctx.declare_internal("tools.json"), packages=tools, base=base, compressor=compressor,
        settings={"uid": 0, "gid": 0, "keep_contents_dirlinks": False, "extra_commands": ""},
        description=f"LayerWrite {ctx.label} tools")]

    # Layer 2, the build user's: /build with the inputs, the output directories and the scripts.
    env = [*info.env, ("HOME", BUILD_DIR), ("TMPDIR", TMP_DIR)]
    inputs: list[PackageEntry] = []
    for path, art in info.inputs:
        inputs.append(PackageEntry(f"{BUILD_DIR}/{path}", art))
    scripts = _tree(ctx, "build", {
        "files": [[f"{build}/{ENV_SCRIPT}", 0o644, _env_script(info, env)],
                  [f"{build}/{RC_SCRIPT}", 0o644, _rc_script(info)],
                  [f"{build}/{CMD_SCRIPT}", 0o755, _cmd_script(info, shell)]],
        "dirs": [[build, 0o755], *([f"{build}/{d}", 0o755] for d in info.dirs)]})
    packages = [PackageInfo(label=info.label, entries=tuple(inputs)), scripts]
    # No base here: the base's directories must not give /build another owner.
    layers.append(declare_layer(
        ctx, tar=ctx.declare_internal("build.tar") if compressor == "none" else None,
        meta=ctx.declare_internal("build.json"), packages=packages, compressor=compressor,
        settings={"uid": uid, "gid": gid, "keep_contents_dirlinks": False, "extra_commands": ""},
        description=f"LayerWrite {ctx.label} build"))

    rc = f"{BUILD_DIR}/{RC_SCRIPT}"
    interactive = [shell, "--rcfile", rc, "-i"] if shell.rsplit("/", 1)[-1] == "bash" else [shell, "-i"]
    # ENV: the rc file of a POSIX shell's interactive sessions (busybox sh, dash, bash as sh).
    env_lines = [f"{name}={value}" for name, value in env] + [f"ENV={rc}"]
    config: dict[str, Any] = {"Env": env_lines, "Cmd": interactive, "WorkingDir": BUILD_DIR, "User": f"{uid}:{gid}"}
    for key, value in user_config.items():
        if key == "Env":
            names = {item.split("=", 1)[0] for item in value}
            config["Env"] = [e for e in config["Env"] if e.split("=", 1)[0] not in names] + list(value)
        else:
            config[key] = value
    return declare_image(ctx, layers=layers, base=base, config=config, repository=repo, tag=tag,
                         compressor=compressor)


shell_image = rule(
    "shell_image", _shell_image_impl,
    doc="An image that reproduces the build environment of a command target such as a genrule "
        "(buildNixShellImage): its inputs at their sandbox paths below /build, its environment "
        "(HOME=/build, TMPDIR=/tmp), its command as /build/.dtbuild-cmd.sh, a build user owning /build, "
        "and a static busybox from the host in /bin. `dtbuild run` of it is an interactive shell in /build; "
        "`dtbuild run TARGET -- sh /build/.dtbuild-cmd.sh` runs the command (docs/run.md). Outputs like "
        "`image`'s: NAME.tar[.gz|.zst], NAME.oci/ and NAME.json.",
    attrs={
        "target": attrs.label(doc="The target whose command's environment the image reproduces (a genrule).",
                              providers=[CommandInfo]),
        **IMAGE_COMMON_ATTRS,
        "user": attrs.string(doc="Name of the build user the image runs as.", default="build"),
        "uid": attrs.integer(doc="The build user's uid (it owns /build).", default=1000),
        "gid": attrs.integer(doc="The build user's gid.", default=1000),
        "shell": attrs.string(doc="The interactive shell (`Cmd`), the build user's login shell and the command "
                                  "script's interpreter. /bin/sh is busybox's ash; give /bin/bash with a bash "
                                  "package in `tools` (or in `from_image`) for commands that need bash.",
                              default="/bin/sh"),
        "busybox": attrs.boolean(doc="Put the host's static busybox (/bin/busybox, /usr/bin/busybox or "
                                     "/usr/lib/busybox-static/busybox: apt-get install busybox-static) at "
                                     "/bin/busybox with a link in /bin for each applet. None: only without "
                                     "`from_image` (whose /bin the links would shadow, or replace where /bin "
                                     "is a symlink).", default=None),
        "tools": attrs.label_list(doc="Packages the command needs (bash, compilers...), placed owned by root, "
                                      "with their runtime closure.", default=[], providers=[PackageInfo]),
    })

