"""image_archive of a malformed docker-archive or OCI layout: a clear error that names
the archive, the member or field, and what was expected there; never an "internal
error" with a TypeError, KeyError or a decompressor's IsalError. A member that decides
what the archive is (manifest.json, index.json, oci-layout) stored twice is an error,
not "the last one wins"."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from dtbuild.plugins.builtin import imageformat
from dtbuild.plugins.builtin.compressors import NoneCompressor


def _layer() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size, info.mtime = 4, 1
        tar.addfile(info, io.BytesIO(b"box\n"))
    return out.getvalue()


def _docker_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    layer = _layer()
    diff_id = imageformat.sha256_digest(layer)
    config = imageformat.make_config("amd64", "linux", {}, [diff_id], [{"created_by": "test"}],
                                     "1970-01-01T00:00:01Z")
    archive = io.BytesIO()
    imageformat.write_docker_archive(archive, [imageformat.ArchiveImage(config, ["t/app:1"], [
        imageformat.ArchiveLayer(diff_id, len(layer), lambda: io.BytesIO(layer))])], NoneCompressor())
    archive.seek(0)
    members = []
    with tarfile.open(fileobj=archive) as tar:
        for info in tar:
            content = tar.extractfile(info) if info.isreg() else None
            members.append((info, content.read() if content is not None else b""))
    return members


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def _with(name_test: Any, replace: Any) -> bytes:
    """The docker-archive with each member whose name passes ``name_test`` given the
    bytes ``replace(old bytes)``."""
    out = []
    for info, data in _docker_members():
        out.append((info, replace(data) if name_test(info.name) else data))
    return _tar(out)


def _is_config(name: str) -> bool:
    return name.endswith(".json") and "/" not in name and name != "manifest.json"


def _config_with(change: Any) -> Any:
    def replace(data: bytes) -> bytes:
        config = json.loads(data)
        change(config)
        return json.dumps(config).encode()
    return replace


def _duplicate_manifest() -> bytes:
    """A second manifest.json after the first, naming another config."""
    return _tar([*_docker_members(), (tarfile.TarInfo("manifest.json"), b'[{"Config":"x.json","Layers":[]}]')])


def _corrupt_gzip_layer() -> bytes:
    """An OCI layout (as a tar) whose gzip layer's deflate data is damaged (isal's
    IsalError: invalid lookback distance)."""
    layer = bytes(range(256)) * 40 + b"a" * 5000
    tar_layer = _tar([(tarfile.TarInfo("data"), layer)])
    blob = bytearray(gzip.compress(tar_layer, mtime=0))
    blob[10] ^= 0xFF
    blob = bytes(blob)
    diff_id = imageformat.sha256_digest(tar_layer)
    config = imageformat.make_config("amd64", "linux", {}, [diff_id], [{"created_by": "test"}],
                                     "1970-01-01T00:00:01Z")
    blob_digest = imageformat.sha256_digest(blob)
    manifest = imageformat.make_manifest(imageformat.sha256_digest(config), len(config),
                                         [(blob_digest, len(blob), "application/vnd.oci.image.layer.v1.tar+gzip")],
                                         oci=True)
    index = imageformat.canonical_json({"schemaVersion": 2, "manifests": [{
        "mediaType": imageformat.OCI_MANIFEST_MEDIA_TYPE, "digest": imageformat.sha256_digest(manifest),
        "size": len(manifest)}]})
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
    for data in (blob, config, manifest):
        files["blobs/sha256/" + imageformat.sha256_digest(data).removeprefix("sha256:")] = data
    return _tar([(tarfile.TarInfo(name), data) for name, data in files.items()])


CASES = {
    "manifest-not-a-list": (_with(lambda n: n == "manifest.json", lambda _: b'{"Config":1}'),
                            ["manifest.json must be a list of images", "(an object)"]),
    "manifest-config-a-number": (_with(lambda n: n == "manifest.json", lambda _: b'[{"Config":1,"Layers":[]}]'),
                                 ["manifest.json: image 0: Config must be", "but is 1 (a number)"]),
    "manifest-empty-entry": (_with(lambda n: n == "manifest.json", lambda _: b"[{}]"),
                             ["manifest.json: image 0: Config must be"]),
    "layers-not-a-list": (_with(lambda n: n == "manifest.json",
                                lambda d: json.dumps([{**json.loads(d)[0], "Layers": "layer.tar"}]).encode()),
                          ["Layers must be a list"]),
    "config-without-rootfs": (_with(_is_config, _config_with(lambda c: c.pop("rootfs"))),
                              ["rootfs must be a JSON object", "but is null"]),
    "diff-ids-a-string": (_with(_is_config, _config_with(lambda c: c["rootfs"].update(diff_ids="sha256:x"))),
                          ["rootfs.diff_ids must be a list"]),
    "env-not-strings": (_with(_is_config, _config_with(lambda c: c["config"].update(Env=[1]))),
                        ["config.Env must be a list of strings"]),
    "history-not-objects": (_with(_is_config, _config_with(lambda c: c.update(history=["x"]))),
                            ["history[0] must be a JSON object"]),
    "config-not-json": (_with(_is_config, lambda _: b"[" * 100_000), ["nests too deeply"]),
    "duplicate-manifest": (_duplicate_manifest(), ["holds manifest.json twice"]),
    "corrupt-gzip-layer": (_corrupt_gzip_layer(), ["does not decompress"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_archive_is_a_clear_error(case: str, write_workspace: Any, run_dtbuild: Any) -> None:
    archive, expected = CASES[case]
    ws = write_workspace({"BUILD": 'image_archive(name = "base", src = "bad.tar")\n', "bad.tar": archive})
    code, _, err = run_dtbuild(ws, "build", "//:base")
    assert code == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    assert "bad.tar" in err, err
    for text in expected:
        assert text in err, err


def test_the_valid_archive_of_these_cases_imports(write_workspace: Any, run_dtbuild: Any) -> None:
    """The cases above break a working archive: unchanged, it imports."""
    ws = write_workspace({"BUILD": 'image_archive(name = "base", src = "good.tar")\n',
                          "good.tar": _tar(_docker_members())})
    run_dtbuild(ws, "build", "//:base", check=True)


def test_documents_refused_name_the_field(tmp_path: Path) -> None:
    """The document parsers, as pulls use them on a registry's answers."""
    with pytest.raises(imageformat.ImageFormatError, match=r"the manifest: layers\[0\]: size must be a size"):
        imageformat.parse_manifest(json.dumps({"config": {"digest": "sha256:" + "0" * 64, "size": 1},
                                               "layers": [{"mediaType": "x", "digest": "sha256:" + "0" * 64,
                                                           "size": "12"}]}).encode())
    with pytest.raises(imageformat.ImageFormatError, match=r"the index: manifests must be a list"):
        imageformat.parse_index(b'{"manifests": {"a": 1}}')
    with pytest.raises(imageformat.ImageFormatError, match=r"platform: os must be a string"):
        imageformat.parse_index(json.dumps({"manifests": [{"digest": "sha256:" + "0" * 64, "size": 1,
                                                           "platform": {"os": 7}}]}).encode())
