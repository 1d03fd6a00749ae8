"""The engine as a user meets it: the CLI on copied fixture workspaces.

The monorepo fixture's action graph (what the counts below are reasoned from)::

    lib/text/a.txt, b.txt --Genrule //lib/text:notes_cat--> notes.txt
    notes.txt             --FilesTree //lib/text:notes-----> notes/      (the macro's package)
    notes.txt             --Genrule //lib/text:upper-------> upper.txt
    data/site/**          --FilesTree //data:static--------> static/
    upper.txt, static/, main.sh --Genrule //app:report-----> report.txt, bin/run
    report.txt, bin/run, main.sh --FilesTree //app:app-----> app/

``//app:app`` needs 5 actions (not //lib/text:notes); ``//...`` has 6.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ALL_TARGETS = {"//app:app", "//app:report", "//data:static", "//lib/text:notes", "//lib/text:notes_cat",
               "//lib/text:upper"}
REPORT = b"2\nALPHA\nBETA\ncss\nindex.html\n"
MAIN_SH = b"#!/bin/sh\necho running\n"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _out(ws: Path, rel: str) -> Path:
    return ws / "dtbuild-out" / rel


def _files_below(root: Path) -> list[str]:
    """Every file and symlink below ``root``, relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _assert_monorepo_outputs(ws: Path) -> None:
    """What building //... must leave under dtbuild-out/."""
    # The macro's genrule: glob(["*.txt"], exclude = ["skip*.txt"]) in sorted order.
    assert _out(ws, "lib/text/notes.txt").read_bytes() == b"alpha\nbeta\n"
    assert _out(ws, "lib/text/upper.txt").read_bytes() == b"ALPHA\nBETA\n"
    # The macro's files() target: the genrule's output under prefix /usr/share/doc.
    notes = _out(ws, "lib/text/notes")
    assert _files_below(notes) == ["usr/share/doc/notes.txt"]
    assert (notes / "usr/share/doc/notes.txt").read_bytes() == b"alpha\nbeta\n"
    # strip_prefix = "site", prefix = "/srv/www": site/css/main.css lands at srv/www/css/main.css.
    static = _out(ws, "data/static")
    assert _files_below(static) == ["srv/www/css/main.css", "srv/www/index.html"]
    assert (static / "srv/www/index.html").read_bytes() == b"<h1>hi</h1>\n"
    assert (static / "srv/www/css/main.css").read_bytes() == b"body{}\n"
    # The genrule with two outputs, one of them made executable by the command.
    assert _out(ws, "app/report.txt").read_bytes() == REPORT
    assert _out(ws, "app/bin/run").read_bytes() == MAIN_SH
    # Outputs are read-only (0555/0444), as Bazel makes them.
    assert _mode(_out(ws, "app/bin/run")) == 0o555
    assert _mode(_out(ws, "app/report.txt")) == 0o444
    # files() under /opt/app: the genrule's outputs keep their paths, modes normalized.
    app = _out(ws, "app/app")
    assert _files_below(app) == ["opt/app/bin/run", "opt/app/main.sh", "opt/app/report.txt"]
    assert (app / "opt/app/report.txt").read_bytes() == REPORT
    assert (app / "opt/app/bin/run").read_bytes() == MAIN_SH
    assert (app / "opt/app/main.sh").read_bytes() == MAIN_SH
    assert _mode(app / "opt/app/bin/run") == 0o555
    assert _mode(app / "opt/app/main.sh") == 0o555
    assert _mode(app / "opt/app/report.txt") == 0o444
    for d in (app / "opt", app / "opt/app", app / "opt/app/bin", static / "srv/www/css"):
        assert _mode(d) == 0o755, d


# --------------------------------------------------------------------------- building


def test_monorepo_builds_with_expected_outputs(monorepo, run_dtbuild) -> None:
    result = run_dtbuild.build(monorepo, "//...", check=True)
    assert set(result.summary["targets"]) == ALL_TARGETS
    assert result.executed == 6
    assert result.cached == 0
    targets = result.summary["targets"]
    assert targets["//app:report"]["outputs"] == ["dtbuild-out/app/report.txt", "dtbuild-out/app/bin/run"]
    assert targets["//app:app"]["outputs"] == ["dtbuild-out/app/app"]
    assert targets["//data:static"]["outputs"] == ["dtbuild-out/data/static"]
    _assert_monorepo_outputs(monorepo)
    # The excluded file reached no output.
    for path in (monorepo / "dtbuild-out").rglob("*"):
        assert not path.name.startswith("skip"), path
        if path.is_file() and ".dtbuild" not in path.parts:
            assert b"skipped" not in path.read_bytes(), path
    # The plain-text report names what was built.
    assert "//app:app" in result.stderr


