"""rsync -k (copy_dirlinks) on a package's tree where real rsync cannot be the oracle: it
follows absolute links on the build machine and loops on links to their own parents."""

from __future__ import annotations

from dtbuild.plugins.builtin.layer_contents import MergedTree, Node, copy_dirlinks, resolve_directory


def _tree(**spec: str) -> dict[str, Node]:
    """path=kind: 'd' a directory, '->target' a symlink, else a file with that digest."""
    tree = MergedTree()
    for path, value in spec.items():
        path = path.replace("__", "/")
        if value == "d":
            tree.add(path, Node("dir", 0o755, origin="//p:p"))
        elif value.startswith("->"):
            tree.add(path, Node("symlink", 0o777, target=value[2:], origin="//p:p"))
        else:
            tree.add(path, Node("file", 0o644, digest=value, origin="//p:p"))
    return tree.nodes


def _shape(nodes: dict[str, Node]) -> dict[str, str]:
    return {path: node.kind if node.kind != "symlink" else "->" + node.target for path, node in nodes.items()}


def test_absolute_links_resolve_from_the_image_root() -> None:
    nodes = _tree(usr__lib__x="x", lib="->/usr/lib")
    assert _shape(copy_dirlinks(nodes)) == {"usr": "dir", "usr/lib": "dir", "usr/lib/x": "file", "lib": "dir",
                                            "lib/x": "file"}


def test_links_to_their_own_parents_and_out_of_the_tree_stay_links() -> None:
    nodes = _tree(a__self="->..", a__root="->/", a__loop="->../a", out="->../../elsewhere", a__f="f")
    copied = _shape(copy_dirlinks(nodes))
    assert copied == {"a": "dir", "a/self": "->..", "a/root": "->/", "a/loop": "->../a", "a/f": "file",
                      "out": "->../../elsewhere"}


def test_a_link_into_a_sibling_is_copied_once_and_links_inside_resolve_where_they_are() -> None:
    nodes = _tree(x__s="->../y", y__back="->../x", y__f="f")
    copied = _shape(copy_dirlinks(nodes))
    # x/s is y, whose back link leads to x, which holds x/s: it stays a link there.
    assert copied == {"x": "dir", "x/s": "dir", "x/s/back": "->../x", "x/s/f": "file", "y": "dir",
                      "y/back": "dir", "y/back/s": "->../y", "y/f": "file"}


def test_chains_resolve_and_too_deep_chains_do_not() -> None:
    nodes = _tree(d__f="f", l1="->d", l2="->l1")
    assert resolve_directory(nodes, "", "l2") == "d"
    deep = {f"l{i}": Node("symlink", 0o777, target=f"l{i + 1}") for i in range(45)}
    deep["l45"] = Node("dir", 0o755)
    assert resolve_directory(deep, "", "l0") is None
    assert resolve_directory(deep, "", "l10") == "l45"
