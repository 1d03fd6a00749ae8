"""How a BUILD or .bzl error looks on the terminal: its message once, at
``file:line:col``, the source line with a caret under the column, the calls that led
there (innermost last) and the hint. Each test runs the real CLI on a small workspace
and compares what it printed, line by line."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

INNER_BZL = '''def inner_fail(name):
    fail("boom")

def inner_add(name):
    total = 1 + "a"
    return total
'''

OUTER_BZL = '''load("//lib:inner.bzl", "inner_add", "inner_fail")

def outer_fail(name):
    inner_fail(name)

def outer_add(name):
    return [inner_add(name)]
'''


def _stderr(run_dtbuild, write_workspace, files: dict[str, str], target: str = "//pkg:x") -> str:
    ws = write_workspace(files)
    code, _out, err = run_dtbuild(ws, "build", target)
    assert code == 2, err
    assert err.startswith("ERROR: "), err
    assert "Traceback" not in err and "-->" not in err, err  # no interpreter text besides ours
    return err


def test_undefined_function_is_shown_once_with_a_caret(run_dtbuild, write_workspace) -> None:
    err = _stderr(run_dtbuild, write_workspace, {"pkg/BUILD": 'files(name = "ok")\n\n  \nundefind(name = "x")\n'})
    assert err.count("Variable `undefind` not found") == 1, err
    assert err.splitlines() == [
        "ERROR: pkg/BUILD:4:1: Variable `undefind` not found",
        '  4 | undefind(name = "x")',
        "    | ^",
    ]


def test_fail_in_a_macro_two_loads_deep_shows_the_stack_once(run_dtbuild, write_workspace) -> None:
    err = _stderr(run_dtbuild, write_workspace, {
        "lib/BUILD": "", "lib/inner.bzl": INNER_BZL, "lib/outer.bzl": OUTER_BZL,
        "pkg/BUILD": 'load("//lib:outer.bzl", "outer_fail")\n\nouter_fail(name = "x")\n',
    })
    assert err.count("boom") == 2, err  # the message, and the quoted line that says it
    assert err.splitlines() == [
        "ERROR: lib/inner.bzl:2:5: fail: boom",
        '  2 |     fail("boom")',
        "    |     ^",
        "call stack (innermost last):",
        "  pkg/BUILD:3:1: in <module>",
        "  lib/outer.bzl:4:5: in outer_fail",
        "  lib/inner.bzl:2:5: in inner_fail",
    ]


def test_type_error_in_a_nested_macro_ends_the_stack_where_it_happened(run_dtbuild, write_workspace) -> None:
    err = _stderr(run_dtbuild, write_workspace, {
        "lib/BUILD": "", "lib/inner.bzl": INNER_BZL, "lib/outer.bzl": OUTER_BZL,
        "pkg/BUILD": 'load("//lib:outer.bzl", "outer_add")\n\nx = 2 * len(outer_add(name = "x"))\n',
    })
    assert err.count("not supported for types") == 1, err
    assert err.splitlines() == [
        "ERROR: lib/inner.bzl:5:13: Operation `+` not supported for types `int` and `string`",
        '  5 |     total = 1 + "a"',
        "    |             ^",
        "call stack (innermost last):",
        "  pkg/BUILD:3:13: in <module>",
        "  lib/outer.bzl:7:13: in outer_add",
        "  lib/inner.bzl:5:13: in inner_add",
    ]


@pytest.mark.parametrize(("text", "line", "col", "bracket", "closer"), [
    ('files(\n    name = "x",\n    srcs = ["a",\n        "b",\n', 3, 12, "[", "]"),
    ('files(\n    name = "x",\n    srcs = ["a"],  # ( in a comment\n    prefix = ")(",\n', 1, 6, "(", ")"),
    ('x = 1\ny = {\n    "k": """\n}\n""",\n\n', 2, 5, "{", "}"),
    ('files(name = "x", srcs = [', 1, 26, "[", "]"),  # no newline at the end
])
def test_unclosed_bracket_at_end_of_file_points_at_the_bracket(run_dtbuild, write_workspace, text: str,
                                                               line: int, col: int, bracket: str,
                                                               closer: str) -> None:
    err = _stderr(run_dtbuild, write_workspace, {"pkg/BUILD": text})
    lines = err.splitlines()
    assert lines[0] == (f"ERROR: pkg/BUILD:{line}:{col}: syntax error: unclosed '{bracket}' opened here "
                        "(the file ends before it is closed)"), err
    source = text.split("\n")[line - 1]
    assert lines[1] == f"  {line} | {source}".rstrip()
    assert lines[2] == "    | " + " " * (col - 1) + "^"
    assert source[col - 1] == bracket
    assert lines[3].startswith(f"hint: close it with '{closer}'"), err
    assert ":1:1:" not in err


def test_unclosed_bracket_in_a_loaded_file_names_the_load(run_dtbuild, write_workspace) -> None:
    err = _stderr(run_dtbuild, write_workspace, {
        "lib/BUILD": "",
        "lib/outer.bzl": 'load("//lib:broken.bzl", "m")\n',
        "lib/broken.bzl": 'def m():\n    return [1,\n',
        "pkg/BUILD": '# the macros\nload("//lib:outer.bzl", "m")\n',
    })
    assert err.count("unclosed") == 1, err  # not wrapped in the loading files' errors again
    assert err.splitlines() == [
        "ERROR: lib/broken.bzl:2:12: syntax error: unclosed '[' opened here (the file ends before it is closed)",
        "  2 |     return [1,",
        "    |            ^",
        "call stack (innermost last):",
        '  pkg/BUILD:2:1: load("//lib:outer.bzl")',
        '  lib/outer.bzl:1:1: load("//lib:broken.bzl")',
        "hint: close it with ']'",
    ]


def test_missing_block_body_at_end_of_file_points_after_the_colon(run_dtbuild, write_workspace) -> None:
    err = _stderr(run_dtbuild, write_workspace, {"pkg/BUILD": 'x = 1\ndef f():\n\n# nothing yet\n'})
    assert err.splitlines() == [
        "ERROR: pkg/BUILD:2:9: syntax error: unexpected end of file",
        "  2 | def f():",
        "    |         ^",
        "hint: a block after ':' needs an indented body (write 'pass' for an empty one)",
    ]


def test_syntax_error_inside_the_file_keeps_its_own_position(run_dtbuild, write_workspace) -> None:
    err = _stderr(run_dtbuild, write_workspace, {"pkg/BUILD": '\nfiles(name = "x" srcs = [])\n'})
    lines = err.splitlines()
    assert lines[0].startswith("ERROR: pkg/BUILD:2:18: syntax error: unexpected identifier 'srcs' here"), err
    assert lines[1:] == ['  2 | files(name = "x" srcs = [])', "    |                  ^"]


def test_attribute_error_quotes_its_line_once(run_dtbuild, write_workspace) -> None:
    text = '\nfiles(\n    name = "x",\n    srcs = 3,\n)\n'
    err = _stderr(run_dtbuild, write_workspace, {"pkg/BUILD": text})
    lines = err.splitlines()
    assert lines[0].startswith("ERROR: pkg/BUILD:"), err
    assert "in files //pkg:x: the 'srcs' attribute must be" in lines[0]
    assert err.count("'srcs' attribute") == 1, err
    line = int(lines[0].split(":")[2])
    source = text.split("\n")[line - 1]
    assert lines[1] == f"  {line} | {source}"


def test_quoted_source_is_escaped_and_the_caret_still_lines_up(run_dtbuild, write_workspace) -> None:
    err = _stderr(run_dtbuild, write_workspace, {"pkg/BUILD": 'x = ("\x1b[2J日本" + 1, "\u202e")\n'})
    assert "\x1b" not in err and "\u202e" not in err
    lines = err.splitlines()
    assert lines[0] == "ERROR: pkg/BUILD:1:6: Operation `+` not supported for types `string` and `int`"
    assert lines[1] == '  1 | x = ("\\x1b[2J日本" + 1, "\\u202e")'
    assert lines[2] == "    |      ^"
    assert lines[1].index('"') == lines[2].index("^")
