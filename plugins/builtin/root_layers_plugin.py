"""The built-in plugin ``root_layers``: ``root_layer`` (a layer made by a script run as
root in an overlay over a base image), the action kinds behind it and ``image``'s
``run_as_root``, and the layer kind. It declares image actions, so it needs ``images``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dtbuild.plugins import hookimpl

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import ActionKind, LayerKind
    from dtbuild.rules.api import Rule

#: Plugins this one needs: without them it is not loaded (its rules say why).
DTBUILD_REQUIRES = ("images",)


@hookimpl
def dtbuild_register_rules() -> Sequence[Rule]:
    from dtbuild.rules.builtin.root_layer import root_layer

    return [root_layer]


@hookimpl
def dtbuild_register_action_kinds() -> Sequence[type[ActionKind]]:
    from dtbuild.plugins.builtin.root_layer import ROOT_LAYER_ACTION_KINDS

    return list(ROOT_LAYER_ACTION_KINDS)


@hookimpl
def dtbuild_register_layer_kinds() -> Sequence[type[LayerKind]]:
    from dtbuild.plugins.builtin.root_layer import RootLayer

    return [RootLayer]
