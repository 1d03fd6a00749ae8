"""Execution: run (or find in the cache) the declared actions in dependency order.

Each action's key is the sha256 of a canonical encoding of its kind and that kind's
version, the declaring rule's version, its parameters, the paths and digests of its
inputs and the paths of its outputs. Keys are computed when an action's inputs are
known, so an input rebuilt to identical bytes stops the rebuild there (early cutoff).

Cache hits cost no thread hand-off: the scheduler thread checks an action whose inputs
are all known (sources by their memoized signature) against the workspace's results
index, and a result recorded under the store's current generation is trusted without a
stat. What has to run goes to worker threads (``--jobs``), longest remaining path first
(weighted by each action's last measured duration) on a networkx graph that is built
only when there is work; commands run through an executor plugin. A result enters the
action cache only after every output is in the store (the build flushes the store once,
at its end, before the results index trusts anything), so an interrupted or killed
build leaves nothing a later build would trust unchecked.

Action rewinding (as Bazel calls it): a cache hit trusts that its blobs are present,
and their bytes are checked only when they are read (see ``store.py``). When an action
finds an input blob missing or corrupt (the store deleted it), or the output tree finds
one it copies, the runner traces the blob to the action that first wrote it (a source
file is read again from the workspace), runs that action again ignoring its cached
result, and retries the reader once. A blob that is wrong again after that is an error
naming the blob and both actions. Every blob an action read is checked before its
outputs enter the cache, so bad bytes never become a cached result.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import inspect
import os
import queue
import shlex
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, TypeVar

from dtbuild.engine.errors import ActionError, BuildFailure, CycleError, Interrupted, Location, StoreError
from dtbuild.engine.sources import SourceDigests
from dtbuild.engine.store import (
    ActionResult,
    BlobWriter,
    LostBlobError,
    MissingBlobError,
    OutputValue,
    SourceChangedError,
    Store,
    VerifiedBlobReader,
    canonical_json,
    disk_error,
    remove_tree,
)
from dtbuild.plugins.interfaces import (
    ActionFailed,
    ActionKind,
    CommandRequest,
    CommandResult,
    Compressor,
    Executor,
    ExecutorContext,
    InputArtifact,
    LayerKind,
    Settings,
    TreeEntry,
)
from dtbuild.rules.api import ActionDecl
from dtbuild.rules.artifacts import Artifact

if TYPE_CHECKING:
    from dtbuild.engine.remote.cache import RemoteCache

_T = TypeVar("_T")

#: Bump when the key encoding or the store's result format changes.
ENGINE_KEY_VERSION = "1"


@dataclass(frozen=True, slots=True)
class CriticalStep:
    """An executed action on the build's critical path."""

    label: str
    mnemonic: str
    seconds: float


@dataclass
class ExecutionStats:
    executed: int = 0
    cached: int = 0
    remote_cached: int = 0
    #: Executed on the remote executor (not counted in ``executed``).
    remote_executed: int = 0
    failed: int = 0
    skipped: int = 0
    #: Cache entries found missing or corrupt when read, and rebuilt (action rewinding).
    rewound: int = 0
    #: The chain of dependent executed actions that took longest, first to last.
    critical_path: list[CriticalStep] = field(default_factory=list)

    @property
    def critical_seconds(self) -> float:
        return sum(step.seconds for step in self.critical_path)


@dataclass
class ActionOutcome:
    action: ActionDecl
    status: str  # executed | remote_executed | cached | remote_cached | failed | skipped
    key: str = ""
    error: BaseException | None = None
    seconds: float = 0.0


#: Workers beyond ``--jobs`` that only ask the remote cache (see ActionRunner.workers).
REMOTE_LOOKUPS = 8

#: Statuses of actions that ran (here or on the remote executor).
RAN = frozenset({"executed", "remote_executed"})


def action_id(action: ActionDecl) -> str:
    """What names an action from one build to the next (its key changes with its
    inputs): its owner, mnemonic and output paths."""
    return f"{action.owner} {action.mnemonic} {','.join(sorted(a.path for a in action.outputs.values()))}"


#: A cache hit from the workspace's results index marks its action-cache entry used (for
#: gc) at most this often, so a no-op build writes nothing in the cache.
TOUCH_INTERVAL_SECONDS = 86400.0

#: (inputs, key) of an action, computed once by whoever first knew its inputs.
_Prepared = tuple[dict[str, list[InputArtifact]], str]


