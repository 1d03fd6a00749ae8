"""The plugin manager: pluggy for project "dtbuild", and the registry of what plugins
registered (rules, action kinds, compressors, layer kinds, executors). Each layer kind
that brings no rule of its own gets one made from it (:func:`dtbuild.rules.api.layer_kind_rule`),
registered as the layer kind's plugin's.

Every plugin comes from an entry point of the ``dtbuild`` group: first dtbuild's own
(the built-in plugins ``core``, ``images``, ..., always, by name), then
other installed distributions' (when ``autoload``), then the workspace's
``[plugins] modules``. ``-p no:NAME`` blocks a plugin; ``-p no:builtin`` blocks every
built-in one. A plugin module may list plugins it needs in ``DTBUILD_REQUIRES``: when
one of them is blocked or absent, it is not loaded, and the rules of a built-in plugin
not loaded stay callable in BUILD files, failing (only when analysed) with a message
saying which plugin is missing, so that blocking ``images`` still builds a genrule
next to an image target.

A name registered twice is an error naming both registrants, unless the second sets
``REPLACES = True`` and replaces a built-in compressor or executor.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pluggy
from dtbuild.engine.errors import PluginError
from dtbuild.plugins import PROJECT_NAME

REGISTRIES = {
    "rules": "dtbuild_register_rules",
    "action_kinds": "dtbuild_register_action_kinds",
    "compressors": "dtbuild_register_compressors",
    "layer_kinds": "dtbuild_register_layer_kinds",
    "executors": "dtbuild_register_executors",
}
#: The distribution whose entry points are the built-in plugins.
BUILTIN_DISTRIBUTION = "dtbuild"
#: Blocks every built-in plugin at once (the name of the single built-in plugin of old).
ALL_BUILTINS = "builtin"
#: Registries whose built-in items another plugin may replace (with ``REPLACES = True``).
REPLACEABLE = ("compressors", "executors")


@dataclass
class PluginOrigins:
    """Where each plugin came from, kept on the plugin manager for ``dtbuild plugins``."""

    #: "NAME VERSION" of the distribution of each plugin loaded from an entry point.
    dists: dict[str, str] = field(default_factory=dict)
    #: Names of the built-in plugins that are registered.
    builtin: list[str] = field(default_factory=list)
    #: Built-in plugins not registered, with why ("blocked with -p no:images", ...).
    unavailable: dict[str, str] = field(default_factory=dict)
    #: The plugin objects of the built-in plugins not registered (their rules become stubs).
    unavailable_modules: dict[str, object] = field(default_factory=dict)
    #: For each built-in plugin not registered, the ``-p`` flag that is the cause.
    blocked_by: dict[str, str] = field(default_factory=dict)


def make_plugin_manager(*, autoload: bool = True, blocked: Iterable[str] = (),
                        workspace_root: str | None = None, workspace_modules: Sequence[str] = (),
                        extra_plugins: Iterable[tuple[str, object]] = ()) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs and the built-in, installed and workspace
    plugins registered (minus ``blocked`` names)."""
    from dtbuild.plugins import hookspecs

    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    blocked = list(blocked)
    for name in blocked:
        pm.set_blocked(name)
    origins = PluginOrigins()
    pm._dtbuild_origins = origins  # type: ignore[attr-defined]
    pm._dtbuild_dists = {}  # type: ignore[attr-defined]
    builtin_eps, other_eps = _entry_points()
    _load_builtins(pm, builtin_eps, origins, block_all=ALL_BUILTINS in blocked)
    if autoload:
        for ep in other_eps:
            _load_entry_point(pm, ep)
    for spec in workspace_modules:
        _load_workspace_module(pm, spec, workspace_root or os.getcwd())
    for name, plugin in extra_plugins:
        if not pm.is_blocked(name):
            pm.register(plugin, name=name)
    _drop_unmet_requirements(pm, origins)
    return pm


