"""Fuzzing the readers of untrusted input: tars, docker-archives, OCI layouts (as a tar
and as a directory), manifests and configs, layer tars, and BUILD files.

Each test builds valid examples itself, then Hypothesis mutates them (bytes flipped,
cut short, random bytes inserted; JSON fields replaced by values of other types or
dropped; tar members duplicated, renamed to hostile names, given other types and link
targets) or makes random ones, and feeds them to the reader in-process. A reader may
refuse its input only with dtbuild's own errors: ``ValueError`` subclasses
(``UnsafeArchive``, ``ImageFormatError``, ``ContentConflict``, ``UpperDirError``),
``ActionFailed`` and ``DtbuildError``. Anything else (TypeError, KeyError, IndexError,
AttributeError, RecursionError, a decompressor's own error) is a bug, and so is a hang
(each test has a pytest-timeout).

Budget: ``DTBUILD_FUZZ_EXAMPLES`` examples per test (200 by default, so the suite stays
fast); CI runs this directory again with 2000 (scripts/test.sh). The examples are the
same on every run (derandomized), so a red CI run is reproducible and names a real bug
of the commit's own; ``DTBUILD_FUZZ_RANDOM=1`` draws new ones, for hunting.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dtbuild.engine.errors import DtbuildError
from dtbuild.plugins.builtin import imageformat, tar_extract
from dtbuild.plugins.builtin.compressors import GzipCompressor, NoneCompressor, ZstdCompressor
from dtbuild.plugins.interfaces import ActionFailed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("DTBUILD_FUZZ_EXAMPLES", "200"))
#: No per-example deadline: on a loaded 2-core CI machine a slow example is no bug, and a
#: timing-dependent failure is no reproducible one. The whole test's pytest-timeout
#: catches a real hang.
DEADLINE_MS = None
TIMEOUT_S = 120 + EXAMPLES // 4

FUZZ = settings(max_examples=EXAMPLES, deadline=DEADLINE_MS, database=None,
                derandomize=os.environ.get("DTBUILD_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
pytestmark = pytest.mark.timeout(TIMEOUT_S)

EXPECTED: tuple[type[BaseException], ...] = (ValueError, ActionFailed, DtbuildError)


def refused_cleanly(read: Callable[[], Any]) -> None:
    """Run ``read``; any exception but dtbuild's own fails the test (with its traceback)."""
    try:
        read()
    except EXPECTED as e:
        assert str(e), f"{type(e).__name__} without a message"
        assert not isinstance(e, UnicodeError | json.JSONDecodeError) or isinstance(
            e, imageformat.ImageFormatError), f"a raw {type(e).__name__} escaped: {e}"


# --------------------------------------------------------------------------- valid seeds


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644, linkname: str = "",
          uid: int = 0) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.uid = kind, mode, linkname, uid
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mtime = 1
    return info, data


def seed_tar() -> bytes:
    return _tar([
        _info("./", tarfile.DIRTYPE, mode=0o755), _info("etc/", tarfile.DIRTYPE, mode=0o755),
        _info("etc/motd", data=b"welcome\n"), _info("bin/su", data=b"\x7fELF" + bytes(40), mode=0o4755),
        _info("bin/login", tarfile.LNKTYPE, linkname="bin/su"), _info("lib", tarfile.SYMTYPE, linkname="usr/lib"),
        _info("dev/null", tarfile.CHRTYPE, mode=0o666), _info("etc/.wh.old"), _info("srv/.wh..wh..opq"),
        _info("long/" + "n" * 150, data=b"long name through a PAX header"),
    ])


def seed_layer() -> bytes:
    return _tar([_info("etc/", tarfile.DIRTYPE, mode=0o755), _info("etc/hostname", data=b"box\n"),
                 _info("usr/bin/tool", data=b"#!/bin/sh\necho hi\n", mode=0o755),
                 _info("usr/bin/alias", tarfile.LNKTYPE, linkname="usr/bin/tool"),
                 _info("etc/.wh.gone")])


def _image_pieces() -> tuple[bytes, bytes, str]:
    layer = seed_layer()
    diff_id = imageformat.sha256_digest(layer)
    config = imageformat.make_config("amd64", "linux", {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}, [diff_id],
                                     [{"created_by": "fuzz seed"}], "1970-01-01T00:00:01Z")
    return layer, config, diff_id


