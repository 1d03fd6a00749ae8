"""Layer kinds are first-class: the whole example of docs/plugins.md ("A layer kind"),
taken from the document verbatim, is a workspace plugin whose rule a BUILD file uses in an
image; the layer is cached, re-made when the plugin changes, and its image runs in runc."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
APPLETS = ["sh", "cat"]


def _doc_blocks() -> tuple[str, str]:
    """The plugin module and the BUILD file of docs/plugins.md's layer kind section."""
    guide = (ROOT / "docs" / "plugins.md").read_text()
    section = guide[guide.index("## A layer kind\n"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    plugin = next(b for b in blocks if b.startswith("# tools/motd.py"))
    build = next(b for b in blocks if b.startswith("# BUILD"))
    return plugin, build


def _workspace(write_workspace, build: str) -> Path:
    plugin, _ = _doc_blocks()
    ws = write_workspace({
        "tools/motd.py": plugin,
        "app/BUILD": build,
        "app/note.txt": "a note from a source file\n",
        "base/BUILD": 'files(name = "rootfs", srcs = glob(["rootfs/**"]), strip_prefix = "rootfs")\n'
                      'image(name = "busybox", tag = "1", copy_to_root = [":rootfs"], '
                      'config = {"Env": ["PATH=/bin"]}, compressor = "none")\n',
    }, config='[plugins]\nmodules = ["tools/motd.py"]\n')
    bindir = ws / "base" / "rootfs" / "bin"
    bindir.mkdir(parents=True)
    shutil.copy("/bin/busybox", bindir / "busybox")
    for applet in APPLETS:
        (bindir / applet).symlink_to("busybox")
    return ws


def test_the_documented_example_is_short() -> None:
    plugin, build = _doc_blocks()
    code = [line for line in plugin.splitlines() if line.strip()]
    assert len(code) <= 25, plugin
    assert 'image(name = "app"' in build and "layers = [\":motd\"]" in build


def test_a_workspace_layer_kind_is_built_cached_rebuilt_and_runs_in_runc(write_workspace, run_dtbuild, require_tool,
                                                                        tmp_path) -> None:
    for tool in ("busybox", "umoci", "runc"):
        require_tool(tool)
    _, build = _doc_blocks()
    # The documented BUILD file, with a command that shows the layer's files and a tag.
    build = build.replace('layers = [":motd"])',
                          'layers = [":motd"], tag = "v1", compressor = "gz",\n'
                          '      config = {"Cmd": ["/bin/cat", "/etc/motd", "/etc/motd.d/note.txt"]})')
    ws = _workspace(write_workspace, build)

    first = run_dtbuild.build(ws, "//app:all", check=True)
    assert first.executed > 0
    out = ws / "dtbuild-out" / "app"
    with tarfile.open(out / "motd.tar") as tar:
        assert tar.getnames() == ["etc", "etc/motd", "etc/motd.d", "etc/motd.d/note.txt"]
        motd = tar.getmember("etc/motd")
        assert (motd.mode, motd.uid, motd.gid, motd.mtime) == (0o644, 0, 0, 1)
        assert tar.getmember("etc").mode == 0o755
        assert tar.extractfile("etc/motd").read() == b"hello from a layer kind\n"
    layer_bytes = (out / "motd.tar").read_bytes()

    again = run_dtbuild.build(ws, "//app:all", check=True)
    assert again.executed == 0, again.stderr

    # The image runs in runc and prints what the layer holds.
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{out / 'app.oci'}:v1", str(bundle)], check=True,
                   capture_output=True, text=True)
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["terminal"] = False
    config_path.write_text(json.dumps(config))
    done = subprocess.run(["runc", "run", "-b", str(bundle), f"dtbuild-motd-{os.getpid()}"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["hello from a layer kind", "a note from a source file"]

    # Editing the plugin (its source digest is in the layer kind's version) re-makes the
    # layer: the same bytes here, so the images built on it stay cached.
    plugin = ws / "tools" / "motd.py"
    plugin.write_text(plugin.read_text() + "\n# edited\n")
    edited = run_dtbuild.build(ws, "//app:motd", check=True)
    assert edited.executed == 1, edited.stdout + edited.stderr
    assert (out / "motd.tar").read_bytes() == layer_bytes

    # A new attribute value re-makes only that layer and what is built on it.
    (ws / "app" / "BUILD").write_text(build.replace("hello from a layer kind", "changed"))
    changed = run_dtbuild.build(ws, "//app:motd", check=True)
    assert changed.executed == 1
    with tarfile.open(out / "motd.tar") as tar:
        assert tar.extractfile("etc/motd").read() == b"changed\n"


def test_a_bad_member_is_a_clear_error(write_workspace, run_dtbuild) -> None:
    ws = _workspace(write_workspace, 'motd(name = "motd", message = "hi", extra = ["note.txt"])\n')
    plugin = ws / "tools" / "motd.py"
    plugin.write_text(plugin.read_text().replace('"/etc/motd.d/" + src.path', '"/etc/../" + src.path'))
    code, _, err = run_dtbuild(ws, "build", "//app:motd")
    assert code != 0
    assert "layer kind 'motd' gave a bad layer entry" in err and "'..'" in err, err
    assert "Traceback" not in err


def test_a_layer_kind_named_like_a_rule_is_an_error(write_workspace, run_dtbuild) -> None:
    ws = _workspace(write_workspace, 'motd(name = "motd", message = "hi")\n')
    plugin = ws / "tools" / "motd.py"
    plugin.write_text(plugin.read_text().replace('NAME = "motd"', 'NAME = "genrule"'))
    code, _, err = run_dtbuild(ws, "build", "//app:motd")
    assert code == 2, err
    assert "the layer kind 'genrule'" in err and "the rule 'genrule'" in err, err
    assert "Traceback" not in err


def test_plugins_lists_the_layer_kind_and_its_rule(write_workspace, run_dtbuild) -> None:
    ws = _workspace(write_workspace, 'motd(name = "motd", message = "hi")\n')
    _, out, _ = run_dtbuild(ws, "plugins", check=True)
    assert "  motd  [workspace:tools/motd.py]" in out, out
    assert "  pure_layer  [images: builtin]" in out, out


def test_pure_layer_stands_in_when_images_is_blocked(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"pkg/BUILD": 'genrule(name = "gen", outs = ["g.txt"], cmd = "echo hi > $OUT")\n'
                                       'pure_layer(name = "layer")\n'})
    run_dtbuild.build(ws, "-p", "no:images", "//pkg:gen", check=True)
    code, _, err = run_dtbuild(ws, "build", "-p", "no:images", "//pkg:layer")
    assert code == 2, err
    assert "the rule pure_layer comes from the built-in plugin 'images', which is blocked with -p no:images" in err
