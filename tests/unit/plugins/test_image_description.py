"""The image description (NAME.json / image.json) and the one writer of each image document:
known answers for the bytes, shapes checked when read back."""

from __future__ import annotations

import json

import pytest
from dtbuild.plugins import canonical
from dtbuild.plugins.builtin import imageformat
from dtbuild.plugins.builtin.compressors import GzipCompressor, NoneCompressor
from dtbuild.plugins.image_description import ImageDescription, ImageDescriptionError, LayerDescriptor

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def description(**changes: object) -> ImageDescription:
    fields: dict[str, object] = {
        "label": "//app:app", "repo_tags": ("app:v1",), "manifest_digest": D1, "config_digest": D2,
        "layers": (LayerDescriptor(D3, D3, 10, NoneCompressor.OCI_LAYER_MEDIA_TYPE),),
        "archive": "dtbuild-out/app/app.tar", "oci_layout": "dtbuild-out/app/app.oci",
    }
    fields.update(changes)
    return ImageDescription(**fields)  # type: ignore[arg-type]


def test_one_canonical_json_for_engine_and_plugins() -> None:
    from dtbuild.engine import store

    assert store.canonical_json is canonical.canonical_json
    assert imageformat.canonical_json is canonical.canonical_json


def test_name_json_and_image_json_known_answers() -> None:
    desc = description()
    assert desc.to_json() == (
        b'{\n  "archive": "dtbuild-out/app/app.tar",\n  "config_digest": "' + D2.encode() + b'",\n'
        b'  "label": "//app:app",\n  "layers": [\n    {\n      "diff_id": "' + D3.encode() + b'",\n'
        b'      "digest": "' + D3.encode() + b'",\n      "media_type": "application/vnd.oci.image.layer.v1.tar",\n'
        b'      "size": 10\n    }\n  ],\n  "manifest_digest": "' + D1.encode() + b'",\n'
        b'  "oci_layout": "dtbuild-out/app/app.oci",\n  "repo_tags": [\n    "app:v1"\n  ]\n}\n')
    assert desc.to_canonical_json() == canonical.canonical_json(json.loads(desc.to_json()))


def test_a_description_round_trips_and_is_hashable() -> None:
    desc = description()
    assert ImageDescription.from_json(desc.to_json()) == desc
    assert ImageDescription.from_json(desc.to_canonical_json()) == desc
    assert hash(desc) == hash(ImageDescription.from_json(desc.to_json()))
    assert description(repo_tags=["app:v1"]).repo_tags == ("app:v1",)  # lists are kept as tuples


def test_an_imported_image_writes_no_archive_or_layout_fields() -> None:
    doc = json.loads(description(archive=None, oci_layout=None).to_json())
    assert set(doc) == {"label", "repo_tags", "manifest_digest", "config_digest", "layers"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("label"), "lacks label"),
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d.update(manifest_digest="sha256:abc"), "manifest_digest must be a sha256 digest"),
        (lambda d: d.update(repo_tags="app:v1"), "repo_tags must be a list"),
        (lambda d: d.update(layers={}), "layers must be a list"),
        (lambda d: d["layers"][0].update(size=-1), r"layers\[0\]: a layer's size must be a whole number"),
        (lambda d: d["layers"][0].update(size=True), "a layer's size must be a whole number"),
        (lambda d: d["layers"][0].pop("diff_id"), r"layers\[0\] lacks diff_id"),
        (lambda d: d.update(archive=3), "archive must be a string"),
    ],
)
def test_a_wrong_description_is_refused_naming_the_field(change, message) -> None:
    doc = json.loads(description().to_json())
    change(doc)
    with pytest.raises(ImageDescriptionError, match=message):
        ImageDescription.from_json(json.dumps(doc), "NAME.json")


def test_not_json_is_refused() -> None:
    with pytest.raises(ImageDescriptionError, match=r"NAME\.json is not valid JSON"):
        ImageDescription.from_json(b"{", "NAME.json")


