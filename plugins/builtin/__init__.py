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
    from dtbuild.rules.builtin.files import files
    from dtbuild.rules.builtin.genrule import genrule

    return [files, genrule]


@hookimpl
def dtbuild_register_action_kinds() -> Sequence[type[ActionKind]]:
    from dtbuild.plugins.builtin.actions import FilesTree, Genrule

    return [FilesTree, Genrule]


@hookimpl
def dtbuild_register_compressors() -> Sequence[type[Compressor]]:
    try:  # TEMPORARY until compressors land
        from dtbuild.plugins.builtin.compressors import BUILTIN_COMPRESSORS
    except ModuleNotFoundError:
        return []
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
