"""A registered object's version is part of the key of every action that uses it: editing
a workspace compressor plugin re-runs exactly the actions that compress, and the bytes
are those a fresh cache gives (issue: stale bytes served after a plugin changed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

PLUGIN = '''
"""A workspace compressor: gzip at a level this file chooses."""
import gzip
import io

from dtbuild.plugins import hookimpl
from dtbuild.plugins.builtin.compressors import GzipCompressor

LEVEL = {level}


class _Writer(io.RawIOBase):
    def __init__(self, sink):
        self._gz = gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=LEVEL, mtime=0)

    def writable(self):
        return True

    def write(self, data):
        self._gz.write(data)
        return len(data)

    def close(self):
        if not self.closed:
            self._gz.close()
        super().close()


class Slowgz(GzipCompressor):
    NAME = "slowgz"
    VERSION = "{version}"
    EXTENSION = ".gz"

    def compress_to(self, sink):
        return _Writer(sink)


@hookimpl
def dtbuild_register_compressors():
    return [Slowgz]
'''

BUILD = """
files(name = "site", srcs = glob(["site/**"]), strip_prefix = "site", prefix = "/srv")
image(name = "img", tag = "v1", copy_to_root = [":site"], compressor = "slowgz")
"""


def _workspace(write_workspace) -> Path:
    site = {f"pkg/site/page{i}.html": f"<p>page {i}</p>\n" * 200 for i in range(5)}
    return write_workspace({"tools/slowgz.py": PLUGIN.format(level=1, version="1"), "pkg/BUILD": BUILD, **site},
                           config='[plugins]\nmodules = ["tools/slowgz.py"]\n')


def _manifest(ws: Path) -> str:
    return json.loads((ws / "dtbuild-out" / "pkg" / "img.json").read_text())["manifest_digest"]


def test_editing_a_compressor_plugin_reruns_what_compresses(write_workspace, run_dtbuild, tmp_path) -> None:
    ws = _workspace(write_workspace)
    first = run_dtbuild.build(ws, "//pkg:img", check=True)
    assert first.executed > 0
    before = _manifest(ws)

    plugin = ws / "tools" / "slowgz.py"
    plugin.write_text(PLUGIN.format(level=9, version="2"))
    _, out, _ = run_dtbuild(ws, "explain", "//pkg:img", check=True)
    assert "compressor 'slowgz'" in out, out
    files_line = next(line for line in out.splitlines() if line.startswith("FilesTree"))
    assert files_line.endswith(": cached"), files_line

    second = run_dtbuild.build(ws, "//pkg:img", check=True)
    assert 0 < second.executed < first.executed, (first.summary, second.summary)
    after = _manifest(ws)
    assert after != before, "level 9 output must differ from level 1 output"

    fresh = run_dtbuild.build(ws, "//pkg:img", check=True, env={"DTBUILD_CACHE_DIR": str(tmp_path / "fresh")})
    assert fresh.executed == first.executed
    assert _manifest(ws) == after

    # A later build with nothing changed runs nothing.
    assert run_dtbuild.build(ws, "//pkg:img", check=True).executed == 0


SQUEEZE = '''
"""A rule whose action kind asks for a compressor it does not declare."""
from dtbuild.plugins import hookimpl
from dtbuild.plugins.interfaces import ActionKind
from dtbuild.rules import attrs
from dtbuild.rules.api import rule
from dtbuild.rules.providers import DefaultInfo


def _impl(ctx):
    out = ctx.declare_file(ctx.name + ".gz")
    ctx.actions.declare("Squeeze", inputs={"src": ctx.files("srcs")}, outputs={"out": out})
    return [DefaultInfo(files=(out,))]


squeeze = rule("squeeze", _impl, doc="Compresses a file.", attrs={"srcs": attrs.source_list(doc="The file.")})


class Squeeze(ActionKind):
    NAME = "Squeeze"

    def run(self, ctx):
        with ctx.open_input(ctx.inputs("src")[0]) as src, open(ctx.output_path("out"), "wb") as out:
            with ctx.compressor("slowgz").compress_to(out) as sink:
                sink.write(src.read())


@hookimpl
def dtbuild_register_rules():
    return [squeeze]


@hookimpl
def dtbuild_register_action_kinds():
    return [Squeeze]
'''


def test_an_undeclared_use_still_invalidates(write_workspace, run_dtbuild, tmp_path) -> None:
    """An action kind that asks for a compressor it did not declare records the version it
    got in its result; a new version of that compressor makes the result stale."""
    ws = write_workspace({"tools/slowgz.py": PLUGIN.format(level=1, version="1"), "tools/squeeze.py": SQUEEZE,
                          "pkg/BUILD": 'squeeze(name = "small", srcs = ["data.txt"])\n',
                          "pkg/data.txt": "some words to squeeze\n" * 500},
                         config='[plugins]\nmodules = ["tools/slowgz.py", "tools/squeeze.py"]\n')
    out = ws / "dtbuild-out" / "pkg" / "small.gz"
    assert run_dtbuild.build(ws, "//pkg:small", check=True).executed == 1
    level1 = out.read_bytes()
    assert run_dtbuild.build(ws, "//pkg:small", check=True).executed == 0

    (ws / "tools" / "slowgz.py").write_text(PLUGIN.format(level=9, version="2"))
    _, explained, _ = run_dtbuild(ws, "explain", "//pkg:small", check=True)
    assert "compressor 'slowgz' (version 1+" in explained, explained
    assert run_dtbuild.build(ws, "//pkg:small", check=True).executed == 1
    level9 = out.read_bytes()
    assert level9 != level1
    run_dtbuild.build(ws, "//pkg:small", check=True, env={"DTBUILD_CACHE_DIR": str(tmp_path / "fresh")})
    assert out.read_bytes() == level9
