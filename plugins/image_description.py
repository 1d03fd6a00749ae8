"""The description of a built image: what NAME.json holds for users and ``image.json``
holds inside an image tree (SPEC.md "Outputs", docs/image-tree.md).

This module owns that document's shape: :class:`ImageDescription` and its
:class:`LayerDescriptor` entries, how they are written (:meth:`ImageDescription.to_json`
for NAME.json, :meth:`ImageDescription.to_canonical_json` for the image tree) and read
back, checked field by field (:meth:`ImageDescription.from_json`). Every action that makes
an image writes one, and every command that reads one (build summaries, inspect, load,
push) goes through it.

A public module of the plugin API: the standard library and :mod:`dtbuild.plugins.canonical`
only, so that the engine may read descriptions without importing the built-in plugins.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dtbuild.plugins.canonical import canonical_json

_HEX = frozenset("0123456789abcdef")
_LAYER_KEYS = ("digest", "diff_id", "size", "media_type")
_KEYS = ("label", "repo_tags", "manifest_digest", "config_digest", "layers", "archive", "oci_layout")


class ImageDescriptionError(ValueError):
    """A description whose shape is wrong; the message names the field and what it must be."""


def _is_sha256(value: object) -> bool:
    if not isinstance(value, str) or not value.startswith("sha256:"):
        return False
    hex_part = value[7:]
    return len(hex_part) == 64 and set(hex_part) <= _HEX


def _digest(value: object, what: str) -> str:
    if not _is_sha256(value):
        raise ImageDescriptionError(f"{what} must be a sha256 digest (sha256:<64 lowercase hex digits>), but is "
                                    f"{value!r}")
    return value  # type: ignore[return-value]


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ImageDescriptionError(f"{what} must be a string, but is {value!r}")
    return value


def _keys(doc: Mapping[str, Any], allowed: Sequence[str], required: Sequence[str], what: str) -> None:
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise ImageDescriptionError(f"{what} has unknown field(s) {', '.join(unknown)}; the fields are "
                                    f"{', '.join(allowed)}")
    missing = [key for key in required if key not in doc]
    if missing:
        raise ImageDescriptionError(f"{what} lacks {', '.join(missing)}")


@dataclass(frozen=True, slots=True)
class LayerDescriptor:
    """One layer of an image, bottom first: the blob the manifest lists and the
    uncompressed tar the config's ``rootfs.diff_ids`` names."""

    #: sha256 of the blob as the manifest lists it (the diff_id for a plain tar).
    digest: str
    #: sha256 of the uncompressed layer tar.
    diff_id: str
    #: Size of the blob in bytes.
    size: int
    #: OCI media type of the blob (it names the compression).
    media_type: str

    def __post_init__(self) -> None:
        _digest(self.digest, "a layer's digest")
        _digest(self.diff_id, "a layer's diff_id")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ImageDescriptionError(f"a layer's size must be a whole number of bytes, but is {self.size!r}")
        _text(self.media_type, "a layer's media_type")

    @property
    def compressed(self) -> bool:
        """Whether the blob is other bytes than the tar (a compressed layer)."""
        return self.digest != self.diff_id

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "diff_id": self.diff_id, "size": self.size, "media_type": self.media_type}

    @classmethod
    def from_dict(cls, doc: object, what: str = "the layer") -> LayerDescriptor:
        """:raises ImageDescriptionError: naming ``what`` and the field that is wrong."""
        if not isinstance(doc, dict):
            raise ImageDescriptionError(f"{what} must be an object, but is {doc!r}")
        _keys(doc, _LAYER_KEYS, _LAYER_KEYS, what)
        try:
            return cls(digest=doc["digest"], diff_id=doc["diff_id"], size=doc["size"], media_type=doc["media_type"])
        except ImageDescriptionError as e:
            raise ImageDescriptionError(f"{what}: {e}") from None


