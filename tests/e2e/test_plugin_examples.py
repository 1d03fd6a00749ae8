"""The example plugins of docs/plugins.md work as the guide says: each module of
plugins/examples/ is quoted whole in the guide, and is copied into a workspace as a user
would (``tools/NAME.py``, listed in ``[plugins] modules``) to build something that is then
checked with the tools a user has: ``xz -d`` and skopeo for the xz compressor, umoci for a
tarball layer, the build summary and a JSON log for the describing and observing hooks."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from dtbuild.plugins import hookspecs

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "plugins" / "examples"
MODULES = sorted(p.stem for p in EXAMPLES.glob("*.py") if p.name != "__init__.py")
GUIDE = ROOT / "docs" / "plugins.md"


def _workspace(write_workspace, modules: list[str], files: dict[str, str | bytes]) -> Path:
    """A workspace with copies of these example modules in tools/, listed in dtbuild.toml."""
    listed = ", ".join(f'"tools/{m}.py"' for m in modules)
    ws = write_workspace(files, config=f"[plugins]\nmodules = [{listed}]\n")
    (ws / "tools").mkdir(exist_ok=True)
    for module in modules:
        shutil.copy(EXAMPLES / f"{module}.py", ws / "tools" / f"{module}.py")
    return ws


def _without_docstring(source: str) -> str:
    module = ast.parse(source)
    first = module.body[0]
    assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant), "an example starts with a docstring"
    assert first.end_lineno is not None
    return "".join(source.splitlines(keepends=True)[first.end_lineno:]).lstrip("\n")


# --------------------------------------------------------------------------- the guide


def test_there_are_examples() -> None:
    assert {"write_file", "xz_compressor", "tarball_layer"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_the_guide_quotes_each_example_whole(module: str) -> None:
    guide = GUIDE.read_text()
    path = f"plugins/examples/{module}.py"
    assert f"`{path}`" in guide, f"docs/plugins.md does not name {path}"
    body = _without_docstring((EXAMPLES / f"{module}.py").read_text())
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    assert body in blocks, f"docs/plugins.md must quote {path} (after its docstring) as one python block, as it is now"


@pytest.mark.parametrize("hook", sorted(n for n in vars(hookspecs) if n.startswith("dtbuild_")))
def test_every_hook_has_an_example(hook: str) -> None:
    users = [m for m in MODULES if re.search(rf"^def {hook}\(", (EXAMPLES / f"{m}.py").read_text(), re.M)]
    assert users, f"no module of plugins/examples/ implements {hook}"


# --------------------------------------------------------------------------- rules, action kinds, build globals

SITE_BUILD = """
write_file(name = "motd", content = "hello from write_file\\n", prefix = "/etc")
write_file(name = "start", content = "#!/bin/sh\\necho started\\n", executable = True, prefix = "/bin")
image(name = "app", tag = "v1", copy_to_root = [":motd", ":start"], config = NONROOT_CONFIG, compressor = "none")
"""


def test_write_file_and_the_build_global_make_an_image(write_workspace, run_dtbuild, require_tool) -> None:
    ws = _workspace(write_workspace, ["write_file", "image_presets"], {"pkg/BUILD": SITE_BUILD})
    run_dtbuild.build(ws, "//pkg:all", check=True)
    out = ws / "dtbuild-out" / "pkg"
    assert (out / "motd").read_text() == "hello from write_file\n"
    assert os.stat(out / "start").st_mode & 0o111
    skopeo = require_tool("skopeo")
    config = json.loads(subprocess.run([skopeo, "inspect", "--config", f"oci:{out / 'app.oci'}:v1"],
                                       capture_output=True, text=True, check=True).stdout)
    assert config["config"]["User"] == "65534:65534"
    assert config["config"]["WorkingDir"] == "/tmp"
    with tarfile.open(out / "app.tar") as archive:
        manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
        layer = tarfile.open(fileobj=archive.extractfile(manifest[0]["Layers"][0]))  # noqa: SIM115 - in archive's
        assert layer.extractfile("etc/motd").read() == b"hello from write_file\n"  # type: ignore[union-attr]
        assert layer.getmember("bin/start").mode == 0o755
    # The rule checks its attribute at analysis, pointing at the BUILD line.
    (ws / "pkg" / "BUILD").write_text('write_file(name = "bad", content = "x", prefix = "etc")\n')
    code, _, err = run_dtbuild(ws, "build", "//pkg:bad")
    assert code == 2 and "pkg/BUILD:1" in err and "'prefix'" in err and "absolute path" in err, err


# --------------------------------------------------------------------------- the xz compressor

XZ_BUILD = """
files(name = "site", srcs = ["index.html"], prefix = "/srv")
image(name = "web", tag = "v1", copy_to_root = [":site"], compressor = "xz")
"""


def test_the_xz_compressor_writes_layers_and_archives_xz_reads(write_workspace, run_dtbuild, require_tool,
                                                               tmp_path) -> None:
    ws = _workspace(write_workspace, ["xz_compressor"], {"pkg/BUILD": XZ_BUILD, "pkg/index.html": "<p>xz</p>\n"})
    run_dtbuild.build(ws, "//pkg:web", check=True)
    out = ws / "dtbuild-out" / "pkg"
    description = json.loads((out / "web.json").read_text())
    assert description["archive"] == "dtbuild-out/pkg/web.tar.xz"
    (layer,) = description["layers"]
    assert layer["media_type"] == "application/vnd.oci.image.layer.v1.tar+xz"

    # The layer blob is xz: `xz -d` gives the layer tar, whose digest is the diff_id.
    blob = out / "web.oci" / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
    assert blob.read_bytes().startswith(b"\xfd7zXZ\x00")
    xz = require_tool("xz")
    tar_bytes = subprocess.run([xz, "-dc", str(blob)], capture_output=True, check=True).stdout
    assert "sha256:" + hashlib.sha256(tar_bytes).hexdigest() == layer["diff_id"]
    assert lzma.decompress(blob.read_bytes()) == tar_bytes
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as layer_tar:
        assert layer_tar.extractfile("srv/index.html").read() == b"<p>xz</p>\n"  # type: ignore[union-attr]

    # skopeo reads the xz docker-archive as it is, and its layer is the same.
    skopeo = require_tool("skopeo")
    inspected = json.loads(subprocess.run([skopeo, "inspect", f"docker-archive:{out / 'web.tar.xz'}"],
                                          capture_output=True, text=True, check=True).stdout)
    assert inspected["Layers"] == [layer["diff_id"]]
    oci = json.loads(subprocess.run([skopeo, "inspect", f"oci:{out / 'web.oci'}:v1"],
                                    capture_output=True, text=True, check=True).stdout)
    assert oci["Digest"] == description["manifest_digest"]

    # Reproducible: another cache gives the same bytes.
    first = (out / "web.tar.xz").read_bytes()
    shutil.rmtree(ws / "dtbuild-out")
    run_dtbuild.build(ws, "//pkg:web", check=True, env={"DTBUILD_CACHE_DIR": str(tmp_path / "other-cache")})
    assert (out / "web.tar.xz").read_bytes() == first

    # And dtbuild reads xz back: image_archive takes the archive, another image is made on it.
    (ws / "base").mkdir()
    shutil.copy(out / "web.tar.xz", ws / "base" / "web.tar.xz")
    (ws / "base" / "BUILD").write_text('image_archive(name = "web", src = "web.tar.xz")\n'
                                       'image(name = "again", tag = "v2", from_image = ":web", compressor = "gz")\n')
    run_dtbuild.build(ws, "//base:again", check=True)
    again = json.loads((ws / "dtbuild-out" / "base" / "again.json").read_text())
    assert again["layers"][0]["diff_id"] == layer["diff_id"]


# --------------------------------------------------------------------------- the tarball layer kind

TARBALL_BUILD = """
tarball_layer(name = "app", src = "app-1.0.tar.gz", prefix = "/opt/app", strip_components = 1)
tarball_layer(name = "tools", src = "tools.tar.xz", keep_owners = True)
image(name = "img", tag = "v1", layers = [":app", ":tools"], compressor = "gz")
"""


def _tarball(path: Path, members: list[tuple[str, str, bytes | str]], compression: str = "", uid: int = 0) -> None:
    """A tarball of (name, kind, content or link target) members, with a user's owners and times."""
    with tarfile.open(path, f"w:{compression}") as tar:
        for name, kind, content in members:
            info = tarfile.TarInfo(name)
            info.uid, info.gid, info.uname, info.mtime = uid, uid, "someone", 1_700_000_000
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o750
                tar.addfile(info)
            elif kind in ("symlink", "hardlink"):
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = str(content)
                tar.addfile(info)
            else:
                data = content if isinstance(content, bytes) else content.encode()
                info.size, info.mode = len(data), 0o755 if kind == "exe" else 0o640
                tar.addfile(info, io.BytesIO(data))


