"""``DebExtract``: a .deb built by dpkg-deb (data.tar compressed with xz, gzip, zstd or not
at all) becomes its data tree (modes as the package has them, owners dropped) plus the
dpkg database entry distroless writes; hostile or damaged .debs (an escaping path, a
truncated ar archive, members out of order, stray bytes, a device node, the wrong
package) fail with a message that says what is wrong, never a traceback."""

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
from dtbuild.plugins.builtin.deb_actions import DebExtract, DebLockProblem, control_fields, status_entry
from dtbuild.plugins.interfaces import ActionFailed, InputArtifact, Settings, TreeEntry

CONTROL = """Package: hello
Version: 1:2.10-3+b1
Architecture: amd64
Maintainer: Santiago Vila <sanvila@debian.org>
Installed-Size: 12
Depends: libc6 (>= 2.34)
Section: devel
Priority: optional
Description: example package
 A longer description
 .
 with a paragraph break.
"""


class FakeContext:
    """The slice of ActionContext DebExtract uses, over a real store."""

    def __init__(self, tmp_path: Path, deb: Path, params: dict[str, Any]) -> None:
        self.store = Store(str(tmp_path / "cache"))
        self.params = params
        self.settings = Settings()
        self.scratch_dir = str(tmp_path / "scratch")
        os.makedirs(self.scratch_dir, exist_ok=True)
        self._deb = InputArtifact(str(deb), "0" * 64, False, deb.stat().st_size)
        self.tree: str | None = None

    def inputs(self, name: str) -> Sequence[InputArtifact]:
        return [self._deb] if name == "deb" else []

    def open_input(self, art: InputArtifact) -> IO[bytes]:
        return open(art.path, "rb")

    def put_stream(self, source: IO[bytes], size: int | None = None) -> tuple[str, int]:
        data = source.read()
        return self.store.put_bytes(data), len(data)

    def put_blob(self, data: bytes) -> str:
        return self.store.put_bytes(data)

    def output_tree(self, name: str, items: Iterable[TreeEntry]) -> None:
        assert name == "tree"
        self.tree = build_tree(self.store, list(items))[0]

    def walk(self) -> dict[str, tuple[str, int, bytes | str]]:
        assert self.tree is not None
        out: dict[str, tuple[str, int, bytes | str]] = {}
        for e in self.store.walk_tree(self.tree):
            out[e.path] = (e.kind, e.mode, self.store.read_blob(e.digest) if e.kind == "file" else e.target)
        return out


def build_deb(tmp_path: Path, compression: str = "xz", control: str = CONTROL, name: str = "hello") -> Path:
    """A real .deb made by dpkg-deb --build from a small root."""
    root = tmp_path / f"root-{compression}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(control)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/hello").write_bytes(b"#!/bin/sh\necho hello\n")
    (root / "usr/bin/hello").chmod(0o755)
    (root / "usr/bin/su-ish").write_bytes(b"setuid\n")
    (root / "usr/bin/su-ish").chmod(0o4755)
    (root / "usr/share/doc/hello").mkdir(parents=True)
    (root / "usr/share/doc/hello/copyright").write_text("free\n")
    (root / "usr/bin/hi").symlink_to("hello")
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    sums = subprocess.run(["md5sum", "usr/bin/hello", "usr/bin/su-ish", "usr/share/doc/hello/copyright"], cwd=root,
                          check=True, capture_output=True).stdout
    (root / "DEBIAN/md5sums").write_bytes(sums)
    out = tmp_path / f"{name}-{compression}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(root), str(out)],
                   check=True, capture_output=True, env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"})
    return out


def extract(tmp_path: Path, deb: Path, name: str = "hello", version: str = "1:2.10-3+b1",
            arch: str = "amd64") -> FakeContext:
    ctx = FakeContext(tmp_path, deb, {"name": name, "version": version, "architecture": arch})
    DebExtract().run(ctx)  # type: ignore[arg-type]
    return ctx


def failure(tmp_path: Path, deb: Path, **params: str) -> str:
    with pytest.raises(ActionFailed) as raised:
        extract(tmp_path, deb, **params)
    return str(raised.value)


# --------------------------------------------------------------------------- ar by hand


def ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
    assert len(header) == 60
    return header + data + (b"\n" if len(data) % 2 else b"")


