"""A build session: one workspace, its plugins, loader and analysis, and the build of a
set of targets through the store and the action runner."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from dtbuild.engine.analysis import AnalysisResult, Analyzer
from dtbuild.engine.errors import BuildFailure, CycleError, DtbuildError, Interrupted, PluginError
from dtbuild.engine.execution import RAN, ActionRunner, ExecutionStats, PluginItems, action_id, action_key
from dtbuild.engine.labels import Label, parse_pattern
from dtbuild.engine.load import Loader
from dtbuild.engine.plugin_manager import collect_registry, make_plugin_manager, plugin_distributions
from dtbuild.engine.sources import SourceDigests
from dtbuild.engine.state import StateDB
from dtbuild.engine.store import Store
from dtbuild.engine.workspace import Workspace
from dtbuild.plugins.interfaces import ActionFailed, InputArtifact
from dtbuild.rules.api import ActionDecl


@dataclass
class BuildOptions:
    jobs: int = 0  # 0: the number of cores
    keep_going: bool = False
    debug: bool = False
    #: Told each action's command, cache key and failure as they happen (the command
    #: line's console; see ActionRunner.observe), or None.
    observer: Any = None


@dataclass
class BuildResult:
    labels: list[Label]
    stats: ExecutionStats
    outputs: dict[str, list[str]] = field(default_factory=dict)  # label -> workspace-relative paths
    #: label -> summary fields plugins gave (dtbuild_describe_target), such as an image's manifest_digest.
    described: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: DtbuildError | None = None
    #: Every error, in the order they happened: each failed action's own (with
    #: --keep-going, more than one; ``error`` sums them up), then any other.
    errors: list[DtbuildError] = field(default_factory=list)
    #: BUILD files evaluated by Starlark in this process and packages taken from the
    #: package cache.
    packages: dict[str, int] = field(default_factory=lambda: {"evaluated": 0, "cached": 0})
    #: The remote cache and executor used, and what moved (None without a remote).
    remote: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        # manifest_digest is a field of every target in SPEC's summary (null unless a
        # plugin, the image plugin, says otherwise).
        path = self.stats.critical_path
        return {
            "targets": {label: {"outputs": paths, "manifest_digest": None, **self.described.get(label, {})}
                        for label, paths in sorted(self.outputs.items())},
            "actions": {"executed": self.stats.executed, "cached": self.stats.cached,
                        "remote_cached": self.stats.remote_cached, "remote_executed": self.stats.remote_executed,
                        "failed": self.stats.failed,
                        # Only when it happened: cache entries found corrupt and rebuilt.
                        **({"rewound": self.stats.rewound} if self.stats.rewound else {})},
            "packages": dict(self.packages),
            **({"remote": dict(self.remote)} if self.remote is not None else {}),
            # The chain of dependent executed actions that took longest.
            "critical_path": {"seconds": round(sum(step.seconds for step in path), 3),
                              "actions": [{"label": step.label, "mnemonic": step.mnemonic,
                                           "seconds": round(step.seconds, 3)} for step in path]},
        }


class Session:
    def __init__(self, workspace: Workspace, *, blocked: Sequence[str] = (),
                 extra_plugins: Sequence[tuple[str, object]] = ()) -> None:
        self.workspace = workspace
        self.pm = make_plugin_manager(blocked=blocked, workspace_root=workspace.root,
                                      workspace_modules=workspace.plugin_modules(), extra_plugins=extra_plugins)
        self.registry = collect_registry(self.pm)
        rules = dict(self.registry.get("rules"))
        for name, digest in self.registry.versions.get("rules", {}).items():
            rule = rules[name]
            rules[name] = type(rule)(rule.name, rule.impl, rule.attrs, rule.doc, f"{rule.version}+{digest}")
        import hashlib

        from dtbuild.engine.package_cache import PackageCache, environment_key
        from dtbuild.engine.plugin_manager import dtbuild_version

        # What loading and analysis depend on besides the workspace's files: a change
        # to any of it evaluates (and analyses) again what it may have changed.
        fingerprints = self.registry.fingerprints(plugin_distributions(self.pm))
        names = self.registry.names()
        environment = environment_key(root=workspace.root, config=workspace.config,
                                      dtbuild_version=dtbuild_version(), rule_names=rules,
                                      registry_names=names, build_globals=self.registry.build_globals)
        self._analysis_key = hashlib.sha256(repr((environment, sorted(
            (registry, sorted(versions.items())) for registry, versions in fingerprints.items()))).encode()).hexdigest()
        self.package_cache = PackageCache(workspace.root, workspace.state_dir, workspace.cache_dir(), environment)
        self.loader = Loader(workspace, rules, self.registry.build_globals, names, cache=self.package_cache,
                             rule_versions=fingerprints.get("rules", {}))
        self._analyzer: Analyzer | None = None

    # ------------------------------------------------------------------ patterns and analysis

    def cwd_package(self) -> str | None:
        return self.workspace.package_of(os.getcwd())

    def expand(self, patterns: Sequence[str], *, include_manual: bool = False) -> list[Label]:
        """The labels of command-line patterns, in order, each once. ``//...`` and ``:all``
        leave out targets tagged "manual" unless ``include_manual`` (query keeps them)."""
        from dtbuild.engine.package_cache import collection_paused

        current = self.cwd_package()
        labels: list[Label] = []
        seen: set[Label] = set()
        with collection_paused():
            for text in patterns:
                for label in self.loader.expand(parse_pattern(text, current), include_manual=include_manual):
                    if label not in seen:
                        seen.add(label)
                        labels.append(label)
        return labels

    @property
    def analyzer(self) -> Analyzer:
        if self._analyzer is None:
            self._analyzer = Analyzer(self.loader, self.registry.names())
        return self._analyzer

    def analyze(self, labels: Sequence[Label]) -> AnalysisResult:
        """The analysis of ``labels``: restored from the analysis memo when every package
        it used is unchanged, else computed (unchanged packages from the package cache)
        and remembered."""
        from dtbuild.engine.package_cache import collection_paused

        with collection_paused(analysis=True):
            analyzer = self.analyzer
            wanted = [str(label) for label in labels]
            if not analyzer.result.targets:
                restored = self.package_cache.restore_analysis(
                    self._analysis_key, wanted, self.loader.package_digest, analyzer.sources_usable,
                    analyzer.output_dirs_usable)
                if isinstance(restored, AnalysisResult) and all(label in restored.targets for label in labels):
                    analyzer.adopt(restored, wanted)
                    self.loader.save_cache()  # signatures found changed with the same digests
                    return restored
            known = len(analyzer.result.targets)
            try:
                result = analyzer.analyze(labels)
            finally:
                self.loader.save_cache()
            if len(result.targets) != known:
                digests = self.loader.loaded_package_digests()
                packages = {name: digest for name, digest in digests.items() if digest is not None}
                if len(packages) == len(digests):  # every package it used is one the cache can check
                    self.package_cache.remember_analysis(
                        self._analysis_key, analyzer.requested, packages, analyzer.sources_checked,
                        analyzer.output_dirs_checked, result)
            return result

    # ------------------------------------------------------------------ building

    def store(self) -> Store:
        return Store(self.workspace.cache_dir())

    def plugin_items(self) -> PluginItems:
        kinds = dict(self.registry.get("action_kinds"))
        for name, digest in self.registry.versions.get("action_kinds", {}).items():
            cls = kinds[name]
            kinds[name] = type(cls.__name__, (cls,), {"VERSION": f"{cls.VERSION}+{digest}"})
        executors = dict(self.registry.get("executors"))
        settings = self.workspace.settings()
        if "remote" not in executors and settings.setting("remote", "executor"):
            from dtbuild.engine.remote.executor import RemoteExecutor

            executors["remote"] = RemoteExecutor  # the engine's own; a plugin's "remote" replaces it
        return PluginItems(kinds, executors, dict(self.registry.get("compressors")),
                           self.pm.hook, fingerprints=self.registry.fingerprints(plugin_distributions(self.pm)),
                           workspace_root=self.workspace.root, cache_dir=self.workspace.cache_dir(),
                           settings=settings,
                           layer_kinds=dict(self.registry.get("layer_kinds")))

    @property
    def state(self) -> StateDB:
        """The workspace's state database (results index, explain record, source memo)."""
        found: StateDB | None = getattr(self, "_state", None)
        if found is None:
            # Bound to the key that signs the package cache: another user's database is foreign.
            found = self._state = StateDB(self.workspace.state_dir, self.package_cache.key)
        return found

    def _save_results_index(self, runner: ActionRunner, store: Store) -> None:
        """Remember this build's results under the generation their outputs were found
        present in (only rows that changed are written; the least recently used go past
        the index's bound). The store is flushed first: the index trusts what it names."""
        now = time.time()
        changed = []
        for key, result in runner.used_results.items():
            if key in runner.trusted_results and runner.known_results.get(key) == result:
                continue
            used = now if key in runner.marked_now else runner.marked_used.get(key, now)
            changed.append((key, result, runner.generation, used))
        if changed or runner.stats.executed or runner.stats.remote_executed or runner.stats.remote_cached:
            store.make_durable()  # once per build
        self.state.put_results(changed)
        rewritten = {row[0] for row in changed}
        self.state.mark_results_used([k for k in runner.marked_now if k not in rewritten], now)

    def _runner(self, store: Store, options: BuildOptions, cancel: threading.Event) -> ActionRunner:
        decls = {str(t.decl.label): t.decl for t in self.analyzer.result.targets.values()}
        generation = store.generation()  # before any result is trusted under it
        index = self.state.results()
        state = self.state
        plugins = self.plugin_items()
        remote, remote_executor = self._remote(store, plugins)
        runner = ActionRunner(
            root=self.workspace.root, store=store,
            sources=SourceDigests(self.workspace.root, self.workspace.state_dir, state),
            plugins=plugins, jobs=options.jobs or os.cpu_count() or 1, keep_going=options.keep_going,
            cancel=cancel, locations={k: d.location for k, d in decls.items()},
            kinds={k: d.kind for k, d in decls.items()}, debug=options.debug,
            known_results={k: v.result for k, v in index.items()},
            trusted_results={k for k, v in index.items() if v.generation == generation},
            marked_used={k: v.used for k, v in index.items()}, durations=state.durations,
            generation=generation, remote=remote, remote_executor=remote_executor, observer=options.observer)
        return runner

    def _remote(self, store: Store, plugins: PluginItems) -> tuple[Any, str | None]:
        """The build's remote cache (or None) and the remote executor's URL (or None).

        :raises WorkspaceError: for bad [remote] settings or flags.
        """
        settings = self.workspace.settings()
        remote = settings.section("remote")
        if not (remote.get("cache") or remote.get("executor")):
            return None, None  # without importing engine.remote: a no-op build pays nothing for it
        from dtbuild.engine.remote.config import remote_config

        config = remote_config(settings)
        cache = None
        if config.cache is not None:
            from dtbuild.engine.remote import open_transport
            from dtbuild.engine.remote.cache import RemoteCache

            cache = RemoteCache(open_transport(config.cache), store, upload=config.upload, warn=plugins.warn)
        return cache, config.executor.url if config.executor is not None else None

    @staticmethod
    def _finish_remote(runner: ActionRunner, result: BuildResult | None) -> None:
        """Wait for the uploads and put what moved into the summary."""
        remote = runner.remote
        if remote is not None:
            remote.finish()
        if result is None or (remote is None and not runner.remote_executor):
            return
        result.remote = {
            "cache": remote.url if remote is not None else None,
            "executor": runner.remote_executor,
            "downloaded_bytes": remote.stats.downloaded_bytes if remote is not None else 0,
            "uploaded_bytes": remote.stats.uploaded_bytes if remote is not None else 0,
            "uploaded_results": remote.stats.uploaded_results if remote is not None else 0,
            "warnings": list(remote.warnings) if remote is not None else [],
        }

    def _save_state(self, runner: ActionRunner, store: Store, actions: Sequence[ActionDecl]) -> None:
        """What a build leaves for the next one: source digests, the results index (after
        one flush of the store), the explain record and the durations of what ran."""
        runner.sources.save()
        self._save_results_index(runner, store)
        self._record_inputs(runner, actions)
        self.state.put_durations((action_id(o.action), o.seconds) for o in runner.outcomes
                                 if o.status in RAN)

    def build(self, labels: Sequence[Label], options: BuildOptions, cancel: threading.Event) -> BuildResult:
        """Build ``labels``; outputs of requested targets are copied under dtbuild-out/."""
        from dtbuild.engine.outputs import OutputTree

        analysis = self.analyze(labels)
        actions = analysis.actions_for(labels)
        store = self.store()
        with self.workspace_lock(), store.lock():
            store.clean_stale_temps()
            runner = self._runner(store, options, cancel)
            result = BuildResult(list(labels), runner.stats)
            self.pm.hook.dtbuild_build_started(targets=[str(lb) for lb in labels], total_actions=len(actions))
            loader_stats = getattr(self.loader, "stats", None)
            if isinstance(loader_stats, Mapping):
                result.packages = {"evaluated": int(loader_stats.get("evaluated", 0)),
                                   "cached": int(loader_stats.get("cached", 0))}
            try:
                runner.run(actions, analysis.producers)
            except DtbuildError as e:
                result.error = e
                # ``e`` sums up the failed actions' errors, unless it is an error of its own.
                result.errors = [*runner.errors, *([e] if not runner.errors or isinstance(e, Interrupted | CycleError)
                                                   else [])]
            finally:
                self._finish_remote(runner, result)
                self._save_state(runner, store, actions)
            # Every requested target whose outputs exist gets them (all of them, or with
            # --keep-going those that do not depend on a failure).
            tree = OutputTree(self.workspace, store)
            tree.remove_stale_temps(art.path for label in labels for art in analysis.targets[label].default_outputs)
            try:
                for label in labels:
                    target = analysis.targets[label]
                    if any(art.path not in runner.values for art in target.default_outputs):
                        continue
                    paths = []
                    for art in target.default_outputs:
                        # A blob found corrupt while it is copied is rebuilt, then copied again.
                        runner.read_output(art.path, functools.partial(tree.materialize, art.path))
                        paths.append(art.path)
                    result.outputs[str(label)] = paths
                    described = self.describe_target(label, target.providers, runner, store)
                    if described:
                        result.described[str(label)] = described
            except DtbuildError as e:  # a full disk, a blob wrong again after its rebuild
                result.error = result.error or e
                result.errors.append(e)
            finally:
                tree.save()
            self.pm.hook.dtbuild_build_finished(summary=result.summary(), success=result.error is None)
        self.last_runner = runner
        return result

    def build_artifacts(self, label: Label, paths: Sequence[str], options: BuildOptions,
                        cancel: threading.Event) -> list[InputArtifact]:
        """Build just what the artifacts ``paths`` of ``label`` (provider fields, such as an
        image's tree) need, not the target's other outputs, and return them as store-held
        input artifacts. Nothing is copied under dtbuild-out/.

        :raises UsageError: when ``label`` declares no such artifact.
        """
        from dtbuild.engine.errors import UsageError

        analysis = self.analyze([label])
        unknown = [p for p in paths if p not in analysis.producers]
        if unknown:
            raise UsageError(f"{label} has no built artifact {', '.join(unknown)}",
                             hint="ask for files its providers name")
        needed = analysis.actions_for_artifacts(list(paths))
        store = self.store()
        with self.workspace_lock(), store.lock():
            runner = self._runner(store, options, cancel)
            self.pm.hook.dtbuild_build_started(targets=[str(label)], total_actions=len(needed))
            finished = False
            try:
                runner.run(needed, analysis.producers)
                finished = True
            finally:
                self._finish_remote(runner, None)
                self._save_state(runner, store, needed)
                self.pm.hook.dtbuild_build_finished(summary=BuildResult([label], runner.stats).summary(),
                                                    success=finished)
        self.last_runner = runner
        values = [runner.values[p] for p in paths]
        return [InputArtifact(p, v.digest, v.is_tree, v.size, v.executable) for p, v in zip(paths, values, strict=True)]

    def workspace_lock(self) -> contextlib.AbstractContextManager[None]:
        return workspace_lock(self.workspace)

    def describe_target(self, label: Label, providers: Mapping[type, Any], runner: ActionRunner,
                        store: Store) -> dict[str, Any]:
        """The summary fields plugins give a built target (``dtbuild_describe_target``),
        merged; a field given twice, or ``outputs``, is a plugin error."""
        def read_output(artifact: Any) -> bytes:
            return runner.read_output(artifact.path, lambda value: store.read_blob(value.digest))

        merged: dict[str, Any] = {}
        owners: dict[str, str] = {}
        for impl in self.pm.hook.dtbuild_describe_target.get_hookimpls():  # registration order
            name = self.pm.get_name(impl.plugin) or repr(impl.plugin)
            try:
                fields = impl.function(label=str(label), providers=providers, read_output=read_output)
            except ActionFailed as e:
                raise BuildFailure(str(e), target=str(label)) from None
            # pluggy types every hook result as object; the hookspec says it is a mapping.
            for key, value in dict(cast("Mapping[str, Any]", fields or {})).items():
                if key == "outputs" or key in owners:
                    first = "the engine" if key == "outputs" else f"plugin '{owners[key]}'"
                    raise PluginError(f"two plugins give the summary field '{key}' of {label}: {first} and "
                                      f"plugin '{name}'", hint=f"block one of them (-p no:{name})")
                merged[key] = value
                owners[key] = name
        return merged

    # ------------------------------------------------------------------ explain

    def _record_inputs(self, runner: ActionRunner, actions: Sequence[ActionDecl]) -> None:
        """Record the inputs of each action whose key is not the one recorded (for
        ``explain``); a no-op build writes nothing."""
        recorded = self.state.input_keys()
        rows = []
        for outcome in runner.outcomes:
            if outcome.status == "failed":
                continue
            action = outcome.action
            aid = action_id(action)
            if outcome.status != "executed" and recorded.get(aid) == outcome.key:
                continue
            kind = runner.kind_for(action)
            inputs = {slot: [[a.path, a.digest] for a in map(runner.input_artifact, arts)]
                      for slot, arts in action.inputs.items()}
            entry = {"key": outcome.key, "inputs": inputs, "params": dict(action.params),
                     "version": [kind.VERSION, action.rule_version]}
            if action.uses:
                entry["uses"] = runner.plugins.uses_of(action)
            rows.append((aid, entry))
        self.state.put_inputs(rows)

    def explain(self, labels: Sequence[Label]) -> list[str]:
        """For each action the build would need: whether it would run, and why."""
        analysis = self.analyze(labels)
        actions = analysis.actions_for(labels)
        store = self.store()
        runner = self._runner(store, BuildOptions(), threading.Event())
        will_run: set[str] = set()
        lines = []
        plugins = runner.plugins
        for action in actions:
            upstream = sorted({analysis.producers[a.path].owner for arts in action.inputs.values() for a in arts
                               if not a.is_source and a.path in will_run})
            if upstream:
                lines.append(f"{action.description}: would run, because {', '.join(upstream)} will be rebuilt "
                             "(it runs again only if that output changes)")
                will_run.update(a.path for a in action.outputs.values())
                continue
            kind = runner.kind_for(action)
            inputs = {slot: [runner.input_artifact(a) for a in arts] for slot, arts in action.inputs.items()}
            key = action_key(action, kind.VERSION, inputs, plugins.uses_of(action))
            cached = store.get_action(key)
            stale = runner.stale_uses(cached) if cached is not None else []
            if cached is not None and not stale and runner.reusable(cached, action):
                for slot, art in action.outputs.items():
                    runner.values[art.path] = cached.outputs[slot]
                lines.append(f"{action.description}: cached")
                continue
            remote = runner.remote
            found = remote.peek(key, set(action.outputs)) if remote is not None and action.cacheable else None
            if remote is not None and found is not None:
                for slot, art in action.outputs.items():
                    runner.values[art.path] = found[slot]
                lines.append(f"{action.description}: from the remote cache {remote.url}")
                continue
            will_run.update(a.path for a in action.outputs.values())
            why = (f"a plugin it uses changed: {', '.join(stale)}" if stale
                   else self._why(action, kind.VERSION, inputs, plugins.uses_of(action),
                                  self.state.input_record(action_id(action))))
            lines.append(f"{action.description}: would run, because {why}")
        runner.sources.save()
        if runner.remote is not None:
            runner.remote.finish()
        return lines

    def _why(self, action: ActionDecl, kind_version: str, inputs: dict[str, list[Any]],
             uses: dict[str, dict[str, str]], last: dict[str, Any] | None) -> str:
        if last is None:
            return "it has never been built in this workspace"
        try:
            return self._changes(action, kind_version, inputs, uses, last)
        except (AttributeError, KeyError, TypeError, ValueError):  # a record of another shape
            return "its previous result is no longer in the cache (the record of its last build is unreadable)"

    @staticmethod
    def _changes(action: ActionDecl, kind_version: str, inputs: dict[str, list[Any]],
                 uses: dict[str, dict[str, str]], last: dict[str, Any]) -> str:
        reasons = []
        uses_before = last.get("uses")
        last_uses: dict[str, Any] = uses_before if isinstance(uses_before, dict) else {}
        for registry, names in sorted(uses.items()):
            for name, version in sorted(names.items()):
                before = (last_uses.get(registry) or {}).get(name)
                if before is not None and before != version:
                    reasons.append(f"{registry.removesuffix('s').replace('_', ' ')} '{name}' changed "
                                   f"(version {before} -> {version})")
        if last["version"] != [kind_version, action.rule_version]:
            version_now = [kind_version, action.rule_version]
            reasons.append(f"the implementation changed (version {last['version']} -> {version_now})")
        if last["params"] != json.loads(json.dumps(dict(action.params))):
            changed = sorted(k for k in set(last["params"]) | set(action.params)
                             if last["params"].get(k) != action.params.get(k))
            reasons.append(f"its parameters changed ({', '.join(changed)})")
        for slot, arts in sorted(inputs.items()):
            before = {p: d for p, d in last["inputs"].get(slot, [])}
            now = {a.path: a.digest for a in arts}
            for p in sorted(set(before) | set(now)):
                if p not in before:
                    reasons.append(f"input {p} was added")
                elif p not in now:
                    reasons.append(f"input {p} was removed")
                elif before[p] != now[p]:
                    reasons.append(f"input {p} changed (sha256 {before[p][:12]} -> {now[p][:12]})")
        return "; ".join(reasons) or "its previous result is no longer in the cache"



@contextlib.contextmanager
def workspace_lock(workspace: Workspace) -> Iterator[None]:
    """One command that writes dtbuild-out/ or the state at a time per workspace (like
    Bazel's output base lock); others wait."""
    from dtbuild.engine.outputs import make_dirs

    make_dirs(workspace.state_dir)
    fd = os.open(os.path.join(workspace.state_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("dtbuild: another dtbuild command is running in this workspace; waiting for it",
                  file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class StoreReader:
    """Read access to store-held trees for code that runs outside an action (plugin
    commands such as ``stream`` and ``inspect``): the ``inputs``/``walk_tree``/``open_blob``
    part of an ActionContext (:class:`dtbuild.plugins.interfaces.StoreTreeReader`)."""

    def __init__(self, store: Store, inputs: Mapping[str, Sequence[InputArtifact]] | None = None) -> None:
        self.store = store
        self._inputs = {name: list(arts) for name, arts in (inputs or {}).items()}

    def inputs(self, name: str) -> list[InputArtifact]:
        return self._inputs.get(name, [])

    def walk_tree(self, artifact: InputArtifact) -> Iterator[Any]:
        return self.store.walk_tree(artifact.digest)

    def open_blob(self, digest: str) -> Any:
        return self.store.open_blob(digest)
