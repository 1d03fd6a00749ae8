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
from collections.abc import Sequence
from typing import Any

COMMANDS = ("build", "query", "graph", "explain", "stream", "inspect", "push", "load", "clean", "cache", "plugins")


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


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    common.add_argument("-p", dest="plugin_flags", action="append", default=[], metavar="no:NAME",
                        help="block the plugin NAME (repeatable)")
    parser = argparse.ArgumentParser(
        prog="dtbuild", parents=[common],
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

    stream = sub.add_parser("stream", parents=[common],
                            help="write an image's docker-archive to stdout without storing it")
    stream.add_argument("target")
    stream.add_argument("--jobs", "-j", type=int, default=0)

    inspect = sub.add_parser("inspect", parents=[common], help="an image's layers, sizes, config and contents")
    inspect.add_argument("target")
    inspect.add_argument("--jobs", "-j", type=int, default=0)

    push = sub.add_parser("push", parents=[common], help="push an image to registries (skips blobs they have)")
    push.add_argument("target")
    push.add_argument("refs", nargs="+", metavar="REF",
                      help="REGISTRY/REPOSITORY[:TAG] (default tag: the image's own); several REFs push several tags")
    push.add_argument("--insecure", action="store_true",
                      help="do not verify TLS certificates, and fall back to plain HTTP")
    push.add_argument("--format", choices=("oci", "docker"), default="oci",
                      help="manifest media types (default oci: the digest in NAME.json; docker: not for zstd layers)")
    push.add_argument("--transfers", type=int, default=8, help="blobs checked and sent at once (default 8)")
    push.add_argument("--jobs", "-j", type=int, default=0)

    load = sub.add_parser("load", parents=[common], help="load an image into docker or podman")
    load.add_argument("target")
    load.add_argument("--tool", choices=("auto", "docker", "podman"), default="auto",
                      help="auto: docker when its daemon answers, else podman")
    load.add_argument("--jobs", "-j", type=int, default=0)

    clean = sub.add_parser("clean", parents=[common], help="remove dtbuild-out/ (and the cache with --expunge)")
    clean.add_argument("--expunge", action="store_true", help="also remove the whole local cache")

    cache = sub.add_parser("cache", parents=[common], help="inspect or trim the local cache")
    cache.add_argument("action", choices=("stats", "gc"))
    cache.add_argument("--max-age-days", type=float, default=30.0,
                       help="gc: drop action results unused for this long (default 30)")

    sub.add_parser("plugins", parents=[common], help="list plugins and what each registers")
    return parser


def _blocked(flags: Sequence[str]) -> list[str]:
    from dtbuild.engine.errors import UsageError

    blocked = []
    for flag in flags:
        if not flag.startswith("no:") or len(flag) <= 3:
            raise UsageError(f"-p takes no:NAME to block a plugin, but got '{flag}'")
        blocked.append(flag[3:])
    return blocked


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args_list if not a.startswith("-")), None)
    if first is not None and first not in COMMANDS and "--version" not in args_list \
            and "-h" not in args_list and "--help" not in args_list:
        args_list.insert(args_list.index(first), "build")
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = args.debug
    from dtbuild.engine.errors import DtbuildError
    from dtbuild.plugins.text import printable

    try:
        return _run(args)
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


def _session(args: argparse.Namespace, reporter: Any = None) -> Any:
    from dtbuild.engine.build import Session
    from dtbuild.engine.workspace import find_workspace

    extra = [("reporter", reporter)] if reporter is not None else []
    workspace = find_workspace()
    # Bad settings (and environment overrides) fail here, before any BUILD file is read.
    workspace.settings()
    return Session(workspace, blocked=_blocked(args.plugin_flags), extra_plugins=extra)


