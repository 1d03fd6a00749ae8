"""Analysis: from target declarations to providers and a graph of declared actions.

Targets are visited depth first from the requested ones (a cycle is an error that
prints the whole cycle); each rule implementation gets its dependencies' providers and
declares actions. Nothing here writes files, and source files are only checked for
existence, except the files rule implementations read with
:meth:`~dtbuild.rules.api.RuleContext.read_source_file` (a lock file): each is read
through :meth:`Analyzer.read_source_file`, confined to the workspace, and recorded with
its digest (``AnalysisResult.files_read``) so the analysis memo is reused only while
every such file is unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dtbuild.engine.errors import (
    AttrError,
    CycleError,
    DtbuildError,
    LabelError,
    RuleError,
    UnknownTargetError,
    closest,
)
from dtbuild.engine.labels import STATE_DIR_NAME, Label, is_reserved_name, parse_label
from dtbuild.engine.load import Loader, TargetDecl
from dtbuild.engine.package_cache import Signature, signature_of, trusted_signature
from dtbuild.engine.sources import source_problem
from dtbuild.rules.api import ActionDecl, AttrValues, Dependency, Rule, RuleContext, RuleFailure
from dtbuild.rules.artifacts import Artifact
from dtbuild.rules.providers import DefaultInfo, Provider


@dataclass
class AnalyzedTarget:
    decl: TargetDecl
    providers: dict[type, Provider]
    actions: list[ActionDecl]
    #: Direct dependencies (labels), in attribute order.
    deps: list[Label]
    #: The source files its rule read (``read_source_file``): workspace-relative path and
    #: sha256 hex, None for a file that did not exist.
    files_read: tuple[tuple[str, str | None], ...] = ()

    @property
    def label(self) -> Label:
        return self.decl.label

    @property
    def default_outputs(self) -> tuple[Artifact, ...]:
        info = self.providers.get(DefaultInfo)
        return info.files if isinstance(info, DefaultInfo) else ()


@dataclass
class AnalysisResult:
    targets: dict[Label, AnalyzedTarget] = field(default_factory=dict)
    #: Every declared action, dependencies' actions before dependents'.
    actions: list[ActionDecl] = field(default_factory=list)
    #: Artifact path -> the action that writes it.
    producers: dict[str, ActionDecl] = field(default_factory=dict)
    #: Every source file a rule read (``read_source_file``), workspace-relative -> its stat
    #: signature when read (None: too recent to trust, or missing) and sha256 hex (None:
    #: it did not exist). The analysis memo is reused only while each is unchanged.
    files_read: dict[str, tuple[Signature | None, str | None]] = field(default_factory=dict)

    def actions_for(self, labels: Iterable[Label]) -> list[ActionDecl]:
        """The actions needed to produce the default outputs of ``labels``, in order."""
        return self.actions_for_artifacts(a.path for lb in labels for a in self.targets[lb].default_outputs)

    def actions_for_artifacts(self, paths: Iterable[str]) -> list[ActionDecl]:
        """The actions needed to produce the artifacts at ``paths``, in order."""
        needed: set[int] = set()
        stack = [self.producers[p] for p in paths if p in self.producers]
        while stack:
            action = stack.pop()
            if id(action) in needed:
                continue
            needed.add(id(action))
            for arts in action.inputs.values():
                for art in arts:
                    producer = self.producers.get(art.path)
                    if producer is not None:
                        stack.append(producer)
        return [a for a in self.actions if id(a) in needed]


class Analyzer:
    def __init__(self, loader: Loader, registry: Mapping[str, Sequence[str]] | None = None) -> None:
        self.loader = loader
        self.rules: Mapping[str, Rule] = loader.rules
        self.registry = registry or {}
        self.result = AnalysisResult()
        self._dep_cache: dict[Label, list[tuple[str, list[Label | Artifact]]]] = {}
        workspace = loader.workspace
        self._root_real = os.path.realpath(workspace.root)
        #: Source directories already resolved inside the workspace.
        self._source_dirs: set[str] = set()
        #: The state directory relative to the root ("dtbuild-out/.dtbuild").
        self._state_rel = os.path.relpath(workspace.state_dir, workspace.root).replace(os.sep, "/")
        self._out_rel = os.path.relpath(workspace.out_dir, workspace.root).replace(os.sep, "/")
        #: Every directory that holds a declared output -> one output below it, so that an
        #: output nested inside another (a file below a tree, whose symlinks could point
        #: anywhere) is an error rather than a write through the other's contents.
        self._output_parents: dict[str, str] = {}
        #: Source files checked (existence, type, directory inside the workspace) and
        #: directories checked not to be symlinks: what a stored result is checked against.
        self.sources_checked: set[str] = set()
        self.output_dirs_checked: set[str] = set()
        #: Labels asked for (analyze()), as text.
        self.requested: set[str] = set()
        self._adopted = False

    # ------------------------------------------------------------------ a stored result

    def adopt(self, result: AnalysisResult, requested: Iterable[str]) -> None:
        """Take ``result`` (restored from the analysis memo) as this analysis so far."""
        self.result = result
        self.requested.update(requested)
        self._adopted = True

    def sources_usable(self, paths: Sequence[str]) -> bool:
        """Whether every source file of a stored analysis would still pass its checks."""
        # source_problem refuses a directory (it is neither a regular file nor a symlink).
        root = self.loader.workspace.root
        return all(source_problem(root, path, resolved_root=self._root_real, checked_dirs=self._source_dirs) is None
                   for path in paths)

    def output_dirs_usable(self, directories: Sequence[str]) -> bool:
        """Whether no directory a stored analysis's outputs go through is a symlink now."""
        root = self.loader.workspace.root
        return not any(os.path.islink(os.path.join(root, d)) for d in directories)

    def _output_parents_of_adopted(self) -> None:
        """Outputs of an adopted result, indexed as :meth:`_check_output_path` does,
        before a target of this process is checked against them."""
        self._adopted = False
        for path in self.result.producers:
            parts = path.split("/")
            self._output_parents.setdefault(path, path)
            for i in range(2, len(parts)):
                self._output_parents.setdefault("/".join(parts[:i]), path)

    # ------------------------------------------------------------------ dependencies

    def resolve_deps(self, decl: TargetDecl) -> list[tuple[str, list[Label | Artifact]]]:
        """For each dependency attribute: the targets and source files it names."""
        cached = self._dep_cache.get(decl.label)
        if cached is not None:
            return cached
        rule = self.rules[decl.kind]
        out: list[tuple[str, list[Label | Artifact]]] = []
        for name, attr in rule.attrs.items():
            if not attr.is_dependency:
                continue
            value = decl.attrs.get(name)
            if value is None:
                continue
            items = value if isinstance(value, list) else [value]
            resolved: list[Label | Artifact] = []
            for item in items:
                resolved.append(self._resolve_item(decl, name, item, attr.accepts_sources))
            out.append((name, resolved))
        self._dep_cache[decl.label] = out
        return out

    def _resolve_item(self, decl: TargetDecl, attr: str, item: str, allow_source: bool) -> Label | Artifact:
        pkg_name = decl.label.package
        if item.startswith("//"):
            label = _parse_label(item, None)
        else:
            # A package-relative path: the target of that name if there is one, else a source file.
            relative: Label | None
            try:
                relative = _parse_label(item, pkg_name)
            except LabelError:
                relative = None
            if relative is not None and self._has_target(relative):
                return relative
            if not allow_source:
                self.loader.target(Label(pkg_name, item), referrer=decl, attr=attr)  # raises
            return self._source(decl, attr, f"{pkg_name}/{item}" if pkg_name else item, pkg_name)
        if self._has_target(label):
            return label
        if allow_source and self.loader.build_file_of(label.package) is not None:
            path = f"{label.package}/{label.name}" if label.package else label.name
            if os.path.lexists(os.path.join(self.loader.workspace.root, path)):
                return self._source(decl, attr, path, label.package)
        self.loader.target(label, referrer=decl, attr=attr)  # raises with a suggestion
        raise AssertionError("unreachable")

    def _check_visibility(self, decl: TargetDecl) -> None:
        """Every target ``decl`` depends on lets ``decl``'s package in (its ``visibility``);
        source files are visible to every package. Checked when a target is analyzed for a
        build, not by query, which shows the graph as it is (as Bazel's does)."""
        package = decl.label.package
        for attr, items in self.resolve_deps(decl):
            for item in items:
                if not isinstance(item, Label) or item.package == package:
                    continue
                dep = self.loader.target(item)
                if dep.visible_to(package):
                    continue
                where = f"//{package}" if package else "the root package"
                grant = f"//{package}:__pkg__"
                raise AttrError(
                    f"the '{attr}' attribute depends on {item}, which is not visible to {decl.label}: its "
                    f"visibility ({dep.location}) is {', '.join(dep.visibility)}",
                    location=decl.location, target=str(decl.label), rule=decl.kind,
                    hint=f'if {where} may depend on it, add "{grant}" (or "//visibility:public") to the '
                         f"visibility of {item}")

    def has_target(self, label: Label) -> bool:
        """Whether a BUILD file declares ``label`` (a source file is not a declared target)."""
        return self._has_target(label)

    def _has_target(self, label: Label) -> bool:
        if self.loader.build_file_of(label.package) is None:
            return False
        return label.name in self.loader.package(label.package).targets

    def _source(self, decl: TargetDecl, attr: str, path: str, package: str) -> Artifact:
        self.sources_checked.add(path)
        full = os.path.join(self.loader.workspace.root, path)
        if not os.path.lexists(full):
            directory, base = os.path.split(full)
            try:
                siblings = os.listdir(directory)
            except OSError:
                siblings = []
            close = closest(base, siblings)
            raise UnknownTargetError(
                f"the '{attr}' attribute names '{path}', but there is no such source file and no such target",
                location=decl.location, target=str(decl.label), rule=decl.kind,
                hint=f"did you mean '{close}'?" if close else "check the path, or use glob() for sets of files")
        if os.path.isdir(full) and not os.path.islink(full):
            raise AttrError(
                f"the '{attr}' attribute names the directory '{path}'; list files, not directories",
                location=decl.location, target=str(decl.label), rule=decl.kind,
                hint=f"use glob([\"{path[len(package) + 1:] if package else path}/**\"]) for every file below it")
        problem = source_problem(self.loader.workspace.root, path, resolved_root=self._root_real,
                                 checked_dirs=self._source_dirs)
        if problem is not None:
            raise AttrError(
                f"the '{attr}' attribute names the source file '{path}', which cannot be used: {problem}",
                location=decl.location, target=str(decl.label), rule=decl.kind,
                hint="sources are files inside the workspace (a symlink source is kept as a symlink); "
                     "copy the file into the workspace or name the link itself")
        return Artifact(path, is_tree=False, is_source=True, owner=None, root=package)

    # ------------------------------------------------------------------ files rules read

    def read_source_file(self, package: str, path: str, max_bytes: int) -> tuple[str, bytes | None]:
        """The workspace-relative path of ``path`` (relative to ``package``) and the file's
        bytes (None when it does not exist), recorded in ``result.files_read``.

        :raises RuleFailure: for a path that is absolute, leaves the workspace (also
            through a symlink) or enters ``dtbuild-out/``, names something other than a
            regular file, or holds more than ``max_bytes`` bytes.
        """
        shown = repr(path)

        def refuse(why: str, hint: str) -> RuleFailure:
            return RuleFailure(f"cannot read the source file {shown}: {why}", hint=hint)

        inside_hint = "name a file inside the workspace, relative to the BUILD file's directory"
        if not isinstance(path, str) or not path or "\0" in path:
            raise refuse("a source path is a non-empty string without NUL characters", inside_hint)
        if path.startswith("/"):
            raise refuse("it is an absolute path", inside_hint)
        rel = posixpath.normpath(posixpath.join(package, path)) if package else posixpath.normpath(path)
        if rel == ".." or rel.startswith("../"):
            raise refuse("it leads out of the workspace", inside_hint)
        if rel == ".":
            raise refuse("it names the workspace's root directory", inside_hint)
        if rel == self._out_rel or rel.startswith(self._out_rel + "/"):
            raise refuse(f"it lies under {self._out_rel}/, which holds outputs, not sources", inside_hint)
        shown = f"'{rel}'"
        full = os.path.join(self.loader.workspace.root, rel)
        real = os.path.realpath(full)
        if not (real == self._root_real or real.startswith(self._root_real.rstrip(os.sep) + os.sep)):
            raise refuse(f"it resolves to {real}, outside the workspace {self._root_real} (through a symlink)",
                         "copy the file into the workspace instead of linking to it")
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            self.result.files_read[rel] = (None, None)
            return rel, None
        except IsADirectoryError:
            raise refuse("it is a directory", "name a file") from None
        except OSError as e:
            raise refuse(e.strerror or str(e), "check the file's permissions") from None
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise refuse("it is a directory" if stat.S_ISDIR(before.st_mode) else "it is not a regular file",
                             "name a regular file")
            if before.st_size > max_bytes:
                raise refuse(f"it holds {before.st_size} bytes, more than the {max_bytes} this rule reads",
                             "a file read at analysis must be small")
            chunks: list[bytes] = []
            size = 0
            while size <= max_bytes and (chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size))):
                chunks.append(chunk)
                size += len(chunk)
            if size > max_bytes:
                raise refuse(f"it grew past the {max_bytes} bytes this rule reads while it was read",
                             "a file read at analysis must be small")
            after = os.fstat(fd)
        except OSError as e:
            raise refuse(e.strerror or str(e), "check the file") from None
        finally:
            os.close(fd)
        data = b"".join(chunks)
        # A signature that changed during the read, or too recently, is not trusted: the
        # memo then hashes the file again instead of taking its stat as proof.
        signature = trusted_signature(before) if signature_of(before) == signature_of(after) else None
        self.result.files_read[rel] = (signature, hashlib.sha256(data).hexdigest())
        return rel, data

    # ------------------------------------------------------------------ the graph

    def analyze(self, labels: Sequence[Label]) -> AnalysisResult:
        for label in labels:
            self._visit(label)
            self.requested.add(str(label))
        return self.result

    def _visit(self, root: Label) -> AnalyzedTarget:
        """Analyze ``root`` after its dependencies, depth first. Iterative: a chain of
        dependencies may be far deeper than Python's recursion limit."""
        done = self.result.targets.get(root)
        if done is not None:
            return done
        # One frame per target on the current path: label, declaration, its dependency
        # labels still to visit, and the dependencies seen so far (in attribute order).
        stack: list[tuple[Label, TargetDecl, Iterator[Label], list[Label]]] = []
        on_path: dict[Label, int] = {}

        def enter(label: Label) -> None:
            if label in on_path:
                cycle = [frame[0] for frame in stack[on_path[label]:]] + [label]
                first = self.loader.target(cycle[0])
                raise CycleError("dependency cycle: " + " -> ".join(str(lb) for lb in cycle),
                                 location=first.location,
                                 hint="a target may not depend on itself, directly or through others")
            decl = self.loader.target(label)
            self._check_visibility(decl)
            labels = (item for _, items in self.resolve_deps(decl) for item in items if isinstance(item, Label))
            on_path[label] = len(stack)
            stack.append((label, decl, labels, []))

        enter(root)
        while stack:
            label, decl, pending, deps = stack[-1]
            for item in pending:
                if item not in deps:
                    deps.append(item)
                if item not in self.result.targets:
                    enter(item)
                    break
            else:
                stack.pop()
                del on_path[label]
                # Every dependency was analyzed above (or a cycle raised).
                self.result.targets[label] = self._run_impl(decl, deps)
        return self.result.targets[root]

    def _run_impl(self, decl: TargetDecl, deps: list[Label]) -> AnalyzedTarget:
        rule = self.rules[decl.kind]
        values: dict[str, Any] = dict(decl.attrs)
        for name, items in self.resolve_deps(decl):
            attr = rule.attrs[name]
            converted: list[Any] = []
            for item in items:
                if isinstance(item, Artifact):
                    converted.append(item)
                    continue
                dep = self.result.targets[item]
                for provider in attr.providers:
                    if provider not in dep.providers:
                        raise AttrError(
                            f"the '{name}' attribute needs targets that provide {provider.__name__}, "
                            f"but {item} ({dep.decl.kind}) does not",
                            location=decl.location, target=str(decl.label), rule=decl.kind,
                            hint=self._provider_hint(provider))
                converted.append(Dependency(str(item), dep.decl.kind, dep.providers))
            values[name] = converted if isinstance(decl.attrs[name], list) else converted[0]
        read: dict[str, str | None] = {}

        def read_source(path: str, max_bytes: int) -> bytes | None:
            rel, data = self.read_source_file(decl.label.package, path, max_bytes)
            read[rel] = self.result.files_read[rel][1]
            return data

        ctx = RuleContext(label=str(decl.label), package=decl.label.package, name=decl.label.name,
                          kind=decl.kind, attr=AttrValues(values), rule_version=rule.version,
                          registry=self.registry, source_reader=read_source)
        try:
            returned = rule.impl(ctx)
        except RuleFailure as e:
            message = f"the '{e.attr}' attribute {e}" if e.attr else str(e)
            raise RuleError(message, location=decl.location, target=str(decl.label), rule=decl.kind,
                            hint=e.hint) from None
        except DtbuildError:
            raise
        except Exception as e:
            raise RuleError(f"the implementation of rule '{decl.kind}' failed: {type(e).__name__}: {e}",
                            location=decl.location, target=str(decl.label), rule=decl.kind,
                            hint="this is a bug in the rule; run with --debug for the traceback") from e
        providers: dict[type, Provider] = {}
        for p in returned or ():
            if not isinstance(p, Provider):
                raise RuleError(f"rule '{decl.kind}' returned {p!r}, which is not a provider",
                                location=decl.location, target=str(decl.label), rule=decl.kind)
            providers[type(p)] = p
        if DefaultInfo not in providers:
            providers[DefaultInfo] = DefaultInfo(files=tuple(ctx.outputs))
        actions = ctx.actions.declared
        for art in {a.path: a for a in [*ctx.outputs, *(o for act in actions for o in act.outputs.values())]}.values():
            self._check_output_path(decl, art)
        for action in actions:
            for art in action.outputs.values():
                if art.path in self.result.producers:
                    other = self.result.producers[art.path]
                    raise RuleError(f"output {art.path} is written by two actions ({other.description} "
                                    f"and {action.description})",
                                    location=decl.location, target=str(decl.label), rule=decl.kind,
                                    hint="two targets of one package may not declare the same output name")
                self.result.producers[art.path] = action
        for action in actions:
            for slot, arts in action.inputs.items():
                for art in arts:
                    if not art.is_source and art.path not in self.result.producers:
                        raise RuleError(f"action {action.mnemonic} reads {art.path} (input {slot!r}), "
                                        "which no action writes", location=decl.location,
                                        target=str(decl.label), rule=decl.kind)
        for art in ctx.outputs:
            if art.path not in self.result.producers:
                raise RuleError(f"output {art.path} is declared but no action writes it",
                                location=decl.location, target=str(decl.label), rule=decl.kind)
        self.result.actions.extend(actions)
        return AnalyzedTarget(decl, providers, actions, deps, tuple(sorted(read.items())))

    def _check_output_path(self, decl: TargetDecl, art: Artifact) -> None:
        """An output must stay below dtbuild-out/, outside the state directory, and apart
        from every other output (neither inside one nor holding one)."""
        path = art.path
        if self._adopted:
            self._output_parents_of_adopted()

        def error(message: str, hint: str) -> RuleError:
            return RuleError(message, location=decl.location, target=str(decl.label), rule=decl.kind, hint=hint)

        base = f"{self._out_rel}/{decl.label.package}" if decl.label.package else self._out_rel
        shown = path[len(base) + 1:] if path.startswith(base + "/") else path
        parts = path.split("/")
        if os.path.isabs(path) or not path.startswith(self._out_rel + "/") or "\0" in path \
                or any(part in ("", ".", "..") for part in parts):
            raise error(f"the output '{shown}' ({path}) is not a plain path below {self._out_rel}/",
                        "declare outputs as relative paths without '.', '..' or empty parts")
        if path == self._state_rel or path.startswith(self._state_rel + "/") \
                or any(is_reserved_name(part) for part in parts[1:]):
            raise error(f"the output '{shown}' ({path}) has a name starting with '{STATE_DIR_NAME}', which "
                        f"is reserved for dtbuild's state directory {self._state_rel} (the build lock and indexes)",
                        f"rename the output (or the target it is named after) so that no part of its path "
                        f"starts with '{STATE_DIR_NAME}'")
        holder = self._output_parents.get(path)
        if holder is not None and holder != path:
            raise error(f"the output {path} would hold the output {holder}: one output may not be "
                        "a directory of another", "give the outputs names that are not inside one another")
        ancestors = ["/".join(parts[:i]) for i in range(2, len(parts))]
        for directory in ancestors:
            if self._output_parents.get(directory) == directory:
                raise error(f"the output {path} lies inside the output {directory}: one output may not "
                            "be a directory of another", "give the outputs names that are not inside one another")
        # An earlier build may have left a tree (with symlinks in it) where this output's
        # directories go: writing through one would land anywhere on the host.
        for directory in ancestors:
            if directory in self.output_dirs_checked:
                continue
            if os.path.islink(os.path.join(self.loader.workspace.root, directory)):
                raise error(f"the output {path} would be written through {directory}, which is a symlink "
                            "(left there by an earlier build's tree output, or by hand)",
                            f"run `dtbuild clean`, or give the output a name outside {directory}")
            self.output_dirs_checked.add(directory)
        self._output_parents.setdefault(path, path)
        for directory in ancestors:
            self._output_parents.setdefault(directory, path)

    def _provider_hint(self, provider: type) -> str:
        # Rules do not declare what they return, so the examples are the rules whose targets
        # returned it in this analysis: whatever plugin registered them, never a fixed list.
        kinds = sorted({t.decl.kind for t in self.result.targets.values() if provider in t.providers})
        name = provider.__name__
        return (f"use a target whose rule returns {name}, such as a {' or '.join(kinds)} target" if kinds
                else f"use a target whose rule returns {name}")


@functools.lru_cache(maxsize=65536)
def _parse_label(text: str, package: str | None) -> Label:
    """:func:`parse_label`, remembered: labels are immutable, and the same texts come
    back for every target that names them."""
    return parse_label(text, package)
