"""Image metadata and archives: canonical JSON, configs and manifests, docker-archives
(structure, determinism, spliced compressed members, streaming), OCI layouts, and reading
both back (round trips, digests checked). Real tools (skopeo, tar, zcat, zstd) check the
bytes where they are installed."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from dtbuild.plugins.builtin import imageformat
from dtbuild.plugins.builtin.compressors import (
    BUILTIN_COMPRESSORS,
    GzipCompressor,
    NoneCompressor,
    ZstdCompressor,
)
from dtbuild.plugins.builtin.imageformat import (
    ArchiveImage,
    ArchiveLayer,
    OciImage,
    canonical_json,
    content_tag,
    extract_image_archive,
    make_config,
    make_manifest,
    read_image_archive,
    write_docker_archive,
    write_oci_layout,
)
from dtbuild.plugins.builtin.layertar import LAYER_MTIME, LayerEntry, LayerSourceChanged, write_layer
from dtbuild.plugins.interfaces import Compressor

CREATED = "1970-01-01T00:00:01Z"
LONG_NAME = "n" * 150


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class BuiltLayer:
    diff_id: str
    tar: bytes
    blob: bytes
    digest: str
    media_type: str

    def archive_layer(self, with_blob: bool = True) -> ArchiveLayer:
        return ArchiveLayer(self.diff_id, len(self.tar), lambda: io.BytesIO(self.tar),
                            (lambda: io.BytesIO(self.blob)) if with_blob else None,
                            self.media_type if with_blob else None)


def build_layer(number: int, compressor: Compressor) -> BuiltLayer:
    text = (b"layer %d says hello\n" % number) * 20000
    entries = [LayerEntry("etc", "dir", 0o755),
               LayerEntry(f"etc/file{number}", "file", 0o644, size=len(text), open=lambda: io.BytesIO(text)),
               LayerEntry("etc/" + LONG_NAME, "symlink", 0o777, linkname=f"file{number}")]  # a PAX path
    tar, blob = io.BytesIO(), io.BytesIO()
    digests = write_layer(entries, tar_out=tar, compressor=compressor, blob_out=blob)
    return BuiltLayer(digests.diff_id, tar.getvalue(), blob.getvalue(), digests.blob_digest, digests.media_type)


def image_config(layers: list[BuiltLayer], env: str = "A=1") -> bytes:
    return make_config("amd64", "linux", {"Env": [env]}, [layer.diff_id for layer in layers],
                       [{"created_by": f"layer {i}"} for i in range(len(layers))], CREATED)


def two_images(compressor: Compressor, with_blobs: bool = True) -> tuple[list[ArchiveImage], list[BuiltLayer]]:
    """Image a (3 layers) and image b (its first 2 layers, two tags): layers are shared."""
    layers = [build_layer(i, compressor) for i in range(3)]
    images = [
        ArchiveImage(image_config(layers), ["example.com/app:1"], [lay.archive_layer(with_blobs) for lay in layers]),
        ArchiveImage(image_config(layers[:2], "A=2"), ["base:2", "base:latest"],
                     [lay.archive_layer(with_blobs) for lay in layers[:2]]),
    ]
    return images, layers


def archive_bytes(images: list[ArchiveImage], compressor: Compressor, **kwargs) -> bytes:
    out = io.BytesIO()
    write_docker_archive(out, images, compressor, **kwargs)
    return out.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class PipeOnly(io.RawIOBase):
    """A sink like a pipe to stdout: it cannot seek or tell."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self.chunks.append(bytes(data))
        return len(data)

    def seekable(self) -> bool:
        return False

    def seek(self, *args):  # type: ignore[override]
        raise io.UnsupportedOperation("seek")

    def tell(self):  # type: ignore[override]
        raise io.UnsupportedOperation("tell")


# --------------------------------------------------------------------------- metadata


def test_canonical_json_sorts_keys_compact_utf8():
    assert canonical_json({"b": [1, {"d": None, "c": "é"}], "a": True}) == \
        '{"a":true,"b":[1,{"c":"é","d":null}]}'.encode()


