"""The built-in plugin ``layered``: ``layered_image``, ``merge_images``, ``export_image``,
``shell_image``, the helper rules (``merge_trees``, ``fake_nss``, ``bin_sh``, ``usr_bin_env``,
``ca_certificates``) with the ``SHADOW_SETUP`` BUILD global, and their action kinds.
Its rules declare the image actions of the ``images`` plugin, so it needs that plugin."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dtbuild.plugins import hookimpl

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import ActionKind
    from dtbuild.rules.api import Rule

#: Plugins this one needs: without them it is not loaded (its rules say why).
DTBUILD_REQUIRES = ("images",)


@hookimpl
def dtbuild_register_rules() -> Sequence[Rule]:
    from dtbuild.rules.builtin.helpers import HELPER_RULES
    from dtbuild.rules.builtin.layered import export_image, layered_image, merge_images
    from dtbuild.rules.builtin.shell_image import shell_image

    return [layered_image, merge_images, export_image, shell_image, *HELPER_RULES]


@hookimpl
def dtbuild_register_build_globals() -> Mapping[str, Any]:
    from dtbuild.rules.builtin.helpers import SHADOW_SETUP

    return {"SHADOW_SETUP": SHADOW_SETUP}


@hookimpl
def dtbuild_register_action_kinds() -> Sequence[type[ActionKind]]:
    from dtbuild.plugins.builtin.layered_actions import LAYERED_ACTION_KINDS
    from dtbuild.plugins.builtin.shell_image_actions import SHELL_IMAGE_ACTION_KINDS

    return [*LAYERED_ACTION_KINDS, *SHELL_IMAGE_ACTION_KINDS]
