"""Loading: BUILD and ``.bzl`` files evaluated with Starlark (starlark-rust through
starlark-pyo3) into target declarations.

Evaluation is deterministic: no I/O but ``load()`` and ``glob()`` (which list files in
sorted order and never leave their package), no clock, no randomness. Every rule call
is checked against the rule's attribute schema right away, so that errors point at the
BUILD line that wrote them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dtbuild.engine.errors import (
    AttrError,
    BuildFileError,
    DtbuildError,
    Frame,
    LabelError,
    Location,
    UnknownTargetError,
    closest,
    did_you_mean,
)
from dtbuild.engine.labels import Label, TargetPattern, parse_label
from dtbuild.engine.workspace import BUILD_FILE_NAMES, OUT_DIR_NAME, WORKSPACE_FILE, Workspace
from dtbuild.rules.api import COMMON_ATTRS, Rule
from dtbuild.rules.attrs import AttrValueError

if TYPE_CHECKING:
    from dtbuild.engine.package_cache import FileRead, Listing, PackageCache, PackageEntry, Signature

_FRAME_RE = re.compile(r"^\s*\* (?P<file>.+?):(?P<line>\d+), in ", re.M)
_ERROR_AT_RE = re.compile(r"^\s*--> (?P<file>.+?):(?P<line>\d+):(?P<col>\d+)", re.M)
_TRACE_FRAME_RE = re.compile(r"^  \* (?P<file>.+?):(?P<line>\d+), in (?P<function>.*)$", re.M)
_ERROR_LINE_RE = re.compile(r"^error: ", re.M)
_CALL_RE = re.compile(r"\b(?P<name>[A-Za-z_]\w*)\s*\(")
_KEYWORDS = frozenset({"and", "elif", "for", "if", "in", "lambda", "not", "or", "return", "while"})
PRELUDE_FILE = "<dtbuild prelude>"


#: The visibility of a target anyone may depend on, and of one only its package may.
PUBLIC = "//visibility:public"
PRIVATE = "//visibility:private"
#: The tag that keeps a target out of the wildcard patterns ``//...`` and ``:all``.
MANUAL = "manual"


@dataclass(frozen=True, slots=True)
class TargetDecl:
    """A target as its BUILD file declared it, attributes checked and coerced."""

    label: Label
    kind: str
    attrs: Mapping[str, Any]
    location: Location
    #: Who may depend on it (``visibility``, else the package's ``default_visibility``):
    #: ``//visibility:public``, ``//visibility:private``, ``//pkg:__pkg__``, ``//pkg:__subpackages__``.
    visibility: tuple[str, ...] = (PUBLIC,)
    #: ``tags``: free-form words; ``manual`` keeps the target out of ``//...`` and ``:all``.
    tags: tuple[str, ...] = ()

    def visible_to(self, package: str) -> bool:
        """Whether a target of ``package`` may depend on this one: always from its own
        package, else as its visibility says."""
        return package == self.label.package or visibility_allows(self.visibility, package)


def visibility_allows(visibility: Sequence[str], package: str) -> bool:
    """Whether ``visibility`` (normalized labels, see :attr:`TargetDecl.visibility`) lets
    targets of ``package`` in, leaving aside the target's own package."""
    for entry in visibility:
        if entry == PUBLIC:
            return True
        scope, _, name = entry[2:].partition(":")
        if name == "__pkg__" and package == scope:
            return True
        if name == "__subpackages__" and (not scope or package == scope or package.startswith(scope + "/")):
            return True
    return False


@dataclass
class Package:
    name: str
    build_file: str  # workspace-relative
    targets: dict[str, TargetDecl] = field(default_factory=dict)
    #: Every file whose content the evaluation depended on (BUILD, loaded .bzl files).
    files_read: list[str] = field(default_factory=list)
    #: ``package(default_visibility = [...])``: the visibility of targets that set none.
    default_visibility: tuple[str, ...] | None = None
    #: Where ``package()`` was called, if it was.
    package_call: Location | None = None


class _Abort(Exception):
    """Raised inside a rule call to stop Starlark; the real error is kept aside."""


