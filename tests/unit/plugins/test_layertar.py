"""Layer tars: byte-identical to GNU tar's ustar output, GNU --sort=name order, what
tarfile reads back, PAX only where needed, digests of one streaming pass, bounded
memory."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
import subprocess
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from dtbuild.plugins.builtin.compressors import GzipCompressor, NoneCompressor, ZstdCompressor
from dtbuild.plugins.builtin.layertar import (
    LAYER_MTIME,
    LayerEntry,
    LayerSourceChanged,
    entry_header,
    sorted_entries,
    write_layer,
)

GNU_TAR_FLAGS = ["--format=ustar", "--sort=name", "--mtime=@1", "--owner=0", "--group=0", "--numeric-owner"]


def entries_from_directory(root: Path, prefix: str = "") -> Iterator[LayerEntry]:
    """What a caller does: walk a directory in GNU tar order, owners 0:0, hard links
    after their first name."""
    seen: dict[tuple[int, int], str] = {}

    def walk(directory: Path, prefix: str) -> Iterator[LayerEntry]:
        for name in sorted(os.listdir(directory), key=os.fsencode):
            full = directory / name
            rel = prefix + name
            st = full.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                yield LayerEntry(rel, "dir", mode)
                yield from walk(full, rel + "/")
            elif stat.S_ISLNK(st.st_mode):
                yield LayerEntry(rel, "symlink", 0o777, linkname=os.readlink(full))
            elif (st.st_dev, st.st_ino) in seen:
                yield LayerEntry(rel, "hardlink", mode, linkname=seen[(st.st_dev, st.st_ino)])
            else:
                seen[(st.st_dev, st.st_ino)] = rel
                yield LayerEntry(rel, "file", mode, size=st.st_size, open=functools.partial(full.open, "rb"))

    yield from walk(root, prefix)


def make_tree(root: Path) -> list[str]:
    """A small tree with what layers hold: nested and sibling directories whose names sort
    differently as paths and as components, a setuid file, an empty file, a symlink, a
    hard link, a UTF-8 name and a path over 100 bytes that ustar splits."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "a-c").mkdir()
    (root / "a.d").mkdir()
    (root / "private").mkdir(mode=0o700)
    (root / "a" / "b" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "a" / "b" / "tool", 0o4755)
    (root / "a" / "hard").hardlink_to(root / "a" / "b" / "tool")
    (root / "empty").write_bytes(b"")
    (root / "a" / "link").symlink_to("../empty")
    (root / "a-c" / "café").write_bytes(b"x" * 513)
    deep = root / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "file").write_bytes(b"deep\n")
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, stat.S_IMODE(path.lstat().st_mode) & ~0o022)
    os.chmod(root / "private", 0o700)
    os.chmod(root / "a" / "b" / "tool", 0o4755)
    return sorted(os.listdir(root))


def layer_bytes(entries, **kwargs) -> bytes:
    out = io.BytesIO()
    write_layer(entries, tar_out=out, **kwargs)
    return out.getvalue()


def test_bytes_equal_gnu_tar_ustar_without_record_padding(tmp_path, require_tool):
    tar = require_tool("tar")
    names = make_tree(tmp_path)
    gnu = subprocess.run([tar, *GNU_TAR_FLAGS, "-C", str(tmp_path), "-cf", "-", *names],
                         capture_output=True, check=True).stdout
    ours = layer_bytes(list(entries_from_directory(tmp_path)))
    # GNU tar pads to a 10240-byte record; we stop after the two zero blocks.
    assert len(gnu) % 10240 == 0 and len(ours) % 512 == 0
    assert gnu[:len(ours)] == ours
    assert not any(gnu[len(ours):])


