"""Providers: the only way data flows from a target to the targets that depend on it.

Each provider is a frozen, slotted dataclass. A rule implementation returns a list of
them; a dependent reads ``dep[PackageInfo]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from dtbuild.rules.artifacts import Artifact


class Provider:
    """Base class of providers (a marker: providers are frozen dataclasses)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class DefaultInfo(Provider):
    """What building the target produces: the files and directories a user gets under
    ``dtbuild-out/``, and what ``srcs`` of a dependent see."""

    files: tuple[Artifact, ...]


@dataclass(frozen=True, slots=True)
class PackageEntry:
    """Place ``artifact`` at ``dest`` (an absolute path in the image). A tree artifact's
    contents are merged below ``dest``; a file artifact becomes the file ``dest``."""

    dest: str
    artifact: Artifact


@dataclass(frozen=True, slots=True, eq=False)
class PackageInfo(Provider):
    """A package: a tree of files placed in an image, with runtime dependencies.

    ``deps`` are the direct runtime dependencies; the closure over them is what layered
    images put into layers (one layer per package, most popular first).
    """

    label: str
    entries: tuple[PackageEntry, ...]
    deps: tuple[PackageInfo, ...] = ()
    #: The package's own version where one is known (a Debian package's), for the image's
    #: SPDX document; None for targets of the workspace.
    version: str | None = None

    def closure(self) -> Iterator[PackageInfo]:
        """This package and every package it depends on, each once, depth first."""
        seen: set[str] = set()
        stack = [self]
        while stack:
            pkg = stack.pop()
            if pkg.label in seen:
                continue
            seen.add(pkg.label)
            yield pkg
            stack.extend(reversed(pkg.deps))


@dataclass(frozen=True, slots=True)
class LayerInfo(Provider):
    """One image layer: ``tar`` is the uncompressed layer (None for a layer written
    compressed only: its ``blob`` is then the one copy, and readers decompress it),
    ``meta`` a JSON file with its ``diff_id``, ``size`` and the ``packages`` it holds."""

    label: str
    tar: Artifact | None
    meta: Artifact
    #: The layer already compressed by ``blob_compressor`` (written in the same pass as
    #: the tar), with its JSON ``{"digest", "size", "media_type", "diff_id"}``; images
    #: using that compressor take it instead of compressing the tar again.
    blob: Artifact | None = None
    blob_meta: Artifact | None = None
    blob_compressor: str | None = None


@dataclass(frozen=True, slots=True)
class ImageInfo(Provider):
    """A built or imported image.

    ``image`` is an *image tree* (see docs/image-tree.md): ``image.json`` (the
    description users get as ``name.json``), ``config.json``, ``manifest.json`` (OCI),
    ``layers/<diff_id hex>`` (uncompressed layer tars) and ``blobs/<digest hex>`` (the
    layer blobs as the manifest lists them). Its files are shared with the store, so
    passing an image around copies nothing.
    """

    label: str
    image: Artifact
    #: ``name.json`` for users (the same content as the tree's image.json).
    description: Artifact | None = None
    #: How many layers the image has, when analysis knows it (an image built from known
    #: layers); None when only its build tells (a pulled or imported base somewhere below).
    layers: int | None = None


@dataclass(frozen=True, slots=True, eq=False)
class CommandInfo(Provider):
    """The build environment of a target's command (a genrule's), as its sandbox shows
    it: what an image reproducing it needs (shell_image). Paths are relative to the
    command's working directory, its execution root."""

    label: str
    #: The rule that runs the command ("genrule").
    kind: str
    #: The interpreter and its flags that run ``script`` (``("/bin/bash", "-c")``).
    shell: tuple[str, ...]
    #: The script as it runs: the rule's prologue (``set -e -o pipefail``...) and the command.
    script: str
    #: The environment, in order, without HOME and TMPDIR (private directories of each
    #: run: whoever reproduces the environment gives its own).
    env: tuple[tuple[str, str], ...]
    #: Each input at its path below the working directory.
    inputs: tuple[tuple[str, Artifact], ...]
    #: The paths the command must create.
    outputs: tuple[str, ...]
    #: Directories that exist before the command runs (its output directory).
    dirs: tuple[str, ...] = ()
