"""The built-in plugin: dtbuild's own rules, action kinds, compressors and executors,
registered through the same hooks as any third-party plugin (see ``dtbuild plugins``).

Imports happen inside the hooks so that a process pays only for what it registers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dtbuild.plugins import hookimpl

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import ActionKind, Compressor, Executor, LayerKind
    from dtbuild.rules.api import Rule


@hookimpl
def dtbuild_register_rules() -> Sequence[Rule]:
    from dtbuild.rules.builtin.fetch import fetch_url
    from dtbuild.rules.builtin.files import files
    from dtbuild.rules.builtin.genrule import genrule
    from dtbuild.rules.builtin.helpers import HELPER_RULES
    from dtbuild.rules.builtin.image import image, image_archive, pure_layer
    from dtbuild.rules.builtin.layered import export_image, layered_image, merge_images
    from dtbuild.rules.builtin.pull import pull_image
    from dtbuild.rules.builtin.root_layer import root_layer

    return [files, genrule, fetch_url, pure_layer, image, image_archive, pull_image, layered_image, merge_images,
            export_image, root_layer, *HELPER_RULES]


@hookimpl
def dtbuild_register_build_globals() -> Mapping[str, Any]:
    from dtbuild.rules.builtin.helpers import SHADOW_SETUP

    return {"SHADOW_SETUP": SHADOW_SETUP}


@hookimpl
def dtbuild_register_action_kinds() -> Sequence[type[ActionKind]]:
    from dtbuild.plugins.builtin.actions import FilesTree, Genrule
    from dtbuild.plugins.builtin.fetch import FetchUrl
    from dtbuild.plugins.builtin.image_actions import IMAGE_ACTION_KINDS
    from dtbuild.plugins.builtin.layered_actions import LAYERED_ACTION_KINDS
    from dtbuild.plugins.builtin.pull import ImagePull
    from dtbuild.plugins.builtin.root_layer import ROOT_LAYER_ACTION_KINDS

    return [FilesTree, Genrule, FetchUrl, *IMAGE_ACTION_KINDS, ImagePull, *LAYERED_ACTION_KINDS,
            *ROOT_LAYER_ACTION_KINDS]


@hookimpl
def dtbuild_register_compressors() -> Sequence[type[Compressor]]:
    from dtbuild.plugins.builtin.compressors import BUILTIN_COMPRESSORS

    return list(BUILTIN_COMPRESSORS)


@hookimpl
def dtbuild_register_executors() -> Sequence[type[Executor]]:
    from dtbuild.plugins.builtin.executors import LocalExecutor
    from dtbuild.plugins.builtin.namespace_executor import NamespaceExecutor
    from dtbuild.plugins.builtin.vm_executor import VmExecutor

    return [LocalExecutor, NamespaceExecutor, VmExecutor]


@hookimpl
def dtbuild_register_layer_kinds() -> Sequence[type[LayerKind]]:
    from dtbuild.plugins.builtin.root_layer import RootLayer

    return [RootLayer]


#: Action kinds whose commands need an executor that builds root layers.
ROOT_LAYER_MNEMONICS = frozenset({"RootLayerWrite"})


@hookimpl
def dtbuild_select_executor(mnemonic: str, requested: str, available: Sequence[str]) -> str | None:
    if requested != "auto":
        return None
    if mnemonic in ROOT_LAYER_MNEMONICS:
        # namespace where it works, else a VM; when neither does, namespace, so that the
        # error says what is missing for it.
        for name in ("namespace", "vm"):
            if name in available:
                return name
        return "namespace"
    return "local" if "local" in available else None
