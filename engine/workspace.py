"""The workspace: its root (the directory holding ``dtbuild.toml``), its settings, and
where outputs and the cache go."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dtbuild.engine.errors import WorkspaceError
from dtbuild.engine.labels import STATE_DIR_NAME

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


@dataclass
class Workspace:
    root: str
    config: dict[str, Any] = field(default_factory=dict)

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

    def remote_cache(self) -> str | None:
        value = self.config.get("remote", {}).get("cache")
        return str(value) if value else None

    def sandbox_commands(self) -> str:
        """The command sandbox: ``$DTBUILD_SANDBOX``, else ``[sandbox] commands``, else
        ``bwrap``. See :data:`SANDBOX_COMMANDS_DOC`."""
        from dtbuild.engine.errors import did_you_mean
        from dtbuild.plugins.interfaces import SANDBOX_ENV

        env = os.environ.get(SANDBOX_ENV, "").strip()
        if env:
            if env not in SANDBOX_COMMANDS:
                raise WorkspaceError(f"{SANDBOX_ENV} must be one of {', '.join(SANDBOX_COMMANDS)}, but was {env!r}",
                                     hint=did_you_mean(env, SANDBOX_COMMANDS))
            return env
        section = self.config.get("sandbox", {})
        if not isinstance(section, dict):
            raise WorkspaceError("[sandbox] must be a table, such as [sandbox] commands = \"bwrap\"",
                                 location=_config_location(self.root))
        unknown = sorted(set(section) - {"commands"})
        if unknown:
            raise WorkspaceError(f"[sandbox] has no setting {unknown[0]!r} (settings: commands)",
                                 location=_config_location(self.root), hint=did_you_mean(unknown[0], ["commands"]))
        value = section.get("commands", "bwrap")
        if value not in SANDBOX_COMMANDS:
            raise WorkspaceError(f"[sandbox] commands must be one of {', '.join(SANDBOX_COMMANDS)}, but was {value!r}",
                                 location=_config_location(self.root),
                                 hint=did_you_mean(value, SANDBOX_COMMANDS) if isinstance(value, str) else None)
        return str(value)

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


def _config_location(root: str):  # -> Location, imported lazily with errors
    from dtbuild.engine.errors import Location

    return Location(os.path.join(root, WORKSPACE_FILE))


def find_workspace(start: str | None = None) -> Workspace:
    """Walk up from ``start`` (default: the working directory) to the first directory
    holding ``dtbuild.toml``, like git does for ``.git``."""
    here = os.path.abspath(start or os.getcwd())
    probe = here
    while True:
        candidate = os.path.join(probe, WORKSPACE_FILE)
        if os.path.isfile(candidate):
            return Workspace(probe, _read_config(candidate))
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
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        from dtbuild.engine.errors import Location

        raise WorkspaceError(f"{WORKSPACE_FILE} is not valid TOML: {e}", location=Location(path)) from None
