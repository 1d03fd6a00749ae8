"""dockerTools' helper packages: ``merge_trees`` (mergeDrvs), ``fake_nss`` (fakeNss),
``bin_sh`` (binSh), ``usr_bin_env`` (usrBinEnv), ``ca_certificates`` (caCertificates)
and the ``SHADOW_SETUP`` script (shadowSetup), a BUILD global.

Each helper is a small package built by one action (MergeTrees or TreeWrite).
"""

from __future__ import annotations

from typing import Any

from dtbuild.rules import attrs
from dtbuild.rules.api import RuleContext, rule
from dtbuild.rules.artifacts import Artifact
from dtbuild.rules.providers import DefaultInfo, PackageEntry, PackageInfo, Provider

#: shadowSetup: the files shadow's tools (useradd, groupadd, ...) need, each written
#: only when missing. For ``run_as_root`` scripts, or ``fakeroot_commands`` with
#: ``enable_fakechroot``, which run with the image root as /. POSIX sh, so busybox runs
#: it; dockerTools also puts shadow on PATH, which here is the image's business.
SHADOW_SETUP = """\
mkdir -p /etc/pam.d
if [ ! -f /etc/passwd ]; then
  echo "root:x:0:0::/root:/bin/sh" > /etc/passwd
  echo "root:!x:::::::" > /etc/shadow
fi
if [ ! -f /etc/group ]; then
  echo "root:x:0:" > /etc/group
  echo "root:x::" > /etc/gshadow
fi
if [ ! -f /etc/pam.d/other ]; then
  cat > /etc/pam.d/other <<EOF
account sufficient pam_unix.so
auth sufficient pam_rootok.so
password requisite pam_unix.so nullok sha512
session required pam_unix.so
EOF
fi
if [ ! -f /etc/login.defs ]; then
  touch /etc/login.defs
fi
"""

#: Where caCertificates puts the bundle: the first holds the file, the others link to it.
CA_BUNDLE_PATHS = (
    "etc/ssl/certs/ca-certificates.crt",  # NixOS canonical; Debian, Ubuntu, Arch, Gentoo
    "etc/ssl/certs/ca-bundle.crt",  # old NixOS
    "etc/pki/tls/certs/ca-bundle.crt",  # CentOS, Fedora
)


def _tree_package(ctx: RuleContext, params: dict[str, Any], *, inputs: dict[str, list[Artifact]] | None = None,
                  deps: tuple[PackageInfo, ...] = ()) -> list[Provider]:
    tree = ctx.declare_directory(ctx.name)
    ctx.actions.declare("TreeWrite", inputs=inputs or {}, outputs={"out": tree}, params=params,
                        description=f"TreeWrite {ctx.label}")
    return [DefaultInfo(files=(tree,)), PackageInfo(label=ctx.label, entries=(PackageEntry("/", tree),), deps=deps)]


# --------------------------------------------------------------------------- merge_trees


def _merge_trees_impl(ctx: RuleContext) -> list[Provider]:
    # Each input artifact, in order: a directory is copied (at its package's place),
    # a file is a tarball to extract, as mergeDrvs tells derivations apart.
    arts: list[Artifact] = []
    sources: list[list[Any]] = []
    packages: list[PackageInfo] = []
    for item in ctx.attr.srcs:
        if isinstance(item, Artifact):
            placed = [(item, "/")]
            origin = item.path
        elif PackageInfo in item:
            pkg = item[PackageInfo]
            packages.append(pkg)
            placed = [(entry.artifact, entry.dest) for entry in pkg.entries]
            origin = item.label
        else:
            placed = [(art, "/") for art in item.files]
            origin = item.label
        for art, dest in placed:
            # Tarballs are extracted at the root, whatever name the package gives them.
            sources.append(["tree", origin, len(arts), dest] if art.is_tree else ["tarball", origin, len(arts), "/"])
            arts.append(art)
    if ctx.attr.only_deps:
        out = ctx.declare_file(ctx.name)
        listing = list(dict.fromkeys(origin for _, origin, _, _ in sources))
        ctx.actions.declare("MergeTrees", outputs={"out": out}, params={"sources": listing, "only_deps": True},
                            description=f"MergeTrees {ctx.label}")
        return [DefaultInfo(files=(out,)), PackageInfo(label=ctx.label, entries=(), deps=tuple(packages))]
    tree = ctx.declare_directory(ctx.name)
    ctx.actions.declare("MergeTrees", inputs={"srcs": arts}, outputs={"out": tree},
                        params={"sources": sources, "only_deps": False}, description=f"MergeTrees {ctx.label}")
    # The merged files keep needing what their packages needed at run time.
    runtime: dict[str, PackageInfo] = {}
    for pkg in packages:
        for dep in pkg.deps:
            runtime.setdefault(dep.label, dep)
    return [DefaultInfo(files=(tree,)),
            PackageInfo(label=ctx.label, entries=(PackageEntry("/", tree),), deps=tuple(runtime.values()))]


merge_trees = rule(
    "merge_trees", _merge_trees_impl,
    doc="One package made of several (mergeDrvs): packages copied and tarballs (plain, gzip, bzip2, xz or "
        "zstd) extracted into one tree, in order; a later file replaces an earlier one, directories merge. "
        "With `only_deps`, nothing is merged: the package is a list of its inputs whose runtime closure "
        "brings them into images.",
    attrs={
        "srcs": attrs.source_list(doc="Packages and tarballs, merged in this order: a package's directories "
                                      "are copied where it places them; a file (a source path, a genrule "
                                      "output, a fetch_url download) is a tarball to extract."),
        "only_deps": attrs.boolean(doc="Record only the inputs: the package holds no files but depends on "
                                       "the packages of `srcs`.", default=False),
    })


