"""The built-ins are several plugins by feature, each from an entry point of the dtbuild
distribution and each blockable with ``-p no:NAME``; a plugin may replace a built-in
compressor when it says so (``REPLACES = True``); a plugin's compressor is read back
wherever archives are read (image_archive, merge_images, inspect).

Before: one plugin named ``builtin`` (``-p no:images`` blocked nothing, ``-p no:builtin``
everything), a second ``gz`` was always an error, and archives and layouts were read
with a hard-coded table of gz and zstd, so an xz archive was "not a readable none tar".
"""

from __future__ import annotations

import io
import json
import lzma
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BUILTIN = ("core", "images", "layered", "root_layers", "registries", "compressors", "executors", "debian")

MIXED_BUILD = """
genrule(name = "gen", outs = ["gen.txt"], cmd = "echo generated > $OUT")
files(name = "site", srcs = ["index.html"], prefix = "/srv")
image(name = "img", tag = "v1", copy_to_root = [":site"], compressor = "none")
layered_image(name = "layered", tag = "v1", contents = [":site"], compressor = "none")
"""


def _section(out: str, section: str) -> dict[str, str]:
    """name -> the rest of the line, for one top-level section of ``dtbuild plugins``."""
    found: dict[str, str] = {}
    inside = False
    for line in out.splitlines():
        if not line.startswith(" "):
            inside = line.rstrip(":") == section
        elif inside and not line.startswith("      "):
            name, _, rest = line.strip().partition("  ")
            found[name] = rest
    return found


def test_plugins_lists_each_builtin_plugin_with_its_distribution(write_workspace, run_dtbuild) -> None:
    from importlib.metadata import version

    ws = write_workspace({"pkg/BUILD": MIXED_BUILD, "pkg/index.html": "<p>hi</p>\n"})
    _, out, _ = run_dtbuild(ws, "plugins", check=True)
    plugins = _section(out, "plugins")
    for name in BUILTIN:
        assert name in plugins, out
        assert f"builtin, dtbuild {version('dtbuild')}" in plugins[name], out
    assert "builtin" not in plugins, out
    lines = out.splitlines()
    images = lines.index(next(line for line in lines if line.startswith("  images  ")))
    assert lines[images + 1].split(":", 1)[0].strip() == "rules", out
    assert "image, image_archive, pure_layer" in lines[images + 1], out
    assert _section(out, "rules")["genrule"].startswith("[core"), out
    assert _section(out, "compressors")["gz"].startswith("[compressors"), out


def test_blocking_images_still_builds_a_genrule_next_to_image_targets(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"pkg/BUILD": MIXED_BUILD, "pkg/index.html": "<p>hi</p>\n"})
    code, _, err = run_dtbuild(ws, "build", "-p", "no:images", "//pkg:gen")
    assert code == 0, err
    assert (ws / "dtbuild-out" / "pkg" / "gen.txt").read_text() == "generated\n"

    code, _, err = run_dtbuild(ws, "build", "-p", "no:images", "//pkg:img")
    assert code == 2, err
    assert "the rule image comes from the built-in plugin 'images', which is blocked with -p no:images" in err
    assert "Traceback" not in err
    # layered needs images: it is not loaded either, and says why.
    code, _, err = run_dtbuild(ws, "build", "-p", "no:images", "//pkg:layered")
    assert code == 2 and "plugin 'layered', which is not loaded: it needs the plugin 'images'" in err, err
    assert "hint: build without -p no:images" in err, err

    _, out, _ = run_dtbuild(ws, "plugins", "-p", "no:images", check=True)
    plugins = _section(out, "plugins")
    assert "blocked with -p no:images" in plugins["images"], out
    assert "not loaded" in plugins["layered"] and "not loaded" in plugins["root_layers"], out
    assert "unavailable" in _section(out, "rules")["image"], out

    # Every built-in at once, as before.
    code, _, err = run_dtbuild(ws, "build", "-p", "no:builtin", "//pkg:gen")
    assert code == 2 and "blocked with -p no:builtin" in err, err


