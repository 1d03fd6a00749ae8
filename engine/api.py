"""The engine as plugin commands see it: which subcommands plugins register
(``dtbuild_register_commands``), and :class:`EngineCommandAPI`, the implementation of
:class:`dtbuild.plugins.interfaces.CommandAPI` a command's ``run`` gets.

This module owns the seam between the command line and plugin commands: a command
names a target, asks for the artifacts behind its providers' fields, reads them from the
store and reports progress, all through public methods of :class:`~dtbuild.engine.build.Session`,
so that the engine knows builds, not images (``stream``, ``inspect``, ``load`` and
``push`` are the ``images`` and ``registries`` plugins' commands).
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dtbuild.engine.errors import BuildFailure, PluginError, UsageError

if TYPE_CHECKING:
    import pluggy
    from dtbuild.engine.build import Session, StoreReader
    from dtbuild.plugins.interfaces import CancelToken, Command, Compressor, InputArtifact, Settings

#: The commands of the engine itself; a plugin command may not take one of these names.
ENGINE_COMMANDS = ("build", "query", "graph", "explain", "clean", "cache", "plugins")
_COMMAND_NAME = re.compile(r"[a-z][a-z0-9-]*\Z")
HOOK = "dtbuild_register_commands"


@dataclass(frozen=True, slots=True)
class RegisteredCommand:
    """A plugin command and the plugin that registered it."""

    name: str
    command: type[Command]
    plugin: str

    @property
    def help(self) -> str:
        return str(getattr(self.command, "HELP", "") or "")


@dataclass
class CommandTable:
    """The plugin commands of a session, and those of built-in plugins that are not loaded."""

    commands: dict[str, RegisteredCommand] = field(default_factory=dict)
    #: name -> (the built-in plugin it comes from, why that plugin is not loaded).
    unavailable: dict[str, tuple[str, str]] = field(default_factory=dict)

    def unknown_command_error(self, name: str) -> UsageError | None:
        """The error for ``dtbuild NAME`` when NAME is the command of a plugin that is not loaded."""
        if name not in self.unavailable:
            return None
        plugin, why = self.unavailable[name]
        return UsageError(f"unknown command '{name}' (it comes from the plugin '{plugin}', which is {why})",
                          hint=f"run it without the -p flag that leaves out '{plugin}'")


def _qualname(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"


def _command_classes(function: Any, plugin: str) -> list[Any]:
    try:
        return list(function() or ())
    except Exception as e:
        raise PluginError(f"plugin '{plugin}' failed in {HOOK}: {type(e).__name__}: {e}") from e


def collect_commands(pm: pluggy.PluginManager) -> CommandTable:
    """Call ``dtbuild_register_commands`` of every plugin and index the commands by NAME.

    :raises PluginError: for a command without a valid NAME, one named like an engine
        command, or one name registered by two plugins (both are named).
    """
    from dtbuild.engine.plugin_manager import plugin_origins

    table = CommandTable()
    for impl in getattr(pm.hook, HOOK).get_hookimpls():  # registration order: built-ins first
        plugin = pm.get_name(impl.plugin) or repr(impl.plugin)
        for cls in _command_classes(impl.function, plugin):
            name = getattr(cls, "NAME", None)
            if not isinstance(name, str) or not _COMMAND_NAME.match(name):
                raise PluginError(f"plugin '{plugin}' registered the command {_qualname(cls)} with the NAME {name!r}",
                                  hint="a command's NAME is lower case letters, digits and dashes, such as 'stream'")
            if name in ENGINE_COMMANDS:
                raise PluginError(f"plugin '{plugin}' registers the command '{name}' ({_qualname(cls)}), but "
                                  f"'{name}' is a command of dtbuild itself",
                                  hint=f"give the command another NAME, or block the plugin (-p no:{plugin})")
            if name in table.commands:
                first = table.commands[name]
                raise PluginError(f"two plugins register the command '{name}': {_qualname(first.command)} (plugin "
                                  f"'{first.plugin}') and {_qualname(cls)} (plugin '{plugin}')",
                                  hint=f"uninstall or block one of them (-p no:{plugin})")
            table.commands[name] = RegisteredCommand(name, cls, plugin)
    origins = plugin_origins(pm)
    for plugin, module in origins.unavailable_modules.items():
        register = getattr(module, HOOK, None)
        if register is None:
            continue
        for cls in _command_classes(register, plugin):
            name = getattr(cls, "NAME", None)
            if isinstance(name, str) and name not in table.commands:
                table.unavailable[name] = (plugin, origins.unavailable.get(plugin, "not loaded"))
    return table


class EngineCommandAPI:
    """What a plugin command may do with the engine (:class:`dtbuild.plugins.interfaces.CommandAPI`)."""

    cancel: CancelToken

    def __init__(self, session: Session, *, cancel: threading.Event, debug: bool = False) -> None:
        self._session = session
        self._cancel_event = cancel
        self.cancel = cancel
        self.debug = debug
        self.workspace_root = session.workspace.root
        self.state_dir = session.workspace.state_dir
        #: The running command's name: the label its transfers are reported under.
        self.command_name = ""
        self._progress_lock = threading.Lock()

    def settings(self) -> Settings:
        return self._session.workspace.settings()

    def resolve_target(self, pattern: str, *, what: str = "target") -> str:
        labels = self._session.expand([pattern])
        if len(labels) != 1:
            raise UsageError(f"'{pattern}' names {len(labels)} targets; give exactly one {what}")
        return str(labels[0])

    def providers(self, label: str) -> Mapping[type, Any]:
        from dtbuild.engine.labels import parse_label

        parsed = parse_label(label)
        return self._session.analyze([parsed]).targets[parsed].providers

    def kind(self, label: str) -> str:
        """The rule of the target ``label`` (``image``, ``genrule``, ...)."""
        from dtbuild.engine.labels import parse_label

        parsed = parse_label(label)
        return self._session.analyze([parsed]).targets[parsed].decl.kind

    def build_artifacts(self, label: str, artifacts: Sequence[Any], *, jobs: int = 0) -> list[InputArtifact]:
        from dtbuild.engine.build import BuildOptions
        from dtbuild.engine.labels import parse_label

        if jobs < 0:
            raise UsageError(f"--jobs must be a positive number, but was {jobs}")
        return self._session.build_artifacts(parse_label(label), [a.path for a in artifacts],
                                             BuildOptions(jobs=jobs, debug=self.debug), self._cancel_event)

    def reader(self, inputs: Mapping[str, Sequence[InputArtifact]] | None = None) -> StoreReader:
        from dtbuild.engine.build import StoreReader

        return StoreReader(self._session.store(), inputs)

    def compressors(self) -> Mapping[str, type[Compressor]]:
        return dict(self._session.registry.get("compressors"))

    def compressor(self, name: str) -> Compressor:
        cls = self._session.registry.get("compressors").get(name)
        if cls is None:
            raise BuildFailure(f"no compressor named '{name}' is registered "
                               f"(registered: {', '.join(sorted(self.compressors()))})",
                               hint="install or unblock the plugin that provides it")
        return cls()

    def report(self, message: str) -> None:
        from dtbuild.plugins.text import printable

        print(printable(message), file=sys.stderr)

    def progress(self, description: str, done_bytes: int, total_bytes: int | None) -> None:
        # One observer call at a time, as in a build: a command may transfer from several threads.
        with self._progress_lock:
            self._session.pm.hook.dtbuild_transfer_progress(label=self.command_name or "dtbuild",
                                                            description=description, done_bytes=done_bytes,
                                                            total_bytes=total_bytes)


def run_command(registered: RegisteredCommand, args: Any, api: EngineCommandAPI) -> int:
    """Run a plugin command, turning its errors into the engine's (exit 2 for a bad
    command line, 1 for a failure)."""
    from dtbuild.plugins.interfaces import ActionFailed, CommandFailed

    api.command_name = registered.name
    try:
        code = registered.command().run(args, api)
    except CommandFailed as e:
        raise (UsageError if e.usage else BuildFailure)(e.message, hint=e.hint) from None
    except ActionFailed as e:  # a helper shared with actions (an image tree reader) found bad data
        raise BuildFailure(str(e)) from None
    if not isinstance(code, int) or isinstance(code, bool):
        raise PluginError(f"the command '{registered.name}' of plugin '{registered.plugin}' returned {code!r}, "
                          "not an exit status", hint="Command.run returns an int (0 on success)")
    return code