@dataclass
class PluginItems:
    """What the execution phase needs from the plugin registry."""

    action_kinds: Mapping[str, type[ActionKind]]
    executors: Mapping[str, type[Executor]]
    compressors: Mapping[str, type[Compressor]]
    hook: Any  # pluggy's HookRelay
    #: Version text of every registered object by registry and name (its ``VERSION``,
    #: plus the source digest of a workspace module or the version of its distribution).
    fingerprints: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: The workspace's root, cache directory and settings, handed to executors in their
    #: :class:`ExecutorContext` and to actions as ``ctx.settings``.
    workspace_root: str = ""
    cache_dir: str = ""
    settings: Settings = field(default_factory=Settings)
    #: The registered layer kinds by NAME, for the action kind that writes their layers.
    layer_kinds: Mapping[str, type[LayerKind]] = field(default_factory=dict)
    _instances: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fingerprint(self, registry: str, name: str) -> str:
        """The version text of a registered object; "unregistered" for a name no plugin
        registers (the action that needs it fails when it runs)."""
        found = self.fingerprints.get(registry, {}).get(name)
        if found is not None:
            return found
        cls = {"compressors": self.compressors, "executors": self.executors,
               "layer_kinds": self.layer_kinds}.get(registry, {}).get(name)
        return str(getattr(cls, "VERSION", "1")) if cls is not None else "unregistered"

    def uses_of(self, action: ActionDecl) -> dict[str, dict[str, str]]:
        """The versions of the registered objects ``action`` declares it uses."""
        return {registry: {name: self.fingerprint(registry, name) for name in names}
                for registry, names in sorted(action.uses.items())}

    def compressor(self, name: str) -> Compressor:
        return self._instance("compressor", self.compressors, name)

    def layer_kind(self, name: str) -> LayerKind:
        return self._instance("layer kind", self.layer_kinds, name)

    def _instance(self, kind: str, classes: Mapping[str, type[Any]], name: str) -> Any:
        """The one instance of registered class ``name`` (made on first use)."""
        with self._lock:
            inst = self._instances.get(f"{kind}:{name}")
            if inst is None:
                cls = classes.get(name)
                if cls is None:
                    raise ActionFailed(f"no {kind} named {name!r} is registered "
                                       f"(registered: {', '.join(sorted(classes)) or 'none'})")
                inst = self._instances[f"{kind}:{name}"] = cls()
            return inst

    def warn(self, message: str) -> None:
        """A warning for the user that no one action owns (the remote is gone)."""
        self.hook.dtbuild_action_log(label="dtbuild", mnemonic="warning", message=f"warning: {message}")

    def executor_context(self, name: str) -> ExecutorContext:
        """The context executor ``name`` is made with."""

        def log(message: str) -> None:
            self.hook.dtbuild_action_log(label=f"{name} executor", mnemonic=name, message=message)

        return ExecutorContext(self.workspace_root, self.cache_dir, self.settings, log)

    def executor_instance(self, name: str) -> Executor:
        """The build's one instance of executor ``name``, made with its context:
        ``cls(context)``, or ``cls()`` (then given ``context``) for a class whose
        constructor takes no argument."""
        with self._lock:
            inst = self._instances.get("e:" + name)
            if inst is None:
                cls = self.executors[name]
                context = self.executor_context(name)
                try:
                    inspect.signature(cls).bind(context)
                    takes_context = True
                except (TypeError, ValueError):
                    takes_context = False
                if takes_context:
                    inst = cls(context)
                else:
                    inst = cls()
                    inst.context = context
                self._instances["e:" + name] = inst
            return inst

    def executor(self, mnemonic: str, requested: str) -> Executor:
        available = [name for name in sorted(self.executors)
                     if self.executor_instance(name).unavailable_reason() is None]
        chosen = self.hook.dtbuild_select_executor(mnemonic=mnemonic, requested=requested, available=available)
        if chosen is None:
            chosen = requested if requested != "auto" else (available[0] if available else None)
        if chosen is None or chosen not in self.executors:
            raise ActionFailed(f"no executor {requested!r} is registered "
                               f"(registered: {', '.join(sorted(self.executors)) or 'none'})")
        inst = self.executor_instance(chosen)
        reason = inst.unavailable_reason()
        if reason is not None:
            raise ActionFailed(f"the {chosen} executor cannot run here: {reason}")
        return inst


