"""Plugins add subcommands (``dtbuild_register_commands``), as the image plugins add
``stream``, ``inspect``, ``load`` and ``push``, and give build summaries their fields
(``dtbuild_describe_target``), through the engine's public command API.

Before: those four commands were code of the engine itself (engine/cli.py and
engine/push.py, importing the image plugins' modules), a plugin could add no command,
and ``-p no:images`` then ``dtbuild stream`` built the image all the same.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e

BUILD = """
genrule(name = "gen", outs = ["gen.txt"], cmd = "echo generated > $OUT")
genrule(name = "other", outs = ["other.txt"], cmd = "echo other > $OUT")
files(name = "site", srcs = ["index.html"], prefix = "/srv")
image(name = "img", tag = "v1", copy_to_root = [":site"], compressor = "none")
"""

HELLO_PLUGIN = '''
from dtbuild.plugins import hookimpl
from dtbuild.plugins.interfaces import Command, CommandFailed
from dtbuild.rules.providers import DefaultInfo


class Hello(Command):
    NAME = "hello"
    HELP = "print a target's outputs"

    def add_arguments(self, parser):
        parser.add_argument("target")
        parser.add_argument("--shout", action="store_true")

    def run(self, args, api):
        label = api.resolve_target(args.target)
        files = api.providers(label)[DefaultInfo].files
        if not files:
            raise CommandFailed(f"{label} has no outputs", hint="give a target that has some", usage=True)
        built = api.build_artifacts(label, files)
        reader = api.reader()
        for artifact in built:
            with reader.open_blob(artifact.digest) as f:
                text = f.read().decode()
            print(f"{artifact.path}: {text.upper() if args.shout else text}", end="")
        api.report(f"hello: {len(built)} file(s) of {label}")
        return 0


@hookimpl
def dtbuild_register_commands():
    return [Hello]


@hookimpl
def dtbuild_describe_target(label, providers, read_output):
    files = providers[DefaultInfo].files
    return {"first_line": read_output(files[0]).decode().splitlines()[0]} if label.endswith(":gen") else None
'''


def _workspace(write_workspace, plugin: str = HELLO_PLUGIN):
    return write_workspace({"pkg/BUILD": BUILD, "pkg/index.html": "<p>hi</p>\n", "tools/hello.py": plugin},
                           config='[plugins]\nmodules = ["tools/hello.py"]\n')


def test_a_workspace_plugin_adds_a_command_that_builds_through_the_api(write_workspace, run_dtbuild) -> None:
    ws = _workspace(write_workspace)
    code, out, err = run_dtbuild(ws, "hello", "//pkg:gen", "--shout")
    assert code == 0, err
    assert out == "dtbuild-out/pkg/gen.txt: GENERATED\n", out
    assert "hello: 1 file(s) of //pkg:gen" in err
    # Only what the command asked for was built, and nothing was copied to dtbuild-out/.
    assert not (ws / "dtbuild-out" / "pkg" / "gen.txt").exists()
    # Global flags work with plugin commands as with the engine's.
    code, out, _ = run_dtbuild(ws, "-p", "no:images", "hello", "//pkg:other")
    assert (code, out) == (0, "dtbuild-out/pkg/other.txt: other\n")
    # Its errors are the engine's: a message, a hint, exit 2 for a bad command line.
    code, _, err = run_dtbuild(ws, "hello", "//pkg:nope")
    assert code == 2 and "ERROR:" in err and "Traceback" not in err, err
    _, out, _ = run_dtbuild(ws, "plugins", check=True)
    assert "  hello  [workspace:tools/hello.py]" in out, out
    assert "      commands: inspect, load, run, stream" in out, out


def test_a_plugin_gives_summary_fields(write_workspace, run_dtbuild) -> None:
    ws = _workspace(write_workspace)
    run_dtbuild(ws, "build", "//pkg:gen", "//pkg:img", "--summary-json", "summary.json", check=True)
    targets = json.loads((ws / "summary.json").read_text())["targets"]
    assert targets["//pkg:gen"] == {"outputs": ["dtbuild-out/pkg/gen.txt"], "manifest_digest": None,
                                    "first_line": "generated"}
    description = json.loads((ws / "dtbuild-out" / "pkg" / "img.json").read_text())
    assert targets["//pkg:img"]["manifest_digest"] == description["manifest_digest"]
    assert set(targets["//pkg:img"]) == {"outputs", "manifest_digest"}


@pytest.mark.parametrize(("name", "other"), [("stream", "plugin 'images'"), ("build", "a command of dtbuild itself")])
def test_a_command_name_taken_twice_is_an_error_naming_both(write_workspace, run_dtbuild, name, other) -> None:
    ws = _workspace(write_workspace, HELLO_PLUGIN.replace('NAME = "hello"', f'NAME = "{name}"'))
    code, _, err = run_dtbuild(ws, "hello", "//pkg:gen")
    assert code == 2, err
    assert f"command '{name}'" in err and other in err and "workspace:tools/hello.py" in err, err
    assert "Traceback" not in err


def test_an_image_command_of_a_blocked_plugin_says_so(write_workspace, run_dtbuild) -> None:
    ws = _workspace(write_workspace)
    code, out, err = run_dtbuild(ws, "-p", "no:images", "stream", "//pkg:img")
    assert code == 2 and out == "", err
    assert "unknown command 'stream' (it comes from the plugin 'images', which is blocked with -p no:images)" in err
    assert not (ws / "dtbuild-out" / "pkg" / "img.tar").exists()
    code, _, err = run_dtbuild(ws, "-p", "no:images", "push", "//pkg:img", "registry.example/x")
    assert code == 2 and "it comes from the plugin 'registries'" in err and "-p no:images" in err, err
    # The same target's genrule neighbour still builds without the image plugins.
    run_dtbuild(ws, "-p", "no:images", "//pkg:gen", check=True)
