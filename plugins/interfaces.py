"""Interfaces that plugins implement: action kinds, executors, compressors and layer
kinds.

Every implementation is a class with a ``NAME`` (unique within its kind) and, where its
output bytes can change between releases, a ``VERSION`` that goes into the keys of the
actions that use it, so that changing an implementation invalidates exactly its cache
entries. These interfaces never import the engine: the engine hands an implementation
the narrow :class:`ActionContext` protocol below.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any, ClassVar, Literal, Protocol

# --------------------------------------------------------------------------- settings

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True, eq=False)
class Settings(Mapping[str, Mapping[str, Any]]):
    """The workspace's settings: the sections of ``dtbuild.toml`` as the engine parsed and
    validated them (section -> key -> TOML value), with the environment overrides the
    settings document (``DTBUILD_SANDBOX``, ``DTBUILD_NETWORK_*``, ``DTBUILD_VM_ACCEL``)
    already applied. Read-only; the engine builds it once per command, so a plugin never
    looks for ``dtbuild.toml`` or reads those variables itself.

    ``settings["network"]`` raises KeyError for an absent section; :meth:`section` gives an
    empty mapping instead, :meth:`setting` one value with a default.
    """

    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _EMPTY)
    #: Where each value came from, by ``"section.key"``: ``"[network] timeout in
    #: dtbuild.toml"`` or the environment variable's name. For error messages.
    origins: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    def __getitem__(self, section: str) -> Mapping[str, Any]:
        return self.sections[section]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sections)

    def __len__(self) -> int:
        return len(self.sections)

    def section(self, name: str) -> Mapping[str, Any]:
        """The keys of section ``name`` (empty when dtbuild.toml has none)."""
        return self.sections.get(name, _EMPTY)

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        """``[section] key``, or ``default`` when it is not set."""
        return self.section(section).get(key, default)

    def origin(self, section: str, key: str) -> str:
        """Where ``[section] key`` came from, for a message that names it."""
        return self.origins.get(f"{section}.{key}", f"[{section}] {key} in dtbuild.toml")


# --------------------------------------------------------------------------- artifacts

EntryKind = Literal["file", "dir", "symlink"]


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One entry of a directory tree held in the content-addressed store.

    ``path`` is relative to the tree root, '/'-separated, never empty (the root itself
    is not an entry). Trees are walked in sorted order, parents before children.
    """

    path: str
    kind: EntryKind
    mode: int = 0o644
    digest: str = ""  # sha256 hex, files only
    size: int = 0  # files only
    target: str = ""  # symlinks only


@dataclass(frozen=True, slots=True)
class InputArtifact:
    """An input of an action as the action sees it: where it sits in the action's
    logical file system (a workspace-relative path such as ``pkg/a.txt`` or
    ``dtbuild-out/pkg/name``) and what it holds."""

    path: str
    digest: str  # sha256 hex of the file, or of the root Directory node of a tree
    is_tree: bool
    size: int = 0
    executable: bool = False
    #: For a source that is a symbolic link: its target (``digest`` then names the link).
    symlink: str | None = None


