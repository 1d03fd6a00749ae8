"""The benchmarks keep working: each runs in its short mode (tiny inputs, one run), exits 0
and prints its tables. Nothing here looks at a figure: tests never time anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: benchmark script -> (programs it runs besides dtbuild, what its output must show)
BENCHMARKS = {
    "engine_noop.py": ((), ["measurement", "seconds", "actions", "dtbuild --version (start-up)",
                            "monorepo fixture: no-op build", "50 targets: no-op build", "0 executed"]),
    "engine_scale.py": (("bwrap",), ["targets", "measurement", "wall s", "CPU s", "peak RSS MiB", "written MiB",
                                     "cold", "no-op", "one-leaf change", "BUILD-attribute change", "query rdeps",
                                     "N=100", "N=200", "0 executed"]),
    "image_build.py": (("tar", "openssl", "pigz", "zstd", "jq", "sha256sum"),
                       ["compressor", "run", "wall s", "/seed", "/floor", "CPU s", "written MiB", "peak RSS MiB",
                        "output MiB", "actions", "floor", "seed pipeline", "dtbuild cold", "dtbuild no-op",
                        "dtbuild one-file change", "small tree", "large tree", "dtbuild's phases"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(BENCHMARKS))
def test_benchmark_short_mode_runs_and_prints_its_tables(script: str, tmp_path: Path,
                                                         require_tool: Callable[[str], str]) -> None:
    tools, expected = BENCHMARKS[script]
    for tool in tools:
        require_tool(tool)
    if script == "image_build.py":
        sys.path.insert(0, str(ROOT / "bench"))
        try:
            from image_build import SHARED_BENCH
        finally:
            sys.path.remove(str(ROOT / "bench"))
        if not (SHARED_BENCH / "gen_tree.py").is_file():
            # Not a tool the setup installs: the baseline scripts live beside the
            # repository (bench/README.md), and without them there is nothing to compare.
            pytest.skip(f"the shared baseline scripts are not at {SHARED_BENCH} (set DTBUILD_SHARED_BENCH)")
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the benchmarks' scratch dirs and caches
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--short"], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} --short exited {done.returncode}:\n{done.stderr[-3000:]}"
    missing = [text for text in expected if text not in done.stdout]
    assert not missing, f"{script} --short did not print {missing}:\n{done.stdout}"


@pytest.mark.slow
def test_remote_cache_benchmark_short_mode_checks_warm_remote_builds(require_tool: Callable[[str], str]) -> None:
    """bench/remote_cache.py --short against nginx and buildbox-casd: it exits 0 only
    when every warm-remote build ran no action and made the cold build's images."""
    for tool in ("nginx", "bwrap", "curl"):
        require_tool(tool)
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from servers_casd import require_buildbox
    finally:
        sys.path.remove(str(ROOT / "tests"))
    require_buildbox()
    # Not tmp_path: run as root, nginx's workers (nobody) keep their files below TMPDIR,
    # and they cannot traverse pytest's /tmp/pytest-of-root (mode 0700).
    scratch = Path(tempfile.mkdtemp(prefix="dtbuild-test-bench-remote-"))
    scratch.chmod(0o755)
    try:
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "remote_cache.py"), "--short"], cwd=ROOT,
                              env={**os.environ, "TMPDIR": str(scratch)}, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert done.returncode == 0, (f"remote_cache.py --short exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                                  f"{done.stderr[-3000:]}")
    expected = ["monorepo:", "large layer:", "local cold", "local no-op", "http cold", "http warm-remote",
                "grpc cold", "grpc warm-remote", "cold/warm", "downloaded MiB", "uploaded MiB", "download MiB/s",
                "curl -o /dev/null, nginx", "Python socket copy", "every warm-remote build executed 0 actions"]
    missing = [text for text in expected if text not in done.stdout]
    assert not missing, f"remote_cache.py --short did not print {missing}:\n{done.stdout}"