def test_sorted_entries_order_is_gnu_tar_sort_name(tmp_path, require_tool):
    tar = require_tool("tar")
    for name in ["b", "a", "a-b", "a.b", "a/z", "a/b/c", "a0", "B", "é", "a b", "_x"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(exist_ok=True)
    listing = subprocess.run([tar, "--sort=name", "-C", str(tmp_path), "-cf", "-", "."], capture_output=True,
                             check=True).stdout
    gnu_order = [line.removeprefix("./").rstrip("/") for line in
                 subprocess.run([tar, "-tf", "-"], input=listing, capture_output=True, check=True).stdout
                 .decode().splitlines() if line != "./"]
    shuffled = sorted(entries_from_directory(tmp_path), key=lambda e: hash(e.path))
    assert [e.path for e in sorted_entries(shuffled)] == gnu_order


def test_sorted_entries_rejects_duplicate_paths():
    with pytest.raises(ValueError, match=r"/etc/passwd appears twice \(as a file and as a symlink\)"):
        sorted_entries([LayerEntry("etc", "dir"), LayerEntry("etc/passwd", "file"),
                        LayerEntry("etc/passwd", "symlink", linkname="x")])


def test_a_hard_link_sorted_before_its_target_is_turned_around(tmp_path):
    # /a/link and /b/link link to /z/data: the first in tar order carries the bytes, so
    # that tar readers (GNU tar here, umoci too) find each link's target before it.
    data = b"shared bytes\n"
    entries = [LayerEntry("a", "dir", 0o755), LayerEntry("b", "dir", 0o755), LayerEntry("z", "dir", 0o755),
               LayerEntry("a/link", "hardlink", linkname="z/data"),
               LayerEntry("b/link", "hardlink", linkname="z/data"),
               LayerEntry("z/data", "file", 0o640, size=len(data), open=lambda: io.BytesIO(data))]
    ordered = sorted_entries(entries)
    assert [(e.path, e.kind, e.linkname) for e in ordered if e.kind != "dir"] == [
        ("a/link", "file", ""), ("b/link", "hardlink", "a/link"), ("z/data", "hardlink", "a/link")]
    assert next(e for e in ordered if e.path == "a/link").mode == 0o640
    out = io.BytesIO()
    write_layer(ordered, tar_out=out, compressor=None, blob_out=None)
    (tmp_path / "layer.tar").write_bytes(out.getvalue())
    (tmp_path / "root").mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "layer.tar"), "-C", str(tmp_path / "root")], check=True)
    for path in ("a/link", "b/link", "z/data"):
        assert (tmp_path / "root" / path).read_bytes() == data
    assert os.stat(tmp_path / "root/a/link").st_ino == os.stat(tmp_path / "root/z/data").st_ino


def test_tarfile_reads_back_every_kind_with_fixed_mtime_and_numeric_owners():
    data = b"hello\n"
    entries = [
        LayerEntry("bin", "dir", 0o755),
        LayerEntry("bin/sh", "file", 0o4755, uid=0, gid=0, size=len(data), open=lambda: io.BytesIO(data)),
        LayerEntry("bin/sh-hard", "hardlink", 0o4755, linkname="bin/sh"),
        LayerEntry("bin/bash", "symlink", 0o777, linkname="sh"),
        LayerEntry("home", "dir", 0o1777),
        LayerEntry("home/user", "dir", 0o700, uid=1000, gid=100, uname="user", gname="users"),
        LayerEntry("home/user/.wh.gone", "file", 0o644),
        LayerEntry("home/user/removed", "char", 0o644),
    ]
    raw = layer_bytes(entries)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [e.path for e in entries]
        assert {m.mtime for m in members} == {LAYER_MTIME}
        by_name = {m.name: m for m in members}
        assert tar.extractfile("bin/sh").read() == data  # type: ignore[union-attr]
        assert by_name["bin/sh"].mode == 0o4755 and by_name["bin/sh"].isreg()
        assert by_name["bin/sh-hard"].islnk() and by_name["bin/sh-hard"].linkname == "bin/sh"
        assert by_name["bin/bash"].issym() and by_name["bin/bash"].linkname == "sh"
        assert by_name["home"].isdir() and by_name["home"].mode == 0o1777
        user = by_name["home/user"]
        assert (user.uid, user.gid, user.uname, user.gname) == (1000, 100, "user", "users")
        assert (by_name["bin"].uname, by_name["bin"].gname) == ("", "")
        assert by_name["home/user/.wh.gone"].isreg() and by_name["home/user/.wh.gone"].size == 0
        removed = by_name["home/user/removed"]
        assert removed.ischr() and (removed.devmajor, removed.devminor) == (0, 0)
    # Directory names end with '/', as GNU tar writes them.
    assert raw[:4] == b"bin/" and raw[4] == 0