def test_second_build_and_touched_sources_execute_nothing(monorepo, run_dtbuild) -> None:
    first = run_dtbuild.build(monorepo, "//app:app", check=True)
    assert first.executed == 5
    again = run_dtbuild.build(monorepo, "//app:app", check=True)
    assert (again.executed, again.cached) == (0, 5)
    # New mtimes, same bytes: nothing runs.
    future = time.time() + 3600
    for rel in ("lib/text/a.txt", "data/site/index.html", "app/main.sh", "app/BUILD"):
        os.utime(monorepo / rel, (future, future))
    touched = run_dtbuild.build(monorepo, "//app:app", check=True)
    assert (touched.executed, touched.cached) == (0, 5)
    _assert_monorepo_outputs_app_only(monorepo)


def _assert_monorepo_outputs_app_only(ws: Path) -> None:
    app = _out(ws, "app/app")
    assert (app / "opt/app/report.txt").read_bytes() == REPORT
    assert _mode(app / "opt/app/bin/run") == 0o555


def test_changing_a_txt_reruns_exactly_its_downstream(monorepo, run_dtbuild) -> None:
    run_dtbuild.build(monorepo, "//...", check=True)
    (monorepo / "lib/text/a.txt").write_bytes(b"gamma\n")
    # notes_cat, notes, upper, report and app depend on a.txt; static does not.
    result = run_dtbuild.build(monorepo, "//...", check=True)
    assert (result.executed, result.cached) == (5, 1)
    assert _out(monorepo, "lib/text/upper.txt").read_bytes() == b"GAMMA\nBETA\n"
    assert (_out(monorepo, "app/app") / "opt/app/report.txt").read_bytes() == b"2\nGAMMA\nBETA\ncss\nindex.html\n"
    assert (_out(monorepo, "lib/text/notes") / "usr/share/doc/notes.txt").read_bytes() == b"gamma\nbeta\n"
    # Only //app:app: the same change again costs 4 actions (notes is not needed).
    (monorepo / "lib/text/a.txt").write_bytes(b"delta\n")
    result = run_dtbuild.build(monorepo, "//app:app", check=True)
    assert (result.executed, result.cached) == (4, 1)


def test_early_cutoff_stops_at_an_output_that_did_not_change(monorepo, run_dtbuild) -> None:
    run_dtbuild.build(monorepo, "//app:app", check=True)
    # notes.txt changes ("ALPHA" instead of "alpha") but upper.txt ("ALPHA\nBETA\n") does
    # not: notes_cat and upper run again, report and app are cached.
    (monorepo / "lib/text/a.txt").write_bytes(b"ALPHA\n")
    result = run_dtbuild.build(monorepo, "//app:app", check=True)
    assert (result.executed, result.cached) == (2, 3)
    assert (_out(monorepo, "app/app") / "opt/app/report.txt").read_bytes() == REPORT


def test_changing_index_html_reruns_exactly_its_downstream(monorepo, run_dtbuild) -> None:
    run_dtbuild.build(monorepo, "//app:app", check=True)
    (monorepo / "data/site/index.html").write_bytes(b"<h1>hello</h1>\n")
    # static is rebuilt; report reads the new tree but writes the same bytes (it lists file
    # names only), so app is cached.
    result = run_dtbuild.build(monorepo, "//app:app", check=True)
    assert (result.executed, result.cached) == (2, 3)
    result = run_dtbuild.build(monorepo, "//data:static", check=True)
    assert (result.executed, result.cached) == (0, 1)
    assert (_out(monorepo, "data/static") / "srv/www/index.html").read_bytes() == b"<h1>hello</h1>\n"


def test_a_new_file_matching_a_glob_is_picked_up(monorepo, run_dtbuild) -> None:
    run_dtbuild.build(monorepo, "//lib/text:upper", check=True)
    (monorepo / "lib/text/c.txt").write_bytes(b"gamma\n")
    (monorepo / "lib/text/skip_this_too.txt").write_bytes(b"excluded\n")
    result = run_dtbuild.build(monorepo, "//lib/text:upper", check=True)
    assert (result.executed, result.cached) == (2, 0)
    assert _out(monorepo, "lib/text/upper.txt").read_bytes() == b"ALPHA\nBETA\nGAMMA\n"
    (monorepo / "lib/text/c.txt").unlink()
    result = run_dtbuild.build(monorepo, "//lib/text:upper", check=True)
    assert result.executed == 0, "the previous result is still in the cache"
    assert _out(monorepo, "lib/text/upper.txt").read_bytes() == b"ALPHA\nBETA\n"