def _run(args: argparse.Namespace) -> int:
    return {
        "build": _cmd_build, "query": _cmd_query, "graph": _cmd_graph, "explain": _cmd_explain,
        "stream": _cmd_stream, "inspect": _cmd_inspect, "push": _cmd_push, "load": _cmd_load,
        "clean": _cmd_clean, "cache": _cmd_cache, "plugins": _cmd_plugins,
    }[args.command](args)


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
    from dtbuild.plugins.builtin.reporter import ConsoleReporter
    from dtbuild.plugins.text import printable

    if args.jobs < 0:
        raise UsageError(f"--jobs must be a positive number, but was {args.jobs}")
    reporter = ConsoleReporter()
    session = _session(args, reporter)
    labels = session.expand(args.targets)
    cancel = threading.Event()
    _install_signal_handlers(cancel)
    result = session.build(labels, BuildOptions(jobs=args.jobs, keep_going=args.keep_going, debug=args.debug),
                           cancel)
    summary = result.summary()
    if args.summary_json:
        import json

        from dtbuild.engine.store import atomic_write

        text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
        atomic_write(os.path.abspath(args.summary_json), text.encode())
    stats = result.stats
    out = sys.stderr
    if result.error is not None:
        print(f"ERROR: {printable(result.error.render(), keep_newlines=True)}", file=out)
        print(f"Build FAILED: {stats.failed} action(s) failed, {stats.skipped} not run, "
              f"{stats.executed} executed, {stats.cached + stats.remote_cached} cached.", file=out)
        return result.error.exit_code
    rebuilt = (f" {stats.rewound} corrupt cache entr{'y' if stats.rewound == 1 else 'ies'} rebuilt."
               if stats.rewound else "")
    print(f"Built {len(labels)} target(s): {stats.executed} action(s) executed, "
          f"{stats.cached} cached, {stats.remote_cached} from the remote cache.{rebuilt}", file=out)
    for label, paths in summary["targets"].items():
        shown = ", ".join(paths["outputs"]) or "(no outputs)"
        digest = paths.get("manifest_digest")
        print(f"  {label}: {shown}" + (f"  {digest}" if digest else ""), file=out)
    return 0


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
        if not session.analyzer._has_target(label):
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
    for label in labels:
        print(label)
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    from dtbuild.engine import query

    session = _session(args)
    labels = session.expand([args.target])
    graph = _query_graph(session)
    for label in labels:
        print(query.render_graph(graph, str(label), args.format))
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


def _single_image(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    from dtbuild.engine.build import BuildOptions, image_inputs
    from dtbuild.engine.errors import UsageError
    from dtbuild.plugins.builtin.reporter import ConsoleReporter

    session = _session(args, ConsoleReporter(quiet=True))
    labels = session.expand([args.target])
    if len(labels) != 1:
        raise UsageError(f"'{args.target}' names {len(labels)} targets; give exactly one image target")
    cancel = threading.Event()
    _install_signal_handlers(cancel)
    reader, artifact, compressor = image_inputs(session, labels[0], BuildOptions(jobs=args.jobs, debug=args.debug),
                                                cancel)
    return session, reader, artifact, compressor


def _cmd_stream(args: argparse.Namespace) -> int:
    from dtbuild.plugins.builtin import imageformat
    from dtbuild.plugins.builtin.image_actions import archive_images

    session, reader, _, compressor_name = _single_image(args)
    if sys.stdout.isatty():
        from dtbuild.engine.errors import UsageError

        raise UsageError("stream writes a tar archive to stdout; pipe it somewhere",
                         hint=f"dtbuild stream {args.target} | docker load")
    compressor = session.plugin_items().compressor(compressor_name)
    out = sys.stdout.buffer
    imageformat.write_docker_archive(out, archive_images(reader), compressor)
    out.flush()
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json
    import re

    from dtbuild.engine.errors import BuildFailure
    from dtbuild.plugins.builtin import tar_extract
    from dtbuild.plugins.builtin.image_actions import ImageTree
    from dtbuild.plugins.text import printable as shown  # image text never reaches the terminal raw

    def size(n: int) -> str:
        return f"{n} B" if n < 1000 else f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.1f} MB"

    _, reader, artifact, _ = _single_image(args)
    tree = ImageTree(reader, artifact)
    desc = tree.description
    print(f"image: {shown(desc.label)}")
    print(f"tags: {', '.join(shown(t) for t in desc.repo_tags)}")
    print(f"manifest: {shown(desc.manifest_digest)}")
    print(f"config: {shown(desc.config_digest)}")
    config = tree.config
    print(f"platform: {shown(config.get('os'))}/{shown(config.get('architecture'))}  "
          f"created: {shown(config.get('created'))}")
    print("config:")
    # json.dumps (ensure_ascii) already escapes them; shown() keeps it so if that changes.
    for line in json.dumps(config.get("config") or {}, indent=2, sort_keys=True).splitlines():
        print("  " + shown(line))
    history = [h for h in config.get("history", []) if not h.get("empty_layer")]
    print(f"layers ({len(desc.layers)}):")
    for i, layer in enumerate(desc.layers):
        files = dirs = 0
        top: dict[str, int] = {}
        # Read as every untrusted tar is (names normalised and checked): layers of
        # imported and pulled images come from anywhere.
        try:
            with tree.layer_opener(layer.diff_id)() as f:
                for member, _ in tar_extract.read_entries(f, compressed=False, lower_files=lambda _path: True):
                    if member.kind == "dir":
                        dirs += 1
                    else:
                        files += 1
                        head = "/" + member.path.split("/", 1)[0]
                        top[head] = top.get(head, 0) + 1
        except tar_extract.UnsafeArchive as e:
            where = f"layer {i + 1} ({layer.diff_id})"
            raise BuildFailure(f"cannot list the files of {where}: {e}", hint=e.hint or None) from None
        created_by = history[i].get("created_by", "") if i < len(history) else ""
        tar_size = tree.entry("layers/" + layer.diff_id.removeprefix("sha256:")).size
        print(f"  {i + 1}. {shown(layer.digest)}  {size(layer.size)}  {shown(layer.media_type)}")
        print(f"     diff_id {shown(layer.diff_id)}; {size(tar_size)} uncompressed; {files} files, "
              f"{dirs} directories")
        # Layers dtbuild wrote say which packages they hold: "dtbuild LABEL (p1, p2)".
        made = re.fullmatch(r"dtbuild (\S+)(?: customisation)? \((.*)\)", created_by)
        if made is not None and " customisation " in created_by:
            print("     customisation layer: what extra_commands and fakeroot_commands changed")
        elif made is not None:
            print(f"     packages: {'(none)' if made.group(2) == 'no packages' else shown(made.group(2))}")
        elif created_by:
            print(f"     {shown(created_by)}")
        if top:
            print("     holds: " + ", ".join(f"{shown(k)} ({v})" for k, v in sorted(top.items())))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from dtbuild.engine import push
    from dtbuild.engine.errors import UsageError

    if args.transfers < 1:
        raise UsageError(f"--transfers must be at least 1, but was {args.transfers}")
    refs = push.parse_targets(args.refs)
    session, reader, artifact, _ = _single_image(args)
    cancel = threading.Event()
    _install_signal_handlers(cancel)
    outcomes = push.push_image(reader, artifact, refs, state_dir=session.workspace.state_dir, insecure=args.insecure,
                               manifest_format=args.format, transfers=args.transfers, cancel=cancel,
                               report=lambda message: print(message, file=sys.stderr))
    for outcome in outcomes:
        total = outcome.uploaded + outcome.mounted + outcome.skipped
        mounted = f" from {', '.join(outcome.mounted_from)}" if outcome.mounted_from else ""
        print(f"pushed {outcome.target.name} ({', '.join(outcome.target.tags)}): {outcome.digest}; {total} blob(s): "
              f"{outcome.uploaded} uploaded ({_megabytes(outcome.uploaded_bytes)}), {outcome.mounted} mounted"
              f"{mounted}, {outcome.skipped} skipped (already there)", file=sys.stderr)
        for reference in outcome.references:
            print(f"{reference}@{outcome.digest}")
    return 0


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _load_command(choice: str) -> list[str]:
    """``[docker|podman, "load"]``: docker when its daemon answers (or when asked), else podman."""
    import shutil
    import subprocess

    from dtbuild.engine.errors import BuildFailure

    docker, podman = shutil.which("docker"), shutil.which("podman")
    if choice == "podman" or (choice == "auto" and podman and not docker):
        if podman is None:
            raise BuildFailure("podman is not installed (or not on PATH)", hint="install podman, or use --tool docker")
        return [podman, "load"]
    if docker is None:
        if choice == "docker":
            raise BuildFailure("docker is not installed (or not on PATH)", hint="install docker, or use --tool podman")
        raise BuildFailure("dtbuild load needs docker or podman, and neither is installed (or on PATH)",
                           hint="install one of them, or write the archive with `dtbuild stream TARGET > image.tar`")
    try:
        answers = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"], capture_output=True,
                                 timeout=20, stdin=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        answers = False
    if answers:
        return [docker, "load"]
    if choice == "auto" and podman is not None:
        return [podman, "load"]
    raise BuildFailure("the docker daemon does not answer (`docker version` cannot reach it)"
                       + ("" if choice == "docker" else ", and podman is not installed"),
                       hint="start the docker daemon" + ("" if choice == "docker" else ", or install podman"))


