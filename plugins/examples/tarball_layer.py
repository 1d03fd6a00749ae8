"""An example layer kind: ``tarball_layer``, a tarball (plain, or compressed with any
registered compressor) taken as an image layer.

After ``[plugins] modules = ["tools/tarball_layer.py"]``, a BUILD file says::

    tarball_layer(name = "node", src = "node-v20.tar.gz", prefix = "/opt/node", strip_components = 1)
    image(name = "app", from_image = "//base:debian", layers = [":node"])

Members keep their modes and link targets; they are owned by root unless
``keep_owners = True``; the engine gives them dtbuild's fixed mtime and sorts them.
docs/plugins.md, "A layer kind from a tarball", walks through it.
"""

from __future__ import annotations

import dataclasses
import posixpath
import tarfile
from collections.abc import Iterator, Mapping
from typing import Any

from dtbuild.plugins import hookimpl
from dtbuild.plugins.interfaces import ActionContext, ActionFailed, InputArtifact, LayerKind, LayerMember
from dtbuild.rules import attrs
from dtbuild.rules.api import LayerPlan, RuleContext, default_layer_plan

DTBUILD_REQUIRES = ("images",)  # the images plugin's LayerKindWrite writes the layers


class TarballLayer(LayerKind):
    NAME = "tarball_layer"
    # Bump when the same tarball and attributes would give other members (a new rule for
    # owners, say): the layers made by the old version are then made again.
    VERSION = "1"
    DOC = ("A layer holding the members of a tarball (.tar, or compressed by a registered compressor: "
           ".tar.gz, .tar.zst, ...), placed under `prefix`.")
    ATTRS = {
        "src": attrs.source(doc="The tarball: a file of the package, or a label that gives one file."),
        "prefix": attrs.string(doc="The directory of the image the members go under.", default="/"),
        "strip_components": attrs.integer(
            doc="Leading path components removed from each member, as `tar --strip-components` does.",
            default=0),
        "keep_owners": attrs.boolean(
            doc="Keep the members' numeric owners; by default every member belongs to root (0:0).",
            default=False),
    }

    @classmethod
    def plan(cls, ctx: RuleContext) -> LayerPlan:
        """At analysis: check the attributes, so a mistake points at the BUILD line."""
        if not ctx.attr.prefix.startswith("/"):
            ctx.fail(f"must be an absolute path, but was {ctx.attr.prefix!r}", attr="prefix")
        if ctx.attr.strip_components < 0:
            ctx.fail(f"must be 0 or more, but was {ctx.attr.strip_components}", attr="strip_components")
        files = ctx.files("src")
        if len(files) != 1 or files[0].is_tree:
            ctx.fail(f"must name one tarball file, but names {len(files)} file(s) or a directory", attr="src",
                     hint="give the tarball's path, or the label of a rule that outputs only it")
        return default_layer_plan(ctx, cls.ATTRS)  # src becomes the input slot "src"

    def entries(self, ctx: ActionContext, attrs: Mapping[str, Any]) -> Iterator[LayerMember]:
        (tarball,) = attrs["src"]
        members: dict[str, LayerMember] = {}  # by path: a later member replaces an earlier one, as in tar
        try:
            decompressor = ctx.compressor(_compression(ctx, tarball))
            with ctx.open_input(tarball) as raw, decompressor.decompress_from(raw) as stream, \
                    tarfile.open(fileobj=stream, mode="r|") as tar:  # one pass: nothing seeks
                for member in tar:
                    found = self._member(ctx, tar, member, attrs, tarball)
                    if found is not None:
                        members[found.path] = found
        except ActionFailed:
            raise
        except Exception as e:  # the tarball is untrusted: any decoding error is the user's to fix
            raise ActionFailed(f"{tarball.path} cannot be read as a tarball: {e}") from None
        yield from _content_in_the_first_path(members, tarball)

    def _member(self, ctx: ActionContext, tar: tarfile.TarFile, member: tarfile.TarInfo,
                attrs: Mapping[str, Any], tarball: InputArtifact) -> LayerMember | None:
        path = _placed(member.name, attrs, tarball)
        if path is None:  # the root itself, or stripped away
            return None
        uid, gid = (member.uid, member.gid) if attrs["keep_owners"] else (0, 0)
        mode = member.mode & 0o7777
        if member.isdir():
            return LayerMember(path, kind="dir", mode=mode, uid=uid, gid=gid)
        if member.issym():
            return LayerMember(path, kind="symlink", target=member.linkname, uid=uid, gid=gid)
        if member.islnk():
            target = _placed(member.linkname, attrs, tarball)
            if target is None:
                raise ActionFailed(f"{tarball.path}: the hard link {member.name} points at "
                                   f"{member.linkname}, which strip_components removes")
            return LayerMember(path, kind="hardlink", target=target, uid=uid, gid=gid)
        if member.isreg():
            content = tar.extractfile(member)
            assert content is not None  # a regular member always has content
            digest, size = ctx.put_stream(content, member.size)  # straight into the store
            return LayerMember(path, mode=mode, digest=digest, size=size, uid=uid, gid=gid)
        raise ActionFailed(f"{tarball.path}: {member.name} is a device or a FIFO; "
                           "a layer of this kind holds files, directories and links only")


def _placed(name: str, attrs: Mapping[str, Any], tarball: InputArtifact) -> str | None:
    """Where member ``name`` goes in the image, or None when nothing of it is left."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ActionFailed(f"{tarball.path}: the member {name!r} has a '..' component")
    parts = parts[attrs["strip_components"]:]
    return posixpath.join(attrs["prefix"], *parts) if parts else None


def _content_in_the_first_path(members: dict[str, LayerMember], tarball: InputArtifact) -> Iterator[LayerMember]:
    """The members, with each file's content in the path of it that sorts first. A tar
    hard link must come after the file it names, and dtbuild writes members sorted by
    path (each component's bytes), so of one file's paths the first holds the content
    and the others link to it, whatever their order in the tarball."""
    linked: dict[str, list[str]] = {}  # file path -> the paths that are hard links to it
    for path, member in members.items():
        target, seen = member.target, {path}
        while member.kind == "hardlink" and target in members and members[target].kind == "hardlink":
            if target in seen:
                raise ActionFailed(f"{tarball.path}: the hard links of {path} form a loop")
            seen.add(target)
            target = members[target].target
        if member.kind == "hardlink":
            if target not in members or members[target].kind != "file":
                raise ActionFailed(f"{tarball.path}: the hard link {path} names {target}, which is not a file of it")
            linked.setdefault(target, []).append(path)
    for target, links in linked.items():
        content = members[target]
        first = min([target, *links], key=lambda p: p.encode("utf-8", "surrogateescape").split(b"/"))
        members[first] = dataclasses.replace(content, path=first)
        for path in [target, *links]:
            if path != first:
                members[path] = LayerMember(path, kind="hardlink", target=first, uid=content.uid, gid=content.gid)
    return iter(members.values())


def _compression(ctx: ActionContext, tarball: InputArtifact) -> str:
    """The registered compressor whose MAGIC starts the tarball (the longest that matches;
    ``none`` has the empty MAGIC, so a plain tar is read as it is)."""
    with ctx.open_input(tarball) as f:
        head = f.read(16)
    classes = sorted(ctx.compressors().values(), key=lambda c: len(c.MAGIC), reverse=True)
    return next(c.NAME for c in classes if head.startswith(c.MAGIC))


@hookimpl
def dtbuild_register_layer_kinds() -> list[type[LayerKind]]:
    return [TarballLayer]
