"""The built-in plugin ``registries``: ``pull_image`` (a base image pulled from a
registry by digest) and its action kind, and the command ``push`` (:mod:`.push`). Its
image is an image tree of the ``images`` plugin, so it needs that plugin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dtbuild.plugins import hookimpl

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import ActionKind, Command
    from dtbuild.rules.api import Rule

#: Plugins this one needs: without them it is not loaded (its rules say why).
DTBUILD_REQUIRES = ("images",)


@hookimpl
def dtbuild_register_rules() -> Sequence[Rule]:
    from dtbuild.rules.builtin.pull import pull_image

    return [pull_image]


@hookimpl
def dtbuild_register_action_kinds() -> Sequence[type[ActionKind]]:
    from dtbuild.plugins.builtin.pull import ImagePull

    return [ImagePull]


@hookimpl
def dtbuild_register_commands() -> Sequence[type[Command]]:
    from dtbuild.plugins.builtin.push import PushCommand

    return [PushCommand]