def _tarball_workspace(write_workspace, tmp_path: Path) -> Path:
    ws = _workspace(write_workspace, ["tarball_layer", "xz_compressor"], {"pkg/BUILD": TARBALL_BUILD})
    _tarball(ws / "pkg" / "app-1.0.tar.gz", [
        ("app-1.0", "dir", ""), ("app-1.0/bin", "dir", ""), ("app-1.0/bin/app", "exe", "#!/bin/sh\necho app\n"),
        ("app-1.0/share/readme.txt", "file", "read me\n"), ("app-1.0/bin/readme", "symlink", "../share/readme.txt"),
        ("app-1.0/share/copy.txt", "hardlink", "app-1.0/share/readme.txt"),
    ], "gz", uid=1000)
    _tarball(ws / "pkg" / "tools.tar.xz", [("usr/local/bin/tool", "exe", "#!/bin/sh\necho tool\n")], "xz", uid=1000)
    return ws


def test_a_tarball_layer_holds_the_tarballs_members(write_workspace, run_dtbuild, require_tool, tmp_path) -> None:
    ws = _tarball_workspace(write_workspace, tmp_path)
    first = run_dtbuild.build(ws, "//pkg:all", check=True)
    out = ws / "dtbuild-out" / "pkg"
    with tarfile.open(out / "app.tar") as layer:
        members = {m.name: m for m in layer.getmembers()}
        assert sorted(members) == ["opt", "opt/app", "opt/app/bin", "opt/app/bin/app", "opt/app/bin/readme",
                                   "opt/app/share", "opt/app/share/copy.txt", "opt/app/share/readme.txt"]
        app = members["opt/app/bin/app"]
        assert (app.mode, app.uid, app.gid, app.uname, app.mtime) == (0o755, 0, 0, "", 1)
        assert members["opt/app/bin"].mode == 0o750  # the tarball's own mode
        assert members["opt"].mode == 0o755  # a parent the tarball lacks
        assert members["opt/app/bin/readme"].issym() and members["opt/app/bin/readme"].linkname == "../share/readme.txt"
        # The hard link sorts first, so it holds the content and the file links to it:
        # a tar link must come after what it names.
        assert members["opt/app/share/copy.txt"].isreg()
        assert members["opt/app/share/readme.txt"].islnk()
        assert members["opt/app/share/readme.txt"].linkname == "opt/app/share/copy.txt"
        assert layer.extractfile("opt/app/share/copy.txt").read() == b"read me\n"  # type: ignore[union-attr]
    with tarfile.open(out / "tools.tar") as layer:  # read through the xz compressor's MAGIC
        tool = layer.getmember("usr/local/bin/tool")
        assert (tool.uid, tool.gid) == (1000, 1000)  # keep_owners

    # The image holds both layers' files, as umoci unpacks it.
    umoci = require_tool("umoci")
    bundle = tmp_path / "bundle"
    subprocess.run([umoci, "unpack", "--rootless", "--image", f"{out / 'img.oci'}:v1", str(bundle)],
                   check=True, capture_output=True)
    rootfs = bundle / "rootfs"
    assert (rootfs / "opt/app/bin/app").read_text() == "#!/bin/sh\necho app\n"
    assert (rootfs / "opt/app/bin/readme").read_text() == "read me\n"
    assert (rootfs / "usr/local/bin/tool").read_text() == "#!/bin/sh\necho tool\n"

    # Cached; a new tarball re-makes its layer and what is built on it, not the other layer.
    assert first.executed > 0
    assert run_dtbuild.build(ws, "//pkg:all", check=True).executed == 0
    _tarball(ws / "pkg" / "tools.tar.xz", [("usr/local/bin/tool", "exe", "#!/bin/sh\necho v2\n")], "xz")
    changed = run_dtbuild.build(ws, "//pkg:tools", "//pkg:app", check=True)
    assert changed.executed == 1, changed.stderr