def test_make_config_known_answer():
    diff_id = "sha256:" + "ab" * 32
    config = make_config("amd64", "linux", {"Cmd": ["/bin/sh"]}, [diff_id],
                         [{"created_by": "dtbuild //pkg:layer", "comment": "dtbuild"}], CREATED)
    assert config == (
        b'{"architecture":"amd64","config":{"Cmd":["/bin/sh"]},"created":"1970-01-01T00:00:01Z",'
        b'"history":[{"comment":"dtbuild","created":"1970-01-01T00:00:01Z","created_by":"dtbuild //pkg:layer"}],'
        b'"os":"linux","rootfs":{"diff_ids":["sha256:' + b"ab" * 32 + b'"],"type":"layers"}}')


def test_make_config_needs_one_layer_bearing_history_entry_per_layer():
    diff_ids = ["sha256:" + "ab" * 32, "sha256:" + "cd" * 32]
    with pytest.raises(ValueError, match="1 entries that are not empty_layer but the image has 2 layers"):
        make_config("amd64", "linux", {}, diff_ids, [{"created_by": "a"}, {"created_by": "ENV", "empty_layer": True}],
                    CREATED)
    with pytest.raises(ValueError, match="has no created_by"):
        make_config("amd64", "linux", {}, diff_ids[:1], [{"created_by": ""}], CREATED)
    config = json.loads(make_config("amd64", "linux", {}, diff_ids,
                                    [{"created_by": "a"}, {"created_by": "ENV", "empty_layer": True},
                                     {"created_by": "b"}], CREATED))
    assert len(config["history"]) == 3


def test_make_manifest_oci_and_docker():
    config_digest, layer_digest = "sha256:" + "11" * 32, "sha256:" + "22" * 32
    oci = json.loads(make_manifest(config_digest, 123, [(layer_digest, 456, GzipCompressor.OCI_LAYER_MEDIA_TYPE)],
                                   oci=True))
    assert oci == {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                              "size": 123},
                   "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                               "size": 456}]}
    docker = json.loads(make_manifest(config_digest, 123, [(layer_digest, 456, GzipCompressor.OCI_LAYER_MEDIA_TYPE)],
                                      oci=False))
    assert docker["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert docker["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert docker["layers"][0]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert make_manifest(config_digest, 1, [], oci=True) == make_manifest(config_digest, 1, [], oci=True)
    with pytest.raises(ValueError, match=r"zstd layers .* have no Docker media type"):
        make_manifest(config_digest, 1, [(layer_digest, 1, ZstdCompressor.OCI_LAYER_MEDIA_TYPE)], oci=False)


def test_content_tag_is_the_config_digest_prefix():
    digest = "sha256:" + hashlib.sha256(b"config").hexdigest()
    assert content_tag(digest) == digest[7:39]
    assert content_tag(digest[7:]) == content_tag(digest)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        content_tag("md5:abc")


# --------------------------------------------------------------------------- docker-archive


def test_docker_archive_has_the_docker_save_layout():
    images, layers = two_images(NoneCompressor())
    raw = archive_bytes(images, NoneCompressor())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        files = {m.name: tar.extractfile(m).read() for m in members if m.isfile()}  # type: ignore[union-attr]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(LAYER_MTIME, 0, 0, "", "")}
    assert names == sorted(names, key=lambda n: n.split("/"))
    # Layer directories are the layers' OCI ChainIDs; layers shared by both images once.
    chain = [layers[0].diff_id]
    for layer in layers[1:]:
        chain.append(sha256(f"{chain[-1]} {layer.diff_id}".encode()))
    ids = [c[7:] for c in chain]
    for number, layer_id in enumerate(ids):
        assert files[f"{layer_id}/VERSION"] == b"1.0"
        assert files[f"{layer_id}/layer.tar"] == layers[number].tar
        legacy = json.loads(files[f"{layer_id}/json"])
        assert legacy["id"] == layer_id and legacy.get("parent") == (ids[number - 1] if number else None)
    assert sum(name.endswith("/layer.tar") for name in names) == 3
    configs = [image.config for image in images]
    assert files[hashlib.sha256(configs[0]).hexdigest() + ".json"] == configs[0]
    assert json.loads(files["manifest.json"]) == [
        {"Config": hashlib.sha256(configs[0]).hexdigest() + ".json", "RepoTags": ["example.com/app:1"],
         "Layers": [f"{i}/layer.tar" for i in ids]},
        {"Config": hashlib.sha256(configs[1]).hexdigest() + ".json", "RepoTags": ["base:2", "base:latest"],
         "Layers": [f"{i}/layer.tar" for i in ids[:2]]},
    ]
    assert json.loads(files["repositories"]) == {"example.com/app": {"1": ids[2]},
                                                 "base": {"2": ids[1], "latest": ids[1]}}


@pytest.mark.parametrize("cls", BUILTIN_COMPRESSORS)
def test_docker_archive_is_deterministic_and_streams_to_a_pipe(cls):
    images, _ = two_images(cls())
    first = archive_bytes(images, cls())
    pipe = PipeOnly()
    write_docker_archive(pipe, images, cls())  # type: ignore[arg-type]
    assert b"".join(pipe.chunks) == first
    assert first.startswith(cls.MAGIC)


@pytest.mark.parametrize("cls", [GzipCompressor, ZstdCompressor])
def test_spliced_layer_blobs_decompress_to_the_same_archive(cls, require_tool):
    compressor = cls()
    images, layers = two_images(compressor)
    spliced = archive_bytes(images, compressor)
    plain = archive_bytes(images, compressor, reuse_blobs=False)
    assert spliced != plain
    for layer in layers:  # the blobs are in the archive byte for byte
        assert layer.blob in spliced
    expected = archive_bytes(images, NoneCompressor())
    assert compressor.decompress_from(io.BytesIO(spliced)).read() == expected
    assert compressor.decompress_from(io.BytesIO(plain)).read() == expected
    if cls is GzipCompressor:
        assert gzip.decompress(spliced) == expected
        tool = [require_tool("zcat")]
    else:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(spliced), read_across_frames=True)
        assert reader.read() == expected
        tool = [require_tool("zstd"), "-dc"]
    assert subprocess.run(tool, input=spliced, capture_output=True, check=True).stdout == expected


