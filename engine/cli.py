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


#: Flags that take a value (``--flag VALUE`` as well as ``--flag=VALUE``) and may come before
#: the command word: the global ones, and build's own before an implicit ``build``.
VALUE_FLAGS = ("-p", "-j", "--jobs", "--remote-cache", "--remote-executor", "--remote-upload", "--summary-json")


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


def _positive_int(text: str) -> int:
    """``--jobs``' type: a whole number of at least 1 (argparse turns the error into
    ``argument --jobs/-j: ...`` and exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, but was '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, but was {value} (leave it out to use every core)")
    return value


def _add_jobs(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--jobs``, a global flag: every command that builds honours it. Unset (None)
    means one action per core."""
    default: dict[str, Any] = {"default": None} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--jobs", "-j", type=_positive_int, metavar="N",
                        help="run at most N actions at once (default: one per core)", **default)


#: What ``dtbuild COMMAND --help`` says about the engine's commands: (one line for
#: ``dtbuild --help``, the description, the examples), as ``bazel help build`` does.
_HELP: dict[str, tuple[str, str, str]] = {
    "build": (
        "build targets (the default command: `dtbuild TARGET...`)",
        "Build the targets and what they depend on, reusing every cached action. Image targets\n"
        "give dtbuild-out/PKG/NAME.tar[.gz|.zst] (a docker-archive), NAME.oci/ (an OCI layout)\n"
        "and NAME.json; other targets give dtbuild-out/PKG/NAME. A live display on a terminal,\n"
        "one line per finished action otherwise; then a summary of targets, outputs and digests.\n"
        "`dtbuild TARGET...` is `dtbuild build TARGET...`, and the flags may come before the\n"
        "targets or after them.",
        "  dtbuild build //images:web\n"
        "  dtbuild //images:web                    the same: build is the default command\n"
        "  dtbuild //... -j 4 --keep-going         everything, 4 actions at once, past failures\n"
        "  dtbuild build :all --summary-json out.json\n"
        "                                          every target of this directory's package"),
    "query": (
        "query the target graph: deps(), rdeps(), kind(), somepath(), ...",
        "Evaluate a query over the target graph (loading and analysing, building nothing) and\n"
        "print one label a line. Functions: deps(X[, depth]), rdeps(U, X[, depth]),\n"
        "kind(REGEX, X) (targets whose rule matches), somepath(A, B), allpaths(A, B); operators\n"
        "+ (union), - (difference), ^ (intersection); X is a label or a pattern (//pkg/...,\n"
        "//pkg:all).",
        "  dtbuild query 'deps(//images:web)'\n"
        "  dtbuild query 'rdeps(//..., //web:httpd)'       what depends on //web:httpd\n"
        "  dtbuild query 'kind(genrule, //...)'\n"
        "  dtbuild query 'somepath(//images:web, //web:site)'"),
    "graph": (
        "print a target's dependency graph",
        "Print the dependency graph of a target (or of each target a pattern names) as an\n"
        "indented tree, a Graphviz dot graph, or JSON.",
        "  dtbuild graph //images:web\n"
        "  dtbuild graph //images:web --format dot | dot -Tsvg > web.svg\n"
        "  dtbuild graph //images:web --format json"),
    "explain": (
        "which actions would run, and why",
        "Say, for each action the targets need, whether it would run or is cached, and which\n"
        "input changed when it would run (a source file, a dependency, an attribute). Builds\n"
        "nothing.",
        "  dtbuild explain //images:web\n"
        "  dtbuild explain //...          every target of the workspace"),
    "clean": (
        "remove dtbuild-out/ (and the cache with --expunge)",
        "Remove the workspace's dtbuild-out/ directory. The local cache stays, so the next\n"
        "build copies its results out again without running an action; --expunge removes the\n"
        "cache too (waiting for builds that use it to finish).",
        "  dtbuild clean\n"
        "  dtbuild clean --expunge"),
    "cache": (
        "inspect or trim the local cache",
        "stats: where the local cache is and how much it holds. gc: drop the action results not\n"
        "used for --max-age-days days, then the blobs no remaining result needs.",
        "  dtbuild cache stats\n"
        "  dtbuild cache gc --max-age-days 7"),
    "plugins": (
        "list plugins and what each registers",
        "List the loaded plugins (built-in, installed through the dtbuild entry-point group, or\n"
        "workspace modules from [plugins] modules), what each registers (rules, action kinds,\n"
        "compressors, layer kinds, executors, commands), and the built-in ones that are not\n"
        "loaded and why. -p no:NAME blocks a plugin.",
        "  dtbuild plugins\n"
        "  dtbuild -p no:layered plugins   as a build with the layered plugin blocked sees them"),
}