@pytest.mark.parametrize(("members", "message"), [
    ([("a/../../etc/passwd", "file", "x")], "pkg/app-1.0.tar.gz: the member 'a/../../etc/passwd' has a '..' component"),
    ([("app-1.0/x", "hardlink", "elsewhere")], "the hard link app-1.0/x points at elsewhere, which strip_components "
                                               "removes"),
], ids=["dot-dot", "stripped-link"])
def test_a_bad_tarball_fails_its_action_clearly(write_workspace, run_dtbuild, tmp_path, members, message) -> None:
    ws = _tarball_workspace(write_workspace, tmp_path)
    _tarball(ws / "pkg" / "app-1.0.tar.gz", members, "gz")
    code, out, err = run_dtbuild(ws, "build", "//pkg:app")
    assert code == 1, err
    assert "in tarball_layer //pkg:app" in out + err and message in out + err, out + err
    assert "Traceback" not in out + err


def test_tarball_layer_attributes_are_checked_at_the_build_line(write_workspace, run_dtbuild, tmp_path) -> None:
    ws = _tarball_workspace(write_workspace, tmp_path)
    (ws / "pkg" / "BUILD").write_text('\ntarball_layer(name = "app", src = "app-1.0.tar.gz", prefix = "opt")\n')
    code, _, err = run_dtbuild(ws, "build", "//pkg:app")
    assert code == 2, err
    assert "pkg/BUILD:2" in err and "the 'prefix' attribute must be an absolute path, but was 'opt'" in err, err
    (ws / "pkg" / "notes.txt").write_text("not a tarball\n")
    (ws / "pkg" / "BUILD").write_text('tarball_layer(name = "app", src = "notes.txt")\n')
    code, out, err = run_dtbuild(ws, "build", "//pkg:app")
    assert code == 1 and "pkg/notes.txt cannot be read as a tarball" in out + err, out + err


