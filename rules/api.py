"""The rule-authoring API.

A rule is an attribute schema plus a pure implementation::

    from dtbuild.rules import attrs
    from dtbuild.rules.api import rule
    from dtbuild.rules.providers import DefaultInfo

    def _hello_impl(ctx):
        out = ctx.declare_file(ctx.name + ".txt")
        ctx.actions.declare("WriteFile", outputs={"out": out},
                            params={"content": ctx.attr.greeting})
        return [DefaultInfo(files=(out,))]

    hello = rule("hello", _hello_impl, attrs={"greeting": attrs.string(doc="What to write.")},
                 doc="Writes a greeting.")

The implementation never touches the file system: it reads attributes and its
dependencies' providers, declares outputs and the actions that write them, and returns
providers. The engine runs the declared actions (through the action kinds that plugins
register) and caches them by the digests of their inputs. The one exception is
:meth:`RuleContext.read_source_file`, a read of a workspace file through the engine,
which records its digest so that the analysis is redone when the file changes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

from dtbuild.rules.artifacts import Artifact
from dtbuild.rules.attrs import Attr
from dtbuild.rules.providers import DefaultInfo, Provider

P = TypeVar("P", bound=Provider)

#: Attributes every rule has.
COMMON_ATTRS = ("name", "visibility", "tags")
#: What each common attribute means (docs/rules.md shows these for every rule).
COMMON_ATTR_DOCS = {
    "name": "The target's name, unique in its package.",
    "visibility": "Which packages may depend on the target: `//visibility:public` (every package), "
                  "`//visibility:private` (its own package only), `//pkg:__pkg__` (that package), "
                  "`//pkg:__subpackages__` (that package and every package below it). Its own package "
                  "always may. Without it: the BUILD file's `package(default_visibility = [...])`, else "
                  "public (Bazel's default is private: dtbuild keeps BUILD files without visibility working). "
                  "A dependency on a target that is not visible is an error naming both targets.",
    "tags": 'Free-form strings. `"manual"` keeps the target out of the patterns `//...` and `//pkg:all` '
            "(naming it still builds it).",
}
#: The functions BUILD files call besides rules (docs/rules.md shows these).
BUILD_FUNCTION_DOCS = {
    "glob": "`glob(include, exclude = [], allow_empty = False)`: the files of the package (sorted, "
            "relative to it; a subpackage's files are its own) that match a pattern of `include` and none of "
            "`exclude`. `*` and `?` match within one directory, `**` any number of directories. A glob that "
            "matches nothing is an error at its line, as in Bazel, unless `allow_empty = True`.",
    "package": "`package(default_visibility = [...])`: the `visibility` of the BUILD file's targets that "
               "set none. Called at most once, before the first target.",
}

_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
_MNEMONIC_RE = re.compile(r"^[A-Z][A-Za-z0-9]*$")


class RuleFailure(Exception):
    """Raised by a rule implementation (through :meth:`RuleContext.fail`) to reject its
    target's attributes or dependencies. The engine adds the BUILD location."""

    def __init__(self, message: str, *, attr: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.attr = attr
        self.hint = hint


@dataclass(frozen=True, slots=True)
class Rule:
    """A rule: what BUILD files call to declare targets."""

    name: str
    impl: Callable[[RuleContext], Sequence[Provider]]
    attrs: Mapping[str, Attr]
    doc: str
    #: Part of every action key of this rule's targets: bump it when the
    #: implementation changes what it declares, so exactly its actions re-run.
    version: str = "1"

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"rule name {self.name!r} must be lower_snake_case")
        for reserved in COMMON_ATTRS:
            if reserved in self.attrs:
                raise ValueError(f"rule {self.name!r} may not redefine the common attribute {reserved!r}")

    @property
    def NAME(self) -> str:
        return self.name


def rule(name: str, impl: Callable[[RuleContext], Sequence[Provider]], *, attrs: Mapping[str, Attr],
         doc: str, version: str = "1") -> Rule:
    """Define a rule. Register it from a plugin's ``dtbuild_register_rules`` hook."""
    return Rule(name, impl, MappingProxyType(dict(attrs)), doc, version)


