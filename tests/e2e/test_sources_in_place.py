"""Sources are read in place, never copied into the cache, and ``dtbuild-out/`` holds
read-only hard links to the cache's blobs: the bytes of an image are the same, a source
edited while the build reads it fails that action clearly, and an output edited by hand
never makes the cache serve the edited bytes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

#: The mtime the store gives every blob (engine/store.py SENTINEL_MTIME_NS).
SENTINEL_MTIME_NS = 10**18

HELLO = b"hello from a layer\n"
TOOL = b"#!/bin/sh\necho hi\n"

IMAGE_BUILD = ('files(name = "data", srcs = ["hello.txt", "bin/tool"], prefix = "/app")\n'
               'image(name = "img", tag = "v1", copy_to_root = [":data"], compressor = "gz")\n')

#: name.json of //app:img as dtbuild wrote it when it copied sources into the cache.
IMAGE_DIGESTS = {
    "manifest_digest": "sha256:f7ef3525fafafdb55e412f4a2fb26121c70e7a07aa3ec1f702b2a006f9148384",
    "config_digest": "sha256:8641d92ff3d18f36d92e229769ed030436e083652272249bfc76aecfb6934426",
    "layers": [{"diff_id": "sha256:e9ea29c8d5b7eab6116122e39ecba0801aa49b8ca754d97934b2d8a258e037e9",
                "digest": "sha256:6d57e4658026f8a476df661fbd6d0f290c5285e2aa97e469b982015e7429b458",
                "media_type": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 224}],
}

#: A workspace plugin whose action kind edits a source of its input tree after the
#: build digested it and before it reads it: a source edited while the build runs.
TAMPER_PLUGIN = '''
from dtbuild.plugins import hookimpl
from dtbuild.plugins.interfaces import ActionKind
from dtbuild.rules import attrs
from dtbuild.rules.api import rule
from dtbuild.rules.providers import DefaultInfo


def _impl(ctx):
    out = ctx.declare_file(ctx.name + ".txt")
    ctx.actions.declare("Tamper", inputs={"srcs": ctx.files("srcs")}, outputs={"out": out},
                        params={"victim": ctx.attr.victim})
    return [DefaultInfo(files=(out,))]


tamper = rule("tamper", _impl, doc="Concatenates the files of trees, editing one first.", attrs={
    "srcs": attrs.label_list(doc="Trees whose files are read.", default=[]),
    "victim": attrs.string(doc="Absolute path of a file to edit before reading (empty: none)."),
})


class Tamper(ActionKind):
    NAME = "Tamper"
    VERSION = "1"

    def run(self, ctx):
        victim = ctx.params["victim"]
        if victim:
            with open(victim, "ab") as f:
                f.write(b"edited while the build ran\\n")
        with open(ctx.output_path("out"), "wb") as out:
            for art in ctx.inputs("srcs"):
                for entry in ctx.walk_tree(art):
                    if entry.kind == "file":
                        with ctx.open_blob(entry.digest) as f:
                            out.write(f.read())


@hookimpl
def dtbuild_register_rules():
    return [tamper]


@hookimpl
def dtbuild_register_action_kinds():
    return [Tamper]
'''


def _image_ws(write_workspace) -> Path:
    ws = write_workspace({"app/hello.txt": HELLO, "app/bin/tool": TOOL, "app/BUILD": IMAGE_BUILD})
    os.chmod(ws / "app/bin/tool", 0o755)
    return ws


def _cas_files(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (cache / "cas").glob("*/*")}


def _is_directory_node(data: bytes) -> bool:
    try:
        node = json.loads(data)
    except ValueError:
        return False
    return isinstance(node, dict) and {"files", "directories", "symlinks"} <= set(node)


def _blob(cache: Path, data: bytes) -> Path:
    digest = hashlib.sha256(data).hexdigest()
    return cache / "cas" / digest[:2] / digest


def test_a_files_target_puts_no_source_bytes_into_the_cache(write_workspace, run_dtbuild, cache_dir) -> None:
    ws = _image_ws(write_workspace)
    result = run_dtbuild.build(ws, "//app:data", check=True)
    assert result.executed == 1
    blobs = _cas_files(cache_dir)
    # Only the tree's Directory nodes (root, app, app/bin) entered the cache.
    assert len(blobs) == 3 and all(_is_directory_node(data) for data in blobs.values()), blobs
    for source in (HELLO, TOOL):
        assert hashlib.sha256(source).hexdigest() not in blobs
    # The output tree holds copies of the sources: never links to workspace files.
    out = ws / "dtbuild-out/app/data/app"
    assert (out / "hello.txt").read_bytes() == HELLO
    assert (out / "bin/tool").read_bytes() == TOOL
    for rel in ("hello.txt", "bin/tool"):
        assert os.stat(out / rel).st_ino != os.stat(ws / "app" / rel).st_ino
        assert os.stat(out / rel).st_nlink == 1
    assert stat.S_IMODE(os.stat(out / "bin/tool").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(out / "hello.txt").st_mode) == 0o444
    # A second build reads nothing again and executes nothing.
    again = run_dtbuild.build(ws, "//app:data", check=True)
    assert (again.executed, again.cached) == (0, 1)


def test_an_image_of_sources_read_in_place_is_byte_identical(write_workspace, run_dtbuild, cache_dir) -> None:
    ws = _image_ws(write_workspace)
    run_dtbuild.build(ws, "//app:img", check=True)
    described = json.loads((ws / "dtbuild-out/app/img.json").read_text())
    assert {k: described[k] for k in IMAGE_DIGESTS} == IMAGE_DIGESTS
    blobs = _cas_files(cache_dir)
    for source in (HELLO, TOOL):
        assert hashlib.sha256(source).hexdigest() not in blobs


def test_outputs_are_read_only_hard_links_to_the_cache(write_workspace, run_dtbuild, cache_dir) -> None:
    ws = _image_ws(write_workspace)
    run_dtbuild.build(ws, "//app:img", check=True)
    out = ws / "dtbuild-out/app"
    linked = [out / "img.tar.gz", out / "img.json", *sorted((out / "img.oci/blobs/sha256").iterdir())]
    for path in linked:
        st = os.stat(path)
        blob = os.stat(_blob(cache_dir, path.read_bytes()))
        assert (st.st_ino, st.st_dev) == (blob.st_ino, blob.st_dev), path
        assert st.st_nlink > 1
        assert stat.S_IMODE(st.st_mode) == 0o444


def test_an_executable_output_is_a_read_only_copy(write_workspace, run_dtbuild, cache_dir) -> None:
    """Linked files share the blob's mode (0444): an executable output cannot, so it is
    a copy, and the same bytes as a plain output elsewhere are still a link."""
    ws = write_workspace({"pkg/BUILD": (
        'genrule(name = "tool", outs = ["tool.sh"], cmd = "printf \'#!/bin/sh\\\\n\' > $OUT; chmod +x $OUT")\n'
        'genrule(name = "plain", outs = ["plain.sh"], cmd = "printf \'#!/bin/sh\\\\n\' > $OUT")\n')})
    run_dtbuild.build(ws, "//pkg:all", check=True)
    tool, plain = ws / "dtbuild-out/pkg/tool.sh", ws / "dtbuild-out/pkg/plain.sh"
    assert tool.read_bytes() == plain.read_bytes() == b"#!/bin/sh\n"
    blob = os.stat(_blob(cache_dir, b"#!/bin/sh\n"))
    assert stat.S_IMODE(blob.st_mode) == 0o444
    assert stat.S_IMODE(os.stat(tool).st_mode) == 0o555
    assert os.stat(tool).st_ino != blob.st_ino
    assert os.stat(plain).st_ino == blob.st_ino
    assert stat.S_IMODE(os.stat(plain).st_mode) == 0o444


@pytest.mark.parametrize("forge", [False, True], ids=["edited", "edited-behind-restored-mtime-and-mode"])
def test_an_output_edited_by_hand_never_reaches_a_later_build(write_workspace, run_dtbuild, cache_dir,
                                                              forge) -> None:
    """dtbuild-out/pkg/gen.txt is the cache's blob: a user makes it writable and edits
    it (and, the worst case, restores its mtime and mode). A consumer built later still
    reads what the genrule wrote, and so does dtbuild-out."""
    ws = write_workspace({"pkg/BUILD": (
        'genrule(name = "gen", outs = ["gen.txt"], cmd = "echo generated > $OUT")\n'
        'genrule(name = "use", srcs = [":gen"], outs = ["use.txt"], cmd = "cat $SRCS > $OUT; echo used >> $OUT")\n')})
    run_dtbuild.build(ws, "//pkg:gen", check=True)
    gen = ws / "dtbuild-out/pkg/gen.txt"
    blob = _blob(cache_dir, b"generated\n")
    assert os.stat(gen).st_ino == os.stat(blob).st_ino
    os.chmod(gen, 0o644)
    gen.write_bytes(b"forgedxxx\n")  # same size
    if forge:
        os.chmod(gen, 0o444)
        os.utime(gen, ns=(SENTINEL_MTIME_NS, SENTINEL_MTIME_NS))

    result = run_dtbuild.build(ws, "//pkg:use")

    assert result.exit_code == 0, result.stderr
    assert (ws / "dtbuild-out/pkg/use.txt").read_bytes() == b"generated\nused\n"
    # use ran, and gen again to write its blob again: found changed when the build
    # checked the cached result (its mtime) or, behind a forged mtime, when use read it.
    assert result.executed + result.summary["actions"].get("rewound", 0) == 2, result.stderr
    assert blob.read_bytes() == b"generated\n"
    again = run_dtbuild.build(ws, "//pkg:gen", check=True)
    assert again.executed == 0
    assert gen.read_bytes() == b"generated\n"


def _tamper_ws(write_workspace) -> Path:
    ws = write_workspace({"tools/tamper.py": TAMPER_PLUGIN, "pkg/a.txt": "alpha\n", "pkg/b.txt": "beta\n"},
                         config='[plugins]\nmodules = ["tools/tamper.py"]\n')
    (ws / "pkg/BUILD").write_text(
        'files(name = "tree", srcs = ["a.txt", "b.txt"])\n'
        f'tamper(name = "cat", srcs = [":tree"], victim = "{ws / "pkg/a.txt"}")\n'
        'tamper(name = "plain", srcs = [":tree"], victim = "")\n')
    return ws


def test_a_source_edited_while_the_build_reads_it_fails_that_action(write_workspace, run_dtbuild,
                                                                     cache_dir) -> None:
    ws = _tamper_ws(write_workspace)
    failed = run_dtbuild.build(ws, "//pkg:cat")
    assert failed.exit_code == 1
    assert "Traceback" not in failed.stderr
    assert "Tamper failed: source pkg/a.txt changed while the build read it" in failed.stderr, failed.stderr
    assert "run the build again" in failed.stderr
    assert not (ws / "dtbuild-out/pkg/cat.txt").exists()
    # Nothing of the edited file entered the cache.
    edited = (ws / "pkg/a.txt").read_bytes()
    assert edited == b"alpha\nedited while the build ran\n"
    assert hashlib.sha256(edited).hexdigest() not in _cas_files(cache_dir)
    # The next build reads the file as it is now: right bytes (a plain reader here).
    ok = run_dtbuild.build(ws, "//pkg:plain", check=True)
    assert ok.executed >= 1
    assert (ws / "dtbuild-out/pkg/plain.txt").read_bytes() == edited + b"beta\n"


def test_a_source_replaced_by_a_symlink_after_it_was_digested_is_not_followed(write_workspace, run_dtbuild,
                                                                              tmp_path) -> None:
    """Sources are opened with O_NOFOLLOW: a source that became a symlink to a host
    file between digest and read fails the reader instead of reading the host file."""
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret\n")
    ws = _tamper_ws(write_workspace)
    plugin = ws / "tools/tamper.py"
    plugin.write_text(plugin.read_text().replace(
        '            with open(victim, "ab") as f:\n                f.write(b"edited while the build ran\\n")\n',
        f'            os.unlink(victim)\n            os.symlink({str(secret)!r}, victim)\n').replace(
        "from dtbuild.plugins import hookimpl", "import os\n\nfrom dtbuild.plugins import hookimpl"))
    failed = run_dtbuild.build(ws, "//pkg:cat")
    assert failed.exit_code == 1
    assert "source pkg/a.txt changed while the build read it" in failed.stderr, failed.stderr
    assert "host secret" not in failed.stderr


def test_a_stale_copy_of_a_source_in_an_old_cache_is_read_again_from_the_workspace(
        write_workspace, run_dtbuild, cache_dir) -> None:
    """A cache written by a dtbuild that copied sources in may hold a copy of one that
    is now corrupt: the build notices when it reads it, drops it and reads the file."""
    ws = _image_ws(write_workspace)
    run_dtbuild.build(ws, "//app:data", check=True)
    old_copy = _blob(cache_dir, HELLO)
    old_copy.parent.mkdir(exist_ok=True)
    old_copy.write_bytes(b"hello from a laye!\n")  # same size, wrong bytes
    os.chmod(old_copy, 0o444)
    os.utime(old_copy, ns=(SENTINEL_MTIME_NS, SENTINEL_MTIME_NS))
    out = ws / "dtbuild-out"
    for path in sorted(out.rglob("*"), reverse=True):
        if ".dtbuild" not in path.parts:
            os.chmod(path, 0o755) if path.is_dir() else path.unlink()
    build = run_dtbuild.build(ws, "//app:data")
    assert build.exit_code == 0, build.stderr
    assert "read again from the workspace" in build.stderr, build.stderr
    assert (out / "app/data/app/hello.txt").read_bytes() == HELLO
    assert not old_copy.exists()
