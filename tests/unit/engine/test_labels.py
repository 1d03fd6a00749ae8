"""Labels and target patterns: known answers and the errors users see."""

from __future__ import annotations

import pytest
from dtbuild.engine.errors import LabelError
from dtbuild.engine.labels import Label, TargetPattern, parse_label, parse_pattern


@pytest.mark.parametrize(("text", "current", "expected"), [
    ("//pkg:name", None, Label("pkg", "name")),
    ("//a/b/c:d", None, Label("a/b/c", "d")),
    ("//a/b", None, Label("a/b", "b")),  # //pkg means //pkg:<last component>
    ("//images", None, Label("images", "images")),
    ("//:root_target", None, Label("", "root_target")),
    ("@//a:b", None, Label("a", "b")),  # the main repository, spelled explicitly
    ("//a:file/in/sub.txt", None, Label("a", "file/in/sub.txt")),
    ("//a:x-y_z.1+2=3,4~5@6", None, Label("a", "x-y_z.1+2=3,4~5@6")),
    ("//a-b/c_d.e:x", None, Label("a-b/c_d.e", "x")),
    (":x", "a/b", Label("a/b", "x")),
    ("x", "a/b", Label("a/b", "x")),
    ("sub/x.txt", "a", Label("a", "sub/x.txt")),
    (":x", "", Label("", "x")),
    ("//other:y", "a", Label("other", "y")),  # absolute labels ignore the current package
])
def test_parse_label(text, current, expected) -> None:
    assert parse_label(text, current) == expected


def test_label_text_and_output_dir() -> None:
    assert str(Label("a/b", "c")) == "//a/b:c"
    assert str(Label("", "c")) == "//:c"
    assert str(parse_label("//a/b")) == "//a/b:b"
    assert Label("a/b", "c").output_dir == "dtbuild-out/a/b"
    assert Label("", "c").output_dir == "dtbuild-out"


def test_labels_sort_by_package_then_name() -> None:
    labels = [Label("b", "a"), Label("a", "z"), Label("", "q"), Label("a", "b")]
    assert sorted(labels) == [Label("", "q"), Label("a", "b"), Label("a", "z"), Label("b", "a")]


@pytest.mark.parametrize(("text", "current", "words"), [
    ("", None, ["non-empty"]),
    ("//", None, ["no target name"]),
    ("//a:", None, ["bad target name"]),
    ("//a/:x", None, ["bad package name 'a/'"]),
    ("//a//b:x", None, ["bad package name 'a//b'"]),
    ("//a/../b:x", None, ["'..'"]),
    ("//./a:x", None, ["'.'"]),
    ("//a:../x", None, ["bad target name '../x'"]),
    ("//a:x/", None, ["bad target name"]),
    ("//a:./x", None, ["bad target name"]),
    ("//a:b:c", None, ["bad target name 'b:c'"]),
    ("//a b:x", None, ["bad package name"]),
    ("@repo//a:b", None, ["external repositories are not supported"]),
    (":x", None, ["start with '//'"]),
    ("x", None, ["start with '//'"]),
])
def test_parse_label_errors(text, current, words) -> None:
    with pytest.raises(LabelError) as info:
        parse_label(text, current)
    message = info.value.render()
    assert "invalid label" in message
    for word in words:
        assert word in message
    assert info.value.exit_code == 2


def test_relative_label_on_the_command_line_suggests_the_absolute_one() -> None:
    with pytest.raises(LabelError) as info:
        parse_label(":upper")
    assert info.value.hint == "did you mean '//upper'?"


@pytest.mark.parametrize(("text", "current", "expected", "shown"), [
    ("//...", None, TargetPattern("", None, True), "//..."),
    ("//a/...", None, TargetPattern("a", None, True), "//a/..."),
    ("//a/b/...:all", None, TargetPattern("a/b", None, True), "//a/b/..."),
    ("//a/...:*", None, TargetPattern("a", None, True), "//a/..."),
    ("//a:all", None, TargetPattern("a", None, False), "//a:all"),
    ("//a:*", None, TargetPattern("a", None, False), "//a:all"),
    ("//a:all-targets", None, TargetPattern("a", None, False), "//a:all"),
    ("//:all", None, TargetPattern("", None, False), "//:all"),
    ("//a:b", None, TargetPattern("a", "b", False), "//a:b"),
    ("//a/b", None, TargetPattern("a/b", "b", False), "//a/b:b"),
    # Relative to the working directory's package.
    (":x", "lib", TargetPattern("lib", "x", False), "//lib:x"),
    ("...", "lib", TargetPattern("lib", None, True), "//lib/..."),
    ("sub/...", "lib", TargetPattern("lib/sub", None, True), "//lib/sub/..."),
    ("sub:all", "lib", TargetPattern("lib/sub", None, False), "//lib/sub:all"),
    ("...", "", TargetPattern("", None, True), "//..."),
    (":x", "", TargetPattern("", "x", False), "//:x"),
    ("//abs:x", "lib", TargetPattern("abs", "x", False), "//abs:x"),
])
def test_parse_pattern(text, current, expected, shown) -> None:
    pattern = parse_pattern(text, current)
    assert pattern == expected
    assert str(pattern) == shown


@pytest.mark.parametrize(("text", "words"), [
    ("a:b", ["patterns start with '//'", "did you mean '//a:b'?"]),
    ("//a/...:b", ["'...' takes no target name"]),
    ("//a/../...", ["'..'"]),
    ("//a//b:all", ["bad package name"]),
    ("//a:b:c", ["bad target name"]),
])
def test_parse_pattern_errors(text, words) -> None:
    with pytest.raises(LabelError) as info:
        parse_pattern(text)
    message = info.value.render()
    for word in words:
        assert word in message


def test_pattern_matches_packages() -> None:
    everything = parse_pattern("//...")
    assert everything.matches_package("")
    assert everything.matches_package("a/b")
    below = parse_pattern("//a/...")
    assert below.matches_package("a")
    assert below.matches_package("a/b/c")
    assert not below.matches_package("ab")  # a prefix of the name is not a subdirectory
    assert not below.matches_package("b/a")
    assert not below.matches_package("")
    one = parse_pattern("//a:all")
    assert one.matches_package("a")
    assert not one.matches_package("a/b")