# --------------------------------------------------------------------------- executors, commands, summaries, observers

GEN_BUILD = """
genrule(name = "niceness", outs = ["niceness.txt"], cmd = "nice > $OUTS")
genrule(name = "gen", outs = ["gen.txt"], cmd = "echo generated > $OUTS")
files(name = "tree", srcs = ["data.txt"])
image(name = "img", tag = "v1", copy_to_root = [":tree"], compressor = "none")
"""


def _gen_workspace(write_workspace, modules: list[str]) -> Path:
    return _workspace(write_workspace, modules, {"pkg/BUILD": GEN_BUILD, "pkg/data.txt": "data\n"})


def test_the_nice_executor_runs_genrules_at_a_lower_priority(write_workspace, run_dtbuild) -> None:
    ws = _gen_workspace(write_workspace, ["nice_executor"])
    run_dtbuild.build(ws, "//pkg:niceness", check=True)
    expected = min(os.nice(0) + 10, 19)
    assert (ws / "dtbuild-out" / "pkg" / "niceness.txt").read_text() == f"{expected}\n"
    _, out, _ = run_dtbuild(ws, "plugins", check=True)
    assert "executors: nice" in out, out


def test_the_cat_command_prints_a_targets_files(write_workspace, run_dtbuild) -> None:
    ws = _gen_workspace(write_workspace, ["cat_command"])
    code, out, err = run_dtbuild(ws, "cat", "//pkg:gen")
    assert (code, out) == (0, "generated\n"), err
    assert not (ws / "dtbuild-out" / "pkg" / "gen.txt").exists()  # nothing copied to dtbuild-out/
    _, out, _ = run_dtbuild(ws, "cat", "--name", "//pkg:gen", check=True)
    assert out == "==> dtbuild-out/pkg/gen.txt <==\ngenerated\n"
    code, _, err = run_dtbuild(ws, "cat", "//pkg:tree")  # a directory, no file
    assert code == 2 and "//pkg:tree outputs no file" in err and "Traceback" not in err, err
    _, out, _ = run_dtbuild(ws, "cat", "--help", check=True)
    assert "--name" in out and "print each file's path" in out


