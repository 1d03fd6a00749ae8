"""``fetch_url``: a file downloaded once and checked against its sha256."""

from __future__ import annotations

import re

from dtbuild.rules import attrs
from dtbuild.rules.api import RuleContext, rule
from dtbuild.rules.builtin.files import normalize_prefix
from dtbuild.rules.providers import DefaultInfo, PackageEntry, PackageInfo, Provider

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SCHEMES = ("http://", "https://", "file://")


def _fetch_url_impl(ctx: RuleContext) -> list[Provider]:
    urls = ctx.attr.urls
    if not urls:
        ctx.fail("must list at least one URL", attr="urls")
    for url in urls:
        if not url.startswith(SCHEMES):
            ctx.fail(f"must hold http, https or file URLs, but has {url!r}", attr="urls")
    sha256 = ctx.attr.sha256.lower().removeprefix("sha256:")
    if not _SHA256_RE.match(sha256):
        ctx.fail(f"must be 64 hex digits (the file's sha256), but was {ctx.attr.sha256!r}", attr="sha256",
                 hint="compute it with `sha256sum FILE`")
    prefix = normalize_prefix(ctx, "prefix")
    extract = ctx.attr.extract
    out = ctx.declare_directory(ctx.name) if extract else ctx.declare_file(ctx.name)
    ctx.actions.declare(
        "FetchUrl", outputs={"out": out}, network=True,
        params={"urls": list(urls), "sha256": sha256, "executable": ctx.attr.executable, "extract": extract},
        description=f"FetchUrl {ctx.label}")
    dest = "/" + prefix if extract else f"/{prefix + '/' if prefix else ''}{ctx.name}"
    return [DefaultInfo(files=(out,)), PackageInfo(label=ctx.label, entries=(PackageEntry(dest, out),))]


fetch_url = rule(
    "fetch_url", _fetch_url_impl,
    doc="Downloads a file (http, https or file URL; mirrors tried in order) and checks its sha256: a "
        "mismatch fails the build and nothing is cached. As a package it is placed at PREFIX/NAME, or, "
        "with `extract`, its contents below PREFIX.",
    attrs={
        "urls": attrs.string_list(doc="Where to download from; tried in order."),
        "sha256": attrs.string(doc="The sha256 of the file, as 64 hex digits."),
        "executable": attrs.boolean(doc="Mark the file executable (mode 0755).", default=False),
        "extract": attrs.boolean(doc="Unpack the file (a tar archive, optionally gzip, bzip2 or xz compressed) "
                                     "instead of keeping it whole.",
                                 default=False),
        "prefix": attrs.string(doc="Absolute directory in the image where the file or its contents go.",
                               default="/"),
    })
