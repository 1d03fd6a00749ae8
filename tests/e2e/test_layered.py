"""Layered images, merged and exported images and dockerTools' helpers, checked the way a
user would: layer order and digests from NAME.json and the OCI layout, skopeo, umoci and
runc on the results, tar headers of the customisation layer, `dtbuild stream` and
`dtbuild inspect` output. The fixture is tests/fixtures/layered (its BUILD files say
what each target is for)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BUSYBOX_APPLETS = ["id", "cat", "ls", "env", "echo", "stat", "mkdir", "touch", "chown", "rm", "wc"]
PKGS = ["//pkgs:libc", "//pkgs:libssl", "//pkgs:libz", "//pkgs:app", "//pkgs:tool"]


@pytest.fixture
def ws(workspace, require_tool) -> Path:
    """A copy of the layered fixture with busybox (without an `sh` applet: bin_sh makes
    /bin/sh) in //base:busybox."""
    require_tool("busybox")
    root = workspace("layered")
    bindir = root / "base" / "rootfs" / "bin"
    bindir.mkdir(parents=True)
    shutil.copy("/bin/busybox", bindir / "busybox")
    for applet in BUSYBOX_APPLETS:
        (bindir / applet).symlink_to("busybox")
    return root


def _out(ws: Path, pkg: str, name: str) -> Path:
    return ws / "dtbuild-out" / pkg / name


def _description(ws: Path, pkg: str, name: str) -> dict:
    return json.loads(_out(ws, pkg, f"{name}.json").read_text())


def _oci_config(layout: Path) -> dict:
    index = json.loads((layout / "index.json").read_text())
    blob = layout / "blobs" / "sha256"
    manifest = json.loads((blob / index["manifests"][0]["digest"][7:]).read_text())
    return json.loads((blob / manifest["config"]["digest"][7:]).read_text())


def _layer_contents(ws: Path, pkg: str, name: str) -> list:
    """What each layer holds, bottom first, as the image's history says: a list of
    package labels, "customisation", or "base"."""
    out = []
    for entry in _oci_config(_out(ws, pkg, f"{name}.oci"))["history"]:
        made = re.fullmatch(r"dtbuild \S+( customisation)? \((.*)\)", entry.get("created_by", ""))
        if made is None:
            out.append("base")
        elif made.group(1):
            out.append("customisation")
        else:
            out.append(made.group(2).split(", "))
    return out


def _skopeo(*args: str) -> dict:
    done = subprocess.run(["skopeo", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if args[0] == "inspect" else {}


def _unpack(layout: Path, tag: str, bundle: Path) -> Path:
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], check=True, capture_output=True)
    return bundle / "rootfs"