def test_a_blob_of_another_compression_is_not_spliced():
    gz_images, _ = two_images(GzipCompressor())
    zstd_archive = archive_bytes(gz_images, ZstdCompressor())
    assert zstd_archive == archive_bytes(gz_images, ZstdCompressor(), reuse_blobs=False)


def test_a_gzip_blob_with_trailing_bytes_is_not_spliced():
    images, layers = two_images(GzipCompressor())
    padded = [ArchiveImage(image.config, image.repo_tags,
                           [ArchiveLayer(layer.diff_id, layer.tar_size, layer.open_tar,
                                         lambda b=built.blob: io.BytesIO(b + bytes(512)), layer.blob_media_type)
                            for layer, built in zip(image.layers, layers, strict=False)])
              for image in images]
    assert archive_bytes(padded, GzipCompressor()) == archive_bytes(images, GzipCompressor(), reuse_blobs=False)


def test_layer_tar_of_the_wrong_size_is_an_error():
    layer = build_layer(0, NoneCompressor())
    wrong = ArchiveLayer(layer.diff_id, len(layer.tar) + 512, lambda: io.BytesIO(layer.tar))
    image = ArchiveImage(image_config([layer]), ["x:1"], [wrong])
    with pytest.raises(LayerSourceChanged, match=f"layer {layer.diff_id} ended after"):
        archive_bytes([image], NoneCompressor())


def test_layers_must_be_the_configs_and_tags_unique():
    layers = [build_layer(i, NoneCompressor()) for i in range(2)]
    with pytest.raises(ValueError, match="are not the config's diff_ids"):
        archive_bytes([ArchiveImage(image_config(layers), ["x:1"], [layers[0].archive_layer()])], NoneCompressor())
    one = ArchiveImage(image_config(layers[:1]), ["x:1"], [layers[0].archive_layer()])
    other = ArchiveImage(image_config(layers[:1], "B=1"), ["x:1"], [layers[0].archive_layer()])
    with pytest.raises(ValueError, match="x:1 names two images"):
        archive_bytes([one, other], NoneCompressor())
    with pytest.raises(ValueError, match="is not name:tag"):
        archive_bytes([ArchiveImage(one.config, ["localhost:5000/x"], one.layers)], NoneCompressor())