def seed_docker_archive(compressor: Any = None) -> bytes:
    layer, config, diff_id = _image_pieces()
    image = imageformat.ArchiveImage(config=config, repo_tags=["fuzz/app:1"], layers=[imageformat.ArchiveLayer(
        diff_id=diff_id, tar_size=len(layer), open_tar=lambda: io.BytesIO(layer))])
    out = io.BytesIO()
    imageformat.write_docker_archive(out, [image], compressor or NoneCompressor())
    return out.getvalue()


def seed_oci_layout(dest: Path) -> None:
    """An OCI layout directory with one image whose layer is gzip-compressed."""
    layer, config, _ = _image_pieces()
    blob = io.BytesIO()
    with GzipCompressor(threads=1).compress_to(blob) as sink:
        sink.write(layer)
    blob_bytes = blob.getvalue()
    blob_digest = imageformat.sha256_digest(blob_bytes)
    descriptor = (blob_digest, len(blob_bytes), GzipCompressor.OCI_LAYER_MEDIA_TYPE)
    manifest = imageformat.make_manifest(imageformat.sha256_digest(config), len(config), [descriptor], oci=True)

    def place(digest: str, path: str) -> None:
        Path(path).write_bytes(blob_bytes)

    imageformat.write_oci_layout(str(dest), [imageformat.OciImage(manifest, config, ["fuzz/app:1"])], place)


