"""The pure parts of the layered-image action kinds: applying a layer's whiteouts to a
flattened tree (export_image), the union of packages with its conflicts (the
customisation layer) and finding the binary a helper links to (bin_sh, usr_bin_env)."""

from __future__ import annotations

import io
import tarfile

import pytest
from dtbuild.plugins.builtin.layer_contents import ContentConflict, DirAttrs, MergedTree, Node
from dtbuild.plugins.builtin.layered_actions import FlatEntry, apply_layer, resolve_binary, union_of_packages
from dtbuild.plugins.builtin.tar_extract import read_entries
from dtbuild.plugins.interfaces import ActionFailed, TreeEntry


def _m(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, mode: int = 0o644, linkname: str = "",
       ) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.linkname = kind, size, mode, linkname
    return info


D = tarfile.DIRTYPE


def _flatten(*layers: list[tarfile.TarInfo]) -> dict[str, FlatEntry]:
    """Each layer written as a tar and read back through tar_extract, as ImageExport does."""
    tree: dict[str, FlatEntry] = {}
    for number, members in enumerate(layers):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for info in members:
                tar.addfile(info, io.BytesIO(bytes(info.size)) if info.isreg() else None)
        out.seek(0)
        entries = [entry for entry, _ in read_entries(out, lower_files=lambda p: p in tree)]
        apply_layer(tree, entries, number)
    return tree


def test_whiteouts_remove_lower_paths_and_their_children() -> None:
    tree = _flatten([_m("a/", D), _m("a/x"), _m("a/d/", D), _m("a/d/y"), _m("b")],
                    [_m("a/.wh.d"), _m("./.wh.b"), _m("a/z")])
    assert sorted(tree) == ["a", "a/x", "a/z"]
    assert tree["a/z"].layer == 1


def test_an_opaque_directory_hides_only_lower_children() -> None:
    tree = _flatten([_m("d/", D), _m("d/old"), _m("d/sub/", D), _m("d/sub/older"), _m("e/", D), _m("e/kept")],
                    [_m("d/", D, mode=0o700), _m("d/new"), _m("d/.wh..wh..opq")])
    assert sorted(tree) == ["d", "d/new", "e", "e/kept"]
    assert tree["d"].mode == 0o700


def test_a_file_replaces_a_directory_and_a_directory_a_file() -> None:
    tree = _flatten([_m("p/", D), _m("p/child"), _m("q")], [_m("p"), _m("q/", D), _m("q/inner")])
    assert {k: v.kind for k, v in tree.items()} == {"p": "file", "q": "dir", "q/inner": "file"}


def test_hard_links_become_copies() -> None:
    tree = _flatten([_m("f", size=3, mode=0o755), _m("g", tarfile.LNKTYPE, linkname="f")])
    assert tree["g"] == tree["f"]


def test_device_nodes_are_refused() -> None:
    node = _m("dev/console", tarfile.CHRTYPE)
    node.devmajor, node.devminor = 5, 1
    with pytest.raises(ValueError, match="/dev/console is a character device"):
        _flatten([node])


def _tree(label: str, **nodes: Node) -> tuple[str, MergedTree]:
    tree = MergedTree()
    for path, node in nodes.items():
        tree.add(path.replace("__", "/"), node)
    return label, tree


def test_the_union_accepts_identical_files_and_merges_directories() -> None:
    union = union_of_packages([
        _tree("//a:a", etc__conf=Node("file", 0o644, "d1", 3)),
        _tree("//b:b", etc__conf=Node("file", 0o644, "d1", 3), etc__other=Node("file", 0o644, "d2", 1)),
    ])
    assert sorted(union) == ["etc", "etc/conf", "etc/other"]
    assert union["etc/conf"].origin == "//a:a"


@pytest.mark.parametrize(("second", "problem"), [
    (Node("file", 0o644, "other", 3), "with different contents"),
    (Node("file", 0o755, "d1", 3), "with different modes (0644 in //a:a, 0755 in //b:b)"),
    (Node("symlink", 0o777, target="x"), "a file in //a:a but a symlink in //b:b"),
])
def test_the_union_names_both_packages_and_the_path(second: Node, problem: str) -> None:
    with pytest.raises(ContentConflict) as caught:
        union_of_packages([_tree("//a:a", etc__conf=Node("file", 0o644, "d1", 3)), _tree("//b:b", etc__conf=second)])
    assert f"//a:a and //b:b both provide /etc/conf {problem}" in str(caught.value)


def test_directories_the_base_has_take_its_mode_in_the_union() -> None:
    union = union_of_packages([_tree("//a:a", tmp__x=Node("file", 0o644, "d", 1))],
                              {"tmp": DirAttrs(0o1777, 0, 0)})
    assert union["tmp"].mode == 0o1777


def _listing(*entries: TreeEntry) -> dict[str, TreeEntry]:
    return {e.path: e for e in entries}


def test_binaries_are_found_by_name_then_as_the_only_executable() -> None:
    busybox = _listing(TreeEntry("bin/busybox", "file", 0o755, "d", 1),
                       TreeEntry("bin/env", "symlink", target="busybox"),
                       TreeEntry("bin/sh", "symlink", target="busybox"))
    assert resolve_binary(busybox, link="bin/sh", names=["bash", "busybox"], explicit=None, what="//b:b") == \
        "/bin/busybox"
    assert resolve_binary(busybox, link="usr/bin/env", names=["env"], explicit=None, what="//b:b") == "/bin/env"
    single = _listing(TreeEntry("opt/shell/bin/mysh", "file", 0o755, "d", 1), TreeEntry("opt/README", "file"))
    assert resolve_binary(single, link="bin/sh", names=["bash"], explicit=None, what="//s:s") == "/opt/shell/bin/mysh"
    assert resolve_binary(single, link="bin/sh", names=[], explicit="/opt/README", what="//s:s") == "/opt/README"
    two = _listing(TreeEntry("bin/a", "file", 0o755), TreeEntry("bin/b", "file", 0o755))
    with pytest.raises(ActionFailed, match=r"executables in bin/ directories: /bin/a, /bin/b"):
        resolve_binary(two, link="bin/sh", names=["bash"], explicit=None, what="//t:t")
    with pytest.raises(ActionFailed, match="//t:t has no file /bin/c"):
        resolve_binary(two, link="bin/sh", names=[], explicit="/bin/c", what="//t:t")
