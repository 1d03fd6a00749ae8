"""The command sandbox's command line (plugins/builtin/sandbox.py): what a confined
command sees, in which order the mounts go, the user's choice, and the error when
bubblewrap cannot run here. tests/e2e/test_command_sandbox.py runs real attacks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import MappingProxyType

import pytest
from dtbuild.engine.errors import WorkspaceError
from dtbuild.engine.workspace import find_workspace
from dtbuild.plugins.builtin import sandbox
from dtbuild.plugins.builtin.executors import LocalExecutor
from dtbuild.plugins.interfaces import ActionFailed, CommandRequest, ExecutorContext, Settings


class _NeverCancelled:
    def is_set(self) -> bool:
        return False

    def wait(self, timeout: float | None = None) -> bool:
        return False


def _mounts(argv: list[str]) -> list[tuple[str, str]]:
    """(option, destination) for each bind of the command line, in order."""
    out = []
    for i, arg in enumerate(argv):
        if arg in ("--bind", "--ro-bind"):
            out.append((arg, argv[i + 2]))
    return out


@pytest.fixture
def bwrap_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "bwrap_unavailable_reason", lambda: None)


def test_declared_paths_are_mounted_parents_first_and_writable_wins(bwrap_works) -> None:
    argv = sandbox.confine_argv(["true"], writable=["/w/a/out", "/w/a", "/both"], readonly=["/w/a/out/in", "/both"])
    declared = [m for m in _mounts(argv) if m[1].startswith(("/w", "/both"))]
    assert declared == [("--bind", "/both"), ("--bind", "/w/a"), ("--bind", "/w/a/out"),
                        ("--ro-bind", "/w/a/out/in")]
    # The view's root becomes read-only after every mount, then the command.
    assert argv[-4:] == ["--remount-ro", "/", "--", "true"]


def test_the_view_has_the_hosts_tools_and_no_home(bwrap_works) -> None:
    argv = sandbox.confine_argv(["true"], writable=["/x"])
    for d in ("/usr", "/bin", "/lib", "/etc"):
        if os.path.islink(d):
            assert argv[argv.index(d) - 2] == "--symlink"
        elif os.path.isdir(d):
            assert ("--ro-bind", d) in _mounts(argv)
    assert ("--ro-bind", "/etc/shadow") in _mounts(argv) or not os.path.exists("/etc/shadow")
    home = os.path.expanduser("~")
    assert not any(dest == home or dest.startswith(home + "/") for _, dest in _mounts(argv) if dest != "/x")
    assert argv[argv.index("--proc"):argv.index("--proc") + 4] == ["--proc", "/proc", "--remount-ro", "/proc"]
    assert "--unshare-net" in argv and "--die-with-parent" in argv and "--new-session" in argv
    assert "--unshare-net" not in sandbox.confine_argv(["true"], writable=["/x"], network=True)


def test_a_relative_path_is_refused(bwrap_works) -> None:
    with pytest.raises(ActionFailed, match="sandbox paths must be absolute, but 'out' is not"):
        sandbox.confine_argv(["true"], writable=["out"])


def test_without_bwrap_the_error_says_how_to_install_it_or_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox.bwrap_unavailable_reason.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    try:
        with pytest.raises(ActionFailed) as caught:
            sandbox.confine_argv(["true"], writable=["/x"])
    finally:
        sandbox.bwrap_unavailable_reason.cache_clear()
    message = str(caught.value)
    assert "bwrap is not installed (apt-get install bubblewrap)" in message
    assert '[sandbox] commands = "none"' in message and "DTBUILD_SANDBOX=none" in message


def test_the_users_choice(tmp_path: Path) -> None:
    (tmp_path / "dtbuild.toml").write_text("")
    workspace = find_workspace(str(tmp_path))
    assert sandbox.sandbox_mode(workspace.settings({})) == "bwrap"
    assert sandbox.sandbox_mode(workspace.settings({"DTBUILD_SANDBOX": "none"})) == "none"
    (tmp_path / "dtbuild.toml").write_text('[sandbox]\ncommands = "none"\n')
    assert sandbox.sandbox_mode(find_workspace(str(tmp_path)).settings({})) == "none"
    assert sandbox.sandbox_mode(find_workspace(str(tmp_path)).settings({"DTBUILD_SANDBOX": "bwrap"})) == "bwrap"
    with pytest.raises(WorkspaceError, match="DTBUILD_SANDBOX must be one of bwrap, none, but was 'off'"):
        find_workspace(str(tmp_path)).settings({"DTBUILD_SANDBOX": "off"})
    # The executor reads the settings it was given, never the environment.
    assert sandbox.sandbox_mode(Settings()) == "bwrap"


def _need_bwrap(require_tool) -> None:
    """bwrap present and able to make namespaces here (in CI, a failure when not)."""
    require_tool("bwrap")
    reason = sandbox.bwrap_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"bwrap cannot run here, and CI=true: {reason}", pytrace=False)
        pytest.skip(reason)


def test_the_local_executor_confines_to_cwd_and_declared_paths(tmp_path: Path, monkeypatch, require_tool) -> None:
    monkeypatch.delenv("DTBUILD_SANDBOX", raising=False)
    _need_bwrap(require_tool)
    cwd, extra, hidden = tmp_path / "cwd", tmp_path / "extra", tmp_path / "hidden"
    for d in (cwd, extra, hidden):
        d.mkdir()
    (hidden / "secret").write_text("the-secret\n")
    script = (f"echo a > a; echo b > {extra}/b; cat {hidden}/secret || true; echo c > {hidden}/c || true; "
              "echo d > /d || true; echo e > /usr/e || true")
    result = LocalExecutor().run(CommandRequest(["/bin/sh", "-c", script], str(cwd), {"PATH": "/usr/bin:/bin"},
                                                writable=[str(extra)]), _NeverCancelled())
    assert result.exit_code == 0, result.output
    assert (cwd / "a").read_text() == "a\n" and (extra / "b").read_text() == "b\n"
    assert "the-secret" not in result.output
    assert sorted(p.name for p in hidden.iterdir()) == ["secret"]
    assert not Path("/d").exists() and not Path("/usr/e").exists()


def test_opted_out_the_local_executor_runs_unconfined(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (tmp_path / "cwd").mkdir()
    context = ExecutorContext(str(tmp_path), str(tmp_path / "cache"),
                              Settings(MappingProxyType({"sandbox": MappingProxyType({"commands": "none"})})))
    result = LocalExecutor(context).run(CommandRequest(["/bin/sh", "-c", f"echo x > {outside}"], str(tmp_path / "cwd"),
                                                {"PATH": "/usr/bin:/bin"}), _NeverCancelled())
    assert result.exit_code == 0, result.output
    assert outside.read_text() == "x\n"


def test_the_etc_secrets_are_hidden_and_nothing_twice() -> None:
    hidden = sandbox._etc_secrets()
    paths = [p for p, _ in hidden]
    assert paths == sorted(set(paths))
    for path, _ in hidden:
        assert not any(path.startswith(p + "/") for p, d in hidden if d), f"{path} is inside a hidden directory"
    for name in ("/etc/shadow", "/etc/gshadow", "/etc/ssh"):
        if os.path.lexists(name) and not os.path.islink(name):
            assert name in paths


def test_interpreter_paths_let_a_confined_python_run(tmp_path: Path, monkeypatch, require_tool) -> None:
    import sys

    monkeypatch.delenv("DTBUILD_SANDBOX", raising=False)
    _need_bwrap(require_tool)
    argv = sandbox.confine_argv([sys.executable, "-I", "-c", "print('ran')"], writable=[str(tmp_path)],
                                readonly=sandbox.interpreter_paths())
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ran\n"