@pytest.mark.parametrize("cls", BUILTIN_COMPRESSORS)
@pytest.mark.parametrize("reuse_blobs", [True, False], ids=["spliced", "plain"])
def test_docker_archive_round_trip(tmp_path, cls, reuse_blobs):
    images, layers = two_images(cls())
    path = tmp_path / f"images.tar{cls.EXTENSION}"
    path.write_bytes(archive_bytes(images, cls(), reuse_blobs=reuse_blobs))

    read = read_image_archive(str(path))
    assert [(i.config, i.repo_tags) for i in read] == [(i.config, tuple(i.repo_tags)) for i in images]
    assert [[layer.diff_id for layer in i.layers] for i in read] == [[lay.diff_id for lay in layers],
                                                                    [lay.diff_id for lay in layers[:2]]]
    with read[0].layers[2].open() as stream:
        assert stream.read() == layers[2].tar
    assert {layer.media_type for i in read for layer in i.layers} == {NoneCompressor.OCI_LAYER_MEDIA_TYPE}

    dest = tmp_path / "extracted"
    dest.mkdir()
    extracted = extract_image_archive(str(path), str(dest))
    assert [(i.config, i.repo_tags) for i in extracted] == [(i.config, tuple(i.repo_tags)) for i in images]
    for image in extracted:
        for layer, built in zip(image.layers, layers, strict=False):
            assert Path(layer.tar_path).read_bytes() == built.tar
            assert layer.tar_size == len(built.tar) and layer.blob_path is None
    assert sorted(os.listdir(dest / "layers")) == sorted(lay.diff_id[7:] for lay in layers)
    assert not (dest / "members").exists()


def test_corrupt_layer_is_an_error_naming_it(tmp_path):
    images, layers = two_images(NoneCompressor())
    raw = archive_bytes(images, NoneCompressor())
    broken = raw.replace(b"layer 1 says hello", b"layer 1 says HELLO", 1)
    path = tmp_path / "broken.tar"
    path.write_bytes(broken)
    message = f"layer {layers[1].diff_id}: its uncompressed content has digest"
    with pytest.raises(ValueError, match=message):
        extract_image_archive(str(path), str(tmp_path))
    with pytest.raises(ValueError, match=message):
        read_image_archive(str(path))[0].layers[1].open().read()


def test_not_an_image_archive(tmp_path):
    path = tmp_path / "plain.tar"
    with tarfile.open(path, "w") as tar:
        tar.addfile(tarfile.TarInfo("hello"), io.BytesIO(b""))
    with pytest.raises(ValueError, match="neither a docker-archive"):
        read_image_archive(str(path))


@pytest.mark.parametrize("cls", BUILTIN_COMPRESSORS)
def test_garbage_and_truncated_archives_are_value_errors(tmp_path, cls):
    images, _ = two_images(cls())
    whole = archive_bytes(images, cls(), reuse_blobs=False)
    truncated = whole[:len(whole) // 2]
    for number, data in enumerate([cls.MAGIC + bytes(range(256)) * 8, truncated]):
        path = tmp_path / f"bad{number}.tar"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"is not a readable {cls.NAME} tar archive"):
            extract_image_archive(str(path), str(tmp_path))


# --------------------------------------------------------------------------- OCI layout


def oci_images(compressor: Compressor) -> tuple[list[OciImage], list[BuiltLayer], dict[str, bytes]]:
    layers = [build_layer(i, compressor) for i in range(3)]
    blobs = {layer.digest: layer.blob for layer in layers}
    images = []
    for config, chosen, tags in [(image_config(layers), layers, ["example.com/app:1", "example.com/app:latest"]),
                                 (image_config(layers[:1], "B=1"), layers[:1], ["base:2"])]:
        manifest = make_manifest(sha256(config), len(config),
                                 [(layer.digest, len(layer.blob), layer.media_type) for layer in chosen], oci=True)
        images.append(OciImage(manifest, config, tags))
    return images, layers, blobs


def write_layout(dest: Path, images: list[OciImage], blobs: dict[str, bytes]) -> list[str]:
    placed: list[str] = []

    def place_blob(digest: str, path: str) -> None:
        placed.append(digest)
        Path(path).write_bytes(blobs[digest])

    write_oci_layout(str(dest), images, place_blob)
    return placed