# --------------------------------------------------------------------------- analysis-time values


@dataclass(frozen=True, slots=True)
class Dependency:
    """A dependency as a rule implementation sees it: its label and its providers."""

    label: str
    kind: str
    providers: Mapping[type, Provider]

    def __getitem__(self, provider: type[P]) -> P:
        try:
            return self.providers[provider]  # type: ignore[return-value]
        except KeyError:
            raise RuleFailure(f"{self.label} ({self.kind}) does not provide {provider.__name__}") from None

    def get(self, provider: type[P]) -> P | None:
        return self.providers.get(provider)  # type: ignore[return-value]

    def __contains__(self, provider: type) -> bool:
        return provider in self.providers

    @property
    def files(self) -> tuple[Artifact, ...]:
        info = self.providers.get(DefaultInfo)
        return info.files if isinstance(info, DefaultInfo) else ()


@dataclass(frozen=True, slots=True)
class ActionDecl:
    """One declared action. ``inputs`` and ``outputs`` map slot names to artifacts; the
    action kind called ``mnemonic`` reads and writes them by slot."""

    mnemonic: str
    owner: str
    inputs: Mapping[str, tuple[Artifact, ...]]
    outputs: Mapping[str, Artifact]
    params: Mapping[str, Any]
    description: str
    executor: str = "auto"
    #: The action may use the network (a download checked by digest, a root script that
    #: asked for it). Commands without it run with no network where the machine allows.
    network: bool = False
    #: False for actions whose result is deliberately not a function of their inputs
    #: (``created = "now"``): they run every time and never enter the cache.
    cacheable: bool = True
    rule_version: str = "1"
    #: Registered objects besides the action kind whose code decides the output bytes,
    #: by registry: ``{"compressors": ("gz",)}``. Their versions go into the cache key.
    uses: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


class Actions:
    """``ctx.actions``: where a rule implementation declares its actions."""

    def __init__(self, owner: str, rule_version: str) -> None:
        self._owner = owner
        self._rule_version = rule_version
        self.declared: list[ActionDecl] = []

    def declare(self, mnemonic: str, *, outputs: Mapping[str, Artifact],
                inputs: Mapping[str, Sequence[Artifact]] | None = None,
                params: Mapping[str, Any] | None = None, description: str | None = None,
                executor: str = "auto", network: bool = False, cacheable: bool = True,
                uses: Mapping[str, Sequence[str]] | None = None) -> ActionDecl:
        """Declare that the action kind ``mnemonic`` turns ``inputs`` into ``outputs``.

        ``params`` must be JSON values: they go, with the inputs' digests, into the
        action's cache key. ``uses`` names the other registered objects the action's
        bytes depend on (``{"compressors": ["zstd"]}``): their versions join the key, so
        a new version of one re-runs exactly the actions that use it.
        """
        if not _MNEMONIC_RE.match(mnemonic):
            raise ValueError(f"action mnemonic {mnemonic!r} must be CamelCase")
        if not outputs:
            raise ValueError(f"action {mnemonic} of {self._owner} declares no outputs")
        for slot, art in outputs.items():
            if art.is_source or art.owner != self._owner:
                raise ValueError(f"output {slot!r} of {mnemonic} must be declared by {self._owner} "
                                 "with ctx.declare_file or ctx.declare_directory")
        decl = ActionDecl(
            mnemonic=mnemonic, owner=self._owner,
            inputs={k: tuple(v) for k, v in (inputs or {}).items()},
            outputs=dict(outputs),
            params=dict(params or {}),
            description=description or f"{mnemonic} {self._owner}",
            executor=executor, network=network, cacheable=cacheable, rule_version=self._rule_version,
            uses={registry: tuple(sorted(set(names))) for registry, names in sorted((uses or {}).items()) if names})
        self.declared.append(decl)
        return decl


