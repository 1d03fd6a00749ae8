"""BUILD semantics a Bazel user relies on, through the CLI: a glob() that matches nothing
is an error unless ``allow_empty = True``; ``visibility`` decides who may depend on a
target (``package(default_visibility = ...)`` included); ``tags = ["manual"]`` keeps a
target out of ``//...`` and ``:all``; and dtbuild.toml's sections and keys are checked.

Targets are ``files()`` packages, which build without running a command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _error(run_dtbuild, cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run the CLI, expect exit 2 and one error without a traceback; return stderr."""
    code, out, err = run_dtbuild(cwd, *args, env=env)
    assert code == 2, f"exit {code}\n{out}\n{err}"
    assert not re.search(r'^\s*File ".*", line \d+', err, re.M), "a Python traceback leaked:\n" + err
    return err


# --------------------------------------------------------------------------- glob()


def test_a_glob_that_matches_nothing_is_an_error_at_its_line(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"web/BUILD": '# pages\n\nfiles(\n    name = "site",\n    srcs = glob(["site/**"]),\n)\n',
                          "web/stie/index.html": "<p>typo in the directory name</p>\n"})
    err = _error(run_dtbuild, ws, "build", "//web:site")
    assert 'web/BUILD:5: glob(["site/**"]) matches no file of package //web' in err, err
    assert 'srcs = glob(["site/**"]),' in err, err  # the line itself is quoted
    assert 'hint: ' in err and 'glob(["site/**"], allow_empty = True)' in err, err


def test_allow_empty_true_lets_a_glob_match_nothing(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"web/BUILD": 'files(name = "site", srcs = glob(["site/**"], allow_empty = True))\n'
                                       'files(name = "conf", srcs = ["app.conf"])\n',
                          "web/app.conf": "x = 1\n"})
    code, _, err = run_dtbuild(ws, "build", "//web:all")
    assert code == 0, err
    site = ws / "dtbuild-out" / "web" / "site"
    assert site.is_dir() and not any(site.iterdir())
    assert (ws / "dtbuild-out" / "web" / "conf" / "app.conf").read_text() == "x = 1\n"


def test_a_glob_whose_matches_are_all_excluded_says_so(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"docs/BUILD": 'files(name = "docs", srcs = glob(["*.md"], exclude = ["*"]))\n',
                          "docs/a.md": "", "docs/b.md": ""})
    err = _error(run_dtbuild, ws, "build", "//docs")
    assert 'docs/BUILD:1: glob(["*.md"], exclude = ["*"]) matches nothing: exclude leaves out all 2 files' in err


