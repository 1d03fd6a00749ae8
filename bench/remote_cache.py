"""Remote cache benchmark: a cold build that fills the remote cache against a warm-remote
build (a second copy of the workspace, at another path, with an empty local cache: every
result comes from the remote), over both protocols: Bazel's HTTP cache (nginx WebDAV)
and REAPI over gRPC (buildbox-casd).

Prints figures and checks what the figures rest on (a warm-remote build that ran an
action, or made another image, is not a remote hit: the script exits 1), but asserts no
time. Run it from the repository root with the virtualenv made by scripts/setup.sh:

    .venv/bin/python bench/remote_cache.py                       # both protocols, 1 GiB layer
    .venv/bin/python bench/remote_cache.py --protocols http      # nginx only
    .venv/bin/python bench/remote_cache.py --large-mib 0         # no large-layer case
    .venv/bin/python bench/remote_cache.py --profile DIR         # + py-spy on each warm-remote build
    .venv/bin/python bench/remote_cache.py --short               # small inputs (what CI runs)

Two workspaces, generated once into a temp dir and copied (hard links) for each build so
that every build starts without dtbuild-out/ or .dtbuild/:

* the monorepo: packages p00..pNN, each a `files` tree of generated content (half
  pseudo-random bytes, half text, different in every package) and an `image` of it on a
  shared base image (//base:img); every 4th package also a genrule (an index of its
  tree, hashed in the sandbox) copied into its image;
* the large layer: one image (compressor "none": the build is disk-bound, not
  compressor-bound) of one file of --large-mib MiB of incompressible bytes (AES-CTR of
  zeros by openssl, else Python's seeded random; the same bytes every time).

Measured, each as a whole `dtbuild build //...` process with a local cache of its own
(DTBUILD_CACHE_DIR), wall and CPU seconds by bench/measure.py:

* local cold: no remote (the baseline), then local no-op: the same again;
* for each protocol, with a fresh server: cold (empty local cache, uploading), then
  warm-remote (another copy, empty local cache, --remote-upload=false);
* for the large layer, the floors of a remote hit: `curl -o /dev/null` of the layer's
  blob from nginx (loopback HTTP, no Python), `curl -o FILE` (the same, written to the
  disk the local cache is on, as a remote hit must), a Python socket copy of the same bytes over
  127.0.0.1 (`socket.sendfile` to a reader that discards), and hashlib's sha256 of the
  source file (which a warm build must hash too).

Correctness while measuring: every warm-remote build executes 0 actions, takes every one
from the remote cache, makes the same image digests as the cold build (and the local
one), and no build reports a remote warning. Goals printed: warm-remote at least 10x as
fast as cold, and a 1 GiB remote hit at loopback speed (the ratio to curl's time).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from random import Random

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import MIB, Measured, dtbuild_command, print_table, remove, run_measured

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
from servers_casd import CasdError, buildbox_tool, start_casd  # noqa: E402
from servers_nginx import NGINX, start_nginx_cache  # noqa: E402

PROTOCOLS = ("http", "grpc")
WARM_SPEEDUP_GOAL = 10.0  # warm-remote at least 10x as fast as cold
LOOPBACK_RATIO_GOAL = 1.5  # a large remote hit within 1.5x of curl's time for the blob
GENRULE_EVERY = 4  # packages
WORDS = b"layer image build cache digest manifest config rootfs overlay tar zstd gzip label target rule".split()
INDEX_CMD = "find $SRCS -type f | sort | xargs sha256sum | sha256sum > $OUT"


@dataclass(frozen=True)
class Scale:
    packages: int
    files: int  # per package
    max_file_kib: int  # file sizes 1..max KiB
    large_mib: int


FULL = Scale(packages=40, files=100, max_file_kib=64, large_mib=1024)
SHORT = Scale(packages=6, files=20, max_file_kib=8, large_mib=64)


# --------------------------------------------------------------------------- workspaces


def _text(rng: Random, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += rng.choice(WORDS) + (b"\n" if rng.random() < 0.1 else b" ")
    return bytes(out[:n])


def _write_tree(directory: Path, rng: Random, files: int, max_kib: int) -> int:
    size = 0
    for i in range(files):
        sub = directory / f"d{i % 8}"
        sub.mkdir(parents=True, exist_ok=True)
        n = rng.randint(1024, max_kib * 1024)
        (sub / f"f{i:04d}.dat").write_bytes(rng.randbytes(n) if i % 2 else _text(rng, n))
        size += n
    return size


def write_monorepo(root: Path, scale: Scale, compressor: str) -> tuple[list[str], int]:
    """The monorepo (module docstring) at `root`: (its image labels, bytes of sources)."""
    root.mkdir(parents=True)
    (root / "dtbuild.toml").write_text("# generated by bench/remote_cache.py\n")
    width = len(str(scale.packages - 1))
    size = _write_tree(root / "base" / "tree", Random("base"), scale.files, scale.max_file_kib)
    (root / "base" / "BUILD").write_text(
        'files(name = "tree", srcs = glob(["tree/**"]), strip_prefix = "tree", prefix = "/base")\n'
        f'image(name = "img", copy_to_root = [":tree"], compressor = "{compressor}")\n')
    images = ["//base:img"]
    for i in range(scale.packages):
        name = f"p{i:0{width}d}"
        size += _write_tree(root / name / "tree", Random(name), scale.files, scale.max_file_kib)
        rules = [f'files(name = "tree", srcs = glob(["tree/**"]), strip_prefix = "tree", prefix = "/{name}")\n']
        contents = [":tree"]
        if i % GENRULE_EVERY == 0:
            rules.append(f'genrule(name = "index", srcs = glob(["tree/**"]), outs = ["index.txt"],\n'
                         f'        cmd = "{INDEX_CMD}")\n')
            rules.append(f'files(name = "index_files", srcs = [":index"], prefix = "/{name}/index")\n')
            contents.append(":index_files")
        rules.append(f'image(name = "img", from_image = "//base:img", copy_to_root = {json.dumps(contents)},\n'
                     f'      compressor = "{compressor}")\n')
        (root / name / "BUILD").write_text("\n".join(rules))
        images.append(f"//{name}:img")
    return images, size


def write_large(root: Path, mib: int) -> Path:
    """The large-layer workspace: one image of one file of `mib` MiB; returns the file."""
    (root / "big").mkdir(parents=True)
    (root / "dtbuild.toml").write_text("# generated by bench/remote_cache.py\n")
    (root / "big" / "BUILD").write_text(
        'files(name = "blob", srcs = ["big.bin"], prefix = "/data")\n'
        'image(name = "img", copy_to_root = [":blob"], compressor = "none")\n')
    path = root / "big" / "big.bin"
    size = mib * MIB
    if shutil.which("openssl"):
        command = (f"openssl enc -aes-128-ctr -nosalt -K 000102030405060708090a0b0c0d0e0f "
                   f"-iv 00000000000000000000000000000000 < /dev/zero 2>/dev/null | head -c {size} > '{path}'")
        subprocess.run(command, shell=True, check=False, executable="/bin/bash")
    if not path.exists() or path.stat().st_size != size:
        rng = Random("large")
        with open(path, "wb") as out:
            for _ in range(mib // 4):
                out.write(rng.randbytes(4 * MIB))
            out.write(rng.randbytes(size % (4 * MIB)))
    return path


def copy_workspace(src: Path, dest: Path) -> None:
    """A copy made of hard links (no build changes a source), else a real copy."""
    if subprocess.run(["cp", "-al", str(src), str(dest)], capture_output=True).returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest)


# --------------------------------------------------------------------------- builds


@dataclass
class Build:
    name: str
    measured: Measured
    executed: int
    cached: int
    remote_cached: int
    downloaded: int
    uploaded: int
    uploaded_results: int
    warnings: list[str]
    digests: dict[str, str | None]


class Bench:
    """Runs builds in copies of generated workspaces under one scratch dir."""

    def __init__(self, command: list[str], tmp: Path, profile: Path | None) -> None:
        self.command = command
        self.tmp = tmp
        self.profile = profile
        self.py_spy = _py_spy() if profile is not None else None
        self.failures: list[str] = []
        self._count = 0

    def build(self, name: str, source: Path, *, remote: str | None = None, upload: bool = True,
              workspace: Path | None = None, cache: Path | None = None, profile_as: str | None = None) -> Build:
        """`dtbuild build //...` in a fresh copy of `source` (or in `workspace`) with an
        empty local cache (or `cache`)."""
        self._count += 1
        if workspace is None:
            workspace = self.tmp / f"ws-{self._count}"
            copy_workspace(source, workspace)
        cache = cache or self.tmp / f"cache-{self._count}"
        summary_file = self.tmp / f"summary-{self._count}.json"
        argv = [*self.command, "build", "//...", "--summary-json", str(summary_file)]
        if remote is not None:
            argv += ["--remote-cache", remote] + ([] if upload else ["--remote-upload=false"])
        if profile_as and self.py_spy is not None and self.profile is not None:
            self.profile.mkdir(parents=True, exist_ok=True)
            out = self.profile / f"{profile_as}.txt"
            argv = [self.py_spy, "record", "--threads", "--idle", "--nonblocking", "-r", "100", "-f", "raw",
                    "-o", str(out), "--", *argv]
        env = {**os.environ, "DTBUILD_CACHE_DIR": str(cache)}
        for key in [k for k in env if k.startswith("DTBUILD_REMOTE_")]:
            del env[key]  # the remote is what this script says, nothing else
        measured = run_measured(argv, cwd=workspace, env=env)
        summary = json.loads(summary_file.read_text())
        actions, moved = summary.get("actions", {}), summary.get("remote") or {}
        return Build(name, measured, actions.get("executed", -1), actions.get("cached", 0),
                     actions.get("remote_cached", 0), moved.get("downloaded_bytes", 0),
                     moved.get("uploaded_bytes", 0), moved.get("uploaded_results", 0), moved.get("warnings", []),
                     {label: t.get("manifest_digest") for label, t in summary.get("targets", {}).items()})

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            self.failures.append(message)
            print(f"CHECK FAILED: {message}", file=sys.stderr, flush=True)

    def check_cold(self, cold: Build, where: str) -> None:
        self.check(cold.executed > 0 and cold.uploaded_results > 0,
                   f"{where}: the cold build executed {cold.executed} actions and uploaded {cold.uploaded_results} "
                   "results (expected some of each)")
        self.check(not cold.warnings, f"{where}: the cold build warned: {cold.warnings}")

    def check_warm(self, warm: Build, cold: Build, where: str) -> None:
        self.check(warm.executed == 0, f"{where}: the warm-remote build executed {warm.executed} actions (expected 0)")
        self.check(warm.remote_cached > 0 and warm.cached == 0,
                   f"{where}: the warm-remote build took {warm.remote_cached} actions from the remote and "
                   f"{warm.cached} from the local cache (expected all from the remote)")
        self.check(not warm.warnings, f"{where}: the warm-remote build warned: {warm.warnings}")
        self.check(warm.uploaded == 0, f"{where}: the warm-remote build uploaded {warm.uploaded} bytes "
                                       "with --remote-upload=false")
        self.check_digests(warm, cold, where)

    def check_digests(self, build: Build, reference: Build, where: str) -> None:
        images = {label: d for label, d in reference.digests.items() if d}
        self.check(bool(images), f"{where}: the {reference.name} build reported no image digests")
        differ = [label for label, d in images.items() if build.digests.get(label) != d]
        self.check(not differ, f"{where}: the {build.name} build made other images than the {reference.name} "
                               f"build: {', '.join(differ[:5])}")

    def clean(self) -> None:
        """Remove every workspace copy and cache made so far (free disk is limited)."""
        for path in list(self.tmp.iterdir()):
            if path.name.startswith(("ws-", "cache-", "summary-", "server-")):
                remove(path) if path.is_dir() else path.unlink()


def _py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    found = str(candidate) if candidate.exists() else shutil.which("py-spy")
    if found is None:
        print(f"--profile: py-spy is not installed ({Path(sys.executable).parent}/pip install py-spy)")
    return found


@contextmanager
def server(protocol: str, workdir: Path) -> Iterator[tuple[str, Path]]:
    """A fresh remote cache: (its URL, where it keeps blobs), stopped on exit."""
    if protocol == "http":
        nginx = start_nginx_cache(workdir)
        try:
            yield nginx.url, nginx.root / "cas"
        finally:
            nginx.stop()
    else:
        casd = start_casd(workdir)
        try:
            yield casd.url, casd.storage / "cas" / "objects"
        finally:
            casd.stop()


def stored_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


def largest_blob(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# --------------------------------------------------------------------------- floors


def socket_copy_seconds(path: Path) -> float:
    """Seconds to send the file at `path` over a 127.0.0.1 TCP connection (sendfile) to
    a Python reader that discards what it receives: loopback without HTTP or hashing."""
    size = path.stat().st_size
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def send() -> None:
            connection, _ = listener.accept()
            with connection, open(path, "rb") as f:
                connection.sendfile(f)

        sender = threading.Thread(target=send)
        sender.start()
        buffer = memoryview(bytearray(4 * MIB))
        start = time.perf_counter()
        received = 0
        with socket.create_connection(("127.0.0.1", port)) as sock:
            while received < size:
                n = sock.recv_into(buffer)
                if not n:
                    break
                received += n
        seconds = time.perf_counter() - start
        sender.join()
    return seconds


def hash_seconds(path: Path) -> float:
    """Seconds to hash the file at `path` with hashlib's sha256 (what a build does to a
    source before it can look its actions up)."""
    start = time.perf_counter()
    with open(path, "rb") as f:
        hashlib.file_digest(f, "sha256")
    return time.perf_counter() - start


def process_seconds(argv: list[str]) -> float:
    return run_measured(argv).wall


def best_of(runs: int, measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(runs))


# --------------------------------------------------------------------------- cases


@dataclass
class ProtocolResult:
    protocol: str
    cold: Build
    warm: Build
    stored: int


@dataclass
class LargeResult:
    protocol: str
    cold: Build
    warm: Build
    blob_bytes: int
    stored: int = 0


def bench_monorepo(bench: Bench, source: Path, protocols: list[str]) -> tuple[Build, Build, list[ProtocolResult]]:
    print("monorepo: local cold build ...", file=sys.stderr, flush=True)
    local = bench.build("local cold", source)
    ws, cache = bench.tmp / f"ws-{bench._count}", bench.tmp / f"cache-{bench._count}"
    noop = bench.build("local no-op", source, workspace=ws, cache=cache)
    bench.check(noop.executed == 0, f"monorepo: the local no-op build executed {noop.executed} actions")
    bench.clean()
    results = []
    for protocol in protocols:
        with server(protocol, bench.tmp / f"server-{protocol}") as (url, blobs):
            print(f"monorepo, {protocol}: cold build, then warm-remote build ({url}) ...", file=sys.stderr,
                  flush=True)
            cold = bench.build(f"{protocol} cold", source, remote=url)
            bench.check_cold(cold, f"monorepo, {protocol}")
            bench.check_digests(cold, local, f"monorepo, {protocol}")
            warm = bench.build(f"{protocol} warm-remote", source, remote=url, upload=False,
                               profile_as=f"monorepo-{protocol}-warm-remote")
            bench.check_warm(warm, cold, f"monorepo, {protocol}")
            results.append(ProtocolResult(protocol, cold, warm, stored_bytes(blobs)))
        bench.clean()
    return local, noop, results


def bench_large(bench: Bench, source: Path, big: Path, protocols: list[str]) -> tuple[Build, dict[str, float],
                                                                                     list[LargeResult]]:
    size = big.stat().st_size
    print(f"large layer ({size / MIB:,.0f} MiB): local cold build ...", file=sys.stderr, flush=True)
    local = bench.build("local cold", source)
    bench.clean()
    floors = {"sha256 of the source (hashlib)": best_of(2, lambda: hash_seconds(big)),
              "Python socket copy, 127.0.0.1": best_of(2, lambda: socket_copy_seconds(big))}
    results = []
    for protocol in protocols:
        with server(protocol, bench.tmp / f"server-{protocol}") as (url, blobs):
            print(f"large layer, {protocol}: cold build, then warm-remote build ...", file=sys.stderr, flush=True)
            cold = bench.build(f"{protocol} cold", source, remote=url)
            bench.check_cold(cold, f"large layer, {protocol}")
            bench.check_digests(cold, local, f"large layer, {protocol}")
            blob = largest_blob(blobs)
            result = LargeResult(protocol, cold, cold, blob.stat().st_size)
            if protocol == "http" and shutil.which("curl"):
                curl = ["curl", "-sSf", "-o", "/dev/null", f"{url}/cas/{blob.name}"]
                floors["curl -o /dev/null, nginx"] = best_of(2, functools.partial(process_seconds, curl))
                target = bench.tmp / "ws-curl-copy"
                to_disk = [*curl[:3], str(target), curl[-1]]
                floors["curl -o FILE (to disk), nginx"] = best_of(2, functools.partial(process_seconds, to_disk))
                target.unlink()
            result.warm = bench.build(f"{protocol} warm-remote", source, remote=url, upload=False,
                                      profile_as=f"large-{protocol}-warm-remote")
            bench.check_warm(result.warm, cold, f"large layer, {protocol}")
            result.stored = stored_bytes(blobs)
            results.append(result)
        bench.clean()
    return local, floors, results


# --------------------------------------------------------------------------- output


def _mib(n: int) -> str:
    return f"{n / MIB:,.1f}"


def _row(build: Build, ratio: str = "") -> list[str]:
    m = build.measured
    speed = f"{build.downloaded / MIB / m.wall:,.0f}" if build.downloaded else "-"
    return [build.name, f"{m.wall:.2f}", f"{m.cpu:.2f}", ratio, str(build.executed),
            str(build.remote_cached), _mib(build.downloaded), _mib(build.uploaded), speed]


HEADER = ["build", "wall s", "CPU s", "cold/warm", "executed", "from remote", "downloaded MiB", "uploaded MiB",
          "download MiB/s"]


def print_monorepo(images: list[str], size: int, local: Build, noop: Build, results: list[ProtocolResult]) -> None:
    print(f"\nmonorepo: {len(images)} images, {size / MIB:,.1f} MiB of sources; one run each "
          "(download MiB/s: downloaded bytes over the build's wall time)")
    rows = [_row(local), _row(noop)]
    for r in results:
        rows += [_row(r.cold), _row(r.warm, f"{r.cold.measured.wall / r.warm.measured.wall:.1f}x")]
    print_table(HEADER, rows)
    for r in results:
        speedup = r.cold.measured.wall / r.warm.measured.wall
        print(f"{r.protocol}: warm-remote is {speedup:.1f}x as fast as cold (goal: at least {WARM_SPEEDUP_GOAL:g}x), "
              f"{local.measured.wall / r.warm.measured.wall:.1f}x as fast as the local cold build; "
              f"the server stored {_mib(r.stored)} MiB of blobs")


def print_large(size: int, local: Build, floors: dict[str, float], results: list[LargeResult]) -> None:
    print(f"\nlarge layer: one image of one {size / MIB:,.0f} MiB file of incompressible bytes, compressor none")
    rows = [_row(local)]
    for r in results:
        rows += [_row(r.cold), _row(r.warm, f"{r.cold.measured.wall / r.warm.measured.wall:.1f}x")]
    print_table(HEADER, rows)
    print(f"\nlarge layer: floors of a remote hit ({size / MIB:,.0f} MiB, best of 2, page cache warm)")
    print_table(["floor", "s", "MiB/s"], [[name, f"{s:.2f}", f"{size / MIB / s:,.0f}"] for name, s in floors.items()])
    curl = floors.get("curl -o /dev/null, nginx")
    wire = floors.get("Python socket copy, 127.0.0.1")
    disk = floors.get("curl -o FILE (to disk), nginx")
    for r in results:
        wall = r.warm.measured.wall
        parts = [f"{r.protocol}: warm-remote {wall:.2f} s for {_mib(r.warm.downloaded)} MiB downloaded "
                 f"(layer blob {_mib(r.blob_bytes)} MiB; the cold build uploaded {_mib(r.cold.uploaded)} MiB, "
                 f"the server stored {_mib(r.stored)} MiB)"]
        if curl:
            # curl's time for every byte the build downloaded (the layer, and the
            # docker-archive that holds it once more)
            loopback = curl * r.warm.downloaded / size
            parts.append(f"{wall / loopback:.1f}x curl's time for those bytes (goal: at most "
                         f"{LOOPBACK_RATIO_GOAL:g}x)")
        if disk:
            parts.append(f"{wall / (disk * r.warm.downloaded / size):.1f}x curl's to disk")
        if wire:
            parts.append(f"{wall / (wire * r.warm.downloaded / size):.1f}x the socket copy's")
        print("; ".join(parts))


# --------------------------------------------------------------------------- main


def available(protocols: list[str]) -> list[str]:
    """The protocols whose server is installed (a missing one is said, not an error)."""
    usable = []
    for protocol in protocols:
        if protocol == "http" and not Path(NGINX).exists():
            print(f"http: nginx is not installed ({NGINX}); skipped", file=sys.stderr)
        elif protocol == "grpc" and buildbox_tool("buildbox-casd") is None:
            print("grpc: buildbox-casd is not installed (scripts/setup.sh); skipped", file=sys.stderr)
        else:
            usable.append(protocol)
    return usable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated: http, grpc (default both)")
    parser.add_argument("--packages", type=int, help=f"packages of the monorepo (default {FULL.packages})")
    parser.add_argument("--files", type=int, help=f"files per package (default {FULL.files})")
    parser.add_argument("--large-mib", type=int, help=f"size of the large layer's file, 0: no large case "
                                                      f"(default {FULL.large_mib})")
    parser.add_argument("--compressor", default="gz", help="compressor of the monorepo's images (default gz)")
    parser.add_argument("--short", action="store_true",
                        help=f"{SHORT.packages} packages of {SHORT.files} files and a {SHORT.large_mib} MiB layer: "
                             "checks that the benchmark works")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter whose dtbuild to measure (default: this one)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run each warm-remote build under py-spy, its stacks kept in DIR")
    args = parser.parse_args()
    base = SHORT if args.short else FULL
    scale = Scale(args.packages if args.packages is not None else base.packages,
                  args.files if args.files is not None else base.files, base.max_file_kib,
                  args.large_mib if args.large_mib is not None else base.large_mib)
    protocols = [p for p in args.protocols.split(",") if p]
    if not protocols or any(p not in PROTOCOLS for p in protocols):
        parser.error(f"--protocols: choose from {', '.join(PROTOCOLS)}")
    if scale.packages < 1 or scale.files < 1 or scale.large_mib < 0:
        parser.error("--packages and --files must be at least 1, --large-mib at least 0")
    protocols = available(protocols)
    if not protocols:
        print("error: no remote cache server to measure against (install nginx or run scripts/setup.sh)",
              file=sys.stderr)
        return 1
    command = dtbuild_command(args.python)
    print(f"dtbuild: {' '.join(command)}; {os.cpu_count()} CPUs; protocols: {', '.join(protocols)}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (anything else running skews wall times)")
    with tempfile.TemporaryDirectory(prefix="dtbuild-bench-remote-") as tmp_name:
        tmp = Path(tmp_name)
        bench = Bench(command, tmp, args.profile)
        try:
            images, size = write_monorepo(tmp / "src-monorepo", scale, args.compressor)
            local, noop, results = bench_monorepo(bench, tmp / "src-monorepo", protocols)
            print_monorepo(images, size, local, noop, results)
            remove(tmp / "src-monorepo")
            if scale.large_mib:
                print(f"generating the {scale.large_mib:,} MiB file ...", file=sys.stderr, flush=True)
                big = write_large(tmp / "src-large", scale.large_mib)
                large_local, floors, large = bench_large(bench, tmp / "src-large", big, protocols)
                print_large(big.stat().st_size, large_local, floors, large)
        except (CasdError, RuntimeError) as e:
            print(f"error: a remote cache server would not start: {e}", file=sys.stderr)
            return 1
        finally:
            bench.clean()
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if args.profile and bench.py_spy:
        print(f"py-spy stacks of the warm-remote builds in {args.profile} (flamegraph.pl, or https://www.speedscope.app)")
    if bench.failures:
        print(f"\n{len(bench.failures)} check(s) failed:\n" + "\n".join(f"  {f}" for f in bench.failures))
        return 1
    print("checks: every warm-remote build executed 0 actions and made the same images as the cold builds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