def directory_as_tar(root: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
    return out.getvalue()


def tar_members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The members of a valid tar (a seed), with their bytes, to mutate member-wise."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            content = tar.extractfile(info) if info.isreg() else None
            out.append((info, content.read() if content is not None else b""))
    return out


_SEEDS: dict[str, Any] = {}


def seeds() -> dict[str, Any]:
    """Every seed, made once per process."""
    if not _SEEDS:
        with tempfile.TemporaryDirectory() as tmp:
            layout = Path(tmp) / "layout"
            seed_oci_layout(layout)
            _SEEDS["oci_tar"] = directory_as_tar(layout)
            _SEEDS["oci_files"] = {str(p.relative_to(layout)): p.read_bytes()
                                   for p in sorted(layout.rglob("*")) if p.is_file()}
        _SEEDS["tar"] = seed_tar()
        _SEEDS["layer"] = seed_layer()
        _SEEDS["docker"] = seed_docker_archive()
        _SEEDS["docker_gz"] = seed_docker_archive(GzipCompressor(threads=1))
        _SEEDS["docker_zstd"] = seed_docker_archive(ZstdCompressor(threads=1))
        docker = {info.name: data for info, data in tar_members(_SEEDS["docker"])}
        _SEEDS["docker_members"] = docker
        config_name = next(n for n in docker if n.endswith(".json") and n != "manifest.json" and "/" not in n)
        oci = _SEEDS["oci_files"]
        index = json.loads(oci["index.json"])
        manifest_name = "blobs/sha256/" + index["manifests"][0]["digest"].removeprefix("sha256:")
        manifest = json.loads(oci[manifest_name])
        _SEEDS["documents"] = {
            "config": json.loads(docker[config_name]), "docker_manifest": json.loads(docker["manifest.json"]),
            "index": index, "manifest": manifest,
        }
    return _SEEDS


# --------------------------------------------------------------------------- mutations

HOSTILE_NAMES = ["../escape", "/etc/passwd", "a/../../b", "", ".", "./", "a\x00b", "x/" * 60 + "deep",
                 "manifest.json", "index.json", "oci-layout", "etc", "etc/motd/below", "lib/x", "bin/su",
                 "blobs/sha256/" + "0" * 64, "\x1b[31mred", "é/ü", "a" * 300]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.sampled_from(["sha256:" + "0" * 64, "sha256:xyz", "../../etc/passwd"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10)


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few byte flips, a cut, an insertion or a repeated slice."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        op = draw(st.sampled_from(["flip", "flip", "cut", "insert", "repeat", "zero"]))
        pos = draw(st.integers(0, len(out) - 1))
        if op == "flip":
            out[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "repeat":
            end = min(len(out), pos + draw(st.integers(1, 1024)))
            out[pos:pos] = out[pos:end]
        else:
            end = min(len(out), pos + draw(st.integers(1, 512)))
            out[pos:end] = bytes(end - pos)
    return bytes(out)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for number, child in enumerate(value):
            yield from _paths(child, (*prefix, number))


@st.composite
def mutated_json(draw: st.DrawFn, document: Any) -> Any:
    """``document`` with one to three fields replaced by random values (often of
    another type), dropped, or their lists emptied."""
    doc = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        replacement = draw(json_values)
        if not path:
            doc = replacement
            continue
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = replacement
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation changed the shape under this path
    return doc


@st.composite
def json_bytes(draw: st.DrawFn, document: Any) -> bytes:
    """A mutated document as bytes: re-encoded, sometimes with its bytes mutated too,
    or deeply nested."""
    choice = draw(st.sampled_from(["json", "json", "json", "bytes", "nested"]))
    if choice == "nested":
        return b"[" * draw(st.integers(100, 100_000)) + b"]" * draw(st.integers(0, 10))
    data = json.dumps(draw(mutated_json(document))).encode()
    return draw(mutated_bytes(data)) if choice == "bytes" else data


@st.composite
def mutated_tar(draw: st.DrawFn, members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A tar made of ``members`` with some duplicated, dropped, renamed, retyped or
    relinked, in PAX, GNU or ustar format (bytes sometimes mutated afterwards)."""
    out = [(copy.copy(info), data) for info, data in members]
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        number = draw(st.integers(0, len(out) - 1))
        info, data = out[number]
        op = draw(st.sampled_from(["duplicate", "drop", "rename", "retype", "relink", "mode", "size"]))
        info = copy.copy(info)
        if op == "duplicate":
            out.insert(draw(st.integers(0, len(out))), (info, data))
            continue
        if op == "drop":
            del out[number]
            continue
        if op == "rename":
            info.name = draw(st.sampled_from(HOSTILE_NAMES) | st.text(max_size=30))
        elif op == "retype":
            info.type = draw(st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                              tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE,
                                              b"V", b"Z"]))
        elif op == "relink":
            info.linkname = draw(st.sampled_from(HOSTILE_NAMES) | st.text(max_size=30))
            info.type = draw(st.sampled_from([tarfile.SYMTYPE, tarfile.LNKTYPE]))
        elif op == "mode":
            info.mode = draw(st.integers(0, 0o7777))
            info.uid = draw(st.integers(0, 2**21 - 1))
        else:
            data = draw(st.binary(max_size=256))
        info.size = len(data) if info.isreg() else 0
        out[number] = (info, data)
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    try:
        result = _tar(out, fmt)
    except (ValueError, UnicodeError):  # a name ustar cannot hold: the PAX form then
        result = _tar(out, tarfile.PAX_FORMAT)
    return draw(mutated_bytes(result)) if draw(st.booleans()) else result


def compress(data: bytes, how: str) -> bytes:
    if how == "none":
        return data
    out = io.BytesIO()
    compressor = GzipCompressor(threads=1) if how == "gz" else ZstdCompressor(threads=1)
    with compressor.compress_to(out) as sink:
        sink.write(data)
    return out.getvalue()


# --------------------------------------------------------------------------- tar_extract


def _read_all(data: bytes) -> None:
    for _, content in tar_extract.archive_entries(io.BytesIO(data)):
        if content is not None:
            while content.read(1 << 16):
                pass


@FUZZ
@given(data=st.data())
def test_tar_extract_refuses_mutated_tars_only_with_unsafe_archive(data: st.DataObject) -> None:
    seed = seeds()["tar"]
    tar = data.draw(mutated_tar(tar_members(seed)) | mutated_bytes(seed) | st.binary(max_size=2048))
    how = data.draw(st.sampled_from(["none", "none", "gz", "zstd"]))
    payload = compress(tar, how)
    if data.draw(st.booleans()):
        payload = data.draw(mutated_bytes(payload))
    try:
        _read_all(payload)
    except tar_extract.UnsafeArchive as e:
        assert str(e)


@FUZZ
@given(data=st.data())
def test_layer_flatteners_refuse_mutated_layers_cleanly(data: st.DataObject) -> None:
    """Layers read as RootfsUnpack, export_image, base directories and inspect read them."""
    from dtbuild.plugins.builtin.layer_contents import base_directories
    from dtbuild.plugins.builtin.layered_actions import apply_layer
    from dtbuild.plugins.builtin.root_layer import RootfsState

    members = tar_members(seeds()["layer"])
    layers = [data.draw(mutated_tar(members)) for _ in range(data.draw(st.integers(1, 3)))]

    def rootfs() -> None:
        state = RootfsState()
        for number, layer in enumerate(layers):
            for entry, content in tar_extract.read_entries(io.BytesIO(layer), lower_files=state.holds_file):
                state.apply(entry, number, lambda c=content: (str(len(c.read() if c else b"")), 0))
        state.tree_entries()
        state.owners()

    def export() -> None:
        tree: dict[str, Any] = {}
        for number, layer in enumerate(layers):
            entries = [e for e, _ in tar_extract.read_entries(
                io.BytesIO(layer), compressed=False, lower_files=lambda p: getattr(tree.get(p), "kind", "") == "file")]
            apply_layer(tree, entries, number)

    refused_cleanly(rootfs)
    refused_cleanly(export)
    refused_cleanly(lambda: base_directories(io.BytesIO(layer) for layer in layers))


@FUZZ
@given(data=st.data())
def test_upper_tars_from_a_guest_are_refused_cleanly(data: st.DataObject) -> None:
    from dtbuild.plugins.builtin.root_layer import pack_upper_tar

    upper = data.draw(mutated_tar(tar_members(seeds()["layer"])))
    opaque = data.draw(st.lists(st.sampled_from(HOSTILE_NAMES) | st.text(max_size=10), max_size=3))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "upper.tar").write_bytes(upper)
        (root / "opaque").write_bytes(b"\0".join(os.fsencode(p.replace("\x00", "")) for p in opaque))
        (root / "lower").mkdir()
        refused_cleanly(lambda: pack_upper_tar(str(root / "upper.tar"), str(root / "opaque"), str(root / "lower"),
                                               str(root / "layer.tar"), str(root / "layer.json")))


# --------------------------------------------------------------------------- image archives


def _read_image(path: str, dest: str) -> None:
    for image in imageformat.read_image_archive(path):
        imageformat.parse_image_config(image.config)
        for layer in image.layers:
            with layer.open() as f:
                while f.read(1 << 16):
                    pass
    imageformat.extract_image_archive(path, dest)


@st.composite
def docker_archives(draw: st.DrawFn) -> bytes:
    members = dict(seeds()["docker_members"])
    infos = tar_members(seeds()["docker"])
    kind = draw(st.sampled_from(["json", "json", "members", "bytes", "compressed"]))
    if kind == "compressed":
        return draw(mutated_bytes(seeds()[draw(st.sampled_from(["docker_gz", "docker_zstd"]))]))
    if kind == "bytes":
        return draw(mutated_bytes(seeds()["docker"]))
    if kind == "members":
        return draw(mutated_tar(infos))
    docs = seeds()["documents"]
    name = draw(st.sampled_from(["manifest.json", "config"]))
    target = name if name == "manifest.json" else next(
        n for n in members if n.endswith(".json") and "/" not in n and n != "manifest.json")
    replaced = draw(json_bytes(docs["docker_manifest"] if name == "manifest.json" else docs["config"]))
    out = []
    for info, data in infos:
        if info.name == target:
            info = copy.copy(info)
            data = replaced
            info.size = len(data)
        out.append((info, data))
    if draw(st.booleans()):  # a second manifest.json (or config), before or after the first
        extra = next((i, d) for i, d in out if i.name == target)
        out.insert(draw(st.integers(0, len(out))), extra)
    return _tar(out)


@FUZZ
@given(archive=docker_archives())
def test_docker_archives_are_refused_cleanly(archive: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image.tar")
        Path(path).write_bytes(archive)
        os.mkdir(os.path.join(tmp, "dest"))
        refused_cleanly(lambda: _read_image(path, os.path.join(tmp, "dest")))


@st.composite
def oci_layouts(draw: st.DrawFn) -> dict[str, bytes]:
    """The seed layout's files, some replaced (documents mutated as JSON, blobs as
    bytes), dropped, or added under hostile names."""
    files = dict(seeds()["oci_files"])
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(files)))
        op = draw(st.sampled_from(["json", "json", "bytes", "drop", "add"]))
        if op == "drop":
            files.pop(name, None)
        elif op == "add":
            files[draw(st.sampled_from(HOSTILE_NAMES))] = draw(st.binary(max_size=64))
        elif op == "bytes" or name not in files:
            files[name] = draw(mutated_bytes(files.get(name, b"{}")))
        else:
            try:
                document = json.loads(files[name])
            except (ValueError, RecursionError):  # the layer blob, or an earlier mutation's
                files[name] = draw(mutated_bytes(files[name]))
                continue
            files[name] = draw(json_bytes(document))
    return files


def _write_layout(root: Path, files: dict[str, bytes]) -> None:
    root.mkdir()
    for name, data in files.items():
        clean = "/".join(p for p in name.replace("\x00", "").split("/") if p not in ("", ".", ".."))
        if not clean or len(clean) > 200:
            continue
        path = root / clean
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError:
            continue  # a name that is a file's directory: skipped


@FUZZ
@given(files=oci_layouts(), as_tar=st.booleans())
def test_oci_layouts_are_refused_cleanly(files: dict[str, bytes], as_tar: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        layout = Path(tmp) / "layout"
        _write_layout(layout, files)
        path = str(layout)
        if as_tar:
            path = os.path.join(tmp, "layout.tar")
            Path(path).write_bytes(directory_as_tar(layout))
        os.mkdir(os.path.join(tmp, "dest"))
        refused_cleanly(lambda: _read_image(path, os.path.join(tmp, "dest")))


@FUZZ
@given(data=st.data())
def test_documents_are_refused_only_with_image_format_errors(data: st.DataObject) -> None:
    docs = seeds()["documents"]
    parsers = {"config": imageformat.parse_image_config, "manifest": imageformat.parse_manifest,
               "index": imageformat.parse_index, "docker_manifest": imageformat.parse_docker_manifest}
    name = data.draw(st.sampled_from(sorted(parsers)))
    document = data.draw(json_bytes(docs[name]) | st.binary(max_size=64))
    try:
        parsers[name](document, name)
    except imageformat.ImageFormatError as e:
        assert name in str(e)


# --------------------------------------------------------------------------- BUILD files

BUILD_SEED = """\
files(
    name = "conf",
    srcs = ["app.conf"],
    prefix = "/etc/app",
)

genrule(
    name = "gen",
    outs = ["out.txt"],
    cmd = "echo hi > $@",
)

pure_layer(
    name = "layer",
    copy_to_root = [":conf", ":gen"],
    uid = 1000,
)

image(
    name = "img",
    layers = [":layer"],
    config = {"Cmd": ["/bin/sh"], "Env": ["A=1"]},
    tag = "v1",
)

[files(name = "f%d" % i, srcs = ["app.conf"]) for i in range(3)]
"""


@pytest.fixture(scope="module")
def build_workspace() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="dtbuild-fuzz-"))
    (root / "dtbuild.toml").write_text("")
    (root / "app.conf").write_text("mode = 1\n")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@st.composite
def build_files(draw: st.DrawFn) -> bytes:
    seed = BUILD_SEED.encode()
    kind = draw(st.sampled_from(["bytes", "lines", "tokens", "random"]))
    if kind == "bytes":
        return draw(mutated_bytes(seed))
    if kind == "random":
        return draw(st.binary(max_size=200))
    lines = seed.split(b"\n")
    if kind == "lines":
        for _ in range(draw(st.integers(1, 4))):
            number = draw(st.integers(0, len(lines) - 1))
            op = draw(st.sampled_from(["dup", "drop", "swap"]))
            if op == "dup":
                lines.insert(number, lines[number])
            elif op == "drop":
                del lines[number]
            elif len(lines) > 1:
                other = draw(st.integers(0, len(lines) - 1))
                lines[number], lines[other] = lines[other], lines[number]
        return b"\n".join(lines)
    tokens = [b'"conf"', b"1000", b"[]", b"{}", b"None", b"True", b'":img"', b'"//x:y"', b'"../up"', b"-1",
              b'"/abs"', b'".dtbuild"', b"[:conf]", b'["a"] * 3']
    text = seed
    for _ in range(draw(st.integers(1, 3))):
        old = draw(st.sampled_from([b'"conf"', b"1000", b'"v1"', b'["app.conf"]', b'"echo hi > $@"', b"3",
                                    b'"/etc/app"', b'[":layer"]']))
        text = text.replace(old, draw(st.sampled_from(tokens)), 1)
    return text


@FUZZ
@given(build=build_files())
def test_build_files_fail_only_with_dtbuild_errors(build_workspace: Path, build: bytes) -> None:
    from dtbuild.engine.build import Session
    from dtbuild.engine.workspace import find_workspace

    (build_workspace / "BUILD").write_bytes(build)

    def load_and_analyze() -> None:
        session = Session(find_workspace(str(build_workspace)))
        session.analyze(session.expand(["//:all"]))

    refused_cleanly(load_and_analyze)
