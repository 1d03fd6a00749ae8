"""The plugin manager: pluggy for project "dtbuild", and the registry of what plugins
registered (rules, action kinds, compressors, layer kinds, executors, output formats).

Built-ins are registered first, as the plugin named ``builtin``; then installed
distributions' ``dtbuild`` entry points; then the workspace's ``[plugins] modules``.
A name registered twice is an error naming both registrants.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy
from dtbuild.engine.errors import PluginError
from dtbuild.plugins import PROJECT_NAME

REGISTRIES = {
    "rules": "dtbuild_register_rules",
    "action_kinds": "dtbuild_register_action_kinds",
    "compressors": "dtbuild_register_compressors",
    "layer_kinds": "dtbuild_register_layer_kinds",
    "executors": "dtbuild_register_executors",
    "output_formats": "dtbuild_register_output_formats",
}


def make_plugin_manager(*, autoload: bool = True, blocked: Iterable[str] = (),
                        workspace_root: str | None = None, workspace_modules: Sequence[str] = (),
                        extra_plugins: Iterable[tuple[str, object]] = ()) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs and the built-in, installed and workspace
    plugins registered (minus ``blocked`` names)."""
    from dtbuild.plugins import hookspecs

    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    import dtbuild.plugins.builtin as builtin

    if not pm.is_blocked("builtin"):
        pm.register(builtin, name="builtin")
    if autoload:
        _load_entry_points(pm)
    for spec in workspace_modules:
        _load_workspace_module(pm, spec, workspace_root or os.getcwd())
    for name, plugin in extra_plugins:
        if not pm.is_blocked(name):
            pm.register(plugin, name=name)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=PROJECT_NAME):
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        dist = getattr(ep, "dist", None)
        dist_name = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
        try:
            plugin = ep.load()
        except Exception as e:
            raise PluginError(f"plugin '{ep.name}' from {dist_name} failed to import: {type(e).__name__}: {e}",
                              hint=f"fix or uninstall {dist_name}, or block it with -p no:{ep.name}") from e
        pm.register(plugin, name=ep.name)
        pm._dtbuild_dists = getattr(pm, "_dtbuild_dists", {})  # type: ignore[attr-defined]
        pm._dtbuild_dists[ep.name] = dist_name  # type: ignore[attr-defined]


def plugin_distributions(pm: pluggy.PluginManager) -> dict[str, str]:
    """"NAME VERSION" of the distribution of each plugin loaded from an entry point."""
    return dict(getattr(pm, "_dtbuild_dists", {}))


def _load_workspace_module(pm: pluggy.PluginManager, spec: str, root: str) -> None:
    if spec.endswith(".py"):
        path = os.path.normpath(os.path.join(root, spec))
        name = "workspace:" + spec
        if pm.is_blocked(name) or pm.is_blocked(spec):
            return
        if not os.path.isfile(path):
            raise PluginError(f"plugin module '{spec}' listed in dtbuild.toml does not exist ({path})",
                              hint="[plugins] modules are paths relative to the workspace root, or module names")
        module_name = "dtbuild_workspace_plugin_" + hashlib.sha256(path.encode()).hexdigest()[:12]
        try:
            import_spec = importlib.util.spec_from_file_location(module_name, path)
            assert import_spec is not None and import_spec.loader is not None
            module = importlib.util.module_from_spec(import_spec)
            sys.modules[module_name] = module
            import_spec.loader.exec_module(module)
        except Exception as e:
            raise PluginError(f"plugin module '{spec}' failed to import: {type(e).__name__}: {e}",
                              hint="fix the module, or remove it from [plugins] modules in dtbuild.toml") from e
        with open(path, "rb") as f:
            module.__dtbuild_source_digest__ = hashlib.sha256(f.read()).hexdigest()  # type: ignore[attr-defined]
    else:
        name = spec
        if pm.is_blocked(name):
            return
        try:
            module = importlib.import_module(spec)
        except Exception as e:
            raise PluginError(f"plugin module '{spec}' failed to import: {type(e).__name__}: {e}") from e
    pm.register(module, name=name)


