"""The built-in plugin ``images``: ``pure_layer``, ``image`` and ``image_archive``, and
the action kinds that write layers, assemble images and write their archives. Its
images are compressed by registered compressors (the ``compressors`` plugin, or another
plugin's)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dtbuild.plugins import hookimpl

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import ActionKind
    from dtbuild.rules.api import Rule

#: Plugins this one needs: without them it is not loaded (its rules say why).
DTBUILD_REQUIRES = ("compressors",)


@hookimpl
def dtbuild_register_rules() -> Sequence[Rule]:
    from dtbuild.rules.builtin.image import image, image_archive, pure_layer

    return [pure_layer, image, image_archive]


@hookimpl
def dtbuild_register_action_kinds() -> Sequence[type[ActionKind]]:
    from dtbuild.plugins.builtin.image_actions import IMAGE_ACTION_KINDS

    return list(IMAGE_ACTION_KINDS)