def test_editing_a_command_reruns_that_action_and_what_its_output_feeds(monorepo, run_dtbuild) -> None:
    run_dtbuild.build(monorepo, "//...", check=True)
    build = monorepo / "lib/text/BUILD"
    build.write_text(build.read_text().replace('"tr a-z A-Z < $SRCS > $OUT"', '"tr a-z A-Z < $SRCS | rev > $OUT"'))
    result = run_dtbuild.build(monorepo, "//...", check=True)
    # upper, then report (new input) and app (new report.txt); notes_cat, notes and static are cached.
    assert (result.executed, result.cached) == (3, 3)
    assert _out(monorepo, "lib/text/upper.txt").read_bytes() == b"AHPLA\nATEB\n"


def test_editing_a_macro_reruns_the_actions_it_declares(monorepo, run_dtbuild) -> None:
    run_dtbuild.build(monorepo, "//lib/...", check=True)
    defs = monorepo / "tools" / "defs.bzl"
    defs.write_text(defs.read_text().replace('prefix = "/usr/share/doc"', 'prefix = "/usr/share/notes"'))
    result = run_dtbuild.build(monorepo, "//lib/...", check=True)
    assert (result.executed, result.cached) == (1, 2)  # only the files() tree moved
    assert _files_below(_out(monorepo, "lib/text/notes")) == ["usr/share/notes/notes.txt"]


def test_outputs_replaced_or_deleted_by_hand_are_restored_without_running_anything(monorepo, run_dtbuild) -> None:
    run_dtbuild.build(monorepo, "//...", check=True)
    upper = _out(monorepo, "lib/text/upper.txt")
    upper.unlink()  # outputs are read-only: replaced, not written through
    upper.write_bytes(b"scribbled over\n")
    (_out(monorepo, "app/app") / "opt/app/main.sh").unlink()
    shutil.rmtree(_out(monorepo, "data/static") / "srv/www/css")
    result = run_dtbuild.build(monorepo, "//...", check=True)
    assert result.executed == 0
    _assert_monorepo_outputs(monorepo)


def test_an_output_edited_in_place_is_restored_and_its_producer_runs_again(monorepo, run_dtbuild) -> None:
    """A file output is a hard link to the cache's blob: editing it in place (after
    making it writable) edits the blob, which the cache then refuses to serve."""
    run_dtbuild.build(monorepo, "//...", check=True)
    upper = _out(monorepo, "lib/text/upper.txt")
    os.chmod(upper, 0o644)
    upper.write_bytes(b"scribbled over\n")
    result = run_dtbuild.build(monorepo, "//...", check=True)
    # The Genrule that wrote upper.txt ran again to write its blob again (found changed
    # when its result was checked, or when the output tree read the blob).
    assert result.executed + result.summary["actions"].get("rewound", 0) == 1, result.stderr
    _assert_monorepo_outputs(monorepo)


def test_cache_location_follows_env_then_config_then_xdg(monorepo, run_dtbuild, tmp_path) -> None:
    from_env = tmp_path / "env-cache"
    run_dtbuild.build(monorepo, "//lib/text:notes_cat", check=True, env={"DTBUILD_CACHE_DIR": str(from_env)})
    assert (from_env / "cas").is_dir()
    config = monorepo / "dtbuild.toml"
    config.write_text(config.read_text() + '\n[cache]\ndir = ".cache-in-workspace"\n')
    run_dtbuild.build(monorepo, "//lib/text:notes_cat", check=True, env={"DTBUILD_CACHE_DIR": None})
    assert (monorepo / ".cache-in-workspace" / "cas").is_dir()
    config.write_text(config.read_text().replace('[cache]\ndir = ".cache-in-workspace"\n', ""))
    xdg = tmp_path / "xdg"
    run_dtbuild.build(monorepo, "//lib/text:notes_cat", check=True,
                      env={"DTBUILD_CACHE_DIR": None, "XDG_CACHE_HOME": str(xdg)})
    assert (xdg / "dtbuild" / "cas").is_dir()


