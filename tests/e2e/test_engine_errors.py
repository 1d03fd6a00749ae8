"""Errors as a user sees them: each names where (file:line[:col]), what, and a way out,
with exit code 2 for BUILD/.bzl and command-line mistakes and 1 for build failures.

Each test breaks a fresh copy of the monorepo fixture (see test_engine.py for its graph).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

LIB_TEXT_BUILD = '''load("//tools:defs.bzl", "text_bundle")

text_bundle(
    name = "notes",
    srcs = glob(["*.txt"], exclude = ["skip*.txt"]),
)

genrule(
    name = "upper",
    srcs = [":notes_cat"],
    outs = ["upper.txt"],
    cmd = "tr a-z A-Z < $SRCS > $OUT",
)
'''


def _write(ws: Path, rel: str, text: str) -> None:
    path = ws / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _error(run_dtbuild, ws: Path, *args: str, code: int = 2) -> str:
    """Run the CLI, expect exit ``code`` and an ``ERROR:`` line; return stderr."""
    exit_code, out, err = run_dtbuild(ws, *args)
    assert exit_code == code, f"exit {exit_code}, expected {code}\n{out}\n{err}"
    assert "ERROR:" in err, err
    assert not re.search(r'^\s*File ".*", line \d+', err, re.M), "a Python traceback leaked:\n" + err
    return err


def test_fixture_builds_before_it_is_broken(monorepo, run_dtbuild) -> None:
    """The baseline: every error below comes from the one edit its test makes."""
    code, _, err = run_dtbuild(monorepo, "build", "//...")
    assert code == 0, err


def test_syntax_error_names_file_line_and_column(monorepo, run_dtbuild) -> None:
    _write(monorepo, "app/BUILD", 'genrule(\n    name = "x",,\n)\n')
    err = _error(run_dtbuild, monorepo, "build", "//app:x")
    assert "app/BUILD:2:16" in err
    assert "syntax error" in err
    # Starlark's caret snippet passes through.
    assert '    name = "x",,' in err and "^" in err


def test_unknown_attribute_suggests_the_closest(monorepo, run_dtbuild) -> None:
    _write(monorepo, "lib/text/BUILD", LIB_TEXT_BUILD.replace('srcs = [":notes_cat"]', 'srcz = [":notes_cat"]'))
    err = _error(run_dtbuild, monorepo, "build", "//lib/text:upper")
    assert "lib/text/BUILD:8" in err  # the genrule( line
    assert "'srcz'" in err and "//lib/text:upper" in err
    assert "did you mean 'srcs'?" in err


def test_unknown_label_suggests_the_closest_target(monorepo, run_dtbuild) -> None:
    _write(monorepo, "lib/text/BUILD", LIB_TEXT_BUILD + '''
genrule(
    name = "lower",
    srcs = [":uper"],
    outs = ["lower.txt"],
    cmd = "tr A-Z a-z < $SRCS > $OUT",
)
''')
    err = _error(run_dtbuild, monorepo, "build", "//lib/text:lower")
    assert "lib/text/BUILD:15" in err
    assert "//lib/text:lower" in err and "uper" in err
    assert "did you mean '//lib/text:upper'?" in err


def test_unknown_target_on_the_command_line_suggests_the_closest(monorepo, run_dtbuild) -> None:
    err = _error(run_dtbuild, monorepo, "build", "//lib/text:uper")
    assert "no target named 'uper'" in err
    assert "did you mean '//lib/text:upper'?" in err


def test_unknown_package(monorepo, run_dtbuild) -> None:
    err = _error(run_dtbuild, monorepo, "build", "//nope:x")
    assert "no package //nope" in err
    _write(monorepo, "app/BUILD", 'genrule(\n    name = "x",\n    srcs = ["//lib/txt:upper"],\n'
                                  '    outs = ["x.txt"],\n    cmd = "true",\n)\n')
    err = _error(run_dtbuild, monorepo, "build", "//app:x")
    assert "app/BUILD:1" in err and "//app:x" in err
    assert "//lib/txt" in err
    assert "did you mean '//lib/text'?" in err


def test_dependency_cycle_prints_the_whole_cycle(monorepo, run_dtbuild) -> None:
    _write(monorepo, "a/BUILD", 'genrule(name = "x", srcs = ["//b:y"], outs = ["x.txt"], cmd = "true")\n')
    _write(monorepo, "b/BUILD", 'genrule(name = "y", srcs = ["//a:x"], outs = ["y.txt"], cmd = "true")\n')
    err = _error(run_dtbuild, monorepo, "build", "//a:x")
    assert "dependency cycle: //a:x -> //b:y -> //a:x" in err
    assert "a/BUILD:1" in err


def test_missing_source_file_names_its_path(monorepo, run_dtbuild) -> None:
    _write(monorepo, "app/BUILD", 'files(\n    name = "x",\n    srcs = ["main.sh", "mian.sh"],\n)\n')
    err = _error(run_dtbuild, monorepo, "build", "//app:x")
    assert "app/mian.sh" in err
    assert "app/BUILD:1" in err and "//app:x" in err
    assert "did you mean 'main.sh'?" in err


def test_wrong_attribute_type_names_attribute_expected_and_given(monorepo, run_dtbuild) -> None:
    _write(monorepo, "app/BUILD", 'genrule(\n    name = "x",\n    outs = "x.txt",\n    cmd = "true",\n)\n')
    err = _error(run_dtbuild, monorepo, "build", "//app:x")
    assert "app/BUILD:1" in err and "//app:x" in err
    assert "'outs'" in err
    assert "list of strings" in err  # expected
    assert re.search(r"but was (a )?string", err), err  # given


def test_duplicate_target_name_points_at_both(monorepo, run_dtbuild) -> None:
    _write(monorepo, "app/BUILD", 'genrule(\n    name = "x",\n    outs = ["x.txt"],\n    cmd = "true",\n)\n\n'
                                  'files(\n    name = "x",\n    srcs = ["main.sh"],\n)\n')
    err = _error(run_dtbuild, monorepo, "build", "//app:x")
    assert "duplicate target name 'x'" in err
    assert "app/BUILD:7" in err and "app/BUILD:1" in err


def test_unknown_rule_suggests_the_closest(monorepo, run_dtbuild) -> None:
    _write(monorepo, "app/BUILD", 'genrul(\n    name = "x",\n    outs = ["x.txt"],\n    cmd = "true",\n)\n')
    err = _error(run_dtbuild, monorepo, "build", "//app:x")
    assert "app/BUILD:1:1" in err
    assert "genrule" in err


def test_failing_genrule_shows_its_output_and_where_it_was_declared(monorepo, run_dtbuild) -> None:
    _write(monorepo, "app/BUILD", 'genrule(\n    name = "x",\n    outs = ["x.txt"],\n'
                                  '    cmd = "echo first line; echo the-compiler-said-no >&2; exit 3",\n)\n')
    err = _error(run_dtbuild, monorepo, "build", "//app:x", code=1)
    assert "app/BUILD:1" in err
    assert "//app:x" in err
    assert "status 3" in err
    assert "first line" in err and "the-compiler-said-no" in err
    assert not (monorepo / "dtbuild-out" / "app" / "x.txt").exists()


def test_genrule_that_forgets_an_output_names_it(monorepo, run_dtbuild) -> None:
    _write(monorepo, "app/BUILD", 'genrule(\n    name = "x",\n    outs = ["x.txt", "y.txt"],\n'
                                  '    cmd = "touch $OUT_DIR/x.txt",\n)\n')
    err = _error(run_dtbuild, monorepo, "build", "//app:x", code=1)
    assert "y.txt" in err and "//app:x" in err and "app/BUILD:1" in err


@pytest.mark.parametrize("label", ["//lib/text:up:per", "//lib//text:upper", "//lib/text:../x", "//lib/text:"])
def test_malformed_label_on_the_command_line(monorepo, run_dtbuild, label) -> None:
    err = _error(run_dtbuild, monorepo, "build", label)
    assert "invalid" in err and label in err


def test_bad_command_line_flags_exit_2(monorepo, run_dtbuild) -> None:
    code, _, err = run_dtbuild(monorepo, "build", "//app:app", "--jobs", "many")
    assert code == 2, err
    code, _, err = run_dtbuild(monorepo, "build", "//app:app", "--jobs", "-1")
    assert code == 2, err
    assert "--jobs" in err
    code, _, err = run_dtbuild(monorepo, "build")
    assert code == 2, err
    code, _, err = run_dtbuild(monorepo)
    assert code == 2
    assert "usage" in err.lower()
    code, _, err = run_dtbuild(monorepo, "query", "deps(//app:app")
    assert code == 2, err
    assert "query" in err


def test_fail_in_a_macro_shows_its_message_and_the_call_site(monorepo, run_dtbuild) -> None:
    defs = monorepo / "tools" / "defs.bzl"
    defs.write_text(defs.read_text().replace(
        '    """A macro: concatenate srcs into NAME.txt and package it under prefix."""\n',
        '    """A macro: concatenate srcs into NAME.txt and package it under prefix."""\n'
        '    if len(srcs) > 1:\n'
        '        fail("text_bundle takes one source, but %s has %d" % (name, len(srcs)))\n'))
    err = _error(run_dtbuild, monorepo, "build", "//lib/text:upper")
    assert "text_bundle takes one source, but notes has 2" in err
    assert "tools/defs.bzl:4" in err  # where fail() was called
    assert "lib/text/BUILD:3" in err  # the BUILD line that called the macro


def test_load_of_a_missing_bzl_file(monorepo, run_dtbuild) -> None:
    _write(monorepo, "lib/text/BUILD", LIB_TEXT_BUILD.replace("//tools:defs.bzl", "//tools:nope.bzl"))
    err = _error(run_dtbuild, monorepo, "build", "//lib/text:upper")
    assert "tools/nope.bzl" in err
    assert "lib/text/BUILD:1" in err  # the load() statement


def test_load_of_a_missing_symbol_suggests_the_closest(monorepo, run_dtbuild) -> None:
    _write(monorepo, "lib/text/BUILD", LIB_TEXT_BUILD.replace("text_bundle", "text_bundel"))
    err = _error(run_dtbuild, monorepo, "build", "//lib/text:upper")
    assert "lib/text/BUILD:1:26" in err
    assert "did you mean `text_bundle`?" in err


def test_not_in_a_workspace(tmp_path, run_dtbuild) -> None:
    err = _error(run_dtbuild, tmp_path, "build", "//app:app")
    assert "dtbuild.toml" in err
