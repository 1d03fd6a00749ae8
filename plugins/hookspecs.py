"""The dtbuild plugin API: every hook a plugin may implement.

A plugin is a module or object with functions decorated by
``dtbuild.plugins.hookimpl`` whose names are hooks below. Plugins are found through
the ``dtbuild`` entry-point group of installed distributions and through
``[plugins] modules = [...]`` in the workspace's ``dtbuild.toml``. The built-in rules,
action kinds, compressors, executors and reporter are plugins registered the same way
(:mod:`dtbuild.plugins.builtin`).

Registration hooks return classes (or, for rules, rule objects) keyed by their
``NAME``; two plugins registering the same name is an error naming both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dtbuild.plugins import hookspec

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import (
        ActionKind,
        Command,
        Compressor,
        Executor,
        LayerKind,
    )
    from dtbuild.rules.api import Rule

# --------------------------------------------------------------------------- registration
# Called once, when the plugin manager is made, before any BUILD file is read.


@hookspec
def dtbuild_register_rules() -> Sequence[Rule]:
    """Rules that BUILD files may call, such as ``files`` or ``image``.

    Called once per process, before BUILD files are loaded.

    :return: rule objects made with :func:`dtbuild.rules.rule`; each ``rule.name`` is
        the function name BUILD files call.
    """


@hookspec
def dtbuild_register_build_globals() -> Mapping[str, Any]:
    """Constants visible in every BUILD and ``.bzl`` file (strings, numbers, lists and
    dicts of them), such as ``SHADOW_SETUP``.

    Called once per process, before BUILD files are loaded.

    :return: a mapping from global name to value.
    """


@hookspec
def dtbuild_register_action_kinds() -> Sequence[type[ActionKind]]:
    """Implementations of action mnemonics that rules declare (``Genrule``, ``LayerWrite``).

    Called once per process, before the first action runs.

    :return: :class:`~dtbuild.plugins.interfaces.ActionKind` subclasses, each with a
        unique ``NAME``.
    """


@hookspec
def dtbuild_register_compressors() -> Sequence[type[Compressor]]:
    """Compressors for layer blobs and image archives (``none``, ``gz``, ``zstd``).

    Called once per process, before BUILD files are loaded (the ``compressor``
    attribute of image rules accepts exactly the registered names).

    :return: :class:`~dtbuild.plugins.interfaces.Compressor` subclasses.
    """


@hookspec
def dtbuild_register_layer_kinds() -> Sequence[type[LayerKind]]:
    """Kinds of image layers. For each one the engine gives BUILD files a rule named
    after it, made from its ``ATTRS``, whose one action streams its ``entries()`` into
    a layer tar (see docs/plugins.md, "A layer kind"); a kind that brings its own rule
    sets ``ACTION_KIND``.

    Called once per process, before BUILD files are loaded.

    :return: :class:`~dtbuild.plugins.interfaces.LayerKind` subclasses, each with a
        unique ``NAME`` that no rule has.
    """


@hookspec
def dtbuild_register_executors() -> Sequence[type[Executor]]:
    """Executors that run commands for actions (local sandbox, namespace, VM, remote).

    Called once per process.

    :return: :class:`~dtbuild.plugins.interfaces.Executor` subclasses.
    """


@hookspec
def dtbuild_register_commands() -> Sequence[type[Command]]:
    """Subcommands of ``dtbuild`` (``stream``, ``inspect``, ``push`` and ``load`` come
    from the built-in ``images`` and ``registries`` plugins this way).

    Called once per process, when the command line is read. A name that is an engine
    command (``build``, ``query``, ...) or another plugin's command is an error naming both.

    :return: :class:`~dtbuild.plugins.interfaces.Command` subclasses, each with a unique
        ``NAME`` (lower case, dashes allowed) and a one-line ``HELP``.
    """


# --------------------------------------------------------------------------- decisions


@hookspec(firstresult=True)
def dtbuild_select_executor(mnemonic: str, requested: str, available: Sequence[str]) -> str | None:
    """Choose the executor for an action that runs commands.

    Called for each such action, just before it runs. The first non-``None`` answer wins;
    the built-in implementation honours ``requested`` and maps ``"auto"`` to ``"local"`` for
    commands such as genrule's and to ``"namespace"`` (else ``"vm"``) for root layers.

    :param mnemonic: the action's kind, such as ``Genrule``.
    :param requested: the executor the target asked for (``"auto"`` when it did not).
    :param available: names of the registered executors that work on this machine.
    :return: an executor name, or ``None`` to let another plugin decide.
    """


@hookspec
def dtbuild_describe_target(label: str, providers: Mapping[type, Any],
                            read_output: Callable[[Any], bytes]) -> Mapping[str, Any] | None:
    """Fields of a built target's entry in the build summary (``--summary-json`` and the
    last lines of ``dtbuild build``), such as an image's ``manifest_digest``.

    Called after a build, once per requested target whose outputs were built. The answers
    of every plugin are merged; two plugins giving one field, or a plugin giving
    ``outputs``, is an error.

    :param label: the target's label.
    :param providers: its providers, by type (``{ImageInfo: ImageInfo(...)}``).
    :param read_output: the bytes of one of its built file artifacts (a provider field),
        read from the store with the checks of every output read.
    :return: a mapping of summary fields (JSON values), or ``None`` for none.
    """


# --------------------------------------------------------------------------- observers
# Called from the thread that reports progress; they must return quickly.


@hookspec
def dtbuild_build_started(targets: Sequence[str], total_actions: int) -> None:
    """The execution phase is starting.

    :param targets: the labels requested on the command line, expanded.
    :param total_actions: how many actions the build may run or fetch from the cache.
    """


@hookspec
def dtbuild_action_started(label: str, mnemonic: str, description: str) -> None:
    """An action missed the cache and starts running.

    :param label: the target that declared it.
    :param mnemonic: the action kind.
    :param description: a short human description (``Genrule //pkg:gen``).
    """


@hookspec
def dtbuild_action_finished(label: str, mnemonic: str, description: str, status: str,
                            seconds: float) -> None:
    """An action is done (run, found in a cache, or failed).

    :param label: the target that declared it.
    :param mnemonic: the action kind.
    :param description: the same text as in :func:`dtbuild_action_started`.
    :param status: ``"executed"``, ``"remote_executed"``, ``"cached"``, ``"remote_cached"`` or
        ``"failed"``.
    :param seconds: wall time spent on it in this build.
    """


@hookspec
def dtbuild_action_log(label: str, mnemonic: str, message: str) -> None:
    """An action reported progress with :meth:`ActionContext.log`, while it runs.

    :param label: the target that declared the action.
    :param mnemonic: the action kind.
    :param message: one line of text for the user.
    """


@hookspec
def dtbuild_transfer_progress(label: str, description: str, done_bytes: int, total_bytes: int | None) -> None:
    """Bytes moved so far by a transfer of a running action or command: a pull, a
    ``fetch_url`` download, a push, a remote cache download or upload. The console
    draws these as progress bars.

    A transfer is identified by ``(label, description)``. Its first call comes as it
    starts (``done_bytes`` 0 when its size is known), then at most about ten a second
    while it moves, then a final one with ``done_bytes == total_bytes``, which marks it
    finished; when the size was not known, or the transfer stopped early (an error, a
    retry given up), the final call gives ``total_bytes`` as the bytes moved. A transfer
    that starts over (a retry) is reported again from 0. Transfers under 1 MiB are not
    reported. Calls come from the transferring thread, one at a time, never one per
    chunk: :class:`dtbuild.plugins.progress.ProgressMeter` throttles them.

    :param label: the target whose action moves the bytes (for a remote cache transfer,
        the action's target too), or the name of the command (``push``).
    :param description: what moves, short (``pull sha256:0a1b2c3d4e5f``,
        ``remote cache download sha256:…``).
    :param done_bytes: bytes moved so far.
    :param total_bytes: the transfer's size, or ``None`` while it is not known.
    """


@hookspec
def dtbuild_build_finished(summary: Mapping[str, Any], success: bool) -> None:
    """The build is over (successfully or not).

    :param summary: the ``--summary-json`` document.
    :param success: whether every requested target was built.
    """
