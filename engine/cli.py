"""The command line. The only module that prints results or decides exit codes:
0 success, 1 build failure, 2 bad command line or BUILD/.bzl error.

Start-up is on the path of every no-op build, so everything heavy is imported inside
the command that needs it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

#: The engine's own commands; plugins add others (``stream``, ``inspect``, ``push`` and
#: ``load`` come from the image plugins) through ``dtbuild_register_commands``.
COMMANDS = ("build", "query", "graph", "explain", "clean", "cache", "plugins")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dtbuild")
    except PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(f"dtbuild {_version()}")
        parser.exit(0)


#: Global flags that take a value (``--flag VALUE`` as well as ``--flag=VALUE``).
VALUE_FLAGS = ("-p", "--remote-cache", "--remote-executor", "--remote-upload")


def _common(*, top: bool) -> argparse.ArgumentParser:
    """The flags every command takes, before or after the command word. The copy a
    command's parser gets has no defaults (``SUPPRESS``), so that it does not overwrite a
    flag given before the command; the top parser's copy sets them."""
    common = argparse.ArgumentParser(add_help=False)
    default: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    common.add_argument("--debug", action="store_true", help="show tracebacks of internal errors", **default)
    common.add_argument("-p", dest="plugin_flags", action="append", metavar="no:NAME",
                        help="block the plugin NAME (repeatable)", **({"default": []} if top else default))
    common.add_argument("--verbose", "-v", action="store_true",
                        help="also show each action's command and cache key", **default)
    common.add_argument("--quiet", "-q", action="store_true",
                        help="show only errors and the summary (wins over --verbose)", **default)
    remote = common.add_argument_group("remote cache and execution (over $DTBUILD_REMOTE_* and [remote])")
    remote.add_argument("--remote-cache", metavar="URL", help="http://, https://, grpc:// or grpcs:// remote cache",
                        **default)
    remote.add_argument("--remote-executor", metavar="URL", help="grpc:// or grpcs:// REAPI execution service",
                        **default)
    remote.add_argument("--remote-upload", metavar="BOOL", choices=("true", "false"),
                        help="upload results made here to the remote cache (default true)", **default)
    return common


def _parser(commands: Any = None) -> argparse.ArgumentParser:
    """The parser of the engine's commands and of ``commands`` (a CommandTable)."""
    common = _common(top=False)
    parser = argparse.ArgumentParser(
        prog="dtbuild", parents=[_common(top=True)],
        description="Build reproducible container images from BUILD files. `dtbuild //images:web` builds a target.")
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    build = sub.add_parser("build", parents=[common], help="build targets (the default command)")
    build.add_argument("targets", nargs="+", metavar="TARGET")
    build.add_argument("--jobs", "-j", type=int, default=0, help="actions run at once (default: cores)")
    build.add_argument("--keep-going", "-k", action="store_true", help="build what does not depend on a failure")
    build.add_argument("--summary-json", metavar="FILE", help="write targets, outputs and action counts as JSON")

    query = sub.add_parser("query", parents=[common], help="query the target graph: deps(), rdeps(), kind(), ...")
    query.add_argument("expression")

    graph = sub.add_parser("graph", parents=[common], help="print a target's dependency graph")
    graph.add_argument("target")
    graph.add_argument("--format", choices=("tree", "dot", "json"), default="tree")

    explain = sub.add_parser("explain", parents=[common], help="which actions would run, and why")
    explain.add_argument("targets", nargs="+", metavar="TARGET")

    clean = sub.add_parser("clean", parents=[common], help="remove dtbuild-out/ (and the cache with --expunge)")
    clean.add_argument("--expunge", action="store_true", help="also remove the whole local cache")

    cache = sub.add_parser("cache", parents=[common], help="inspect or trim the local cache")
    cache.add_argument("action", choices=("stats", "gc"))
    cache.add_argument("--max-age-days", type=float, default=30.0,
                       help="gc: drop action results unused for this long (default 30)")

    sub.add_parser("plugins", parents=[common], help="list plugins and what each registers")
    for registered in (commands.commands.values() if commands is not None else ()):
        command_parser = sub.add_parser(registered.name, parents=[common],
                                        help=f"{registered.help} (plugin '{registered.plugin}')")
        registered.command().add_arguments(command_parser)
    return parser