class AttrValues:
    """``ctx.attr``: the target's attribute values, by name, after coercion. Label-typed
    attributes hold :class:`Dependency` objects; ``source_list`` attributes hold
    :class:`Dependency` objects and source :class:`Artifact` objects."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no attribute {name!r}") from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __contains__(self, name: str) -> bool:
        return name in self._values


#: What the engine gives a :class:`RuleContext` to read source files with: (path relative
#: to the target's package, most bytes) -> the bytes, or None when there is no such file.
SourceReader = Callable[[str, int], "bytes | None"]

#: The most bytes :meth:`RuleContext.read_source_file` reads unless told otherwise.
MAX_SOURCE_READ = 16 << 20


class RuleContext:
    """What a rule implementation gets: ``ctx.attr``, ``ctx.actions``, ``ctx.label``."""

    def __init__(self, *, label: str, package: str, name: str, kind: str, attr: AttrValues,
                 rule_version: str, registry: Mapping[str, Sequence[str]] | None = None,
                 source_reader: SourceReader | None = None) -> None:
        self.label = label
        self.package = package
        self.name = name
        self.kind = kind
        self.attr = attr
        self.actions = Actions(label, rule_version)
        #: Names of registered plugin items by registry ("compressors", "executors", ...).
        self.registry: Mapping[str, Sequence[str]] = registry or {}
        self._declared: dict[str, Artifact] = {}
        self._source_reader = source_reader

    # Outputs live under dtbuild-out/<package>/, named by the rule.
    def _declare(self, name: str, is_tree: bool) -> Artifact:
        # The path is joined under dtbuild-out/<package>/: an absolute one, a '..' or an
        # empty or '.' component would put it elsewhere or give one file two names.
        if not isinstance(name, str) or not name or name.startswith("/") \
                or any(part in ("", ".", "..") for part in name.split("/")) or "\0" in name:
            raise RuleFailure(f"cannot declare output {name!r}: an output is a relative path below "
                              "dtbuild-out/<package>/ without '.', '..' or empty parts",
                              hint="name outputs like 'out.txt' or 'dir/out.txt'")
        base = f"dtbuild-out/{self.package}" if self.package else "dtbuild-out"
        art = Artifact(f"{base}/{name}", is_tree=is_tree, is_source=False, owner=self.label, root=base)
        if art.path in self._declared:
            raise RuleFailure(f"output {name!r} is declared twice")
        self._declared[art.path] = art
        return art

    def declare_file(self, name: str) -> Artifact:
        """An output file at ``dtbuild-out/<package>/<name>``."""
        return self._declare(name, False)

    def declare_directory(self, name: str) -> Artifact:
        """An output directory (a tree) at ``dtbuild-out/<package>/<name>``."""
        return self._declare(name, True)

    def declare_internal(self, name: str, *, is_tree: bool = False) -> Artifact:
        """An intermediate output, kept in the cache but not meant for users:
        ``dtbuild-out/<package>/_<target>/<name>``."""
        return self._declare(f"_{self.name}/{name}", is_tree)

    def files(self, attr_name: str) -> list[Artifact]:
        """Every file an attribute names: source files as they are, and the
        ``DefaultInfo`` outputs of labels."""
        value = self.attr[attr_name]
        items = value if isinstance(value, list) else [value]
        out: list[Artifact] = []
        for item in items:
            if item is None:
                continue
            if isinstance(item, Artifact):
                out.append(item)
            else:
                out.extend(item.files)
        return out

    def read_source_file(self, path: str, *, max_bytes: int = MAX_SOURCE_READ) -> bytes | None:
        """The bytes of the workspace file ``path`` (relative to the target's package), or
        None when there is no such file: the one read a rule implementation may make,
        for data that decides which actions it declares (a lock file naming what to
        download). The engine records the file's digest with the analysis, so a changed
        file (or one that appears or goes) analyses the target again; the file is not an
        input of any action. An absolute path, a path (or a symlink) leading out of the
        workspace or into ``dtbuild-out/``, a directory, or a file over ``max_bytes`` is
        an error of the target.
        """
        if self._source_reader is None:
            raise RuleFailure(f"cannot read the source file {path!r}: this analysis reads no source files",
                              hint="read files only in a rule implementation run by dtbuild's analysis")
        return self._source_reader(path, max_bytes)

    def fail(self, message: str, *, attr: str | None = None, hint: str | None = None) -> NoReturn:
        """Stop analysis of this target with an error (``attr`` names the culprit)."""
        raise RuleFailure(message, attr=attr, hint=hint)

    @property
    def outputs(self) -> list[Artifact]:
        return list(self._declared.values())


# --------------------------------------------------------------------------- layer kinds

#: The action kind that writes the layers of layer kinds (registered by the images plugin).
LAYER_KIND_ACTION = "LayerKindWrite"


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """What the rule of a layer kind hands its ``LayerKindWrite`` action: ``inputs`` by
    slot (each slot reaches ``entries()`` as an attribute of its name), ``attrs`` (JSON
    values, part of the action's key) and ``packages``, the labels the layer's history
    entry names (``dtbuild //pkg:layer (packages)``)."""

    inputs: Mapping[str, Sequence[Artifact]] = field(default_factory=dict)
    attrs: Mapping[str, Any] = field(default_factory=dict)
    packages: Sequence[str] = ()


def default_layer_plan(ctx: RuleContext, schema: Mapping[str, Attr]) -> LayerPlan:
    """A label or source attribute becomes the input slot of its name holding its files
    (``ctx.files``); every other attribute is passed on as it is."""
    inputs: dict[str, list[Artifact]] = {}
    values: dict[str, Any] = {}
    for name, attr in schema.items():
        if attr.is_dependency:
            inputs[name] = ctx.files(name)
        else:
            values[name] = ctx.attr[name]
    return LayerPlan(inputs=inputs, attrs=values)


def layer_kind_rule(kind: Any) -> Rule:
    """The rule BUILD files call for layer kind ``kind`` (a ``LayerKind`` class): named
    ``kind.NAME``, with its ``ATTRS`` and ``DOC``. A target outputs ``NAME.tar`` (the
    uncompressed layer) and provides ``DefaultInfo`` and ``LayerInfo``; its one action,
    ``LayerKindWrite``, uses the layer kind (its version is in the key)."""
    from dtbuild.rules.providers import LayerInfo

    name: str = kind.NAME
    schema: Mapping[str, Attr] = dict(getattr(kind, "ATTRS", None) or {})
    plan_of = getattr(kind, "plan", None)

    def impl(ctx: RuleContext) -> list[Provider]:
        plan = plan_of(ctx) if plan_of is not None else default_layer_plan(ctx, schema)
        if not isinstance(plan, LayerPlan):
            ctx.fail(f"the layer kind {name!r} planned {type(plan).__name__!r}, not a LayerPlan",
                     hint=f"{name}.plan(ctx) must return dtbuild.rules.api.LayerPlan(...)")
        tar = ctx.declare_file(f"{ctx.name}.tar")
        meta = ctx.declare_internal("layer.json")
        ctx.actions.declare(
            LAYER_KIND_ACTION, inputs=plan.inputs, outputs={"tar": tar, "meta": meta},
            params={"layer_kind": name, "attrs": dict(plan.attrs), "slots": sorted(plan.inputs),
                    "packages": list(plan.packages)},
            description=f"{LAYER_KIND_ACTION} {ctx.label} ({name})", uses={"layer_kinds": [name]})
        return [DefaultInfo(files=(tar,)), LayerInfo(label=ctx.label, tar=tar, meta=meta)]

    doc = getattr(kind, "DOC", "") or f"A layer of the {name} layer kind."
    return rule(name, impl, attrs=schema, doc=doc)


__all__ = ["LAYER_KIND_ACTION", "MAX_SOURCE_READ", "ActionDecl", "Actions", "Artifact", "AttrValues", "Dependency",
           "LayerPlan", "Rule", "RuleContext", "RuleFailure", "SourceReader", "default_layer_plan", "layer_kind_rule",
           "rule"]