class Loader:
    """Loads packages on demand and remembers them for the rest of the process (and,
    with a :class:`~dtbuild.engine.package_cache.PackageCache`, for later processes:
    a package none of whose inputs changed is not evaluated again)."""

    def __init__(self, workspace: Workspace, rules: Mapping[str, Rule],
                 build_globals: Mapping[str, Any] | None = None,
                 registry_values: Mapping[str, Sequence[str]] | None = None, *,
                 cache: PackageCache | None = None, rule_versions: Mapping[str, str] | None = None) -> None:
        self.workspace = workspace
        self.rules = dict(rules)
        self.build_globals = dict(build_globals or {})
        self.registry_values = registry_values or {}
        self.cache = cache
        #: The version of each rule a stored package was evaluated with (plugin
        #: fingerprints included): a package that called a rule whose version changed is
        #: evaluated again.
        self.rule_versions = dict(rule_versions) if rule_versions is not None else \
            {name: str(rule.version) for name, rule in self.rules.items()}
        #: "evaluated": BUILD and .bzl files evaluated in this process; "cached":
        #: packages taken from the package cache.
        self.stats: dict[str, int] = {"evaluated": 0, "cached": 0}
        self._packages: dict[str, Package] = {}
        self._modules: dict[str, Any] = {}  # .bzl label -> FrozenModule
        self._loading: list[str] = []  # .bzl load stack, for cycle errors
        self._current: Package | None = None
        self._pending: DtbuildError | None = None
        self._pending_load: str | None = None  # the load() whose .bzl failed with _pending
        self._listing: dict[str, list[str]] = {}
        self._cancel = threading.Event()
        self._all_packages: list[str] | None = None
        self._build_files: dict[str, str | None] = {}
        #: Every file read for an evaluation, in order (packages and .bzl modules take slices).
        self._reads: list[FileRead] = []
        self._module_reads: dict[str, list[FileRead]] = {}  # .bzl label -> its reads, transitively
        self._rule_calls: list[str] = []
        self._listing_deps: dict[str, Listing] = {}
        #: Stored packages found unchanged (None: checked, and not usable).
        self._entries: dict[str, PackageEntry | None] = {}
        self._digests: dict[str, str | None] = {}
        # glob() and package() are Starlark wrappers too, so that they know where they
        # were called from (call_stack()). Bazel's glob() refuses to match nothing by default.
        self._prelude = (
            "def glob(include, exclude = [], allow_empty = False):\n"
            "    return _dtbuild_glob(call_stack(), include, exclude, allow_empty)\n"
            "def package(**kwargs):\n"
            "    return _dtbuild_package(call_stack(), kwargs)\n") + "".join(
            f"def {name}(**kwargs):\n    return _dtbuild_rule({name!r}, call_stack(), kwargs)\n"
            for name in sorted(self.rules))

    # The interpreter is set up on first use: a build whose packages all come from the
    # package cache never needs it.
    @functools.cached_property
    def _sl(self) -> Any:
        import starlark

        return starlark

    @functools.cached_property
    def _globals(self) -> Any:
        sl = self._sl
        return sl.Globals.extended_by([
            sl.LibraryExtension.StructType, sl.LibraryExtension.CallStack,
            sl.LibraryExtension.Print, sl.LibraryExtension.Json, sl.LibraryExtension.Map,
            sl.LibraryExtension.Filter, sl.LibraryExtension.Partial])

    @functools.cached_property
    def _dialect(self) -> Any:
        return self._sl.Dialect.extended()

    # ------------------------------------------------------------------ packages

    def build_file_of(self, package: str) -> str | None:
        try:
            return self._build_files[package]
        except KeyError:
            pass
        directory = os.path.join(self.workspace.root, package)
        found = None
        for name in BUILD_FILE_NAMES:
            if os.path.isfile(os.path.join(directory, name)):
                found = f"{package}/{name}" if package else name
                break
        self._build_files[package] = found
        return found

    def package(self, name: str) -> Package:
        pkg = self._packages.get(name)
        if pkg is None:
            pkg = self._cached_package(name) or self._load_package(name)
            self._packages[name] = pkg
        return pkg

    def target_names(self, package: str) -> list[str]:
        """The names of the targets ``package`` declares, in declaration order (from the
        package cache, without unpacking its targets, when it is unchanged)."""
        pkg = self._packages.get(package)
        if pkg is None:
            entry = self._cached_entry(package)
            if entry is not None:
                return list(entry.names)
            pkg = self.package(package)
        return list(pkg.targets)

    def package_digest(self, name: str) -> str | None:
        """What identifies the targets of package ``name`` (the package cache's digest),
        or None when it has none (it does not exist, fails to load, or cannot be stored)."""
        if name not in self._digests and name not in self._packages:
            try:
                self._cached_entry(name) or self.package(name)
            except DtbuildError:
                self._digests[name] = None
        return self._digests.get(name)

    def loaded_package_digests(self) -> dict[str, str | None]:
        """The digest of every package loaded in this process."""
        return {name: self._digests.get(name) for name in self._packages}

    def save_cache(self) -> None:
        """Write the package cache back, if there is one and it changed."""
        if self.cache is not None:
            self.cache.save()

    def _cached_entry(self, name: str) -> PackageEntry | None:
        if self.cache is None:
            return None
        if name in self._entries:
            return self._entries[name]
        entry = None
        build_file = self.build_file_of(name)
        if build_file is not None and self._inside_workspace(name):
            entry = self.cache.entry(name, build_file, self.rule_versions, lambda: self._list_package(name))
        self._entries[name] = entry
        if entry is not None:
            self.stats["cached"] += 1
            self._digests[name] = entry.digest
        return entry

    def _cached_package(self, name: str) -> Package | None:
        entry = self._cached_entry(name)
        if entry is None:
            return None
        import pickle

        try:
            targets = pickle.loads(entry.targets)
        except Exception:  # signed by this user, yet unreadable: evaluate it again
            self._entries[name] = None
            return None
        return Package(name, entry.build_file, targets, files_read=list(dict.fromkeys(f[0] for f in entry.files)))

    def _inside_workspace(self, name: str) -> bool:
        package_dir = os.path.realpath(os.path.join(self.workspace.root, name))
        root_real = self._root_real
        return package_dir == root_real or package_dir.startswith(root_real.rstrip(os.sep) + os.sep)

    @functools.cached_property
    def _root_real(self) -> str:
        return os.path.realpath(self.workspace.root)

    def _remember(self, pkg: Package, reads: Sequence[FileRead], rule_calls: Iterable[str]) -> None:
        """Put a package just evaluated into the package cache."""
        if self.cache is None:
            return
        from dtbuild.engine.package_cache import PackageEntry, dumps

        try:
            targets = dumps(pkg.targets)
        except Exception:  # an attribute value that cannot be stored: evaluated every time
            self._digests[pkg.name] = None
            return
        files = tuple(dict.fromkeys(reads))
        entry = PackageEntry(pkg.build_file, files, self._listing_deps.get(pkg.name),
                             tuple(sorted({(k, self.rule_versions.get(k, "")) for k in rule_calls})),
                             tuple(pkg.targets), targets)
        self.cache.put(pkg.name, entry)
        self._digests[pkg.name] = entry.digest

    def target(self, label: Label, *, referrer: TargetDecl | None = None, attr: str | None = None) -> TargetDecl:
        """The declaration of ``label``; an error with the closest existing target otherwise."""
        if self.build_file_of(label.package) is None:
            close = closest(label.package, self.all_packages())
            where = f"//{label.package}" if label.package else "the root package"
            raise UnknownTargetError(
                f"no package {where}: {label.package + '/' if label.package else ''}BUILD does not exist"
                + self._referrer_text(referrer, attr, label),
                location=referrer.location if referrer else None,
                target=str(referrer.label) if referrer else None, rule=referrer.kind if referrer else None,
                hint=f"did you mean '//{close}'?" if close is not None else None)
        pkg = self.package(label.package)
        decl = pkg.targets.get(label.name)
        if decl is None:
            close = closest(label.name, pkg.targets)
            raise UnknownTargetError(
                f"no target named '{label.name}' in package //{label.package}"
                + self._referrer_text(referrer, attr, label),
                location=referrer.location if referrer else None,
                target=str(referrer.label) if referrer else None, rule=referrer.kind if referrer else None,
                hint=(f"did you mean '{Label(label.package, close)}'?" if close else
                      f"targets in //{label.package}: {', '.join(sorted(pkg.targets)) or 'none'}"))
        return decl

    @staticmethod
    def _referrer_text(referrer: TargetDecl | None, attr: str | None, label: Label) -> str:
        if referrer is None:
            return ""
        return f" (the '{attr}' attribute refers to {label})" if attr else f" (referred to as {label})"

    def all_packages(self, under: str = "") -> list[str]:
        """Every package at or below ``under``, sorted (the package cache's list while
        no directory of the workspace changed)."""
        if self._all_packages is None:
            stored = self.cache.packages() if self.cache is not None else None
            if stored is None:
                stored = self._walk_packages()
            self._all_packages = stored
        if not under:
            return list(self._all_packages)
        return [p for p in self._all_packages if p == under or p.startswith(under + "/")]

    def _walk_packages(self) -> list[str]:
        """Walk the workspace for BUILD files (hidden directories, dtbuild-out and nested
        workspaces left out; symlinks to directories not followed), recording each
        directory's signature, taken before it is listed, in the package cache."""
        from dtbuild.engine.package_cache import trusted_signature

        found: list[str] = []
        dirs: list[tuple[str, Signature | None]] = []
        now = time.time_ns()

        def walk(directory: str, rel: str) -> None:
            try:
                sig = trusted_signature(os.stat(directory), now)
                entries = list(os.scandir(directory))
            except OSError:
                return
            dirs.append((rel, sig))
            files: set[str] = set()
            subdirs: list[str] = []
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                    elif not entry.is_dir():
                        files.add(entry.name)
                except OSError:
                    files.add(entry.name)
            if rel and WORKSPACE_FILE in files:
                return  # a nested workspace is not ours
            if any(n in files for n in BUILD_FILE_NAMES):
                found.append(rel)
            for name in sorted(subdirs):
                if name.startswith(".") or (rel == "" and name == OUT_DIR_NAME):
                    continue
                walk(os.path.join(directory, name), f"{rel}/{name}" if rel else name)

        walk(self.workspace.root, "")
        found.sort()
        if self.cache is not None:
            self.cache.put_packages(dirs, found)
        return found

    def expand(self, pattern: TargetPattern, *, include_manual: bool = False) -> list[Label]:
        """The labels a pattern stands for, sorted. A pattern that matches nothing is an error.

        The wildcards ``//...`` and ``:all`` leave out targets tagged ``manual`` (as
        Bazel's build does; its query keeps them: ``include_manual``); a pattern naming
        one target gives it whatever its tags."""
        if pattern.name is not None:
            decl = self.target(Label(pattern.package, pattern.name))
            return [decl.label]
        if pattern.recursive:
            packages = self.all_packages(pattern.package)
        else:
            if self.build_file_of(pattern.package) is None:
                self.target(Label(pattern.package, "all"))  # raises the no-package error
            packages = [pattern.package]
        if include_manual:
            labels = [Label(pkg, name) for pkg in packages for name in self.target_names(pkg)]
            manual = []
        else:
            decls = [decl for pkg in packages for decl in self.package(pkg).targets.values()]
            labels = [decl.label for decl in decls if MANUAL not in decl.tags]
            manual = sorted(decl.label for decl in decls if MANUAL in decl.tags)
        if not labels:
            if manual:
                shown = ", ".join(str(label) for label in manual[:5]) + (", ..." if len(manual) > 5 else "")
                raise UnknownTargetError(
                    f"no targets match '{pattern}': every target it covers is tagged \"manual\" ({shown})",
                    hint=f"a manual target is built only when named: dtbuild build {manual[0]}")
            raise UnknownTargetError(f"no targets match '{pattern}'")
        return sorted(labels)

    # ------------------------------------------------------------------ evaluation

    def _read(self, rel_path: str) -> str:
        from dtbuild.engine.package_cache import trusted_signature

        with open(os.path.join(self.workspace.root, rel_path), "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_SOURCE_BYTES + 1)
        self._reads.append((rel_path, trusted_signature(st), hashlib.sha256(data).hexdigest()))
        if len(data) > MAX_SOURCE_BYTES:
            raise BuildFileError(f"{rel_path} is larger than {MAX_SOURCE_BYTES >> 20} MiB",
                                 location=Location(rel_path),
                                 hint="split it, or keep large data in a file that a rule reads")
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            raise BuildFileError(f"byte 0x{data[e.start]:02x} is not UTF-8 text",
                                 location=Location(rel_path, line, col),
                                 hint="BUILD and .bzl files are UTF-8; save the file as UTF-8") from None
        check_nesting(rel_path, source)
        return source

    def _new_module(self) -> Any:
        sl = self._sl
        module = sl.Module()
        module.add_callable("_dtbuild_rule", self._rule_call)
        module.add_callable("_dtbuild_glob", self._glob)
        module.add_callable("_dtbuild_package", self._package_call)
        module.add_callable("package_name", self._package_name)
        for key, value in self.build_globals.items():
            module[key] = value
        sl.eval(module, sl.parse(PRELUDE_FILE, self._prelude, self._dialect), self._globals)
        return module

    def _evaluate(self, rel_path: str, source: str, module: Any) -> None:
        sl = self._sl
        self.stats["evaluated"] += 1
        budget = _Budget(rel_path, self._cancel)
        try:
            ast = sl.parse(rel_path, source, self._dialect)
            sl.eval_with(sl.EvalOptions(check_cancelled=budget.exceeded), module, ast, self._globals,
                         sl.FileLoader(self._load_bzl))
        except sl.StarlarkError as e:
            if self._cancel.is_set():
                raise KeyboardInterrupt from None

            def lines_of(path: str) -> list[str] | None:
                return source.split("\n") if path == rel_path else self._lines_read(path)

            error = _starlark_error(str(e), rel_path, lines_of)
            if budget.reason is not None:
                raise BuildFileError(budget.reason, location=error.location, hint=budget.hint,
                                     source_line=error.source_line, stack=error.stack) from None
            pending, self._pending = self._pending, None
            loaded, self._pending_load = self._pending_load, None
            if pending is None:
                raise error from None
            # The error a built-in function or a loaded file kept aside is the one to
            # report; Starlark's own says only that the call failed.
            if pending.location is None:  # e.g. a bad load(): point at the statement
                pending.location = error.location
            elif loaded is not None and isinstance(pending, BuildFileError):
                pending.stack.insert(0, Frame(error.location or Location(rel_path), f'load("{loaded}")'))
            if isinstance(pending, BuildFileError) and pending.source_line is None:
                pending.source_line = _line_at(pending.location, lines_of)
            raise pending from None

    def _lines_read(self, path: str) -> list[str] | None:
        """The lines of ``path`` if this process evaluated it (so an error quotes only
        BUILD and .bzl files), else None."""
        if not any(read[0] == path for read in self._reads):
            return None
        try:
            with open(os.path.join(self.workspace.root, path), "rb") as f:
                data = f.read(MAX_SOURCE_BYTES)
        except OSError:
            return None
        return data.decode("utf-8", errors="replace").split("\n")

    def _load_package(self, name: str) -> Package:
        build_file = self.build_file_of(name)
        if build_file is None:
            raise UnknownTargetError(f"no package //{name}: {name}/BUILD does not exist")
        # A package reached through a symlink to a directory outside the workspace would
        # make host files its sources (glob lists them): refuse it before evaluating.
        package_dir = os.path.realpath(os.path.join(self.workspace.root, name))
        root_real = os.path.realpath(self.workspace.root)
        if package_dir != root_real and not package_dir.startswith(root_real.rstrip(os.sep) + os.sep):
            raise BuildFileError(
                f"package //{name} resolves to {package_dir}, outside the workspace {root_real} "
                "(a symlink on the way leads out of it)", location=Location(build_file),
                hint="packages are directories inside the workspace; copy the directory in instead of linking it")
        pkg = Package(name, build_file, files_read=[build_file])
        outer, self._current = self._current, pkg
        reads_from, calls_from = len(self._reads), len(self._rule_calls)
        try:
            self._on_deep_stack(lambda: self._evaluate(build_file, self._read(build_file), self._new_module()))
        finally:
            self._current = outer
        # Only a package that loaded without error is stored: a broken one is evaluated
        # (and its error reported) every time.
        self._remember(pkg, self._reads[reads_from:], self._rule_calls[calls_from:])
        return pkg

    @contextlib.contextmanager
    def _interrupt_cancels(self) -> Iterator[None]:
        """While a file is evaluated, SIGINT and SIGTERM cancel the evaluation (it stops
        within about 1,000 bytecode instructions) whatever handler the command set."""
        import signal

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def cancel(_signum: int, _frame: Any) -> None:
            self._cancel.set()

        previous = {sig: signal.signal(sig, cancel) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_deep_stack(self, evaluate: Callable[[], None]) -> None:
        """Run ``evaluate`` on a thread with a large stack: starlark-rust parses and
        evaluates recursively, and a deeply nested file would overflow the main thread's
        8 MiB (a crash, not an error). Ctrl-C cancels the evaluation at its next check;
        a panic inside the interpreter becomes a BuildFileError."""
        if getattr(_EVALUATING, "active", False):  # a load() inside an evaluation
            evaluate()
            return
        outcome: list[BaseException] = []

        def run() -> None:
            _EVALUATING.active = True
            try:
                evaluate()
            except BaseException as e:  # handed to the calling thread
                outcome.append(e)

        with _quiet_rust_panics():
            thread = threading.Thread(target=run, name="dtbuild-starlark", daemon=True)
            previous = threading.stack_size(EVALUATION_STACK_BYTES)
            try:
                thread.start()
            except RuntimeError:  # no room for the stack (ulimit -v): the main thread's will do
                threading.stack_size(previous)
                thread = threading.Thread(target=run, name="dtbuild-starlark", daemon=True)
                thread.start()
            finally:
                threading.stack_size(previous)
            with self._interrupt_cancels():
                thread.join()
            if self._cancel.is_set():
                raise KeyboardInterrupt
        if outcome:
            error = outcome[0]
            if type(error).__name__ == "PanicException":
                location = Location(self._current.build_file) if self._current else None
                raise BuildFileError(f"the Starlark interpreter gave up: {error} (a value grew too large?)",
                                     location=location,
                                     hint="look for a loop that doubles a string or a list") from None
            raise error

    def _load_bzl(self, text: str) -> Any:
        pkg = self._current
        try:
            label = parse_label(text, pkg.name if pkg else "")
        except LabelError as e:
            self._pending = BuildFileError(f"bad load() label: {e.message}", hint=e.hint)
            raise _Abort() from None
        key = str(label)
        module = self._modules.get(key)
        if module is not None:
            # Its reads are this package's too (the .bzl files it loaded included).
            reads = self._module_reads.get(key, [])
            self._reads.extend(reads)
            if pkg is not None:
                pkg.files_read.extend(p for p, _, _ in reads if p not in pkg.files_read)
            return module
        path = _label_path(label)
        if not path.endswith(".bzl"):
            self._pending = BuildFileError(f"load() takes .bzl files, but got '{text}'")
            raise _Abort()
        if key in self._loading:
            cycle = " -> ".join([*self._loading[self._loading.index(key):], key])
            self._pending = BuildFileError(f"load() cycle: {cycle}")
            raise _Abort()
        if not os.path.isfile(os.path.join(self.workspace.root, path)):
            self._pending = BuildFileError(f"cannot load '{text}': {path} does not exist")
            raise _Abort()
        self._loading.append(key)
        reads_from = len(self._reads)
        try:
            module = self._new_module()
            self._evaluate(path, self._read(path), module)
            frozen = module.freeze()
        except DtbuildError as e:
            # Raised through the interpreter it would come back as text inside the loading
            # file's error: kept aside, it is reported as it is, once, with this load() added.
            self._pending, self._pending_load = e, text
            raise _Abort() from None
        finally:
            self._loading.pop()
        self._modules[key] = frozen
        self._module_reads[key] = self._reads[reads_from:]
        if pkg is not None:
            pkg.files_read.append(path)
        return frozen

    # ------------------------------------------------------------------ built-in functions

    def _package_name(self) -> str:
        return self._current.name if self._current else ""

    def _rule_call(self, kind: str, stack: str, kwargs: dict[str, Any]) -> None:
        try:
            self._declare(kind, stack, kwargs)
        except DtbuildError as e:
            self._pending = e
            raise _Abort() from None

    def _declare(self, kind: str, stack: str, kwargs: dict[str, Any]) -> None:
        pkg = self._current
        frames = _FRAME_RE.findall(stack)
        location = Location(frames[0][0], int(frames[0][1])) if frames else Location("<unknown>")
        if pkg is None:
            raise BuildFileError(f"{kind}() may only be called while a BUILD file is evaluated",
                                 location=location,
                                 hint="call rules from BUILD files, or from macros that BUILD files call")
        rule = self.rules[kind]
        self._rule_calls.append(kind)
        name = kwargs.get("name")
        if not isinstance(name, str) or not name:
            raise AttrError(f"{kind}() needs a 'name' attribute (a non-empty string)", location=location)
        try:
            label = parse_label(f"//{pkg.name}:{name}")
        except LabelError as e:
            raise AttrError(f"invalid target name {name!r}: {e.message}", location=location,
                            hint=e.hint) from None
        target_text = str(label)
        if name in pkg.targets:
            first = pkg.targets[name].location
            raise BuildFileError(f"duplicate target name '{name}': already defined at {first}",
                                 location=location, target=target_text, rule=kind,
                                 hint="every target in a package needs its own name")

        def resolve(text: str) -> str:
            try:
                return str(parse_label(text, pkg.name))
            except LabelError as e:
                raise ValueError(e.message) from None

        values: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in COMMON_ATTRS:
                continue
            attr = rule.attrs.get(key)
            if attr is None:
                raise AttrError(f"{kind}() has no attribute '{key}'", location=location,
                                target=target_text, rule=kind,
                                hint=did_you_mean(key, [*rule.attrs, *COMMON_ATTRS])
                                or f"valid attributes: {', '.join(sorted(rule.attrs))}")
            try:
                values[key] = attr.coerce(value, resolve, self.registry_values)
            except AttrValueError as e:
                raise AttrError(f"the '{key}' attribute {e}", location=location, target=target_text,
                                rule=kind, hint=e.hint) from None
        for key, attr in rule.attrs.items():
            if key not in values:
                if attr.mandatory:
                    raise AttrError(f"missing mandatory attribute '{key}' ({attr.describe_type()}: {attr.doc})",
                                    location=location, target=target_text, rule=kind)
                values[key] = attr.default_value()
        common: dict[str, Any] = {"visibility": pkg.default_visibility or (PUBLIC,), "tags": ()}
        for key, check in (("visibility", lambda v: _visibility(v, pkg.name)), ("tags", _tags)):
            if key in kwargs:
                try:
                    common[key] = check(kwargs[key])
                except AttrValueError as e:
                    raise AttrError(f"the '{key}' attribute {e}", location=location, target=target_text,
                                    rule=kind, hint=e.hint) from None
        pkg.targets[name] = TargetDecl(label, kind, values, location, common["visibility"], common["tags"])

    def _package_call(self, stack: str, kwargs: dict[str, Any]) -> None:
        try:
            self._declare_package(stack, kwargs)
        except DtbuildError as e:
            self._pending = e
            raise _Abort() from None

    def _declare_package(self, stack: str, kwargs: dict[str, Any]) -> None:
        """``package(default_visibility = [...])``: what the package's targets default to.
        Called once, before the package's first target, as in Bazel."""
        pkg = self._current
        location = _call_location(stack)
        if pkg is None:
            raise BuildFileError("package() may only be called while a BUILD file is evaluated",
                                 location=location, hint="call package() at the top of a BUILD file")
        if pkg.package_call is not None:
            raise BuildFileError(f"package() is called twice in //{pkg.name}: first at {pkg.package_call}",
                                 location=location, hint="give every argument in one package() call")
        if pkg.targets:
            first = next(iter(pkg.targets.values()))
            raise BuildFileError(f"package() must come before the package's targets, but {first.label} is "
                                 f"declared before it, at {first.location}", location=location,
                                 hint="move package() to the top of the BUILD file")
        for key, value in kwargs.items():
            if key != "default_visibility":
                raise BuildFileError(f"package() has no argument '{key}'", location=location,
                                     hint=did_you_mean(key, ["default_visibility"])
                                     or "package() takes default_visibility")
            try:
                pkg.default_visibility = _visibility(value, pkg.name)
            except AttrValueError as e:
                raise BuildFileError(f"package()'s 'default_visibility' {e}", location=location,
                                     hint=e.hint) from None
        pkg.package_call = location

    def _glob(self, stack: str, include: Any, exclude: Any = None, allow_empty: Any = False) -> list[str]:
        """``glob(include, exclude = [], allow_empty = False)``: the package's files that
        match ``include`` and not ``exclude``, sorted. Matching nothing is an error unless
        ``allow_empty = True`` (Bazel's default): a typo in a pattern or a moved directory
        would otherwise make a target silently empty."""
        try:
            return self._glob_files(stack, include, exclude, allow_empty)
        except DtbuildError as e:
            self._pending = e
            raise _Abort() from None

    def _glob_files(self, stack: str, include: Any, exclude: Any, allow_empty: Any) -> list[str]:
        pkg = self._current
        location = _call_location(stack, innermost=True)
        if pkg is None:
            raise BuildFileError("glob() may only be called while a BUILD file is evaluated", location=location,
                                 hint="call glob() in a BUILD file, or in a macro that a BUILD file calls")
        exclude = [] if exclude is None else exclude
        for argument, value in (("include", include), ("exclude", exclude)):
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise BuildFileError(f"glob()'s '{argument}' must be a list of patterns (strings), but was "
                                     f"{value!r}", location=location,
                                     hint=f'write glob([{value!r}])' if isinstance(value, str) else None)
        if not isinstance(allow_empty, bool):
            raise BuildFileError(f"glob()'s 'allow_empty' must be True or False, but was {allow_empty!r}",
                                 location=location)
        for pattern in [*include, *exclude]:
            if pattern.startswith("/") or ".." in pattern.split("/"):
                raise BuildFileError(
                    f"glob pattern {pattern!r} must be relative to the package and may not contain '..'",
                    location=location)
        files = self._package_files(pkg.name)
        inc = [_glob_regex(p) for p in include]
        exc = [_glob_regex(p) for p in exclude]
        matched = [f for f in files if any(r.match(f) for r in inc)]
        result = [f for f in matched if not any(r.match(f) for r in exc)]
        if not result and not allow_empty:
            import json

            arguments = json.dumps(include) + (f", exclude = {json.dumps(exclude)}" if exclude else "")
            where = f"package //{pkg.name}" if pkg.name else "the root package"
            what = (f"matches nothing: exclude leaves out all {len(matched)} files of {where} it includes"
                    if matched else f"matches no file of {where}")
            raise BuildFileError(
                f"glob({arguments}) {what}", location=location,
                hint=f"patterns are relative to the package directory (a subpackage's files are its own); "
                     f"if the glob may match nothing, write glob({arguments}, allow_empty = True)")
        return result

    def _package_files(self, package: str) -> list[str]:
        """Files (and symlinks) of a package, sorted, relative to it; subpackages,
        dtbuild-out and hidden directories left out. A symlink, to a directory too, is
        listed as itself and never descended into, so a glob cannot reach past it (out of
        the workspace among other places): it becomes a symlink in the image."""
        listing = self._listing.get(package)
        if listing is not None:
            return listing
        out, self._listing_deps[package] = self._list_package(package)
        self._listing[package] = out
        return out

    def _list_package(self, package: str) -> tuple[list[str], Listing]:
        """The files of ``package`` (see :meth:`_package_files`), and what the package
        cache checks to know the listing is unchanged: the signature of every directory
        it looked into (taken before listing it) and a digest of the listing."""
        from dtbuild.engine.package_cache import listing_digest, trusted_signature

        root = os.path.join(self.workspace.root, package)
        out: list[str] = []
        dirs: list[tuple[str, Signature | None]] = []
        now = time.time_ns()

        def directory_signature(directory: str, rel: str) -> None:
            try:
                dirs.append((rel, trusted_signature(os.stat(directory), now)))
            except OSError:
                dirs.append((rel, None))

        def walk(directory: str, prefix: str) -> None:
            directory_signature(directory, f"{package}/{prefix}".strip("/") if package else prefix.rstrip("/"))
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError:
                return
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    if entry.name.startswith(".") or (not package and not prefix and entry.name == OUT_DIR_NAME):
                        continue
                    sub = os.path.join(directory, entry.name)
                    if any(os.path.isfile(os.path.join(sub, n)) for n in (*BUILD_FILE_NAMES, WORKSPACE_FILE)):
                        # A subpackage (or a nested workspace) owns its files; its BUILD
                        # file going away changes its directory's signature.
                        directory_signature(sub, f"{package}/{rel}" if package else rel)
                        continue
                    walk(sub, rel + "/")
                elif entry.name not in BUILD_FILE_NAMES:
                    out.append(rel)

        walk(root, "")
        out.sort()
        return out, (tuple(dirs), listing_digest(out))

    def declared_targets(self) -> Iterable[TargetDecl]:
        for pkg in self._packages.values():
            yield from pkg.targets.values()


def _call_location(stack: str, *, innermost: bool = False) -> Location:
    """Where a built-in wrapper of the prelude was called from, by its ``call_stack()``:
    the BUILD file's line (the outermost frame), or the line of the call itself
    (``innermost``, in a macro's .bzl file when a macro made it)."""
    frames = [(file, line) for file, line in _FRAME_RE.findall(stack) if file != PRELUDE_FILE]
    if not frames:
        return Location("<unknown>")
    file, line = frames[-1] if innermost else frames[0]
    return Location(file, int(line))


def _visibility(value: Any, package: str) -> tuple[str, ...]:
    """A ``visibility`` list made canonical (labels absolute, ``:__pkg__`` resolved
    against ``package``).

    :raises AttrValueError: for anything but a list of //visibility:public,
        //visibility:private, //pkg:__pkg__ and //pkg:__subpackages__ labels.
    """
    forms = "//visibility:public, //visibility:private, '//pkg:__pkg__' or '//pkg:__subpackages__'"
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AttrValueError(f"must be a list of labels ({forms}), but was {value!r}",
                             hint='write visibility = ["//visibility:public"]')
    out: list[str] = []
    for text in value:
        try:
            label = parse_label(text, package)
        except LabelError as e:
            raise AttrValueError(f"holds {text!r}, which is not a label: {e.message}", hint=e.hint) from None
        if label.package == "visibility":
            if label.name not in ("public", "private"):
                close = did_you_mean(label.name, ["public", "private"])
                raise AttrValueError(f"holds {text!r}; the //visibility package has only 'public' and 'private'",
                                     hint=close.replace("'", "'//visibility:", 1) if close else None)
        elif label.name not in ("__pkg__", "__subpackages__"):
            raise AttrValueError(
                f"holds {text!r}, which is not a visibility: each entry is {forms}",
                hint=f"to let package //{label.package} depend on it, write '//{label.package}:__pkg__' "
                     "(package_group targets are not supported)")
        canonical = str(label)
        if canonical not in out:
            out.append(canonical)
    return tuple(out) if out else (PRIVATE,)


def _tags(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AttrValueError(f"must be a list of strings, but was {value!r}", hint='write tags = ["manual"]')
    return tuple(dict.fromkeys(value))


def _label_path(label: Label) -> str:
    return f"{label.package}/{label.name}" if label.package else label.name


_GLOB_CACHE: dict[str, re.Pattern[str]] = {}


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``**`` matches any number of directories, ``*`` and ``?`` stay within one."""
    cached = _GLOB_CACHE.get(pattern)
    if cached is not None:
        return cached
    parts = pattern.split("/")
    regex = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
            continue
        piece = ""
        for ch in part:
            if ch == "*":
                piece += "[^/]*"
            elif ch == "?":
                piece += "[^/]"
            else:
                piece += re.escape(ch)
        regex += piece + ("" if last else "/")
    compiled = re.compile(f"^{regex}$")
    _GLOB_CACHE[pattern] = compiled
    return compiled


#: Largest BUILD or .bzl file: with :data:`MAX_STATEMENT_OPERATORS` and
#: :data:`MAX_NESTING` it bounds how deep starlark-rust recurses.
MAX_SOURCE_BYTES = 16 << 20
#: Brackets open at once: real files rarely pass 10.
MAX_NESTING = 200
#: Operators in one statement (a chain of 300,000 still fits the evaluation stack).
MAX_STATEMENT_OPERATORS = 100_000
#: Stack of the evaluating thread (reserved, touched only as deep as evaluation goes).
EVALUATION_STACK_BYTES = 1 << 30
#: starlark-pyo3 asks whether to cancel about every 1,000 bytecode instructions; this
#: many asks (about a billion instructions, tens of seconds) end an evaluation.
MAX_EVALUATION_CHECKS = 1_000_000
#: Peak memory of the process while it loads, checked every 64 asks.
MAX_LOADING_RSS_BYTES = 4 << 30

_EVALUATING = threading.local()
_NESTING_TOKEN_RE = re.compile("|".join([
    r"#[^\n]*",  # comments and strings: their brackets and operators do not count
    r'"""(?:\\.|[^\\])*?"""',
    r"'''(?:\\.|[^\\])*?'''",
    r'"(?:\\.|[^"\\\n])*"',
    r"'(?:\\.|[^'\\\n])*'",
    r"[\[({]", r"[\])}]", r"\n",
    r"[-+*/%<>=!~|&^]+",
    r"\b(?:and|or|not|if|else|lambda|in)\b",
]))


def check_nesting(rel_path: str, source: str) -> None:
    """Refuse files nested deeper than the interpreter can take (it recurses, and a stack
    overflow kills the process): more than :data:`MAX_NESTING` open brackets, or more
    than :data:`MAX_STATEMENT_OPERATORS` operators in one statement."""
    depth = operators = 0
    line = 1
    for match in _NESTING_TOKEN_RE.finditer(source):
        token = match.group()
        first = token[0]
        if first in "([{":
            depth += 1
            if depth > MAX_NESTING:
                col = match.start() - source.rfind("\n", 0, match.start())
                raise BuildFileError(f"brackets nested more than {MAX_NESTING} deep",
                                     location=Location(rel_path, line, col),
                                     source_line=source.split("\n")[line - 1],
                                     hint="flatten the expression, or build it in steps with variables")
        elif first in ")]}":
            depth = max(0, depth - 1)
        elif first == "\n":
            line += 1
            if depth == 0:
                operators = 0
        elif first in "'\"" or first == "#":
            line += token.count("\n")
        else:
            operators += len(token) if first in "-+*/%<>=!~|&^" else 1  # "- - -1" nests too
            if operators > MAX_STATEMENT_OPERATORS:
                raise BuildFileError(f"a statement with more than {MAX_STATEMENT_OPERATORS:,} operators",
                                     location=Location(rel_path, line),
                                     source_line=source.split("\n")[line - 1],
                                     hint="build the value in steps, or with a loop or comprehension")


class _Budget:
    """``check_cancelled`` of one evaluation: stops it on Ctrl-C, after
    :data:`MAX_EVALUATION_CHECKS` checks, or when the process outgrows its memory cap."""

    def __init__(self, rel_path: str, cancel: threading.Event) -> None:
        self.rel_path = rel_path
        self.cancel = cancel
        self.checks = 0
        self.reason: str | None = None
        self.hint: str | None = None

    def exceeded(self) -> bool:
        self.checks += 1
        if self.cancel.is_set():
            return True
        if self.checks > MAX_EVALUATION_CHECKS:
            self.reason = f"evaluating {self.rel_path} took more than about a billion steps"
            self.hint = "look for a loop that never ends or runs far more often than needed"
            return True
        if self.checks % 64 == 0:
            import resource

            if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > MAX_LOADING_RSS_BYTES:
                self.reason = (f"evaluating {self.rel_path} took more than {MAX_LOADING_RSS_BYTES >> 30} GiB "
                               "of memory")
                self.hint = "look for a value that grows without bound"
                return True
        return False


@contextlib.contextmanager
def _quiet_rust_panics() -> Iterator[None]:
    """Keep Rust's panic report (and backtrace, with RUST_BACKTRACE set) off the
    terminal: a panic becomes a BuildFileError. Other output written meanwhile to the
    standard error is passed on afterwards."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    import tempfile

    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read()
            if text and b"panicked at" not in text:
                os.write(2, text)


def _starlark_error(text: str, rel_path: str, lines_of: Callable[[str], list[str] | None]) -> BuildFileError:
    """Starlark's error as one of ours: its message once, at its ``file:line:col``, with the
    source line and the call stack (starlark-rust's text has both, in its own layout)."""
    text = text.rstrip()
    at = _ERROR_LINE_RE.search(text)
    trace, rest = (text[:at.start()], text[at.start():]) if at else ("", text)
    spots = list(_ERROR_AT_RE.finditer(rest))  # the last is Starlark's; a message may hold others
    spot = spots[-1] if spots else None
    message = (rest[:spot.start()] if spot else rest).strip().removeprefix("error:").strip()
    frames = [(m["file"], int(m["line"]), m["function"]) for m in _TRACE_FRAME_RE.finditer(trace)]
    frames = [frame for frame in frames if frame[0] != PRELUDE_FILE] or frames
    if spot and spot["file"] != PRELUDE_FILE:
        location = Location(spot["file"], int(spot["line"]), int(spot["col"]))
    elif frames:
        location = Location(frames[-1][0], frames[-1][1])
    else:
        location = Location(rel_path)
    hint = None
    message = message.replace(f"{PRELUDE_FILE}.", "")  # a rule's wrapper: "call to files", not its file
    if message.startswith("Parse error:"):
        message = "syntax error: " + message.removeprefix("Parse error:").strip()
        shown = spot is not None and re.search(r"^\s*\d+ \|", rest[spot.end():], re.M) is not None
        lines = lines_of(rel_path)
        if lines is not None and location.file == rel_path:
            location, message, hint = _at_end_of_file(location, message, hint, lines, shown)
    stack = []
    if any((file, line) != (location.file, location.line) for file, line, _ in frames):
        for i, (file, line, function) in enumerate(frames):
            if i == len(frames) - 1 and (file, line) == (location.file, location.line):
                col = location.col
            else:
                col = _call_column(_line_at(Location(file, line), lines_of),
                                   frames[i + 1][2] if i + 1 < len(frames) else None)
            stack.append(Frame(Location(file, line, col), f"in {function}"))
        if frames[-1][:2] != (location.file, location.line):  # the error is in the last function called
            function = _enclosing_function(lines_of(location.file), location.line or 1)
            stack.append(Frame(location, f"in {function}" if function else "here"))
    return BuildFileError(message, location=location, hint=hint,
                          source_line=_line_at(location, lines_of), stack=stack)


def _line_at(location: Location | None, lines_of: Callable[[str], list[str] | None]) -> str | None:
    if location is None or location.line is None:
        return None
    lines = lines_of(location.file)
    if lines is None or not 0 < location.line <= len(lines):
        return None
    return lines[location.line - 1]


def _enclosing_function(lines: list[str] | None, line: int) -> str | None:
    """The name of the ``def`` that line ``line`` belongs to, if any."""
    if lines is None or not 0 < line <= len(lines):
        return None
    text = lines[line - 1]
    indent = len(text) - len(text.lstrip())
    for above in reversed(lines[:line - 1]):
        stripped = above.lstrip()
        if not stripped or stripped.startswith("#") or len(above) - len(stripped) >= indent:
            continue
        indent = len(above) - len(stripped)
        match = re.match(r"def\s+(\w+)", stripped)
        if match:
            return match[1]
        if indent == 0:
            return None
    return None


def _call_column(text: str | None, callee: str | None) -> int | None:
    """The column of the call on a traceback's line: of ``callee(`` when the line has it,
    else of its first call, else of its first character."""
    if text is None:
        return None
    calls = [m for m in _CALL_RE.finditer(text) if m["name"] not in _KEYWORDS]
    for m in calls:
        if m["name"] == callee:
            return m.start() + 1
    if calls:
        return calls[0].start() + 1
    return len(text) - len(text.lstrip()) + 1


def _at_end_of_file(location: Location, message: str, hint: str | None, lines: list[str],
                    shown: bool) -> tuple[Location, str, str | None]:
    """A syntax error at the end of the file (starlark-rust reports it at 1:1, or just
    past the last character) moved to where the fix goes: the innermost bracket still
    open, or else the end of the last line."""
    last = max((i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")),
               default=0)
    end = (last + 1, len(lines[last].rstrip()) + 1) if lines else (1, 1)
    at_end = not shown or (location.line or 1, location.col or 1) >= end
    if not at_end:
        return location, message, hint
    unclosed = unclosed_brackets("\n".join(lines))
    if unclosed:
        bracket, line, col = unclosed[-1]
        hint = f"close it with '{_CLOSING[bracket]}'"
        if len(unclosed) > 1:
            outer = ", ".join(f"'{b}' at {location.file}:{ln}:{c}" for b, ln, c in reversed(unclosed[:-1]))
            hint += f"; still open around it: {outer}"
        return (Location(location.file, line, col),
                f"syntax error: unclosed '{bracket}' opened here (the file ends before it is closed)", hint)
    if lines[last].rstrip().endswith(":") and hint is None:
        hint = "a block after ':' needs an indented body (write 'pass' for an empty one)"
    return Location(location.file, *end), message, hint


_CLOSING = {"(": ")", "[": "]", "{": "}"}
_BRACKET_TOKEN_RE = re.compile("|".join([
    r"#[^\n]*",
    r'"""(?:\\[\s\S]|[^\\])*?"""',
    r"'''(?:\\[\s\S]|[^\\])*?'''",
    r'"(?:\\.|[^"\\\n])*"',
    r"'(?:\\.|[^'\\\n])*'",
    r"[\[({\])}\n]",
]))


def unclosed_brackets(source: str) -> list[tuple[str, int, int]]:
    """The brackets of ``source`` still open at its end, outermost first, as
    ``(bracket, line, column)``; brackets in strings and comments do not count."""
    stack: list[tuple[str, int, int]] = []
    line, line_start = 1, 0
    for match in _BRACKET_TOKEN_RE.finditer(source):
        token = match.group()
        if token == "\n":
            line, line_start = line + 1, match.end()
        elif token in _CLOSING:
            stack.append((token, line, match.start() - line_start + 1))
        elif token in ")]}":
            # A stray closer matches the nearest opener of its kind, if any.
            for i in range(len(stack) - 1, -1, -1):
                if _CLOSING[stack[i][0]] == token:
                    del stack[i:]
                    break
        elif "\n" in token:  # a triple-quoted string or a continued line
            line += token.count("\n")
            line_start = match.start() + token.rindex("\n") + 1
    return stack