def _blocked(flags: Sequence[str]) -> list[str]:
    from dtbuild.engine.errors import UsageError

    blocked = []
    for flag in flags:
        if not flag.startswith("no:") or len(flag) <= 3:
            raise UsageError(f"-p takes no:NAME to block a plugin, but got '{flag}'")
        blocked.append(flag[3:])
    return blocked


def _first_word(args: Sequence[str]) -> str | None:
    """The command word: the first argument that is neither a flag nor the value of -p."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def _blocked_flags(args: Sequence[str]) -> list[str]:
    """The values of every ``-p`` flag, read before the parser knows the plugin commands."""
    flags = []
    for i, arg in enumerate(args):
        if arg == "-p" and i + 1 < len(args):
            flags.append(args[i + 1])
        elif arg.startswith("-p") and len(arg) > 2 and not arg.startswith("--"):
            flags.append(arg[2:].removeprefix("="))
    return flags


def _looks_like_command(word: str) -> bool:
    # Labels and patterns (//pkg:x, :x, pkg/...) never name a command: building them
    # needs no plugin loaded before the parser runs.
    return word.replace("-", "").replace("_", "").isalnum() and word[:1].isalpha()


#: The session made while reading the command line (to learn the plugin commands),
#: used again by the command so that plugins load once.
_PRELOADED: dict[tuple[str, ...], Any] = {}


def _plugin_commands(args_list: Sequence[str], *, quiet: bool) -> Any:
    """The CommandTable of the workspace's plugins (None where there is no workspace and
    ``quiet``: ``dtbuild --help`` outside one lists the engine's commands)."""
    from dtbuild.engine.api import collect_commands
    from dtbuild.engine.errors import DtbuildError

    try:
        session = _make_session(_blocked(_blocked_flags(args_list)))
    except DtbuildError:
        if quiet:
            return None
        raise
    return collect_commands(session.pm)


def main(argv: Sequence[str] | None = None) -> int:
    # No garbage collection while plugins, packages and the analysis load: they live
    # until the process ends (frozen after the analysis, when collection resumes).
    from dtbuild.engine.package_cache import pause_collection_until_analysed

    pause_collection_until_analysed()
    args_list = list(sys.argv[1:] if argv is None else argv)
    _PRELOADED.clear()  # one command per call, even when called in-process again
    return _guarded(lambda: _main(args_list), debug="--debug" in args_list)


def _main(args_list: list[str]) -> int:
    first = _first_word(args_list)
    asks_help = "-h" in args_list or "--help" in args_list
    commands = None
    if first is None:
        if asks_help:  # `dtbuild --help` lists the plugin commands too, where there are plugins
            commands = _plugin_commands(args_list, quiet=True)
    elif first not in COMMANDS and _looks_like_command(first):
        commands = _plugin_commands(args_list, quiet=False)
    known = commands.commands if commands is not None else {}
    if first is not None and first not in COMMANDS and first not in known and "--version" not in args_list \
            and not asks_help:
        unknown = commands.unknown_command_error(first) if commands is not None else None
        if unknown is not None:
            raise unknown
        args_list.insert(args_list.index(first), "build")
    parser = _parser(commands)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    args.plugin_command = known.get(args.command)
    return _run(args)