def action_key(action: ActionDecl, kind_version: str, inputs: Mapping[str, Sequence[InputArtifact]],
               uses: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """The action's cache key. ``uses`` holds the versions of the registered objects
    the action declares (:meth:`PluginItems.uses_of`); keys of actions that declare
    none are unchanged by it."""
    doc: dict[str, Any] = {
        "engine": ENGINE_KEY_VERSION,
        "mnemonic": action.mnemonic,
        "kind_version": kind_version,
        "rule_version": action.rule_version,
        "params": action.params,
        "network": action.network,
        "cacheable": action.cacheable,
        "inputs": {slot: [[a.path, a.digest, a.is_tree, a.executable, a.symlink] for a in arts]
                   for slot, arts in sorted(inputs.items())},
        "outputs": {slot: [art.path, art.is_tree] for slot, art in sorted(action.outputs.items())},
    }
    if uses:
        doc["uses"] = {registry: dict(sorted(names.items())) for registry, names in sorted(uses.items())}
    return hashlib.sha256(canonical_json(doc)).hexdigest()


class _OutputStream:
    """``ctx.output_writer``: a file-like writer into the store."""

    def __init__(self, writer: BlobWriter, on_close: Any) -> None:
        self._writer = writer
        self._on_close = on_close
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self._writer.write(data)

    def writable(self) -> bool:
        return True

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._writer.size

    def hexdigest(self) -> str:
        """The sha256 (hex) of the bytes written so far, which the output's digest will be:
        writers that need it (a layer's blob digest) take it here, so no byte is hashed
        twice."""
        return self._writer.hexdigest()

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            digest = self._writer.commit()
            self._on_close(digest, self._writer.size)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.abort()

    def __enter__(self) -> _OutputStream:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ActionContextImpl:
    """The :class:`~dtbuild.plugins.interfaces.ActionContext` the engine gives an action."""

    def __init__(self, runner: ActionRunner, action: ActionDecl, inputs: dict[str, list[InputArtifact]],
                 work_dir: str) -> None:
        self._runner = runner
        self._store = runner.store
        self.action = action
        self.params = action.params
        self.settings = runner.plugins.settings
        self._inputs = inputs
        self.work_dir = work_dir
        self.scratch_dir = os.path.join(work_dir, "scratch")
        self._out_dir = os.path.join(work_dir, "out")
        os.makedirs(self.scratch_dir)
        os.makedirs(self._out_dir)
        self._slots = {name: i for i, name in enumerate(sorted(action.outputs))}
        self.direct_outputs: dict[str, OutputValue] = {}
        self._open_streams: list[_OutputStream] = []
        #: Versions of the registered objects the action asked for while it ran; kept in
        #: its result, so a new version of one makes the result stale even where the
        #: action did not declare it.
        self.used: dict[str, dict[str, str]] = {}
        #: Streams of blobs handed to the action: each is checked before the action's
        #: outputs are accepted, also when the action never closed it.
        self._readers: list[VerifiedBlobReader] = []
        #: The first blob found missing or corrupt while the action ran (an action kind
        #: may catch the error and raise its own).
        self.lost: LostBlobError | None = None
        #: The first source file found changed while the action read it: the action
        #: fails with it, whatever an action kind made of it.
        self.changed: SourceChangedError | None = None
        #: Whether a command of the action ran on the remote executor.
        self.ran_remotely = False

    def _note(self, error: LostBlobError) -> LostBlobError:
        if self.lost is None:
            self.lost = error
        return error

    def _note_changed(self, error: SourceChangedError) -> SourceChangedError:
        if self.changed is None:
            self.changed = error
        return error

    def _reader(self, digest: str) -> IO[bytes]:
        try:
            reader = self._store.open_blob(digest)
        except LostBlobError as e:
            raise self._note(e) from None
        except SourceChangedError as e:
            raise self._note_changed(e) from None
        if isinstance(reader, VerifiedBlobReader):  # an in-memory source was checked already
            readers = self._readers
            n = len(readers)
            if n >= 256 and n & (n - 1) == 0:
                # Drop the readers closed after their bytes matched: nothing left to check.
                readers[:] = [r for r in readers if not (r.closed and r.verifier.state == "verified")]
            readers.append(reader)
        return reader

    def check_reads(self) -> LostBlobError | None:
        """Check every blob the action read (reading to the end what it did not): the
        first one missing or corrupt, or None.

        :raises SourceChangedError: when a source file read in place changed meanwhile.
        """
        for reader in self._readers:
            try:
                reader.verifier.finish()
            except LostBlobError as e:
                self._note(e)
            except SourceChangedError as e:
                self._note_changed(e)
            except (OSError, ValueError):
                pass  # closed: it was checked when it was closed
        self._readers.clear()
        if self.changed is not None:
            raise self.changed
        return self.lost

    def inputs(self, name: str) -> Sequence[InputArtifact]:
        return self._inputs.get(name, [])

    def store_file(self, artifact: InputArtifact) -> None:
        """Make a file input's bytes readable from the store: a source file is read in
        place (registered with the store, never copied into it)."""
        if artifact.is_tree or artifact.symlink is not None:
            return
        if not artifact.path.startswith("dtbuild-out/"):
            self._store.register_source(artifact.digest, os.path.join(self._runner.root, artifact.path),
                                        artifact.size, artifact.path)
        elif not self._store.has_blob(artifact.digest, artifact.size):
            raise self._note(self._store.missing(artifact.digest))

    def put_blob(self, data: bytes) -> str:
        return self._store.put_bytes(data)

    def put_file(self, path: str) -> tuple[str, int]:
        return self._store.put_file(path)

    def put_stream(self, source: IO[bytes], size: int | None = None) -> tuple[str, int]:
        writer = self._store.writer(size)
        try:
            while chunk := source.read(1 << 20):
                writer.write(chunk)
            return writer.commit(), writer.size
        except BaseException:
            writer.abort()
            raise

    def open_input(self, artifact: InputArtifact) -> IO[bytes]:
        if artifact.is_tree:
            raise ActionFailed(f"{artifact.path} is a directory; walk it with walk_tree()")
        self.store_file(artifact)
        return self._reader(artifact.digest)

    def walk_tree(self, artifact: InputArtifact) -> Iterator[TreeEntry]:
        try:
            yield from self._store.walk_tree(artifact.digest)
        except LostBlobError as e:
            raise self._note(e) from None

    def open_blob(self, digest: str) -> IO[bytes]:
        return self._reader(digest)

    def materialize(self, artifact: InputArtifact, dest: str) -> str:
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        try:
            if artifact.symlink is not None:
                os.symlink(artifact.symlink, dest)
            elif artifact.is_tree:
                self._store.materialize_tree(artifact.digest, dest)
            else:
                self.store_file(artifact)
                # A new file (never written through an existing one or a symlink), mode
                # 0755/0644: host copies never carry setuid, setgid or sticky bits. The
                # bytes are checked as they are copied.
                self._store.copy_blob_to(artifact.digest, dest, 0o755 if artifact.executable else 0o644)
        except LostBlobError as e:
            raise self._note(e) from None
        except SourceChangedError as e:
            raise self._note_changed(e) from None
        return dest

    def output_path(self, name: str) -> str:
        if name not in self._slots:
            raise ActionFailed(f"{self.action.mnemonic} wrote undeclared output {name!r}")
        return os.path.join(self._out_dir, f"{self._slots[name]}-{self.action.outputs[name].basename}")

    def output_writer(self, name: str) -> IO[bytes]:
        if name not in self._slots or self.action.outputs[name].is_tree:
            raise ActionFailed(f"{self.action.mnemonic}: {name!r} is not a declared file output")

        def done(digest: str, size: int) -> None:
            self.direct_outputs[name] = OutputValue(digest, size, False, False)

        stream = _OutputStream(self._store.writer(), done)
        self._open_streams.append(stream)
        return stream  # type: ignore[return-value]

    def output_tree(self, name: str, entries: Sequence[TreeEntry]) -> None:
        if name not in self._slots or not self.action.outputs[name].is_tree:
            raise ActionFailed(f"{self.action.mnemonic}: {name!r} is not a declared tree output")
        digest, total = build_tree(self._store, entries)
        self.direct_outputs[name] = OutputValue(digest, total, True, False)

    def run_command(self, request: CommandRequest) -> CommandResult:
        runner = self._runner
        runner.observe("action_command", self.action, command=shlex.join(request.argv))
        # A command that needs the network runs here: remote execution gives none.
        if runner.remote_executor_usable and getattr(runner.kind_for(self.action), "COMMAND", False) \
                and not request.network:
            from dtbuild.engine.remote import RemoteAuthError, RemoteError

            try:
                result = runner.plugins.executor_instance("remote").run(request, runner.cancel)
            except RemoteAuthError as e:
                raise ActionFailed(str(e)) from None
            except RemoteError as e:
                if runner.remote_executor_failed(e):
                    runner.plugins.warn(f"the remote executor cannot be used ({e}); commands run here")
            else:
                self.ran_remotely = True
                return result
        executor = runner.plugins.executor(self.action.mnemonic, self.action.executor)
        return executor.run(request, runner.cancel)

    def compressor(self, name: str) -> Compressor:
        found = self._runner.plugins.compressor(name)
        self.used.setdefault("compressors", {})[name] = self._runner.plugins.fingerprint("compressors", name)
        return found

    def compressors(self) -> Mapping[str, type[Compressor]]:
        return dict(self._runner.plugins.compressors)

    def layer_kind(self, name: str) -> LayerKind:
        found = self._runner.plugins.layer_kind(name)
        self.used.setdefault("layer_kinds", {})[name] = self._runner.plugins.fingerprint("layer_kinds", name)
        return found

    def log(self, message: str) -> None:
        self._runner.report("dtbuild_action_log", label=self.action.owner, mnemonic=self.action.mnemonic,
                            message=message)

    def progress(self, description: str, done_bytes: int, total_bytes: int | None) -> None:
        self._runner.report("dtbuild_transfer_progress", label=self.action.owner, description=description,
                            done_bytes=done_bytes, total_bytes=total_bytes)

    def abort_streams(self) -> None:
        for s in self._open_streams:
            s.abort()


def build_tree(store: Store, entries: Sequence[TreeEntry]) -> tuple[str, int]:
    """Store Directory nodes for ``entries`` (parents implied with mode 0755) and return
    (root digest, total file bytes). Duplicate paths are an error."""
    root: dict[str, Any] = {"mode": 0o755, "files": {}, "dirs": {}, "links": {}}
    total = 0

    def directory(parts: list[str]) -> dict[str, Any]:
        node = root
        for part in parts:
            if part in node["files"] or part in node["links"]:
                raise ActionFailed(f"'{part}' is both a file and a directory in one tree")
            node = node["dirs"].setdefault(part, {"mode": 0o755, "files": {}, "dirs": {}, "links": {}})
        return node

    for e in entries:
        parts = [p for p in e.path.split("/") if p]
        if not parts:
            continue
        parent = directory(parts[:-1])
        name = parts[-1]
        taken = name in parent["files"] or name in parent["links"]
        if e.kind == "dir":
            if taken:
                raise ActionFailed(f"'{e.path}' is both a file and a directory in one tree")
            directory(parts)["mode"] = e.mode
            continue
        if taken or name in parent["dirs"]:
            raise ActionFailed(f"'{e.path}' appears twice in one tree")
        if e.kind == "file":
            parent["files"][name] = {"name": name, "digest": e.digest, "size": e.size, "mode": e.mode}
            total += e.size
        else:
            parent["links"][name] = {"name": name, "target": e.target}

    def put(node: dict[str, Any]) -> str:
        dirs = [{"name": n, "digest": put(child)} for n, child in node["dirs"].items()]
        return store.put_directory_node(list(node["files"].values()), dirs, list(node["links"].values()),
                                        node["mode"])

    return put(root), total


class ActionRunner:
    """Schedules actions on worker threads in dependency order."""

    def __init__(self, *, root: str, store: Store, sources: SourceDigests, plugins: PluginItems,
                 jobs: int, keep_going: bool, cancel: threading.Event,
                 locations: Mapping[str, Location], kinds: Mapping[str, str] | None = None,
                 debug: bool = False, known_results: Mapping[str, Any] | None = None,
                 trusted_results: Collection[str] = (), marked_used: Mapping[str, float] | None = None,
                 durations: Callable[[], Mapping[str, float]] | None = None, generation: str = "",
                 remote: RemoteCache | None = None, remote_executor: str | None = None,
                 observer: Any = None) -> None:
        self.root = root
        self.store = store
        self.sources = sources
        self.plugins = plugins
        self.jobs = max(1, jobs)
        #: How many actions may be in hand at once: ``jobs``, and with a remote cache
        #: REMOTE_LOOKUPS more, since asking the remote waits on the network, not on a
        #: core. Running actions are held to ``jobs`` by ``_run_slots``.
        self.workers = self.jobs + (REMOTE_LOOKUPS if remote is not None else 0)
        self._run_slots = threading.BoundedSemaphore(self.jobs)
        self.keep_going = keep_going
        self.cancel = cancel
        self.locations = locations
        self.kinds = kinds or {}
        self.debug = debug
        self.values: dict[str, OutputValue] = {}
        self.stats = ExecutionStats()
        self.outcomes: list[ActionOutcome] = []
        self._report_lock = threading.Lock()
        self._kind_instances: dict[str, ActionKind] = {}
        #: Results of this workspace's previous builds by key (one query instead of one
        #: file per action). Those in ``trusted_results`` were found present under the
        #: store's current generation and are trusted without a stat; the others are
        #: checked against the store like any cache hit.
        self.known_results = known_results or {}
        self.trusted_results = trusted_results
        #: When each known result's action-cache entry was last marked used (epoch seconds).
        self.marked_used = marked_used or {}
        #: Keys whose action-cache entry this build marked used.
        self.marked_now: set[str] = set()
        self.used_results: dict[str, Any] = {}
        #: Results decoded from ``known_results``, by key.
        self._from_index: dict[str, ActionResult] = {}
        #: The store's generation when the build started: what its results are recorded under.
        self.generation = generation
        #: Seconds each action (by :func:`action_id`) took when it last ran; read only
        #: when something has to run.
        self._durations = durations or dict
        #: The action that produces each generated artifact (set by :meth:`run`).
        self.producers: Mapping[str, ActionDecl] = {}
        self._rewind_lock = threading.RLock()
        #: The remote cache (looked up on a local miss, given what runs here), or None.
        self.remote = remote
        #: The URL of the remote executor that runs the commands of COMMAND kinds, or None.
        self.remote_executor = remote_executor
        self._remote_exec_failed = False
        self._remote_exec_lock = threading.Lock()
        #: Told what the observer hooks do not carry (see :meth:`observe`), or None.
        self.observer = observer
        #: The error of each failed action, as it failed (interruptions left out).
        self.errors: list[BuildFailure] = []

    # ------------------------------------------------------------------ reporting

    def report(self, hook_name: str, **kwargs: Any) -> None:
        with self._report_lock:
            getattr(self.plugins.hook, hook_name)(**kwargs)

    def observe(self, method: str, action: ActionDecl, **kwargs: Any) -> None:
        """Tell the build's observer (the command line's console) what the hooks do not
        carry: ``action_command(command=)`` as a command starts, ``action_key(key=)``
        before an action is reported finished, ``action_failed(error=)`` after a failure
        is, each with the action's ``label``, ``mnemonic`` and ``description``."""
        if self.observer is not None:
            getattr(self.observer, method)(label=action.owner, mnemonic=action.mnemonic,
                                           description=action.description, **kwargs)

    # ------------------------------------------------------------------ inputs and keys

    def input_artifact(self, art: Artifact) -> InputArtifact:
        """The path, digest and kind of an input. A source file's digest comes from the
        source memo, and the store learns that the file holds that blob: sources are
        read in place, never copied into the cache."""
        if art.is_source:
            src = self.sources.get(art.path)
            if src.symlink is None:
                self.store.register_source(src.digest, os.path.join(self.root, art.path), src.size, art.path)
            return InputArtifact(art.path, src.digest, False, src.size, src.executable, src.symlink)
        value = self.values[art.path]
        return InputArtifact(art.path, value.digest, value.is_tree, value.size, value.executable)

    def kind_for(self, action: ActionDecl) -> ActionKind:
        inst = self._kind_instances.get(action.mnemonic)
        if inst is None:
            cls = self.plugins.action_kinds.get(action.mnemonic)
            if cls is None:
                raise ActionFailed(f"no plugin implements action kind {action.mnemonic!r} "
                                   f"(known: {', '.join(sorted(self.plugins.action_kinds))})")
            inst = self._kind_instances[action.mnemonic] = cls()
        return inst

    def _known_result(self, key: str) -> ActionResult | None:
        known = self.known_results.get(key)
        if known is None:
            return None
        try:
            result = self._from_index[key] = ActionResult.from_json(known)
        except (AttributeError, KeyError, TypeError, ValueError):  # the index is an optimisation only
            return None
        return result

    def reusable(self, result: ActionResult, action: ActionDecl, *, trusted: bool = False) -> bool:
        """Whether a cached result can stand for running ``action``: every output is in
        the store (``trusted``: taken as present without looking, for a result indexed
        under the store's current generation) and every registered object it used still
        has the version it had."""
        if trusted and set(result.outputs) != set(action.outputs):
            return False
        return (trusted or self._outputs_present(result, action)) and not self.stale_uses(result)

    def stale_uses(self, result: ActionResult) -> list[str]:
        """The registered objects a result was made with whose version has changed since,
        as "compressor 'gz' (version 1 -> 2)"."""
        used = result.meta.get("uses")
        if not isinstance(used, dict):
            return []
        changed = []
        for registry, names in sorted(used.items()):
            if not isinstance(names, dict):
                return [f"{registry} (unreadable record)"]
            for name, version in sorted(names.items()):
                now = self.plugins.fingerprint(registry, name)
                if now != version:
                    changed.append(f"{registry.removesuffix('s').replace('_', ' ')} '{name}' "
                                   f"(version {version} -> {now})")
        return changed

    def _outputs_present(self, result: ActionResult, action: ActionDecl) -> bool:
        if set(result.outputs) != set(action.outputs):
            return False
        for value in result.outputs.values():
            if value.is_tree:
                if not self.store.tree_blobs_present(value.digest):
                    return False
            elif not self.store.has_blob(value.digest, value.size):
                return False
        return True

    # ------------------------------------------------------------------ one action

    def process(self, action: ActionDecl, prepared: _Prepared | None = None) -> ActionOutcome:
        started = time.monotonic()
        status, key = self._produce(action, rerun=False, prepared=prepared)
        return ActionOutcome(action, status, key, seconds=time.monotonic() - started)

    def _cached(self, action: ActionDecl, key: str) -> ActionResult | None:
        """The result that can stand for running ``action`` (key ``key``): from the
        workspace's index, else from the action cache; None for a miss."""
        known = self._known_result(key)
        if known is not None and self.reusable(known, action, trusted=key in self.trusted_results):
            if time.time() - self.marked_used.get(key, 0.0) >= TOUCH_INTERVAL_SECONDS:
                self.store.touch_action(key)
                self.marked_now.add(key)
            return known
        result = self.store.get_action(key)
        if result is not None and self.reusable(result, action):
            self.store.touch_action(key)
            self.marked_now.add(key)
            return result
        return None

    def _remote_hit(self, action: ActionDecl, key: str) -> ActionResult | None:
        """The remote cache's result for ``action`` (its blobs fetched into the store and
        the result written to the local action cache), or None."""
        from dtbuild.engine.remote import RemoteAuthError

        assert self.remote is not None
        try:
            result = self.remote.lookup(key, set(action.outputs),
                                        lambda meta: not self.stale_uses(ActionResult({}, meta)),
                                        progress=lambda **moved: self.report("dtbuild_transfer_progress",
                                                                             label=action.owner, **moved))
        except RemoteAuthError as e:
            raise ActionFailed(str(e)) from None
        if result is None:
            return None
        self.store.put_action(key, result)
        return result

    def remote_executor_failed(self, error: Exception) -> bool:
        """Note that the remote executor failed (``error``); True the first time, when
        the caller warns that commands run here from now on."""
        with self._remote_exec_lock:
            first = not self._remote_exec_failed
            self._remote_exec_failed = True
        return first

    @property
    def remote_executor_usable(self) -> bool:
        return self.remote_executor is not None and not self._remote_exec_failed

    def _record(self, action: ActionDecl, key: str, result: ActionResult) -> None:
        for slot, art in action.outputs.items():
            self.values[art.path] = result.outputs[slot]
        if action.cacheable:
            # A result taken from the index is recorded as the index holds it (no encoding).
            from_index = self._from_index.get(key) is result
            self.used_results[key] = self.known_results[key] if from_index else result.to_json()

    def _hit_inline(self, action: ActionDecl) -> tuple[ActionOutcome | None, _Prepared | None]:
        """On the scheduler thread: the outcome of ``action`` when the cache has it and
        telling needs no hashing (its sources are memoized); else (None, its inputs and
        key when they could be computed, for the worker that runs it)."""
        started = time.monotonic()
        try:
            inputs: dict[str, list[InputArtifact]] = {}
            for slot, arts in action.inputs.items():
                slot_inputs = inputs[slot] = []
                for art in arts:
                    if art.is_source and self.sources.known(art.path) is None:
                        return None, None  # a hash to compute: a worker's job
                    slot_inputs.append(self.input_artifact(art))
            kind = self.kind_for(action)
            key = action_key(action, kind.VERSION, inputs, self.plugins.uses_of(action))
            result = self._cached(action, key) if action.cacheable else None
        except Exception:  # the worker meets it again and reports it in its own words
            return None, None
        if result is None:
            return None, (inputs, key)
        self._record(action, key, result)
        return ActionOutcome(action, "cached", key, seconds=time.monotonic() - started), None

    def _produce(self, action: ActionDecl, *, rerun: bool, prepared: _Prepared | None = None) -> tuple[str, str]:
        """Find ``action``'s result in the cache or run it (``rerun``: run it whatever the
        cache holds), record its outputs' values, and return (status, key). An input
        found missing or corrupt while it runs is rebuilt once and the action retried.
        ``prepared``: its inputs and key, already computed, whose cache lookup missed."""
        kind = self.kind_for(action)
        rebuilt: dict[str, str] = {}  # digest -> the input it was rebuilt for
        while True:
            if prepared is not None:
                (inputs, key), prepared = prepared, None
                result = None
            else:
                inputs = {slot: [self.input_artifact(a) for a in arts] for slot, arts in action.inputs.items()}
                key = action_key(action, kind.VERSION, inputs, self.plugins.uses_of(action))
                result = self._cached(action, key) if action.cacheable and not rerun else None
            if result is not None:
                status = "cached"
                break
            if self.remote is not None and action.cacheable and not rerun:
                result = self._remote_hit(action, key)
                if result is not None:
                    status = "remote_cached"
                    break
            try:
                with self._run_slots:  # reported started once it has a slot, not while it waits
                    if not rerun and not rebuilt:
                        self.report("dtbuild_action_started", label=action.owner, mnemonic=action.mnemonic,
                                    description=action.description)
                    result, remotely = self._execute(action, kind, inputs)
            except LostBlobError as lost:
                if lost.digest in rebuilt:
                    raise self._still_wrong(lost, rebuilt[lost.digest], action) from None
                rebuilt[lost.digest] = self._rebuild_input(action, inputs, lost)
                continue
            if action.cacheable:
                # After its blobs; flushed once per build (the build's make_durable).
                self.store.put_action(key, result)
                if self.remote is not None:
                    self.remote.upload(key, result, progress=lambda **moved: self.report(
                        "dtbuild_transfer_progress", label=action.owner, **moved))
            status = "remote_executed" if remotely else "executed"
            break
        self._record(action, key, result)
        return status, key

    # ------------------------------------------------------------------ rewinding

    def read_output(self, path: str, read: Callable[[OutputValue], _T]) -> _T:
        """``read(value of artifact path)``, for readers outside actions (the output tree):
        when it finds a blob of the artifact missing or corrupt, the blob is rebuilt once
        (its producer runs again) and ``read`` is called again."""
        try:
            return read(self.values[path])
        except LostBlobError as lost:
            with self._rewind_lock:
                if not self._contains(self.values[path], lost.digest):
                    raise
                self._rebuild(path, lost)
        try:
            return read(self.values[path])
        except LostBlobError as again:
            raise self._still_wrong(again, path, None) from None

    def _rebuild_input(self, action: ActionDecl, inputs: Mapping[str, Sequence[InputArtifact]],
                       lost: LostBlobError) -> str:
        """Rebuild the input of ``action`` that holds the lost blob; returns its path.
        Re-raises ``lost`` when no input holds it (an action kind read a blob it did not
        get as an input: nothing can be rewound)."""
        with self._rewind_lock:
            for arts in inputs.values():
                for art in arts:
                    if not self._contains(art, lost.digest):
                        continue
                    if self.input_artifact_by_path(art.path) != art or self.store.has_blob(lost.digest):
                        return art.path  # another reader rebuilt it meanwhile
                    self._rebuild(art.path, lost)
                    return art.path
        raise lost

    def input_artifact_by_path(self, path: str) -> InputArtifact | None:
        producer = self.producers.get(path)
        if producer is None:
            src = self.sources.get(path)
            return InputArtifact(path, src.digest, False, src.size, src.executable, src.symlink)
        value = self.values.get(path)
        return None if value is None else InputArtifact(path, value.digest, value.is_tree, value.size,
                                                        value.executable)

    def _rebuild(self, path: str, lost: LostBlobError) -> None:
        """Put the lost blob of artifact ``path`` back: read the source again, or find the
        action upstream that first wrote the blob and run it again (the actions between
        it and ``path`` run again only when the bytes it writes are new)."""
        digest = lost.digest
        what = "missing" if isinstance(lost, MissingBlobError) else "corrupt"
        producer = self.producers.get(path)
        if producer is None:
            if path.startswith("dtbuild-out/"):
                raise lost  # no action of this build writes it
            # Sources are read in place: tell the store again where this one is (a copy
            # of it in the cache, left by an older dtbuild, may be what was corrupt).
            src = self.sources.get(path)
            if src.symlink is not None or src.digest != digest:
                raise SourceChangedError(path, digest)
            self.stats.rewound += 1
            package, name = os.path.split(path)
            self.report("dtbuild_action_log", label=f"//{package}:{name}", mnemonic="Source",
                        message=f"corrupt cache entry rebuilt: blob {digest[:12]}… of source {path} was {what} "
                                "in the cache; it was read again from the workspace")
            self.store.register_source(digest, os.path.join(self.root, path), src.size, path)
            return
        upstream = next((art for arts in producer.inputs.values() for art in arts
                         if self._contains(self.input_artifact(art), digest)), None)
        if upstream is not None:
            self._rebuild(upstream.path, lost)
            if self.store.has_blob(digest):
                return  # written again upstream: every tree that names it is whole again
        self.stats.rewound += 1
        self.report("dtbuild_action_log", label=producer.owner, mnemonic=producer.mnemonic,
                    message=f"corrupt cache entry rebuilt: blob {digest[:12]}… of {path} was {what} in the "
                            f"cache; {producer.mnemonic} ran again to write it")
        self._produce(producer, rerun=True)

    def _contains(self, artifact: InputArtifact | OutputValue, digest: str) -> bool:
        """Whether ``digest`` is the artifact's blob, or a node or file of its tree."""
        if artifact.digest == digest:
            return True
        if not artifact.is_tree:
            return False
        stack = [artifact.digest]
        while stack:
            try:
                node = self.store.read_directory(stack.pop())
            except LostBlobError as e:
                if e.digest == digest:
                    return True
                continue
            if any(f["digest"] == digest for f in node["files"]):
                return True
            stack.extend(d["digest"] for d in node["directories"])
        return False

    def _still_wrong(self, lost: LostBlobError, path: str, reader: ActionDecl | None) -> StoreError:
        producer = self.producers.get(path)
        made_by = f"{producer.mnemonic} of {producer.owner}" if producer else f"the source {path}"
        by = f"{reader.mnemonic} of {reader.owner}" if reader else "the output tree"
        return StoreError(
            f"blob {lost.digest} ({path}) was wrong again when {by} read it from the cache at {self.store.root}, "
            f"even after {made_by} wrote it again", hint="something damages the cache: check the disk (dmesg) "
            "and what else writes there, or move the cache with DTBUILD_CACHE_DIR")

    def _execute(self, action: ActionDecl, kind: ActionKind, inputs: dict[str, list[InputArtifact]]
                 ) -> tuple[ActionResult, bool]:
        """Run the action; (its result, whether its commands ran on the remote executor)."""
        work_dir = self.store.temp_path("action")
        os.makedirs(work_dir, mode=0o700)  # an action's files are no other user's business
        ctx = ActionContextImpl(self, action, inputs, work_dir)
        try:
            try:
                kind.run(ctx)
            except Exception as e:
                # A corrupt input can make an action kind fail in its own way before it
                # reads to the end: the check of what it read comes first.
                lost = ctx.check_reads()
                if lost is not None:
                    raise lost from None
                error = self._action_error(action, e, work_dir)
                if error is e:
                    raise
                raise error from e
            lost = ctx.check_reads()
            if lost is not None:
                raise lost
            if self.cancel.is_set():
                raise Interrupted("interrupted")
            outputs: dict[str, OutputValue] = {}
            for slot, art in action.outputs.items():
                if slot in ctx.direct_outputs:
                    outputs[slot] = ctx.direct_outputs[slot]
                    continue
                path = ctx.output_path(slot)
                if art.is_tree:
                    if not os.path.isdir(path):
                        raise ActionFailed(f"did not create declared output directory {art.path}")
                    digest, total = self.store.put_tree_from_dir(path)
                    outputs[slot] = OutputValue(digest, total, True)
                else:
                    if not os.path.isfile(path) or os.path.islink(path):
                        raise ActionFailed(f"did not create declared output file {art.path}")
                    executable = bool(os.stat(path).st_mode & 0o100)
                    digest, size = self.store.put_file(path)
                    outputs[slot] = OutputValue(digest, size, False, executable)
            meta: dict[str, Any] = {"mnemonic": action.mnemonic}
            used = {registry: dict(names) for registry, names in ctx.used.items()}
            for registry, names in self.plugins.uses_of(action).items():
                used.setdefault(registry, {}).update(names)
            if used:
                meta["uses"] = used
            return ActionResult(outputs, meta), ctx.ran_remotely
        finally:
            ctx.abort_streams()
            remove_tree(work_dir)

    def _action_error(self, action: ActionDecl, e: Exception, work_dir: str) -> BaseException:
        """What an exception from an action kind's run() is reported as."""
        if isinstance(e, ActionFailed | StoreError):
            return e  # its own words (a full disk, a blob lost for good)
        if self.cancel.is_set():
            return Interrupted("interrupted")
        if isinstance(e, OSError):
            full = disk_error(e, f"the outputs of {action.mnemonic}", e.filename or work_dir)
            if full is not None:
                return full
        if isinstance(e, BuildFailure | OSError):
            return ActionFailed(f"{type(e).__name__}: {e}")
        tb = traceback.format_exc() if self.debug else ""
        return ActionFailed(f"internal error in action kind {action.mnemonic}: {type(e).__name__}: {e}",
                            output_tail=tb)

    # ------------------------------------------------------------------ the schedule

    def run(self, actions: Sequence[ActionDecl], producers: Mapping[str, ActionDecl]) -> None:
        """Run ``actions`` (in dependency order as given). Raises the first failure
        (with ``keep_going``: after running everything that does not depend on it)."""
        self.producers = producers
        index = {id(a): i for i, a in enumerate(actions)}
        deps: list[set[int]] = [set() for _ in actions]
        dependents: list[list[int]] = [[] for _ in actions]
        for i, action in enumerate(actions):
            for arts in action.inputs.values():
                for art in arts:
                    producer = producers.get(art.path)
                    if producer is not None and id(producer) in index:
                        j = index[id(producer)]
                        if j not in deps[i]:
                            deps[i].add(j)
                            dependents[j].append(i)
        waiting = [len(d) for d in deps]
        #: Actions whose inputs are known, to check against the cache (in order).
        ready = collections.deque(i for i, n in enumerate(waiting) if n == 0)
        #: Actions to hand to workers: (-priority, index), the longest remaining path first.
        to_run: list[tuple[float, int]] = []
        prepared: dict[int, _Prepared] = {}
        priority: dict[int, float] | None = None
        work: queue.Queue[tuple[int, _Prepared | None] | None] = queue.Queue()
        done: queue.Queue[tuple[int, ActionOutcome]] = queue.Queue()
        failures: list[ActionOutcome] = []
        blocked: set[int] = set()
        finished: list[int] = []
        finished_outcomes: list[tuple[int, ActionOutcome]] = []
        threads: list[threading.Thread] = []
        stop = False

        def worker() -> None:
            while True:
                item = work.get()
                if item is None:
                    return
                i, prep = item
                action = actions[i]
                try:
                    outcome = self.process(action, prep)
                except BaseException as e:  # reported to the scheduler, never lost
                    outcome = ActionOutcome(action, "failed", error=e)
                done.put((i, outcome))

        def finish(i: int, outcome: ActionOutcome) -> None:
            nonlocal stop
            finished.append(i)
            finished_outcomes.append((i, outcome))
            self.outcomes.append(outcome)
            action = actions[i]
            if outcome.status == "failed":
                self.stats.failed += 1
                failures.append(outcome)
                self.report("dtbuild_action_finished", label=action.owner, mnemonic=action.mnemonic,
                            description=action.description, status="failed", seconds=outcome.seconds)
                self._block_dependents(i, dependents, blocked)
                if not isinstance(outcome.error, Interrupted | KeyboardInterrupt):
                    error = self._failure_error(outcome, 1)
                    self.errors.append(error)
                    self.observe("action_failed", action, error=error)
                if not self.keep_going or isinstance(outcome.error, Interrupted | KeyboardInterrupt):
                    stop = True
                return
            setattr(self.stats, outcome.status, getattr(self.stats, outcome.status) + 1)
            self.observe("action_key", action, key=outcome.key)
            self.report("dtbuild_action_finished", label=action.owner, mnemonic=action.mnemonic,
                        description=action.description, status=outcome.status, seconds=outcome.seconds)
            for j in dependents[i]:
                waiting[j] -= 1
                if waiting[j] == 0 and j not in blocked:
                    ready.append(j)

        running = 0
        try:
            while True:
                while ready and not stop and not self.cancel.is_set():
                    i = ready.popleft()
                    outcome, prep = self._hit_inline(actions[i])
                    if outcome is not None:
                        finish(i, outcome)
                        continue
                    if prep is not None:
                        prepared[i] = prep
                    if priority is None:  # the first action that may have to run
                        settled = set(finished) | blocked
                        priority = self._priorities(actions, dependents, [j for j in range(len(actions))
                                                                          if j not in settled])
                    heapq.heappush(to_run, (-priority.get(i, 1.0), i))
                while to_run and running < self.workers and not stop and not self.cancel.is_set():
                    if not threads:
                        count = min(self.workers, max(1, len(actions) - len(finished) - len(blocked)))
                        threads = [threading.Thread(target=worker, daemon=True, name=f"dtbuild-worker-{n}")
                                   for n in range(count)]
                        for t in threads:
                            t.start()
                    _, i = heapq.heappop(to_run)
                    work.put((i, prepared.pop(i, None)))
                    running += 1
                if running == 0:
                    break
                try:
                    i, outcome = done.get(timeout=0.1)
                except queue.Empty:
                    if self.cancel.is_set() and not stop:
                        stop = True
                    continue
                running -= 1
                finish(i, outcome)
        finally:
            for _ in threads:
                work.put(None)
        self.stats.skipped = len(blocked)
        self.stats.critical_path = self._critical_path(actions, deps, finished_outcomes)
        if self.cancel.is_set():
            raise Interrupted("interrupted: the build was stopped; nothing partial was kept",
                              hint="run the same command again to finish the build")
        if failures:
            raise self._failure_error(failures[0], len(failures))
        if not stop and len(finished) + len(blocked) < len(actions):
            settled = set(finished) | blocked
            raise self._cycle_error(actions, dependents, [j for j in range(len(actions)) if j not in settled])

    def _graph(self, actions: Sequence[ActionDecl], dependents: list[list[int]], nodes: list[int]) -> Any:
        """The networkx DiGraph of ``nodes`` (edges: producer -> consumer)."""
        import networkx as nx  # only when there is work to run: a no-op build never pays the import

        graph: nx.DiGraph[int] = nx.DiGraph()
        graph.add_nodes_from(nodes)
        members = set(nodes)
        graph.add_edges_from((i, j) for i in nodes for j in dependents[i] if j in members)
        return graph

    def _priorities(self, actions: Sequence[ActionDecl], dependents: list[list[int]],
                    nodes: list[int]) -> dict[int, float]:
        """Each action's longest remaining path (itself and what waits for it), weighted
        by how long each action took when it last ran (unknown: one second)."""
        import networkx as nx

        graph = self._graph(actions, dependents, nodes)
        try:
            order = list(nx.topological_sort(graph))
        except nx.NetworkXUnfeasible:
            raise self._cycle_error(actions, dependents, nodes) from None
        durations = self._durations()
        priority: dict[int, float] = {}
        for i in reversed(order):
            own = durations.get(action_id(actions[i]), 1.0)
            priority[i] = own + max((priority[j] for j in graph.successors(i)), default=0.0)
        return priority

    def _cycle_error(self, actions: Sequence[ActionDecl], dependents: list[list[int]],
                     nodes: list[int]) -> CycleError:
        """Analysis refuses dependency cycles, so this names a bug in whatever declared
        the actions: the cycle, action by action."""
        import networkx as nx

        graph = self._graph(actions, dependents, nodes)
        try:
            edges = nx.find_cycle(graph)
        except nx.NetworkXNoCycle:
            edges = []
        path = [actions[i] for i, _ in edges] + [actions[edges[0][0]]] if edges else []
        text = " -> ".join(f"{a.mnemonic} of {a.owner}" for a in path) or "(none found)"
        return CycleError(f"action dependency cycle: {text}",
                          hint="analysis should have refused it: report it with the BUILD files involved")

    @staticmethod
    def _critical_path(actions: Sequence[ActionDecl], deps: list[set[int]],
                       finished: Sequence[tuple[int, ActionOutcome]]) -> list[CriticalStep]:
        """The chain of dependent actions whose executions took longest (cache hits weigh
        nothing and are left out). ``finished`` is in the order actions finished, which
        puts every action after what it depends on."""
        longest: dict[int, float] = {}
        before: dict[int, int | None] = {}
        outcomes = dict(finished)
        for i, outcome in finished:
            own = outcome.seconds if outcome.status in RAN else 0.0
            upstream = max((j for j in deps[i] if j in longest), key=longest.__getitem__, default=None)
            longest[i] = own + (longest[upstream] if upstream is not None else 0.0)
            before[i] = upstream
        if not longest:
            return []
        steps: list[CriticalStep] = []
        at: int | None = max(longest, key=longest.__getitem__)
        while at is not None:
            outcome = outcomes[at]
            if outcome.status in RAN:
                steps.append(CriticalStep(actions[at].owner, actions[at].mnemonic, outcome.seconds))
            at = before[at]
        steps.reverse()
        return steps

    def _block_dependents(self, i: int, dependents: list[list[int]], blocked: set[int]) -> None:
        stack = list(dependents[i])
        while stack:
            j = stack.pop()
            if j not in blocked:
                blocked.add(j)
                stack.extend(dependents[j])

    def _failure_error(self, outcome: ActionOutcome, count: int) -> BuildFailure:
        err = outcome.error
        action = outcome.action
        location = self.locations.get(action.owner)
        rule = self.kinds.get(action.owner)
        more = f" ({count - 1} more action(s) failed too)" if count > 1 else ""
        if isinstance(err, ActionFailed):
            detail = []
            if err.command:
                detail.append(f"command: {err.command}")
            if err.output_tail:
                detail.append("--- output (last lines) ---\n" + err.output_tail.rstrip() + "\n---")
            return ActionError(f"{action.mnemonic} failed: {err}{more}", location=location, target=action.owner,
                               rule=rule, detail="\n".join(detail) or None)
        if isinstance(err, BuildFailure):
            if err.location is None:
                err.location = location
                err.target = action.owner
                err.rule = rule
            return err
        if isinstance(err, KeyboardInterrupt):
            return Interrupted("interrupted")
        tb = "".join(traceback.format_exception(err)) if self.debug and err else None
        return ActionError(f"{action.mnemonic} failed: {type(err).__name__}: {err}{more}",
                           location=location, target=action.owner, rule=rule, detail=tb,
                           hint=None if self.debug else "run with --debug for the traceback")



__all__ = ["ActionContextImpl", "ActionRunner", "CriticalStep", "ExecutionStats", "PluginItems", "action_id",
           "action_key", "build_tree"]