REPLACING_GZ = '''
"""A workspace gz: the built-in one under another class, replacing it."""
from dtbuild.plugins import hookimpl
from dtbuild.plugins.builtin.compressors import GzipCompressor


class MyGzip(GzipCompressor):
    {replaces}
    VERSION = "mine"


@hookimpl
def dtbuild_register_compressors():
    return [MyGzip]
'''


@pytest.mark.parametrize("replaces", [True, False])
def test_a_workspace_plugin_replaces_the_gz_compressor_only_when_it_says_so(write_workspace, run_dtbuild,
                                                                             replaces: bool) -> None:
    ws = write_workspace({
        "tools/mygz.py": REPLACING_GZ.format(replaces="REPLACES = True" if replaces else "pass"),
        "pkg/BUILD": 'files(name = "site", srcs = ["index.html"], prefix = "/srv")\n'
                     'image(name = "img", tag = "v1", copy_to_root = [":site"], compressor = "gz")\n',
        "pkg/index.html": "<p>hi</p>\n",
    }, config='[plugins]\nmodules = ["tools/mygz.py"]\n')
    if not replaces:
        code, _, err = run_dtbuild(ws, "plugins")
        assert code == 2, err
        assert "two plugins register compressor 'gz'" in err and "GzipCompressor" in err and "MyGzip" in err, err
        assert "REPLACES = True" in err, err
        return
    _, out, _ = run_dtbuild(ws, "plugins", check=True)
    gz = _section(out, "compressors")["gz"]
    assert gz.startswith("[workspace:tools/mygz.py") and "replaces the one of 'compressors'" in gz, out
    run_dtbuild.build(ws, "//pkg:img", check=True)
    assert (ws / "dtbuild-out" / "pkg" / "img.tar.gz").read_bytes()[:2] == b"\x1f\x8b"


XZ_PLUGIN = '''
"""A workspace compressor: xz through Python's lzma."""
import io
import lzma

from dtbuild.plugins import hookimpl
from dtbuild.plugins.interfaces import Compressor


class _Writer(io.RawIOBase):
    def __init__(self, sink):
        self._sink = sink
        self._xz = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=1)

    def writable(self):
        return True

    def write(self, data):
        self._sink.write(self._xz.compress(bytes(data)))
        return len(data)

    def close(self):
        if not self.closed:
            self._sink.write(self._xz.flush())
        super().close()


class Xz(Compressor):
    NAME = "xz"
    EXTENSION = ".xz"
    OCI_LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+xz"
    DOCKER_LAYER_MEDIA_TYPE = None
    MAGIC = b"\\xfd7zXZ\\x00"

    def compress_to(self, sink):
        return _Writer(sink)

    def decompress_from(self, source):
        return lzma.LZMAFile(source, "rb")  # reads concatenated streams


@hookimpl
def dtbuild_register_compressors():
    return [Xz]
'''