def _guarded(run: Callable[[], int], *, debug: bool) -> int:
    """``run()``, with every error shown as one clear message and its exit code."""
    from dtbuild.engine.errors import DtbuildError
    from dtbuild.plugins.text import printable

    try:
        return run()
    except DtbuildError as e:
        if debug:
            import traceback

            traceback.print_exc()
        # Messages quote BUILD files, tar members and registry answers: never raw.
        print(f"ERROR: {printable(e.render(), keep_newlines=True)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ERROR: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except Exception as e:  # a bug of dtbuild's or a plugin's: one clear line, the traceback on request
        if isinstance(e, OSError):
            from dtbuild.engine.store import disk_error

            # A full disk while writing state files or a summary: what and where, not a bug.
            full = disk_error(e, "a file", e.filename if isinstance(e.filename, str) else "the disk")
            if full is not None:
                print(f"ERROR: {full.render()}", file=sys.stderr)
                return full.exit_code
        if debug:
            import traceback

            traceback.print_exc()
        print(f"ERROR: internal error: {type(e).__name__}: {printable(str(e))}\n"
              "hint: this is a bug; run again with --debug for the traceback and report it", file=sys.stderr)
        return 1


def _make_session(blocked: Sequence[str]) -> Any:
    """The session of the workspace around the working directory (made once per process
    and set of -p flags: plugins load once)."""
    from dtbuild.engine.build import Session
    from dtbuild.engine.workspace import find_workspace

    key = tuple(blocked)
    if key not in _PRELOADED:
        workspace = find_workspace()
        # Bad settings (and environment overrides) fail here, before any BUILD file is read.
        workspace.settings()
        _PRELOADED.clear()
        _PRELOADED[key] = Session(workspace, blocked=blocked)
    return _PRELOADED[key]


def _session(args: argparse.Namespace, reporter: Any = None) -> Any:
    session = _make_session(_blocked(args.plugin_flags))
    for flag, key in (("--remote-cache", "cache"), ("--remote-executor", "executor"), ("--remote-upload", "upload")):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            session.workspace.override(f"remote.{key}", value, flag)
    # The reporter is an observer plugin like any other: -p no:reporter silences it.
    if reporter is not None and not session.pm.is_blocked("reporter") and not session.pm.has_plugin("reporter"):
        session.pm.register(reporter, name="reporter")
    return session


def _run(args: argparse.Namespace) -> int:
    if args.plugin_command is not None:
        return _cmd_plugin(args)
    return {
        "build": _cmd_build, "query": _cmd_query, "graph": _cmd_graph, "explain": _cmd_explain,
        "clean": _cmd_clean, "cache": _cmd_cache, "plugins": _cmd_plugins,
    }[args.command](args)


def _cmd_plugin(args: argparse.Namespace) -> int:
    """A plugin's command, given the engine through the public API (dtbuild.engine.api)."""
    from dtbuild.engine.api import EngineCommandAPI, run_command
    from dtbuild.plugins.console_reporter import ConsoleReporter

    # The command prints its own results: progress only on the live display (transfer
    # bars for a push), no line per action.
    session = _session(args, ConsoleReporter(quiet=args.quiet, verbose=args.verbose, action_lines=False))
    cancel = threading.Event()
    _install_signal_handlers(cancel)
    return run_command(args.plugin_command, args, EngineCommandAPI(session, cancel=cancel, debug=args.debug))


def _install_signal_handlers(cancel: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        cancel.set()
        print(f"\ndtbuild: {signal.Signals(signum).name} received, stopping running actions...", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _cmd_build(args: argparse.Namespace) -> int:
    from dtbuild.engine.build import BuildOptions
    from dtbuild.engine.errors import UsageError
    from dtbuild.plugins.console_reporter import ConsoleReporter
    from dtbuild.plugins.text import printable

    if args.jobs < 0:
        raise UsageError(f"--jobs must be a positive number, but was {args.jobs}")
    reporter = ConsoleReporter(quiet=args.quiet, verbose=args.verbose)
    session = _session(args, reporter)
    labels = session.expand(args.targets)
    cancel = threading.Event()
    _install_signal_handlers(cancel)
    # The reporter hears commands, cache keys and failures when it is the build's reporter
    # (not blocked with -p no:reporter): then it has shown each failure's reason already.
    observer = reporter if session.pm.get_plugin("reporter") is reporter else None
    try:
        result = session.build(labels, BuildOptions(jobs=args.jobs, keep_going=args.keep_going, debug=args.debug,
                                                    observer=observer), cancel)
    finally:
        reporter.close()
    summary = result.summary()
    if args.summary_json:
        import json

        from dtbuild.engine.store import atomic_write

        text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
        atomic_write(os.path.abspath(args.summary_json), text.encode())
    stats = result.stats
    out = sys.stderr
    closing = reporter.closing_lines(summary)
    if result.error is not None:
        errors = result.errors or [result.error]
        shown_ids = {id(e) for e in reporter.shown_errors}
        for error in errors:
            if id(error) not in shown_ids:
                print(f"ERROR: {printable(error.render(), keep_newlines=True)}", file=out)
        print(f"Build FAILED: {stats.failed} action(s) failed, {stats.skipped} not run, "
              f"{stats.executed} executed, {stats.cached + stats.remote_cached} cached.", file=out)
        # Each failed target with its one-line reason (the full reasons are above).
        for error in errors:
            if error.target is not None:
                reason = error.message.splitlines()[0] if error.message else type(error).__name__
                print(f"  {error.target}: {printable(reason)}", file=out)
        for line in closing:
            print(line, file=out)
        return result.error.exit_code
    rebuilt = (f" {stats.rewound} corrupt cache entr{'y' if stats.rewound == 1 else 'ies'} rebuilt."
               if stats.rewound else "")
    remotely = f", {stats.remote_executed} executed remotely" if stats.remote_executed else ""
    print(f"Built {len(labels)} target(s): {stats.executed} action(s) executed{remotely}, "
          f"{stats.cached} cached, {stats.remote_cached} from the remote cache.{rebuilt}", file=out)
    if result.remote is not None and result.remote.get("cache"):
        moved = result.remote
        print(f"  remote cache {moved['cache']}: {_size(moved['downloaded_bytes'])} downloaded, "
              f"{moved['uploaded_results']} result(s) and {_size(moved['uploaded_bytes'])} uploaded", file=out)
    for label, paths in summary["targets"].items():
        shown = ", ".join(paths["outputs"]) or "(no outputs)"
        digest = paths.get("manifest_digest")
        print(f"  {label}: {shown}" + (f"  {digest}" if digest else ""), file=out)
    for line in closing:
        print(line, file=out)
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _query_graph(session: Any) -> Any:
    from dtbuild.engine.labels import Label, parse_label
    from dtbuild.engine.query import QueryGraph, QueryNode
    from dtbuild.rules.artifacts import Artifact

    def resolve(word: str) -> list[str]:
        from dtbuild.engine.errors import UnknownTargetError

        try:
            return [str(lb) for lb in session.expand([word])]
        except UnknownTargetError:
            # A source file is a target too, as in Bazel: //pkg:file.txt names it.
            label = parse_label(word) if word.startswith("//") and not word.endswith("...") else None
            path = f"{label.package}/{label.name}" if label and label.package else (label.name if label else "")
            if label and session.loader.build_file_of(label.package) is not None \
                    and os.path.lexists(os.path.join(session.workspace.root, path)):
                return [str(label)]
            raise

    def node(text: str) -> QueryNode:
        label = parse_label(text)
        if not session.analyzer.has_target(label):
            return QueryNode(text, "source file", ())
        decl = session.loader.target(label)
        deps: list[str] = []
        for _, items in session.analyzer.resolve_deps(decl):
            for item in items:
                if isinstance(item, Artifact):
                    root = item.root
                    rel = item.path[len(root) + 1:] if root else item.path
                    item = Label(root, rel)
                if str(item) not in deps:
                    deps.append(str(item))
        return QueryNode(text, decl.kind, tuple(deps))

    return QueryGraph(resolve, node)


def _cmd_query(args: argparse.Namespace) -> int:
    from dtbuild.engine import query
    from dtbuild.engine.errors import UsageError

    session = _session(args)
    try:
        labels = query.evaluate(args.expression, _query_graph(session))
    except (query.QuerySyntaxError, query.UnknownFunctionError) as e:
        raise UsageError(str(e)) from None
    finally:
        session.loader.save_cache()
    for label in labels:
        print(label)
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    from dtbuild.engine import query

    session = _session(args)
    labels = session.expand([args.target])
    graph = _query_graph(session)
    try:
        for label in labels:
            print(query.render_graph(graph, str(label), args.format))
    finally:
        session.loader.save_cache()
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    session = _session(args)
    labels = session.expand(args.targets)
    lines = session.explain(labels)
    for line in lines:
        print(line)
    runs = sum(1 for line in lines if ": would run" in line)
    print(f"{runs} of {len(lines)} action(s) would run.")
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    from dtbuild.engine.build import workspace_lock
    from dtbuild.engine.store import Store, remove_tree
    from dtbuild.engine.workspace import find_workspace

    workspace = find_workspace()
    with workspace_lock(workspace):  # a running build finishes first
        remove_tree(workspace.out_dir)
        print(f"removed {workspace.out_dir}", file=sys.stderr)
        if args.expunge:
            cache = workspace.cache_dir()
            if os.path.isdir(cache):
                Store(cache).expunge()  # waits for builds of other workspaces that share it
            print(f"removed the cache at {cache}", file=sys.stderr)
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from dtbuild.engine.store import Store
    from dtbuild.engine.workspace import find_workspace

    store = Store(find_workspace().cache_dir())
    if args.action == "stats":
        stats = store.stats()
        print(f"cache: {store.root}")
        print(f"blobs: {stats['blobs']} ({stats['bytes'] / 1e6:.1f} MB)")
        print(f"action results: {stats['actions']}")
        return 0
    removed = store.gc(max_age_seconds=args.max_age_days * 86400)
    print(f"removed {removed['actions']} action result(s) and {removed['blobs']} blob(s) "
          f"({removed['bytes'] / 1e6:.1f} MB)")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from dtbuild.engine.plugin_manager import plugin_origins

    session = _session(args)
    registry = session.registry
    pm = session.pm
    origins = plugin_origins(pm)
    registries = [r for r in ("rules", "action_kinds", "compressors", "layer_kinds", "executors")
                  if r in registry.items]
    from dtbuild.engine.api import collect_commands

    commands = collect_commands(pm)
    print("plugins:")
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda np: np[0] or ""):
        if plugin is None:  # blocked
            continue
        where = getattr(plugin, "__file__", None) or type(plugin).__module__
        built_in = "builtin, " if name in origins.builtin else ""
        dist = origins.dists.get(name)
        print(f"  {name}  ({built_in}{dist + ', ' if dist else ''}{where})")
        for reg in registries:
            names = sorted(n for n, owner in registry.owners.get(reg, {}).items() if owner == name)
            if names:
                print(f"      {reg.replace('_', ' ')}: {', '.join(names)}")
        own = sorted(c.name for c in commands.commands.values() if c.plugin == name)
        if own:
            print(f"      commands: {', '.join(own)}")
    for name, why in sorted(origins.unavailable.items()):
        print(f"  {name}  (builtin, {origins.dists.get(name, 'dtbuild')}; {why})")
    for reg in registries:
        items = registry.get(reg)
        print(f"{reg.replace('_', ' ')}:")
        if not items:
            print("  (none)")
        for name in sorted(items):
            owner = registry.owners[reg][name]
            notes = ["builtin"] if owner in origins.builtin else []
            if name in registry.replaced.get(reg, {}):
                notes.append(f"replaces the one of '{registry.replaced[reg][name]}'")
            if reg == "rules" and name in registry.unavailable_rules:
                notes.append(f"unavailable: {registry.unavailable_rules[name]}")
            print(f"  {name}  [{owner}{': ' + '; '.join(notes) if notes else ''}]")
    print("commands:")
    for name in COMMANDS:
        print(f"  {name}  [dtbuild]")
    for name, registered in sorted(commands.commands.items()):
        notes = ["builtin"] if registered.plugin in origins.builtin else []
        print(f"  {name}  [{registered.plugin}{': ' + '; '.join(notes) if notes else ''}]")
    for name, (plugin, why) in sorted(commands.unavailable.items()):
        print(f"  {name}  [{plugin}: unavailable: {why}]")
    return 0

if __name__ == "__main__":
    sys.exit(main())
