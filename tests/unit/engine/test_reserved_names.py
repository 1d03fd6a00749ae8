"""Names reserved for the workspace state directory, and output names that would leave
``dtbuild-out/<package>/``: refused with a message that says why and what to do."""

from __future__ import annotations

import pytest
from dtbuild.engine.errors import LabelError
from dtbuild.engine.labels import STATE_DIR_NAME, is_reserved_name, parse_label
from dtbuild.rules.api import AttrValues, RuleContext, RuleFailure


@pytest.mark.parametrize("text", ["//:.dtbuild", "//:.dtbuild-old", "//pkg:a/.dtbuild", "//.dtbuild:x",
                                  "//a/.dtbuildfoo:x"])
def test_reserved_labels_are_refused(text: str) -> None:
    with pytest.raises(LabelError, match="reserved for dtbuild's state directory") as failed:
        parse_label(text)
    assert failed.value.hint and "rename" in failed.value.hint


@pytest.mark.parametrize("text", ["//:x.dtbuild", "//:dtbuild", "//dtbuild-out:x", "//a:_.dtbuild"])
def test_names_merely_containing_the_name_are_fine(text: str) -> None:
    parse_label(text)


def test_the_reserved_prefix_is_the_state_directory_name() -> None:
    assert STATE_DIR_NAME == ".dtbuild"
    assert is_reserved_name(".dtbuild") and not is_reserved_name("dtbuild")


def _ctx(package: str = "pkg") -> RuleContext:
    return RuleContext(label=f"//{package}:t", package=package, name="t", kind="genrule", attr=AttrValues({}),
                       rule_version="1")


@pytest.mark.parametrize("name", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "a/", "a\0b"])
def test_output_names_that_would_leave_the_package_directory_are_refused(name: str) -> None:
    with pytest.raises(RuleFailure, match="relative path below dtbuild-out/<package>/"):
        _ctx().declare_file(name)


def test_plain_output_names_are_declared_under_the_package() -> None:
    assert _ctx().declare_file("a/b.txt").path == "dtbuild-out/pkg/a/b.txt"
    assert _ctx("").declare_directory("tree").path == "dtbuild-out/tree"
