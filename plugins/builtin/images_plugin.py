"""The built-in plugin ``images``: ``image`` and ``image_archive``, the ``pure_layer``
layer kind (its rule is made by the engine), and the action kinds that write layers
(``LayerKindWrite`` those of every layer kind), assemble images and write their archives;
the commands ``stream``, ``inspect`` and ``load`` (:mod:`.image_commands`) and ``run``
(:mod:`.run_command`), and each image target's ``manifest_digest`` in the build summary.
Its images are compressed by registered compressors (the ``compressors`` plugin, or
another plugin's)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dtbuild.plugins import hookimpl

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import ActionKind, Command, LayerKind
    from dtbuild.rules.api import Rule

#: Plugins this one needs: without them it is not loaded (its rules say why).
DTBUILD_REQUIRES = ("compressors",)


@hookimpl
def dtbuild_register_rules() -> Sequence[Rule]:
    from dtbuild.rules.builtin.image import image, image_archive

    return [image, image_archive]


@hookimpl
def dtbuild_register_layer_kinds() -> Sequence[type[LayerKind]]:
    # The engine makes the pure_layer rule from it.
    from dtbuild.plugins.builtin.pure_layer import PureLayer

    return [PureLayer]


@hookimpl
def dtbuild_register_action_kinds() -> Sequence[type[ActionKind]]:
    from dtbuild.plugins.builtin.image_actions import IMAGE_ACTION_KINDS
    from dtbuild.plugins.builtin.spdx import SPDX_ACTION_KINDS

    return [*IMAGE_ACTION_KINDS, *SPDX_ACTION_KINDS]


@hookimpl
def dtbuild_register_commands() -> Sequence[type[Command]]:
    from dtbuild.plugins.builtin.image_commands import IMAGE_COMMANDS
    from dtbuild.plugins.builtin.run_command import RUN_COMMANDS

    return [*IMAGE_COMMANDS, *RUN_COMMANDS]


@hookimpl
def dtbuild_describe_target(label: str, providers: Mapping[type, Any],
                            read_output: Callable[[Any], bytes]) -> Mapping[str, Any] | None:
    """An image target's summary entry gets its manifest digest, from its NAME.json."""
    from dtbuild.plugins.image_description import ImageDescription, ImageDescriptionError
    from dtbuild.plugins.interfaces import ActionFailed
    from dtbuild.rules.providers import ImageInfo

    image = providers.get(ImageInfo)
    if not isinstance(image, ImageInfo) or image.description is None:
        return None
    try:
        description = ImageDescription.from_json(read_output(image.description), image.description.path)
    except ImageDescriptionError as e:
        raise ActionFailed(str(e)) from None
    return {"manifest_digest": description.manifest_digest}
