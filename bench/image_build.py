"""Image benchmark: dtbuild builds an image from a tree of files, side by side with the
seed's pipeline (dockerTools' way) and with the floor, `tar | openssl dgst -sha256`.

Prints figures and asserts nothing (tests never time anything). Run it from the
repository root with the virtualenv made by scripts/setup.sh:

    .venv/bin/python bench/image_build.py                    # small x3 runs, large x1 run
    .venv/bin/python bench/image_build.py --trees small      # only the 20,000-file tree
    .venv/bin/python bench/image_build.py --keep-trees       # reuse generated trees next time
    .venv/bin/python bench/image_build.py --profile DIR      # + py-spy on one cold build per tree
    .venv/bin/python bench/image_build.py --short            # tiny trees, 1 run (what CI runs)

The trees come from ../shared/bench/gen_tree.py (`small`: 20,000 files of 1-8 KiB;
`large`: 8 files, ~1 GiB), generated once into a temp dir (or a cache dir kept between
runs with --keep-trees). For each tree and compressor (gz, zstd, none) it measures, as
whole processes and medians of N runs, all of them in each run (so that the ratios
compare figures measured side by side):

* floor: `tar --sort=name ... -cf - . | openssl dgst -sha256` (read, tar and hash once),
  with `pigz` or `zstd` before the hash for gz and zstd; nothing written;
* seed: ../shared/bench/seed_pipeline.sh (GNU tar --sort=name, sha256sum, jq, pigz/zstd);
* dtbuild cold: `dtbuild build //:img_<compressor>` in a generated workspace
  (`files(srcs = glob(["tree/**"]), strip_prefix = "tree")` + `image(copy_to_root =
  [":tree"], compressor = ...)`) with an empty cache and no dtbuild-out/;
* dtbuild no-op: the same build again, nothing changed;
* dtbuild one-file change: the same build again after one file of the tree changed.

Each with wall and CPU seconds, the bytes the process tree wrote and the peak RSS of its
largest process (bench/measure.py), and its ratios to the seed pipeline and the floor.

A workspace-local plugin module (the `dtbuild_action_*` observer hooks) records when each
action started and finished, so every dtbuild run also gives its phases: start-up,
loading + analysis, each action (inputs hashed + cache check, then its run), writing
dtbuild-out/ and exit. `--profile DIR` adds one cold gz build per tree under py-spy
(`.venv/bin/pip install py-spy`): collapsed stacks of every thread in DIR (flamegraph.pl
and speedscope.app read them) and a summary of where the wall time went.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import MIB, Measured, dtbuild_command, median, print_table, remove, run_measured

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_bench() -> Path:
    """The shared baseline scripts (gen_tree.py, seed_pipeline.sh): $DTBUILD_SHARED_BENCH,
    else ../shared/bench beside this checkout, else /work/shared/bench."""
    for candidate in (os.environ.get("DTBUILD_SHARED_BENCH"), REPO_ROOT.parent / "shared" / "bench",
                      "/work/shared/bench"):
        if candidate and (Path(candidate) / "gen_tree.py").is_file():
            return Path(candidate)
    return REPO_ROOT.parent / "shared" / "bench"


SHARED_BENCH = shared_bench()
COMPRESSORS = ("gz", "zstd", "none")
TREES = ("small", "large")
SEED_GZ_SPEEDUP_GOAL = 4.0  # dtbuild at least 4x faster than the seed pipeline with gz
FLOOR_RATIO_GOAL = 1.5  # dtbuild's uncompressed path within 1.5x of tar | openssl dgst
#: The file the warm rebuild changes, per tree (relative to the tree's root).
CHANGED_FILE = {"small": "d00/e00/f00000.dat", "large": "big0.bin"}
SHORT_SCALE = 0.01  # --short: 200 small files, 8 files of 1.3 MiB
DEFAULT_TREE_CACHE = Path(tempfile.gettempdir()) / "dtbuild-bench-trees"

#: Workspace-local plugin: records the phases of a build as JSON in $DTBUILD_BENCH_TIMING.
TIMING_PLUGIN = '''\
"""Benchmark timing: when each action of the build started and finished."""
import json
import os
import time

from dtbuild.plugins import hookimpl

IMPORTED = time.time()  # the session is being created: start-up is over
_record = {"imported": IMPORTED, "actions": []}
_started = {}


@hookimpl
def dtbuild_build_started(targets, total_actions):
    _record["build_started"] = time.time()


@hookimpl
def dtbuild_action_started(label, mnemonic, description):
    _started[description] = time.time()


@hookimpl
def dtbuild_action_finished(label, mnemonic, description, status, seconds):
    now = time.time()
    _record["actions"].append({"mnemonic": mnemonic, "status": status, "finished": now, "seconds": seconds,
                               "started": _started.pop(description, None)})


@hookimpl
def dtbuild_build_finished(summary, success):
    _record["build_finished"] = time.time()
    with open(os.environ["DTBUILD_BENCH_TIMING"], "w") as f:
        json.dump(_record, f)
'''


# --------------------------------------------------------------------------- trees


def tree_size(root: Path) -> tuple[int, int]:
    """(files, bytes) of a tree."""
    files = size = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            files += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return files, size


def ensure_tree(kind: str, scale: float, parent: Path) -> Path:
    """The generated tree `kind` under `parent`, generated unless a complete one is there."""
    root = parent / (kind if scale == 1.0 else f"{kind}-x{scale:g}")
    done_marker = root.with_name(root.name + ".done")
    if done_marker.exists() and root.is_dir():
        return root
    shutil.rmtree(root, ignore_errors=True)
    print(f"generating the {kind} tree (x{scale:g}) in {root} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, str(SHARED_BENCH / "gen_tree.py"), kind, str(root), str(scale)], check=True)
    done_marker.touch()
    return root


def link_tree(src: Path, dest: Path) -> None:
    """A copy of `src` at `dest` made of hard links (the warm rebuild replaces a file, so
    the shared tree never changes), else a real copy."""
    if subprocess.run(["cp", "-al", str(src), str(dest)], capture_output=True).returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest)


def change_one_file(path: Path) -> None:
    """Give `path` new contents (its first byte flipped, same size) through a new file,
    so a hard-linked original is left alone."""
    tmp = path.with_name(path.name + ".bench-tmp")
    with open(path, "rb") as src, open(tmp, "wb") as out:
        first = src.read(1)
        out.write(bytes([first[0] ^ 0xFF]) if first else b"x")
        shutil.copyfileobj(src, out, 1 << 20)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- dtbuild


def write_workspace(root: Path, tree: Path) -> None:
    root.mkdir(parents=True)
    (root / "dtbuild.toml").write_text('# generated by bench/image_build.py\n'
                                      '[plugins]\nmodules = ["bench_timing.py"]\n')
    (root / "bench_timing.py").write_text(TIMING_PLUGIN)
    rules = ['files(name = "tree", srcs = glob(["tree/**"]), strip_prefix = "tree")\n']
    rules += [f'image(name = "img_{c}", copy_to_root = [":tree"], compressor = "{c}")\n' for c in COMPRESSORS]
    (root / "BUILD").write_text("\n".join(rules))
    link_tree(tree, root / "tree")


@dataclass
class DtbuildRun:
    timing: Measured
    phases: dict[str, float]
    executed: int
    output_bytes: int


def phases_of(timing: dict, started: float, ended: float) -> dict[str, float]:
    """Wall seconds of each phase of one build, from the timing plugin's record. An
    action's time is split into `inputs` (its inputs' digests, its key, the cache check:
    before it started) and `run`; actions that ran at the same time overlap. Empty when
    the build reported no phases (the plugin's hooks did not run)."""
    if not {"imported", "build_started", "build_finished"} <= timing.keys():
        return {}
    phases = {"start-up (interpreter, CLI imports)": timing["imported"] - started,
              "loading + analysis": timing["build_started"] - timing["imported"]}
    last = timing["build_started"]
    for action in timing["actions"]:
        name = action["mnemonic"]
        begun = action["finished"] - action["seconds"]
        if action["started"] is not None:
            # time.time() here, time.monotonic() in the engine: clamp the jitter.
            before = max(0.0, action["started"] - begun)
            phases[f"{name}: inputs, key, cache check"] = phases.get(f"{name}: inputs, key, cache check", 0.0) + before
            phases[f"{name}: run"] = phases.get(f"{name}: run", 0.0) + action["finished"] - action["started"]
        else:
            phases[f"{name}: cached"] = phases.get(f"{name}: cached", 0.0) + action["seconds"]
        last = max(last, action["finished"])
    phases["actions (wall, overlaps counted once)"] = last - timing["build_started"]
    phases["dtbuild-out/ + bookkeeping"] = timing["build_finished"] - last
    phases["summary + exit"] = ended - timing["build_finished"]
    return phases


def dtbuild_build(command: list[str], workspace: Path, cache: Path, target: str) -> DtbuildRun:
    timing_file = workspace / "bench-timing.json"
    summary_file = workspace / "bench-summary.json"
    env = {**os.environ, "DTBUILD_CACHE_DIR": str(cache), "DTBUILD_BENCH_TIMING": str(timing_file)}
    timing_file.unlink(missing_ok=True)
    started = time.time()
    timing = run_measured([*command, "build", target, "--summary-json", str(summary_file)], cwd=workspace, env=env)
    ended = time.time()
    summary = json.loads(summary_file.read_text())
    outputs = summary["targets"][target]["outputs"]
    archive = next(p for p in outputs if ".tar" in p)
    record = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    return DtbuildRun(timing, phases_of(record, started, ended), summary["actions"]["executed"],
                      (workspace / archive).stat().st_size)


# --------------------------------------------------------------------------- measurements


#: The dtbuild builds of each run, in order: cold, then (unless --no-warm) the same build
#: again with nothing changed, then after one file of the tree changed.
BUILDS = ("cold", "no-op", "one-file change")


@dataclass
class Measurements:
    floor: dict[str, list[Measured]] = field(default_factory=lambda: collections.defaultdict(list))
    seed: dict[str, list[Measured]] = field(default_factory=lambda: collections.defaultdict(list))
    seed_bytes: dict[str, int] = field(default_factory=dict)
    #: (compressor, one of BUILDS) -> runs
    builds: dict[tuple[str, str], list[DtbuildRun]] = field(default_factory=lambda: collections.defaultdict(list))


_TAR = "tar -C {tree} --sort=name --mtime=@1 --owner=0 --group=0 --numeric-owner -cf - ."
#: The least work an image of the tree takes, nothing written: read, archive and hash it
#: (none), or read, archive, compress with the seed's compressor and hash (gz, zstd).
FLOOR = {"none": _TAR + " | openssl dgst -sha256 >/dev/null",
         "gz": _TAR + " | pigz -p$(nproc) -nTR | openssl dgst -sha256 >/dev/null",
         "zstd": _TAR + " | zstd -T$(nproc) -q -c | openssl dgst -sha256 >/dev/null"}


def measure_tree(kind: str, tree: Path, runs: int, compressors: list[str], command: list[str], tmp: Path,
                 warm: bool) -> Measurements:
    m = Measurements()
    run_measured(FLOOR["none"].format(tree=tree), shell=True)  # unmeasured: the tree into the page cache
    for number in range(runs):
        print(f"  {kind}: run {number + 1}/{runs}", file=sys.stderr, flush=True)
        for comp in compressors:
            m.floor[comp].append(run_measured(FLOOR[comp].format(tree=tree), shell=True))
            out = tmp / f"seed-{comp}.tar"
            m.seed[comp].append(run_measured(["bash", str(SHARED_BENCH / "seed_pipeline.sh"), str(tree), str(out),
                                              comp]))
            m.seed_bytes[comp] = out.stat().st_size
            out.unlink()
            workspace, cache = tmp / f"ws-{comp}", tmp / f"cache-{comp}"
            write_workspace(workspace, tree)
            try:
                m.builds[comp, "cold"].append(dtbuild_build(command, workspace, cache, f"//:img_{comp}"))
                if warm:
                    m.builds[comp, "no-op"].append(dtbuild_build(command, workspace, cache, f"//:img_{comp}"))
                    change_one_file(workspace / "tree" / CHANGED_FILE[kind])
                    m.builds[comp, "one-file change"].append(dtbuild_build(command, workspace, cache,
                                                                           f"//:img_{comp}"))
            finally:
                remove(workspace)
                remove(cache)
    return m


def median_run(runs: list[DtbuildRun]) -> DtbuildRun:
    return sorted(runs, key=lambda r: r.timing.wall)[(len(runs) - 1) // 2]


def print_results(kind: str, files: int, size: int, runs: int, m: Measurements, compressors: list[str]) -> None:
    print(f"\n{kind} tree: {files:,} files, {size / MIB:,.0f} MiB; medians of {runs} run(s), measured in turn in "
          f"each run; peak RSS: the largest process, the largest of the runs")
    header = ["compressor", "run", "wall s", "/seed", "/floor", "CPU s", "written MiB", "peak RSS MiB",
              "output MiB", "actions"]
    rows = []
    for comp in compressors:
        floor, seed = median(m.floor[comp]), median(m.seed[comp])
        lines: list[tuple[str, Measured, int | None, str]] = [
            ("floor", floor, None, ""), ("seed pipeline", seed, m.seed_bytes[comp], "")]
        lines += [(f"dtbuild {build}", median([r.timing for r in m.builds[comp, build]]),
                   m.builds[comp, build][-1].output_bytes, str(m.builds[comp, build][-1].executed))
                  for build in BUILDS if m.builds.get((comp, build))]
        for name, measured, output, actions in lines:
            rows.append([comp, name, f"{measured.wall:.2f}", f"{measured.wall / seed.wall:.2f}",
                         f"{measured.wall / floor.wall:.2f}", f"{measured.cpu:.2f}", f"{measured.written / MIB:.1f}",
                         f"{measured.peak_rss / MIB:.0f}", "-" if output is None else f"{output / MIB:.1f}", actions])
    print_table(header, rows, left=2)
    for comp in compressors:
        print(f"floor {comp}: {FLOOR[comp].format(tree='TREE').removesuffix(' >/dev/null')}")
    if "gz" in compressors:
        speedup = median(m.seed["gz"]).wall / median([r.timing for r in m.builds["gz", "cold"]]).wall
        print(f"gz: dtbuild cold is {speedup:.2f}x as fast as the seed pipeline (goal: at least "
              f"{SEED_GZ_SPEEDUP_GOAL:g}x)")
    if "none" in compressors:
        ratio = median([r.timing for r in m.builds["none", "cold"]]).wall / median(m.floor["none"]).wall
        print(f"none: dtbuild cold takes {ratio:.2f}x the floor (goal: at most {FLOOR_RATIO_GOAL:g}x)")

    short = {"cold": "cold", "no-op": "no-op", "one-file change": "change"}
    columns = [(f"{short[build]} {comp}", median_run(m.builds[comp, build]))
               for build in BUILDS for comp in compressors if m.builds.get((comp, build))]
    names: list[str] = []
    for _, r in columns:
        names += [n for n in r.phases if n not in names]
    if not names:
        return
    width = max(len(n) for n in names)
    print(f"\n{kind} tree: dtbuild's phases, wall seconds (of the run at the median; the faster middle one "
          f"for an even N; 'change': after the one-file change)")
    print(f"{'phase':<{width}} " + " ".join(f"{title:>11}" for title, _ in columns))
    for name in names:
        if all(r.phases.get(name, 0.0) < 0.005 for _, r in columns):
            continue  # nothing to see (an action's cache check, mostly)
        cells = [f"{r.phases[name]:11.2f}" if name in r.phases else f"{'':>11}" for _, r in columns]
        print(f"{name:<{width}} " + " ".join(cells))
    print(f"{'total (process wall)':<{width}} " + " ".join(f"{r.timing.wall:11.2f}" for _, r in columns))
    print(f"{'total (process CPU)':<{width}} " + " ".join(f"{r.timing.cpu:11.2f}" for _, r in columns))


# --------------------------------------------------------------------------- py-spy


#: Leaf frames of a thread that waits (for work, for a lock, for its children).
WAITING = re.compile(r"^(Condition\.wait|Queue\.get|Event\.wait|Thread\.join|_wait_for_tstate_lock|"
                     r"select|poll|Popen\.wait|_try_wait|lock\.acquire) ")
_FRAME = re.compile(r" \(([^:()]*)(:\d+)?\)$")
_THREAD = re.compile(r"^thread \((0x[0-9a-f]+|\d+)\):? ?(.*)$")
#: Phases of a build by the first of these frames on a stack (root first).
PHASE_MARKERS = (
    ("ActionRunner.input_artifact", "action inputs: source digests (hashing sources)"),
    ("ActionRunner._outputs_present", "action cache checks"),
    ("Store.get_action", "action cache checks"),
    ("Store.put_action", "action results written"),
    ("FilesTree.run", "FilesTree"),
    ("LayerWrite.run", "LayerWrite"),
    ("LayerCompress.run", "LayerCompress (feeding the compressor)"),
    ("_ThreadedGzipWriter._compress", "isal gzip worker threads (LayerCompress, DockerArchive)"),
    ("_ThreadedGzipWriter._write", "isal gzip writer thread: blob hashed + written"),
    ("ImageAssemble.run", "ImageAssemble"),
    ("DockerArchive.run", "DockerArchive"),
    ("OciLayout.run", "OciLayout"),
    ("OutputTree.materialize", "outputs linked or copied to dtbuild-out/"),
    ("Session._record_inputs", "bookkeeping: the explain record (state.db)"),
    ("SourceDigests.save", "bookkeeping: source digest memo"),
    ("Loader.", "loading BUILD files (glob)"),
    ("Analyzer.", "analysis"),
    ("_find_and_load", "imports"),
)


def summarize_profile(path: Path, rate: int, lines: int) -> None:
    """Busy wall time (waits left out) by build phase, each with its top functions by
    own time, then the top functions over all threads."""
    names_by_id: dict[str, str] = {}
    samples: list[tuple[str, list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = stack.split(";")
        match = _THREAD.match(frames[0])
        thread = frames[0]
        if match:
            thread = match.group(1)
            if match.group(2):
                names_by_id[thread] = match.group(2)
        samples.append((thread, [_FRAME.sub(r" (\1)", f) for f in frames[1:]], int(count_text)))
    threads: collections.Counter[str] = collections.Counter()
    phases: collections.Counter[str] = collections.Counter()
    phase_leaves: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    own: collections.Counter[str] = collections.Counter()
    waiting = 0
    for thread, names, count in samples:
        if not names or WAITING.match(names[-1]):
            waiting += count
            continue
        threads[re.sub(r"-\d+", "-N", names_by_id.get(thread, "MainThread"))] += count
        phase = next((label for name in names for marker, label in PHASE_MARKERS if name.startswith(marker)),
                     "other")
        phases[phase] += count
        phase_leaves[phase][names[-1]] += count
        own[names[-1]] += count
    busy = sum(threads.values())
    print(f"\npy-spy, {path.name}: {busy / rate:.1f} s busy in all threads ({waiting / rate:.1f} s of waiting left "
          f"out); by thread: " + ", ".join(f"{t} {n / rate:.1f} s" for t, n in threads.most_common(6)))
    print("  busy seconds by phase, with the functions that spent them (own time):")
    for phase, count in phases.most_common():
        leaves = ", ".join(f"{name} {n / rate:.1f}" for name, n in phase_leaves[phase].most_common(4))
        print(f"  {count / rate:7.2f}  {phase}: {leaves}")
    print(f"  top {lines} functions by own time, all threads:")
    for name, count in own.most_common(lines):
        print(f"  {count / rate:7.2f}  {name}")


def profile_builds(command: list[str], python: str, trees: dict[str, Path], tmp: Path, out_dir: Path,
                   lines: int) -> None:
    py_spy = Path(python).parent / "py-spy"
    if not py_spy.exists():
        py_spy = Path(shutil.which("py-spy") or "py-spy")
    if subprocess.run([str(py_spy), "--version"], capture_output=True).returncode != 0:
        print(f"\n--profile: py-spy is not installed ({Path(python).parent}/pip install py-spy)")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = 100
    for kind, tree in trees.items():
        workspace, cache = tmp / "ws-profile", tmp / "cache-profile"
        write_workspace(workspace, tree)
        report = out_dir / f"{kind}-gz-cold.txt"
        try:
            env = {**os.environ, "DTBUILD_CACHE_DIR": str(cache), "DTBUILD_BENCH_TIMING": str(tmp / "t.json")}
            run_measured([str(py_spy), "record", "--threads", "--idle", "--nonblocking", "-r", str(rate), "-f", "raw",
                          "-o", str(report), "--", *command, "build", "//:img_gz"], cwd=workspace, env=env)
        finally:
            remove(workspace)
            remove(cache)
        summarize_profile(report, rate, lines)
    print(f"\ncollapsed stacks in {out_dir} (flamegraph.pl, or https://www.speedscope.app)")


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", default=",".join(TREES), help="comma-separated: small, large (default both)")
    parser.add_argument("--compressors", default=",".join(COMPRESSORS),
                        help="comma-separated: gz, zstd, none (default all)")
    parser.add_argument("--runs-small", type=int, default=3, help="runs per median, small tree (default 3)")
    parser.add_argument("--runs-large", type=int, default=1, help="runs per median, large tree (default 1)")
    parser.add_argument("--scale", type=float, default=1.0, help="tree size factor given to gen_tree.py (default 1)")
    parser.add_argument("--no-warm", action="store_true",
                        help="skip the rebuilds (no-op, and after a one-file change)")
    parser.add_argument("--short", action="store_true",
                        help=f"tiny trees (--scale {SHORT_SCALE:g}) and 1 run each: checks that the benchmark works")
    parser.add_argument("--keep-trees", nargs="?", type=Path, const=DEFAULT_TREE_CACHE, metavar="DIR",
                        help=f"generate the trees into DIR and reuse them next time (default {DEFAULT_TREE_CACHE})")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter whose dtbuild to measure (default: this one)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="also run one cold gz build per tree under py-spy, stacks kept in DIR")
    parser.add_argument("--profile-lines", type=int, default=15,
                        help="top functions listed per profile (default 15)")
    args = parser.parse_args()
    if args.short:
        args.scale, args.runs_small, args.runs_large = SHORT_SCALE, 1, 1
    kinds = [t for t in args.trees.split(",") if t]
    compressors = [c for c in args.compressors.split(",") if c]
    for name, allowed in ((kinds, TREES), (compressors, COMPRESSORS)):
        if not name or any(n not in allowed for n in name):
            parser.error(f"choose from {', '.join(allowed)}")
    command = dtbuild_command(args.python)

    with tempfile.TemporaryDirectory(prefix="dtbuild-bench-image-") as tmp_name:
        tmp = Path(tmp_name)
        tree_parent = args.keep_trees or tmp / "trees"
        tree_parent.mkdir(parents=True, exist_ok=True)
        trees = {kind: ensure_tree(kind, args.scale, tree_parent) for kind in kinds}
        print(f"dtbuild: {' '.join(command)}; {os.cpu_count()} CPUs; trees in {tree_parent}")
        print(f"load average before: {os.getloadavg()[0]:.2f} (anything else running skews wall times)")
        for kind, tree in trees.items():
            runs = args.runs_small if kind == "small" else args.runs_large
            files, size = tree_size(tree)
            m = measure_tree(kind, tree, runs, compressors, command, tmp, warm=not args.no_warm)
            print_results(kind, files, size, runs, m, compressors)
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")
        if args.profile:
            profile_builds(command, args.python, trees, tmp, args.profile, args.profile_lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
