"""Every reader of layer tars and image archives goes through tar_extract: root_layer's
flattening (RootfsState) and upper-directory tars from a VM guest, export_image's
apply_layer, base directories, and the members of image archives. A hostile name is
refused (where the old readers silently clamped ``../x`` to ``x``), a hard link may
share a file of a lower layer, devices stay metadata, and file bytes are read at their
offsets."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from dtbuild.plugins.builtin import imageformat, tar_extract
from dtbuild.plugins.builtin.layer_contents import base_directories
from dtbuild.plugins.builtin.layered_actions import FlatEntry, apply_layer
from dtbuild.plugins.builtin.root_layer import RootfsState, UpperDirError, pack_upper_tar
from dtbuild.plugins.interfaces import ActionFailed

D, SYM, LNK = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE


def _tar(*members: tuple[str, bytes, bytes | str], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """Members as (name, type, data or link target)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, kind, extra in members:
            info = tarfile.TarInfo(name)
            info.type, info.mtime = kind, 1
            data = extra if isinstance(extra, bytes) else b""
            if isinstance(extra, str):
                info.linkname = extra
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return out.getvalue()


def _flatten(*layers: bytes) -> RootfsState:
    state = RootfsState()
    for number, layer in enumerate(layers):
        for entry, content in tar_extract.read_entries(io.BytesIO(layer), lower_files=state.holds_file):
            data = content.read() if content is not None else b""
            state.apply(entry, number, lambda d=data: (d.decode(), len(d)))
    return state


@pytest.mark.parametrize("name", ["../etc/cron.d/evil", "a/../../x", "/../x"])
def test_every_layer_reader_refuses_a_name_that_climbs_out(name: str, tmp_path: Path) -> None:
    layer = _tar(("a/", D, b""), (name, tarfile.REGTYPE, b"evil"))
    with pytest.raises(tar_extract.UnsafeArchive, match=r"'\.\.'"):
        _flatten(layer)
    with pytest.raises(tar_extract.UnsafeArchive, match=r"'\.\.'"):
        apply_layer({}, [e for e, _ in tar_extract.read_entries(io.BytesIO(layer), compressed=False)], 0)
    with pytest.raises(ActionFailed, match=r"layer 1: the member .* '\.\.'"):
        base_directories([io.BytesIO(layer)])
    (tmp_path / "upper.tar").write_bytes(layer)
    (tmp_path / "opaque").write_bytes(b"")
    (tmp_path / "lower").mkdir()
    with pytest.raises(UpperDirError, match=r"'\.\.'"):
        pack_upper_tar(str(tmp_path / "upper.tar"), str(tmp_path / "opaque"), str(tmp_path / "lower"),
                       str(tmp_path / "layer.tar"), str(tmp_path / "layer.json"))
    assert not (tmp_path / "layer.tar").exists() or (tmp_path / "layer.tar").stat().st_size == 0


def test_an_upper_tar_hard_link_to_a_host_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "upper.tar").write_bytes(_tar(("etc/", D, b""), ("etc/shadow-copy", LNK, "/etc/shadow")))
    (tmp_path / "opaque").write_bytes(b"")
    (tmp_path / "lower").mkdir()
    with pytest.raises(UpperDirError, match="hard link to '/etc/shadow'"):
        pack_upper_tar(str(tmp_path / "upper.tar"), str(tmp_path / "opaque"), str(tmp_path / "lower"),
                       str(tmp_path / "layer.tar"), str(tmp_path / "layer.json"))


def test_a_hard_link_may_share_a_file_of_a_lower_layer_but_not_a_missing_one() -> None:
    lower = _tar(("bin/", D, b""), ("bin/busybox", tarfile.REGTYPE, b"bb"))
    upper = _tar(("bin/sh", LNK, "bin/busybox"))
    state = _flatten(lower, upper)
    assert {e.path: e.digest for e in state.tree_entries() if e.kind == "file"} == {"bin/busybox": "bb",
                                                                                   "bin/sh": "bb"}
    with pytest.raises(tar_extract.UnsafeArchive, match="hard link to 'bin/busybox'"):
        _flatten(upper)
    tree: dict[str, FlatEntry] = {}
    for number, layer in enumerate((lower, upper)):
        entries = [e for e, _ in tar_extract.read_entries(
            io.BytesIO(layer), compressed=False, lower_files=lambda p: p in tree and tree[p].kind == "file")]
        apply_layer(tree, entries, number)
    assert tree["bin/sh"] == tree["bin/busybox"]


def test_devices_of_a_base_are_owners_metadata_only() -> None:
    layer = _tar(("dev/", D, b""), ("dev/sda", tarfile.BLKTYPE, b""), ("dev/fifo", tarfile.FIFOTYPE, b""))
    state = _flatten(layer)
    assert [s[:2] for s in state.owners()["specials"]] == [["dev/fifo", "fifo"], ["dev/sda", "block"]]
    assert [e.path for e in state.tree_entries()] == ["dev"]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_file_bytes_are_read_again_at_their_offsets(fmt: int) -> None:
    data = _tar(("d/", D, b""), ("d/" + "long" * 30 if fmt != tarfile.USTAR_FORMAT else "d/f", tarfile.REGTYPE,
                                  b"first\n"), ("e", tarfile.REGTYPE, b"x" * 1000), fmt=fmt)
    entries = [e for e, _ in tar_extract.read_entries(io.BytesIO(data), compressed=False)]
    got = []
    for entry in entries:
        if entry.kind == "file":
            with tar_extract.open_content(io.BytesIO(data), entry) as f:
                got.append(f.read())
    assert got == [b"first\n", b"x" * 1000]
    with pytest.raises(tar_extract.UnsafeArchive, match="truncated"), \
            tar_extract.open_content(io.BytesIO(data[:600]), entries[-1]) as f:
        f.read()


def test_a_sparse_member_has_no_offset_and_open_content_refuses_it() -> None:
    entry = tar_extract.ArchiveEntry("f", "file", 0o644, size=10, offset=-1, member="f")
    with pytest.raises(tar_extract.UnsafeArchive, match="sparse"):
        tar_extract.open_content(io.BytesIO(b""), entry)


def test_an_image_archive_member_that_climbs_out_is_refused_not_clamped(tmp_path: Path) -> None:
    """The old reader normalised '../manifest.json' to 'manifest.json' and read it."""
    path = tmp_path / "image.tar"
    path.write_bytes(_tar(("../manifest.json", tarfile.REGTYPE, b"[]")))
    with pytest.raises(imageformat.ImageFormatError, match=r"the member '\.\./manifest\.json' has a '\.\.'"):
        imageformat.read_image_archive(str(path))


def test_a_corrupt_gzip_stream_is_an_unsafe_archive_not_an_isal_error() -> None:
    import gzip

    blob = bytearray(gzip.compress(_tar(("data", tarfile.REGTYPE, bytes(range(256)) * 40 + b"a" * 5000)),
                                   mtime=0))
    blob[10] ^= 0xFF
    with pytest.raises(tar_extract.UnsafeArchive) as info:
        for _, content in tar_extract.archive_entries(io.BytesIO(bytes(blob))):
            if content is not None:
                content.read()
    assert info.value.damaged
