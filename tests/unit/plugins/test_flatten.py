"""Flattening layers (plugins/builtin/flatten.py) pinned with known answers: whiteouts and
opaque markers hide lower layers only, wherever they sit in their own layer; hard links
share files of the same or lower layers; devices stay metadata; a directory replaces a
symlink. Each layer is a real tar read back through tar_extract, as every consumer
(RootfsUnpack, ImageExport, base_directories) reads them, and the consumers give the
same answers."""

from __future__ import annotations

import io
import itertools
import tarfile

import pytest
from dtbuild.plugins.builtin import tar_extract
from dtbuild.plugins.builtin.flatten import FlatEntry, Flattener, FlattenError
from dtbuild.plugins.builtin.layer_contents import base_directories
from dtbuild.plugins.builtin.layered_actions import apply_layer
from dtbuild.plugins.builtin.root_layer import RootfsState

D, SYM, LNK, CHR, BLK = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE


def _m(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | str = b"", mode: int | None = None,
       uid: int = 0, dev: tuple[int, int] = (0, 0)) -> tuple[tarfile.TarInfo, bytes]:
    """A member: a file's bytes, or a link's target (str)."""
    info = tarfile.TarInfo(name)
    info.type, info.uid, info.mtime = kind, uid, 1
    info.mode = mode if mode is not None else 0o755 if kind == D else 0o644
    info.devmajor, info.devminor = dev
    body = data if isinstance(data, bytes) else b""
    if isinstance(data, str):
        info.linkname = data
    info.size = len(body) if kind == tarfile.REGTYPE else 0
    return info, body


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, body in members:
            tar.addfile(info, io.BytesIO(body) if info.isreg() else None)
    return out.getvalue()


def _flatten(*layers: list[tuple[tarfile.TarInfo, bytes]]) -> Flattener:
    flat = Flattener()
    for number, layer in enumerate(layers):
        flat.begin_layer(number)
        entries = tar_extract.read_entries(io.BytesIO(_tar(layer)), lower_files=flat.holds_file)
        flat.apply_layer(entries, number, lambda _e, source: source.read().decode() if source else "")
    return flat


def _view(flat: Flattener) -> dict[str, tuple]:
    """path -> (kind, mode, content or target); implicit directories marked '+'."""
    out = {}
    for path, e in flat.sorted_entries():
        what = e.content if e.kind == "file" else e.target if e.kind == "symlink" else ""
        out[path] = (e.kind + ("+" if e.implicit else ""), oct(e.mode), what)
    return out


LOWER = [_m("etc/", D), _m("etc/motd", data=b"old"), _m("srv/", D, mode=0o700), _m("srv/www/", D),
         _m("srv/www/index", data=b"lower"), _m("keep", data=b"k")]


@pytest.mark.parametrize("marker_first", [True, False])
def test_a_whiteout_hides_the_lower_entry_but_not_the_same_layers_new_one(marker_first: bool) -> None:
    """OCI: files present in the same layer as a whiteout can only be hidden by the
    whiteouts of later layers -- whether the marker comes before or after them."""
    whiteout, recreated = _m("etc/.wh.motd"), _m("etc/motd", data=b"new")
    flat = _flatten(LOWER, [whiteout, recreated] if marker_first else [recreated, whiteout])
    assert _view(flat)["etc/motd"] == ("file", "0o644", "new")
    assert flat.nodes["etc/motd"].layer == 1
    # The next layer's whiteout hides it.
    assert "etc/motd" not in _flatten(LOWER, [recreated, whiteout], [_m("etc/.wh.motd")]).nodes


@pytest.mark.parametrize("marker_first", [True, False])
def test_a_whiteout_of_a_directory_then_a_recreated_one(marker_first: bool) -> None:
    marker, layer = _m(".wh.srv"), [_m("srv/", D, mode=0o750), _m("srv/new", data=b"n")]
    flat = _flatten(LOWER, [marker, *layer] if marker_first else [*layer, marker])
    assert {p: v for p, v in _view(flat).items() if p.startswith("srv")} == {
        "srv": ("dir", "0o750", ""), "srv/new": ("file", "0o644", "n")}


@pytest.mark.parametrize("marker_first", [True, False])
def test_a_whiteout_of_a_directory_keeps_the_same_layers_entries_below_it(marker_first: bool) -> None:
    """The layer holds srv/www/fresh but no srv/ or srv/www/ entry: the lower directories
    are hidden, and the parents are made as an extractor makes them (0755, 0:0), as if
    the whiteout had been applied first."""
    marker, child = _m(".wh.srv"), _m("srv/www/fresh", data=b"f")
    flat = _flatten(LOWER, [marker, child] if marker_first else [child, marker])
    assert {p: v for p, v in _view(flat).items() if p.startswith("srv")} == {
        "srv": ("dir+", "0o755", ""), "srv/www": ("dir+", "0o755", ""), "srv/www/fresh": ("file", "0o644", "f")}