def test_a_glob_in_a_macro_points_at_the_macro_line(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({
        "tools/BUILD": "",
        "tools/defs.bzl": 'def tree(name, dir):\n    files(name = name, srcs = glob([dir + "/**"]))\n',
        "app/BUILD": 'load("//tools:defs.bzl", "tree")\n\ntree(name = "assets", dir = "assets")\n',
    })
    err = _error(run_dtbuild, ws, "build", "//app:assets")
    assert 'tools/defs.bzl:2: glob(["assets/**"]) matches no file of package //app' in err, err


# --------------------------------------------------------------------------- visibility

VISIBILITY_TREE = {
    "lib/BUILD": '''files(name = "open", srcs = ["a.txt"])  # public: no package() says otherwise

files(
    name = "secret",
    srcs = ["a.txt"],
    visibility = ["//visibility:private"],
)

files(name = "for_app", srcs = ["a.txt"], visibility = ["//app:__pkg__"])

files(name = "for_app_tree", srcs = ["a.txt"], visibility = ["//app:__subpackages__"])

files(name = "user", srcs = ["a.txt"], deps = [":secret"])  # its own package may
''',
    "lib/a.txt": "a\n",
    "app/x.txt": "x\n",
    "app/sub/y.txt": "y\n",
}


def _dep(package: str, deps: list[str], name: str = "web") -> str:
    src = "y.txt" if package.endswith("sub") else "x.txt"
    return f'files(\n    name = "{name}",\n    srcs = ["{src}"],\n    deps = {deps!r},\n)\n'.replace("'", '"')


def test_a_private_dependency_is_an_error_naming_both_targets(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({**VISIBILITY_TREE, "app/BUILD": _dep("app", [":local", "//lib:secret"])
                          + 'files(name = "local", srcs = ["x.txt"])\n'})
    err = _error(run_dtbuild, ws, "build", "//app:web")
    assert "app/BUILD:1: in files //app:web: the 'deps' attribute depends on //lib:secret, " \
           "which is not visible to //app:web" in err, err
    assert "lib/BUILD:3" in err and "//visibility:private" in err, err
    assert 'hint: if //app may depend on it, add "//app:__pkg__" (or "//visibility:public") to the visibility ' \
           "of //lib:secret" in err, err


@pytest.mark.parametrize(("package", "dep"), [
    ("app", "//lib:open"),
    ("app", "//lib:for_app"),
    ("app", "//lib:for_app_tree"),
    ("app/sub", "//lib:for_app_tree"),  # __subpackages__ covers the package and those below it
    ("app", "//lib:user"),  # which depends on a private target of its own package
])
def test_visible_dependencies_build(write_workspace, run_dtbuild, package: str, dep: str) -> None:
    ws = write_workspace({**VISIBILITY_TREE, f"{package}/BUILD": _dep(package, [dep])})
    code, _, err = run_dtbuild(ws, "build", f"//{package}:web")
    assert code == 0, err


def test_pkg_covers_one_package_not_those_below_it(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({**VISIBILITY_TREE, "app/sub/BUILD": _dep("app/sub", ["//lib:for_app"])})
    err = _error(run_dtbuild, ws, "build", "//app/sub:web")
    assert "//lib:for_app, which is not visible to //app/sub:web" in err and "//app:__pkg__" in err, err
    assert 'add "//app/sub:__pkg__"' in err, err


def test_package_default_visibility_applies_to_targets_that_set_none(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({
        "lib/BUILD": 'package(default_visibility = ["//visibility:private"])\n\n'
                     'files(name = "hidden", srcs = ["a.txt"])\n'
                     'files(name = "shown", srcs = ["a.txt"], visibility = ["//visibility:public"])\n',
        "lib/a.txt": "a\n", "app/x.txt": "x\n",
        "app/BUILD": _dep("app", ["//lib:shown"], "ok") + _dep("app", ["//lib:hidden"], "bad")
                     + 'files(name = "source_user", srcs = ["//lib:a.txt"])\n',  # source files stay visible
    })
    code, _, err = run_dtbuild(ws, "build", "//app:ok", "//app:source_user")
    assert code == 0, err
    assert (ws / "dtbuild-out" / "app" / "source_user" / "a.txt").read_text() == "a\n"
    err = _error(run_dtbuild, ws, "build", "//app:bad")
    assert "//lib:hidden, which is not visible to //app:bad" in err and "lib/BUILD:3" in err, err


def test_query_shows_the_graph_whatever_the_visibility(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({**VISIBILITY_TREE, "app/BUILD": _dep("app", ["//lib:secret"])})
    code, out, err = run_dtbuild(ws, "query", "deps(//app:web)")
    assert code == 0, err
    assert "//lib:secret" in out.split()


@pytest.mark.parametrize(("visibility", "said"), [
    ('"//visibility:public"', "the 'visibility' attribute must be a list of labels"),
    ('["//visibility:publik"]', "did you mean '//visibility:public'?"),
    ('["//app:web"]', "which is not a visibility"),
])
def test_a_bad_visibility_is_an_error_at_the_target(write_workspace, run_dtbuild, visibility: str,
                                                    said: str) -> None:
    ws = write_workspace({"lib/BUILD": f'files(name = "x", srcs = [], visibility = {visibility})\n'})
    err = _error(run_dtbuild, ws, "build", "//lib:x")
    assert "lib/BUILD:1" in err and "//lib:x" in err and said in err, err


def test_package_must_come_first_and_takes_known_arguments(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"lib/BUILD": 'files(name = "x", srcs = [])\npackage(default_visibility = [])\n'})
    err = _error(run_dtbuild, ws, "build", "//lib:x")
    assert "lib/BUILD:2: package() must come before the package's targets, but //lib:x" in err, err
    (ws / "lib" / "BUILD").write_text('package(default_visibilty = [])\nfiles(name = "x", srcs = [])\n')
    err = _error(run_dtbuild, ws, "build", "//lib:x")
    assert "lib/BUILD:1: package() has no argument 'default_visibilty'" in err, err
    assert "did you mean 'default_visibility'?" in err, err


# --------------------------------------------------------------------------- tags = ["manual"]

MANUAL_TREE = {
    "pkg/BUILD": 'files(name = "normal", srcs = ["a.txt"])\n'
                 'files(name = "heavy", srcs = ["a.txt"], tags = ["manual"])\n',
    "pkg/a.txt": "a\n",
    "pkg/only/BUILD": 'files(name = "m1", srcs = [], tags = ["manual", "slow"])\n',
}


@pytest.mark.parametrize("pattern", ["//...", "//pkg:all", "//pkg/..."])
def test_manual_targets_are_left_out_of_wildcards(write_workspace, run_dtbuild, pattern: str) -> None:
    ws = write_workspace(MANUAL_TREE)
    code, _, err = run_dtbuild(ws, "build", pattern)
    assert code == 0, err
    out = ws / "dtbuild-out" / "pkg"
    assert (out / "normal" / "a.txt").is_file()
    assert not (out / "heavy").exists()
    assert not (out / "only").exists()


def test_a_manual_target_builds_when_named(write_workspace, run_dtbuild) -> None:
    ws = write_workspace(MANUAL_TREE)
    code, _, err = run_dtbuild(ws, "build", "//pkg:heavy", "//pkg/only:m1")
    assert code == 0, err
    assert (ws / "dtbuild-out" / "pkg" / "heavy" / "a.txt").read_text() == "a\n"
    assert (ws / "dtbuild-out" / "pkg" / "only" / "m1").is_dir()


def test_a_wildcard_over_manual_targets_only_says_why_it_is_empty(write_workspace, run_dtbuild) -> None:
    ws = write_workspace(MANUAL_TREE)
    err = _error(run_dtbuild, ws, "build", "//pkg/only:all")
    assert "no targets match '//pkg/only:all': every target it covers is tagged \"manual\" (//pkg/only:m1)" in err
    assert "dtbuild build //pkg/only:m1" in err, err


def test_tags_must_be_a_list_of_strings(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"pkg/BUILD": 'files(name = "x", srcs = [], tags = "manual")\n'})
    err = _error(run_dtbuild, ws, "build", "//pkg:x")
    assert "pkg/BUILD:1" in err and "the 'tags' attribute must be a list of strings" in err, err


# --------------------------------------------------------------------------- dtbuild.toml


@pytest.mark.parametrize(("toml", "expected"), [
    ('[cahce]\ndir = "cache"\n', ["dtbuild.toml:1: dtbuild.toml has no section [cahce]", "did you mean 'cache'?"]),
    ('[run]\nruntim = "runc"\n', ["dtbuild.toml:2: [run] has no setting 'runtim'", "did you mean 'runtime'?"]),
    ('[remote.headrs]\nx = "y"\n', ["dtbuild.toml:1: [remote] has no setting 'headrs'", "did you mean 'headers'?"]),
    ('[cache]\n\ndir = 3\n', ["dtbuild.toml:3: [cache] dir in dtbuild.toml must be a path, but is an integer"]),
    ('[plugins]\nmodules = "tools/p.py"\n', ["dtbuild.toml:2: [plugins] modules in dtbuild.toml must be a list of "
                                            "strings, but is a string", 'hint: write modules = ["a.py"]']),
    ('[remote]\npassword = 123456\n', ["dtbuild.toml:2: [remote] password in dtbuild.toml must be a string"]),
    ('[run]\nruntime = "podmn"\n', ["dtbuild.toml:2: [run] runtime must be one of auto, podman, runc, but was "
                                    "'podmn'", "did you mean 'podman'?"]),
])
def test_dtbuild_toml_mistakes_are_errors_at_their_line(write_workspace, run_dtbuild, toml: str,
                                                        expected: list[str]) -> None:
    ws = write_workspace({"pkg/BUILD": 'files(name = "x", srcs = [])\n'}, config=toml)
    err = _error(run_dtbuild, ws / "pkg", "build", ":x")
    for text in expected:
        assert text in err, err
    assert "123456" not in err  # a value of the wrong type is never echoed: it may be a secret


def test_run_runtime_from_the_environment_is_checked(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"pkg/BUILD": 'files(name = "x", srcs = [])\n'}, config='[run]\nruntime = "runc"\n')
    err = _error(run_dtbuild, ws, "build", "//pkg:x", env={"DTBUILD_RUN_RUNTIME": "docker"})
    assert "DTBUILD_RUN_RUNTIME must be one of auto, podman, runc, but was 'docker'" in err, err
    code, _, err = run_dtbuild(ws, "build", "//pkg:x", env={"DTBUILD_RUN_RUNTIME": "podman"})
    assert code == 0, err
