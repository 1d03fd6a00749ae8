"""Image metadata and the archive formats images travel in.

This module owns:

* the media types of image documents (OCI and Docker schema 2; layer media types are
  the compressors' ``OCI_LAYER_MEDIA_TYPE``/``DOCKER_LAYER_MEDIA_TYPE``);
* the one writer of each document, in canonical JSON (:mod:`dtbuild.plugins.canonical`)
  so that digests are reproducible: image configs (:func:`make_config`), manifests (OCI
  and Docker schema 2, :func:`make_manifest`), the ``index.json`` and ``oci-layout`` of
  OCI layouts (:func:`oci_index`, :func:`plan_oci_layout`), the ``manifest.json``,
  ``repositories`` and legacy layer ``json`` of docker-archives; the tag of an image
  built with ``tag=None`` (:func:`content_tag`);
* writing docker-archives (:func:`write_docker_archive`, the layout ``docker save``
  writes) and OCI image layouts (:func:`write_oci_layout` on disk; the ``OciLayout``
  action writes the same files as a store tree through :func:`plan_oci_layout`);
* reading base images from docker-archives (plain, gzip or zstd), OCI archives (a tar
  of an OCI layout) and OCI layout directories (:func:`extract_image_archive`, which
  copies each layer out once, and :func:`read_image_archive`), checking every layer
  against its diff_id.

Pure library: no engine, no store. Layer tars themselves come from
:mod:`dtbuild.plugins.builtin.layertar`; the description of a built image (NAME.json) is
:class:`dtbuild.plugins.image_description.ImageDescription`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from dtbuild.plugins.builtin import tar_extract
from dtbuild.plugins.builtin.compressors import (
    BUILTIN_COMPRESSORS,
    GzipCompressor,
    NoneCompressor,
    compressor_named,
)
from dtbuild.plugins.builtin.layertar import (
    BLOCK_SIZE,
    END_OF_ARCHIVE,
    LayerEntry,
    TarStream,
    entry_header,
    sorted_entries,
)
from dtbuild.plugins.canonical import canonical_json
from dtbuild.plugins.interfaces import Compressor

OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
#: The media type of a layer blob that is the uncompressed tar itself.
PLAIN_LAYER_MEDIA_TYPE = NoneCompressor.OCI_LAYER_MEDIA_TYPE
OCI_LAYOUT_VERSION = "1.0.0"
#: The ``created`` of the legacy per-layer ``json`` files of a docker-archive (the
#: layers' own mtime, so that a layer directory does not depend on the image).
LEGACY_LAYER_CREATED = "1970-01-01T00:00:01Z"

_CHUNK = 1 << 20
_INDEX_TYPES = (OCI_INDEX_MEDIA_TYPE, DOCKER_MANIFEST_LIST_MEDIA_TYPE)
_MANIFEST_TYPES = (OCI_MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST_MEDIA_TYPE)
#: Small members of an archive that are read into memory while scanning it.
_SMALL_MEMBER = 4 << 20


# --------------------------------------------------------------------------- metadata


def sha256_digest(data: bytes) -> str:
    """``"sha256:<hex>"`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hex(digest: str) -> str:
    algorithm, _, hex_part = digest.partition(":")
    if algorithm != "sha256" or len(hex_part) != 64 or not all(c in "0123456789abcdef" for c in hex_part):
        raise ValueError(f"{digest!r} is not a sha256 digest (sha256:<64 lowercase hex digits>)")
    return hex_part


def make_config(architecture: str, os: str, config: dict[str, Any], diff_ids: Sequence[str],
                history: Sequence[Mapping[str, Any]], created: str, *,
                inherited_history: Sequence[Mapping[str, Any]] = ()) -> bytes:
    """An image config (OCI and Docker share it) as canonical JSON bytes.

    :param config: the runtime config (``Env``, ``Cmd``, ``Entrypoint``, ...).
    :param diff_ids: the layers' diff_ids, bottom first (a base image's first).
    :param history: the new entries, in order; each layer-bearing entry (not
        ``empty_layer``) needs a non-empty ``created_by``, and an entry without
        ``created`` gets ``created``.
    :param inherited_history: a base image's entries, kept as they are, before ``history``.
        Together, exactly one entry per layer must not be ``empty_layer`` (registries
        reject a config whose layer-bearing history differs from its layers).
    :raises ValueError: when history and layers disagree.
    """
    for diff_id in diff_ids:
        _hex(diff_id)
    entries = [dict(item) for item in inherited_history]
    bearing = sum(1 for item in entries if not item.get("empty_layer"))
    for item in history:
        entry = dict(item)
        entry.setdefault("created", created)
        if not entry.get("empty_layer"):
            bearing += 1
            if not entry.get("created_by"):
                raise ValueError(f"history entry {len(entries)} describes a layer but has no created_by")
        entries.append(entry)
    if bearing != len(diff_ids):
        raise ValueError(f"the history has {bearing} entries that are not empty_layer but the image has "
                         f"{len(diff_ids)} layers; registries reject such configs")
    return canonical_json({
        "architecture": architecture, "os": os, "created": created, "config": config,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}, "history": entries,
    })


#: Layer media types: (OCI, Docker schema 2 or None, compressor NAME).
LAYER_MEDIA_TYPES: tuple[tuple[str, str | None, str], ...] = tuple(
    (cls.OCI_LAYER_MEDIA_TYPE, cls.DOCKER_LAYER_MEDIA_TYPE, cls.NAME) for cls in BUILTIN_COMPRESSORS)


@dataclass(frozen=True)
class Compressors:
    """The compressors an archive is read with: the registered ones (an action's
    ``ctx.compressors()``), each told by its ``MAGIC`` or its layer media types, and a
    way to get one by NAME (an action's ``ctx.compressor``, which records the use).
    :meth:`builtin` gives dtbuild's own, for code that runs outside the engine."""

    classes: Mapping[str, type[Compressor]]
    named: Callable[[str], Compressor]

    @classmethod
    def builtin(cls) -> Compressors:
        return cls({c.NAME: c for c in BUILTIN_COMPRESSORS}, compressor_named)

    @classmethod
    def of(cls, ctx: Any) -> Compressors:
        """The compressors registered with the engine, through an ActionContext."""
        return cls(ctx.compressors(), ctx.compressor)

    def detect(self, head: bytes) -> str:
        """The NAME of the compressor whose magic starts ``head`` (the longest magic
        wins), else ``"none"``. Give at least :data:`HEAD_SIZE` bytes."""
        found = [c for c in self.classes.values() if c.MAGIC and head.startswith(c.MAGIC)]
        if not found:
            return NoneCompressor.NAME
        return max(found, key=lambda c: len(c.MAGIC)).NAME

    def layer_media_type_name(self, media_type: str) -> str | None:
        """The NAME of the compressor whose OCI or Docker layer media type this is."""
        for c in self.classes.values():
            if media_type in (c.OCI_LAYER_MEDIA_TYPE, c.DOCKER_LAYER_MEDIA_TYPE):
                return c.NAME
        return None


#: Bytes of a stream read to tell its compression (at least the longest MAGIC).
HEAD_SIZE = 16


def layer_compressor_name(media_type: str, compressors: Compressors | None = None) -> str:
    """The compressor NAME (``none``, ``gz``, ``zstd``, or a plugin's) of a layer media
    type, OCI or Docker (also the non-distributable/foreign variants).

    :param compressors: the registered compressors (default: the built-in ones).
    :raises ValueError: for a media type that is not a layer's.
    """
    for oci, docker, name in LAYER_MEDIA_TYPES:
        if media_type in (oci, docker):
            return name
    if compressors is not None:
        found = compressors.layer_media_type_name(media_type)
        if found is not None:
            return found
    if "nondistributable" in media_type or "foreign" in media_type:
        if media_type.endswith(("gzip", "+gzip")):
            return "gz"
        if media_type.endswith("zstd"):
            return "zstd"
        if media_type.endswith("tar"):
            return "none"
    raise ValueError(f"{media_type!r} is not a layer media type")


_OCI_LAYER_PREFIX = "application/vnd.oci.image.layer."


def oci_layer_media_type(media_type: str, compressors: Compressors | None = None) -> str:
    """The OCI flavour of a layer media type: an OCI type as it is (a plugin compressor's,
    a non-distributable layer's), a Docker one as the OCI type of its compression (as
    ``skopeo copy --format oci`` converts).

    :param compressors: the registered compressors (default: the built-in ones).
    :raises ValueError: for a media type that is not a layer's.
    """
    if media_type.startswith(_OCI_LAYER_PREFIX):
        return media_type
    name = layer_compressor_name(media_type, compressors)
    if compressors is not None and name in compressors.classes:
        return compressors.classes[name].OCI_LAYER_MEDIA_TYPE
    return _layer_media_type(media_type, oci=True)


def _layer_media_type(media_type: str, oci: bool) -> str:
    if oci and media_type.startswith(_OCI_LAYER_PREFIX):
        return media_type
    name = layer_compressor_name(media_type)
    for oci_type, docker_type, compressor in LAYER_MEDIA_TYPES:
        if compressor == name:
            if oci:
                return oci_type
            if docker_type is None:
                raise ValueError(f"{name} layers ({media_type}) have no Docker media type; use an OCI manifest")
            return docker_type
    raise AssertionError(name)


def make_manifest(config_digest: str, config_size: int, layers: Sequence[tuple[str, int, str]],
                  oci: bool) -> bytes:
    """An image manifest as canonical JSON bytes: OCI (image trees, OCI layouts, pushes
    of zstd layers) or Docker schema 2.

    :param layers: (blob digest, blob size, media type) bottom first; the media type may
        be given in either flavour and is written in the manifest's (an OCI layer type
        goes into an OCI manifest as it is).
    :raises ValueError: for a zstd layer in a Docker manifest (Docker has no such type).
    """
    _hex(config_digest)
    descriptors = []
    for digest, size, media_type in layers:
        _hex(digest)
        descriptors.append({"mediaType": _layer_media_type(media_type, oci), "digest": digest, "size": size})
    return canonical_json({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST_MEDIA_TYPE if oci else DOCKER_MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": OCI_CONFIG_MEDIA_TYPE if oci else DOCKER_CONFIG_MEDIA_TYPE,
                   "digest": config_digest, "size": config_size},
        "layers": descriptors,
    })


def content_tag(digest: str) -> str:
    """The tag of an image built with ``tag=None``: the first 32 hex digits of its
    config digest (``"sha256:<hex>"`` or bare hex).

    dockerTools uses its output hash, 32 characters; the config digest is the image ID
    ``docker images`` shows, it names every layer by diff_id, and it does not depend on
    the compressor, so the same image gets the same tag in every output format.
    """
    hex_part = digest.removeprefix("sha256:")
    _hex("sha256:" + hex_part)
    return hex_part[:32]


def split_repo_tag(repo_tag: str) -> tuple[str, str]:
    """("name", "tag") of "name:tag" (a registry port, "host:5000/name", is no tag).

    :raises ValueError: without a tag.
    """
    name, sep, tag = repo_tag.rpartition(":")
    if not sep or not name or not tag or "/" in tag:
        raise ValueError(f"{repo_tag!r} is not name:tag")
    return name, tag


def short_repository(name: str) -> str:
    """A repository name as Docker shows Docker Hub's: ``docker.io/library/x`` and
    ``index.docker.io/x`` are ``x``, ``docker.io/team/x`` is ``team/x``."""
    for prefix in ("docker.io/", "index.docker.io/", "registry-1.docker.io/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.removeprefix("library/") if name.count("/") == 1 else name


def pick_archive_image(repo_tags: Sequence[Sequence[str]], *, image_name: str | None, tag: str | None,
                       index: int, what: str) -> int:
    """Which image of an archive to take (its position): the first tagged
    ``image_name:tag`` (any tag of ``image_name`` with ``tag`` None, ``tag`` of any
    repository with ``image_name`` None), else the one at ``index``. ``repo_tags``: each
    image's "name:tag" references, in the archive's order.

    :raises ValueError: naming the images the archive has, when none matches.
    """
    def shown() -> str:
        items = [f"{i}: {', '.join(tags) or '(untagged)'}" for i, tags in enumerate(repo_tags)]
        return "; ".join(items) if items else "none"

    if image_name is None and tag is None:
        if not 0 <= index < len(repo_tags):
            raise ValueError(f"{what} holds {len(repo_tags)} image(s), so index {index} is out of range "
                             f"(its images, by index: {shown()})")
        return index
    wanted = short_repository(image_name) if image_name is not None else None
    for position, tags in enumerate(repo_tags):
        for ref in tags:
            try:
                name, ref_tag = split_repo_tag(ref)
            except ValueError:
                continue
            if (wanted is None or short_repository(name) == wanted) and (tag is None or ref_tag == tag):
                return position
    asked = f"{image_name or '*'}:{tag or '*'}"
    raise ValueError(f"{what} has no image tagged {asked} (its images, by index: {shown()})")


# --------------------------------------------------------------------------- docker-archive


@dataclass(frozen=True, slots=True)
class ArchiveLayer:
    """One layer of an image to write into a docker-archive."""

    diff_id: str
    #: Size of the uncompressed layer tar.
    tar_size: int
    #: Opens the uncompressed layer tar.
    open_tar: Callable[[], IO[bytes]]
    #: Opens the layer's compressed blob, if there is one; an archive compressed the
    #: same way copies these bytes instead of compressing the tar again.
    open_blob: Callable[[], IO[bytes]] | None = None
    #: Media type of the blob (OCI or Docker; it names the compression).
    blob_media_type: str | None = None


@dataclass(frozen=True, slots=True)
class ArchiveImage:
    """One image to write into a docker-archive."""

    #: The config bytes (their sha256 is the image ID).
    config: bytes
    #: "name:tag" references docker load gives the image.
    repo_tags: Sequence[str]
    #: Bottom first; their diff_ids must be the config's.
    layers: Sequence[ArchiveLayer]


def _chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI ChainIDs: ChainID(L0) = DiffID(L0), ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append(diff_id if not chain else sha256_digest(f"{chain[-1]} {diff_id}".encode()))
    return chain


@dataclass(frozen=True, slots=True)
class _Member:
    path: str
    kind: str  # dir | file
    data: bytes = b""
    layer: ArchiveLayer | None = None


def _docker_archive_members(images: Sequence[ArchiveImage]) -> list[_Member]:
    """Every member of the archive, in ``tar --sort=name`` order."""
    members: dict[str, _Member] = {}
    layer_dirs: dict[str, str] = {}  # diff_id -> directory of its first occurrence
    manifest = []
    repositories: dict[str, dict[str, str]] = {}
    tag_owner: dict[str, int] = {}
    for number, image in enumerate(images):
        try:
            config = json.loads(image.config)
            diff_ids = list(config["rootfs"]["diff_ids"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"image {number}: its config is not an image config ({e})") from None
        if diff_ids != [layer.diff_id for layer in image.layers]:
            raise ValueError(f"image {number}: its layers ({[layer.diff_id for layer in image.layers]}) are not the "
                             f"config's diff_ids ({diff_ids})")
        config_name = _hex(sha256_digest(image.config)) + ".json"
        members[config_name] = _Member(config_name, "file", image.config)
        layer_paths = []
        parent = ""
        for layer, chain_id in zip(image.layers, _chain_ids(diff_ids), strict=True):
            directory = layer_dirs.get(layer.diff_id)
            if directory is None:
                directory = layer_dirs[layer.diff_id] = _hex(chain_id)
                legacy: dict[str, Any] = {"created": LEGACY_LAYER_CREATED, "id": directory}
                if parent:
                    legacy["parent"] = parent
                members[directory] = _Member(directory, "dir")
                members[directory + "/VERSION"] = _Member(directory + "/VERSION", "file", b"1.0")
                members[directory + "/json"] = _Member(directory + "/json", "file", canonical_json(legacy))
                members[directory + "/layer.tar"] = _Member(directory + "/layer.tar", "file", layer=layer)
            layer_paths.append(directory + "/layer.tar")
            parent = directory
        for repo_tag in image.repo_tags:
            name, tag = split_repo_tag(repo_tag)
            if tag_owner.setdefault(repo_tag, number) != number:
                raise ValueError(f"{repo_tag} names two images of the archive ({tag_owner[repo_tag]} and {number})")
            if parent:
                repositories.setdefault(name, {})[tag] = parent
        manifest.append({"Config": config_name, "RepoTags": list(image.repo_tags), "Layers": layer_paths})
    members["manifest.json"] = _Member("manifest.json", "file", canonical_json(manifest))
    if repositories:  # docker save writes it only for tagged images
        members["repositories"] = _Member("repositories", "file", canonical_json(repositories))
    order = sorted_entries(LayerEntry(m.path, "dir" if m.kind == "dir" else "file") for m in members.values())
    return [members[entry.path] for entry in order]


class _MemberWriter:
    """Compressed output made of independent members (gzip members, zstd frames): the
    current member starts at the first write after :meth:`end_member`."""

    def __init__(self, out: IO[bytes], compressor: Compressor) -> None:
        self.out = out
        self.compressor = compressor
        self.member: IO[bytes] | None = None

    def write(self, data: bytes | memoryview) -> int:
        if self.member is None:
            self.member = self.compressor.compress_to(self.out)
        self.member.write(data)
        return len(data)

    def end_member(self) -> None:
        if self.member is not None:
            self.member.close()
            self.member = None


def _reusable_blob(layer: ArchiveLayer, compressor: Compressor) -> tuple[IO[bytes], bytes] | None:
    """The layer's blob opened, with the bytes already read from it, when the blob can
    be copied as complete members of an archive compressed with ``compressor``.

    Blobs come from LayerCompress (well-formed by construction) or from base images
    (written by registries' tools, which do not pad). gzip blobs are also checked (their
    trailer); zstd frames cannot be checked without decoding, so their magic must do."""
    if not compressor.MAGIC or layer.open_blob is None or layer.blob_media_type is None:
        return None
    try:
        if (layer.blob_media_type not in (compressor.OCI_LAYER_MEDIA_TYPE, compressor.DOCKER_LAYER_MEDIA_TYPE)
                and layer_compressor_name(layer.blob_media_type) != compressor.NAME):
            return None
    except ValueError:
        return None
    blob = layer.open_blob()
    head = blob.read(len(compressor.MAGIC))
    usable = head == compressor.MAGIC
    if usable and compressor.MAGIC == GzipCompressor.MAGIC:
        # A gzip blob must end with its member's trailer, whose last field is the
        # uncompressed size mod 2**32: this rules out trailing padding or garbage, which
        # Go's reader (docker load) would reject in the middle of an archive.
        usable = blob.seekable()
        if usable:
            blob.seek(-4, io.SEEK_END)
            usable = int.from_bytes(blob.read(4), "little") == layer.tar_size % (1 << 32)
            blob.seek(len(head))
    if not usable:
        blob.close()
        return None
    return blob, head


def write_docker_archive(out: IO[bytes], images: Sequence[ArchiveImage], compressor: Compressor, *,
                         reuse_blobs: bool = True) -> None:
    """Write ``images`` as one docker-archive, the layout ``docker save`` writes,
    compressed as a whole with ``compressor`` (as dockerTools compresses its archives).

    Members, sorted by name, each mtime 1, owner 0:0: ``<layer id>/`` with ``VERSION``
    (``1.0``), ``json`` (legacy layer JSON: id, parent, created) and ``layer.tar``
    (uncompressed); ``<config hex>.json``; ``manifest.json``; ``repositories`` (when an
    image is tagged). A layer id is the hex of the layer's OCI ChainID in the first image
    that has it; a layer in several images (or twice in one) is written once.

    Only writes to ``out`` (a pipe or stdout will do). When ``reuse_blobs`` and a layer
    has a blob compressed with the same compressor, the archive is made of compressed
    members: the tar bytes before the layer, the blob's own bytes, the bytes after.
    gzip and zstd readers (Python's, zcat, zstd, Go's used by docker and skopeo) read
    concatenated members as one stream, so this decompresses to the same archive without
    compressing the layer twice. The output stays a function of the inputs.

    :raises ValueError: when an image's layers are not its config's, or a tag names
        two images.
    :raises LayerSourceChanged: when a layer tar is not ``tar_size`` bytes long.
    """
    members = _docker_archive_members(images)
    writer = _MemberWriter(out, compressor)
    stream = TarStream(_CHUNK, [writer], hashing=False)  # type: ignore[list-item]
    try:
        for member in members:
            _write_archive_member(member, stream, writer, out, compressor if reuse_blobs else None)
        stream.put(END_OF_ARCHIVE)
        stream.flush()
    finally:
        writer.end_member()  # also on errors: stops the compressor's threads
    out.flush()


def _write_archive_member(member: _Member, stream: TarStream, writer: _MemberWriter, out: IO[bytes],
                          reuse_for: Compressor | None) -> None:
    layer = member.layer
    size = layer.tar_size if layer is not None else len(member.data)
    stream.put(entry_header(LayerEntry(member.path, "dir" if member.kind == "dir" else "file",
                                       0o755 if member.kind == "dir" else 0o644, size=size)))
    if layer is None:
        stream.put(member.data + bytes(-len(member.data) % BLOCK_SIZE))
        return
    reusable = _reusable_blob(layer, reuse_for) if reuse_for is not None else None
    if reusable is None:
        stream.put_contents(layer.open_tar, layer.tar_size, f"layer {layer.diff_id}")
        return
    blob, head = reusable
    with blob:
        stream.flush()
        writer.end_member()
        out.write(head)
        while chunk := blob.read(_CHUNK):
            out.write(chunk)
    stream.put(bytes(-layer.tar_size % BLOCK_SIZE))


# --------------------------------------------------------------------------- OCI layout


@dataclass(frozen=True, slots=True)
class OciImage:
    """One image to write into an OCI layout: its manifest and config bytes (the layers
    are the manifest's) and the "name:tag" references that name it."""

    manifest: bytes
    config: bytes
    repo_tags: Sequence[str]


#: The ``oci-layout`` file of every OCI layout.
OCI_LAYOUT_FILE = canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})


def oci_index(images: Sequence[OciImage]) -> bytes:
    """The ``index.json`` of an OCI layout holding ``images``, in order.

    Each image is listed once per tag, annotated with ``org.opencontainers.image.ref.name``
    = the tag (what ``skopeo oci:DIR:tag`` and ``umoci`` look up) and
    ``io.containerd.image.name`` = "name:tag" (what ``ctr import`` uses); an untagged image
    is listed once without annotations. Each entry has the image's ``platform`` (its
    config's ``architecture``, ``os`` and ``variant``): the image-spec's index says it
    SHOULD be present when the manifest is platform-specific, which an image is.

    :raises ValueError: when a manifest does not name its config's digest.
    """
    descriptors = []
    for number, image in enumerate(images):
        manifest = json.loads(image.manifest)
        config_digest = sha256_digest(image.config)
        if manifest.get("config", {}).get("digest") != config_digest:
            raise ValueError(f"image {number}: its manifest names config {manifest.get('config', {}).get('digest')} "
                             f"but the config's digest is {config_digest}")
        config = json.loads(image.config)
        descriptor: dict[str, Any] = {
            "mediaType": manifest.get("mediaType", OCI_MANIFEST_MEDIA_TYPE), "digest": sha256_digest(image.manifest),
            "size": len(image.manifest),
            "platform": {key: config[key] for key in ("architecture", "os", "variant") if config.get(key)},
        }
        for repo_tag in image.repo_tags:
            _, tag = split_repo_tag(repo_tag)
            descriptors.append({**descriptor, "annotations": {"io.containerd.image.name": repo_tag,
                                                              "org.opencontainers.image.ref.name": tag}})
        if not image.repo_tags:
            descriptors.append(descriptor)
    return canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX_MEDIA_TYPE, "manifests": descriptors})


@dataclass(frozen=True, slots=True)
class OciLayoutPlan:
    """The files of an OCI layout: ``index.json``, ``oci-layout`` and the blobs, each
    digest once, in first-use order (an image's config, its layers, its manifest)."""

    index: bytes
    oci_layout: bytes
    #: (digest, bytes) of the manifests and configs, written from these bytes.
    documents: tuple[tuple[str, bytes], ...]
    #: Digests of the layer blobs, which the caller places (they are not held in memory).
    layer_blobs: tuple[str, ...]


def plan_oci_layout(images: Sequence[OciImage]) -> OciLayoutPlan:
    """What an OCI layout of ``images`` holds (see :func:`oci_index`).

    :raises ValueError: when a manifest does not name its config's digest.
    """
    index = oci_index(images)
    seen: set[str] = set()
    documents: list[tuple[str, bytes]] = []
    layer_blobs: list[str] = []
    for image in images:
        config_digest = sha256_digest(image.config)
        if config_digest not in seen:
            seen.add(config_digest)
            documents.append((config_digest, image.config))
        for layer in json.loads(image.manifest).get("layers", []):
            if layer["digest"] not in seen:
                seen.add(layer["digest"])
                layer_blobs.append(layer["digest"])
        manifest_digest = sha256_digest(image.manifest)
        if manifest_digest not in seen:
            seen.add(manifest_digest)
            documents.append((manifest_digest, image.manifest))
    return OciLayoutPlan(index, OCI_LAYOUT_FILE, tuple(documents), tuple(layer_blobs))


def write_oci_layout(dest_dir: str, images: Sequence[OciImage],
                     place_blob: Callable[[str, str], None]) -> None:
    """Write an OCI image layout at ``dest_dir`` (created if needed): ``oci-layout``,
    ``index.json`` (:func:`oci_index`) and ``blobs/sha256/<hex>``.

    Manifests and configs are written here; each layer blob is placed by
    ``place_blob(digest, dest_path)`` (once per digest), so the caller can hard-link it.

    :raises ValueError: when a manifest does not name its config's digest.
    """
    plan = plan_oci_layout(images)
    blobs = os.path.join(dest_dir, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    for digest, data in plan.documents:
        with open(os.path.join(blobs, _hex(digest)), "wb") as f:
            f.write(data)
    for digest in plan.layer_blobs:
        place_blob(digest, os.path.join(blobs, _hex(digest)))
    with open(os.path.join(dest_dir, "index.json"), "wb") as f:
        f.write(plan.index)
    with open(os.path.join(dest_dir, "oci-layout"), "wb") as f:
        f.write(plan.oci_layout)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class ArchiveLayerInfo:
    """A layer of an image read from an archive."""

    diff_id: str
    #: Media type of the layer as stored: the OCI descriptor's, or for a docker-archive
    #: the OCI type of the compression found in the member.
    media_type: str
    #: Opens the uncompressed layer tar; reading it to the end checks the diff_id.
    open: Callable[[], IO[bytes]]


@dataclass(frozen=True, slots=True)
class ArchiveImageInfo:
    """An image read from an archive."""

    config: bytes
    repo_tags: tuple[str, ...]
    layers: tuple[ArchiveLayerInfo, ...]


@dataclass(frozen=True, slots=True)
class ExtractedLayer:
    """A layer copied out of an archive by :func:`extract_image_archive`."""

    diff_id: str
    #: The uncompressed layer tar, checked against ``diff_id``.
    tar_path: str
    tar_size: int
    #: The compressed blob as the archive held it (None when it held the plain tar).
    blob_path: str | None
    blob_digest: str | None
    blob_size: int | None
    #: Media type of the blob (OCI), or of the plain tar.
    media_type: str


@dataclass(frozen=True, slots=True)
class ExtractedImage:
    config: bytes
    repo_tags: tuple[str, ...]
    layers: tuple[ExtractedLayer, ...]


@dataclass(frozen=True, slots=True)
class _LayerRef:
    name: str  # member path in the archive
    diff_id: str
    media_type: str | None  # OCI descriptors give it; docker-archives do not
    digest: str | None  # OCI descriptors give it


@dataclass(frozen=True, slots=True)
class _ImageRef:
    config: bytes
    repo_tags: tuple[str, ...]
    layers: tuple[_LayerRef, ...]


# --------------------------------------------------------------------------- documents read


class ImageFormatError(ValueError):
    """An image archive, OCI layout or image document that is not what its format says.
    The message names the member or the field, and what was expected there; callers
    add which archive or registry it came from."""


#: Largest JSON document (manifest.json, index.json, a manifest or config) read from an
#: archive: registries refuse manifests over 4 MiB; configs of real images are far smaller.
MAX_DOCUMENT_SIZE = 32 << 20

_Json = dict[str, Any]


def _shown(value: Any) -> str:
    """A JSON value as a message quotes it: its JSON text (cut) and what kind it is."""
    kind = ("null" if value is None else "a boolean" if isinstance(value, bool) else
            "a number" if isinstance(value, int | float) else "a string" if isinstance(value, str) else
            "a list" if isinstance(value, list) else "an object")
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (ValueError, RecursionError):
        text = "..."
    return f"{text[:60] + '...' if len(text) > 60 else text} ({kind})"


def parse_json_document(data: bytes, what: str) -> Any:
    """``data`` parsed as JSON (UTF-8).

    :raises ImageFormatError: naming ``what`` when it is not JSON.
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise ImageFormatError(f"{what} is not usable JSON: it nests too deeply") from None
    except ValueError as e:
        raise ImageFormatError(f"{what} is not valid JSON ({e})") from None


def _object(value: Any, what: str) -> _Json:
    if not isinstance(value, dict):
        raise ImageFormatError(f"{what} must be a JSON object, but is {_shown(value)}")
    return value


def _string(value: Any, what: str, *, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ImageFormatError(f"{what} must be a string, but is {_shown(value)}")
    return value


def _strings(value: Any, what: str) -> list[str]:
    """A list of strings; null is an empty list."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ImageFormatError(f"{what} must be a list of strings, but is {_shown(value)}")
    return value


def _string_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ImageFormatError(f"{what} must be an object of strings, but is {_shown(value)}")
    return value


def _sha256(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ImageFormatError(f"{what} must be a sha256 digest string, but is {_shown(value)}")
    try:
        _hex(value)
    except ValueError as e:
        raise ImageFormatError(f"{what}: {e}") from None
    return value


def _size(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ImageFormatError(f"{what} must be a size in bytes (a whole number, 0 or more), but is {_shown(value)}")
    return value


def check_descriptor(value: Any, what: str, *, media_type_required: bool = False) -> _Json:
    """An OCI content descriptor: ``digest`` (sha256), ``size``, ``mediaType`` (a string;
    required with ``media_type_required``), optional ``urls``, ``annotations`` and
    ``platform`` of the right types. Returns it unchanged.

    :raises ImageFormatError: naming ``what`` and the field.
    """
    descriptor = _object(value, what)
    _string(descriptor.get("mediaType"), f"{what}: mediaType", optional=not media_type_required)
    _sha256(descriptor.get("digest"), f"{what}: digest")
    _size(descriptor.get("size"), f"{what}: size")
    _strings(descriptor.get("urls"), f"{what}: urls")
    _string_map(descriptor.get("annotations"), f"{what}: annotations")
    if descriptor.get("platform") is not None:
        platform = _object(descriptor["platform"], f"{what}: platform")
        for key in ("architecture", "os", "variant", "os.version"):
            _string(platform.get(key), f"{what}: platform: {key}")
        _strings(platform.get("os.features"), f"{what}: platform: os.features")
        _strings(platform.get("features"), f"{what}: platform: features")
    return descriptor


def parse_image_config(data: bytes, what: str = "the image config") -> _Json:
    """An image config (OCI or Docker), its shape checked where dtbuild reads it:
    ``rootfs.diff_ids`` a list of sha256 digests; ``config`` an object whose ``Env``,
    ``Entrypoint`` and ``Cmd`` are lists of strings, ``User`` and ``WorkingDir``
    strings, ``Labels`` an object of strings, ``ExposedPorts`` and ``Volumes`` objects
    (null allowed for each); ``history`` a list of objects with string ``created``,
    ``created_by``, ``author``, ``comment`` and boolean ``empty_layer``; ``os``,
    ``architecture``, ``variant``, ``created``, ``author`` strings.

    :raises ImageFormatError: naming ``what`` and the field that is wrong.
    """
    config = _object(parse_json_document(data, what), what)
    rootfs = _object(config.get("rootfs"), f"{what}: rootfs")
    _string(rootfs.get("type"), f"{what}: rootfs.type")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise ImageFormatError(f"{what}: rootfs.diff_ids must be a list of the layers' sha256 digests, but is "
                               f"{_shown(diff_ids)}")
    for number, diff_id in enumerate(diff_ids):
        _sha256(diff_id, f"{what}: rootfs.diff_ids[{number}]")
    for key in ("os", "architecture", "variant", "created", "author", "os.version"):
        _string(config.get(key), f"{what}: {key}")
    runtime = config.get("config")
    if runtime is not None:
        runtime = _object(runtime, f"{what}: config")
        for key in ("Env", "Entrypoint", "Cmd"):
            _strings(runtime.get(key), f"{what}: config.{key}")
        for key in ("User", "WorkingDir", "StopSignal"):
            _string(runtime.get(key), f"{what}: config.{key}")
        _string_map(runtime.get("Labels"), f"{what}: config.Labels")
        for key in ("ExposedPorts", "Volumes"):
            if runtime.get(key) is not None:
                _object(runtime[key], f"{what}: config.{key}")
    history = config.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise ImageFormatError(f"{what}: history must be a list of objects, but is {_shown(history)}")
        for number, item in enumerate(history):
            entry = _object(item, f"{what}: history[{number}]")
            for key in ("created", "created_by", "author", "comment"):
                _string(entry.get(key), f"{what}: history[{number}].{key}")
            if entry.get("empty_layer") is not None and not isinstance(entry["empty_layer"], bool):
                raise ImageFormatError(f"{what}: history[{number}].empty_layer must be true or false, but is "
                                       f"{_shown(entry['empty_layer'])}")
    return config


def parse_manifest(data: bytes, what: str = "the manifest") -> _Json:
    """An image manifest (OCI or Docker schema 2): ``config`` a descriptor, ``layers`` a
    list of descriptors with a ``mediaType`` each.

    :raises ImageFormatError: naming ``what`` and the field that is wrong.
    """
    manifest = _object(parse_json_document(data, what), what)
    _string(manifest.get("mediaType"), f"{what}: mediaType")
    check_descriptor(manifest.get("config"), f"{what}: config")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ImageFormatError(f"{what}: layers must be a list of descriptors, but is {_shown(layers)}")
    for number, layer in enumerate(layers):
        check_descriptor(layer, f"{what}: layers[{number}]", media_type_required=True)
    return manifest


def parse_index(data: bytes, what: str = "the index") -> _Json:
    """An image index (OCI, or a Docker manifest list): ``manifests`` a list of
    descriptors (absent: none).

    :raises ImageFormatError: naming ``what`` and the field that is wrong.
    """
    index = _object(parse_json_document(data, what), what)
    _string(index.get("mediaType"), f"{what}: mediaType")
    manifests = index.get("manifests")
    if manifests is not None and not isinstance(manifests, list):
        raise ImageFormatError(f"{what}: manifests must be a list of descriptors, but is {_shown(manifests)}")
    for number, descriptor in enumerate(manifests or []):
        check_descriptor(descriptor, f"{what}: manifests[{number}]")
    return index


def parse_docker_manifest(data: bytes, what: str = "manifest.json") -> list[_Json]:
    """A docker-archive's ``manifest.json``: a list of objects, each with ``Config`` (a
    member name), ``Layers`` (a list of member names) and ``RepoTags`` (a list of
    strings, or null).

    :raises ImageFormatError: naming the entry and the field that is wrong.
    """
    entries = parse_json_document(data, what)
    if not isinstance(entries, list):
        raise ImageFormatError(f"{what} must be a list of images, but is {_shown(entries)}")
    for number, item in enumerate(entries):
        where = f"{what}: image {number}"
        entry = _object(item, where)
        if not isinstance(entry.get("Config"), str) or not entry["Config"]:
            raise ImageFormatError(f"{where}: Config must be the file name of the image's config in the archive, "
                                   f"but is {_shown(entry.get('Config'))}")
        layers = entry.get("Layers")
        if not isinstance(layers, list) or not all(isinstance(name, str) and name for name in layers):
            raise ImageFormatError(f"{where}: Layers must be a list of the layers' file names in the archive, but "
                                   f"is {_shown(layers)}")
        _strings(entry.get("RepoTags"), f"{where}: RepoTags")
    return entries


def _member_name(name: str) -> str:
    """An archive path normalised: no leading './' or '/', no trailing '/'; never
    outside the archive."""
    norm = posixpath.normpath("/" + name).lstrip("/")
    if not norm or norm == "." or "\x00" in norm:
        raise ImageFormatError(f"{name!r} does not name a file of the archive")
    return norm


class _Source:
    """Files of an image archive by member name."""

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        """A document's bytes (at most :data:`MAX_DOCUMENT_SIZE`)."""
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def head(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read(HEAD_SIZE)


class _DirSource(_Source):
    def __init__(self, root: str) -> None:
        self.root = root

    def path(self, name: str) -> str:
        path = os.path.join(self.root, *_member_name(name).split("/"))
        # A symlink in the layout must not make it read (and put into an image) a file
        # of the host outside the layout.
        real, root = os.path.realpath(path), os.path.realpath(self.root)
        if os.path.commonpath([real, root]) != root:
            raise ImageFormatError(f"{name} in the OCI layout {self.root} is a symbolic link to {real}, outside the "
                                   "layout")
        return path

    def has(self, name: str) -> bool:
        return os.path.isfile(self.path(name))

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            data = f.read(MAX_DOCUMENT_SIZE + 1)
        if len(data) > MAX_DOCUMENT_SIZE:
            raise ImageFormatError(f"{name} is larger than {MAX_DOCUMENT_SIZE} bytes: it is no image document")
        return data

    def open(self, name: str) -> IO[bytes]:
        path = self.path(name)
        try:
            return open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ImageFormatError(f"the OCI layout has no file {name}") from None


@dataclass(slots=True)
class _ScannedMember:
    entry: tar_extract.ArchiveEntry
    head: bytes
    size: int
    data: bytes | None  # small members
    path: str | None  # where extract_image_archive copied it
    sha256: str | None


def _unreadable_archive_errors() -> tuple[type[Exception], ...]:
    """What a damaged tar or compressed stream raises (isal's IsalError included)."""
    return tar_extract.read_errors()


#: Small members kept in memory while scanning, in all (more are read again when needed).
_SMALL_MEMBERS_TOTAL = 64 << 20
#: Members an archive's names may hold only once: which copy counts would be a guess.
_SINGLE_MEMBERS = ("manifest.json", "index.json", "oci-layout", "repositories")


class _ScannedTar(_Source):
    """A tar archive read in one pass (compressed or not) through tar_extract (names and
    links checked, no path of the archive used twice): small members kept in memory,
    every member's first bytes and, when ``copy_dir`` is given, every regular member
    copied there with its sha256. Random access afterwards: from the copies, at the
    member's offset in a plain tar, or by decompressing from the start again."""

    def __init__(self, path: str, copy_dir: str | None, compressors: Compressors) -> None:
        self.archive = path
        self.compressors = compressors
        with open(path, "rb") as f:
            self.compression = compressors.detect(f.read(HEAD_SIZE))
        self.members: dict[str, _ScannedMember] = {}
        self.links: dict[str, str] = {}
        kept = 0
        try:
            with self._open_stream() as stream:
                for number, (entry, content) in enumerate(tar_extract.read_entries(stream, compressed=False)):
                    name = entry.path
                    if entry.kind != "dir" and (name in self.members or name in self.links):
                        which = "" if name in _SINGLE_MEMBERS else " (a member stored twice)"
                        raise ImageFormatError(f"the archive holds {name} twice{which}: which one counts is "
                                               "ambiguous; write the archive again with each member once")
                    if entry.kind == "symlink":
                        self.links[name] = _member_name(posixpath.join(posixpath.dirname(name), entry.target))
                    elif entry.kind == "hardlink":
                        self.links[name] = entry.target
                    elif entry.kind == "file":
                        assert content is not None
                        member = self._scan(entry, content, copy_dir, number, keep=kept < _SMALL_MEMBERS_TOTAL)
                        kept += len(member.data or b"")
                        self.members[name] = member
        except tar_extract.UnsafeArchive as e:
            if e.damaged:
                raise ImageFormatError(f"{path} is not a readable {self.compression} tar archive: {e}") from None
            raise ImageFormatError(e.message(path)) from None
        except _unreadable_archive_errors() as e:
            raise ImageFormatError(f"{path} is not a readable {self.compression} tar archive: "
                                   f"{e or type(e).__name__}") from None

    @contextlib.contextmanager
    def _open_stream(self) -> Iterator[IO[bytes]]:
        """The archive's tar stream, decompressed."""
        with open(self.archive, "rb") as raw:
            stream = self.compressors.named(self.compression).decompress_from(raw)
            try:
                yield stream
            finally:
                stream.close()

    @staticmethod
    def _scan(entry: tar_extract.ArchiveEntry, src: IO[bytes], copy_dir: str | None, number: int,
              keep: bool) -> _ScannedMember:
        small = bytearray() if keep and entry.size <= _SMALL_MEMBER else None
        if copy_dir is None:
            head = src.read(HEAD_SIZE)
            if small is None:
                return _ScannedMember(entry, head, entry.size, None, None, None)
            return _ScannedMember(entry, head, entry.size, head + src.read(), None, None)
        path = os.path.join(copy_dir, str(number))
        digest = hashlib.sha256()
        head = b""
        with open(path, "wb") as out:
            while chunk := src.read(_CHUNK):
                if len(head) < HEAD_SIZE:
                    head = (head + chunk)[:HEAD_SIZE]
                digest.update(chunk)
                out.write(chunk)
                if small is not None:
                    small += chunk
        return _ScannedMember(entry, head, entry.size, bytes(small) if small is not None else None, path,
                              "sha256:" + digest.hexdigest())

    def _resolve(self, name: str) -> str:
        name = _member_name(name)
        for _ in range(40):
            if name in self.members:
                return name
            if name not in self.links:
                break
            name = self.links[name]
        raise KeyError(name)

    def member(self, name: str) -> _ScannedMember:
        try:
            return self.members[self._resolve(name)]
        except KeyError:
            raise ImageFormatError(f"the archive has no file {name}") from None

    def has(self, name: str) -> bool:
        try:
            self._resolve(name)
        except (KeyError, ValueError):
            return False
        return True

    def read(self, name: str) -> bytes:
        member = self.member(name)
        if member.data is not None:
            return member.data
        if member.size > MAX_DOCUMENT_SIZE:
            raise ImageFormatError(f"{name} is {member.size} bytes, more than the {MAX_DOCUMENT_SIZE} an image "
                                   "document may have")
        with self.open(name) as f:
            return f.read()

    def head(self, name: str) -> bytes:
        return self.member(name).head

    def open(self, name: str) -> IO[bytes]:
        member = self.member(name)
        if member.path is not None:
            return open(member.path, "rb")
        if member.data is not None:
            return io.BytesIO(member.data)
        if self.compression == NoneCompressor.NAME and member.entry.offset >= 0:
            return tar_extract.open_content(open(self.archive, "rb"), member.entry)
        # No random access into a compressed stream: read up to the member.
        raw = open(self.archive, "rb")  # noqa: SIM115 (closed with the member stream)
        closers: list[Any] = [raw]
        try:
            stream = self.compressors.named(self.compression).decompress_from(raw)
            closers.insert(0, stream)
            entries = tar_extract.read_entries(stream, compressed=False)
            closers.insert(0, entries)
            for entry, content in entries:
                if entry.path == member.entry.path and content is not None:
                    return _Closing(content, closers)  # type: ignore[return-value]
        except BaseException:
            for closer in closers:
                closer.close()
            raise
        for closer in closers:
            closer.close()
        raise ImageFormatError(f"the archive has no file {name}")


class _Closing(io.RawIOBase):
    """Reads ``stream``; closing also closes ``owners`` (what it comes from)."""

    def __init__(self, stream: IO[bytes], owners: Sequence[Any]) -> None:
        self._stream = stream
        self._owners = owners

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._stream.close()
            finally:
                for owner in self._owners:
                    owner.close()
        super().close()


class _Verifying(io.RawIOBase):
    """Reads ``stream`` and, at its end, checks its sha256 against ``diff_id``; a stream
    that does not decompress is an :class:`ImageFormatError` naming the layer."""

    def __init__(self, stream: IO[bytes], diff_id: str, closers: Sequence[IO[bytes]]) -> None:
        self._stream = stream
        self._diff_id = diff_id
        self._hash = hashlib.sha256()
        self._closers = closers
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            data = self._stream.read(len(buffer))
        except _unreadable_archive_errors() as e:
            raise ImageFormatError(f"layer {self._diff_id}: its blob does not decompress: "
                                   f"{e or type(e).__name__}") from None
        if not data:
            if not self._checked:
                self._checked = True
                _check_diff_id(self._diff_id, "sha256:" + self._hash.hexdigest())
            return 0
        self._hash.update(data)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            for closer in self._closers:
                closer.close()
        super().close()


def _check_diff_id(diff_id: str, actual: str) -> None:
    if actual != diff_id:
        raise ImageFormatError(f"layer {diff_id}: its uncompressed content has digest {actual}; the archive is "
                               "corrupt")


def _repo_tags(annotations: dict[str, str]) -> tuple[str, ...]:
    name = annotations.get("io.containerd.image.name")
    if name:
        return (name,)
    ref = annotations.get("org.opencontainers.image.ref.name", "")
    # A bare tag ("latest", as skopeo writes) names no repository.
    if "/" in ref or ":" in ref:
        return (ref,)
    return ()


def _read_checked(source: _Source, name: str, digest: str) -> bytes:
    data = source.read(name)
    if sha256_digest(data) != digest:
        raise ImageFormatError(f"{name} does not have its digest {digest}")
    return data


def _images(source: _Source, compressors: Compressors) -> list[_ImageRef]:
    """The images of a docker-archive (manifest.json) or OCI layout (index.json)."""
    if source.has("oci-layout"):
        layout = _object(parse_json_document(source.read("oci-layout"), "oci-layout"), "oci-layout")
        _string(layout.get("imageLayoutVersion"), "oci-layout: imageLayoutVersion")
    if source.has("manifest.json"):
        return _docker_images(source)
    if source.has("index.json"):
        return _oci_images(source, compressors)
    raise ImageFormatError("this is neither a docker-archive (no manifest.json) nor an OCI layout (no index.json)")


def _docker_images(source: _Source) -> list[_ImageRef]:
    images = []
    for number, entry in enumerate(parse_docker_manifest(source.read("manifest.json"))):
        config = source.read(entry["Config"])
        config_json = parse_image_config(config, f"{entry['Config']} (the config of manifest.json's image {number})")
        diff_ids = config_json["rootfs"]["diff_ids"]
        if len(diff_ids) != len(entry["Layers"]):
            raise ImageFormatError(f"manifest.json lists {len(entry['Layers'])} layers for {entry['Config']}, "
                                   f"whose config has {len(diff_ids)}")
        layers = tuple(_LayerRef(name, diff_id, None, None) for name, diff_id in zip(entry["Layers"], diff_ids,
                                                                                     strict=True))
        images.append(_ImageRef(config, tuple(entry.get("RepoTags") or ()), layers))
    return images


def _oci_images(source: _Source, compressors: Compressors) -> list[_ImageRef]:
    found: dict[str, _ImageRef] = {}  # manifest digest -> image; tags of repeated entries merged

    def visit(descriptor: dict[str, Any], tags: tuple[str, ...], depth: int) -> None:
        media_type = descriptor.get("mediaType")
        digest = descriptor["digest"]
        name = "blobs/sha256/" + _hex(digest)
        if media_type in _INDEX_TYPES and depth < 4:
            index = parse_index(_read_checked(source, name, digest), f"the index {name}")
            for child in index.get("manifests") or []:
                visit(child, tags, depth + 1)
            return
        if media_type not in _MANIFEST_TYPES:
            return
        if digest in found:
            image = found[digest]
            found[digest] = _ImageRef(image.config, image.repo_tags + tuple(t for t in tags
                                                                             if t not in image.repo_tags),
                                      image.layers)
            return
        manifest = parse_manifest(_read_checked(source, name, digest), f"the manifest {name}")
        config_digest = manifest["config"]["digest"]
        config_name = "blobs/sha256/" + _hex(config_digest)
        config = _read_checked(source, config_name, config_digest)
        diff_ids = parse_image_config(config, f"the config {config_name}")["rootfs"]["diff_ids"]
        if len(diff_ids) != len(manifest["layers"]):
            raise ImageFormatError(f"manifest {digest} lists {len(manifest['layers'])} layers but its config has "
                                   f"{len(diff_ids)}")
        for number, d in enumerate(manifest["layers"]):
            try:
                layer_compressor_name(d["mediaType"], compressors)
            except ValueError as e:
                raise ImageFormatError(f"the manifest {name}: layers[{number}]: {e}") from None
        layers = tuple(_LayerRef("blobs/sha256/" + _hex(d["digest"]), diff_id, d["mediaType"], d["digest"])
                       for d, diff_id in zip(manifest["layers"], diff_ids, strict=True))
        found[digest] = _ImageRef(config, tags, layers)

    index = parse_index(source.read("index.json"), "index.json")
    for descriptor in index.get("manifests") or []:
        visit(descriptor, _repo_tags(descriptor.get("annotations") or {}), 0)
    return list(found.values())


def _source(path: str, copy_dir: str | None, compressors: Compressors) -> _Source:
    if os.path.isdir(path):
        return _DirSource(path)
    return _ScannedTar(path, copy_dir, compressors)


def _stored_media_type(source: _Source, ref: _LayerRef, compressors: Compressors) -> str:
    if ref.media_type is not None:
        return ref.media_type
    return compressors.named(compressors.detect(source.head(ref.name))).OCI_LAYER_MEDIA_TYPE


def read_image_archive(path: str, compressors: Compressors | None = None) -> list[ArchiveImageInfo]:
    """The images of a docker-archive (plain, gzip or zstd: told by the magic bytes), an
    OCI archive (a tar of an OCI layout) or an OCI layout directory.

    Reads the metadata now and each layer when its ``open`` is called; a layer's stream
    raises ValueError at its end when the content does not match the diff_id. For a
    compressed archive each ``open`` decompresses the archive up to the layer, so prefer
    :func:`extract_image_archive` to read every layer. ``compressors``: the registered
    ones (default: the built-in ones).
    """
    compressors = compressors or Compressors.builtin()
    source = _source(path, None, compressors)
    out = []
    for image in _images(source, compressors):
        layers = []
        for ref in image.layers:
            media_type = _stored_media_type(source, ref, compressors)

            def opener(ref: _LayerRef = ref, media_type: str = media_type) -> IO[bytes]:
                raw = source.open(ref.name)
                try:
                    compression = compressors.detect(source.head(ref.name))
                    stream = compressors.named(compression).decompress_from(raw)
                except _unreadable_archive_errors() as e:
                    raw.close()
                    raise ImageFormatError(f"layer {ref.diff_id}: its blob does not decompress: "
                                           f"{e or type(e).__name__}") from None
                except BaseException:
                    raw.close()
                    raise
                reader = _Verifying(stream, ref.diff_id, (stream, raw))
                return io.BufferedReader(reader, buffer_size=_CHUNK)  # type: ignore[return-value]

            layers.append(ArchiveLayerInfo(ref.diff_id, media_type, opener))
        out.append(ArchiveImageInfo(image.config, image.repo_tags, tuple(layers)))
    return out


def _copy_hashing(src: IO[bytes], dest: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return "sha256:" + digest.hexdigest(), size


def extract_image_archive(path: str, dest_dir: str, compressors: Compressors | None = None,
                          ) -> list[ExtractedImage]:
    """Copy the images of an archive (the kinds :func:`read_image_archive` reads) into
    ``dest_dir`` (an existing, empty directory): ``layers/<diff_id hex>`` (uncompressed
    tars) and ``blobs/<digest hex>`` (compressed blobs as the archive held them).

    A tar archive is read once, front to back (a compressed one is decompressed once);
    each plain layer is copied once, each compressed one copied and decompressed once.
    Every layer is checked against its diff_id, every OCI blob, manifest and config
    against its digest.

    ``compressors``: the registered ones (default: the built-in ones).

    :raises ValueError: for an archive of another kind, or content that does not match
        its digest (the message names the layer).
    """
    compressors = compressors or Compressors.builtin()
    members_dir = os.path.join(dest_dir, "members")
    layers_dir = os.path.join(dest_dir, "layers")
    blobs_dir = os.path.join(dest_dir, "blobs")
    for directory in (members_dir, layers_dir, blobs_dir):
        os.makedirs(directory, exist_ok=True)
    source = _source(path, members_dir, compressors)
    done: dict[str, ExtractedLayer] = {}
    images = []
    try:
        for image in _images(source, compressors):
            layers = []
            for ref in image.layers:
                if ref.diff_id not in done:
                    done[ref.diff_id] = _extract_layer(source, ref, layers_dir, blobs_dir, compressors)
                layers.append(done[ref.diff_id])
            images.append(ExtractedImage(image.config, image.repo_tags, tuple(layers)))
    finally:
        shutil.rmtree(members_dir, ignore_errors=True)
    return images


def _extract_layer(source: _Source, ref: _LayerRef, layers_dir: str, blobs_dir: str,
                   compressors: Compressors) -> ExtractedLayer:
    media_type = _stored_media_type(source, ref, compressors)
    compression = compressors.detect(source.head(ref.name))
    tar_path = os.path.join(layers_dir, _hex(ref.diff_id))
    copied = source.member(ref.name) if isinstance(source, _ScannedTar) else None
    if compression == NoneCompressor.NAME:
        if copied is not None and copied.path is not None and copied.sha256 is not None:
            _check_diff_id(ref.diff_id, copied.sha256)
            if ref.digest is not None and ref.digest != copied.sha256:
                raise ImageFormatError(f"blob {ref.digest} of layer {ref.diff_id} has digest {copied.sha256}")
            os.replace(copied.path, tar_path)
            return ExtractedLayer(ref.diff_id, tar_path, copied.size, None, None, None,
                                  NoneCompressor.OCI_LAYER_MEDIA_TYPE)
        with source.open(ref.name) as src:
            digest, size = _copy_hashing(src, tar_path)
        _check_diff_id(ref.diff_id, digest)
        return ExtractedLayer(ref.diff_id, tar_path, size, None, None, None, NoneCompressor.OCI_LAYER_MEDIA_TYPE)
    # A compressed blob: keep it as it came, and decompress it once.
    if copied is not None and copied.path is not None and copied.sha256 is not None:
        blob_digest, blob_size = copied.sha256, copied.size
        blob_path = os.path.join(blobs_dir, _hex(blob_digest))
        os.replace(copied.path, blob_path)
    else:
        with source.open(ref.name) as src:
            staging = os.path.join(blobs_dir, "incoming")
            blob_digest, blob_size = _copy_hashing(src, staging)
        blob_path = os.path.join(blobs_dir, _hex(blob_digest))
        os.replace(staging, blob_path)
    if ref.digest is not None and ref.digest != blob_digest:
        raise ImageFormatError(f"blob {ref.digest} of layer {ref.diff_id} has digest {blob_digest}")
    try:
        with open(blob_path, "rb") as raw, compressors.named(compression).decompress_from(raw) as src:
            digest, size = _copy_hashing(src, tar_path)
    except _unreadable_archive_errors() as e:
        raise ImageFormatError(f"layer {ref.diff_id}: its {compression} blob does not decompress: "
                               f"{e or type(e).__name__}") from None
    _check_diff_id(ref.diff_id, digest)
    return ExtractedLayer(ref.diff_id, tar_path, size, blob_path, blob_digest, blob_size, media_type)

