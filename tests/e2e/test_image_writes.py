"""A compressed image's layers are written once: the tar is hashed and compressed on its
way into the store, no uncompressed copy is kept, and readers that need the plain tar
(an uncompressed archive, ``inspect``, ``export_image``) decompress the blob."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BUILD = """
files(name = "data", srcs = glob(["data/**"]), prefix = "/opt")
image(name = "img_gz", copy_to_root = [":data"], compressor = "gz")
image(name = "img_zstd", copy_to_root = [":data"], compressor = "zstd")
files(name = "extra", srcs = ["extra.txt"], prefix = "/etc")
image(name = "plain_on_gz", from_image = ":img_gz", copy_to_root = [":extra"], compressor = "none")
export_image(name = "flat", from_image = ":img_gz")
"""


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    data = root / "app" / "data"
    data.mkdir(parents=True)
    (root / "dtbuild.toml").write_text("")
    (root / "app" / "BUILD").write_text(BUILD)
    (root / "app" / "extra.txt").write_text("extra\n")
    rng = random.Random(7)
    for i in range(6):  # ~3 MiB, half random, half compressible
        size = 512 * 1024
        (data / f"f{i}.bin").write_bytes(rng.randbytes(size) if i % 2 else b"layer image build " * (size // 18))
    return root


def _cas_files(cache: Path) -> dict[str, int]:
    """Blob digest (hex) -> size of every file under the cache's cas/."""
    found = {}
    for dirpath, _, names in os.walk(cache / "cas"):
        for name in names:
            found[name] = os.lstat(os.path.join(dirpath, name)).st_size
    return found


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("compressor", "ext"), [("gz", ".gz"), ("zstd", ".zst")])
def test_a_compressed_layer_is_stored_once(ws: Path, run_dtbuild, compressor: str, ext: str) -> None:
    run_dtbuild(ws, "build", f"//app:img_{compressor}", check=True)
    out = ws / "dtbuild-out" / "app"
    desc = json.loads((out / f"img_{compressor}.json").read_text())
    [layer] = desc["layers"]
    cas = _cas_files(run_dtbuild.cache_dir)
    # The layer's blob is stored, its uncompressed tar is not.
    assert layer["digest"].removeprefix("sha256:") in cas
    assert layer["diff_id"].removeprefix("sha256:") not in cas
    # What the build put in the store is the blob, the archive and small documents (source
    # files the store may hold as blobs aside): no second copy of the layer's bytes.
    sources = {_sha256(p) for p in (ws / "app" / "data").iterdir()}
    stored = sum(size for digest, size in cas.items() if digest not in sources)
    archive = out / f"img_{compressor}.tar{ext}"
    assert stored <= 1.3 * (layer["size"] + archive.stat().st_size)
    # And the archive holds the very layer: its layer.tar is the tar of the diff_id.
    opener = gzip.open if compressor == "gz" else None
    if opener is not None:
        with tarfile.open(fileobj=opener(archive)) as tar:
            layer_tars = [m for m in tar.getmembers() if m.name.endswith("/layer.tar")]
            assert ["sha256:" + hashlib.sha256(tar.extractfile(m).read()).hexdigest()  # type: ignore[union-attr]
                    for m in layer_tars] == [layer["diff_id"]]


def test_readers_of_the_plain_tar_decompress_the_blob(ws: Path, run_dtbuild) -> None:
    run_dtbuild(ws, "build", "//app:plain_on_gz", "//app:img_gz", check=True)
    out = ws / "dtbuild-out" / "app"
    base = json.loads((out / "img_gz.json").read_text())
    desc = json.loads((out / "plain_on_gz.json").read_text())
    base_layer, new_layer = desc["layers"]
    # The base's layer keeps its gzip blob in the image; the uncompressed archive holds its tar.
    assert base_layer["media_type"].endswith("+gzip")
    assert base_layer["diff_id"].removeprefix("sha256:") not in _cas_files(run_dtbuild.cache_dir)
    with tarfile.open(out / "plain_on_gz.tar") as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        diff_ids = ["sha256:" + hashlib.sha256(tar.extractfile(name).read()).hexdigest()  # type: ignore[union-attr]
                    for name in manifest[0]["Layers"]]
    assert diff_ids == [base_layer["diff_id"], new_layer["diff_id"]]
    assert base["layers"][0] == base_layer
    # export_image reads the layer's files out of the decompressed blob.
    run_dtbuild(ws, "build", "//app:flat", check=True)
    with tarfile.open(out / "flat.tar") as tar:
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == [f"opt/data/f{i}.bin" for i in range(6)]
        assert tar.extractfile("opt/data/f0.bin").read() == (ws / "app" / "data" / "f0.bin").read_bytes()  # type: ignore[union-attr]


def test_inspect_gives_the_uncompressed_size_of_a_compressed_layer(ws: Path, run_dtbuild) -> None:
    run_dtbuild(ws, "build", "//app:img_gz", check=True)
    code, stdout, err = run_dtbuild(ws, "inspect", "//app:img_gz")
    assert code == 0, err
    assert "6 files" in stdout
    desc = json.loads((ws / "dtbuild-out" / "app" / "img_gz.json").read_text())
    assert desc["layers"][0]["diff_id"] in stdout
