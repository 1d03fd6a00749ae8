"""The workspace: its root (the directory holding ``dtbuild.toml``), its settings, and
where outputs and the cache go.

This module is the one owner of settings: it finds ``dtbuild.toml`` (walking up from the
working directory), parses it (invalid TOML is an error with file:line), checks every
section and key against :data:`SETTINGS` (unknown ones are errors with a did-you-mean,
values of the wrong type errors at their line), applies the environment overrides
(``DTBUILD_SANDBOX``, ``DTBUILD_RUN_RUNTIME``, ``DTBUILD_NETWORK_*``, ...) once, and
hands the result to plugins as a read-only :class:`~dtbuild.plugins.interfaces.Settings`
(executors in their ``ExecutorContext``, action kinds as ``ctx.settings``).
Values a plugin owns the meaning of (``[network]`` sizes, ``[vm]`` paths) are checked by
that plugin when it uses them. docs/configuration.md documents every key (a test keeps it
and :data:`SETTINGS` in step).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dtbuild.engine.errors import Location, WorkspaceError, did_you_mean
from dtbuild.engine.labels import STATE_DIR_NAME

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import Settings

WORKSPACE_FILE = "dtbuild.toml"
BUILD_FILE_NAMES = ("BUILD", "BUILD.dtbuild")
OUT_DIR_NAME = "dtbuild-out"

#: ``[sandbox] commands``: how command actions (genrule ``cmd``, ``extra_commands``,
#: ``fakeroot_commands``) are confined. ``DTBUILD_SANDBOX`` overrides it for one run.
SANDBOX_COMMANDS_DOC = (
    '"bwrap" (the default): each command runs in a bubblewrap sandbox that sees only its inputs, its '
    "output directory and a read-only view of the host's tools (/usr, /bin, /lib*, /etc without its "
    'secrets); writes anywhere else fail, and there is no network. "none": commands run unconfined, '
    "as host processes that can read and write whatever the user can (for machines without bubblewrap "
    "or user namespaces). DTBUILD_SANDBOX=bwrap|none overrides the setting for one run.")
SANDBOX_COMMANDS = ("bwrap", "none")


#: ``[run] runtime``: what ``dtbuild run`` runs an image with. ``DTBUILD_RUN_RUNTIME`` overrides it.
RUN_RUNTIMES = ("auto", "podman", "runc")

#: The kinds of value a setting may hold, as docs/configuration.md names them, and how
#: the engine checks a value of dtbuild.toml against one (a kind missing here is
#: described, not checked).
_TYPE_CHECKS: Mapping[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "path": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "table of strings": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
}
_TOML_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
                    dict: "a table"}


@dataclass(frozen=True, slots=True)
class SettingSpec:
    """One key of dtbuild.toml: what it means, what it holds, its default and the
    variable that overrides it. docs/configuration.md documents each one (a test keeps
    the two in step)."""

    doc: str
    #: The environment variable that overrides it for one run (it wins over the file).
    env: str | None = None
    #: What the value is: a key of :data:`_TYPE_CHECKS` ("path": a string, relative to the
    #: workspace root), or "size" (bytes: a number, or text such as "4 MiB").
    type: str = "string"
    #: The value that applies when neither the file nor the environment sets one, as
    #: TOML would write it; None when the key is simply unset.
    default: Any = None
    #: The default in words, where it is found at run time rather than fixed.
    default_doc: str | None = None
    #: The values it may take, when they are a fixed set.
    choices: tuple[str, ...] = ()
    #: Whether the engine checks the value's type (and choices) itself. False for values
    #: a plugin owns the meaning of: that plugin checks them, naming where they came from.
    checked: bool = True

    def default_text(self) -> str:
        """The default as docs/configuration.md shows it: a TOML value in backticks, or
        words for a default found at run time, or "unset"."""
        if self.default is not None:
            return f"`{toml_literal(self.default)}`"
        return self.default_doc or "unset"


def toml_literal(value: Any) -> str:
    """``value`` as TOML writes it (strings double-quoted, booleans lower case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {toml_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _network(name: str, doc: str, type: str, default: Any) -> SettingSpec:
    # [network] belongs to the network limits (plugins/builtin/network_limits.py), which check it.
    return SettingSpec(doc, "DTBUILD_NETWORK_" + name.upper(), type, default, checked=False)


def _vm(doc: str, type: str = "path", default: Any = None, default_doc: str | None = None,
        env: str | None = None, choices: tuple[str, ...] = ()) -> SettingSpec:
    # [vm] belongs to the vm executor (plugins/builtin/vm_executor.py), which checks it.
    return SettingSpec(doc, env, type, default, default_doc, choices, checked=False)


#: Every section and key dtbuild.toml may hold. A plugin that reads a setting reads it
#: from the Settings the engine hands it; tests keep this table and the plugins in step.
SETTINGS: Mapping[str, Mapping[str, SettingSpec]] = {
    "cache": {"dir": SettingSpec("the cache directory, relative to the workspace root; $DTBUILD_CACHE_DIR "
                                 "wins over it, the XDG cache directory is the default", "DTBUILD_CACHE_DIR",
                                 "path", default_doc="`$XDG_CACHE_HOME/dtbuild` (`~/.cache/dtbuild`)")},
    # Read by the image plugin when it assembles an image (it checks the value itself).
    "image": {"max_layers": SettingSpec("the most layers an image may have; more is a build error (Docker's "
                                        "overlay2 runs 127, past which dtbuild warns)", type="number",
                                        default=500, checked=False)},
    "plugins": {"modules": SettingSpec("workspace plugins: Python files (relative to the workspace root) or "
                                       "importable module names", type="list of strings", default=())},
    # The remote cache and executor (engine/remote/, docs/remote.md). --remote-cache,
    # --remote-executor and --remote-upload win over the environment, which wins over these.
    "remote": {"cache": SettingSpec("the URL of a remote cache: http://, https://, grpc:// or grpcs://",
                                    "DTBUILD_REMOTE_CACHE"),
               "executor": SettingSpec("the URL of a REAPI execution service: grpc:// or grpcs://",
                                       "DTBUILD_REMOTE_EXECUTOR"),
               # true/false, or their words ("yes", "off"), as the variable and the flag take them.
               "upload": SettingSpec("whether results made here are uploaded to the remote cache (default true)",
                                     "DTBUILD_REMOTE_UPLOAD", "boolean", True, checked=False),
               "instance_name": SettingSpec("the REAPI instance name (gRPC only)", default=""),
               "headers": SettingSpec("extra headers sent with every remote request, a table of name = value",
                                      type="table of strings", default=MappingProxyType({})),
               "platform": SettingSpec("REAPI platform properties of remotely executed commands, a table of "
                                       "name = value (OSFamily, container-image, ...)", type="table of strings",
                                       default=MappingProxyType({})),
               "username": SettingSpec("the user name for basic auth", "DTBUILD_REMOTE_USERNAME"),
               "password": SettingSpec("the password for basic auth; prefer $DTBUILD_REMOTE_PASSWORD or a netrc "
                                       "file to a password in a file that is committed", "DTBUILD_REMOTE_PASSWORD"),
               "token": SettingSpec("a bearer token; prefer $DTBUILD_REMOTE_TOKEN", "DTBUILD_REMOTE_TOKEN"),
               "timeout": SettingSpec("seconds a remote request may take before the remote counts as gone "
                                      "(default 60)", type="number", default=60)},
    "run": {"runtime": SettingSpec("what `dtbuild run` runs an image with: podman where it can run containers, "
                                   'else umoci and runc ("auto"), or always one of them',
                                   "DTBUILD_RUN_RUNTIME", default="auto", choices=RUN_RUNTIMES)},
    "sandbox": {"commands": SettingSpec(SANDBOX_COMMANDS_DOC, "DTBUILD_SANDBOX", default="bwrap",
                                        choices=SANDBOX_COMMANDS)},
    "network": {
        "connect_timeout": _network("connect_timeout", "seconds to open a connection (TCP and TLS)", "number", 15),
        "timeout": _network("timeout", "seconds a server may take to start answering or stay silent", "number", 30),
        "min_rate": _network("min_rate", "bytes per second a transfer must average over every timeout window",
                             "size", 1024),
        "deadline": _network("deadline", "seconds one operation, with all its retries, may take", "number", 3600),
        "max_document": _network("max_document", "bytes a manifest, index, config or token answer may have",
                                 "size", "4 MiB"),
        "max_download": _network("max_download", "bytes a fetch_url download may have", "size", "16 GiB"),
    },
    "vm": {
        "qemu": _vm("the qemu-system-x86_64 to run (default: the one on PATH)",
                    default_doc="`qemu-system-x86_64` on `PATH`"),
        "kernel": _vm("the guest kernel (default: the newest readable /boot/vmlinuz-*)",
                      default_doc="the newest readable `/boot/vmlinuz-*`"),
        "modules": _vm("the guest kernel's modules directory (default: /lib/modules/<version>)",
                       default_doc="`/lib/modules/<kernel version>`"),
        "busybox": _vm("a static busybox for the initramfs (default: /bin/busybox and the like)",
                       default_doc="the first static busybox of `/bin/busybox`, `/usr/bin/busybox`, "
                                   "`/usr/lib/busybox-static/busybox`"),
        "accel": _vm("auto, kvm or tcg", "string", "auto", env="DTBUILD_VM_ACCEL", choices=("auto", "kvm", "tcg")),
        "kvm_probe_timeout": _vm("seconds a KVM boot of the probe may take before KVM counts as unusable",
                                 "number", 10),
    },
}


@dataclass
class Workspace:
    root: str
    config: dict[str, Any] = field(default_factory=dict)
    _settings: Settings | None = field(default=None, init=False, repr=False, compare=False)
    #: Settings given on the command line ("section.key" -> (value, the flag)): they win
    #: over the environment and the file.
    overrides: dict[str, tuple[Any, str]] = field(default_factory=dict)

    def override(self, dotted: str, value: Any, flag: str) -> None:
        """Set ``dotted`` ("remote.cache") from command-line flag ``flag``."""
        self.overrides[dotted] = (value, flag)
        self._settings = None

    @property
    def out_dir(self) -> str:
        return os.path.join(self.root, OUT_DIR_NAME)

    @property
    def state_dir(self) -> str:
        """Per-workspace bookkeeping (memo of source digests, output index, lock)."""
        return os.path.join(self.out_dir, STATE_DIR_NAME)

    def cache_dir(self) -> str:
        env = os.environ.get("DTBUILD_CACHE_DIR")
        if env:
            return os.path.abspath(env)
        configured = self.config.get("cache", {}).get("dir")
        if configured:
            return os.path.normpath(os.path.join(self.root, os.path.expanduser(str(configured))))
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(xdg, "dtbuild")

    def settings(self, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings plugins see: dtbuild.toml's sections with the environment
        overrides of :data:`SETTINGS` applied (a non-empty variable wins over the file),
        read-only. Computed once (for ``os.environ``).

        :raises WorkspaceError: for a setting with a fixed set of values (``[sandbox]
            commands``, ``[run] runtime``) holding another, from the file or its variable.
        """
        if environ is None and self._settings is not None:
            return self._settings
        from dtbuild.plugins.interfaces import Settings

        env = os.environ if environ is None else environ
        sections: dict[str, Mapping[str, Any]] = {}
        origins: dict[str, str] = {}
        for name, keys in SETTINGS.items():
            table = self.config.get(name)
            values = {k: _frozen(v) for k, v in table.items()} if isinstance(table, dict) else {}
            for key, spec in keys.items():
                override = env.get(spec.env, "").strip() if spec.env else ""
                if spec.env and override:
                    values[key] = override
                    origins[f"{name}.{key}"] = spec.env
                if f"{name}.{key}" in self.overrides:
                    values[key], origins[f"{name}.{key}"] = self.overrides[f"{name}.{key}"]
            if values or isinstance(table, dict):
                sections[name] = MappingProxyType(values)
        settings = Settings(MappingProxyType(sections), MappingProxyType(origins))
        self._check_choices(settings)
        if environ is None:
            self._settings = settings
        return settings

    def sandbox_commands(self) -> str:
        """The command sandbox: ``$DTBUILD_SANDBOX``, else ``[sandbox] commands``, else
        ``bwrap``. See :data:`SANDBOX_COMMANDS_DOC`."""
        return str(self.settings().setting("sandbox", "commands", "bwrap"))

    def run_runtime(self) -> str:
        """What ``dtbuild run`` runs images with: ``$DTBUILD_RUN_RUNTIME``, else
        ``[run] runtime``, else ``auto`` (one of :data:`RUN_RUNTIMES`)."""
        return str(self.settings().setting("run", "runtime", SETTINGS["run"]["runtime"].default))

    def _check_choices(self, settings: Settings) -> None:
        """A setting with a fixed set of values (checked by the engine) holds one of them,
        wherever it came from; the error names the variable, flag or file line."""
        for section, keys in SETTINGS.items():
            for key, spec in keys.items():
                if not spec.choices or not spec.checked:
                    continue
                value = settings.setting(section, key, spec.default)
                if value in spec.choices:
                    continue
                hint = did_you_mean(value, spec.choices) if isinstance(value, str) else None
                choices = ", ".join(spec.choices)
                origin = settings.origins.get(f"{section}.{key}")
                if origin is not None:
                    raise WorkspaceError(f"{origin} must be one of {choices}, but was {value!r}", hint=hint)
                raise WorkspaceError(f"[{section}] {key} must be one of {choices}, but was {value!r}",
                                     location=_key_location(self.root, section, key), hint=hint)

    def plugin_modules(self) -> list[str]:
        modules = self.config.get("plugins", {}).get("modules", [])
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise WorkspaceError("[plugins] modules must be a list of strings",
                                 location=_config_location(self.root))
        return modules

    def package_of(self, directory: str) -> str | None:
        """The package path of ``directory`` (relative to the root), whether or not it has
        a BUILD file; None outside the workspace."""
        rel = os.path.relpath(os.path.abspath(directory), self.root)
        if rel == ".":
            return ""
        if rel.startswith(".."):
            return None
        return rel.replace(os.sep, "/")


def _config_location(root: str) -> Location:
    return Location(os.path.join(root, WORKSPACE_FILE))


def _frozen(value: Any) -> Any:
    """A TOML value that plugins cannot change: tables read-only, arrays tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _key_location(root: str, section: str, key: str | None = None) -> Location:
    """file:line of ``[section]`` (or of ``key`` in it) in dtbuild.toml, best effort:
    the file without a line where the text is not found (an inline table). A key written
    as a table of its own (``[section.key]``) or dotted (``key.x = 1``) is found too."""
    path = os.path.join(root, WORKSPACE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return Location(path)
    name = r"\s*(?:\"" + re.escape(section) + r"\"|" + re.escape(section) + r")\s*"
    header = re.compile(r"^\s*\[\[?" + name + r"\]")
    # [section.key], [[section.key]], or [section.other...] for an unknown section.
    dotted = re.compile(r"^\s*\[\[?" + name + r"\." + (r"\s*" + re.escape(key) + r"\s*[].]" if key else ""))
    any_header = re.compile(r"^\s*\[")
    assignment = re.compile(r"^\s*" + re.escape(key if key is not None else section) + r"\s*[=.]")
    inside = False
    for number, line in enumerate(lines, 1):
        if header.match(line):
            if key is None:
                return Location(path, number)
            inside = True
        elif dotted.match(line):
            return Location(path, number)
        elif any_header.match(line):
            inside = False
        elif (inside or key is None) and assignment.match(line):
            return Location(path, number)
    return Location(path)


def validate_config(root: str, config: Mapping[str, Any]) -> None:
    """Check that every section and key of a parsed dtbuild.toml is one of
    :data:`SETTINGS`, that each section is a table, and that each value the engine
    checks (:attr:`SettingSpec.checked`) has its setting's type.

    :raises WorkspaceError: naming the first unknown section or key (with the valid
        names and the closest one) or the first value of the wrong type, and where it is.
    """
    for name in config:
        if name not in SETTINGS:
            raise WorkspaceError(f"{WORKSPACE_FILE} has no section [{name}] (sections: {', '.join(sorted(SETTINGS))})",
                                 location=_key_location(root, name), hint=did_you_mean(name, sorted(SETTINGS)))
        table = config[name]
        keys = sorted(SETTINGS[name])
        if not isinstance(table, dict):
            raise WorkspaceError(f"[{name}] in {WORKSPACE_FILE} must be a table, such as [{name}] {keys[0]} = ...",
                                 location=_key_location(root, name))
        for key, value in table.items():
            spec = SETTINGS[name].get(key)
            if spec is None:
                raise WorkspaceError(f"[{name}] has no setting {key!r} (settings: {', '.join(keys)})",
                                     location=_key_location(root, name, key), hint=did_you_mean(key, keys))
            check = _TYPE_CHECKS.get(spec.type)
            if spec.checked and check is not None and not check(value):
                # The value itself is not shown: it may be a password.
                found = _TOML_TYPE_NAMES.get(type(value), type(value).__name__)
                scalar = isinstance(spec.default, str | int | float) and spec.default != ""
                example = spec.default if scalar else _EXAMPLES[spec.type]
                raise WorkspaceError(f"[{name}] {key} in {WORKSPACE_FILE} must be {_article(spec.type)}, "
                                     f"but is {found}", location=_key_location(root, name, key),
                                     hint=f"write {key} = {toml_literal(example)}")


#: A value of each checked type, for hints.
_EXAMPLES: Mapping[str, Any] = {"string": "...", "path": "relative/to/the/root", "number": 60, "boolean": True,
                                "list of strings": ("a.py",), "table of strings": MappingProxyType({"name": "value"})}


def _article(type_name: str) -> str:
    return ("an " if type_name[0] in "aeiou" else "a ") + type_name


def find_workspace(start: str | None = None) -> Workspace:
    """Walk up from ``start`` (default: the working directory) to the first directory
    holding ``dtbuild.toml``, like git does for ``.git``."""
    here = os.path.abspath(start or os.getcwd())
    probe = here
    while True:
        candidate = os.path.join(probe, WORKSPACE_FILE)
        if os.path.isfile(candidate):
            config = _read_config(candidate)
            validate_config(probe, config)
            return Workspace(probe, config)
        parent = os.path.dirname(probe)
        if parent == probe:
            raise WorkspaceError(
                f"not inside a dtbuild workspace: no {WORKSPACE_FILE} in {here} or any parent directory",
                hint=f"create an (even empty) {WORKSPACE_FILE} at the root of your repository")
        probe = parent


def _read_config(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        return {}
    import tomllib  # ~25 ms: only when there is something to parse

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WorkspaceError(f"{WORKSPACE_FILE} is not UTF-8 text: {e}", location=Location(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib says "... (at line 3, column 7)": the location goes in front, as for BUILD files.
        said = str(e)
        where = re.search(r"\s*\(at line (\d+), column (\d+)\)$", said)
        if where is None:
            where = re.search(r"\s*\(at end of document\)$", said)
            line = col = None
            if where is not None:
                line = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
        else:
            line, col = int(where.group(1)), int(where.group(2))
        message = said[:where.start()] if where is not None else said
        raise WorkspaceError(f"{WORKSPACE_FILE} is not valid TOML: {message}", location=Location(path, line, col),
                             hint="see https://toml.io for the syntax") from None