def _runc(bundle: Path) -> subprocess.CompletedProcess[str]:
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["terminal"] = False
    config_path.write_text(json.dumps(config))
    return subprocess.run(["runc", "run", "-b", str(bundle), f"dtbuild-layered-{os.getpid()}-{bundle.name}"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _archive_layers(archive: Path, image: int = 0) -> list[tarfile.TarFile]:
    """The layer tars of a plain docker-archive, bottom first."""
    with tarfile.open(archive) as outer:
        manifest = json.loads(outer.extractfile("manifest.json").read())
        return [tarfile.open(fileobj=io.BytesIO(outer.extractfile(path).read()))
                for path in manifest[image]["Layers"]]


# --------------------------------------------------------------------------- order and budget


def test_layers_follow_popularity_and_the_max_layers_budget(ws, run_dtbuild, require_tool) -> None:
    require_tool("skopeo")
    run_dtbuild(ws, "build", "//images:max2", "//images:max3", "//images:max100", "//images:on_base", check=True)
    # contents = [app, tool]; popularity: libc 7, libssl 2, libz 2, app 1, tool 1.
    assert _layer_contents(ws, "images", "max100") == [[p] for p in PKGS] + ["customisation"]
    assert _layer_contents(ws, "images", "max3") == [["//pkgs:libc"], PKGS[1:], "customisation"]
    assert _layer_contents(ws, "images", "max2") == [PKGS, "customisation"]
    # A base of two layers and max_layers = 4 leave one layer for the five packages.
    base = [["//base:busybox"], ["//base:nss"]]
    assert _layer_contents(ws, "images", "on_base") == [*base, PKGS, "customisation"]
    for name, count in (("max2", 2), ("max3", 3), ("max100", 6), ("on_base", 4)):
        layout = _out(ws, "images", f"{name}.oci")
        inspected = _skopeo("inspect", f"oci:{layout}:v1")
        assert inspected["Layers"] == [layer["digest"] for layer in _description(ws, "images", name)["layers"]]
        assert len(inspected["Layers"]) == count
    # The package layers of max100 hold exactly their package.
    layers = _archive_layers(_out(ws, "images", "max100.tar"))
    assert [m.name for m in layers[0].getmembers()] == ["usr", "usr/lib", "usr/lib/libc", "usr/lib/libc/libc.txt"]
    assert all(m.uname == "root" and m.gname == "root" and m.mtime == 1 for m in layers[0].getmembers())
    assert layers[-1].getmembers() == []  # no commands: an empty customisation layer


def test_max_layers_without_room_is_an_error(ws, run_dtbuild) -> None:
    build = ws / "images" / "BUILD"
    text = build.read_text()
    lines = text.count("\n")
    build.write_text(text + (
        'layered_image(name = "no_room", from_image = "//base:two_layers", contents = ["//pkgs:app"], '
        'max_layers = 3)\n'
        'layered_image(name = "too_small", contents = ["//pkgs:app"], max_layers = 1)\n'))
    code, _, err = run_dtbuild(ws, "build", "//images:no_room")
    assert code == 2  # the base's layers are known at analysis: a BUILD error, nothing built
    assert "3 layers are used by 'from_image' (2) and the customisation layer (1), but only max_layers = 3 " \
           "were allowed: at least 1 layer is required to store the contents" in err
    assert f"images/BUILD:{lines + 1}" in err
    code, _, err = run_dtbuild(ws, "build", "//images:too_small")
    assert code == 2
    assert f"images/BUILD:{lines + 2}" in err
    assert "the 'max_layers' attribute must be greater than 1" in err and "but was 1" in err


# --------------------------------------------------------------------------- reuse


def test_images_share_package_layers_and_a_change_rebuilds_only_its_layer(ws, run_dtbuild) -> None:
    first = run_dtbuild.build(ws, "//images:uses_app", "//images:uses_tool", check=True)
    app, tool = _description(ws, "images", "uses_app"), _description(ws, "images", "uses_tool")
    assert _layer_contents(ws, "images", "uses_app") == [["//pkgs:libc"], ["//pkgs:libssl"], ["//pkgs:libz"],
                                                         ["//pkgs:app"], "customisation"]
    assert _layer_contents(ws, "images", "uses_tool") == [["//pkgs:libc"], ["//pkgs:tool"], "customisation"]
    # libc's layer is the same blob in both images (gzip included).
    assert app["layers"][0] == tool["layers"][0]
    assert app["layers"][0]["media_type"].endswith("gzip")

    libz = ws / "pkgs" / "libz" / "usr" / "lib" / "libz" / "libz.txt"
    libz.write_text("libz 1.1\n")
    second = run_dtbuild.build(ws, "//images:uses_app", "//images:uses_tool", check=True)
    app2, tool2 = _description(ws, "images", "uses_app"), _description(ws, "images", "uses_tool")
    changed = [i for i, (a, b) in enumerate(zip(app["layers"], app2["layers"], strict=True)) if a != b]
    assert changed == [2]  # libz's layer; the customisation layer (mkdir var/log/app) is unaffected
    assert app2["manifest_digest"] != app["manifest_digest"]
    assert tool2 == tool
    # FilesTree, LayerWrite and LayerCompress of libz, the customisation layer (it sees
    # every package; its output did not change), the image tree, archive and layout.
    assert second.executed == 7, second.summary
    assert first.executed > 20


# "[3/7] LayerWrite //pkg:x 0.2s": one line per finished action, cache hits say "cached".
_ACTION_LINE = re.compile(r"^\[\d+/\d+\] (.+?)(?: \(\d+ files\))? \d+\.\ds$", re.MULTILINE)


def _executed(run) -> set[str]:
    """The descriptions of the actions a build executed, as its progress lines name them."""
    lines = _ACTION_LINE.findall(run.stderr)
    assert len(lines) == run.executed, run.stderr
    return set(lines)


def test_a_change_reruns_only_the_layer_that_holds_it(ws, run_dtbuild) -> None:
    build = ws / "images" / "BUILD"
    build.write_text(build.read_text() + '''
layered_image(name = "planned", tag = "v1", contents = ["//pkgs:app", "//pkgs:tool"], max_layers = 4)
layered_image(name = "custom", tag = "v1", contents = ["//pkgs:tool"], extra_commands = "mkdir -p var/cache")
''')
    run_dtbuild.build(ws, "//images:planned", "//images:custom", check=True)
    # Five packages, max_layers = 4: libc and libssl have a layer each, libz, app and
    # tool share the third, then the customisation layer.
    assert _layer_contents(ws, "images", "planned") == [["//pkgs:libc"], ["//pkgs:libssl"],
                                                        ["//pkgs:libz", "//pkgs:app", "//pkgs:tool"], "customisation"]
    before = _description(ws, "images", "planned")["layers"]

    def chain(image: str, layer_action: str, layer: int) -> set[str]:
        return {layer_action, f"LayerCompress //images:{image} layer {layer} (gz)",
                f"LayeredImageAssemble //images:{image}", f"DockerArchive //images:{image}",
                f"OciLayout //images:{image}"}

    # A package with a layer of its own: its layer only (custom has no libssl).
    (ws / "pkgs" / "libssl" / "usr" / "lib" / "libssl" / "libssl.txt").write_text("libssl 3.1\n")
    run = run_dtbuild.build(ws, "//images:planned", "//images:custom", check=True)
    assert _executed(run) == {"FilesTree //pkgs:libssl",
                              *chain("planned", "LayerWrite //images:planned //pkgs:libssl", 1)}
    after = _description(ws, "images", "planned")["layers"]
    assert [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b] == [1]

    # A package of the merged layer: that layer only, not the ones of the other packages.
    (ws / "pkgs" / "app" / "usr" / "lib" / "app" / "app.txt").write_text("app 1.1\n")
    run = run_dtbuild.build(ws, "//images:planned", "//images:custom", check=True)
    assert _executed(run) == {"FilesTree //pkgs:app",
                              *chain("planned", "LayerWrite //images:planned merged (3 packages)", 2)}
    again = _description(ws, "images", "planned")["layers"]
    assert [i for i, (a, b) in enumerate(zip(after, again, strict=True)) if a != b] == [2]

    # The customisation commands: the customisation layer only, not the package layers.
    build.write_text(build.read_text().replace("mkdir -p var/cache", "mkdir -p var/cache/tool"))
    run = run_dtbuild.build(ws, "//images:planned", "//images:custom", check=True)
    assert _executed(run) == chain("custom", "CustomisationLayer //images:custom", 2)
    (*_, custom) = _archive_layers(_out(ws, "images", "custom.tar.gz"))
    assert [m.name for m in custom.getmembers()] == ["var", "var/cache", "var/cache/tool"]


def test_on_a_built_base_the_layers_are_planned_at_analysis_too(ws, run_dtbuild) -> None:
    """//base:two_layers is built from known layers, so its layer count is known at
    analysis: a package change reruns that package's layer only, as without a base."""
    build = ws / "images" / "BUILD"
    build.write_text(build.read_text() + '''
layered_image(name = "planned_on_base", tag = "v1", from_image = "//base:two_layers",
              contents = ["//pkgs:app", "//pkgs:tool"], max_layers = 5)
''')
    run_dtbuild.build(ws, "//images:planned_on_base", check=True)
    # Two base layers, the customisation layer: two layers left, libc alone, the rest merged.
    base = [["//base:busybox"], ["//base:nss"]]
    assert _layer_contents(ws, "images", "planned_on_base") == [
        *base, ["//pkgs:libc"], ["//pkgs:libssl", "//pkgs:libz", "//pkgs:app", "//pkgs:tool"], "customisation"]
    before = _description(ws, "images", "planned_on_base")["layers"]
    (ws / "pkgs" / "libc" / "usr" / "lib" / "libc" / "libc.txt").write_text("libc 2.37\n")
    run = run_dtbuild.build(ws, "//images:planned_on_base", check=True)
    assert _executed(run) == {
        "FilesTree //pkgs:libc", "LayerWrite //images:planned_on_base //pkgs:libc",
        "LayerCompress //images:planned_on_base layer 0 (gz)", "LayeredImageAssemble //images:planned_on_base",
        "DockerArchive //images:planned_on_base", "OciLayout //images:planned_on_base"}
    after = _description(ws, "images", "planned_on_base")["layers"]
    assert [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b] == [2]


def test_outputs_are_reproducible(ws, run_dtbuild, tmp_path) -> None:
    run_dtbuild(ws, "build", "//images:runnable", check=True)
    other = tmp_path / "other"
    shutil.copytree(ws, other, symlinks=True, ignore=shutil.ignore_patterns("dtbuild-out"))
    run_dtbuild(other, "build", "//images:runnable", env={"DTBUILD_CACHE_DIR": str(tmp_path / "cache2")},
                check=True, umask=0o077)
    for name in ("runnable.json", "runnable.tar.gz"):
        assert _out(ws, "images", name).read_bytes() == _out(other, "images", name).read_bytes()


# --------------------------------------------------------------------------- real tools


def test_skopeo_umoci_and_runc_accept_a_layered_image(ws, run_dtbuild, require_tool, tmp_path) -> None:
    for tool in ("skopeo", "umoci", "runc", "fakeroot"):
        require_tool(tool)
    run_dtbuild(ws, "build", "//images:runnable", check=True)
    desc = _description(ws, "images", "runnable")
    plain = tmp_path / "runnable.tar"  # skopeo 1.9 reads no gzip-compressed docker-archive
    plain.write_bytes(gzip.decompress(_out(ws, "images", "runnable.tar.gz").read_bytes()))
    assert _skopeo("inspect", f"docker-archive:{plain}")["Layers"] == [layer["diff_id"] for layer in desc["layers"]]
    assert _skopeo("inspect", f"oci:{_out(ws, 'images', 'runnable.oci')}:v1")["Digest"] == desc["manifest_digest"]
    bundle = tmp_path / "bundle"
    _unpack(_out(ws, "images", "runnable.oci"), "v1", bundle)
    done = _runc(bundle)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "uid=65534(nobody) gid=65534(nobody) groups=65534(nobody)",  # fake_nss
        "uid=1000(app) gid=1000(app) groups=1000(app)",  # its extra lines
        "1000:1000 /app", "1000:1000 /app/greeting",  # fakeroot_commands' chown
        "app 1.0"]


@pytest.mark.parametrize("fakechroot", [False, True], ids=["fakeroot", "fakechroot"])
def test_fakeroot_chown_shows_in_the_layer_tar_headers(ws, run_dtbuild, require_tool, fakechroot) -> None:
    require_tool("fakeroot")
    if fakechroot:
        require_tool("proot")
        if os.geteuid() != 0:
            pytest.skip("enable_fakechroot runs the image's static busybox, whose chown is real: it needs root")
    path = "/app" if fakechroot else "app"
    (ws / "images" / "BUILD").write_text((ws / "images" / "BUILD").read_text() + f'''
layered_image(
    name = "chowned",
    contents = ["//pkgs:app", "//base:sh"],
    fakeroot_commands = "mkdir {path} && echo hi > {path}/note && chown 1000:1000 {path} && chmod 4750 {path}/note",
    enable_fakechroot = {fakechroot},
    uid = 5,
    compressor = "none",
)
''')
    run_dtbuild(ws, "build", "//images:chowned", check=True)
    members = {m.name: m for m in _archive_layers(_out(ws, "images", "chowned.tar"))[-1].getmembers()}
    assert sorted(members) == ["app", "app/note"]
    assert (members["app"].uid, members["app"].gid, members["app"].uname) == (1000, 1000, "")
    note = members["app/note"]
    # Created under fakeroot: owned by (fake) root; the chmod shows too.
    assert (note.uid, note.gid, note.mode, note.uname, note.gname) == (0, 0, 0o4750, "", "root")


# --------------------------------------------------------------------------- stream, inspect


def test_stream_writes_the_layered_archive_to_stdout(ws, run_dtbuild, require_tool, tmp_path) -> None:
    require_tool("skopeo")
    streamed = tmp_path / "max3.tar"
    with open(streamed, "wb") as out:
        proc = run_dtbuild.popen(ws, "stream", "//images:max3", stdout=out, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert not _out(ws, "images", "max3.tar").exists()  # nothing written but the image tree in the cache
    inspected = _skopeo("inspect", f"docker-archive:{streamed}:max3:v1")
    run_dtbuild(ws, "build", "//images:max3", check=True)
    assert inspected["Layers"] == [layer["diff_id"] for layer in _description(ws, "images", "max3")["layers"]]
    assert streamed.read_bytes() == _out(ws, "images", "max3.tar").read_bytes()


def test_inspect_shows_packages_sizes_and_file_counts(ws, run_dtbuild) -> None:
    code, out, err = run_dtbuild(ws, "inspect", "//images:max3")
    assert code == 0, err
    layers = out.split("layers (3):\n", 1)[1]
    assert "packages: //pkgs:libc\n" in layers
    assert "packages: //pkgs:libssl, //pkgs:libz, //pkgs:app, //pkgs:tool\n" in layers
    assert "customisation layer" in layers
    assert re.search(r"; 3\.\d kB uncompressed; 1 files, 3 directories", layers)
    assert re.search(r"; 4 files, 6 directories", layers)


# --------------------------------------------------------------------------- merge_images


def test_merged_images_load_with_every_tag_and_share_layers(ws, run_dtbuild, require_tool, tmp_path) -> None:
    for tool in ("skopeo", "umoci", "runc", "fakeroot"):
        require_tool(tool)
    run_dtbuild(ws, "build", "//images:merged", check=True)
    archive = _out(ws, "images", "merged.tar.zst")
    assert archive.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    diff_ids = set()
    for name in ("runnable", "tool_zstd", "tool_none"):  # gz, zstd and plain layers
        run_dtbuild(ws, "build", f"//images:{name}", check=True)
        diff_ids |= {layer["diff_id"] for layer in _description(ws, "images", name)["layers"]}
    for ref, name in (("runnable:v1", "runnable"), ("tool:zstd", "tool_zstd"), ("tool:none", "tool_none")):
        inspected = _skopeo("inspect", f"docker-archive:{archive}:{ref}")
        assert inspected["Layers"] == [layer["diff_id"] for layer in _description(ws, "images", name)["layers"]]
    import zstandard

    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(archive.read_bytes()), read_across_frames=True)
    with tarfile.open(fileobj=plain, mode="r|") as tar:
        layer_tars = [m.name for m in tar if m.name.endswith("/layer.tar")]
    assert len(layer_tars) == len(diff_ids)  # each shared layer once
    # The merged runnable image runs.
    layout = tmp_path / "from-merged"
    _skopeo("copy", f"docker-archive:{archive}:runnable:v1", f"oci:{layout}:v1")
    bundle = tmp_path / "bundle"
    _unpack(layout, "v1", bundle)
    done = _runc(bundle)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "uid=65534(nobody) gid=65534(nobody) groups=65534(nobody)"


def test_merging_two_images_with_one_tag_is_an_error(ws, run_dtbuild) -> None:
    build = ws / "images" / "BUILD"
    build.write_text(build.read_text() + '''
layered_image(name = "tool_zstd_again", image_name = "tool", tag = "zstd", contents = ["//pkgs:app"])
merge_images(name = "clash", images = [":tool_zstd", ":tool_zstd_again"])
''')
    code, _, err = run_dtbuild(ws, "build", "//images:clash")
    assert code == 1
    assert "the tag tool:zstd names two of the images (//images:tool_zstd and //images:tool_zstd_again)" in err


# --------------------------------------------------------------------------- export_image


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644, uid: int = 0,
            gid: int = 0, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.linkname, info.mtime = kind, mode, uid, gid, linkname, 7
    info.size = len(data)
    return info, data


def _handmade_archive() -> bytes:
    """A docker-archive of two layers; the second deletes /etc/gone and makes /opt/dir
    opaque."""
    d = tarfile.DIRTYPE
    lower = _tar_bytes([
        _member("etc/", d, mode=0o755), _member("etc/keep", data=b"kept\n"), _member("etc/gone", data=b"bye\n"),
        _member("opt/", d, mode=0o755), _member("opt/dir/", d, mode=0o750, uid=7, gid=8),
        _member("opt/dir/old", data=b"old\n"), _member("opt/dir/sub/", d, mode=0o755),
        _member("opt/dir/sub/older", data=b"older\n"),
        _member("srv/", d, mode=0o700, uid=33, gid=33), _member("srv/data", data=b"secret\n", mode=0o600, uid=33,
                                                                gid=33),
        _member("usr/", d, mode=0o755), _member("usr/lib/", d, mode=0o755),
        _member("usr/lib/link", tarfile.SYMTYPE, linkname="../../etc/keep", mode=0o777),
    ])
    upper = _tar_bytes([
        _member("etc/", d, mode=0o755), _member("etc/.wh.gone"),
        _member("opt/", d, mode=0o755), _member("opt/dir/", d, mode=0o750, uid=7, gid=8),
        _member("opt/dir/.wh..wh..opq"), _member("opt/dir/new", data=b"new\n", mode=0o755, uid=7, gid=8),
        _member("usr/", d, mode=0o755), _member("usr/bin/", d, mode=0o755),
        _member("usr/bin/tool", data=b"#!/bin/sh\n", mode=0o4755),
    ])
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in (lower, upper)]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/usr/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "history": [{"created_by": "lower"}, {"created_by": "upper"}]}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["handmade:1"],
                            "Layers": ["lower/layer.tar", "upper/layer.tar"]}]).encode()
    return _tar_bytes([_member("manifest.json", data=manifest), _member(config_name, data=config),
                       _member("lower/layer.tar", data=lower), _member("upper/layer.tar", data=upper)])


