"""The built-in plugin ``core``: the rules every build may use whatever it builds
(``files``, ``genrule``, ``fetch_url``) and their action kinds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dtbuild.plugins import hookimpl

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import ActionKind
    from dtbuild.rules.api import Rule


@hookimpl
def dtbuild_register_rules() -> Sequence[Rule]:
    from dtbuild.rules.builtin.fetch import fetch_url
    from dtbuild.rules.builtin.files import files
    from dtbuild.rules.builtin.genrule import genrule

    return [files, genrule, fetch_url]


@hookimpl
def dtbuild_register_action_kinds() -> Sequence[type[ActionKind]]:
    from dtbuild.plugins.builtin.actions import FilesTree, Genrule
    from dtbuild.plugins.builtin.fetch import FetchUrl

    return [FilesTree, Genrule, FetchUrl]