def _cmd_load(args: argparse.Namespace) -> int:
    import subprocess

    from dtbuild.engine.errors import BuildFailure
    from dtbuild.plugins.builtin import imageformat
    from dtbuild.plugins.builtin.compressors import NoneCompressor
    from dtbuild.plugins.builtin.image_actions import ImageTree, archive_images

    argv = _load_command(args.tool)  # before building: a missing tool fails fast
    _, reader, artifact, _ = _single_image(args)
    tool = os.path.basename(argv[0])
    tags = list(ImageTree(reader, artifact).description.repo_tags)
    # Uncompressed whatever the target's compressor: podman 4.3 rejects gzip docker-archives,
    # and a local pipe gains nothing from compression.
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=sys.stderr)
    assert proc.stdin is not None
    try:
        imageformat.write_docker_archive(proc.stdin, archive_images(reader), NoneCompressor())
    except BrokenPipeError:
        pass  # the tool stopped reading: its exit status and message say why
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        code = proc.wait()
    if code != 0:
        raise BuildFailure(f"`{tool} load` exited with status {code} (its message is above)",
                           hint=f"dtbuild stream {args.target} | {tool} load  reproduces it")
    print(f"loaded {args.target} into {tool}: {', '.join(tags)}")
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
    registries = ("rules", "action_kinds", "compressors", "layer_kinds", "executors", "output_formats")
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
    return 0

if __name__ == "__main__":
    sys.exit(main())