@pytest.mark.parametrize("marker_first", [True, False])
def test_an_opaque_directory_hides_only_lower_children(marker_first: bool) -> None:
    marker = _m("srv/.wh..wh..opq")
    layer = [_m("srv/www/fresh", data=b"f"), _m("srv/top", data=b"t")]
    flat = _flatten(LOWER, [marker, *layer] if marker_first else [*layer, marker])
    view = _view(flat)
    assert {p: v for p, v in view.items() if p.startswith("srv")} == {
        "srv": ("dir", "0o700", ""),  # the directory itself stays, with its lower mode
        "srv/top": ("file", "0o644", "t"), "srv/www": ("dir+", "0o755", ""), "srv/www/fresh": ("file", "0o644", "f")}
    assert view["keep"] == ("file", "0o644", "k") and view["etc/motd"] == ("file", "0o644", "old")


def test_an_opaque_marker_at_the_root_hides_every_lower_entry() -> None:
    flat = _flatten(LOWER, [_m("new", data=b"n"), _m(".wh..wh..opq")])
    assert list(flat.nodes) == ["new"]


def test_the_result_does_not_depend_on_where_markers_sit_in_their_layer() -> None:
    layer = [_m("srv/.wh..wh..opq"), _m(".wh.keep"), _m("etc/.wh.motd"), _m("srv/www/x", data=b"x"),
             _m("etc/motd", data=b"new"), _m("keep/", D)]
    answers = set()
    for order in itertools.permutations(layer):
        try:
            flat = _flatten(LOWER, list(order))
        except tar_extract.UnsafeArchive:
            continue  # an order tar_extract refuses (an entry below a path made a file)
        answers.add(tuple(sorted(_view(flat).items())))
    assert len(answers) == 1
    assert dict(answers.pop()) == {
        "etc": ("dir", "0o755", ""), "etc/motd": ("file", "0o644", "new"), "keep": ("dir", "0o755", ""),
        "srv": ("dir", "0o700", ""), "srv/www": ("dir+", "0o755", ""), "srv/www/x": ("file", "0o644", "x")}


def test_a_hard_link_shares_a_file_of_a_lower_layer_with_its_mode_and_owner() -> None:
    flat = _flatten([_m("bin/", D), _m("bin/busybox", data=b"bb", mode=0o4755, uid=7)],
                    [_m("bin/sh", LNK, "bin/busybox", mode=0o644)])
    sh, busybox = flat.nodes["bin/sh"], flat.nodes["bin/busybox"]
    assert sh == busybox and (sh.mode, sh.uid, sh.content) == (0o4755, 7, "bb")
    assert (sh.layer, busybox.layer) == (1, 0)


@pytest.mark.parametrize("marker_first", [True, False])
def test_a_hard_link_may_share_a_lower_file_its_own_layer_hides(marker_first: bool) -> None:
    """The lower file is the one the layers below hold, whichever order the layer stores
    the link and the whiteout of its target in."""
    marker, link = _m("bin/.wh.busybox"), _m("bin/sh", LNK, "bin/busybox")
    flat = _flatten([_m("bin/", D), _m("bin/busybox", data=b"bb")], [marker, link] if marker_first else [link, marker])
    assert _view(flat) == {"bin": ("dir", "0o755", ""), "bin/sh": ("file", "0o644", "bb")}


def test_a_hard_link_to_a_file_of_its_own_layer_shares_the_layers_version() -> None:
    flat = _flatten([_m("f", data=b"old")], [_m("f", data=b"new"), _m("g", LNK, "f")])
    assert flat.nodes["g"].content == "new"


def test_a_hard_link_to_no_file_is_an_error() -> None:
    flat = Flattener()
    link = tar_extract.ArchiveEntry("g", "hardlink", 0o644, target="missing")
    with pytest.raises(FlattenError, match="/g is a hard link to /missing, which is not a file"):
        flat.apply(link, 0)
    lenient = Flattener(keep_unresolved_links=True)
    lenient.apply(link, 0)
    assert lenient.nodes["g"] == FlatEntry("file", 0o644)