def test_cache_stats_gc_and_clean_expunge(monorepo, run_dtbuild) -> None:
    run_dtbuild.build(monorepo, "//app:app", check=True)
    code, out, err = run_dtbuild(monorepo, "cache", "stats")
    assert code == 0, err
    assert re.search(r"action results: 5\b", out), out
    code, out, err = run_dtbuild(monorepo, "cache", "gc")
    assert code == 0, err
    assert run_dtbuild.build(monorepo, "//app:app", check=True).executed == 0, "gc keeps recently used results"
    code, out, err = run_dtbuild(monorepo, "cache", "gc", "--max-age-days", "0")
    assert code == 0, err
    assert run_dtbuild.build(monorepo, "//app:app", check=True).executed == 5
    run_dtbuild(monorepo, "clean", "--expunge", check=True)
    # Only the lock file stays, so that a build waiting for the cache finds it emptied.
    assert [p.name for p in run_dtbuild.cache_dir.iterdir()] == ["lock"]
    assert not (monorepo / "dtbuild-out").exists()
    assert run_dtbuild.build(monorepo, "//app:app", check=True).executed == 5


# --------------------------------------------------------------------------- patterns and query


@pytest.mark.parametrize(("pattern", "expected"), [
    ("//...", ALL_TARGETS),
    ("//lib/...", {"//lib/text:notes", "//lib/text:notes_cat", "//lib/text:upper"}),
    ("//app:all", {"//app:app", "//app:report"}),
    ("//app:*", {"//app:app", "//app:report"}),
    ("//data:static", {"//data:static"}),
    ("//lib/text:all", {"//lib/text:notes", "//lib/text:notes_cat", "//lib/text:upper"}),
])
def test_patterns_expand_as_expected(monorepo, run_dtbuild, pattern, expected) -> None:
    result = run_dtbuild.build(monorepo, pattern, check=True)
    assert set(result.summary["targets"]) == expected


def test_relative_target_from_a_package_directory(monorepo, run_dtbuild) -> None:
    result = run_dtbuild.build(monorepo / "lib" / "text", ":upper", check=True)
    assert set(result.summary["targets"]) == {"//lib/text:upper"}
    assert _out(monorepo, "lib/text/upper.txt").read_bytes() == b"ALPHA\nBETA\n"


def _query(run_dtbuild, ws: Path, expression: str) -> list[str]:
    code, out, err = run_dtbuild(ws, "query", expression)
    assert code == 0, err
    return out.splitlines()


def test_query_deps(monorepo, run_dtbuild) -> None:
    assert _query(run_dtbuild, monorepo, "deps(//app:app)") == sorted([
        "//app:app", "//app:report", "//app:main.sh", "//data:static", "//data:site/css/main.css",
        "//data:site/index.html", "//lib/text:upper", "//lib/text:notes_cat", "//lib/text:a.txt",
        "//lib/text:b.txt"])
    assert _query(run_dtbuild, monorepo, "deps(//app:app, 1)") == [
        "//app:app", "//app:main.sh", "//app:report", "//data:static"]
    # Querying builds nothing.
    assert not (monorepo / "dtbuild-out" / "app").exists()


def test_query_rdeps_of_a_target(monorepo, run_dtbuild) -> None:
    assert _query(run_dtbuild, monorepo, "rdeps(//..., //lib/text:notes_cat)") == [
        "//app:app", "//app:report", "//lib/text:notes", "//lib/text:notes_cat", "//lib/text:upper"]


def test_query_rdeps_and_somepath_of_a_source_file(monorepo, run_dtbuild) -> None:
    # deps() lists source files by label, so they must be usable as query words too.
    assert _query(run_dtbuild, monorepo, "rdeps(//..., //lib/text:a.txt)") == sorted([
        "//lib/text:a.txt", "//lib/text:notes_cat", "//lib/text:notes", "//lib/text:upper", "//app:report",
        "//app:app"])
    assert _query(run_dtbuild, monorepo, "somepath(//app:app, //lib/text:a.txt)") == sorted([
        "//app:app", "//app:report", "//lib/text:upper", "//lib/text:notes_cat", "//lib/text:a.txt"])


def test_query_kind_and_patterns(monorepo, run_dtbuild) -> None:
    assert _query(run_dtbuild, monorepo, "kind(genrule, //...)") == [
        "//app:report", "//lib/text:notes_cat", "//lib/text:upper"]
    assert _query(run_dtbuild, monorepo, "kind(files, deps(//app:app))") == [
        "//app:app", "//data:static"]
    assert _query(run_dtbuild, monorepo, "//lib/...") == [
        "//lib/text:notes", "//lib/text:notes_cat", "//lib/text:upper"]
    assert _query(run_dtbuild, monorepo, "//... - //lib/...") == ["//app:app", "//app:report", "//data:static"]