def tar_bytes(members: Sequence[tuple[str, bytes | None, int]], *, kind: bytes = tarfile.REGTYPE) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind != tarfile.REGTYPE and name.endswith("null"):
                info.type = kind
                info.devmajor, info.devminor = 1, 3
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def hand_deb(tmp_path: Path, members: Sequence[bytes], *, tail: bytes = b"") -> Path:
    path = tmp_path / "hand.deb"
    path.write_bytes(b"!<arch>\n" + b"".join(members) + tail)
    return path


def good_members(data_tar: bytes | None = None) -> list[bytes]:
    control = tar_bytes([("./", None, 0o755), ("./control", CONTROL.encode(), 0o644)])
    data = data_tar if data_tar is not None else tar_bytes([("./", None, 0o755), ("./etc/", None, 0o755),
                                                            ("./etc/hello.conf", b"x=1\n", 0o644)])
    return [ar_member("debian-binary", b"2.0\n"), ar_member("control.tar", control), ar_member("data.tar", data)]


# --------------------------------------------------------------------------- real .debs


@pytest.mark.parametrize("compression", ["xz", "gzip", "zstd", "none"])
def test_a_deb_from_dpkg_deb_becomes_its_tree_and_dpkg_entry(tmp_path: Path, require_tool, compression: str) -> None:
    require_tool("dpkg-deb")
    require_tool("md5sum")
    deb = build_deb(tmp_path, compression)
    tree = extract(tmp_path, deb).walk()
    assert tree["usr/bin/hello"] == ("file", 0o755, b"#!/bin/sh\necho hello\n")
    assert tree["usr/bin/su-ish"][:2] == ("file", 0o4755)  # kept in the tree: layer headers carry it
    assert tree["usr/bin/hi"] == ("symlink", 0o777, "hello")
    assert tree["tmp"][:2] == ("dir", 0o1777)
    assert tree["usr/share/doc/hello/copyright"] == ("file", 0o644, b"free\n")
    kind, mode, status = tree["var/lib/dpkg/status.d/hello"]
    assert (kind, mode) == ("file", 0o644)
    assert isinstance(status, bytes)
    lines = status.decode().splitlines()
    assert lines[:2] == ["Package: hello", "Status: install ok installed"]
    assert "Version: 1:2.10-3+b1" in lines and " with a paragraph break." in lines
    assert status.endswith(b"paragraph break.\n")
    md5sums = tree["var/lib/dpkg/status.d/hello.md5sums"][2]
    assert isinstance(md5sums, bytes) and b"  usr/bin/hello\n" in md5sums
    assert len(md5sums.splitlines()) == 3


def test_the_same_deb_gives_the_same_tree(tmp_path: Path, require_tool) -> None:
    require_tool("dpkg-deb")
    deb = build_deb(tmp_path)
    first = extract(tmp_path / "a", deb).tree
    second = extract(tmp_path / "b", deb).tree
    assert first == second


def test_a_deb_of_another_package_than_the_lock_names_is_refused(tmp_path: Path, require_tool) -> None:
    require_tool("dpkg-deb")
    deb = build_deb(tmp_path)
    message = failure(tmp_path, deb, version="2.10-3")
    assert "control file says Version: 1:2.10-3+b1, the lock says 2.10-3" in message
    assert "dtbuild lock" in message
    assert "Package: hello, the lock says bye" in failure(tmp_path, deb, name="bye")
    assert "Architecture: amd64, the lock says all" in failure(tmp_path, deb, arch="all")


# --------------------------------------------------------------------------- hostile .debs


def test_a_hand_written_deb_without_compression_is_read(tmp_path: Path) -> None:
    tree = extract(tmp_path, hand_deb(tmp_path, good_members())).walk()
    assert tree["etc/hello.conf"] == ("file", 0o644, b"x=1\n")
    assert "var/lib/dpkg/status.d/hello.md5sums" not in tree  # the package has no md5sums


def test_a_path_escaping_the_root_is_refused(tmp_path: Path) -> None:
    data = tar_bytes([("./", None, 0o755), ("./../../etc/passwd", b"root::0:0\n", 0o644)])
    message = failure(tmp_path, hand_deb(tmp_path, good_members(data)))
    assert "data.tar" in message and "'..'" in message and "../../etc/passwd" in message


