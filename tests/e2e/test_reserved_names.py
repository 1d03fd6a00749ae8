"""Reserved names: no target, package or output may be, or live under, the workspace
state directory ``dtbuild-out/.dtbuild`` (the build lock, the output index, the source
memo) or start with its name, and no output may leave ``dtbuild-out/``.

Each attack runs after a good build has written the state directory; the state must be
byte-for-byte, mode and mtime the same afterwards, and the error must point at the BUILD
line with exit code 2.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

GOOD = '''files(
    name = "good",
    srcs = ["a.txt"],
)
'''


def _state(ws: Path) -> dict[str, tuple[str, int, int, bytes | str | None]]:
    """Every entry of the state directory: kind, mode, mtime and content."""
    root = ws / "dtbuild-out" / ".dtbuild"
    out: dict[str, tuple[str, int, int, bytes | str | None]] = {}
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("symlink", st.st_mode, st.st_mtime_ns, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", st.st_mode, st.st_mtime_ns, None)
        else:
            out[rel] = ("file", st.st_mode, st.st_mtime_ns, path.read_bytes())
    return out


def _without(state: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in names}


def _attack(write_workspace, run_dtbuild, extra_build: str, target: str) -> tuple[str, Path]:
    ws = write_workspace({"BUILD": GOOD, "a.txt": "hello\n"})
    run_dtbuild.build(ws, "//:good", check=True)
    (ws / "BUILD").write_text(GOOD + extra_build)
    before = _state(ws)
    assert {"lock", "outputs.json"} <= set(before), before
    code, out, err = run_dtbuild(ws, "build", target)
    assert code == 2, f"exit {code}\n{out}\n{err}"
    assert not re.search(r'^\s*File ".*", line \d+', err, re.M), "a Python traceback leaked:\n" + err
    # The BUILD file itself evaluated fine (analysis refused it), so the package cache
    # may remember its targets: that file, and the directory's mtime, may change.
    after, before = (_without(state, ("packages.pickle", ".")) for state in (_state(ws), before))
    changed = {k for k in {*before, *after} if before.get(k) != after.get(k)}
    assert not changed, f"the state directory changed: {sorted(changed)}"
    return err, ws


def test_a_target_named_like_the_state_directory_is_refused(write_workspace, run_dtbuild) -> None:
    err, _ = _attack(write_workspace, run_dtbuild,
                     '\nfiles(\n    name = ".dtbuild",\n    srcs = ["a.txt"],\n)\n', "//:good")
    # Every target of the BUILD file is declared when it loads: the bad one fails any build.
    assert "BUILD:6" in err, err
    assert "'.dtbuild'" in err and "reserved" in err and "state directory" in err, err
    assert "hint: rename the target" in err, err


@pytest.mark.parametrize("name", [".dtbuild-old", ".dtbuildx"])
def test_target_names_starting_with_the_state_directory_name_are_refused(write_workspace, run_dtbuild,
                                                                         name: str) -> None:
    err, _ = _attack(write_workspace, run_dtbuild,
                     f'\nfiles(\n    name = "{name}",\n    srcs = ["a.txt"],\n)\n', "//:good")
    assert "BUILD:6" in err and "reserved" in err, err


def test_a_genrule_output_inside_the_state_directory_is_refused(write_workspace, run_dtbuild) -> None:
    extra = '''
genrule(
    name = "clobber",
    outs = [".dtbuild/lock"],
    cmd = "echo owned > $OUTS",
)
'''
    err, _ = _attack(write_workspace, run_dtbuild, extra, "//:clobber")
    assert "BUILD:6" in err and "//:clobber" in err, err
    assert "'.dtbuild/lock'" in err and "reserved for dtbuild's state directory" in err, err
    assert "hint: rename the output" in err, err


def test_an_output_named_after_the_state_directory_in_the_output_root_is_refused(write_workspace,
                                                                                 run_dtbuild) -> None:
    extra = '''
genrule(
    name = "index",
    outs = [".dtbuild"],
    cmd = "echo owned > $OUTS",
)
'''
    err, _ = _attack(write_workspace, run_dtbuild, extra, "//:index")
    assert "BUILD:6" in err and "reserved" in err, err


def test_outputs_inside_one_another_are_refused(write_workspace, run_dtbuild) -> None:
    """A file output below a tree output would be written through whatever the tree holds
    (a symlink to / among them)."""
    extra = '''
files(
    name = "tree",
    srcs = ["a.txt"],
)

genrule(
    name = "inside",
    outs = ["tree/a.txt/x"],
    cmd = "echo x > $OUTS",
)

files(
    name = "both",
    srcs = [":tree", ":inside"],
)
'''
    err, _ = _attack(write_workspace, run_dtbuild, extra, "//:both")
    assert "one output may not be a directory of another" in err, err
    assert re.search(r"BUILD:(6|11):", err), err


def test_an_output_is_never_written_through_a_symlink_an_earlier_tree_left(tmp_path, write_workspace,
                                                                           run_dtbuild) -> None:
    """Build a tree holding ``link -> outside``, then (in another build, where the tree
    is not analyzed) a genrule whose output lies below ``tree/link``."""
    outside = tmp_path / "outside"
    outside.mkdir()
    ws = write_workspace({"BUILD": 'files(\n    name = "tree",\n    srcs = ["link"],\n)\n'})
    (ws / "link").symlink_to(outside)
    run_dtbuild.build(ws, "//:tree", check=True)
    assert (ws / "dtbuild-out" / "tree" / "link").is_symlink()
    (ws / "BUILD").write_text('files(\n    name = "tree",\n    srcs = ["link"],\n)\n\n'
                              'genrule(\n    name = "through",\n    outs = ["tree/link/planted"],\n'
                              '    cmd = "echo planted > $OUTS",\n)\n')
    code, out, err = run_dtbuild(ws, "build", "//:through")
    assert code == 2, f"{out}\n{err}"
    assert "BUILD:6" in err and "is a symlink" in err, err
    assert list(outside.iterdir()) == [], "an output was written outside the workspace"
