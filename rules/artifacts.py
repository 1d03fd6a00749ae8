"""Artifacts: the files and directories that actions read and write.

An artifact is known by its workspace-relative path: ``pkg/src.txt`` for a source file,
``dtbuild-out/pkg/name`` for something a target produces. Its bytes are known only
once the action that writes it has run (or been found in the cache).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class Artifact:
    path: str
    is_tree: bool = False
    is_source: bool = False
    #: The target that declared it (canonical label), or None for source files.
    owner: str | None = None
    #: The directory its package-relative path is relative to: the package's directory
    #: for a source file, ``dtbuild-out/<package>`` for a declared output.
    root: str = ""

    @property
    def package_path(self) -> str:
        """The path relative to its package (``bin/sh`` for ``pkg/bin/sh``)."""
        if self.root and self.path.startswith(self.root + "/"):
            return self.path[len(self.root) + 1:]
        return self.path if not self.root else self.basename

    @property
    def basename(self) -> str:
        return self.path.rsplit("/", 1)[-1]