def test_long_fields_use_pax_records_without_times():
    long_component = "n" * 120  # cannot be split into ustar prefix/name
    long_path = "/".join(["dir" + str(i) * 20 for i in range(15)])  # > 256 bytes
    entries = [
        LayerEntry(long_component, "file", 0o644, uid=10**7, gid=3 * 10**6, uname="u" * 40, gname="g" * 40),
        LayerEntry(long_path, "dir", 0o755),
        LayerEntry("link", "symlink", 0o777, linkname="t" * 150),
        LayerEntry("short", "file", 0o644),
    ]
    raw = layer_bytes(entries)
    assert raw.count(b"././@PaxHeader") == 3
    for key in (b"mtime=", b"atime=", b"ctime="):
        assert key not in raw
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [long_component, long_path, "link", "short"]
    first = members[0]
    assert (first.uid, first.gid, first.uname, first.gname) == (10**7, 3 * 10**6, "u" * 40, "g" * 40)
    assert members[2].linkname == "t" * 150
    assert members[3].pax_headers == {}
    assert {m.mtime for m in members} == {LAYER_MTIME}


def test_pax_size_for_files_of_8_gib_and_more():
    header = entry_header(LayerEntry("big", "file", size=8 << 30))
    assert b" size=8589934592\n" in header
    assert entry_header(LayerEntry("below", "file", size=(8 << 30) - 1)).count(b"ustar") == 1


def test_long_path_that_splits_stays_ustar():
    path = "p" * 90 + "/" + "q" * 90
    header = entry_header(LayerEntry(path, "file"))
    assert len(header) == 512 and b"PaxHeader" not in header
    with tarfile.open(fileobj=io.BytesIO(layer_bytes([LayerEntry(path, "file")]))) as tar:
        assert tar.getnames() == [path]


@pytest.mark.parametrize("path", ["/abs", "trailing/", "", "a//b", "a/../b", "./a", "a/."])
def test_invalid_paths_are_rejected(path):
    with pytest.raises(ValueError, match="layer entry path"):
        write_layer([LayerEntry(path, "file")])


