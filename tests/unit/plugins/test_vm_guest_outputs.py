"""How the vm executor reads what a (possibly hostile) guest left in its output share:
never through a symbolic link, fifo or device, never a file the guest made as one of
those (QEMU's mapped metadata says so), never more than a cap; and how it shares files
with QEMU. No VM is booted here (tests/e2e/test_vm_confinement.py boots one)."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest
from dtbuild.plugins.builtin.vm_executor import (
    SMALL_OUTPUT_LIMIT,
    GuestMisbehaved,
    GuestOutputs,
    _virtfs,
    output_security_model,
)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    path = tmp_path / "vm"
    path.mkdir(mode=0o700)
    return path


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "secret"
    secret.write_text("root-only secret\n")
    secret.chmod(0o600)
    return secret


def test_regular_files_are_read_and_a_missing_status_is_none(share: Path) -> None:
    (share / "log").write_bytes(b"".join(b"line %d\n" % i for i in range(100)) + b"\x1b[31mred\x1b[0m\n")
    with GuestOutputs(str(share), "mapped-xattr") as outputs:
        assert outputs.status() is None
        assert outputs.tail("missing") == ""
        tail = outputs.tail("log")
    assert tail.splitlines()[-1] == "red" and tail.splitlines()[0] == "line 61"
    (share / "status").write_text("run_as_root 3\n")
    (share / "message").write_text("why\n")
    with GuestOutputs(str(share), "mapped-xattr") as outputs:
        assert outputs.status() == ("run_as_root", 3, "why")


@pytest.mark.parametrize("name", ["log", "status", "message"])
def test_a_symlink_to_a_host_file_is_an_error_and_is_not_followed(share: Path, tmp_path: Path, name: str) -> None:
    (share / "status").write_text("run_as_root 1\n")
    (share / "log").write_text("log\n")
    (share / name).unlink(missing_ok=True)
    (share / name).symlink_to(_secret(tmp_path))
    with GuestOutputs(str(share), "mapped-xattr") as outputs, pytest.raises(GuestMisbehaved) as caught:
        outputs.status()
        outputs.tail("log")
    assert "is a symbolic link" in str(caught.value) and "the guest misbehaved" in str(caught.value)
    assert "secret" not in str(caught.value).replace(str(tmp_path), "")


def test_a_fifo_is_an_error_and_does_not_block(share: Path) -> None:
    os.mkfifo(share / "log")
    result: list[BaseException] = []

    def read() -> None:
        try:
            with GuestOutputs(str(share), "mapped-xattr") as outputs:
                outputs.tail("log")
        except BaseException as e:  # the test looks at it
            result.append(e)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "reading a fifo blocked"
    assert isinstance(result[0], GuestMisbehaved) and "is a fifo" in str(result[0])


def test_a_directory_or_an_oversized_status_is_an_error(share: Path) -> None:
    (share / "status").mkdir()
    with GuestOutputs(str(share), "mapped-xattr") as outputs, pytest.raises(GuestMisbehaved, match="a directory"):
        outputs.status()
    (share / "status").rmdir()
    (share / "status").write_bytes(b"x" * (SMALL_OUTPUT_LIMIT + 1))
    with GuestOutputs(str(share), "mapped-xattr") as outputs, pytest.raises(GuestMisbehaved, match="more than"):
        outputs.status()
    (share / "status").write_text("rm -rf / 0\n")
    with GuestOutputs(str(share), "mapped-xattr") as outputs, pytest.raises(GuestMisbehaved, match="stage"):
        outputs.status()


def test_a_file_the_guest_made_as_a_symlink_is_an_error_under_mapped_xattr(share: Path) -> None:
    (share / "log").write_text("/etc/shadow")  # what QEMU stores for a guest's symlink
    try:
        os.setxattr(share / "log", "user.virtfs.mode", struct.pack("<I", 0o120777))
    except OSError:
        pytest.skip("this file system stores no user xattrs")
    with GuestOutputs(str(share), "mapped-xattr") as outputs, pytest.raises(GuestMisbehaved) as caught:
        outputs.tail("log")
    assert "a symbolic link (as the guest made it)" in str(caught.value)


def test_a_file_the_guest_made_as_a_fifo_is_an_error_under_mapped_file(share: Path) -> None:
    (share / "log").write_text("")
    (share / ".virtfs_metadata").mkdir()
    (share / ".virtfs_metadata" / "log").write_text("virtfs.uid=0\nvirtfs.gid=0\nvirtfs.mode=4516\n")
    with GuestOutputs(str(share), "mapped-file") as outputs, pytest.raises(GuestMisbehaved) as caught:
        outputs.tail("log")
    assert "a fifo (as the guest made it)" in str(caught.value)
    (share / ".virtfs_metadata" / "log").write_text("virtfs.mode=33188\n")  # a regular file, 0644
    with GuestOutputs(str(share), "mapped-file") as outputs:
        assert outputs.tail("log") == ""


def test_only_the_output_share_is_writable_and_it_uses_a_mapped_model(share: Path) -> None:
    assert output_security_model(str(share)) in ("mapped-xattr", "mapped-file")
    assert os.listdir(share) == []
    writable = _virtfs("/x,y", "out", readonly=False, security_model="mapped-xattr")
    assert writable == ["-virtfs", "local,path=/x,,y,mount_tag=out,security_model=mapped-xattr,fmode=0600,dmode=0700"]
    assert _virtfs("/lower", "lower", readonly=True)[1].endswith("security_model=none,readonly=on")
