"""``pull_image`` (dockerTools' pullImage): a base image from a registry, pinned by the
digest of its manifest (or of an index, from which the ``os``/``arch`` entry is taken).

Analysis only checks the attributes; the ``ImagePull`` action (plugins/builtin/pull.py)
fetches, verifies and stores the image once, and its cached result makes every later
build work without the network.
"""

from __future__ import annotations

import base64
import binascii
import re

from dtbuild.rules import attrs
from dtbuild.rules.api import RuleContext, rule
from dtbuild.rules.builtin.image import _TAG_RE, architecture_value, declare_image_outputs
from dtbuild.rules.providers import DefaultInfo, ImageInfo, Provider

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
# host[:port]/ (a component with '.' or ':' or "localhost"), then lowercase path components.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(r"^(?:(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*(?::[0-9]+)?|\[[0-9A-Fa-f:.]+\](?::[0-9]+)?)/)?"
                      + _COMPONENT + r"(?:/" + _COMPONENT + r")*$")


def normalize_sha256(value: str) -> str | None:
    """64 lowercase hex digits from ``hex``, ``sha256:hex`` or SRI ``sha256-<base64>``;
    None when ``value`` is none of these."""
    text = value.strip()
    if text.startswith("sha256-"):
        try:
            raw = base64.b64decode(text[7:], validate=True)
        except (binascii.Error, ValueError):
            return None
        return raw.hex() if len(raw) == 32 else None
    text = text.lower().removeprefix("sha256:")
    return text if _HEX_RE.match(text) else None


def _check_name(ctx: RuleContext, attr: str) -> str:
    name = ctx.attr[attr]
    if "@" in name:
        ctx.fail(f"must be a repository name without a digest, but was {name!r}", attr=attr,
                 hint="put the digest in image_digest")
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        ctx.fail(f"must be a repository name without a tag, but was {name!r}", attr=attr,
                 hint="image_digest pins the image; the tag it gets is final_image_tag")
    if not _NAME_RE.match(name):
        ctx.fail(f"{name!r} is not a repository name such as 'nixos/nix' or 'registry.example.com:5000/team/app' "
                 "(lowercase path components)", attr=attr)
    return name


def _pull_image_impl(ctx: RuleContext) -> list[Provider]:
    image_name = _check_name(ctx, "image_name")
    digest = ctx.attr.image_digest
    if not _DIGEST_RE.match(digest):
        ctx.fail(f"must be 'sha256:' and 64 lowercase hex digits (a manifest or index digest), but was {digest!r}",
                 attr="image_digest",
                 hint="`skopeo inspect docker://IMAGE:TAG` shows the digest (the 'Digest' field)")
    sha256 = None
    if ctx.attr.sha256 is not None:
        sha256 = normalize_sha256(ctx.attr.sha256)
        if sha256 is None:
            ctx.fail(f"must be 64 hex digits (the sha256 of the NAME.tar docker-archive), 'sha256:<hex>' or "
                     f"'sha256-<base64>', but was {ctx.attr.sha256!r}", attr="sha256",
                     hint="leave it out and build once: the error names the sha256 to put here")
    arch = architecture_value(ctx, "arch", ctx.attr.arch, variant=True)
    if not re.match(r"^[a-z0-9]+$", ctx.attr.os):
        ctx.fail(f"must be an operating system name such as 'linux', but was {ctx.attr.os!r}", attr="os")
    final_name = _check_name(ctx, "final_image_name") if ctx.attr.final_image_name is not None else image_name
    tag = ctx.attr.final_image_tag
    if not _TAG_RE.match(tag):
        ctx.fail(f"must be a valid image tag (letters, digits, '_', '.', '-'; at most 128), but was {tag!r}",
                 attr="final_image_tag")
    tree = ctx.declare_internal("image", is_tree=True)
    description = ctx.declare_file(f"{ctx.name}.json")
    ctx.actions.declare(
        "ImagePull", outputs={"image": tree, "description": description}, network=True,
        params={"label": ctx.label, "image_name": image_name, "image_digest": digest, "os": ctx.attr.os,
                "arch": arch, "sha256": sha256, "repo_tags": [f"{final_name}:{tag}"],
                "tls_verify": ctx.attr.tls_verify,
                "archive": f"{description.root}/{ctx.name}.tar", "oci_layout": f"{description.root}/{ctx.name}.oci"},
        description=f"ImagePull {ctx.label} ({image_name}@{digest[:19]})")
    files = declare_image_outputs(ctx, image_tree=tree, description=description, compressor="none")
    return [DefaultInfo(files=tuple(files)), ImageInfo(label=ctx.label, image=tree, description=description)]


pull_image = rule(
    "pull_image", _pull_image_impl,
    doc="A base image pulled from a registry by digest (pullImage), over the OCI distribution API with "
        "token or Basic auth (credentials: DTBUILD_REGISTRY_USER/DTBUILD_REGISTRY_PASSWORD or "
        "~/.docker/config.json). Every blob is checked against its digest; the pull is cached, so later "
        "builds need no network. Outputs NAME.tar (an uncompressed docker-archive), NAME.oci/ and NAME.json; "
        "use it as `from_image` of an image.",
    attrs={
        "image_name": attrs.string(doc="The repository, with its registry unless it is Docker Hub: 'nixos/nix', "
                                       "'ghcr.io/org/app', '127.0.0.1:5000/base'. No tag."),
        "image_digest": attrs.string(doc="The manifest digest ('sha256:...'); an index digest selects the "
                                         "os/arch entry."),
        "sha256": attrs.string(doc="Optional check of the result: the sha256 of the uncompressed docker-archive "
                                   "NAME.tar this rule outputs (hex, 'sha256:hex' or SRI). image_digest already pins "
                                   "every byte; this guards the archive as pullImage's sha256 does.",
                               default=None, allow_none=True),
        "os": attrs.string(doc="Operating system of the entry to take from an image index.", default="linux"),
        "arch": attrs.string(doc="Architecture (GOARCH spelling, optionally '/variant'; x86_64 and aarch64 are "
                                 "taken as amd64 and arm64) of the entry to take from an image index. None: the "
                                 "architecture of the machine that builds it (as pullImage's default, the host's "
                                 "GOARCH), so an index digest gives another image on an arm64 machine; set it to "
                                 "pull the same image everywhere.", default=None, allow_none=True),
        "final_image_name": attrs.string(doc="Repository name in the image's tag; default: image_name.",
                                         default=None, allow_none=True),
        "final_image_tag": attrs.string(doc="Tag of the image (in NAME.tar and NAME.json).", default="latest"),
        "tls_verify": attrs.boolean(doc="Verify the registry's TLS certificate; False also allows plain HTTP "
                                        "(a local or self-signed registry).", default=True),
    })
