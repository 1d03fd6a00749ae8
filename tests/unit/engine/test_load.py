"""Loading BUILD and .bzl files: glob() semantics, macros, load(), declaration sites and
the errors of the loading phase."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dtbuild.engine.errors import AttrError, BuildFileError, Location, UnknownTargetError
from dtbuild.engine.labels import Label, parse_pattern
from dtbuild.engine.load import Loader
from dtbuild.engine.workspace import Workspace
from dtbuild.rules.builtin.files import files
from dtbuild.rules.builtin.genrule import genrule

RULES = {"files": files, "genrule": genrule}


def make_workspace(root: Path, tree: dict[str, str]) -> Loader:
    (root / "dtbuild.toml").write_text("")
    for rel, text in tree.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Loader(Workspace(str(root)), RULES)


# --------------------------------------------------------------------------- glob


GLOB_TREE = {
    "pkg/a.txt": "", "pkg/b.md": "", "pkg/z.txt": "",
    "pkg/sub/c.txt": "", "pkg/sub/deep/d.txt": "", "pkg/sub/deep/e.md": "",
    "pkg/.hidden/h.txt": "",
    "pkg/child/BUILD": "", "pkg/child/f.txt": "",  # a subpackage owns its files
    "pkg/sub/nested/dtbuild.toml": "", "pkg/sub/nested/n.txt": "",  # a nested workspace too
}


@pytest.mark.parametrize(("call", "expected"), [
    ('glob(["*.txt"])', ["a.txt", "link.txt", "z.txt"]),
    ('glob(["**/*.txt"])', ["a.txt", "link.txt", "sub/c.txt", "sub/deep/d.txt", "z.txt"]),
    ('glob(["sub/**"])', ["sub/c.txt", "sub/deep/d.txt", "sub/deep/e.md"]),
    ('glob(["sub/**/d.txt"])', ["sub/deep/d.txt"]),
    ('glob(["sub/**/c.txt"])', ["sub/c.txt"]),  # ** matches zero directories too
    ('glob(["sub/*/d.txt"])', ["sub/deep/d.txt"]),
    ('glob(["s?b/c.txt"])', ["sub/c.txt"]),
    ('glob(["**/*.txt"], exclude = ["sub/deep/**"])', ["a.txt", "link.txt", "sub/c.txt", "z.txt"]),
    ('glob(["**"], exclude = ["**/*.txt"])', ["b.md", "sub/deep/e.md"]),
    ('glob(["z.txt", "**/*.md", "a.txt"])', ["a.txt", "b.md", "sub/deep/e.md", "z.txt"]),  # sorted, once each
    ('glob(["*.txt", "a.txt"])', ["a.txt", "link.txt", "z.txt"]),
    ('glob(["nothing/**"], allow_empty = True)', []),
    ('glob(["child/*"], allow_empty = True)', []),  # a subpackage's files are not the package's
])
def test_glob(tmp_path: Path, call: str, expected: list[str]) -> None:
    loader = make_workspace(tmp_path, {**GLOB_TREE, "pkg/BUILD": f'files(name = "g", srcs = {call})\n'})
    os.symlink("a.txt", tmp_path / "pkg" / "link.txt")  # symlinks are listed like files
    assert loader.package("pkg").targets["g"].attrs["srcs"] == expected


def test_glob_in_the_root_package_leaves_out_dtbuild_out_and_packages(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {
        "BUILD": 'files(name = "all", srcs = glob(["**"]))\n',
        "top.txt": "", "docs/guide.md": "",
        "dtbuild-out/pkg/output.txt": "", "dtbuild-out/.dtbuild/outputs.json": "",
        "pkg/BUILD": "", "pkg/x.txt": "",
    })
    assert loader.package("").targets["all"].attrs["srcs"] == ["docs/guide.md", "dtbuild.toml", "top.txt"]


def test_glob_sees_files_created_after_an_earlier_process(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {"pkg/BUILD": 'files(name = "g", srcs = glob(["*.txt"]))\n', "pkg/a.txt": ""})
    assert loader.package("pkg").targets["g"].attrs["srcs"] == ["a.txt"]
    (tmp_path / "pkg" / "b.txt").write_text("")
    fresh = Loader(Workspace(str(tmp_path)), RULES)
    assert fresh.package("pkg").targets["g"].attrs["srcs"] == ["a.txt", "b.txt"]


@pytest.mark.parametrize("pattern", ["../x.txt", "/etc/passwd", "sub/../../x"])
def test_glob_may_not_leave_its_package(tmp_path: Path, pattern: str) -> None:
    loader = make_workspace(tmp_path, {"pkg/BUILD": f'files(name = "g", srcs = glob(["{pattern}"]))\n'})
    with pytest.raises(BuildFileError) as info:
        loader.package("pkg")
    assert pattern in info.value.render()
    assert "pkg/BUILD" in info.value.render()


def test_glob_with_allow_empty_false_fails_when_nothing_matches(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {
        "pkg/BUILD": 'files(name = "g", srcs = glob(["*.py"], allow_empty = False))\n', "pkg/a.txt": ""})
    with pytest.raises(BuildFileError) as info:
        loader.package("pkg")
    assert 'pkg/BUILD:1: glob(["*.py"]) matches no file of package //pkg' in info.value.render()
    assert "allow_empty = True" in (info.value.hint or "")


# --------------------------------------------------------------------------- macros and load()


DEFS = '''\
def pair(name, text = "hi"):
    """A macro: a genrule and a files() target that packages it."""
    genrule(
        name = name + "_gen",
        outs = [name + ".txt"],
        cmd = "echo %s from %s > $OUT" % (text, package_name()),
    )
    files(name = name, srcs = [":" + name + "_gen"], prefix = "/usr/share/" + name)

SUFFIXES = ["a", "b"]
'''


def test_macros_declare_targets_in_the_calling_package(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {
        "tools/BUILD": "",
        "tools/defs.bzl": DEFS,
        "pkg/BUILD": '''load("//tools:defs.bzl", "SUFFIXES", "pair")

pair(name = "p")

[pair(name = "many_" + s, text = s) for s in SUFFIXES]

files(
    name = "direct",
    srcs = [],
)
''',
    })
    pkg = loader.package("pkg")
    assert sorted(pkg.targets) == ["direct", "many_a", "many_a_gen", "many_b", "many_b_gen", "p", "p_gen"]
    gen = pkg.targets["p_gen"]
    assert gen.kind == "genrule"
    assert gen.label == Label("pkg", "p_gen")
    assert gen.attrs["cmd"] == "echo hi from pkg > $OUT"  # package_name() is the caller's
    assert gen.attrs["outs"] == ["p.txt"]
    assert pkg.targets["p"].attrs["srcs"] == ["//pkg:p_gen"]  # ":x" resolved in the calling package
    assert pkg.targets["p"].attrs["prefix"] == "/usr/share/p"
    assert pkg.targets["many_b_gen"].attrs["cmd"] == "echo b from pkg > $OUT"
    # Defaults are filled in from the rule's schema.
    assert pkg.targets["direct"].attrs["strip_prefix"] == ""
    assert pkg.targets["direct"].attrs["mode"] is None
    assert pkg.files_read == ["pkg/BUILD", "tools/defs.bzl"]


def test_declaration_sites_are_recorded(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {
        "tools/BUILD": "",
        "tools/defs.bzl": DEFS,
        "pkg/BUILD": '''load("//tools:defs.bzl", "pair")

pair(name = "p")

files(
    name = "direct",
    srcs = [],
)
''',
    })
    pkg = loader.package("pkg")
    assert str(pkg.targets["direct"].location) == "pkg/BUILD:5"
    assert pkg.targets["direct"].location == Location("pkg/BUILD", 5)
    # A macro's targets point at the BUILD line that called the macro.
    assert str(pkg.targets["p"].location) == "pkg/BUILD:3"
    assert str(pkg.targets["p_gen"].location) == "pkg/BUILD:3"


def test_a_bzl_file_is_evaluated_once_per_process(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {
        "tools/BUILD": "",
        "tools/defs.bzl": DEFS,
        "a/BUILD": 'load("//tools:defs.bzl", "pair")\npair(name = "x")\n',
        "b/BUILD": 'load("//tools:defs.bzl", "pair")\npair(name = "y")\n',
    })
    assert sorted(loader.package("a").targets) == ["x", "x_gen"]
    (tmp_path / "tools" / "defs.bzl").write_text("this is not starlark")  # not read again
    assert sorted(loader.package("b").targets) == ["y", "y_gen"]
    assert loader.package("b").files_read == ["b/BUILD", "tools/defs.bzl"]


def test_load_cycle_is_an_error(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {
        "tools/BUILD": "",
        "tools/a.bzl": 'load("//tools:b.bzl", "B")\nA = 1\n',
        "tools/b.bzl": 'load("//tools:a.bzl", "A")\nB = 2\n',
        "pkg/BUILD": 'load("//tools:a.bzl", "A")\n',
    })
    with pytest.raises(BuildFileError) as info:
        loader.package("pkg")
    assert "//tools:a.bzl -> //tools:b.bzl -> //tools:a.bzl" in info.value.render()


def test_rules_may_not_be_called_while_a_bzl_file_is_loaded(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {
        "tools/BUILD": "",
        "tools/defs.bzl": 'genrule(name = "top_level", outs = ["x"], cmd = "true")\n',
        "pkg/BUILD": 'load("//tools:defs.bzl", "x")\n',
    })
    with pytest.raises(BuildFileError):
        loader.package("pkg")


def test_evaluation_has_no_io(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {"pkg/BUILD": 'x = open("/etc/passwd")\n'})
    with pytest.raises(BuildFileError) as info:
        loader.package("pkg")
    assert "pkg/BUILD:1" in info.value.render()


# --------------------------------------------------------------------------- errors at the BUILD line


def test_unknown_attribute_error_has_location_and_suggestion(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {"pkg/BUILD": '\n\nfiles(\n    name = "x",\n    src = ["a"],\n)\n'})
    with pytest.raises(AttrError) as info:
        loader.package("pkg")
    err = info.value
    assert err.location == Location("pkg/BUILD", 3)
    assert err.target == "//pkg:x"
    assert err.hint == "did you mean 'srcs'?"
    assert err.render().startswith("pkg/BUILD:3: in files //pkg:x: ")


def test_missing_mandatory_attribute(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {"pkg/BUILD": 'genrule(name = "x", outs = ["a"])\n'})
    with pytest.raises(AttrError) as info:
        loader.package("pkg")
    assert "'cmd'" in info.value.render()
    assert "pkg/BUILD:1" in info.value.render()


def test_unknown_target_suggests_the_closest(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {"pkg/BUILD": 'genrule(name = "upper", outs = ["a"], cmd = "true")\n'})
    with pytest.raises(UnknownTargetError) as info:
        loader.target(Label("pkg", "uper"))
    assert info.value.hint == "did you mean '//pkg:upper'?"
    with pytest.raises(UnknownTargetError) as info:
        loader.target(Label("pkgg", "upper"))
    assert info.value.hint == "did you mean '//pkg'?"


def test_expand_patterns(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {
        "BUILD": 'genrule(name = "root", outs = ["r"], cmd = "true")\n',
        "a/BUILD": 'genrule(name = "x", outs = ["x"], cmd = "true")\ngenrule(name = "a", outs = ["a"], cmd = "true")\n',
        "a/b/BUILD": 'genrule(name = "y", outs = ["y"], cmd = "true")\n',
        "ab/BUILD": 'genrule(name = "z", outs = ["z"], cmd = "true")\n',
        "a/not_a_package/file.txt": "",
        "dtbuild-out/c/BUILD": 'genrule(name = "stale", outs = ["s"], cmd = "true")\n',
    })

    def expand(text: str) -> list[str]:
        return [str(label) for label in loader.expand(parse_pattern(text))]

    assert expand("//...") == ["//:root", "//a:a", "//a:x", "//a/b:y", "//ab:z"]
    assert expand("//a/...") == ["//a:a", "//a:x", "//a/b:y"]
    assert expand("//a:all") == ["//a:a", "//a:x"]
    assert expand("//a") == ["//a:a"]
    assert loader.all_packages() == ["", "a", "a/b", "ab"]
    with pytest.raises(UnknownTargetError):
        expand("//a/not_a_package/...")


# --------------------------------------------------------------------------- error display


@pytest.mark.parametrize(("source", "expected"), [
    ("x = [1,\n", [("[", 1, 5)]),
    ("f(\n  a = {'k': [1, 2],\n", [("(", 1, 2), ("{", 2, 7)]),
    ('f("(", \'[\', """\n{\n""", "\\"(", # ( [ {\n', [("(", 1, 2)]),
    ("x = (1]\ny = [\n", [("(", 1, 5), ("[", 2, 5)]),  # a stray closer closes nothing
    ("x = [(1, 2)]\n", []),
])
def test_unclosed_brackets_skip_strings_and_comments(source: str, expected: list[tuple[str, int, int]]) -> None:
    from dtbuild.engine.load import unclosed_brackets

    assert unclosed_brackets(source) == expected


def test_source_excerpt_puts_the_caret_under_the_column() -> None:
    from dtbuild.engine.errors import source_excerpt

    assert source_excerpt("foo(bar)\n", 12, 5) == "  12 | foo(bar)\n     |     ^"
    assert source_excerpt("foo(bar)", 3) == "  3 | foo(bar)"
    # Escaped control characters and wide characters keep it lined up.
    assert source_excerpt("\t日x", 1, 3) == "  1 | \\x09日x\n    |       ^"
    long = "x" * 300 + "(" + "y" * 300
    excerpt = source_excerpt(long, 7, 301).splitlines()
    assert len(excerpt[0]) < 120 and excerpt[0].startswith("  7 | ...x") and excerpt[0].endswith("y...")
    assert excerpt[0][excerpt[1].index("^")] == "("


def test_starlark_error_renders_its_message_once(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {
        "tools/BUILD": "",
        "tools/defs.bzl": "def macro(name):\n    fail('no ' + name)\n",
        "pkg/BUILD": 'load("//tools:defs.bzl", "macro")\nmacro("x")\n',
    })
    with pytest.raises(BuildFileError) as info:
        loader.package("pkg")
    err = info.value
    assert err.location == Location("tools/defs.bzl", 2, 5)
    assert err.message == "fail: no x"
    assert [(str(f.location), f.what) for f in err.stack] == [
        ("pkg/BUILD:2:1", "in <module>"), ("tools/defs.bzl:2:5", "in macro")]
    assert err.render().count("no x") == 1
    assert err.detail is None


def test_error_in_a_loaded_file_is_not_wrapped(tmp_path: Path) -> None:
    loader = make_workspace(tmp_path, {
        "tools/BUILD": "",
        "tools/a.bzl": 'load("//tools:b.bzl", "B")\nA = B\n',
        "tools/b.bzl": "B = {}['k']\n",
        "pkg/BUILD": '\nload("//tools:a.bzl", "A")\n',
    })
    with pytest.raises(BuildFileError) as info:
        loader.package("pkg")
    err = info.value
    assert err.location == Location("tools/b.bzl", 1, 5)
    assert "BuildFileError" not in err.render() and err.render().count("not found") == 1
    assert [(str(f.location), f.what) for f in err.stack] == [
        ("pkg/BUILD:2:1", 'load("//tools:a.bzl")'), ("tools/a.bzl:1:1", 'load("//tools:b.bzl")')]