def test_a_device_node_is_refused(tmp_path: Path) -> None:
    data = tar_bytes([("./", None, 0o755), ("./dev/", None, 0o755), ("./dev/null", b"", 0o666)],
                     kind=tarfile.CHRTYPE)
    message = failure(tmp_path, hand_deb(tmp_path, good_members(data)))
    assert "character device" in message and "./dev/null" in message


def test_a_truncated_deb_is_refused(tmp_path: Path) -> None:
    whole = hand_deb(tmp_path, good_members()).read_bytes()
    cut = tmp_path / "cut.deb"
    cut.write_bytes(whole[:-700])
    message = failure(tmp_path, cut)
    assert "truncated" in message and "data.tar" in message


def test_members_out_of_order_are_refused(tmp_path: Path) -> None:
    debian, control, data = good_members()
    message = failure(tmp_path, hand_deb(tmp_path, [debian, data, control]))
    assert "'data.tar' where control.tar[.gz|.xz|.zst] must come second" in message
    message = failure(tmp_path, hand_deb(tmp_path, [control, debian, data]))
    assert "'control.tar' where the member debian-binary must come first" in message


def test_an_unknown_member_after_data_is_refused_and_an_underscore_one_skipped(tmp_path: Path) -> None:
    members = good_members()
    assert "'extra' after data.tar" in failure(tmp_path, hand_deb(tmp_path, [*members, ar_member("extra", b"1")]))
    tree = extract(tmp_path, hand_deb(tmp_path, [*members, ar_member("_gpgbuilder", b"sig")])).walk()
    assert "etc/hello.conf" in tree


def test_stray_bytes_after_the_last_member_are_refused(tmp_path: Path) -> None:
    message = failure(tmp_path, hand_deb(tmp_path, good_members(), tail=b"garbage"))
    assert "stray bytes" in message
    message = failure(tmp_path, hand_deb(tmp_path, good_members(), tail=b"g" * 60))
    assert "not an ar member header" in message


def test_not_an_ar_archive_and_a_wrong_format_version_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.deb"
    plain.write_bytes(b"PK\x03\x04 a zip file")
    assert "does not start with the ar archive magic" in failure(tmp_path, plain)
    _, control, data = good_members()
    message = failure(tmp_path, hand_deb(tmp_path, [ar_member("debian-binary", b"3.0\n"), control, data]))
    assert "format version" in message and "2.x" in message


def test_a_member_whose_bytes_are_not_its_compression_is_refused(tmp_path: Path) -> None:
    debian, control, _ = good_members()
    plain_data = tar_bytes([("./etc/x", b"x", 0o644)])
    message = failure(tmp_path, hand_deb(tmp_path, [debian, control, ar_member("data.tar.xz", plain_data)]))
    assert "data.tar.xz, whose bytes are not xz-compressed" in message


def test_a_size_past_the_end_of_the_file_is_refused_before_reading(tmp_path: Path) -> None:
    debian, control, data = good_members()
    lying = data[:48] + f"{len(data) * 10:<10}".encode() + data[58:]
    message = failure(tmp_path, hand_deb(tmp_path, [debian, control, lying]))
    assert "is truncated: the member data.tar needs" in message


def test_a_control_tar_without_control_is_refused(tmp_path: Path) -> None:
    debian, _, data = good_members()
    control = ar_member("control.tar", tar_bytes([("./md5sums", b"", 0o644)]))
    assert "has no control file in control.tar" in failure(tmp_path, hand_deb(tmp_path, [debian, control, data]))


# --------------------------------------------------------------------------- the control paragraph


def test_status_entry_puts_status_after_package_and_replaces_its_own() -> None:
    control = b"Package: a\nStatus: purge ok not-installed\n weird\nVersion: 1\n\n\n"
    assert status_entry(control) == b"Package: a\nStatus: install ok installed\nVersion: 1\n"


def test_control_fields_reads_continuations_and_refuses_two_paragraphs() -> None:
    fields = control_fields(CONTROL.encode())
    assert fields["Version"] == "1:2.10-3+b1"
    assert fields["Description"].endswith("with a paragraph break.")
    from dtbuild.plugins.builtin.deb_actions import DebError

    with pytest.raises(DebError, match="a control file of 2 paragraphs, where one is expected"):
        control_fields(b"Package: a\n\nPackage: b\n")
    with pytest.raises(DebError, match="control:1: a continuation line with no field before it"):
        control_fields(b" x\n")


