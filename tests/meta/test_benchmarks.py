"""The benchmarks keep working: each runs in its short mode (tiny inputs, one run), exits 0
and prints its tables. Nothing here looks at a figure: tests never time anything."""

from __future__ import annotations

import os
import subprocess
import sys
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