def _config(**fields: object) -> bytes:
    return canonical.canonical_json({"architecture": "arm64", "os": "linux", "rootfs": {"type": "layers",
                                                                                        "diff_ids": []}, **fields})


def test_the_oci_index_gives_each_manifest_its_platform() -> None:
    config = _config(variant="v8")
    manifest = imageformat.make_manifest(imageformat.sha256_digest(config), len(config), [], oci=True)
    index = json.loads(imageformat.oci_index([imageformat.OciImage(manifest, config, ["app:v1"]),
                                              imageformat.OciImage(manifest, config, [])]))
    assert index["manifests"] == [
        {"mediaType": imageformat.OCI_MANIFEST_MEDIA_TYPE, "digest": imageformat.sha256_digest(manifest),
         "size": len(manifest), "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
         "annotations": {"io.containerd.image.name": "app:v1", "org.opencontainers.image.ref.name": "v1"}},
        {"mediaType": imageformat.OCI_MANIFEST_MEDIA_TYPE, "digest": imageformat.sha256_digest(manifest),
         "size": len(manifest), "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
    ]


def test_the_layout_plan_lists_each_blob_once_in_first_use_order() -> None:
    config = _config()
    layer = (D3, 5, GzipCompressor.OCI_LAYER_MEDIA_TYPE)
    manifest = imageformat.make_manifest(imageformat.sha256_digest(config), len(config), [layer, layer], oci=True)
    image = imageformat.OciImage(manifest, config, ["a:1"])
    plan = imageformat.plan_oci_layout([image, image])
    assert plan.documents == ((imageformat.sha256_digest(config), config),
                              (imageformat.sha256_digest(manifest), manifest))
    assert plan.layer_blobs == (D3,)
    assert plan.oci_layout == b'{"imageLayoutVersion":"1.0.0"}'
    assert plan.index == imageformat.oci_index([image, image])


def test_an_oci_manifest_keeps_an_oci_layer_type_it_does_not_know() -> None:
    """A plugin compressor's type (and a non-distributable layer's) goes in as it is."""
    xz = "application/vnd.oci.image.layer.v1.tar+xz"
    foreign = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    manifest = json.loads(imageformat.make_manifest(D1, 1, [(D2, 1, xz), (D3, 1, foreign)], oci=True))
    assert [layer["mediaType"] for layer in manifest["layers"]] == [xz, foreign]
    with pytest.raises(ValueError, match="is not a layer media type"):
        imageformat.make_manifest(D1, 1, [(D2, 1, xz)], oci=False)


def test_oci_layer_media_type_converts_docker_types() -> None:
    assert imageformat.oci_layer_media_type(GzipCompressor.DOCKER_LAYER_MEDIA_TYPE or "") == \
        GzipCompressor.OCI_LAYER_MEDIA_TYPE
    assert imageformat.oci_layer_media_type(NoneCompressor.OCI_LAYER_MEDIA_TYPE) == NoneCompressor.OCI_LAYER_MEDIA_TYPE
    with pytest.raises(ValueError):
        imageformat.oci_layer_media_type("text/plain")


def test_make_config_keeps_a_base_images_history_as_it_is() -> None:
    inherited = [{"created_by": "base"}, {"created_by": "ENV", "empty_layer": True}]  # no "created": kept so
    config = json.loads(imageformat.make_config("amd64", "linux", {}, [D1, D2], [{"created_by": "mine"}],
                                                "1970-01-01T00:00:01Z", inherited_history=inherited))
    assert config["history"] == [*inherited, {"created": "1970-01-01T00:00:01Z", "created_by": "mine"}]
    with pytest.raises(ValueError, match="2 entries that are not empty_layer but the image has 1 layers"):
        imageformat.make_config("amd64", "linux", {}, [D1], [{"created_by": "mine"}], "1970-01-01T00:00:01Z",
                                inherited_history=inherited)