def test_the_lock_problem_action_fails_with_its_message(tmp_path: Path) -> None:
    ctx = FakeContext(tmp_path, hand_deb(tmp_path, good_members()), {"message": "base/debian.lock.json is missing"})
    with pytest.raises(ActionFailed, match="is missing"):
        DebLockProblem().run(ctx)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the rule's pure parts


def test_cycles_are_broken_where_a_walk_from_the_requested_packages_closes_them() -> None:
    from dtbuild.rules.builtin.deb import acyclic_deps

    # libc6 <-> libgcc-s1, as in Debian; app needs both; unrelated is locked but not asked for.
    deps = {"app": ["libgcc-s1", "libc6"], "libc6": ["libgcc-s1"], "libgcc-s1": ["libc6", "gcc-base"],
            "unrelated": ["libc6"]}
    order, kept = acyclic_deps(["app"], deps)
    assert order == ["gcc-base", "libgcc-s1", "libc6", "app"]  # each after what it keeps
    assert kept == {"app": ["libc6", "libgcc-s1"], "libc6": ["libgcc-s1"], "libgcc-s1": ["gcc-base"],
                    "gcc-base": []}  # libgcc-s1 -> libc6 closed the cycle: dropped
    # The same graph walked from the other end keeps the other edge.
    assert acyclic_deps(["libgcc-s1"], deps)[1]["libc6"] == []


def _info(packages: tuple[str, ...] = ("app",)) -> Any:
    from dtbuild.rules.artifacts import Artifact
    from dtbuild.rules.builtin.deb import DebSourcesInfo, inputs_digest

    sources = ("http://h/debian bookworm main",)
    return DebSourcesInfo("//p:d", sources, Artifact("p/k.gpg", is_source=True), packages, ("amd64",),
                          "p/debian.lock.json", inputs_digest(sources, packages, ("amd64",)))


def _lock(info: Any, entries: list[dict[str, Any]], **top: Any) -> bytes:
    import json

    return json.dumps({"version": 1, "inputs_digest": info.inputs_digest, "architectures": {"amd64": entries},
                       **top}).encode()


def _entry(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "version": "1.0-1", "architecture": "amd64", "url": f"http://h/{name}.deb",
            "sha256": "a" * 64, "size": 10, "depends": [], **fields}


@pytest.mark.parametrize(("entries", "top", "message"), [
    ([_entry("app", depends=["bin"])], {},
     r"architectures.amd64 \(app\).depends names 'bin', which the lock does not hold"),
    ([_entry("bin")], {}, "does not hold the requested package 'app'"),
    ([_entry("bin"), _entry("app")], {}, r"\[1\] \(app\).name must sort after 'bin'"),
    ([_entry("app", size=-1)], {}, r"\(app\).size must be a byte count"),
    ([_entry("app", architecture="arm64")], {}, r"\(app\).architecture must be 'amd64' or 'all'"),
    ([_entry("app", url="ftp://h/a.deb")], {}, r"\(app\).url must be an http, https or file URL"),
    ([_entry("app")], {"version": 2}, "version must be 1, but is 2"),
    ([_entry("app")], {"inputs_digest": "sha256:" + "0" * 64}, "is stale"),
])
def test_a_lock_that_cannot_be_used_names_the_field(entries: list[dict[str, Any]], top: dict[str, Any],
                                                    message: str) -> None:
    from dtbuild.rules.builtin.deb import LockProblem, parse_lock

    info = _info()
    with pytest.raises(LockProblem, match=message):
        parse_lock(_lock(info, entries, **top), info)


def test_a_good_lock_gives_its_packages_with_their_edges() -> None:
    from dtbuild.rules.builtin.deb import parse_lock

    info = _info()
    locked = parse_lock(_lock(info, [_entry("app", depends=["bin", "app"]), _entry("bin", architecture="all")]), info)
    assert [(d.name, d.architecture, d.depends) for d in locked] == [("app", "amd64", ("bin",)),
                                                                      ("bin", "all", ())]