def test_graph_shows_the_dependency_tree(monorepo, run_dtbuild) -> None:
    code, out, err = run_dtbuild(monorepo, "graph", "//lib/text:upper")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "//lib/text:upper"
    assert [line.lstrip(" │├└─") for line in lines[1:]] == [
        "//lib/text:notes_cat", "//lib/text:a.txt", "//lib/text:b.txt"]


def test_query_rejects_a_bad_expression(monorepo, run_dtbuild) -> None:
    code, _, err = run_dtbuild(monorepo, "query", "dep(//app:app)")
    assert code == 2
    assert "did you mean 'deps'?" in err


# --------------------------------------------------------------------------- reproducibility


def _snapshot(tree_snapshot, ws: Path, tree_outputs: list[str]) -> dict:
    """dtbuild-out/ by bytes and mode; the modes of directories dtbuild makes only to hold
    outputs (dtbuild-out/lib, ...) follow the umask and are left out."""
    snap = tree_snapshot(ws / "dtbuild-out")
    inside = tuple(rel + "/" for rel in tree_outputs)
    return {rel: (kind, mode if kind != "dir" or rel.startswith(inside) or rel in tree_outputs else None, content)
            for rel, (kind, mode, content) in snap.items()}


TREE_OUTPUTS = ["app/app", "data/static", "lib/text/notes"]


def test_outputs_are_byte_identical_after_clean(monorepo, run_dtbuild, tree_snapshot) -> None:
    run_dtbuild.build(monorepo, "//...", check=True)
    before = _snapshot(tree_snapshot, monorepo, TREE_OUTPUTS)
    assert len(before) > 10
    run_dtbuild(monorepo, "clean", check=True)
    assert not (monorepo / "dtbuild-out").exists()
    result = run_dtbuild.build(monorepo, "//...", check=True)
    assert result.executed == 0, "clean removes outputs, not the cache"
    assert _snapshot(tree_snapshot, monorepo, TREE_OUTPUTS) == before


def test_outputs_are_byte_identical_elsewhere_with_other_umask_and_mtimes(monorepo, run_dtbuild, tree_snapshot,
                                                                         tmp_path) -> None:
    run_dtbuild.build(monorepo, "//...", check=True)
    before = _snapshot(tree_snapshot, monorepo, TREE_OUTPUTS)
    other = tmp_path / "another" / "checkout" / "of-the-repo"
    shutil.copytree(monorepo, other, ignore=shutil.ignore_patterns("dtbuild-out"))
    rng = random.Random(20240501)
    for path in other.rglob("*"):
        if path.is_file():
            t = rng.uniform(300_000_000, 1_600_000_000)
            os.utime(path, (t, t))
    # A checkout made under umask 077.
    os.chmod(other / "app" / "main.sh", 0o700)
    for rel in ("lib/text/a.txt", "lib/text/b.txt", "data/site/index.html", "data/site/css/main.css"):
        os.chmod(other / rel, 0o600)
    result = run_dtbuild.build(other, "//...", check=True, umask=0o077,
                               env={"DTBUILD_CACHE_DIR": str(tmp_path / "other-cache")})
    assert result.executed == 6, "a separate cache starts empty"
    assert _snapshot(tree_snapshot, other, TREE_OUTPUTS) == before


# --------------------------------------------------------------------------- crashes and corruption


#: For tests whose commands talk to the test through host files: the command sandbox
#: would hide those (tests/e2e/test_command_sandbox.py covers sandboxed commands).
UNCONFINED = '[sandbox]\ncommands = "none"\n'