class ActionContext(Protocol):
    """What an :class:`ActionKind` may use while it runs. Provided by the engine."""

    #: The action's parameters exactly as the rule declared them (JSON values).
    params: Mapping[str, Any]
    #: A private, empty scratch directory, removed after the action.
    scratch_dir: str
    #: The workspace's settings (dtbuild.toml with its environment overrides applied),
    #: read-only: ``ctx.settings.setting("network", "timeout", 30)``. Settings change
    #: how an action runs, never what it produces, so they are not part of its key.
    settings: Settings

    def inputs(self, name: str) -> Sequence[InputArtifact]:
        """The artifacts bound to input slot ``name`` (empty when the slot is absent)."""

    def open_input(self, artifact: InputArtifact) -> IO[bytes]:
        """Open a file input for reading (straight from the store: nothing is copied)."""

    def walk_tree(self, artifact: InputArtifact) -> Iterator[TreeEntry]:
        """Walk a tree input in sorted order, parents first."""

    def open_blob(self, digest: str) -> IO[bytes]:
        """Open any blob of the store by digest (for :class:`TreeEntry` files)."""

    def materialize(self, artifact: InputArtifact, dest: str) -> str:
        """Write a copy of ``artifact`` at ``dest`` (a file or a directory) and return it."""

    def output_path(self, name: str) -> str:
        """Where to write declared output ``name`` (a file or a directory). The parent
        directory exists; the path does not."""

    def output_writer(self, name: str) -> IO[bytes]:
        """A stream that writes file output ``name`` straight into the store, hashing as
        it goes (nothing is read back). Close it when done. Use instead of
        :meth:`output_path` for large outputs."""

    def output_tree(self, name: str, entries: Sequence[TreeEntry]) -> None:
        """Declare tree output ``name`` as these entries, without writing files: each file
        entry names a blob the store can read by digest (an input's digest, a source
        registered with :meth:`store_file`, or a blob the action wrote). Parents may be
        implied."""

    def put_blob(self, data: bytes) -> str:
        """Store small bytes (a JSON document) and return their sha256 hex digest, for
        use in :meth:`output_tree`."""

    def put_file(self, path: str) -> tuple[str, int]:
        """Copy a file the action wrote (in its scratch directory) into the store and
        return (sha256 hex digest, size), for use in :meth:`output_tree`."""

    def put_stream(self, source: IO[bytes], size: int | None = None) -> tuple[str, int]:
        """Store the bytes read from ``source`` (to its end) straight into the store,
        hashing as they go, and return (sha256 hex digest, size): a tar member's content,
        for use in :meth:`output_tree`, with no copy on disk. ``size``, when known, is
        what an error for a full disk says the blob needed."""

    def store_file(self, artifact: InputArtifact) -> None:
        """Make a file input's bytes readable from the store under ``artifact.digest``
        (sources are read in place, checked while read, never copied into the cache)."""

    def run_command(self, request: CommandRequest) -> CommandResult:
        """Run a command through the executor chosen for this action."""

    def compressor(self, name: str) -> Compressor:
        """The registered compressor called ``name``."""

    def compressors(self) -> Mapping[str, type[Compressor]]:
        """Every registered compressor class by NAME, to tell a stream's compression by
        its first bytes (``MAGIC``) or a layer's by its media type. Get the instance that
        reads or writes with :meth:`compressor`, which records the use."""

    def layer_kind(self, name: str) -> LayerKind:
        """The registered layer kind called ``name`` (an instance), for the action that
        writes its layers."""

    def log(self, message: str) -> None:
        """A progress line shown to the user under this action."""

    def progress(self, description: str, done_bytes: int, total_bytes: int | None) -> None:
        """Bytes moved so far by one transfer of this action (``description`` names it:
        ``pull sha256:0a1b2c3d4e5f``); ``total_bytes`` None while the size is unknown.
        Reported as :func:`~dtbuild.plugins.hookspecs.dtbuild_transfer_progress` under
        the action's target. Call it through a
        :class:`~dtbuild.plugins.progress.ProgressMeter`, which throttles and ends the
        transfer: ``with ProgressMeter(ctx.progress, what, size) as meter: meter.add(n)``."""


class ActionKind(abc.ABC):
    """An implementation of actions of one mnemonic (``Genrule``, ``LayerWrite``, ...).

    ``run`` reads inputs and parameters through the context and writes every declared
    output at ``ctx.output_path(name)``. It must be deterministic: the same inputs and
    parameters give the same bytes. Raise :class:`ActionFailed` with a message the user
    can act on.
    """

    NAME: ClassVar[str]
    VERSION: ClassVar[str] = "1"
    #: Whether the kind's work is commands it runs through ``ctx.run_command`` with
    #: every input under the request's ``cwd`` and its ``outputs`` declared. With a
    #: remote executor configured, the commands of such kinds run there; all other
    #: kinds run here (and still use the remote cache).
    COMMAND: ClassVar[bool] = False

    @abc.abstractmethod
    def run(self, ctx: ActionContext) -> None: ...


class ActionFailed(Exception):
    """Raised by an action kind: the action failed for a reason the user can fix."""

    def __init__(self, message: str, *, output_tail: str = "", exit_code: int | None = None,
                 command: str | None = None) -> None:
        super().__init__(message)
        self.output_tail = output_tail
        self.exit_code = exit_code
        self.command = command


# --------------------------------------------------------------------------- executors