def test_layer_sizes_adds_summary_fields_to_images(write_workspace, run_dtbuild) -> None:
    ws = _gen_workspace(write_workspace, ["layer_sizes"])
    build = run_dtbuild.build(ws, "//pkg:img", "//pkg:gen", check=True)
    assert build.summary is not None
    targets = build.summary["targets"]
    description = json.loads((ws / "dtbuild-out" / "pkg" / "img.json").read_text())
    assert targets["//pkg:img"]["layer_count"] == len(description["layers"]) == 1
    assert targets["//pkg:img"]["layer_bytes"] == sum(layer["size"] for layer in description["layers"]) > 0
    assert "layer_bytes" not in targets["//pkg:gen"]


def test_build_timings_logs_every_action_and_the_build(write_workspace, run_dtbuild, tmp_path) -> None:
    ws = _gen_workspace(write_workspace, ["build_timings"])
    log = tmp_path / "timings.jsonl"
    env = {"BUILD_TIMINGS_LOG": str(log)}
    first = run_dtbuild.build(ws, "//pkg:gen", "//pkg:img", check=True, env=env)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0] == {"event": "started", "targets": ["//pkg:gen", "//pkg:img"],
                          "total_actions": first.executed}
    actions = [r for r in records if r["event"] == "action"]
    assert len(actions) == first.executed and {r["status"] for r in actions} == {"executed"}
    assert {(r["label"], r["mnemonic"]) for r in actions} >= {("//pkg:gen", "Genrule"), ("//pkg:img", "LayerWrite")}
    assert all(r["seconds"] >= 0 and r["log_lines"] >= 0 for r in actions)
    assert records[-1] == {"event": "finished", "success": True, "actions": first.summary["actions"]}

    # A second build appends: every action cached. A failed one says so.
    run_dtbuild.build(ws, "//pkg:gen", "//pkg:img", check=True, env=env)
    (ws / "pkg" / "BUILD").write_text(GEN_BUILD + 'genrule(name = "bad", outs = ["b.txt"], cmd = "exit 3")\n')
    run_dtbuild.build(ws, "//pkg:bad", check=1, env=env)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    builds = [i for i, r in enumerate(records) if r["event"] == "started"]
    assert len(builds) == 3
    second = records[builds[1]:builds[2]]
    assert {r["status"] for r in second if r["event"] == "action"} == {"cached"}
    third = records[builds[2]:]
    assert [r["status"] for r in third if r["event"] == "action"] == ["failed"]
    assert third[-1]["event"] == "finished" and third[-1]["success"] is False

    # A download of 1 MiB or more is a transfer of its own.
    data = os.urandom((1 << 20) + 4321)
    (tmp_path / "big.bin").write_bytes(data)
    (ws / "pkg" / "BUILD").write_text(
        GEN_BUILD + f'fetch_url(name = "big", urls = ["file://{tmp_path}/big.bin"], '
                    f'sha256 = "{hashlib.sha256(data).hexdigest()}")\n')
    run_dtbuild.build(ws, "//pkg:big", check=True, env=env)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    fourth = records[[i for i, r in enumerate(records) if r["event"] == "started"][3]:]
    assert [r for r in fourth if r["event"] == "transfer"] == [
        {"event": "transfer", "label": "//pkg:big", "description": "download big.bin", "bytes": len(data)}]