@dataclass
class Registry:
    """Everything plugins registered, by registry and name, with who registered it."""

    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    owners: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Extra version text for items from workspace modules (their source digest), so
    #: editing a workspace plugin invalidates exactly the actions of its kinds and rules.
    versions: dict[str, dict[str, str]] = field(default_factory=dict)
    build_globals: dict[str, Any] = field(default_factory=dict)

    def fingerprints(self, dists: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
        """The version text of every registered object: its ``VERSION`` (or "1"), then
        ``+`` the source digest of the workspace module that registered it, or the name
        and version of the distribution whose entry point did (``dists``, by plugin)."""
        dists = dists or {}
        found: dict[str, dict[str, str]] = {}
        for registry, items in self.items.items():
            versions = self.versions.get(registry, {})
            owners = self.owners.get(registry, {})
            out = found[registry] = {}
            for name, item in items.items():
                text = str(getattr(item, "VERSION", None) or getattr(item, "version", None) or "1")
                extra = versions.get(name) or dists.get(owners.get(name, ""))
                out[name] = f"{text}+{extra}" if extra else text
        return found

    def names(self) -> dict[str, list[str]]:
        return {reg: sorted(items) for reg, items in self.items.items()}

    def get(self, registry: str) -> Mapping[str, Any]:
        return self.items.get(registry, {})


def collect_registry(pm: pluggy.PluginManager, registries: Iterable[str] = REGISTRIES) -> Registry:
    """Call the registration hooks and index what they return by NAME."""
    reg = Registry()
    dists: dict[str, str] = getattr(pm, "_dtbuild_dists", {})
    for registry in registries:
        hook_name = REGISTRIES[registry]
        items: dict[str, Any] = {}
        owners: dict[str, str] = {}
        versions: dict[str, str] = {}
        for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):  # registration order
            plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
            try:
                returned = impl.function()
            except Exception as e:
                raise PluginError(f"plugin '{plugin_name}' failed in {hook_name}: {type(e).__name__}: {e}") from e
            for item in returned or ():
                name = getattr(item, "NAME", None) or getattr(item, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin '{plugin_name}' registered {item!r} in {hook_name} without a NAME")
                if name in items:
                    first = owners[name]
                    raise PluginError(
                        f"two plugins register {registry[:-1].replace('_', ' ')} '{name}': "
                        f"{_describe(items[name], first, dists)} and {_describe(item, plugin_name, dists)}",
                        hint=f"uninstall or block one of them (-p no:{plugin_name})")
                items[name] = item
                owners[name] = plugin_name
                digest = getattr(impl.plugin, "__dtbuild_source_digest__", None)
                if digest:
                    versions[name] = digest[:16]
        reg.items[registry] = items
        reg.owners[registry] = owners
        reg.versions[registry] = versions
    for impl in reversed(pm.hook.dtbuild_register_build_globals.get_hookimpls()):
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        try:
            values = impl.function() or {}
        except Exception as e:
            raise PluginError(f"plugin '{plugin_name}' failed in dtbuild_register_build_globals: {e}") from e
        for key, value in values.items():
            if key in reg.build_globals:
                raise PluginError(f"two plugins define the BUILD global '{key}' (the second is '{plugin_name}')")
            reg.build_globals[key] = value
    return reg


def _describe(item: Any, plugin_name: str, dists: Mapping[str, str]) -> str:
    impl = getattr(item, "impl", None)  # a Rule: name its implementation
    cls = impl if impl is not None else (item if isinstance(item, type) else type(item))
    where = dists.get(plugin_name, "dtbuild" if plugin_name == "builtin" else plugin_name)
    return f"{cls.__module__}.{cls.__qualname__} (plugin '{plugin_name}', from {where})"
