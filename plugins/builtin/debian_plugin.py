"""The built-in plugin ``debian``: ``deb_packages`` (Debian packages pinned by a lock
file, one package per ``.deb``), its action kinds ``DebExtract`` and ``DebLockProblem``
(its downloads are the ``core`` plugin's ``FetchUrl``, so it needs that plugin), and the
command ``lock`` (:mod:`.deb_lock_command`), which resolves the packages against the
sources' signed indexes and writes the lock."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dtbuild.plugins import hookimpl

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import ActionKind, Command
    from dtbuild.rules.api import Rule

#: Plugins this one needs: without them it is not loaded (its rules say why).
DTBUILD_REQUIRES = ("core",)


@hookimpl
def dtbuild_register_rules() -> Sequence[Rule]:
    from dtbuild.rules.builtin.deb import deb_packages

    return [deb_packages]


@hookimpl
def dtbuild_register_action_kinds() -> Sequence[type[ActionKind]]:
    from dtbuild.plugins.builtin.deb_actions import DEB_ACTION_KINDS

    return list(DEB_ACTION_KINDS)


@hookimpl
def dtbuild_register_commands() -> Sequence[type[Command]]:
    from dtbuild.plugins.builtin.deb_lock_command import LockCommand

    return [LockCommand]