# --------------------------------------------------------------------------- fake_nss


def _check_lines(ctx: RuleContext, attr: str, fields: int, example: str) -> list[str]:
    lines: list[str] = ctx.attr[attr]
    for line in lines:
        if "\n" in line or line.count(":") != fields - 1:
            ctx.fail(f"holds {line!r}, which is not a line of {fields} ':'-separated fields such as {example!r}",
                     attr=attr)
    return lines


def _fake_nss_impl(ctx: RuleContext) -> list[Provider]:
    passwd = _check_lines(ctx, "extra_passwd_lines", 7, "app:x:1000:1000:App user:/var/empty:/bin/sh")
    group = _check_lines(ctx, "extra_group_lines", 4, "app:x:1000:")
    text = "".join(line + "\n" for line in ["root:x:0:0:root user:/var/empty:/bin/sh", *passwd,
                                            "nobody:x:65534:65534:nobody:/var/empty:/bin/sh"])
    groups = "".join(line + "\n" for line in ["root:x:0:", *group, "nobody:x:65534:"])
    return _tree_package(ctx, {
        "files": [["etc/passwd", 0o644, text], ["etc/group", 0o644, groups],
                  ["etc/nsswitch.conf", 0o644, "hosts: files dns\n"]],
        "dirs": [["etc", 0o755], ["var", 0o755], ["var/empty", 0o755]]})


fake_nss = rule(
    "fake_nss", _fake_nss_impl,
    doc="/etc/passwd and /etc/group with root and nobody (and extra lines between them), "
        "/etc/nsswitch.conf (`hosts: files dns`) and an empty /var/empty (fakeNss): enough for programs "
        "that look users up, such as `id nobody` or nginx.",
    attrs={
        "extra_passwd_lines": attrs.string_list(doc="Lines added to /etc/passwd after root's "
                                                    "('name:x:uid:gid:gecos:home:shell').", default=[]),
        "extra_group_lines": attrs.string_list(doc="Lines added to /etc/group after root's ('name:x:gid:members').",
                                               default=[]),
    })


# --------------------------------------------------------------------------- bin_sh, usr_bin_env


def _binary_link(ctx: RuleContext, *, attr: str, link: str, names: list[str]) -> list[Provider]:
    pkg: PackageInfo = ctx.attr[attr][PackageInfo]
    binary = ctx.attr.binary
    if binary is not None and not binary.startswith("/"):
        ctx.fail(f"must be an absolute path in the image, such as '/bin/bash', but was {binary!r}", attr="binary")
    arts: list[Artifact] = []
    placements = []
    for entry in pkg.entries:
        placements.append([len(arts), entry.dest])
        arts.append(entry.artifact)
    return _tree_package(ctx, {"binary_link": {"path": link, "names": names, "binary": binary, "package": pkg.label},
                               "package": placements, "dirs": [[link.rsplit("/", 1)[0], 0o755]]},
                         inputs={"package": arts}, deps=(pkg,))


def _bin_sh_impl(ctx: RuleContext) -> list[Provider]:
    return _binary_link(ctx, attr="shell", link="bin/sh", names=["bash", "dash", "ash", "mksh", "zsh", "busybox"])


bin_sh = rule(
    "bin_sh", _bin_sh_impl,
    doc="/bin/sh as a symlink to a shell package's binary (binSh); the shell package comes with it as a "
        "runtime dependency.",
    attrs={
        "shell": attrs.label(doc="The shell package.", providers=[PackageInfo]),
        "binary": attrs.string(doc="The shell's path in the image; None: the package's bash, dash, ash, mksh, "
                                   "zsh or busybox in a bin/ directory, else its only executable there.",
                               default=None, allow_none=True),
    })


def _usr_bin_env_impl(ctx: RuleContext) -> list[Provider]:
    return _binary_link(ctx, attr="env", link="usr/bin/env", names=["env"])


usr_bin_env = rule(
    "usr_bin_env", _usr_bin_env_impl,
    doc="/usr/bin/env as a symlink to an `env` binary (usrBinEnv), for `#!/usr/bin/env` scripts; the package "
        "comes with it as a runtime dependency.",
    attrs={
        "env": attrs.label(doc="The package with `env` (coreutils, busybox, ...).", providers=[PackageInfo]),
        "binary": attrs.string(doc="The env binary's path in the image; None: the package's `env` in a bin/ "
                                   "directory, else its only executable there.", default=None, allow_none=True),
    })


# --------------------------------------------------------------------------- ca_certificates


def _ca_certificates_impl(ctx: RuleContext) -> list[Provider]:
    files = ctx.files("bundle")
    if len(files) != 1 or files[0].is_tree:
        ctx.fail(f"must name exactly one file (a PEM bundle), but names {len(files)} "
                 f"{'directory' if files and files[0].is_tree else 'files'}", attr="bundle")
    bundle, old_nixos, fedora = CA_BUNDLE_PATHS
    return _tree_package(ctx, {"copies": [[bundle, 0o644, 0]],
                               "symlinks": [[old_nixos, "ca-certificates.crt"], [fedora, "/" + bundle]]},
                         inputs={"copies": files})


ca_certificates = rule(
    "ca_certificates", _ca_certificates_impl,
    doc="A CA bundle where programs look for it (caCertificates): /etc/ssl/certs/ca-certificates.crt, with "
        "/etc/ssl/certs/ca-bundle.crt and /etc/pki/tls/certs/ca-bundle.crt linking to it.",
    attrs={
        "bundle": attrs.source(doc="The PEM bundle: a path in the package or a label whose output it is."),
    })

HELPER_RULES = [merge_trees, fake_nss, bin_sh, usr_bin_env, ca_certificates]