def test_invalid_entries_are_rejected():
    with pytest.raises(ValueError, match="unknown kind 'fifo'"):
        write_layer([LayerEntry("p", "fifo")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a symlink needs a linkname"):
        write_layer([LayerEntry("s", "symlink")])
    with pytest.raises(ValueError, match="needs an opener"):
        write_layer([LayerEntry("f", "file", size=3)])


def sample_entries() -> list[LayerEntry]:
    blob = bytes(range(256)) * 4000 + b"tail"
    return [
        LayerEntry("etc", "dir", 0o755),
        LayerEntry("etc/big", "file", 0o644, size=len(blob), open=lambda: io.BytesIO(blob)),
        LayerEntry("etc/hosts", "file", 0o644, size=10, open=lambda: io.BytesIO(b"127.0.0.1\n")),
        LayerEntry("usr", "dir", 0o755),
        LayerEntry("usr/bin", "symlink", 0o777, linkname="../bin"),
    ]


#: diff_id of sample_entries(): pins the byte format of layers.
SAMPLE_DIFF_ID = "sha256:e09565935aee58f798ac746fc9be21b2f0e9ba361a2cefcb4a1631686071ef39"


@pytest.mark.parametrize("cls", [NoneCompressor, GzipCompressor, ZstdCompressor])
def test_one_pass_digests_are_the_hashes_of_the_bytes_written(cls):
    compressor = cls()
    tar_out, blob_out = io.BytesIO(), io.BytesIO()
    digests = write_layer(sample_entries(), tar_out=tar_out, compressor=compressor, blob_out=blob_out)
    tar, blob = tar_out.getvalue(), blob_out.getvalue()
    assert digests.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest() == SAMPLE_DIFF_ID
    assert digests.tar_size == len(tar)
    assert digests.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert digests.blob_size == len(blob)
    assert compressor.decompress_from(io.BytesIO(blob)).read() == tar
    assert digests.media_type == cls.OCI_LAYER_MEDIA_TYPE
    assert digests.docker_media_type == cls.DOCKER_LAYER_MEDIA_TYPE
    if cls is NoneCompressor:
        assert digests.blob_digest == digests.diff_id and blob == tar


def test_no_compressor_means_the_blob_is_the_tar():
    digests = write_layer(sample_entries())
    assert (digests.blob_digest, digests.blob_size) == (SAMPLE_DIFF_ID, digests.tar_size)
    assert digests.media_type == "application/vnd.oci.image.layer.v1.tar"


@pytest.mark.parametrize("chunk_size", [512, 4096, 100_000, 1 << 20])
def test_same_bytes_whatever_the_chunk_size(chunk_size):
    tar_out, blob_out = io.BytesIO(), io.BytesIO()
    digests = write_layer(sample_entries(), tar_out=tar_out, compressor=GzipCompressor(), blob_out=blob_out,
                          chunk_size=chunk_size)
    reference = write_layer(sample_entries(), compressor=GzipCompressor())
    assert digests == reference
    assert digests.diff_id == SAMPLE_DIFF_ID


class ReadOnly(io.RawIOBase):
    """A stream with read() only (no readinto), returning short reads."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        n = min(n if n >= 0 else len(self.data), 1000)
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk

    readinto = None  # type: ignore[assignment]


def test_streams_without_readinto_and_short_reads():
    data = b"z" * 5000
    raw = layer_bytes([LayerEntry("f", "file", size=len(data), open=lambda: ReadOnly(data))])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert tar.extractfile("f").read() == data  # type: ignore[union-attr]


@pytest.mark.parametrize(("declared", "actual", "message"), [
    (10, b"short", r"/f ended after 5 of its 10 bytes"),
    (3, b"longer", r"/f holds more than its 3 bytes"),
])
def test_a_file_that_changed_size_while_read_is_an_error(declared, actual, message):
    with pytest.raises(LayerSourceChanged, match=message):
        write_layer([LayerEntry("f", "file", size=declared, open=lambda: io.BytesIO(actual))],
                    tar_out=io.BytesIO())


def test_memory_stays_bounded_for_a_200_mb_file(tmp_path):
    sparse = tmp_path / "sparse"
    size = 200 * 1000 * 1000
    with open(sparse, "wb") as f:
        f.truncate(size)
    tracemalloc.start()
    try:
        digests = write_layer([LayerEntry("sparse", "file", size=size, open=functools.partial(sparse.open, "rb"))],
                              tar_out=None, compressor=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digests.tar_size == 512 + size + (-size % 512) + 1024
    assert peak < 50 * 1000 * 1000, f"peak {peak} bytes"


class Trickle(io.RawIOBase):
    """A stream whose ``readinto`` gives at most 7 bytes at a time."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = min(len(buffer), len(self.data), 7)
        buffer[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


def test_small_files_read_in_short_pieces_keep_their_bytes():
    files = {f"d/f{i}": bytes(range(i, i + 30 + i)) for i in range(5)}
    entries = [LayerEntry("d", "dir", mode=0o755)] + [
        LayerEntry(path, "file", size=len(data), open=functools.partial(Trickle, data))
        for path, data in files.items()]
    with tarfile.open(fileobj=io.BytesIO(layer_bytes(entries))) as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()} == files  # type: ignore[union-attr]


def test_entries_of_one_layer_keep_their_own_modes_and_owners():
    entries = [
        LayerEntry("a", "file", mode=0o644, uid=0, gid=0),
        LayerEntry("b", "file", mode=0o4755, uid=1000, gid=100, uname="app", gname="users"),
        LayerEntry("c", "file", mode=0o644, uid=0, gid=0),
        LayerEntry("d", "dir", mode=0o700, uid=1000, gid=100, uname="app", gname="users"),
        LayerEntry("e", "symlink", mode=0o777, uid=5, gid=6, linkname="a"),
    ]
    with tarfile.open(fileobj=io.BytesIO(layer_bytes(entries))) as tar:
        got = [(m.name, m.mode, m.uid, m.gid, m.uname, m.gname, m.linkname) for m in tar.getmembers()]
    assert got == [("a", 0o644, 0, 0, "", "", ""), ("b", 0o4755, 1000, 100, "app", "users", ""),
                   ("c", 0o644, 0, 0, "", "", ""), ("d", 0o700, 1000, 100, "app", "users", ""),
                   ("e", 0o777, 5, 6, "", "", "a")]