def _entry_points() -> tuple[dict[str, Any], list[Any]]:
    """The ``dtbuild`` entry points: dtbuild's own by name, and every other one."""
    from importlib.metadata import entry_points

    own: dict[str, Any] = {}
    others = []
    for ep in entry_points(group=PROJECT_NAME):
        dist = getattr(ep, "dist", None)
        if dist is not None and dist.name == BUILTIN_DISTRIBUTION and ep.name not in own:
            own[ep.name] = ep
        else:
            others.append(ep)
    return own, others


@functools.cache
def dtbuild_version() -> str:
    """The installed dtbuild's version ("(not installed)" without its metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(BUILTIN_DISTRIBUTION)
    except PackageNotFoundError:
        return "(not installed)"


def _load_builtins(pm: pluggy.PluginManager, eps: Mapping[str, Any], origins: PluginOrigins, *,
                   block_all: bool) -> None:
    """Register the built-in plugins: dtbuild's own entry points, by name. dtbuild is
    only importable installed (pyproject's package-dir maps the checkout), so they are
    missing only from metadata installed before they were added: that is an error that
    says to install again, rather than a dtbuild without its features."""
    if not eps:
        raise PluginError("the installed dtbuild has no built-in plugins (no entry points in the 'dtbuild' group): "
                          "its metadata is older than the source",
                          hint="install it again: `pip install -e .` in the checkout (scripts/setup.sh does it when "
                               "pyproject.toml changed)")
    dist_name = f"{BUILTIN_DISTRIBUTION} {dtbuild_version()}"
    for name, ep in sorted(eps.items()):
        origins.dists[name] = dist_name
        if block_all or pm.is_blocked(name):
            why = f"-p no:{ALL_BUILTINS}" if block_all else f"-p no:{name}"
            origins.unavailable[name] = f"blocked with {why}"
            # Loaded all the same (dtbuild's own, cheap: hooks import lazily) so that its
            # rules can stand in and say why they are unavailable.
            origins.unavailable_modules[name] = ep.load()
            origins.blocked_by[name] = why
            continue
        try:
            plugin = ep.load()
        except Exception as e:
            raise PluginError(f"the built-in plugin '{name}' ({ep.value}) failed to import: {type(e).__name__}: {e}",
                              hint="install dtbuild again (`pip install -e .`); if that does not help, it is a bug"
                              ) from e
        pm.register(plugin, name=name)
        origins.builtin.append(name)


def _load_entry_point(pm: pluggy.PluginManager, ep: Any) -> None:
    if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
        return
    dist = getattr(ep, "dist", None)
    dist_name = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
    try:
        plugin = ep.load()
    except Exception as e:
        raise PluginError(f"plugin '{ep.name}' from {dist_name} failed to import: {type(e).__name__}: {e}",
                          hint=f"fix or uninstall {dist_name}, or block it with -p no:{ep.name}") from e
    pm.register(plugin, name=ep.name)
    pm._dtbuild_dists[ep.name] = dist_name  # type: ignore[attr-defined]
    pm._dtbuild_origins.dists[ep.name] = dist_name  # type: ignore[attr-defined]


def _drop_unmet_requirements(pm: pluggy.PluginManager, origins: PluginOrigins) -> None:
    """Unregister every plugin whose ``DTBUILD_REQUIRES`` names a plugin that is not
    registered, until none is left (a plugin may need one that needs another)."""
    changed = True
    while changed:
        changed = False
        for name, plugin in list(pm.list_name_plugin()):
            requires = getattr(plugin, "DTBUILD_REQUIRES", ())
            missing = [r for r in requires if not pm.has_plugin(r)]
            if not missing or name is None:
                continue
            pm.unregister(plugin)
            changed = True
            needed = ", ".join(f"'{m}'" for m in missing)
            if name in origins.builtin:
                origins.builtin.remove(name)
                flag = next((origins.blocked_by[m] for m in missing if m in origins.blocked_by), None)
                cause = f"{flag} leaves it out" if flag else "it is not installed"
                origins.unavailable[name] = f"not loaded: it needs the plugin {needed}, and {cause}"
                origins.unavailable_modules[name] = plugin
                origins.blocked_by[name] = flag or f"-p no:{name}"
            else:
                raise PluginError(f"plugin '{name}' needs the plugin {needed}, which is blocked or not installed",
                                  hint=f"install or unblock {needed}, or block '{name}' too (-p no:{name})")


def plugin_distributions(pm: pluggy.PluginManager) -> dict[str, str]:
    """"NAME VERSION" of the distribution of each third-party plugin loaded from an entry
    point (built-in plugins' versions are those of their items: see :func:`plugin_origins`)."""
    return dict(getattr(pm, "_dtbuild_dists", {}))


def plugin_origins(pm: pluggy.PluginManager) -> PluginOrigins:
    """Where each plugin came from: distributions, which are built-in, which built-in
    ones are not loaded and why."""
    found = getattr(pm, "_dtbuild_origins", None)
    return found if isinstance(found, PluginOrigins) else PluginOrigins()


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
    #: Built-in items replaced by another plugin's (``REPLACES = True``): by registry and
    #: name, the plugin whose item was replaced.
    replaced: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Rules of built-in plugins that are not loaded, standing in so that BUILD files
    #: calling them still load: by name, why the plugin is not loaded.
    unavailable_rules: dict[str, str] = field(default_factory=dict)

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
    """Call the registration hooks and index what they return by NAME. Collecting the
    rules collects the layer kinds too: their rules are among them."""
    registries = list(registries)
    if "rules" in registries and "layer_kinds" not in registries:
        registries.append("layer_kinds")
    reg = Registry()
    dists: dict[str, str] = plugin_origins(pm).dists
    builtin = set(plugin_origins(pm).builtin)
    for registry in registries:
        hook_name = REGISTRIES[registry]
        items: dict[str, Any] = {}
        owners: dict[str, str] = {}
        versions: dict[str, str] = {}
        replaced: dict[str, str] = {}
        for impl in getattr(pm.hook, hook_name).get_hookimpls():  # registration order: built-ins first
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
                    if not (registry in REPLACEABLE and getattr(item, "REPLACES", False) is True
                            and first in builtin and plugin_name not in builtin):
                        raise PluginError(
                            f"two plugins register {registry[:-1].replace('_', ' ')} '{name}': "
                            f"{_describe(items[name], first, dists, builtin)} and "
                            f"{_describe(item, plugin_name, dists, builtin)}",
                            hint=f"uninstall or block one of them (-p no:{plugin_name})"
                            + (f"; to replace the built-in one, set REPLACES = True on {_qualname(item)}"
                               if registry in REPLACEABLE and first in builtin else ""))
                    replaced[name] = first
                items[name] = item
                owners[name] = plugin_name
                versions.pop(name, None)
                digest = getattr(impl.plugin, "__dtbuild_source_digest__", None)
                if digest:
                    versions[name] = digest[:16]
        reg.items[registry] = items
        reg.owners[registry] = owners
        reg.versions[registry] = versions
        reg.replaced[registry] = replaced
    if "rules" in reg.items:
        _add_layer_kind_rules(reg, dists, builtin)
        _add_unavailable_rules(pm, reg)
    for impl in pm.hook.dtbuild_register_build_globals.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        try:
            # pluggy types every hook result as object; the hookspec says it is a mapping.
            values = cast("Mapping[str, Any]", impl.function() or {})
        except Exception as e:
            raise PluginError(f"plugin '{plugin_name}' failed in dtbuild_register_build_globals: {e}") from e
        for key, value in values.items():
            if key in reg.build_globals:
                raise PluginError(f"two plugins define the BUILD global '{key}' (the second is '{plugin_name}')")
            reg.build_globals[key] = value
    return reg


def _layer_kind_rule(kind: Any, plugin_name: str) -> Any:
    from dtbuild.rules.api import layer_kind_rule

    try:
        return layer_kind_rule(kind)
    except ValueError as e:  # a bad NAME, or ATTRS redefining name/visibility/tags
        raise PluginError(f"plugin '{plugin_name}' registered the layer kind {_qualname(kind)}, whose rule cannot "
                          f"be made: {e}", hint="a layer kind's NAME is lower_snake_case and its ATTRS are those "
                          "of a rule") from None


def _add_layer_kind_rules(reg: Registry, dists: Mapping[str, str], builtin: Iterable[str]) -> None:
    """The rule of each layer kind that has none of its own (no ``ACTION_KIND``), owned
    by the layer kind's plugin and versioned like it."""
    rules = reg.items["rules"]
    for name, kind in reg.items.get("layer_kinds", {}).items():
        if getattr(kind, "ACTION_KIND", None):
            continue
        owner = reg.owners["layer_kinds"][name]
        if name in rules:
            raise PluginError(f"the layer kind '{name}' ({_describe(kind, owner, dists, builtin)}) and the rule "
                              f"'{name}' ({_describe(rules[name], reg.owners['rules'][name], dists, builtin)}) "
                              "have one name: the engine makes the layer kind's rule",
                              hint="rename one of them, or set ACTION_KIND on a layer kind that brings its own rule")
        rules[name] = _layer_kind_rule(kind, owner)
        reg.owners["rules"][name] = owner
        digest = reg.versions.get("layer_kinds", {}).get(name)
        if digest:
            reg.versions["rules"][name] = digest


def _add_unavailable_rules(pm: pluggy.PluginManager, reg: Registry) -> None:
    """Stand-ins for the rules of built-in plugins that are not loaded (unless another
    plugin registers the name): a BUILD file that calls one still loads, and analysing
    such a target fails saying which plugin is missing."""
    from dtbuild.rules.api import RuleFailure, rule

    origins = plugin_origins(pm)
    rules = reg.items["rules"]
    for plugin_name, plugin in origins.unavailable_modules.items():
        register = getattr(plugin, "dtbuild_register_rules", None)
        if register is None and getattr(plugin, "dtbuild_register_layer_kinds", None) is None:
            continue
        why = origins.unavailable[plugin_name]
        register_kinds = getattr(plugin, "dtbuild_register_layer_kinds", None)
        made = [_layer_kind_rule(kind, plugin_name) for kind in (register_kinds() if register_kinds else ())
                if not getattr(kind, "ACTION_KIND", None)]
        for real in [*((register() if register else None) or ()), *made]:
            if real.name in rules:
                continue

            def unavailable(ctx: Any, name: str = real.name, plugin_name: str = plugin_name,
                            why: str = why, flag: str = origins.blocked_by.get(plugin_name, "")) -> list[Any]:
                raise RuleFailure(f"the rule {name} comes from the built-in plugin '{plugin_name}', which is {why}",
                                  hint=f"build without {flag}, or do not ask for this target")

            # Registry-valued attributes (compressor = "gz") are not checked: the
            # registry they come from may be what is blocked.
            attrs = {key: dataclasses.replace(a, values_from=None) for key, a in real.attrs.items()}
            rules[real.name] = rule(real.name, unavailable, attrs=attrs, doc=real.doc, version=real.version)
            reg.owners["rules"][real.name] = plugin_name
            reg.unavailable_rules[real.name] = why


def _qualname(item: Any) -> str:
    cls = item if isinstance(item, type) else type(item)
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(item: Any, plugin_name: str, dists: Mapping[str, str], builtin: Iterable[str] = ()) -> str:
    impl = getattr(item, "impl", None)  # a Rule: name its implementation
    cls = impl if impl is not None else (item if isinstance(item, type) else type(item))
    kind = "built-in plugin" if plugin_name in set(builtin) else "plugin"
    where = dists.get(plugin_name, plugin_name)
    return f"{cls.__module__}.{cls.__qualname__} ({kind} '{plugin_name}', from {where})"