#: The environment variable that overrides ``[sandbox] commands`` of dtbuild.toml for one
#: run (``bwrap`` or ``none``). The engine applies it to :class:`Settings`; executors read
#: the setting, never the variable.
SANDBOX_ENV = "DTBUILD_SANDBOX"


def _discard(message: str) -> None:
    pass


@dataclass(frozen=True, slots=True)
class ExecutorContext:
    """What the engine gives an :class:`Executor` when it makes one (once per build)."""

    #: The workspace root (the directory holding dtbuild.toml).
    workspace_root: str
    #: The cache directory (``$DTBUILD_CACHE_DIR``, ``[cache] dir`` or the XDG one); an
    #: executor keeps its own files in a subdirectory named after it.
    cache_dir: str
    settings: Settings = field(default_factory=Settings)
    #: A line for the user, not tied to one action (``KVM is not usable ...``).
    log: Callable[[str], None] = field(default=_discard, compare=False)

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        """``[section] key`` of the workspace's settings, or ``default``."""
        return self.settings.setting(section, key, default)


@dataclass(frozen=True, slots=True)
class CommandRequest:
    argv: Sequence[str]
    #: The working directory; a sandboxing executor makes it writable.
    cwd: str
    env: Mapping[str, str] = field(default_factory=dict)
    #: Allow network access. Off by default: actions must be hermetic.
    network: bool = False
    timeout: float | None = None
    #: Absolute paths besides ``cwd`` the command may write (its home, its temporary
    #: directory). A sandboxing executor hides every path not declared here or in
    #: ``readonly``, but for the host's tools.
    writable: Sequence[str] = ()
    #: Absolute paths the command may read but not write.
    readonly: Sequence[str] = ()
    #: What the command produces, relative to ``cwd`` (files or directories). A local
    #: executor may ignore it; a remote one (REAPI) fetches exactly these back into
    #: ``cwd`` and needs them declared.
    outputs: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class CommandResult:
    exit_code: int
    #: The last lines of stdout and stderr, interleaved as written.
    output: str


class Executor(abc.ABC):
    """Runs commands for actions: a local sandbox, a namespace, a VM, a remote cluster.

    The engine makes one instance per build with ``cls(context)``, an
    :class:`ExecutorContext`; the base ``__init__`` keeps it as ``self.context``. A
    subclass whose ``__init__`` takes no argument still works: the engine then calls
    ``cls()`` and sets ``context`` on the instance. ``context`` is None only for an
    executor made outside a build (a test): it then has no workspace and default settings.
    """

    NAME: ClassVar[str]

    def __init__(self, context: ExecutorContext | None = None) -> None:
        self.context = context

    @property
    def settings(self) -> Settings:
        """The workspace's settings (empty outside a build)."""
        return self.context.settings if self.context is not None else Settings()

    def unavailable_reason(self) -> str | None:
        """``None`` when this executor works on this machine (with these settings), else
        what is missing and how to get it. Called on the instance, so it may read
        ``self.context``; one that needs no settings may be a classmethod."""
        return None

    @abc.abstractmethod
    def run(self, request: CommandRequest, cancel: CancelToken) -> CommandResult: ...


