"""The programs dtbuild runs as processes of their own inside the command sandbox
(plugins/builtin/tree_walk.py, plugins/builtin/fakeroot_prologue.py) and the VM guest's
/init (plugins/builtin/vm_init.sh): what each does, called directly, and that they are
found as ``python -I -m`` modules where they run (confined by bubblewrap, and from a
wheel installed into a virtualenv)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from dtbuild.plugins.builtin import fakeroot_prologue, layered_actions, sandbox, tree_walk, vm_executor

ROOT = Path(__file__).resolve().parents[3]


def _need_bwrap(require_tool) -> None:
    require_tool("bwrap")
    reason = sandbox.bwrap_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"bwrap cannot run here, and CI=true: {reason}", pytrace=False)
        pytest.skip(reason)


def _tree(root: Path) -> None:
    (root / "b" / "c").mkdir(parents=True)
    (root / "b" / "c" / "f").write_text("abc")
    os.chmod(root / "b" / "c" / "f", 0o640)
    (root / "a").write_text("")
    os.link(root / "a", root / "b" / "hard")
    (root / "l").symlink_to("b/c")
    os.mkfifo(root / "p")


# --------------------------------------------------------------------------- tree_walk


def test_the_walk_lists_every_entry_parents_first_in_sorted_order(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    out = tmp_path / "walk.json"
    assert tree_walk.main([str(root), str(out)]) == 0
    walked = json.loads(out.read_text())
    assert [e[0] for e in walked] == ["a", "b", "b/c", "b/c/f", "b/hard", "l", "p"]
    by_path = {e[0]: e for e in walked}
    _, kind, mode, uid, gid, size, target, dev, ino, nlink = by_path["b/c/f"]
    st = os.lstat(root / "b" / "c" / "f")
    assert (kind, mode, uid, gid, size, target, dev, ino, nlink) == (
        "file", 0o640, st.st_uid, st.st_gid, 3, "", st.st_dev, st.st_ino, 1)
    assert by_path["l"][1:2] + by_path["l"][6:7] == ["symlink", "b/c"]
    assert by_path["b"][1] == "dir" and by_path["p"][1] == "other"
    # Hard links show as two entries on one inode.
    assert by_path["a"][7:10] == by_path["b/hard"][7:10] and by_path["a"][9] == 2


def test_the_walk_of_an_empty_root_is_empty(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    out = tmp_path / "walk.json"
    assert tree_walk.main([str(tmp_path / "root"), str(out)]) == 0
    assert json.loads(out.read_text()) == []


def test_the_walk_refuses_a_wrong_command_line(capsys) -> None:
    assert tree_walk.main(["only-one"]) == 2
    assert "usage:" in capsys.readouterr().err


# --------------------------------------------------------------------------- fakeroot_prologue


def test_the_prologue_gives_owners_keeps_setuid_bits_and_runs_the_command(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "root"
    (root / "etc" / "sub").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "bin" / "su").write_text("")
    os.chmod(root / "bin" / "su", 0o4755)
    (root / "bin" / "sh").symlink_to("su")
    spec = tmp_path / "owners.json"
    spec.write_text(json.dumps({"default": [7, 8], "owners": {"etc": [0, 42], "bin/su": [5, 5]}}))
    chowned: dict[str, tuple[int, int]] = {}

    def lchown(path: str, uid: int, gid: int) -> None:
        chowned[os.path.normpath(path)] = (uid, gid)
        st = os.lstat(path)
        if not stat.S_ISLNK(st.st_mode):  # as the kernel does on a chown
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o6000)

    ran: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(fakeroot_prologue.os, "lchown", lchown)
    monkeypatch.setattr(fakeroot_prologue.os, "execvp", lambda f, args: ran.append((f, list(args))))
    monkeypatch.chdir(root)
    fakeroot_prologue.main([str(spec), "--", "/bin/sh", "-c", "true -- x"])
    # Directories the base has keep its owners; files get the default, even if named.
    assert chowned == {"etc": (0, 42), "etc/sub": (7, 8), "bin": (7, 8), "bin/su": (7, 8), "bin/sh": (7, 8)}
    assert stat.S_IMODE(os.lstat(root / "bin" / "su").st_mode) == 0o4755
    assert ran == [("/bin/sh", ["/bin/sh", "-c", "true -- x"])]


@pytest.mark.parametrize("argv", [[], ["owners.json"], ["owners.json", "--"], ["owners.json", "true"]])
def test_the_prologue_refuses_a_wrong_command_line(argv: list[str], capsys) -> None:
    assert fakeroot_prologue.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


# --------------------------------------------------------------------------- where they run


def test_customisation_layer_runs_them_as_isolated_modules() -> None:
    walker, prologue = layered_actions._WALKER, layered_actions._PROLOGUE
    assert walker == (sys.executable, "-I", "-m", tree_walk.__name__)
    assert prologue == (sys.executable, "-I", "-m", fakeroot_prologue.__name__)


def test_interpreter_paths_show_the_packages_not_what_holds_them() -> None:
    import dtbuild.plugins

    paths = sandbox.interpreter_paths()
    package = os.path.dirname(os.path.abspath(dtbuild.plugins.__file__))
    assert any(package == p or package.startswith(p + "/") for p in paths)
    assert os.path.dirname(package) not in paths or os.path.dirname(package).startswith(sys.prefix)
    # The editable install's checkout itself (tests, .git, ...) stays hidden.
    assert str(ROOT) not in paths


def test_both_programs_run_confined_as_modules(tmp_path: Path, monkeypatch, require_tool) -> None:
    monkeypatch.delenv("DTBUILD_SANDBOX", raising=False)
    _need_bwrap(require_tool)
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("x")
    owners = tmp_path / "owners.json"
    owners.write_text(json.dumps({"default": [os.getuid(), os.getgid()], "owners": {}}))
    out = tmp_path / "walk.json"
    # The prologue execs the walker: both modules run, one after the other, in one sandbox.
    argv = sandbox.confine_argv([*layered_actions._PROLOGUE, str(owners), "--", *layered_actions._WALKER,
                                 str(root), str(out)], writable=[str(tmp_path)], readonly=sandbox.interpreter_paths())
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [e[:2] for e in json.loads(out.read_text())] == [["d", "dir"], ["d/f", "file"]]


# --------------------------------------------------------------------------- the VM guest's /init


def test_the_guest_init_is_package_data_with_one_placeholder() -> None:
    init = vm_executor.guest_init()
    assert init.startswith("#!/bin/busybox sh\n") and init.endswith("off\n")
    assert init.count("@SCRIPT_ENV@") == 1
    assert (ROOT / "plugins" / "builtin" / vm_executor.GUEST_INIT_RESOURCE).read_text() == init


@pytest.mark.slow
def test_a_wheel_in_a_virtualenv_runs_the_modules_confined(tmp_path: Path, monkeypatch, require_tool) -> None:
    monkeypatch.delenv("DTBUILD_SANDBOX", raising=False)
    _need_bwrap(require_tool)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(wheels.glob("dtbuild-*.whl"))
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, str(wheel)],
                   check=True, capture_output=True)
    # dtbuild's dependencies from this interpreter's site-packages, by path only: its
    # .pth files (the editable install's finder) are not processed from there.
    deps = sysconfig.get_paths()["purelib"]
    (Path(site) / "deps.pth").write_text(deps + "\n")
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    out = tmp_path / "walk.json"
    probe = ("import json, sys; from dtbuild.plugins.builtin import layered_actions as l, sandbox as s, vm_executor"
             " as v, tree_walk as t\n"
             f"argv = s.confine_argv([*l._WALKER, {str(root)!r}, {str(out)!r}], writable=[{str(tmp_path)!r}],"
             f" readonly=[*s.interpreter_paths(), {deps!r}])\n"
             "print(json.dumps({'argv': argv, 'module': t.__file__, 'init': v.guest_init().count('@SCRIPT_ENV@')}))")
    # The probe itself may be a -c: it is the test's, not dtbuild's.
    said = json.loads(subprocess.run([python, "-I", "-c", probe], check=True, capture_output=True, text=True,
                                     cwd=tmp_path).stdout)
    assert said["module"].startswith(site) and said["init"] == 1
    # Nothing of this checkout is shown but the dependencies (here from its virtualenv).
    assert [a for a in said["argv"] if a.startswith(str(ROOT))] == [deps, deps]
    done = subprocess.run(said["argv"], cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert [e[:2] for e in json.loads(out.read_text())] == [["d", "dir"]]
