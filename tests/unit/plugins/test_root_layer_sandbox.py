"""The pieces of root-layer confinement that need no overlay: the sandbox a script runs
in (pivoted into a directory, its own PID namespace, only the kept capabilities), and
the preparation of the base's tree, which never makes a device node or follows a
symlink out of the tree."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from dtbuild.plugins.builtin.namespace_executor import KEPT_CAPABILITIES, run_sandboxed
from dtbuild.plugins.builtin.root_layer import OWNERS_FORMAT, apply_owners, restore_special_bits
from dtbuild.plugins.interfaces import TreeEntry

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown, namespaces and mounts as root")


def _sidecar(tmp_path: Path, owners: list, specials: list) -> str:
    path = tmp_path / "owners.json"
    path.write_text(json.dumps({"format": OWNERS_FORMAT, "owners": owners, "specials": specials}))
    return str(path)


@needs_root
def test_apply_owners_makes_no_device_node_and_never_leaves_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "lower"
    (root / "dev").mkdir(parents=True)
    (root / "srv").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("host file\n")
    os.chmod(outside / "victim", 0o600)
    (root / "escape").symlink_to(outside)  # a symlink in the tree to a host directory
    logged: list[str] = []
    apply_owners(str(root), _sidecar(tmp_path, [["escape/victim", 1234, 1234]], [
        ["dev/sda", "block", 0o660, 0, 6, 8, 0], ["srv/kmem", "char", 0o666, 0, 0, 1, 2],
        ["srv/pipe", "fifo", 0o644, 0, 0, 0, 0], ["escape/pipe", "fifo", 0o644, 0, 0, 0, 0]]),
        log=logged.append)
    assert sorted(os.listdir(root / "dev")) == []
    assert sorted(os.listdir(root / "srv")) == ["pipe"] and stat.S_ISFIFO(os.lstat(root / "srv" / "pipe").st_mode)
    assert sorted(os.listdir(outside)) == ["victim"]
    st = os.stat(outside / "victim")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert logged and "/srv/kmem" in logged[0] and "/dev/sda" not in logged[0]


def test_restore_special_bits_gives_back_setuid_setgid_and_sticky(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "su").write_text("")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "link").symlink_to("bin/su")
    restore_special_bits(str(tmp_path), [TreeEntry("bin", "dir", 0o755), TreeEntry("bin/su", "file", 0o4755),
                                         TreeEntry("tmp", "dir", 0o1777), TreeEntry("link", "symlink", 0o777)])
    assert stat.S_IMODE(os.stat(tmp_path / "bin" / "su").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(tmp_path / "tmp").st_mode) == 0o1777


@needs_root
def test_the_sandbox_pivots_into_its_root_with_its_own_pids_and_only_the_kept_capabilities(
        tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed")
    root = tmp_path / "root"
    for d in ("bin", "dev", "proc", "sys"):
        (root / d).mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    script = ("busybox ls -A / > /root-listing; busybox ls /proc | busybox grep -c '^[0-9]' > /pids; "
              "echo $$ > /my-pid; umask > /umask; busybox cat /proc/self/status > /status; "
              "busybox mknod /node c 1 3 || true")
    code, problem, _userns = run_sandboxed(str(root), ["dev", "proc", "sys"], ["/bin/sh", "-c", script],
                                           {"PATH": "/bin"}, network=False)
    assert (code, problem) == (0, "")
    assert set((root / "root-listing").read_text().split()) == {"bin", "dev", "proc", "sys", "root-listing"}
    assert (root / "my-pid").read_text().strip() == "1"
    assert int((root / "pids").read_text()) <= 3  # sh, ls and grep: nothing of the host
    assert (root / "umask").read_text().strip() == "0022"
    assert not (root / "node").exists()
    status = dict(line.split(":\t", 1) for line in (root / "status").read_text().splitlines())
    kept = sum(1 << c for c in KEPT_CAPABILITIES.values())
    assert int(status["CapBnd"], 16) == kept and int(status["CapEff"], 16) == kept
    assert int(status["CapInh"], 16) == 0 and int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert os.listdir(root / "dev") == [] and os.listdir(root / "proc") == []  # its mounts died with it


@needs_root
def test_a_sandbox_without_the_program_says_so(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    code, problem, _ = run_sandboxed(str(tmp_path), ["dev"], ["/bin/sh", "-c", "true"], {}, network=False)
    assert code == 127
    assert "the base image has no /bin/sh" in problem