def _wait_for(path: Path, proc: subprocess.Popen[bytes], err_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"dtbuild exited ({proc.returncode}) before {path.name} appeared:\n{err_path.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.02)


def _kill_process_group_of(pid_file: Path) -> None:
    """Kill a sandboxed command that outlived its SIGKILLed dtbuild (it runs in its own
    session, as it should, so the kill did not reach it)."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)


def test_a_build_killed_in_an_action_rebuilds_correctly(write_workspace, run_dtbuild, tmp_path, reaped) -> None:
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    hold = ctl / "hold"
    hold.touch()
    started = ctl / "started"
    slow_cmd = f"""
echo partial > $OUT
echo $$ > {ctl}/pid
touch {started}
i=0
while [ -e {hold} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done
{{ cat $SRCS; echo complete; }} > $OUT
"""
    ws = write_workspace({
        "pkg/in.txt": "some input\n",
        "pkg/BUILD": f"""
genrule(name = "prep", srcs = ["in.txt"], outs = ["prep.txt"], cmd = "tr a-z A-Z < $SRCS > $OUT")
genrule(name = "slow", srcs = [":prep"], outs = ["slow.txt"], cmd = '''{slow_cmd}''')
genrule(name = "final", srcs = [":slow"], outs = ["final.txt"], cmd = "cat $SRCS > $OUT; echo final >> $OUT")
""",
    }, config=UNCONFINED)
    err_path = tmp_path / "killed.err"
    with open(err_path, "wb") as err:
        proc = run_dtbuild.popen(ws, "build", "//pkg:final", "--jobs", "2", start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=err)
        reaped.append(proc)
        _wait_for(started, proc, err_path)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _kill_process_group_of(ctl / "pid")
    hold.unlink()
    cache_tmp = run_dtbuild.cache_dir / "tmp"
    assert any(cache_tmp.iterdir()), "the kill should have left the running action's files behind"
    assert not _out(ws, "pkg/final.txt").exists()

    result = run_dtbuild.build(ws, "//pkg:final", check=True)
    # prep finished before the kill and is cached; slow and final run.
    assert (result.executed, result.cached) == (2, 1)
    assert _out(ws, "pkg/final.txt").read_bytes() == b"SOME INPUT\ncomplete\nfinal\n"
    assert list(cache_tmp.iterdir()) == [], "temporaries of the killed build were not cleaned up"
    result = run_dtbuild.build(ws, "//pkg:slow", check=True)
    assert result.executed == 0
    assert _out(ws, "pkg/slow.txt").read_bytes() == b"SOME INPUT\ncomplete\n"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_build_stops_its_commands_and_keeps_nothing_partial(write_workspace, run_dtbuild, tmp_path,
                                                                           reaped, signum) -> None:
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    hold = ctl / "hold"
    hold.touch()
    cmd = (f"echo partial > $OUT; echo $$ > {ctl}/pid; touch {ctl}/started; i=0; "
           f"while [ -e {hold} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; echo complete > $OUT")
    ws = write_workspace({"pkg/BUILD": f'genrule(name = "slow", outs = ["slow.txt"], cmd = "{cmd}")\n'},
                         config=UNCONFINED)
    err_path = tmp_path / "interrupted.err"
    with open(err_path, "wb") as err:
        proc = run_dtbuild.popen(ws, "build", "//pkg:slow", stdout=subprocess.DEVNULL, stderr=err)
        reaped.append(proc)
        _wait_for(ctl / "started", proc, err_path)
        os.kill(proc.pid, signum)  # dtbuild alone, as a terminal's Ctrl-C or a CI runner's stop would
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("dtbuild did not stop within 30 s of the signal")
    pid = int((ctl / "pid").read_text())
    try:
        assert code == 1, err_path.read_text()
        assert "interrupted" in err_path.read_text()
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(pid), "the running command outlived the interrupted build"
    finally:
        _kill_process_group_of(ctl / "pid")
    assert not _out(ws, "pkg/slow.txt").exists()
    hold.unlink()
    result = run_dtbuild.build(ws, "//pkg:slow", check=True)
    assert result.executed == 1
    assert _out(ws, "pkg/slow.txt").read_text() == "complete\n"
    assert list((run_dtbuild.cache_dir / "tmp").iterdir()) == []


def test_a_corrupt_cache_blob_is_detected_and_rebuilt(monorepo, run_dtbuild) -> None:
    run_dtbuild.build(monorepo, "//lib/text:upper", check=True)
    upper = _out(monorepo, "lib/text/upper.txt")
    good = upper.read_bytes()
    digest = hashlib.sha256(good).hexdigest()
    blob = run_dtbuild.cache_dir / "cas" / digest[:2] / digest
    assert blob.read_bytes() == good
    os.chmod(blob, 0o644)
    flipped = bytes(b ^ 0xFF for b in good[:3]) + good[3:]
    blob.write_bytes(flipped)
    shutil.rmtree(monorepo / "dtbuild-out")
    result = run_dtbuild.build(monorepo, "//lib/text:upper", check=True)
    assert upper.read_bytes() == good
    # The corrupt blob is not trusted: upper runs again (notes_cat's output is intact).
    assert (result.executed, result.cached) == (1, 1)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest


def test_a_corrupt_action_cache_entry_is_a_miss(monorepo, run_dtbuild) -> None:
    run_dtbuild.build(monorepo, "//lib/text:notes_cat", check=True)
    entries = [p for p in (run_dtbuild.cache_dir / "ac").rglob("*") if p.is_file()]
    assert len(entries) == 1
    entries[0].write_bytes(entries[0].read_bytes()[:-7] + b"garbage")
    shutil.rmtree(monorepo / "dtbuild-out")
    result = run_dtbuild.build(monorepo, "//lib/text:notes_cat", check=True)
    assert result.executed == 1
    assert _out(monorepo, "lib/text/notes.txt").read_bytes() == b"alpha\nbeta\n"


# --------------------------------------------------------------------------- concurrency


def _start_build(run_dtbuild, ws: Path, tmp_path: Path, tag: str, reaped, env=None) -> tuple:
    summary = tmp_path / f"summary-{tag}.json"
    err = open(tmp_path / f"{tag}.err", "w+b")  # noqa: SIM115 - closed by _finish
    proc = run_dtbuild.popen(ws, "build", "//...", "--summary-json", str(summary), env=env,
                             stdout=subprocess.DEVNULL, stderr=err)
    reaped.append(proc)
    return proc, err, summary


def _finish(started: tuple, read_summary) -> dict:
    proc, err, summary = started
    try:
        code = proc.wait(timeout=120)
        err.seek(0)
        text = err.read().decode()
    finally:
        err.close()
    assert code == 0, text
    return read_summary(summary)


def test_two_builds_of_one_workspace_at_once(monorepo, run_dtbuild, tmp_path, reaped, read_summary) -> None:
    first = _start_build(run_dtbuild, monorepo, tmp_path, "a", reaped)
    second = _start_build(run_dtbuild, monorepo, tmp_path, "b", reaped)
    one, two = _finish(first, read_summary), _finish(second, read_summary)
    # One workspace builds one at a time: every action ran once in all.
    assert one["actions"]["executed"] + two["actions"]["executed"] == 6
    _assert_monorepo_outputs(monorepo)


def test_two_workspaces_sharing_one_cache_at_once(workspace, run_dtbuild, tmp_path, reaped, read_summary) -> None:
    ws1, ws2 = workspace("monorepo"), workspace("monorepo")
    first = _start_build(run_dtbuild, ws1, tmp_path, "a", reaped)
    second = _start_build(run_dtbuild, ws2, tmp_path, "b", reaped)
    _finish(first, read_summary)
    _finish(second, read_summary)
    for ws in (ws1, ws2):
        _assert_monorepo_outputs(ws)
        assert run_dtbuild.build(ws, "//...", check=True).executed == 0
    assert list((run_dtbuild.cache_dir / "tmp").iterdir()) == []


def test_jobs_2_runs_independent_actions_at_once(write_workspace, run_dtbuild, tmp_path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()

    def meet(me: str, other: str) -> str:
        # Wait (at most 20 s) for the other action to start: only concurrency gets "together".
        return (f"touch {marks}/{me}; i=0; "
                f"while [ ! -e {marks}/{other} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; "
                f"if [ -e {marks}/{other} ]; then echo together > $OUT; else echo alone > $OUT; fi")

    ws = write_workspace({"pkg/BUILD": f"""
genrule(name = "a", outs = ["a.txt"], cmd = "{meet('a', 'b')}")
genrule(name = "b", outs = ["b.txt"], cmd = "{meet('b', 'a')}")
"""}, config=UNCONFINED)
    run_dtbuild.build(ws, "//pkg:all", "--jobs", "2", check=True)
    assert _out(ws, "pkg/a.txt").read_text() == "together\n"
    assert _out(ws, "pkg/b.txt").read_text() == "together\n"


def test_jobs_1_runs_one_action_at_a_time(write_workspace, run_dtbuild, tmp_path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()

    def probe(me: str, other: str) -> str:
        # Records whether the other action was running while this one was.
        return (f"touch {marks}/{me}.running; sleep 0.3; "
                f"if [ -e {marks}/{other}.running ]; then echo overlap > $OUT; else echo alone > $OUT; fi; "
                f"rm {marks}/{me}.running")

    ws = write_workspace({"pkg/BUILD": f"""
genrule(name = "a", outs = ["a.txt"], cmd = "{probe('a', 'b')}")
genrule(name = "b", outs = ["b.txt"], cmd = "{probe('b', 'a')}")
"""}, config=UNCONFINED)
    result = run_dtbuild.build(ws, "//pkg:all", "--jobs", "1", check=True)
    assert result.executed == 2
    assert _out(ws, "pkg/a.txt").read_text() == "alone\n"
    assert _out(ws, "pkg/b.txt").read_text() == "alone\n"


# --------------------------------------------------------------------------- plugins


def _plugin_lines(out: str, section: str) -> list[str]:
    """The lines of one section (``rules:``, ``action kinds:``) of ``dtbuild plugins``."""
    lines: list[str] = []
    inside = False
    for line in out.splitlines():
        if not line.startswith(" "):
            inside = line.rstrip(":") == section
            continue
        if inside:
            lines.append(line.strip())
    return lines


def test_workspace_plugin_registers_a_rule_that_builds(workspace, run_dtbuild) -> None:
    ws = workspace("plugin_rule")
    result = run_dtbuild.build(ws, "//pkg:all", check=True)
    assert result.executed == 3
    assert _out(ws, "pkg/hello.txt").read_text() == "HELLO\nWORDS FROM A FILE\n"
    assert _out(ws, "pkg/echo.txt").read_text() == "HELLO\nWORDS FROM A FILE\nechoed\n"

    code, out, err = run_dtbuild(ws, "plugins")
    assert code == 0, err
    assert any("tools/myrule.py" in line for line in out.splitlines()), out
    shout = [line for line in _plugin_lines(out, "rules") if line.split()[0] == "shout"]
    assert shout and "tools/myrule.py" in shout[0], out
    kind = [line for line in _plugin_lines(out, "action kinds") if line.split()[0] == "Shout"]
    assert kind and "tools/myrule.py" in kind[0], out
    genrule = [line for line in _plugin_lines(out, "rules") if line.split()[0] == "genrule"]
    assert genrule and "builtin" in genrule[0], out

    # Editing the plugin re-runs its action (and only what its output feeds, if that changed).
    plugin = ws / "tools" / "myrule.py"
    plugin.write_text(plugin.read_text() + "\n# an edit that changes no behaviour\n")
    result = run_dtbuild.build(ws, "//pkg:all", check=True)
    assert (result.executed, result.cached) == (1, 2)
    plugin.write_text(plugin.read_text().replace('SUFFIX = ""', 'SUFFIX = "!"'))
    result = run_dtbuild.build(ws, "//pkg:all", check=True)
    assert (result.executed, result.cached) == (2, 1)
    assert _out(ws, "pkg/echo.txt").read_text() == "HELLO!\nWORDS FROM A FILE!\nechoed\n"


# --------------------------------------------------------------------------- explain, keep-going, version


def test_explain_names_the_changed_input(monorepo, run_dtbuild) -> None:
    run_dtbuild.build(monorepo, "//app:app", check=True)
    code, out, err = run_dtbuild(monorepo, "explain", "//app:app")
    assert code == 0, err
    assert not [line for line in out.splitlines() if ": would run" in line], out
    (monorepo / "lib/text/a.txt").write_bytes(b"gamma\n")
    code, out, err = run_dtbuild(monorepo, "explain", "//app:app")
    assert code == 0, err
    notes_cat = [line for line in out.splitlines() if "//lib/text:notes_cat" in line]
    assert notes_cat and "would run" in notes_cat[0] and "lib/text/a.txt" in notes_cat[0], out
    static = [line for line in out.splitlines() if "//data:static" in line]
    assert static and "would run" not in static[0], out
    # explain only explains: the next build still does the work.
    assert run_dtbuild.build(monorepo, "//app:app", check=True).executed == 4


def test_keep_going_builds_what_does_not_depend_on_a_failure(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"pkg/BUILD": """
genrule(name = "bad", outs = ["bad.txt"], cmd = "echo about to fail >&2; exit 3")
genrule(name = "after_bad", srcs = [":bad"], outs = ["after.txt"], cmd = "cp $SRCS $OUT")
genrule(name = "good", outs = ["good.txt"], cmd = "echo good > $OUT")
"""})
    result = run_dtbuild.build(ws, "//pkg:all", "--keep-going", "--jobs", "1")
    assert result.exit_code == 1, result.stderr
    assert "//pkg:bad" in result.stderr
    assert "about to fail" in result.stderr
    assert _out(ws, "pkg/good.txt").read_text() == "good\n"
    assert not _out(ws, "pkg/after.txt").exists()
    assert not _out(ws, "pkg/bad.txt").exists()


def test_without_keep_going_a_failure_stops_the_build(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"pkg/BUILD": """
genrule(name = "bad", outs = ["bad.txt"], cmd = "exit 3")
genrule(name = "good", srcs = [":bad"], outs = ["good.txt"], cmd = "cp $SRCS $OUT")
"""})
    result = run_dtbuild.build(ws, "//pkg:good")
    assert result.exit_code == 1
    assert not _out(ws, "pkg/good.txt").exists()


def test_version(tmp_path, run_dtbuild) -> None:
    code, out, err = run_dtbuild(tmp_path, "--version")
    assert code == 0, err
    assert re.fullmatch(r"dtbuild \d+\.\d+\S*\n", out), out