XZ_BUILD = """
files(name = "site", srcs = glob(["site/**"]), strip_prefix = "site", prefix = "/srv")
files(name = "more", srcs = ["more.txt"], prefix = "/etc")
image(name = "img", tag = "v1", copy_to_root = [":site"], compressor = "xz")
# The image's own docker-archive (NAME.tar.xz), picked out of its outputs.
genrule(name = "img_tar", srcs = [":img"], outs = ["img-copy.tar.xz"],
        cmd = "for f in $SRCS; do case $f in *.tar.xz) cp $f $OUT_DIR/img-copy.tar.xz;; esac; done")
image_archive(name = "from_archive", src = ":img_tar")
image(name = "derived", tag = "v2", from_image = ":from_archive", copy_to_root = [":more"], compressor = "xz")
merge_images(name = "merged", images = [":img", ":derived"], compressor = "xz")
image_archive(name = "from_merged", src = ":merged", index = 1)
"""


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(archive.read_bytes()))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_a_workspace_compressor_is_read_back_by_image_archive_merge_images_and_inspect(
        write_workspace, run_dtbuild) -> None:
    site = {f"pkg/site/page{i}.html": f"<p>page {i}</p>\n" * 50 for i in range(3)}
    ws = write_workspace({"tools/xz.py": XZ_PLUGIN, "pkg/BUILD": XZ_BUILD, "pkg/more.txt": "more\n", **site},
                         config='[plugins]\nmodules = ["tools/xz.py"]\n')
    run_dtbuild.build(ws, "//pkg:img", "//pkg:from_archive", "//pkg:derived", "//pkg:merged", "//pkg:from_merged",
                      check=True)
    out = ws / "dtbuild-out" / "pkg"
    img = json.loads((out / "img.json").read_text())
    assert [layer["media_type"] for layer in img["layers"]] == ["application/vnd.oci.image.layer.v1.tar+xz"]
    # The archive is xz as a whole, and its layer is the image's layer.
    assert (out / "img.tar.xz").read_bytes().startswith(b"\xfd7zXZ\x00")
    members = _members(out / "img.tar.xz")
    manifest = json.loads(members["manifest.json"])
    assert len(manifest) == 1 and manifest[0]["RepoTags"] == ["img:v1"]

    imported = json.loads((out / "from_archive.json").read_text())
    assert [layer["diff_id"] for layer in imported["layers"]] == [layer["diff_id"] for layer in img["layers"]]
    derived = json.loads((out / "derived.json").read_text())
    assert [layer["diff_id"] for layer in derived["layers"]][:1] == [img["layers"][0]["diff_id"]]
    assert len(derived["layers"]) == 2
    from_merged = json.loads((out / "from_merged.json").read_text())
    assert [layer["diff_id"] for layer in from_merged["layers"]] == [layer["diff_id"] for layer in derived["layers"]]
    merged = _members(out / "merged.tar.xz")
    assert [entry["RepoTags"] for entry in json.loads(merged["manifest.json"])] == [["img:v1"], ["derived:v2"]]

    for target in ("//pkg:img", "//pkg:from_archive", "//pkg:derived", "//pkg:from_merged"):
        code, shown, err = run_dtbuild(ws, "inspect", target)
        assert code == 0, err
        assert "layers (" in shown and "holds: /srv (" in shown, shown
    _, shown, _ = run_dtbuild(ws, "inspect", "//pkg:img", check=True)
    assert "application/vnd.oci.image.layer.v1.tar+xz" in shown, shown


def test_a_workspace_compressor_layout_is_read_back(write_workspace, run_dtbuild) -> None:
    """An OCI layout whose layers are xz blobs: told by their media type and magic."""
    site = {"pkg/site/index.html": "<p>layout</p>\n" * 40}
    ws = write_workspace({"tools/xz.py": XZ_PLUGIN, **site, "pkg/BUILD": """
files(name = "site", srcs = glob(["site/**"]), strip_prefix = "site", prefix = "/srv")
image(name = "img", tag = "v1", copy_to_root = [":site"], compressor = "xz")
"""}, config='[plugins]\nmodules = ["tools/xz.py"]\n')
    run_dtbuild.build(ws, "//pkg:img", check=True)
    vendor = ws / "vendor"
    vendor.mkdir()
    import shutil

    shutil.copytree(ws / "dtbuild-out" / "pkg" / "img.oci", vendor / "layout")
    (vendor / "BUILD").write_text(
        'files(name = "layout_tree", srcs = glob(["layout/**"]), strip_prefix = "layout")\n'
        'image_archive(name = "base", src = ":layout_tree")\n')
    run_dtbuild.build(ws, "//vendor:base", check=True)
    base = json.loads((ws / "dtbuild-out" / "vendor" / "base.json").read_text())
    img = json.loads((ws / "dtbuild-out" / "pkg" / "img.json").read_text())
    assert base["layers"] == img["layers"]