@pytest.mark.parametrize("cls", BUILTIN_COMPRESSORS)
def test_oci_layout_structure(tmp_path, cls):
    images, layers, blobs = oci_images(cls())
    placed = write_layout(tmp_path / "layout", images, blobs)
    root = tmp_path / "layout"
    assert placed == [layer.digest for layer in layers]  # each blob once
    assert json.loads((root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_bytes())
    assert index["schemaVersion"] == 2 and index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [(m["annotations"]["org.opencontainers.image.ref.name"], m["annotations"]["io.containerd.image.name"],
             m["digest"]) for m in index["manifests"]] == [
        ("1", "example.com/app:1", sha256(images[0].manifest)),
        ("latest", "example.com/app:latest", sha256(images[0].manifest)),
        ("2", "base:2", sha256(images[1].manifest)),
    ]
    assert index["manifests"][0]["platform"] == {"architecture": "amd64", "os": "linux"}
    for path in (root / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


@pytest.mark.parametrize("cls", BUILTIN_COMPRESSORS)
@pytest.mark.parametrize("packed", [False, True], ids=["directory", "oci-archive"])
def test_oci_round_trip(tmp_path, cls, packed):
    images, layers, blobs = oci_images(cls())
    layout = tmp_path / "layout"
    write_layout(layout, images, blobs)
    source = layout
    if packed:
        source = tmp_path / "image.oci.tar"
        with tarfile.open(source, "w") as tar:
            tar.add(layout, arcname=".")

    read = read_image_archive(str(source))
    assert [(i.config, i.repo_tags) for i in read] == [
        (images[0].config, ("example.com/app:1", "example.com/app:latest")), (images[1].config, ("base:2",))]
    assert [layer.media_type for layer in read[0].layers] == [cls.OCI_LAYER_MEDIA_TYPE] * 3
    with read[0].layers[1].open() as stream:
        assert stream.read() == layers[1].tar

    dest = tmp_path / "extracted"
    dest.mkdir()
    extracted = extract_image_archive(str(source), str(dest))
    for layer, built in zip(extracted[0].layers, layers, strict=True):
        assert Path(layer.tar_path).read_bytes() == built.tar
        assert layer.media_type == cls.OCI_LAYER_MEDIA_TYPE
        if cls is NoneCompressor:
            assert layer.blob_path is None
        else:  # compressed blobs are kept as they came
            assert Path(layer.blob_path).read_bytes() == built.blob  # type: ignore[arg-type]
            assert (layer.blob_digest, layer.blob_size) == (built.digest, len(built.blob))


def test_oci_blob_with_wrong_digest_is_an_error(tmp_path):
    images, layers, blobs = oci_images(GzipCompressor())
    blobs = {**blobs, layers[0].digest: gzip.compress(layers[0].tar, mtime=0)}  # right content, other bytes
    write_layout(tmp_path / "layout", images, blobs)
    with pytest.raises(ValueError, match=f"blob {layers[0].digest} of layer {layers[0].diff_id} has digest"):
        extract_image_archive(str(tmp_path / "layout"), str(tmp_path))


def test_oci_manifest_must_name_its_config(tmp_path):
    images, _, blobs = oci_images(NoneCompressor())
    wrong = OciImage(images[0].manifest, images[1].config, ["x:1"])
    with pytest.raises(ValueError, match="its manifest names config"):
        write_layout(tmp_path / "layout", [wrong], blobs)


# --------------------------------------------------------------------------- real tools


def skopeo_inspect(require_tool, reference: str) -> dict:
    skopeo = require_tool("skopeo")
    result = subprocess.run([skopeo, "inspect", "--raw", reference], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    raw = json.loads(result.stdout)
    result = subprocess.run([skopeo, "inspect", reference], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {"raw": raw, "inspect": json.loads(result.stdout)}


@pytest.mark.e2e
@pytest.mark.parametrize("cls", BUILTIN_COMPRESSORS)
def test_skopeo_reads_our_docker_archive(tmp_path, cls, require_tool):
    images, layers = two_images(cls())
    data = archive_bytes(images, cls())
    if cls is GzipCompressor:
        # skopeo 1.9 cannot read any gzip-compressed docker-archive ("archive/tar: invalid
        # tar header", its bug: a single-member `gzip` file fails the same way), so check
        # that the decompressed multi-member stream is the archive skopeo reads.
        data = gzip.decompress(data)
    path = tmp_path / "images.tar"
    path.write_bytes(data)
    for image, count in [("example.com/app:1", 3), ("base:latest", 2)]:
        found = skopeo_inspect(require_tool, f"docker-archive:{path}:{image}")
        assert found["inspect"]["Layers"] == [layer.diff_id for layer in layers[:count]]
    found = skopeo_inspect(require_tool, f"docker-archive:{path}:base:latest")
    assert found["raw"]["config"]["digest"] == sha256(images[1].config)
    # Copying reads every layer and checks it against its diff_id.
    copied = tmp_path / "copied"
    subprocess.run([require_tool("skopeo"), "copy", "--quiet", f"docker-archive:{path}:example.com/app:1",
                    f"oci:{copied}:copied"], check=True, capture_output=True, timeout=60)
    (image,) = read_image_archive(str(copied))
    assert json.loads(image.config)["rootfs"] == json.loads(images[0].config)["rootfs"]  # re-serialized as OCI
    assert [layer.open().read() for layer in image.layers] == [layer.tar for layer in layers]


@pytest.mark.e2e
@pytest.mark.parametrize("cls", BUILTIN_COMPRESSORS)
def test_skopeo_reads_our_oci_layout_and_we_read_its_archives(tmp_path, cls, require_tool):
    images, layers, blobs = oci_images(cls())
    layout = tmp_path / "layout"
    write_layout(layout, images, blobs)
    found = skopeo_inspect(require_tool, f"oci:{layout}:latest")
    assert found["raw"] == json.loads(images[0].manifest)
    assert found["inspect"]["Layers"] == [layer.digest for layer in layers]

    # And the other way: archives skopeo writes, read by us.
    skopeo = require_tool("skopeo")
    targets = [("oci-archive", "skopeo.oci.tar")]
    if cls.DOCKER_LAYER_MEDIA_TYPE is not None:  # skopeo refuses zstd layers in docker-archives
        targets.append(("docker-archive", "skopeo.tar"))
    for transport, name in targets:
        target = tmp_path / name
        subprocess.run([skopeo, "copy", "--quiet", f"oci:{layout}:latest", f"{transport}:{target}:copied:1"],
                       check=True, capture_output=True, timeout=60)
        dest = tmp_path / (name + ".d")
        dest.mkdir()
        (image,) = extract_image_archive(str(target), str(dest))
        assert [layer.diff_id for layer in image.layers] == [layer.diff_id for layer in layers]
        assert Path(image.layers[2].tar_path).read_bytes() == layers[2].tar
        assert json.loads(image.config)["rootfs"] == json.loads(images[0].config)["rootfs"]


@pytest.mark.e2e
def test_gnu_tar_lists_a_spliced_gzip_archive(tmp_path, require_tool):
    tar = require_tool("tar")
    require_tool("gzip")
    images, _ = two_images(GzipCompressor())
    path = tmp_path / "images.tar.gz"
    path.write_bytes(archive_bytes(images, GzipCompressor()))
    listing = subprocess.run([tar, "-tzf", str(path)], capture_output=True, text=True, check=True).stdout.split()
    assert "manifest.json" in listing and sum(n.endswith("/layer.tar") for n in listing) == 3


@pytest.mark.e2e
def test_umoci_reads_our_oci_layout(tmp_path, require_tool):
    umoci = require_tool("umoci")
    images, _, blobs = oci_images(GzipCompressor())
    layout = tmp_path / "layout"
    write_layout(layout, images, blobs)
    listing = subprocess.run([umoci, "ls", "--layout", str(layout)], capture_output=True, text=True, check=True)
    assert set(listing.stdout.split()) == {"1", "latest", "2"}
    bundle = tmp_path / "bundle"
    subprocess.run([umoci, "raw", "unpack", "--rootless", "--image", f"{layout}:latest", str(bundle)],
                   capture_output=True, check=True, timeout=60)
    assert (bundle / "etc" / "file2").read_bytes().startswith(b"layer 2 says hello\n")
    assert os.readlink(bundle / "etc" / LONG_NAME) == "file2"  # Go's archive/tar read our PAX header
    shutil.rmtree(bundle, ignore_errors=True)


def test_module_never_imports_the_engine():
    source = Path(imageformat.__file__).read_text()
    assert "dtbuild.engine" not in source
