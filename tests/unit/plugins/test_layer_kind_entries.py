"""What a layer kind yields becomes tar members: LayerMember to LayerEntry, parents added."""

from __future__ import annotations

import io

import pytest
from dtbuild.plugins.builtin.image_actions import layer_entry, with_parent_directories
from dtbuild.plugins.builtin.layertar import LayerEntry
from dtbuild.plugins.interfaces import InputArtifact, LayerMember


class _Ctx:
    def open_blob(self, digest):
        return io.BytesIO(b"blob " + digest.encode())

    def open_input(self, art):
        return io.BytesIO(b"input " + art.path.encode())


def test_members_become_entries() -> None:
    ctx = _Ctx()
    data = layer_entry(ctx, LayerMember("/etc/motd", data=b"hi\n", mode=0o600, uid=7))
    assert (data.path, data.kind, data.mode, data.uid, data.size, data.open().read()) == \
        ("etc/motd", "file", 0o600, 7, 3, b"hi\n")
    src = layer_entry(ctx, LayerMember("a", source=InputArtifact("pkg/a", "d" * 64, False, size=11)))
    assert src.open().read() == b"input pkg/a" and src.size == 11
    blob = layer_entry(ctx, LayerMember("b", digest="x", size=6))
    assert blob.open().read() == b"blob x"
    link = layer_entry(ctx, LayerMember("bin/sh", kind="symlink", target="busybox"))
    assert (link.kind, link.linkname, link.mode) == ("symlink", "busybox", 0o777)
    hard = layer_entry(ctx, LayerMember("bin/x", kind="hardlink", target="/bin/busybox"))
    assert (hard.kind, hard.linkname) == ("hardlink", "bin/busybox")
    ready = LayerEntry(path="x", kind="dir")
    assert layer_entry(ctx, ready) is ready


@pytest.mark.parametrize(("member", "message"), [
    (LayerMember("a", data=b"x", digest="y"), "one of data, source or digest"),
    (LayerMember("a", kind="symlink"), "needs a target"),
    (LayerMember("a", kind="fifo"), "is not one of"),  # type: ignore[arg-type]
    (LayerMember("a", mode=0o10000), "not a permission mode"),
    (LayerMember("d", source=InputArtifact("pkg/d", "d" * 64, True)), "not a file"),
])
def test_bad_members_are_rejected(member: LayerMember, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layer_entry(_Ctx(), member)


def test_missing_parents_are_added_once() -> None:
    entries = [LayerEntry(path="etc/motd.d/a", kind="file"), LayerEntry(path="etc", kind="dir", mode=0o700),
               LayerEntry(path="etc/motd.d/b", kind="file")]
    added = with_parent_directories(entries)
    assert [(e.path, e.mode) for e in added[3:]] == [("etc/motd.d", 0o755)]
