"""The built-in plugin: dtbuild's own rules, action kinds, compressors and executors,
registered through the same hooks as any third-party plugin (see ``dtbuild plugins``).

Imports happen inside the hooks so that a process pays only for what it registers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dtbuild.plugins import hookimpl

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import ActionKind, Compressor, Executor
    from dtbuild.rules.api import Rule


@hookimpl
def dtbuild_register_rules() -> Sequence[Rule]:
    from dtbuild.rules.builtin.fetch import fetch_url
    from dtbuild.rules.builtin.files import files
    from dtbuild.rules.builtin.genrule import genrule
    from dtbuild.rules.builtin.image import image, image_archive, pure_layer

    return [files, genrule, fetch_url, pure_layer, image, image_archive]


@hookimpl
def dtbuild_register_action_kinds() -> Sequence[type[ActionKind]]:
    from dtbuild.plugins.builtin.actions import FilesTree, Genrule
    from dtbuild.plugins.builtin.fetch import FetchUrl
    from dtbuild.plugins.builtin.image_actions import IMAGE_ACTION_KINDS

    return [FilesTree, Genrule, FetchUrl, *IMAGE_ACTION_KINDS]


@hookimpl
def dtbuild_register_compressors() -> Sequence[type[Compressor]]:
    from dtbuild.plugins.builtin.compressors import BUILTIN_COMPRESSORS

    return list(BUILTIN_COMPRESSORS)


@hookimpl
def dtbuild_register_executors() -> Sequence[type[Executor]]:
    from dtbuild.plugins.builtin.executors import LocalExecutor

    return [LocalExecutor]


@hookimpl
def dtbuild_select_executor(mnemonic: str, requested: str, available: Sequence[str]) -> str | None:
    if requested == "auto":
        return "local" if "local" in available else None
    return None
