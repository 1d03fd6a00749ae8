"""The ``ImagePull`` action kind: an image fetched from a registry by digest, verified,
and stored as an image tree (docs/image-tree.md).

Resolution: the manifest named by ``image_digest`` (checked against that digest), or,
for an index, its ``os``/``arch`` entry (checked against the entry's digest). The config
and the layers are then fetched concurrently; every blob is checked against its digest
as it arrives, every layer's uncompressed tar against the config's diff_id. Each
layer's download reports its bytes (``pull sha256:…``, ``ctx.progress``). A Docker
schema 2 manifest is converted to OCI media types (as ``skopeo copy --format oci``
does), so an OCI manifest's bytes — and digest — are kept, a Docker one's are not.

Nothing is stored unless everything matches; with ``sha256`` set, the uncompressed
docker-archive of the result (NAME.tar, as ``DockerArchive`` writes it) must have that
sha256 too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from dtbuild.plugins.builtin import imageformat, tar_extract
from dtbuild.plugins.builtin.image_actions import write_image
from dtbuild.plugins.image_description import ImageDescription, LayerDescriptor
from dtbuild.plugins.interfaces import ActionContext, ActionFailed, ActionKind
from dtbuild.plugins.progress import ProgressMeter

if TYPE_CHECKING:  # urllib3 is imported only when an image is pulled: registering the kind costs nothing
    from dtbuild.plugins.builtin.registry_client import Manifest, RegistryClient

#: Layers fetched at once.
PARALLEL_LAYERS = 6
_CHUNK = 1 << 20
_DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v1+prettyjws")


class _Hasher:
    """A sink that only hashes (to check the docker-archive's sha256 without writing it)."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.hash.update(data)
        return len(data)

    def flush(self) -> None:
        pass


class ImagePull(ActionKind):
    NAME = "ImagePull"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        from dtbuild.plugins.builtin.network_limits import NetworkSettingError, limits_from
        from dtbuild.plugins.builtin.registry_client import RegistryClient, RegistryError, parse_reference

        p = ctx.params
        ref = parse_reference(p["image_name"])
        source = f"{ref.name}@{p['image_digest']}"
        try:
            limits = limits_from(ctx.settings)
        except NetworkSettingError as e:
            raise ActionFailed(e.message + (f" (hint: {e.hint})" if e.hint else "")) from None
        client = RegistryClient(ref.registry, tls_verify=p["tls_verify"], max_connections=PARALLEL_LAYERS + 2,
                                limits=limits)
        try:
            manifest = self._resolve(ctx, client, ref.repository, p["image_digest"], source)
            self._pull(ctx, client, ref.repository, manifest, source)
        except RegistryError as e:
            message = f"cannot pull {source}: {e.message}"
            if e.hint:
                message += f" (hint: {e.hint})"
            raise ActionFailed(message) from None
        finally:
            client.close()

    # ------------------------------------------------------------------ manifest

    def _resolve(self, ctx: ActionContext, client: RegistryClient, repository: str, digest: str,
                 source: str) -> Manifest:
        """The image manifest: ``digest`` itself, or the platform's entry of the index it names."""
        from dtbuild.plugins.builtin.registry_client import (
            INDEX_MEDIA_TYPES,
            RegistryError,
            platform_of,
            select_platform,
        )

        try:
            top = client.get_manifest(repository, digest)
        except RegistryError as e:
            if e.status == 404:
                raise ActionFailed(f"{source} does not exist: the registry has no manifest with this digest; nothing "
                                   "was cached. Check image_name and image_digest (`skopeo inspect "
                                   f"docker://{source.split('@')[0]}:TAG` shows a tag's digest)") from None
            raise
        document = self._json(top, source)
        if top.media_type in INDEX_MEDIA_TYPES or "manifests" in document:
            document = self._checked(imageformat.parse_index, top.data, f"the index {top.digest} of {source}")
            wanted = f"{ctx.params['os']}/{ctx.params['arch']}"
            entry = select_platform(document, ctx.params["os"], ctx.params["arch"])
            if entry is None:
                available = ", ".join(sorted({platform_of(d) for d in document.get("manifests") or []})) or "none"
                raise ActionFailed(f"{source} is an image index without a {wanted} image (it has: {available}); set "
                                   "os and arch to one of these")
            ctx.log(f"{wanted} image of the index: {entry['digest']}")
            return client.get_manifest(repository, entry["digest"], size=entry.get("size"))
        return top

    @staticmethod
    def _checked(parse: Callable[[bytes, str], dict[str, Any]], data: bytes, what: str) -> dict[str, Any]:
        """A registry's document parsed and its shape checked by imageformat."""
        try:
            return parse(data, what)
        except imageformat.ImageFormatError as e:
            raise ActionFailed(f"{e}; the registry serves a malformed document, nothing was cached") from None

    @staticmethod
    def _json(manifest: Manifest, source: str) -> dict[str, Any]:
        if manifest.media_type in _DOCKER_SCHEMA1:
            raise ActionFailed(f"{source} is a Docker schema 1 manifest, which dtbuild does not read; pull the image "
                               "by the digest of a schema 2 or OCI manifest")
        try:  # not Manifest.json(): imageformat's parser also refuses JSON nested too deeply to read
            document = imageformat.parse_json_document(manifest.data, f"the manifest of {source}")
        except imageformat.ImageFormatError as e:
            raise ActionFailed(str(e)) from None
        if not isinstance(document, dict):
            raise ActionFailed(f"the manifest of {source} is not a JSON object")
        return document

    # ------------------------------------------------------------------ blobs

    def _pull(self, ctx: ActionContext, client: RegistryClient, repository: str, manifest: Manifest,
              source: str) -> None:
        p = ctx.params
        self._json(manifest, source)
        document = self._checked(imageformat.parse_manifest, manifest.data,
                                 f"the manifest {manifest.digest} of {source}")
        config_desc = document["config"]
        layer_descs = list(document["layers"])
        config = client.fetch_document(repository, config_desc["digest"], size=config_desc.get("size"))
        config_json = self._checked(imageformat.parse_image_config, config,
                                    f"the config {config_desc['digest']} of {source}")
        diff_ids = list(config_json["rootfs"]["diff_ids"])
        if len(diff_ids) != len(layer_descs):
            raise ActionFailed(f"the manifest of {source} lists {len(layer_descs)} layers but its config has "
                               f"{len(diff_ids)} diff_ids")
        found = f"{config_json.get('os')}/{config_json.get('architecture')}"
        if found.split("/") != [p["os"], p["arch"].split("/")[0]]:
            ctx.log(f"warning: {source} is a {found} image, not {p['os']}/{p['arch']}")
        total = sum(int(d.get("size") or 0) for d in layer_descs)
        ctx.log(f"pulling {len(layer_descs)} layer(s), {total / 1e6:.1f} MB, from {client.registry}")

        unique: dict[str, tuple[dict[str, Any], str]] = {}
        for desc, diff_id in zip(layer_descs, diff_ids, strict=True):
            unique.setdefault(desc["digest"], (desc, diff_id))
        workers = max(1, min(PARALLEL_LAYERS, len(unique)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull") as pool:
            futures = {digest: pool.submit(self._layer, ctx, client, repository, desc, diff_id, source)
                       for digest, (desc, diff_id) in unique.items()}
            results = {digest: future.result() for digest, future in futures.items()}

        layer_files: list[tuple[str, str, int]] = []
        blob_files: list[tuple[str, str, int]] = []
        descriptors: list[LayerDescriptor] = []
        for desc, diff_id in zip(layer_descs, diff_ids, strict=True):
            tar_digest, tar_size, media_type = results[desc["digest"]]
            layer_files.append((diff_id, tar_digest, tar_size))
            blob_files.append((desc["digest"], desc["digest"].removeprefix("sha256:"), int(desc["size"])))
            descriptors.append(LayerDescriptor(digest=desc["digest"], diff_id=diff_id, size=int(desc["size"]),
                                               media_type=media_type))
        served_types = [d.get("mediaType") for d in layer_descs]
        if manifest.media_type == imageformat.OCI_MANIFEST_MEDIA_TYPE and \
                served_types == [d.media_type for d in descriptors]:
            manifest_bytes = manifest.data  # kept as served: its digest stays the registry's
        else:
            manifest_bytes = imageformat.make_manifest(config_desc["digest"], len(config),
                                                       [(d.digest, d.size, d.media_type) for d in descriptors],
                                                       oci=True)
        description = ImageDescription(
            label=p["label"], repo_tags=tuple(p["repo_tags"]),
            manifest_digest=imageformat.sha256_digest(manifest_bytes), config_digest=config_desc["digest"],
            layers=tuple(descriptors), archive=p.get("archive"), oci_layout=p.get("oci_layout"))
        if p.get("sha256"):
            self._check_archive(ctx, config, layer_files, source)
        write_image(ctx, description=description, config=config, manifest=manifest_bytes, layers=layer_files,
                    blobs=blob_files)

    def _layer(self, ctx: ActionContext, client: RegistryClient, repository: str, desc: dict[str, Any],
               diff_id: str, source: str) -> tuple[str, int, str]:
        """Fetch one layer blob, store it and its uncompressed tar; return (store digest
        of the tar, its size, the OCI media type of the blob)."""
        digest = desc["digest"]
        media_type = str(desc.get("mediaType") or "")
        if desc.get("urls") and "foreign" in media_type:
            raise ActionFailed(f"layer {digest} of {source} is a foreign layer (downloaded from {desc['urls'][0]}); "
                               "dtbuild pulls only layers the registry holds")
        try:
            compression = imageformat.layer_compressor_name(media_type)
        except ValueError:
            raise ActionFailed(f"layer {digest} of {source} has the media type {media_type!r}, which is not a layer "
                               "dtbuild can read (tar, tar+gzip, tar+zstd)") from None
        compressor = ctx.compressor(compression)
        hex_digest = digest.removeprefix("sha256:")
        blob_path = os.path.join(ctx.scratch_dir, "blob-" + hex_digest)
        with open(blob_path, "w+b") as sink, \
                ProgressMeter(ctx.progress, f"pull {digest[:19]}", int(desc["size"])) as meter:
            client.fetch_blob(repository, digest, sink, size=int(desc["size"]), progress=meter.update)
        try:
            stored, _ = ctx.put_file(blob_path)
            if stored != hex_digest:
                raise ActionFailed(f"layer {digest} of {source} changed on disk while it was stored")
            if compression == "none":
                if digest != diff_id:
                    raise ActionFailed(f"layer {digest} of {source} is an uncompressed tar whose digest is not the "
                                       f"config's diff_id {diff_id}; refusing it")
                tar_digest, tar_size = stored, int(desc["size"])
            else:
                tar_path = os.path.join(ctx.scratch_dir, "tar-" + hex_digest)
                h = hashlib.sha256()
                try:
                    with open(blob_path, "rb") as raw, compressor.decompress_from(raw) as src, \
                            open(tar_path, "wb") as out:
                        while chunk := src.read(_CHUNK):
                            h.update(chunk)
                            out.write(chunk)
                except (*tar_extract.read_errors(), ValueError) as e:
                    raise ActionFailed(f"layer {digest} of {source} does not decompress as {compression}: "
                                       f"{e or type(e).__name__}") from None
                if "sha256:" + h.hexdigest() != diff_id:
                    raise ActionFailed(f"layer {digest} of {source} decompresses to content with digest "
                                       f"sha256:{h.hexdigest()}, not the config's diff_id {diff_id}; refusing it")
                tar_digest, tar_size = ctx.put_file(tar_path)
                os.unlink(tar_path)
        finally:
            os.unlink(blob_path)
        oci_type = compressor.OCI_LAYER_MEDIA_TYPE if "nondistributable" not in media_type else media_type
        return tar_digest, tar_size, oci_type

    def _check_archive(self, ctx: ActionContext, config: bytes, layer_files: list[tuple[str, str, int]],
                       source: str) -> None:
        """Compare the sha256 of the uncompressed docker-archive of the result (the bytes
        of NAME.tar) with the ``sha256`` attribute."""
        layers = [imageformat.ArchiveLayer(diff_id=diff_id, tar_size=size,
                                           open_tar=lambda d=digest: ctx.open_blob(d))  # type: ignore[misc]
                  for diff_id, digest, size in layer_files]
        image = imageformat.ArchiveImage(config=config, repo_tags=list(ctx.params["repo_tags"]), layers=layers)
        sink = _Hasher()
        imageformat.write_docker_archive(sink, [image], ctx.compressor("none"))  # type: ignore[arg-type]
        actual = sink.hash.hexdigest()
        expected = ctx.params["sha256"]
        if actual != expected:
            raise ActionFailed(f"the docker-archive of {source} has sha256 {actual}, but sha256 = \"{expected}\"; "
                               f"nothing was cached. If this is the image you want, set sha256 = \"{actual}\"")


__all__ = ["ImagePull"]