@dataclass(frozen=True, slots=True)
class ImageDescription:
    """What an image target built: NAME.json, and the ``image.json`` of its image tree."""

    #: The target that built it ("//pkg:name").
    label: str
    #: "name:tag" references; none for an archive image that had no tags.
    repo_tags: tuple[str, ...]
    #: sha256 of the OCI manifest bytes (the tree's manifest.json).
    manifest_digest: str
    #: sha256 of the config bytes (the tree's config.json; the image ID).
    config_digest: str
    layers: tuple[LayerDescriptor, ...]
    #: Workspace-relative path of the docker-archive, for targets that write one.
    archive: str | None = None
    #: Workspace-relative path of the OCI layout, for targets that write one.
    oci_layout: str | None = None

    def __post_init__(self) -> None:
        _text(self.label, "label")
        if isinstance(self.repo_tags, str) or not all(isinstance(t, str) for t in self.repo_tags):
            raise ImageDescriptionError(f"repo_tags must be a list of \"name:tag\" strings, but is "
                                        f"{self.repo_tags!r}")
        # Lists are accepted and kept as tuples: the value stays hashable and frozen.
        object.__setattr__(self, "repo_tags", tuple(self.repo_tags))
        object.__setattr__(self, "layers", tuple(self.layers))
        _digest(self.manifest_digest, "manifest_digest")
        _digest(self.config_digest, "config_digest")
        if not all(isinstance(layer, LayerDescriptor) for layer in self.layers):
            raise ImageDescriptionError("layers must be LayerDescriptor values")
        for key in ("archive", "oci_layout"):
            if getattr(self, key) is not None:
                _text(getattr(self, key), key)

    def to_dict(self) -> dict[str, Any]:
        """The JSON value. ``archive`` and ``oci_layout`` appear only for targets that
        write those outputs (an ``image_archive`` writes neither)."""
        doc: dict[str, Any] = {
            "label": self.label, "repo_tags": list(self.repo_tags), "manifest_digest": self.manifest_digest,
            "config_digest": self.config_digest, "layers": [layer.to_dict() for layer in self.layers],
        }
        if self.archive is not None:
            doc["archive"] = self.archive
        if self.oci_layout is not None:
            doc["oci_layout"] = self.oci_layout
        return doc

    def to_json(self) -> bytes:
        """NAME.json: indented, sorted keys, ASCII, one final newline."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode() + b"\n"

    def to_canonical_json(self) -> bytes:
        """The image tree's ``image.json``: canonical JSON."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, doc: object, what: str = "the image description") -> ImageDescription:
        """:raises ImageDescriptionError: naming ``what`` and the field that is wrong."""
        if not isinstance(doc, dict):
            raise ImageDescriptionError(f"{what} must be a JSON object, but is {type(doc).__name__}")
        _keys(doc, _KEYS, _KEYS[:5], what)
        tags, layers = doc["repo_tags"], doc["layers"]
        if not isinstance(tags, list):
            raise ImageDescriptionError(f"{what}: repo_tags must be a list of \"name:tag\" strings, but is {tags!r}")
        if not isinstance(layers, list):
            raise ImageDescriptionError(f"{what}: layers must be a list of objects, but is {layers!r}")
        parsed = tuple(LayerDescriptor.from_dict(layer, f"{what}: layers[{number}]")
                       for number, layer in enumerate(layers))
        try:
            return cls(label=doc["label"], repo_tags=tuple(tags), manifest_digest=doc["manifest_digest"],
                       config_digest=doc["config_digest"], layers=parsed, archive=doc.get("archive"),
                       oci_layout=doc.get("oci_layout"))
        except ImageDescriptionError as e:
            raise ImageDescriptionError(f"{what}: {e}") from None

    @classmethod
    def from_json(cls, data: bytes | str, what: str = "the image description") -> ImageDescription:
        """A description read from NAME.json or ``image.json``.

        :raises ImageDescriptionError: when it is not JSON or a field is wrong.
        """
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise ImageDescriptionError(f"{what} is not valid JSON ({e})") from None
        return cls.from_dict(doc, what)


__all__ = ["ImageDescription", "ImageDescriptionError", "LayerDescriptor"]
