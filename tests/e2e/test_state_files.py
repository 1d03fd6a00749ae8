"""The workspace state files are an optimisation only: any content in them is a miss,
never a broken build; commands that remove what builds use wait for those builds; and
observers hear how a build really ended."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

#: The output index, and the state database (results index, explain record, source
#: digests, durations): valid JSON written over it makes it a damaged database.
STATE_FILES = ("outputs.json", "state.db")
#: Valid JSON of every shape but the right one.
WRONG_SHAPES = ([1, 2], "text", 7, None, {"x": 5}, {"x": [1]}, {"x": {"y": "z"}})


def _outputs(ws: Path) -> dict[str, bytes]:
    out = ws / "dtbuild-out"
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".dtbuild" not in p.parts}


@pytest.mark.parametrize("shape", WRONG_SHAPES, ids=[json.dumps(s) for s in WRONG_SHAPES])
def test_state_files_of_another_shape_are_ignored(monorepo, run_dtbuild, shape) -> None:
    run_dtbuild.build(monorepo, "//app:app", check=True)
    expected = _outputs(monorepo)
    state = monorepo / "dtbuild-out" / ".dtbuild"
    for name in STATE_FILES:
        (state / name).write_text(json.dumps(shape))
    code, _, err = run_dtbuild(monorepo, "explain", "//app:app")
    assert code == 0, err
    assert "Traceback" not in err
    again = run_dtbuild.build(monorepo, "//app:app", check=True)
    assert "Traceback" not in again.stderr
    assert _outputs(monorepo) == expected
    # The files are rewritten in their own shape: the next build runs nothing.
    assert run_dtbuild.build(monorepo, "//app:app", check=True).executed == 0


def test_clean_expunge_waits_for_a_running_build(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"pkg/BUILD": 'genrule(name = "slow", outs = ["slow.txt"], '
                                       'cmd = "sleep 3; echo done > $OUT")\n'})
    build = run_dtbuild.popen(ws, "build", "//pkg:slow", stdout=-1, stderr=-1)
    marker = ws / "dtbuild-out" / ".dtbuild"
    deadline = time.monotonic() + 30
    while not (marker / "lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the build now holds the locks and runs its command
    code, _, err = run_dtbuild(ws, "clean", "--expunge")
    assert code == 0, err
    _, build_err = build.communicate(timeout=60)
    assert build.returncode == 0, build_err.decode()
    assert "waiting" in err, err
    cache = run_dtbuild.cache_dir
    # The cache was emptied after the build, not under it.
    assert sorted(p.name for p in cache.iterdir()) == ["lock"]
    assert not (ws / "dtbuild-out").exists()
    assert run_dtbuild.build(ws, "//pkg:slow", check=True).executed == 1
    assert (ws / "dtbuild-out" / "pkg" / "slow.txt").read_text() == "done\n"


OBSERVER = '''
import json
import os

from dtbuild.plugins import hookimpl


@hookimpl
def dtbuild_build_finished(summary, success):
    with open(os.environ["OBSERVED"], "a") as f:
        f.write(json.dumps({"success": success, "summary": summary}) + "\\n")
'''


def test_stream_reports_a_failed_build_as_failed(write_workspace, run_dtbuild, tmp_path) -> None:
    ws = write_workspace({
        "tools/observer.py": OBSERVER,
        "pkg/BUILD": 'genrule(name = "broken", outs = ["x"], cmd = "exit 3")\n'
                     'files(name = "f", srcs = [":broken"])\n'
                     'image(name = "img", copy_to_root = [":f"])\n'},
        config='[plugins]\nmodules = ["tools/observer.py"]\n')
    observed = tmp_path / "observed.jsonl"
    code, _, err = run_dtbuild(ws, "stream", "//pkg:img", env={"OBSERVED": str(observed)})
    assert code == 1, err
    events = [json.loads(line) for line in observed.read_text().splitlines()]
    assert events and events[-1]["success"] is False, events
    assert events[-1]["summary"]["actions"]["failed"] == 1


def test_results_index_entries_of_another_shape_are_misses(monorepo, run_dtbuild) -> None:
    run_dtbuild.build(monorepo, "//app:app", check=True)
    expected = _outputs(monorepo)
    with sqlite3.connect(monorepo / "dtbuild-out" / ".dtbuild" / "state.db") as db:
        assert db.execute("SELECT count(*) FROM results").fetchone()[0] == 5
        db.execute("""UPDATE results SET result = '{"outputs": 5}'""")
    db.close()
    again = run_dtbuild.build(monorepo, "//app:app", check=True)
    assert again.executed == 0, "the action cache still holds every result"
    assert _outputs(monorepo) == expected


def _state_db(ws: Path) -> Path:
    return ws / "dtbuild-out" / ".dtbuild" / "state.db"


@pytest.mark.parametrize("damage", ["garbage", "foreign", "truncated", "wal"])
def test_a_damaged_or_foreign_state_database_is_a_miss(monorepo, run_dtbuild, damage) -> None:
    run_dtbuild.build(monorepo, "//app:app", check=True)
    expected = _outputs(monorepo)
    db = _state_db(monorepo)
    if damage == "garbage":
        db.write_bytes(b"SQLite format 3\0" + b"\xff" * 8192)
    elif damage == "foreign":
        db.unlink()
        with sqlite3.connect(db) as other:
            other.execute("CREATE TABLE results (x)")
            other.execute("INSERT INTO results VALUES (1)")
        other.close()
    elif damage == "truncated":
        db.write_bytes(db.read_bytes()[:1500])
    else:
        db.with_name("state.db-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\x00" * 100)
    code, _, err = run_dtbuild(monorepo, "explain", "//app:app")
    assert code == 0, err
    assert "Traceback" not in err
    again = run_dtbuild.build(monorepo, "//app:app", check=True)
    assert "Traceback" not in again.stderr
    assert again.executed == 0, "the action cache still holds every result"
    assert _outputs(monorepo) == expected
    # The database was made again: the next build finds its results there.
    with sqlite3.connect(db) as fresh:
        assert fresh.execute("SELECT count(*) FROM results").fetchone()[0] == 5
    fresh.close()
