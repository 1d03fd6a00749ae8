"""Reading tar archives dtbuild did not write (tar_extract), and the two action kinds
that read them: FetchUrl(extract = True) and MergeTrees. Every hostile member is
refused by name before anything is made of it; normal archives keep the trees (and
digests) they had."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import pytest
from dtbuild.engine.execution import build_tree
from dtbuild.engine.store import Store
from dtbuild.plugins.builtin import tar_extract
from dtbuild.plugins.builtin.fetch import FetchUrl
from dtbuild.plugins.builtin.layered_actions import MergeTrees
from dtbuild.plugins.builtin.tar_extract import ArchiveEntry, UnsafeArchive
from dtbuild.plugins.interfaces import ActionFailed, InputArtifact, Settings, TreeEntry

# --------------------------------------------------------------------------- building archives


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int | None = None,
           linkname: str = "", uid: int = 0, gid: int = 0, major: int = 0, minor: int = 0,
           pax: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    mode = mode if mode is not None else 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.type, info.mode, info.linkname, info.uid, info.gid = kind, mode, linkname, uid, gid
    info.devmajor, info.devminor = major, minor
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if pax:
        info.pax_headers = pax
    return info, data


def archive(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def entries(data: bytes) -> list[tuple[ArchiveEntry, bytes | None]]:
    return [(e, content.read() if content is not None else None)
            for e, content in tar_extract.archive_entries(io.BytesIO(data))]


def refused(data: bytes) -> UnsafeArchive:
    with pytest.raises(UnsafeArchive) as info:
        entries(data)
    return info.value


D, SYM, LNK = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE

# --------------------------------------------------------------------------- names


def test_names_lose_leading_slashes_and_dots_as_gnu_tar_strips_them() -> None:
    got = entries(archive(member("./", D), member("/abs", D), member("./abs/./f", data=b"x"), member("d/", D)))
    assert [(e.path, e.kind) for e, _ in got] == [("abs", "dir"), ("abs/f", "file"), ("d", "dir")]
    assert got[1][1] == b"x"


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "a/../b", "/../etc/passwd", ".."])
def test_a_name_with_a_dotdot_component_is_refused_naming_the_member(name: str) -> None:
    error = refused(archive(member("a/", D), member(name, data=b"evil")))
    assert error.member == name and "'..'" in str(error)
    assert name in error.message("x.tar") and error.hint


def test_nul_and_empty_names_are_refused() -> None:
    assert "NUL" in str(refused(archive(member("ab", pax={"path": "a\x00b"}))))
    assert "empty name" in str(refused(archive(member(""), fmt=tarfile.USTAR_FORMAT)))


def test_a_member_below_a_symlink_of_the_archive_is_refused() -> None:
    error = refused(archive(member("etc", SYM, linkname="/etc"), member("etc/passwd", data=b"root::0:0\n")))
    assert error.member == "etc/passwd" and "symbolic link" in str(error)
    error = refused(archive(member("d", SYM, linkname="."), member("d/x/y", data=b"")))
    assert error.member == "d/x/y"


def test_symlinks_are_kept_as_entries_with_their_target() -> None:
    ((e, content),) = entries(archive(member("bin/sh", SYM, linkname="/bin/busybox")))
    assert (e.path, e.kind, e.target, content) == ("bin/sh", "symlink", "/bin/busybox", None)


# --------------------------------------------------------------------------- hard links


@pytest.mark.parametrize("target", ["/etc/passwd", "../../canary", "later", "dir", "link", "self"])
def test_a_hard_link_is_refused_unless_it_names_an_earlier_file_of_the_archive(target: str) -> None:
    error = refused(archive(member("dir/", D), member("link", SYM, linkname="file"), member("file", data=b"x"),
                            member("self", LNK, linkname=target), member("later", data=b"y")))
    assert error.member == "self"
    assert ("hard link" in str(error) and target in str(error)) or "'..'" in str(error)


def test_a_hard_link_to_an_earlier_file_shares_its_content() -> None:
    got = entries(archive(member("a/f", data=b"x", mode=0o4755), member("g", LNK, linkname="./a/f"),
                          member("h", LNK, linkname="/g")))
    assert [(e.path, e.kind, e.target) for e, _ in got] == [("a/f", "file", ""), ("g", "hardlink", "a/f"),
                                                             ("h", "hardlink", "g")]


# --------------------------------------------------------------------------- metadata


def test_owners_modes_and_device_numbers_are_metadata() -> None:
    got = entries(archive(member("bin/su", data=b"su", mode=0o4755, uid=0, gid=0),
                          member("tmp/", D, mode=0o1777), member("sg", data=b"", mode=0o2711, uid=7, gid=8),
                          member("dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3),
                          member("dev/sda", tarfile.BLKTYPE, major=8), member("run/fifo", tarfile.FIFOTYPE)))
    by_path = {e.path: e for e, _ in got}
    assert by_path["bin/su"].mode == 0o4755 and by_path["tmp"].mode == 0o1777
    assert (by_path["sg"].mode, by_path["sg"].uid, by_path["sg"].gid) == (0o2711, 7, 8)
    assert (by_path["dev/null"].kind, by_path["dev/null"].devmajor, by_path["dev/null"].devminor) == ("char", 1, 3)
    assert by_path["dev/sda"].kind == "block" and by_path["run/fifo"].kind == "fifo"


def test_a_directory_and_a_file_at_one_path_are_refused() -> None:
    assert refused(archive(member("p/", D), member("p", data=b""))).member == "p"
    assert refused(archive(member("p", data=b""), member("p/q", data=b""))).member == "p/q"


# --------------------------------------------------------------------------- damaged archives


def test_an_oversized_pax_header_is_refused_before_it_is_read() -> None:
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, tar_extract.MAX_HEADER_SIZE + 1
    data = header.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024  # far less than the header claims
    assert "extended header" in str(refused(data))


def test_what_is_not_a_tar_and_a_truncated_member_are_errors_not_tracebacks() -> None:
    error = refused(b"this is not an archive" * 100)
    assert error.member is None and "not a readable tar archive" in str(error)
    data = archive(member("big", data=b"x" * 100_000))
    error = refused(data[:20_000])
    assert error.member == "big" and "truncated" in str(error)


def test_compressed_archives_are_read(tmp_path: Path) -> None:
    import zstandard

    data = archive(member("a", data=b"hello"))
    for packed in (zstandard.ZstdCompressor().compress(data), _gzip(data), _xz(data)):
        assert [(e.path, c) for e, c in entries(packed)] == [("a", b"hello")]


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def _xz(data: bytes) -> bytes:
    import lzma

    return lzma.compress(data)


# --------------------------------------------------------------------------- the action kinds


class FakeContext:
    """The slice of ActionContext that FetchUrl and MergeTrees use, over a real store."""

    def __init__(self, tmp_path: Path, params: dict[str, Any], srcs: Sequence[InputArtifact] = ()) -> None:
        self.store = Store(str(tmp_path / "cache"))
        self.params = params
        self.settings = Settings()
        self.scratch_dir = str(tmp_path / "scratch")
        os.makedirs(self.scratch_dir, exist_ok=True)
        self._srcs = list(srcs)
        self.trees: dict[str, str] = {}
        self.logs: list[str] = []

    def inputs(self, name: str) -> Sequence[InputArtifact]:
        return self._srcs if name == "srcs" else []

    def open_input(self, art: InputArtifact) -> IO[bytes]:
        return open(art.path, "rb")

    def store_file(self, art: InputArtifact) -> None:
        pass

    def walk_tree(self, art: InputArtifact) -> Iterable[TreeEntry]:
        return self.store.walk_tree(art.digest)

    def put_file(self, path: str) -> tuple[str, int]:
        return self.store.put_file(path)

    def put_stream(self, source: IO[bytes], size: int | None = None) -> tuple[str, int]:
        data = source.read()
        return self.store.put_bytes(data), len(data)

    def output_path(self, name: str) -> str:
        return os.path.join(self.scratch_dir, "..", f"out-{name}")

    def output_tree(self, name: str, items: Sequence[TreeEntry]) -> None:
        self.trees[name] = build_tree(self.store, items)[0]

    def log(self, message: str) -> None:
        self.logs.append(message)

    def walk(self, name: str) -> dict[str, tuple[str, int, bytes | str]]:
        out: dict[str, tuple[str, int, bytes | str]] = {}
        for e in self.store.walk_tree(self.trees[name]):
            content: bytes | str = self.store.read_blob(e.digest) if e.kind == "file" else e.target
            out[e.path] = (e.kind, e.mode, content)
        return out


def merge(tmp_path: Path, *tarballs: bytes) -> FakeContext:
    srcs = []
    for number, data in enumerate(tarballs):
        path = tmp_path / f"in-{number}.tar"
        path.write_bytes(data)
        srcs.append(InputArtifact(str(path), "0" * 64, False, len(data)))
    ctx = FakeContext(tmp_path, {"only_deps": False,
                                 "sources": [["tarball", f"//pkg:t{n}", n, "/"] for n in range(len(srcs))]}, srcs)
    MergeTrees().run(ctx)  # type: ignore[arg-type]
    return ctx


@pytest.mark.timeout(60)
def test_merge_trees_of_a_tarball_with_members_after_a_regular_file_finishes(tmp_path: Path) -> None:
    # It used to spin forever: the member loop reused its `dest` parameter as a scratch
    # path after the first regular file, and the merge then walked up from "/" for ever.
    ctx = merge(tmp_path, archive(member("opt/", D), member("opt/a", data=b"a"), member("opt/b", data=b"b"),
                                  member("opt/sub/c", data=b"c", mode=0o755)))
    assert ctx.walk("out") == {"opt": ("dir", 0o755, ""), "opt/a": ("file", 0o644, b"a"),
                               "opt/b": ("file", 0o644, b"b"), "opt/sub": ("dir", 0o755, ""),
                               "opt/sub/c": ("file", 0o755, b"c")}


def test_merge_trees_keeps_setuid_bits_in_the_tree_and_shares_hard_linked_content(tmp_path: Path) -> None:
    ctx = merge(tmp_path, archive(member("bin/", D), member("bin/su", data=b"su!", mode=0o4755),
                                  member("bin/su2", LNK, linkname="bin/su"), member("tmp/", D, mode=0o1777)))
    tree = ctx.walk("out")
    assert tree["bin/su"] == ("file", 0o4755, b"su!") == tree["bin/su2"]
    assert tree["tmp"] == ("dir", 0o1777, "")


@pytest.mark.parametrize(("bad", "what"), [
    (member("x", LNK, linkname="/etc/passwd"), "hard link"),
    (member("../../x", data=b"evil"), "'..'"),
    (member("dev/null", tarfile.CHRTYPE, major=1, minor=3), "device or fifo"),
])
def test_merge_trees_refuses_a_hostile_member_with_the_archive_and_member_named(
        tmp_path: Path, bad: tuple[tarfile.TarInfo, bytes], what: str) -> None:
    with pytest.raises(ActionFailed) as info:
        merge(tmp_path, archive(member("ok", data=b"ok"), bad))
    message = str(info.value)
    assert "in-0.tar" in message and what in message
    assert bad[0].name.lstrip("./") in message or bad[0].name in message


def fetch_extract(tmp_path: Path, data: bytes) -> FakeContext:
    import hashlib

    tmp_path.mkdir(parents=True, exist_ok=True)
    download = tmp_path / "download.tar"
    download.write_bytes(data)
    ctx = FakeContext(tmp_path, {"urls": [download.as_uri()], "sha256": hashlib.sha256(data).hexdigest(),
                                 "extract": True, "executable": False})
    FetchUrl().run(ctx)  # type: ignore[arg-type]
    return ctx


def test_fetch_extract_refuses_hard_links_out_of_the_archive_and_devices(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_text("secret\n")
    os.chmod(canary, 0o600)
    before = os.stat(canary)
    for number, bad in enumerate([member("x", LNK, linkname=str(canary), mode=0o4777, uid=1234),
                                  member("x", LNK, linkname="../../canary", mode=0o777),
                                  member("null", tarfile.CHRTYPE, major=1, minor=3)]):
        with pytest.raises(ActionFailed, match="cannot extract the download") as info:
            fetch_extract(tmp_path / str(number), archive(member("ok", data=b"ok"), bad))
        assert bad[0].name in str(info.value)
    after = os.stat(canary)
    assert canary.read_text() == "secret\n"
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns) == \
        (before.st_mode, before.st_uid, before.st_gid, before.st_mtime_ns)


def test_fetch_extract_gives_the_tree_tar_x_then_ingesting_gave(tmp_path: Path, require_tool) -> None:
    """A normal archive keeps the digest the former extractall + directory ingest gave:
    modes normalised (0755/0644 by the owner's execute bit, directories 0755), hard links
    copies, symlinks kept, empty directories kept, later members replacing earlier ones."""
    tar = require_tool("tar")
    data = archive(member("./", D), member("./pkg/", D, mode=0o700), member("./pkg/bin/tool", data=b"#!/bin/sh\n",
                   mode=0o4750), member("./pkg/lib/x.so", data=b"ELF", mode=0o600),
                   member("./pkg/lib/y.so", LNK, linkname="./pkg/lib/x.so"),
                   member("./pkg/link", SYM, linkname="lib/x.so"), member("./pkg/empty/", D, mode=0o555),
                   member("./pkg/readme", data=b"old"), member("./pkg/readme", data=b"new", mode=0o664))
    ctx = fetch_extract(tmp_path / "new", data)
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    (tmp_path / "a.tar").write_bytes(data)
    subprocess.run([tar, "-xf", str(tmp_path / "a.tar"), "-C", str(extracted), "--no-same-owner"], check=True)
    reference, _ = Store(str(tmp_path / "ref-cache")).put_tree_from_dir(str(extracted))
    assert ctx.trees["out"] == reference
    assert ctx.walk("out")["pkg/bin/tool"][1] == 0o755


# --------------------------------------------------------------------------- image archives


def test_an_oci_layout_directory_cannot_read_a_host_file_through_a_symlink(tmp_path: Path) -> None:
    from dtbuild.plugins.builtin.imageformat import read_image_archive

    secret = tmp_path / "secret.json"
    secret.write_text('{"manifests": []}')
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").symlink_to(secret)
    with pytest.raises(ValueError, match="outside the layout"):
        read_image_archive(str(layout))


def test_an_image_archive_with_an_oversized_pax_header_is_refused(tmp_path: Path) -> None:
    from dtbuild.plugins.builtin.imageformat import extract_image_archive

    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, tar_extract.MAX_HEADER_SIZE + 1
    path = tmp_path / "image.tar"
    path.write_bytes(header.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 4096)
    (tmp_path / "dest").mkdir()
    with pytest.raises(ValueError, match="extended header"):
        extract_image_archive(str(path), str(tmp_path / "dest"))
