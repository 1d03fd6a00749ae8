"""A no-op build reads no blob of the cache and writes nothing in it; a blob deleted by
hand between builds is rebuilt all the same; what has to run starts with the longest
remaining chain; dependency chains of any depth build."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from dtbuild.engine.build import BuildOptions, Session
from dtbuild.engine.store import Store
from dtbuild.engine.workspace import find_workspace

pytestmark = pytest.mark.e2e

CHAIN_WORKSPACE = {
    "pkg/a.txt": "a\n",
    "pkg/b.txt": "b\n",
    "pkg/BUILD": 'files(name = "tree", srcs = ["a.txt", "b.txt"], prefix = "/srv")\n'
                 'genrule(name = "gen", srcs = [":tree"], outs = ["gen.txt"], '
                 'cmd = "find $SRCS -type f | sort | xargs cat > $OUT")\n'
                 'genrule(name = "upper", srcs = [":gen"], outs = ["upper.txt"], '
                 'cmd = "tr a-z A-Z < $SRCS > $OUT")\n'
                 'files(name = "bundle", srcs = [":upper", ":gen"], prefix = "/opt")\n',
}


def _build_in_process(ws: Path) -> Any:
    session = Session(find_workspace(str(ws)))
    result = session.build(session.expand(["//pkg:all"]), BuildOptions(jobs=2), threading.Event())
    assert result.error is None, result.error
    return result


def test_a_no_op_build_reads_no_blob_and_writes_nothing_in_the_cache(write_workspace, monkeypatch,
                                                                     tmp_path) -> None:
    ws = write_workspace(CHAIN_WORKSPACE)
    cache = tmp_path / "cache"
    monkeypatch.setenv("DTBUILD_CACHE_DIR", str(cache))
    assert _build_in_process(ws).stats.executed == 4

    calls: Counter[str] = Counter()
    for name in ("open_blob", "read_blob", "read_directory", "has_blob", "tree_blobs_present", "verify_blob",
                 "get_action", "put_action", "touch_action", "make_durable", "forget_blob"):
        original = getattr(Store, name)

        def counted(self: Store, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Store, name, counted)
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}

    result = _build_in_process(ws)

    assert (result.stats.executed, result.stats.cached) == (0, 4)
    assert calls == Counter(), f"a no-op build used the store: {dict(calls)}"
    after = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert after == before, "a no-op build wrote in the cache"
    assert (ws / "dtbuild-out/pkg/upper.txt").read_text() == "A\nB\n"


def test_a_no_op_build_does_not_import_networkx(write_workspace, run_dtbuild) -> None:
    ws = write_workspace(CHAIN_WORKSPACE)
    run_dtbuild.build(ws, "//pkg:all", check=True)
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "dtbuild.engine.cli", "build", "//pkg:all"],
                          cwd=ws, capture_output=True, text=True,
                          env={**run_dtbuild.env(), "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr
    assert "0 action(s) executed" in done.stderr
    assert "networkx" not in done.stderr


def _blob_of(cache: Path, data: bytes) -> Path:
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    return cache / "cas" / digest[:2] / digest


def test_a_blob_deleted_by_hand_between_builds_is_rebuilt(write_workspace, run_dtbuild, cache_dir) -> None:
    ws = write_workspace(CHAIN_WORKSPACE)
    run_dtbuild.build(ws, "//pkg:all", check=True)
    blob = _blob_of(cache_dir, b"A\nB\n")  # upper.txt, also inside the bundle tree
    assert blob.exists()
    blob.unlink()
    shutil.rmtree(ws / "dtbuild-out/pkg")  # the state database stays: its results are trusted
    assert (ws / "dtbuild-out/.dtbuild/state.db").exists()

    build = run_dtbuild.build(ws, "//pkg:all", check=True)

    assert build.summary["actions"].get("rewound", 0) >= 1, build.stderr
    assert "corrupt cache entry rebuilt" in build.stderr
    assert (ws / "dtbuild-out/pkg/upper.txt").read_text() == "A\nB\n"
    assert (ws / "dtbuild-out/pkg/bundle/opt/upper.txt").read_text() == "A\nB\n"
    assert blob.exists()
    # A downstream action reading the rebuilt blob runs as usual.
    build_file = ws / "pkg/BUILD"
    build_file.write_text(build_file.read_text() + 'genrule(name = "lower", srcs = [":upper"], '
                                                   'outs = ["lower.txt"], cmd = "tr A-Z a-z < $SRCS > $OUT")\n')
    blob.unlink()
    again = run_dtbuild.build(ws, "//pkg:lower", check=True)
    assert again.executed == 1
    assert again.summary["actions"].get("rewound", 0) == 1
    assert (ws / "dtbuild-out/pkg/lower.txt").read_text() == "a\nb\n"


OBSERVER = '''
import json
import os

from dtbuild.plugins import hookimpl


@hookimpl
def dtbuild_action_started(label, mnemonic, description):
    with open(os.environ["OBSERVED"], "a") as f:
        f.write(json.dumps(label) + "\\n")
'''


def test_the_longest_chain_starts_first(write_workspace, run_dtbuild, tmp_path) -> None:
    """Two chains of two genrules on one job: the quick chain comes first in the BUILD
    file, the slow one (by the durations of its last run) starts first."""
    chain = ('genrule(name = "{n}1", srcs = ["seed.txt"], outs = ["{n}1.txt"], cmd = "{sleep}cat $SRCS > $OUT")\n'
             'genrule(name = "{n}2", srcs = [":{n}1"], outs = ["{n}2.txt"], cmd = "{sleep}cat $SRCS > $OUT")\n')
    ws = write_workspace({
        "tools/observer.py": OBSERVER,
        "pkg/seed.txt": "1\n",
        "pkg/BUILD": chain.format(n="quick", sleep="") + chain.format(n="slow", sleep="sleep 0.5; "),
    }, config='[plugins]\nmodules = ["tools/observer.py"]\n')
    observed = tmp_path / "observed.jsonl"
    run_dtbuild.build(ws, "//pkg:all", "--jobs", "1", check=True, env={"OBSERVED": str(observed)})
    observed.unlink()
    (ws / "pkg/seed.txt").write_text("2\n")  # every action runs again

    build = run_dtbuild.build(ws, "//pkg:all", "--jobs", "1", check=True, env={"OBSERVED": str(observed)})

    started = [json.loads(line) for line in observed.read_text().splitlines()]
    assert sorted(started) == ["//pkg:quick1", "//pkg:quick2", "//pkg:slow1", "//pkg:slow2"]
    assert started[0] == "//pkg:slow1", started
    path = build.summary["critical_path"]
    assert [step["label"] for step in path["actions"]] == ["//pkg:slow1", "//pkg:slow2"]
    assert path["seconds"] == pytest.approx(sum(step["seconds"] for step in path["actions"]), abs=0.01)
    assert "critical path" in build.stderr
    # A no-op build names no critical path.
    noop = run_dtbuild.build(ws, "//pkg:all", check=True)
    assert noop.summary["critical_path"] == {"seconds": 0, "actions": []}


def test_a_chain_ten_thousand_deep_builds_explains_and_queries(write_workspace, run_dtbuild) -> None:
    depth = 10_000
    ws = write_workspace({
        "pkg/a.txt": "a\n",
        "pkg/BUILD": f'[files(name = "f%d" % i, srcs = [":f%d" % (i - 1)] if i else ["a.txt"]) '
                     f'for i in range({depth})]\n',
    })
    top = f"//pkg:f{depth - 1}"
    first = run_dtbuild.build(ws, top, check=True)
    assert first.executed == depth
    assert (ws / f"dtbuild-out/pkg/f{depth - 1}/a.txt").read_text() == "a\n"
    assert run_dtbuild.build(ws, top, check=True).executed == 0
    code, out, err = run_dtbuild(ws, "explain", top)
    assert code == 0, err
    assert f"0 of {depth} action(s) would run" in out
    code, out, err = run_dtbuild(ws, "query", f"somepath({top}, //pkg:a.txt)")
    assert code == 0, err
    assert len(out.splitlines()) == depth + 1