class CancelToken(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


# --------------------------------------------------------------------------- commands


class CommandFailed(Exception):
    """Raised by a :class:`Command`: what is wrong and how to fix it, shown as
    ``ERROR: message`` and ``hint: ...``. ``usage`` marks a bad command line (exit 2);
    otherwise the command failed (exit 1)."""

    def __init__(self, message: str, *, hint: str | None = None, usage: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.usage = usage


class StoreTreeReader(Protocol):
    """Read access to store-held trees and blobs, for code that runs outside an action:
    the ``inputs``/``walk_tree``/``open_blob`` part of an :class:`ActionContext`, so that
    helpers written for actions (an image tree reader) work on a command's artifacts."""

    def inputs(self, name: str) -> list[InputArtifact]: ...

    def walk_tree(self, artifact: InputArtifact) -> Iterator[TreeEntry]: ...

    def open_blob(self, digest: str) -> IO[bytes]: ...


class CommandAPI(Protocol):
    """What the engine gives a plugin's :class:`Command` (``dtbuild.engine.api`` is the
    implementation). Every method that builds honours Ctrl-C (``cancel``) and the global
    flags of the command line."""

    #: The workspace root (absolute).
    workspace_root: str
    #: ``dtbuild-out/.dtbuild``: where a command may keep small state files of its own.
    state_dir: str
    #: Set when the user pressed Ctrl-C (or the process got SIGTERM); a second one stops at once.
    cancel: CancelToken
    #: Whether ``--debug`` was given.
    debug: bool

    def settings(self) -> Settings:
        """The workspace's ``dtbuild.toml`` settings, with environment overrides applied."""
        ...

    def resolve_target(self, pattern: str, *, what: str = "target") -> str:
        """The label of the one target ``pattern`` names (relative to the working
        directory's package); a pattern naming no target or several is a usage error
        (``what`` says what was expected, such as "image target")."""
        ...

    def providers(self, label: str) -> Mapping[type, Any]:
        """The providers the target's rule returned (analysing it, building nothing)."""
        ...

    def kind(self, label: str) -> str:
        """The rule of the target ``label`` (``image``, ``genrule``, ...)."""
        ...

    def build_artifacts(self, label: str, artifacts: Sequence[Any], *, jobs: int = 0) -> list[InputArtifact]:
        """Build just what ``artifacts`` (fields of ``label``'s providers, such as
        ``ImageInfo.image``) need, nothing else of the target; return them, in order, as
        store-held input artifacts for :meth:`reader`."""
        ...

    def reader(self, inputs: Mapping[str, Sequence[InputArtifact]] | None = None) -> StoreTreeReader:
        """A reader of store-held trees and blobs; ``inputs`` are what its ``inputs(name)`` returns."""
        ...

    def compressors(self) -> Mapping[str, type[Compressor]]:
        """The registered compressor classes, by NAME."""
        ...

    def compressor(self, name: str) -> Compressor:
        """The registered compressor ``name``, ready to use."""
        ...

    def report(self, message: str) -> None:
        """Show one progress line to the user (on stderr, escaped)."""
        ...

    def progress(self, description: str, done_bytes: int, total_bytes: int | None) -> None:
        """Bytes moved so far by one transfer of the command (``push sha256:…``), as
        :meth:`ActionContext.progress` reports an action's, under the command's name.
        Call it through a :class:`~dtbuild.plugins.progress.ProgressMeter`."""
        ...


class Command(abc.ABC):
    """A subcommand a plugin adds to ``dtbuild`` (``dtbuild NAME ...``), as a pytest
    plugin adds options: the engine's parser gets a subparser named ``NAME`` with the
    global flags, :meth:`add_arguments` adds the command's own, and :meth:`run` gets the
    parsed arguments and a :class:`CommandAPI`. Print results to stdout and progress to
    stderr (or :meth:`CommandAPI.report`); raise :class:`CommandFailed` for errors."""

    NAME: ClassVar[str]
    #: One line for ``dtbuild --help`` and ``dtbuild plugins``.
    HELP: ClassVar[str]
    #: What ``dtbuild NAME --help`` says above the arguments (kept as written, line breaks
    #: too); empty: ``HELP``.
    DESCRIPTION: ClassVar[str] = ""
    #: The examples ``dtbuild NAME --help`` ends with, one command a line (indented two
    #: spaces, an explanation after it or on the next line), as ``bazel help build`` shows them.
    EXAMPLES: ClassVar[str] = ""

    def add_arguments(self, parser: Any) -> None:  # noqa: B027 - optional: a command may take no arguments
        """Add the command's arguments to ``parser`` (an ``argparse.ArgumentParser``), each
        with a ``help``. The global flags (``-p``, ``--jobs``, ``--debug``, the remote
        flags) are there already and stay the engine's: read ``args.jobs`` (0: one action
        per core) rather than declaring ``--jobs`` again."""

    @abc.abstractmethod
    def run(self, args: Any, api: CommandAPI) -> int:
        """Run the command; return its exit status (0 on success)."""


# --------------------------------------------------------------------------- compressors


class Compressor(abc.ABC):
    """A stream compressor for layer blobs and image archives.

    Output must be deterministic: no timestamps or file names in headers, and the same
    bytes whatever the machine or thread count.
    """

    NAME: ClassVar[str]  # "gz", "zstd", "none"
    VERSION: ClassVar[str] = "1"
    #: Appended to archive file names: ".gz", ".zst", "".
    EXTENSION: ClassVar[str]
    #: OCI layer media type.
    OCI_LAYER_MEDIA_TYPE: ClassVar[str]
    #: Docker schema 2 layer media type, or None where Docker has none (zstd).
    DOCKER_LAYER_MEDIA_TYPE: ClassVar[str | None]
    #: Leading bytes that identify this format (b"" for none).
    MAGIC: ClassVar[bytes]

    @abc.abstractmethod
    def compress_to(self, sink: IO[bytes]) -> IO[bytes]:
        """A writable stream; what is written to it reaches ``sink`` compressed. Closing
        it flushes everything into ``sink`` but leaves ``sink`` open."""

    @abc.abstractmethod
    def decompress_from(self, source: IO[bytes]) -> IO[bytes]:
        """A readable stream of the decompressed bytes of ``source``."""


# --------------------------------------------------------------------------- layer kinds

LayerMemberKind = Literal["file", "dir", "symlink", "hardlink"]


@dataclass(frozen=True, slots=True)
class LayerMember:
    """One member of a layer, as :meth:`LayerKind.entries` yields it.

    ``path`` is where it goes in the image (``/etc/motd`` or ``etc/motd``; no ``.`` or
    ``..`` parts). A file's bytes are ``data`` (small contents), or the file input
    ``source`` (an :class:`InputArtifact` from ``ctx.inputs(...)``: nothing is copied),
    or the store blob ``digest`` of ``size`` bytes (a :class:`TreeEntry` of a tree
    input). ``target`` is a symlink's target or, for a hardlink, the path it links to.
    Parent directories not yielded are added as 0755 root:root directories.
    """

    path: str
    kind: LayerMemberKind = "file"
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes | None = None
    source: InputArtifact | None = None
    digest: str = ""
    size: int = 0
    target: str = ""


class LayerKind(abc.ABC):
    """A kind of image layer that BUILD files get a rule for.

    The engine makes the rule ``NAME`` from ``ATTRS`` (the attribute schema rules
    have, :mod:`dtbuild.rules.attrs`) and ``DOC``; a target of it outputs ``NAME.tar``
    and provides ``LayerInfo`` (and ``DefaultInfo``), so ``image(layers = [...])`` takes
    it. Its one action (``LayerKindWrite``) calls :meth:`entries` and writes the layer
    tar in one pass (sorted, fixed mtime, hashed as it is written); its cache key holds
    the attributes, the digests of the label attributes' files and ``VERSION`` (plus the
    source digest of a workspace module, or the distribution's version), so changing
    the layer kind re-runs exactly its layers.

    A kind that brings its own rule (registered under ``NAME`` with
    ``dtbuild_register_rules``) and action kind sets ``ACTION_KIND`` to that action
    kind's NAME: the engine then makes no rule, and :meth:`entries` is not used.
    """

    NAME: ClassVar[str]
    DOC: ClassVar[str] = ""
    VERSION: ClassVar[str] = "1"
    #: Attribute name -> :class:`dtbuild.rules.attrs.Attr`, each with a ``doc``.
    ATTRS: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    #: The action kind of a kind that brings its own rule; None: the engine's rule.
    ACTION_KIND: ClassVar[str | None] = None

    @classmethod
    def plan(cls, ctx: Any) -> Any:
        """What the rule hands the action, at analysis (``ctx`` is the target's
        ``RuleContext``): a :class:`dtbuild.rules.api.LayerPlan`. By default each label
        or source attribute becomes an input slot of its name holding its files, and
        every other attribute goes to :meth:`entries` as it is. Override it to check
        attributes (``ctx.fail``) or to read dependencies' providers."""
        from dtbuild.rules.api import default_layer_plan

        return default_layer_plan(ctx, cls.ATTRS)

    def entries(self, ctx: ActionContext, attrs: Mapping[str, Any]) -> Iterable[LayerMember]:
        """The layer's members, in any order, each path once. ``attrs`` holds the
        target's attributes (JSON values), a label or source attribute as the tuple of
        its :class:`InputArtifact` files; read them with ``ctx.open_input``. Must be
        deterministic. Raise :class:`ActionFailed` for bad input."""
        raise NotImplementedError(f"layer kind {self.NAME!r} does not implement entries()")