def test_devices_are_kept_as_metadata() -> None:
    flat = _flatten([_m("dev/", D), _m("dev/null", CHR, mode=0o666, dev=(1, 3)), _m("dev/sda", BLK, dev=(8, 0)),
                     _m("run/fifo", tarfile.FIFOTYPE, mode=0o600, uid=5)])
    null, sda, fifo = flat.nodes["dev/null"], flat.nodes["dev/sda"], flat.nodes["run/fifo"]
    assert (null.kind, null.mode, null.devmajor, null.devminor) == ("char", 0o666, 1, 3)
    assert (sda.kind, sda.devmajor, sda.devminor) == ("block", 8, 0)
    assert (fifo.kind, fifo.uid) == ("fifo", 5)
    assert "dev/null" not in _flatten([_m("dev/null", CHR, dev=(1, 3))], [_m("dev/.wh.null")]).nodes


def test_a_symlink_is_replaced_by_a_directory() -> None:
    lower = [_m("lib", SYM, "usr/lib"), _m("lib64", SYM, "usr/lib"), _m("usr/lib/", D)]
    flat = _flatten(lower, [_m("lib/", D, mode=0o700), _m("lib64/x", data=b"x")])
    view = _view(flat)
    assert view["lib"] == ("dir", "0o700", "")
    assert view["lib64"] == ("dir+", "0o755", "") and view["lib64/x"] == ("file", "0o644", "x")
    assert view["usr/lib"] == ("dir", "0o755", "")


def test_a_file_replaces_a_directory_and_its_contents() -> None:
    flat = _flatten([_m("p/", D), _m("p/child", data=b"c"), _m("q", data=b"q")], [_m("p", data=b"p"), _m("q/", D)])
    assert _view(flat) == {"p": ("file", "0o644", "p"), "q": ("dir", "0o755", "")}


@pytest.mark.parametrize("name", [".wh.", "etc/.wh.", "etc/.wh..", "etc/.wh..."])
def test_a_whiteout_that_names_no_entry_hides_nothing(name: str) -> None:
    """``.wh.`` at the root names the root itself: export_image once removed everything."""
    assert _view(_flatten(LOWER, [_m(name)])) == _view(_flatten(LOWER))


# --------------------------------------------------------------------------- the consumers


def test_rootfs_unpack_keeps_a_parent_its_layer_still_fills() -> None:
    """RootfsState once removed /srv (a lower directory) after the layer's own srv/new,
    leaving srv/new without its parent."""
    state = RootfsState()
    for number, layer in enumerate([LOWER, [_m("srv/new", data=b"n"), _m(".wh.srv")]]):
        state.begin_layer(number)
        for entry, source in tar_extract.read_entries(io.BytesIO(_tar(layer)), lower_files=state.holds_file):
            data = source.read() if source is not None else b""
            state.apply(entry, number, lambda d=data: (d.decode(), len(d)))
    assert [(e.path, e.kind, e.mode) for e in state.tree_entries() if e.path.startswith("srv")] == [
        ("srv", "dir", 0o755), ("srv/new", "file", 0o644)]


def test_export_lets_a_hard_link_share_a_lower_file_its_layer_hides() -> None:
    """apply_layer once applied a layer's whiteouts before reading its hard links, and
    refused the link."""
    tree: dict[str, FlatEntry] = {}
    for number, layer in enumerate([[_m("bin/", D), _m("bin/busybox", data=b"bb")],
                                    [_m("bin/.wh.busybox"), _m("bin/sh", LNK, "bin/busybox")]]):
        flat = Flattener(tree)
        flat.begin_layer(number)
        entries = [e for e, _ in tar_extract.read_entries(io.BytesIO(_tar(layer)), compressed=False,
                                                         lower_files=flat.holds_file)]
        apply_layer(tree, entries, number)
    assert sorted(tree) == ["bin", "bin/sh"] and tree["bin/sh"].content.offset > 0


def test_export_still_refuses_devices_other_than_0_0_character_devices() -> None:
    entries = [tar_extract.ArchiveEntry("dev/wh", "char", 0o600), tar_extract.ArchiveEntry("dev/sda", "block", 0o600,
                                                                                           devmajor=8)]
    with pytest.raises(ValueError, match="/dev/sda is a block device"):
        apply_layer({}, entries, 0)
    tree: dict[str, FlatEntry] = {}
    apply_layer(tree, entries[:1], 0)
    assert tree["dev/wh"].kind == "char"


def test_base_directories_keep_a_directory_its_own_layer_whites_out() -> None:
    """base_directories once applied each marker as it came, so a layer's own d/ was
    removed by its later .wh.d; directories no entry made stay out, as before."""
    layers = [[_m("d/", D, mode=0o700), _m("d/x", data=b"x"), _m("e/f", data=b"f")],
              [_m("d/", D, mode=0o750, uid=3), _m(".wh.d")]]
    dirs = base_directories(io.BytesIO(_tar(layer)) for layer in layers)
    assert {p: (a.mode, a.uid) for p, a in dirs.items()} == {"d": (0o750, 3)}