def test_export_image_equals_the_umoci_unpacked_root_filesystem(ws, run_dtbuild, require_tool, tmp_path) -> None:
    for tool in ("umoci", "fakeroot"):
        require_tool(tool)
    if os.geteuid() != 0:
        pytest.skip("umoci unpacks owners only as root")
    (ws / "export").mkdir()
    (ws / "export" / "handmade.tar").write_bytes(_handmade_archive())
    (ws / "export" / "BUILD").write_text('''
image_archive(name = "handmade", src = "handmade.tar")

layered_image(
    name = "on_handmade",
    tag = "v1",
    from_image = ":handmade",
    contents = ["//pkgs:tool"],
    fakeroot_commands = "mkdir -p srv2 && echo x > srv2/x && chown -R 9:9 srv2",
    compressor = "none",
)

export_image(name = "flat", from_image = ":on_handmade")
''')
    run_dtbuild(ws, "build", "//export:flat", "//export:on_handmade", check=True)
    exported = {}
    with tarfile.open(_out(ws, "export", "flat.tar")) as tar:
        for m in tar:
            content = tar.extractfile(m).read() if m.isfile() else (m.linkname if m.issym() else None)
            kind = "dir" if m.isdir() else "symlink" if m.issym() else "file"
            exported[m.name] = (kind, m.mode if kind != "symlink" else None, m.uid, m.gid, content)
            assert m.mtime == 1
    rootfs = _unpack(_out(ws, "export", "on_handmade.oci"), "v1", tmp_path / "bundle")
    unpacked = {}
    for path in sorted(rootfs.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(rootfs))
        if stat.S_ISLNK(st.st_mode):
            unpacked[rel] = ("symlink", None, st.st_uid, st.st_gid, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            unpacked[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, None)
        else:
            unpacked[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, path.read_bytes())
    assert exported == unpacked
    # What the whiteouts and the opaque directory did, and what is left.
    assert "etc/gone" not in exported and exported["etc/keep"][4] == b"kept\n"
    assert sorted(p for p in exported if p.startswith("opt/dir/")) == ["opt/dir/new"]
    assert exported["opt/dir"] == ("dir", 0o750, 7, 8, None)
    assert exported["srv/data"] == ("file", 0o600, 33, 33, b"secret\n")
    assert exported["usr/bin/tool"][1] == 0o4755
    assert exported["usr/lib/tool/tool.txt"][4] == b"tool 1.0\n"
    assert exported["srv2/x"][2:] == (9, 9, b"x\n")


# --------------------------------------------------------------------------- contents


def test_a_path_two_packages_provide_differently_is_an_error(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({
        "pkgs/one/etc/app.conf": "mode = 1\n", "pkgs/two/etc/app.conf": "mode = 2\n",
        "pkgs/same/etc/app.conf": "mode = 1\n",
        "pkgs/BUILD": "\n".join(f'files(name = "{n}", srcs = ["{n}/etc/app.conf"], strip_prefix = "{n}")'
                                for n in ("one", "two", "same")) + "\n"
                      'layered_image(name = "bad", contents = [":one", ":two"])\n'
                      'layered_image(name = "good", contents = [":one", ":same"])\n'})
    code, _, err = run_dtbuild(ws, "build", "//pkgs:bad")
    assert code == 1
    assert "pkgs/BUILD:4" in err
    assert "//pkgs:one and //pkgs:two both provide /etc/app.conf with different contents" in err
    run_dtbuild(ws, "build", "//pkgs:good", check=True)  # identical bytes are fine


def test_include_store_paths_false_keeps_only_the_customisation_layer(ws, run_dtbuild) -> None:
    (ws / "images" / "BUILD").write_text((ws / "images" / "BUILD").read_text() + '''
layered_image(
    name = "no_store",
    contents = ["//pkgs:app"],
    include_store_paths = False,
    extra_commands = "cat usr/lib/app/app.txt usr/lib/libc/libc.txt > made.txt",
    compressor = "none",
)
''')
    run_dtbuild(ws, "build", "//images:no_store", check=True)
    (layer,) = _archive_layers(_out(ws, "images", "no_store.tar"))
    assert [m.name for m in layer.getmembers()] == ["made.txt"]
    assert layer.extractfile("made.txt").read() == b"app 1.0\nlibc 1.0\n"


def test_helpers_in_a_layered_image(ws, run_dtbuild, require_tool) -> None:
    for tool in ("fakeroot", "proot"):
        require_tool(tool)
    run_dtbuild(ws, "build", "//helpers:helpers_root", "//helpers:helpers", check=True)
    with tarfile.open(_out(ws, "helpers", "helpers_root.tar")) as tar:
        files = {m.name: (tar.extractfile(m).read() if m.isfile() else m.linkname or None) for m in tar}
    # merge_trees: first's /etc, the tarball's /opt, second's /etc/motd over first's.
    assert files["etc/motd"] == b"second motd\n" and files["etc/app.conf"] == b"mode = first\n"
    assert files["opt/tool/README"] == b"from a tarball\n"
    # merge_trees(only_deps): no files of its own, but tool (and libc) came with it.
    assert files["usr/lib/tool/tool.txt"] == b"tool 1.0\n" and "usr/lib/libc/libc.txt" in files
    assert "helpers/tool_deps" not in files
    # ca_certificates, bin_sh, usr_bin_env.
    assert files["etc/ssl/certs/ca-certificates.crt"].startswith(b"-----BEGIN CERTIFICATE-----")
    assert files["etc/ssl/certs/ca-bundle.crt"] == "ca-certificates.crt"
    assert files["etc/pki/tls/certs/ca-bundle.crt"] == "/etc/ssl/certs/ca-certificates.crt"
    assert files["bin/sh"] == "/bin/busybox" and files["usr/bin/env"] == "/bin/env"
    # SHADOW_SETUP, run through proot with the image as /, made shadowSetup's files.
    assert files["etc/passwd"] == b"root:x:0:0::/root:/bin/sh\n"
    assert files["etc/shadow"] == b"root:!x:::::::\n"
    assert files["etc/group"] == b"root:x:0:\n" and files["etc/gshadow"] == b"root:x::\n"
    assert files["etc/pam.d/other"].startswith(b"account sufficient pam_unix.so\n")
    assert files["etc/login.defs"] == b""
    custom = _archive_layers(_out(ws, "helpers", "helpers.tar"))[-1]
    assert sorted(m.name for m in custom.getmembers()) == [
        "etc", "etc/group", "etc/gshadow", "etc/login.defs", "etc/pam.d", "etc/pam.d/other", "etc/passwd",
        "etc/shadow"]


def test_helper_attributes_are_checked(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"pkgs/BUILD": 'fake_nss(name = "nss", extra_passwd_lines = ["app:x:1000"])\n'
                                        'files(name = "empty")\n'
                                        'bin_sh(name = "sh", shell = ":empty")\n'})
    code, _, err = run_dtbuild(ws, "build", "//pkgs:nss")
    assert code == 2
    assert "pkgs/BUILD:1" in err and "'extra_passwd_lines' attribute holds 'app:x:1000'" in err
    code, _, err = run_dtbuild(ws, "build", "//pkgs:sh")
    assert code == 1
    assert "cannot tell which binary of //pkgs:empty /bin/sh should point to" in err and "'binary'" in err
