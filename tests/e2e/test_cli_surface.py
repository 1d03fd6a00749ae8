"""The command line a Bazel or Buck2 user expects: global flags before or after the
command (also before an implicit ``build``), ``--jobs`` only positive, an unknown
command with a did-you-mean, and a ``--help`` with a description, examples and help for
every argument for each command, the plugins' too.

Before: ``dtbuild -j 2 //pkg:a`` was a bad command line (``-j`` was known to ``build``
only), ``--jobs 0`` meant "one per core", ``dtbuild qeury ...`` built a target named
``qeury``, and subcommands' ``--help`` listed bare arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

BUILD = """
genrule(name = "a", outs = ["a.txt"], cmd = "echo a > $OUT")
genrule(name = "b", outs = ["b.txt"], cmd = "echo b > $OUT")
genrule(name = "bad", outs = ["bad.txt"], cmd = "echo broken >&2; exit 3")
files(name = "site", srcs = ["index.html"], prefix = "/srv")
image(name = "img", tag = "v1", copy_to_root = [":site"], compressor = "none")
"""


@pytest.fixture
def ws(write_workspace) -> Path:
    return write_workspace({"pkg/BUILD": BUILD, "pkg/index.html": "<p>hi</p>\n"})


def _built(ws: Path, name: str) -> str | None:
    path = ws / "dtbuild-out" / "pkg" / name
    return path.read_text() if path.exists() else None


# --------------------------------------------------------------------------- global flags


@pytest.mark.parametrize("argv", [
    ["-j", "2", "//pkg:a"],
    ["//pkg:a", "-j", "2"],
    ["-j2", "//pkg:a"],
    ["--jobs=2", "build", "//pkg:a"],
    ["build", "--jobs", "1", "//pkg:a"],
    ["-p", "no:layered", "build", "//pkg:a"],
    ["-p", "no:layered", "-j", "1", "//pkg:a", "-p", "no:root_layers"],
    ["--summary-json", "summary.json", "-j", "1", "//pkg:a"],
], ids=" ".join)
def test_global_and_build_flags_go_before_or_after_the_command(ws, run_dtbuild, argv) -> None:
    code, _, err = run_dtbuild(ws, *argv)
    assert code == 0, err
    assert _built(ws, "a.txt") == "a\n"
    if "--summary-json" in argv:
        assert (ws / "summary.json").exists()


def test_keep_going_before_an_implicit_build(ws, run_dtbuild) -> None:
    code, _, err = run_dtbuild(ws, "--keep-going", "-j", "1", "//pkg:bad", "//pkg:a", "//pkg:b")
    assert code == 1, err  # a build failure, not a bad command line
    assert "Build FAILED" in err
    assert _built(ws, "a.txt") == "a\n" and _built(ws, "b.txt") == "b\n"


def test_plugin_flags_before_the_command_apply(ws, run_dtbuild) -> None:
    code, _, err = run_dtbuild(ws, "-p", "no:images", "build", "//pkg:img")
    assert code == 2
    assert "the rule image comes from the built-in plugin 'images', which is blocked with -p no:images" in err
    code, _, err = run_dtbuild(ws, "-p", "no:images", "//pkg:img")
    assert code == 2 and "blocked with -p no:images" in err
    # -p before and after the command add up.
    code, out, err = run_dtbuild(ws, "-p", "no:layered", "plugins", "-p", "no:root_layers")
    assert code == 0, err
    assert "layered  (builtin" in out and "blocked with -p no:layered" in out
    assert "root_layers  (builtin" in out and "blocked with -p no:root_layers" in out


def test_global_flags_before_a_plugin_command(ws, run_dtbuild) -> None:
    code, out, err = run_dtbuild(ws, "-j", "1", "inspect", "//pkg:img")
    assert code == 0, err
    assert "tags: pkg:v1" in out or "v1" in out


# --------------------------------------------------------------------------- --jobs


@pytest.mark.parametrize("argv", [
    ["-j", "0", "//pkg:a"],
    ["//pkg:a", "--jobs", "0"],
    ["build", "//pkg:a", "-j", "0"],
    ["--jobs=-2", "//pkg:a"],
    ["-j", "0", "inspect", "//pkg:img"],
    ["stream", "//pkg:img", "--jobs", "0"],
    ["push", "//pkg:img", "registry.example/x", "-j", "0"],
], ids=" ".join)
def test_jobs_must_be_positive_for_every_command(ws, run_dtbuild, argv) -> None:
    code, out, err = run_dtbuild(ws, *argv)
    assert code == 2, err
    assert "argument --jobs/-j: must be at least 1, but was" in err, err
    assert "leave it out to use every core" in err
    assert out == "" and not (ws / "dtbuild-out" / "pkg").exists()


def test_jobs_must_be_a_number(ws, run_dtbuild) -> None:
    code, _, err = run_dtbuild(ws, "-j", "many", "//pkg:a")
    assert code == 2
    assert "argument --jobs/-j: must be a whole number of at least 1, but was 'many'" in err


# --------------------------------------------------------------------------- unknown commands


@pytest.mark.parametrize(("word", "suggestion"), [("qeury", "query"), ("biuld", "build"), ("strem", "stream"),
                                                  ("inpsect", "inspect")])
def test_an_unknown_command_suggests_the_closest(ws, run_dtbuild, word, suggestion) -> None:
    code, out, err = run_dtbuild(ws, word, "//pkg:a")
    assert code == 2 and out == "", err
    assert f"ERROR: unknown command '{word}', did you mean '{suggestion}'?" in err
    assert "a bare word is read as a command: to build a target, write its label, //pkg:name" in err
    assert "Traceback" not in err
    assert _built(ws, "a.txt") is None


def test_an_unknown_command_without_a_close_one_lists_the_commands(ws, run_dtbuild) -> None:
    code, _, err = run_dtbuild(ws, "frobnicate")
    assert code == 2
    assert "ERROR: unknown command 'frobnicate'\n" in err
    assert "the commands are build, query, graph, explain, clean, cache, plugins," in err
    assert "stream" in err  # the plugins' commands too


def test_a_bare_target_name_is_read_as_a_command_and_a_label_builds(ws, run_dtbuild) -> None:
    code, _, err = run_dtbuild(ws / "pkg", "a")
    assert code == 2 and "unknown command 'a'" in err and "(or :name in this package)" in err, err
    run_dtbuild(ws / "pkg", ":a", check=True)
    assert _built(ws, "a.txt") == "a\n"


def test_a_mistyped_command_outside_a_workspace(tmp_path, run_dtbuild) -> None:
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    code, _, err = run_dtbuild(nowhere, "qeury", "deps(//x)")
    assert code == 2
    assert "unknown command 'qeury', did you mean 'query'?" in err


# --------------------------------------------------------------------------- --help


def _subparsers(ws: Path) -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, the plugins' too, as ``dtbuild`` builds them in ``ws``."""
    from dtbuild.engine import cli
    from dtbuild.engine.api import collect_commands
    from dtbuild.engine.build import Session
    from dtbuild.engine.workspace import find_workspace

    parser = cli._parser(collect_commands(Session(find_workspace(str(ws))).pm))
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_has_help_for_every_argument(ws) -> None:
    parsers = _subparsers(ws)
    assert {"build", "query", "graph", "explain", "clean", "cache", "plugins", "stream", "inspect", "load",
            "push"} <= set(parsers)
    missing = [f"{name}: {action.option_strings or action.dest}" for name, parser in sorted(parsers.items())
               for action in parser._actions if not action.help or action.help == argparse.SUPPRESS]
    assert not missing, f"arguments without help: {missing}"


def test_every_command_help_has_a_description_and_examples(ws, run_dtbuild) -> None:
    for name in sorted(_subparsers(ws)):
        code, out, err = run_dtbuild(ws, name, "--help")
        assert code == 0, err
        usage, _, rest = out.partition("\n\n")
        assert usage.startswith(f"usage: dtbuild {name}"), out
        description = rest.split("\n\n", 1)[0]
        assert len(description.split()) >= 8 and not description.startswith(("positional", "options")), \
            f"dtbuild {name} --help has no description:\n{out}"
        examples = out.partition("\nexamples:\n")[2]
        assert f"  dtbuild {name}" in examples or (name == "build" and "  dtbuild //" in examples), \
            f"dtbuild {name} --help has no examples:\n{out}"


def test_help_command_is_the_commands_help(ws, run_dtbuild) -> None:
    _, asked, _ = run_dtbuild(ws, "build", "--help", check=True)
    assert run_dtbuild(ws, "help", "build", check=True).stdout == asked
    top = run_dtbuild(ws, "--help", check=True).stdout
    assert "examples:" in top and "dtbuild -j 2 //images:web" in top
    assert "stream" in top  # the plugins' commands are listed