_TOP_EXAMPLES = (
    "examples:\n"
    "  dtbuild //images:web                       build a target (build is the default command)\n"
    "  dtbuild -j 2 //images:web                  global flags go before or after the command\n"
    "  dtbuild stream //images:web | podman load\n"
    "  dtbuild query 'rdeps(//..., //web:httpd)'\n"
    "  dtbuild COMMAND --help                     a command's description, flags and examples\n"
    "\n"
    "Labels: //pkg/path:name, //pkg/path (= //pkg/path:path), :name in the current package;\n"
    "patterns //pkg/... and //pkg:all. A bare word (such as `query`) is read as a command.")


def _subparser(sub: Any, name: str, common: argparse.ArgumentParser, *, help: str, description: str,
               examples: str, plugin: str | None = None) -> argparse.ArgumentParser:
    """A command's parser: its description and examples in ``--help`` (kept as written),
    the global flags of ``common``. A plugin's command is parsed with
    ``conflict_handler="resolve"``, so that a plugin declaring a global flag itself
    (``--jobs``) does not break the parser; the caller adds the global ``--jobs`` after
    the plugin's arguments, so the engine's wins. (Resolving changes the actions it
    replaces: ``common`` must then be the command's own copy.)"""
    epilog = "examples:\n" + examples.rstrip("\n") if examples.strip() else None
    if plugin is not None:
        epilog = (epilog + "\n\n" if epilog else "") + f"This command comes from the plugin '{plugin}'."
    return sub.add_parser(name, parents=[common], help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          conflict_handler="resolve" if plugin is not None else "error")


def _parser(commands: Any = None) -> argparse.ArgumentParser:
    """The parser of the engine's commands and of ``commands`` (a CommandTable)."""
    common = _common(top=False)
    _add_jobs(common, top=False)
    top = _common(top=True)
    _add_jobs(top, top=True)
    parser = argparse.ArgumentParser(
        prog="dtbuild", parents=[top], formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build reproducible container images from BUILD files. `dtbuild //images:web` builds a target.",
        epilog=_TOP_EXAMPLES)
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def engine(name: str) -> argparse.ArgumentParser:
        line, description, examples = _HELP[name]
        return _subparser(sub, name, common, help=line, description=description, examples=examples)

    build = engine("build")
    build.add_argument("targets", nargs="+", metavar="TARGET",
                       help="labels (//pkg:name, :name) and patterns (//pkg/..., //pkg:all) to build")
    build.add_argument("--keep-going", "-k", action="store_true",
                       help="after a failure, build what does not depend on it; report every failure")
    build.add_argument("--summary-json", metavar="FILE",
                       help="write the targets' outputs and digests and the action counts to FILE as JSON")

    query = engine("query")
    query.add_argument("expression", metavar="EXPR", help="the query, such as 'deps(//images:web)' (quote it)")

    graph = engine("graph")
    graph.add_argument("target", metavar="TARGET", help="a label or pattern, such as //images:web")
    graph.add_argument("--format", choices=("tree", "dot", "json"), default="tree",
                       help="tree (indented, the default), dot (Graphviz) or json")

    explain = engine("explain")
    explain.add_argument("targets", nargs="+", metavar="TARGET", help="labels and patterns to explain")

    clean = engine("clean")
    clean.add_argument("--expunge", action="store_true", help="also remove the whole local cache")

    cache = engine("cache")
    cache.add_argument("action", choices=("stats", "gc"), help="stats: what the cache holds; gc: trim it")
    cache.add_argument("--max-age-days", type=float, default=30.0, metavar="DAYS",
                       help="gc: drop action results unused for this long (default 30)")

    engine("plugins")
    for registered in (commands.commands.values() if commands is not None else ()):
        cls = registered.command
        command_parser = _subparser(
            sub, registered.name, _common(top=False), help=f"{registered.help} (plugin '{registered.plugin}')",
            description=str(getattr(cls, "DESCRIPTION", "") or registered.help),
            examples=str(getattr(cls, "EXAMPLES", "") or ""), plugin=registered.plugin)
        cls().add_arguments(command_parser)
        _add_jobs(command_parser, top=False)
    return parser


