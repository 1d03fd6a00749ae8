"""An overlay's upper directory becomes a layer: overlayfs' whiteout devices and opaque
xattrs turn into the image format's ``.wh.`` files, never copied; markers that hide
nothing are dropped, so every way of running the overlay gives the same bytes. Also the
other direction: a base image's layers flattened with their whiteouts."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
from dtbuild.plugins.builtin.layertar import LayerEntry
from dtbuild.plugins.builtin.root_layer import (
    LowerDirectory,
    RootfsState,
    UpperDirError,
    UpperEntry,
    apply_owners,
    pack_upper_directory,
    pack_upper_tar,
    upper_entries_from_directory,
    upper_layer_entries,
)
from dtbuild.plugins.builtin.tar_extract import read_entries


class FakeLower:
    """A lower directory as a set of paths (directories end with '/')."""

    def __init__(self, *paths: str) -> None:
        self.paths = set(paths)

    def exists(self, path: str) -> bool:
        return path in self.paths or path + "/" in self.paths

    def is_dir(self, path: str) -> bool:
        return path + "/" in self.paths


def opener(data: bytes):
    return lambda: io.BytesIO(data)


def summary(entries: list[LayerEntry]) -> list[tuple]:
    return [(e.path, e.kind, oct(e.mode), e.uid, e.gid, e.size, e.linkname) for e in entries]


WHITEOUT_DEVICE = {"kind": "char", "mode": 0, "major": 0, "minor": 0}


def test_a_whiteout_device_becomes_an_empty_wh_file_and_is_never_copied() -> None:
    entries = upper_layer_entries([
        UpperEntry("etc", "dir", 0o755),
        UpperEntry("etc/motd", **WHITEOUT_DEVICE),
    ], FakeLower("etc/", "etc/motd"))
    assert summary(entries) == [("etc", "dir", "0o755", 0, 0, 0, ""),
                                ("etc/.wh.motd", "file", "0o0", 0, 0, 0, "")]


def test_whiteouts_sharing_one_inode_stay_whiteouts_not_hard_links() -> None:
    # Kernel overlayfs links every whiteout to one inode (nlink 3 here).
    shared = {**WHITEOUT_DEVICE, "inode": (1, 99)}
    entries = upper_layer_entries([UpperEntry("a", **shared), UpperEntry("b", **shared),
                                   UpperEntry("d", "dir", 0o755), UpperEntry("d/c", **shared)],
                                  FakeLower("a", "b", "d/", "d/c"))
    assert [(e.path, e.kind) for e in entries] == [(".wh.a", "file"), (".wh.b", "file"), ("d", "dir"),
                                                   ("d/.wh.c", "file")]


def test_a_tar_of_the_upper_directory_links_whiteouts_to_each_other() -> None:
    # busybox tar in the VM writes the 2nd and 3rd whiteout as hard links to the first.
    entries = upper_layer_entries([UpperEntry("a", **WHITEOUT_DEVICE), UpperEntry("g", "hardlink", linkname="a"),
                                   UpperEntry("h", "hardlink", linkname="g")], FakeLower("a", "g", "h"))
    assert [(e.path, e.kind, e.linkname) for e in entries] == [(".wh.a", "file", ""), (".wh.g", "file", ""),
                                                               (".wh.h", "file", "")]


def test_an_opaque_directory_gets_the_opaque_marker() -> None:
    entries = upper_layer_entries([UpperEntry("srv", "dir", 0o755), UpperEntry("srv/www", "dir", 0o750, 33, 33,
                                                                                 opaque=True),
                                   UpperEntry("srv/www/index.html", "file", 0o644, size=4, open=opener(b"new\n"))],
                                  FakeLower("srv/", "srv/www/", "srv/www/old.html"))
    assert summary(entries) == [
        ("srv", "dir", "0o755", 0, 0, 0, ""),
        ("srv/www", "dir", "0o750", 33, 33, 0, ""),
        ("srv/www/.wh..wh..opq", "file", "0o0", 0, 0, 0, ""),
        ("srv/www/index.html", "file", "0o644", 0, 0, 4, ""),
    ]


def test_markers_that_hide_nothing_are_dropped() -> None:
    lower = FakeLower("a/", "a/b/", "a/b/x", "file", "gone")
    entries = upper_layer_entries([
        UpperEntry("a", "dir", 0o755, opaque=True),
        UpperEntry("a/b", "dir", 0o755, opaque=True),  # below an opaque directory: adds nothing
        UpperEntry("a/b/x", **WHITEOUT_DEVICE),  # likewise
        UpperEntry("new", "dir", 0o755, opaque=True),  # fuse-overlayfs marks new directories opaque
        UpperEntry("new/.wh..wh..opq", "file", 0o644),  # ... and may write the marker file itself
        UpperEntry("file", "dir", 0o755, opaque=True),  # a directory replacing a file replaces it anyway
        UpperEntry("never", **WHITEOUT_DEVICE),  # a whiteout of nothing
        UpperEntry(".wh.gone", "file", 0o600, 1, 1),  # fuse-overlayfs' whiteout file where mknod fails
    ], lower)
    assert [(e.path, e.kind, oct(e.mode), e.uid) for e in entries] == [
        (".wh.gone", "file", "0o0", 0), ("a", "dir", "0o755", 0), ("a/.wh..wh..opq", "file", "0o0", 0),
        ("a/b", "dir", "0o755", 0), ("file", "dir", "0o755", 0), ("new", "dir", "0o755", 0)]


def test_without_a_lower_view_every_marker_stays() -> None:
    entries = upper_layer_entries([UpperEntry("new", "dir", 0o755, opaque=True), UpperEntry("x", **WHITEOUT_DEVICE)])
    assert [e.path for e in entries] == [".wh.x", "new", "new/.wh..wh..opq"]


def test_hard_links_point_at_the_first_path_in_tar_order_however_they_were_read() -> None:
    data = opener(b"shared\n")
    from_disk = upper_layer_entries([
        UpperEntry("z", "dir", 0o755),
        UpperEntry("z/b", "file", 0o755, 5, 6, size=7, inode=(1, 7), open=data),
        UpperEntry("a", "file", 0o755, 5, 6, size=7, inode=(1, 7), open=data),
    ])
    from_tar = upper_layer_entries([
        UpperEntry("z", "dir", 0o755),
        UpperEntry("z/b", "file", 0o755, 5, 6, size=7, open=data),
        UpperEntry("a", "hardlink", 0o755, 5, 6, linkname="z/b"),
    ])
    expected = [("a", "file", "0o755", 5, 6, 7, ""), ("z", "dir", "0o755", 0, 0, 0, ""),
                ("z/b", "hardlink", "0o755", 5, 6, 0, "a")]
    assert summary(from_disk) == expected
    assert summary(from_tar) == expected


def test_device_nodes_and_fifos_are_errors_and_sockets_are_left_out() -> None:
    with pytest.raises(UpperDirError, match="/dev/sda: run_as_root left a block device node"):
        upper_layer_entries([UpperEntry("dev/sda", "block", 0o660, major=8, minor=0)])
    with pytest.raises(UpperDirError, match="/null: run_as_root left a char device node"):
        upper_layer_entries([UpperEntry("null", "char", 0o666, major=1, minor=3)])
    with pytest.raises(UpperDirError, match="FIFO"):
        upper_layer_entries([UpperEntry("pipe", "fifo", 0o644)])
    assert upper_layer_entries([UpperEntry("run/sock", "socket", 0o755)]) == []


def test_a_whiteout_and_a_file_of_the_same_name_conflict() -> None:
    with pytest.raises(UpperDirError, match="duplicate path"):
        upper_layer_entries([UpperEntry("x", **WHITEOUT_DEVICE), UpperEntry(".wh.x", "file", size=1,
                                                                             open=opener(b"!"))])


# --------------------------------------------------------------------------- real directories


def _can_make_whiteouts(tmp_path: Path) -> bool:
    try:
        os.mknod(tmp_path / "probe", stat.S_IFCHR, os.makedev(0, 0))
        os.setxattr(tmp_path, "user.overlay.opaque", b"y")
        os.removexattr(tmp_path, "user.overlay.opaque")
    except OSError:
        return False
    os.unlink(tmp_path / "probe")
    return True


def test_the_directory_reader_and_the_tar_reader_give_the_same_bytes(tmp_path: Path) -> None:
    """What the namespace executor reads (a directory with xattrs) and what the VM
    returns (busybox's tar of it and a list of opaque directories) pack identically."""
    if not _can_make_whiteouts(tmp_path):
        pytest.skip("this file system or user cannot make whiteout devices and user xattrs")
    lower = tmp_path / "lower"
    for d in ("etc", "srv/www"):
        (lower / d).mkdir(parents=True)
    for f in ("etc/motd", "etc/issue", "srv/www/old.html"):
        (lower / f).write_text("old\n")
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "srv" / "www").mkdir(parents=True)
    os.setxattr(upper / "srv" / "www", "user.overlay.opaque", b"y")
    (upper / "srv" / "www" / "index.html").write_text("new\n")
    os.mknod(upper / "etc" / "motd", stat.S_IFCHR, os.makedev(0, 0))
    os.link(upper / "etc" / "motd", upper / "etc" / "issue")
    (upper / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.link(upper / "etc" / "passwd", upper / "etc" / "passwd-")
    (upper / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
    os.chmod(upper / "etc" / "passwd", 0o4755)

    from_disk, from_tar = tmp_path / "disk.tar", tmp_path / "tar.tar"
    pack_upper_directory(str(upper), str(lower), str(from_disk), str(tmp_path / "disk.json"))
    with tarfile.open(tmp_path / "upper.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(upper, arcname=".")
    (tmp_path / "opaque").write_bytes(b"./srv/www\0")
    pack_upper_tar(str(tmp_path / "upper.tar"), str(tmp_path / "opaque"), str(lower), str(from_tar),
                   str(tmp_path / "tar.json"))
    assert from_disk.read_bytes() == from_tar.read_bytes()
    assert json.loads((tmp_path / "disk.json").read_text()) == json.loads((tmp_path / "tar.json").read_text())
    with tarfile.open(from_disk) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == ["etc", "etc/.wh.issue", "etc/.wh.motd", "etc/localtime", "etc/passwd",
                               "etc/passwd-", "srv", "srv/www", "srv/www/.wh..wh..opq", "srv/www/index.html"]
    assert members["etc/passwd-"].islnk() and members["etc/passwd-"].linkname == "etc/passwd"
    assert members["etc/passwd"].mode == 0o4755
    assert not any(m.ischr() for m in members.values())


def test_the_lower_directory_is_read_without_following_symlinks(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "x").write_text("")
    (tmp_path / "lib").symlink_to("usr/lib")
    lower = LowerDirectory(str(tmp_path))
    assert lower.is_dir("usr/lib") and lower.exists("usr/lib/x")
    assert lower.exists("lib") and not lower.is_dir("lib")
    assert not lower.exists("lib/x")  # overlayfs does not merge through a symlink


def test_upper_entries_from_directory_sees_whiteouts_opaque_dirs_and_hard_links(tmp_path: Path) -> None:
    if not _can_make_whiteouts(tmp_path):
        pytest.skip("this file system or user cannot make whiteout devices and user xattrs")
    (tmp_path / "d").mkdir()
    os.setxattr(tmp_path / "d", "user.overlay.opaque", b"y")
    os.mknod(tmp_path / "w", stat.S_IFCHR, os.makedev(0, 0))
    (tmp_path / "f").write_text("x")
    os.link(tmp_path / "f", tmp_path / "g")
    entries = {e.path: e for e in upper_entries_from_directory(str(tmp_path))}
    assert entries["d"].opaque and entries["d"].kind == "dir"
    assert (entries["w"].kind, entries["w"].major, entries["w"].minor) == ("char", 0, 0)
    assert entries["f"].inode == entries["g"].inode is not None


# --------------------------------------------------------------------------- flattening a base


def _layer(members: list[tuple[str, str, dict]]) -> list[tuple[tarfile.TarInfo, bytes]]:
    out = []
    for name, kind, extra in members:
        info = tarfile.TarInfo(name)
        data = extra.pop("data", b"")
        info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                     "link": tarfile.LNKTYPE, "char": tarfile.CHRTYPE}[kind]
        info.mode = extra.pop("mode", 0o755 if kind == "dir" else 0o644)
        info.size = len(data)
        for key, value in extra.items():
            setattr(info, key, value)
        out.append((info, data))
    return out


def _flatten(*layers: list[tuple[tarfile.TarInfo, bytes]]) -> RootfsState:
    """Each layer written as a tar and read back through tar_extract, as RootfsUnpack does."""
    state = RootfsState()
    for number, layer in enumerate(layers):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in layer:
                tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
        out.seek(0)
        for entry, content in read_entries(out, lower_files=state.holds_file):
            data = content.read() if content is not None else b""
            state.apply(entry, number, lambda d=data: (f"digest-of-{d.decode()}", len(d)))
    return state


def test_a_base_is_flattened_with_its_whiteouts_and_owners() -> None:
    state = _flatten(
        _layer([("etc", "dir", {}), ("etc/motd", "file", {"data": b"hi"}), ("srv/www/a", "file", {"data": b"a"}),
                ("home/app", "dir", {"uid": 1000, "gid": 1000, "mode": 0o700}),
                ("bin/su", "file", {"data": b"su", "mode": 0o4755}), ("bin/login", "link", {"linkname": "bin/su"}),
                ("dev/null", "char", {"devmajor": 1, "devminor": 3, "mode": 0o666}),
                ("lib", "symlink", {"linkname": "usr/lib"})]),
        _layer([("etc/.wh.motd", "file", {}), ("srv/www/.wh..wh..opq", "file", {}),
                ("srv/www/b", "file", {"data": b"b"}), ("lib/x", "file", {"data": b"x"})]),
    )
    tree = {e.path: (e.kind, oct(e.mode), e.digest, e.target) for e in state.tree_entries()}
    assert tree == {
        "bin": ("dir", "0o755", "", ""), "bin/login": ("file", "0o4755", "digest-of-su", ""),
        "bin/su": ("file", "0o4755", "digest-of-su", ""), "dev": ("dir", "0o755", "", ""),
        "etc": ("dir", "0o755", "", ""), "home": ("dir", "0o755", "", ""), "home/app": ("dir", "0o700", "", ""),
        "lib": ("dir", "0o755", "", ""),  # a directory in an upper layer hides the symlink (overlayfs)
        "lib/x": ("file", "0o644", "digest-of-x", ""),
        "srv": ("dir", "0o755", "", ""), "srv/www": ("dir", "0o755", "", ""),
        "srv/www/b": ("file", "0o644", "digest-of-b", ""),
    }
    assert state.owners() == {"format": "dtbuild-rootfs-owners/1", "owners": [["home/app", 1000, 1000]],
                              "specials": [["dev/null", "char", 0o666, 0, 0, 1, 3]]}


def test_an_opaque_marker_keeps_what_its_own_layer_put_there() -> None:
    state = _flatten(_layer([("d/old", "file", {"data": b"o"})]),
                     _layer([("d/new", "file", {"data": b"n"}), ("d/.wh..wh..opq", "file", {})]))
    assert [e.path for e in state.tree_entries()] == ["d", "d/new"]


def test_apply_owners_restores_owners_and_setuid_bits(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to other ids needs root")
    (tmp_path / "home").mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ping").write_text("")
    os.chmod(tmp_path / "bin" / "ping", 0o4755)
    sidecar = tmp_path / "owners.json"
    sidecar.write_text(json.dumps({"format": "dtbuild-rootfs-owners/1",
                                   "owners": [["home", 1000, 100], ["bin/ping", 0, 5], ["missing", 1, 1]],
                                   "specials": [["fifo", "fifo", 0o600, 7, 7, 0, 0]]}))
    apply_owners(str(tmp_path), str(sidecar))
    st = os.stat(tmp_path / "bin" / "ping")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 5, 0o4755)
    assert (os.stat(tmp_path / "home").st_uid, os.stat(tmp_path / "home").st_gid) == (1000, 100)
    fifo = os.lstat(tmp_path / "fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and fifo.st_uid == 7