def _blocked(flags: Sequence[str]) -> list[str]:
    from dtbuild.engine.errors import UsageError

    blocked = []
    for flag in flags:
        if not flag.startswith("no:") or len(flag) <= 3:
            raise UsageError(f"-p takes no:NAME to block a plugin, but got '{flag}'")
        blocked.append(flag[3:])
    return blocked


def _command_index(args: Sequence[str]) -> int | None:
    """Where the command word is: the first argument that is neither a flag nor the value
    of one of :data:`VALUE_FLAGS`."""
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg in VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            return i
    return None


def _flags_part(args: Sequence[str]) -> Sequence[str]:
    """``args`` up to ``--``: what follows it is a command's own (``dtbuild run //x -- -p 80``)."""
    return args[:args.index("--")] if "--" in args else args


def _blocked_flags(args: Sequence[str]) -> list[str]:
    """The values of every ``-p`` flag, read before the parser knows the plugin commands."""
    flags = []
    args = _flags_part(args)
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
    return _guarded(lambda: _main(args_list), debug="--debug" in _flags_part(args_list))


def _main(args_list: list[str]) -> int:
    at = _command_index(args_list)
    first = args_list[at] if at is not None else None
    if at is not None and first == "help" and "--version" not in args_list:  # as `bazel help build`
        return _main([*args_list[:at], *args_list[at + 1:at + 2], "--help"])
    flags = _flags_part(args_list)
    asks_help = "-h" in flags or "--help" in flags
    commands = None
    if first is None:
        if asks_help:  # `dtbuild --help` lists the plugin commands too, where there are plugins
            commands = _plugin_commands(args_list, quiet=True)
    elif first not in COMMANDS and _looks_like_command(first):
        from dtbuild.engine.errors import closest

        # Outside a workspace, a typo of an engine command is still reported as one.
        commands = _plugin_commands(args_list, quiet=closest(first, COMMANDS) is not None)
    known = commands.commands if commands is not None else {}
    if at is not None and first is not None and "--version" not in args_list:
        if first in COMMANDS or first in known:
            # The command's parser knows every global flag: flags before the command word
            # are parsed there too (`dtbuild -p no:vm -j 2 build //a`).
            args_list.insert(0, args_list.pop(at))
        elif _looks_like_command(first):
            raise _unknown_command(first, commands)
        else:  # a label or pattern: `dtbuild -j 2 --keep-going //a //b` is `dtbuild build ...`
            args_list.insert(0, "build")
    parser = _parser(commands)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    args.plugin_command = known.get(args.command)
    return _run(args)


def _unknown_command(word: str, commands: Any) -> Exception:
    """The error for ``dtbuild WORD`` when WORD reads as a command (a bare word) but is
    none: a plugin's command that is not loaded says so; otherwise the closest command."""
    from dtbuild.engine.errors import UsageError, closest

    unavailable = commands.unknown_command_error(word) if commands is not None else None
    if unavailable is not None:
        return unavailable
    names = [*COMMANDS, *sorted(commands.commands if commands is not None else ())]
    close = closest(word, names)
    listed = "dtbuild --help describes the commands" if close else f"the commands are {', '.join(names)}"
    return UsageError(f"unknown command '{word}'" + (f", did you mean '{close}'?" if close else ""),
                      hint="a bare word is read as a command: to build a target, write its label, //pkg:name "
                           f"(or :name in this package); {listed}")


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
        if args.jobs is None:  # CommandAPI.build_artifacts takes 0 for "one action per core"
            args.jobs = 0
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
    from dtbuild.plugins.console_reporter import ConsoleReporter
    from dtbuild.plugins.text import printable

    reporter = ConsoleReporter(quiet=args.quiet, verbose=args.verbose)
    session = _session(args, reporter)
    labels = session.expand(args.targets)
    cancel = threading.Event()
    _install_signal_handlers(cancel)
    # The reporter hears commands, cache keys and failures when it is the build's reporter
    # (not blocked with -p no:reporter): then it has shown each failure's reason already.
    observer = reporter if session.pm.get_plugin("reporter") is reporter else None
    try:
        result = session.build(labels, BuildOptions(jobs=args.jobs or 0, keep_going=args.keep_going, debug=args.debug,
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
