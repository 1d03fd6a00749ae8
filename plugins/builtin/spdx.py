"""The ``SpdxDocument`` action kind: an image's software bill of materials as an SPDX 2.3
JSON document, and the layer that puts it into the image (docs/sbom.md).

It reads the layers of the image it describes (the image tree without the sbom) once,
front to back, through :class:`~dtbuild.plugins.builtin.flatten.Flattener`, hashing each
regular file on the way (SHA1 and SHA256 in one pass). So the document lists exactly the
files of the root file system a runtime unpacks: what a whiteout or an opaque directory
hid is not there, a hard link is listed as the file it is. Each file is attributed to the
package (target) whose placement put it there with those bytes, else to the target that
wrote its layer (the image itself for what its commands made; a base image for the
layers of a pulled or imported base), and each package names the layers that hold its
files.

Everything in the document is a function of the image's bytes and the rule's parameters:
``creationInfo.created`` is the image's ``created`` (UTC, whole seconds), the
``documentNamespace`` is derived from the sha256 of the rest of the document, element
ids from labels and paths, and every list is sorted. The document cannot list itself:
its own path is left out (and so is a base image's document there, which it replaces).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from dtbuild.plugins.builtin import tar_extract
from dtbuild.plugins.builtin.flatten import FlatEntry, Flattener, FlattenError
from dtbuild.plugins.builtin.image_actions import ImageTree, LayerNote, layer_notes, write_layer_outputs
from dtbuild.plugins.builtin.layertar import LayerEntry
from dtbuild.plugins.interfaces import ActionContext, ActionFailed, ActionKind

SPDX_VERSION = "SPDX-2.3"
#: Where documents get their namespace (the SPDX specification's own example prefix):
#: a name and a digest of the content make it unique.
NAMESPACE_PREFIX = "https://spdx.org/spdxdocs/dtbuild/"
IMAGE_SPDXID = "SPDXRef-Image"
#: SPDX's externalRefs types (category OTHER) naming the layers that hold a package's
#: files: the layer's digest in the image manifest, and its diff_id (the plain tar's).
LAYER_DIGEST_REF = "oci-layer-digest"
LAYER_DIFF_ID_REF = "oci-layer-diff-id"

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")
_URI_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class FileDigests:
    """A regular file's checksums (lowercase hex)."""

    sha1: str
    sha256: str


def spdx_created(created: str) -> str:
    """SPDX's ``created`` (``YYYY-MM-DDThh:mm:ssZ``, UTC) for an image's ``created``
    attribute (RFC 3339, or "now")."""
    if created == "now":
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        moment = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        raise ActionFailed(f"the image's created time {created!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def spdx_id(kind: str, name: str) -> str:
    """An element id (``SPDXRef-`` and letters, digits, '.', '-') that is readable and
    unique: the name's safe characters, then 16 hex digits of its sha256."""
    readable = _ID_UNSAFE.sub("-", name).strip("-")[:60]
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"SPDXRef-{kind}-{readable}-{digest}" if readable else f"SPDXRef-{kind}-{digest}"


def verification_code(sha1s: Sequence[str]) -> str:
    """SPDX's package verification code: the SHA1 of the files' SHA1s, sorted and joined."""
    return hashlib.sha1("".join(sorted(sha1s)).encode()).hexdigest()


def _hash_content(entry: tar_extract.ArchiveEntry, source: IO[bytes] | None) -> FileDigests:
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    if source is not None:
        while chunk := source.read(1 << 20):
            sha1.update(chunk)
            sha256.update(chunk)
    return FileDigests(sha1.hexdigest(), sha256.hexdigest())


class SpdxDocument(ActionKind):
    """The SPDX document of the ``image`` input (an image tree) and the layer holding it
    at ``params["path"]``. Parameters: ``label`` (the image target), ``base_label`` (its
    from_image, for layers no dtbuild target wrote), ``packages`` (``{"label",
    "version", "deps"}`` of the packages the rule placed), ``placements`` (``[input
    index, destination, label]`` of the ``contents`` slot), ``created``, ``path`` and
    ``compressor`` (None: the layer is written as a plain tar)."""

    NAME = "SpdxDocument"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        p = ctx.params
        tree = ImageTree(ctx, ctx.inputs("image")[0])
        diff_ids: list[str] = list(tree.config["rootfs"]["diff_ids"])
        flat = self._flatten(ctx, tree, diff_ids)
        path = p["path"]
        self._check_path(flat.nodes, path)
        document = self.document(ctx, tree, diff_ids, flat.nodes)
        data = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
        with open(ctx.output_path("spdx"), "wb") as f:
            f.write(data)
        write_layer_outputs(ctx, self._layer_entries(flat.nodes, path, data), packages=[],
                            compressor_name=p.get("compressor"))

    # ------------------------------------------------------------------ reading the image

    @staticmethod
    def _flatten(ctx: ActionContext, tree: ImageTree, diff_ids: Sequence[str]) -> Flattener:
        flat = Flattener()
        for number, diff_id in enumerate(diff_ids):
            flat.begin_layer(number)
            try:
                with tree.layer_opener(diff_id)() as f:
                    flat.apply_layer(tar_extract.read_entries(f, compressed=False, lower_files=flat.holds_file),
                                     number, _hash_content)
            except tar_extract.UnsafeArchive as e:
                raise ActionFailed(e.message(f"layer {number + 1} ({diff_id})")) from None
            except (FlattenError, ValueError) as e:
                raise ActionFailed(f"layer {number + 1} ({diff_id}): {e}") from None
        return flat

    @staticmethod
    def _check_path(nodes: Mapping[str, FlatEntry], path: str) -> None:
        """The document's layer adds ``path`` and its parent directories: refuse an image
        where that would replace something else than a file at ``path``."""
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            node = nodes.get(parent)
            if node is not None and node.kind != "dir":
                what = f"a symbolic link to {node.target!r}" if node.kind == "symlink" else f"a {node.kind}"
                raise ActionFailed(f"the sbom goes to /{path}, but /{parent} in the image is {what}: the sbom's "
                                   "layer would replace it with a directory (make it a directory, or set "
                                   "sbom = False)")
        node = nodes.get(path)
        if node is not None and node.kind != "file":
            raise ActionFailed(f"the sbom goes to /{path}, but the image has a {node.kind} there "
                               "(remove it, or set sbom = False)")

    @staticmethod
    def _layer_entries(nodes: Mapping[str, FlatEntry], path: str, data: bytes) -> list[LayerEntry]:
        """The document at ``path`` and its parent directories, which keep the image's
        modes and owners where it has them."""
        entries = []
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            node = nodes.get(parent)
            if node is not None:
                entries.append(LayerEntry(path=parent, kind="dir", mode=node.mode, uid=node.uid, gid=node.gid))
            else:
                entries.append(LayerEntry(path=parent, kind="dir", mode=0o755))
        entries.append(LayerEntry(path=path, kind="file", mode=0o644, size=len(data),
                                  open=functools.partial(io.BytesIO, data)))
        return entries

    # ------------------------------------------------------------------ attribution

    @staticmethod
    def _placed(ctx: ActionContext) -> dict[str, list[tuple[str, str]]]:
        """Each path the rule's packages place a regular file or a symlink at: (label,
        what is placed: the file's sha256, or ``->`` and the link's target) of every
        package placing one there, in placement order."""
        contents = ctx.inputs("contents")
        placed: dict[str, list[tuple[str, str]]] = {}
        for index, dest, label in ctx.params["placements"]:
            art = contents[index]
            dest = dest.strip("/")
            if art.is_tree:
                for e in ctx.walk_tree(art):
                    if e.kind in ("file", "symlink"):
                        what = e.digest if e.kind == "file" else "->" + e.target
                        placed.setdefault(f"{dest}/{e.path}" if dest else e.path, []).append((label, what))
            elif dest:
                placed.setdefault(dest, []).append((label, art.digest if art.symlink is None else "->" + art.symlink))
        return placed

    def document(self, ctx: ActionContext, tree: ImageTree, diff_ids: Sequence[str],
                 nodes: Mapping[str, FlatEntry]) -> dict[str, Any]:
        """The SPDX document (a JSON value) of the flattened image ``nodes``."""
        p = ctx.params
        label: str = p["label"]
        known = {pkg["label"]: pkg for pkg in p["packages"]}
        placed = self._placed(ctx)
        notes = layer_notes(tree)
        layer_refs = {d.diff_id: d.digest for d in tree.description.layers}

        def owner(path: str, node: FlatEntry, what: str) -> str:
            note: LayerNote | None = notes.get(diff_ids[node.layer])
            if note is None:  # a layer of a pulled or imported base: no target of this build wrote it
                return p["base_label"] or label
            candidates = [pkg for pkg, placed_what in placed.get(path, ()) if pkg in note.packages
                          and placed_what == what]
            if candidates:
                return candidates[-1]  # the package placed last is the one whose file the layer holds
            if len(note.packages) == 1 and note.packages[0] not in known:
                return note.packages[0]  # a layer target's package, whose placements the image does not see
            # What the layer's own target made (commands, a root layer's script): a
            # layered image's customisation layer and sbom layer are the image's own.
            return note.label.removesuffix(" customisation").removesuffix(" sbom")

        files: list[dict[str, Any]] = []
        owned: dict[str, list[tuple[str, FileDigests]]] = {}  # owner label -> (file id, digests)
        # Owner label -> the diff_ids of the layers holding its files and symlinks: a
        # package that brings only symlinks (bin_sh) is listed too, without files.
        layers_of: dict[str, set[str]] = {}
        for path in sorted(nodes):
            node = nodes[path]
            if node.kind not in ("file", "symlink") or path == p["path"]:
                continue
            if node.kind == "symlink":
                layers_of.setdefault(owner(path, node, "->" + node.target), set()).add(diff_ids[node.layer])
                continue
            digests: FileDigests = node.content
            file_id = spdx_id("File", path)
            files.append({"SPDXID": file_id, "fileName": "./" + path,
                          "checksums": [{"algorithm": "SHA1", "checksumValue": digests.sha1},
                                        {"algorithm": "SHA256", "checksumValue": digests.sha256}]})
            who = owner(path, node, digests.sha256)
            owned.setdefault(who, []).append((file_id, digests))
            layers_of.setdefault(who, set()).add(diff_ids[node.layer])
        ids = {who: IMAGE_SPDXID if who == label else spdx_id("Package", who) for who in layers_of}
        ids.setdefault(label, IMAGE_SPDXID)

        def package(who: str) -> dict[str, Any]:
            entry: dict[str, Any] = {"SPDXID": ids[who], "name": who, "downloadLocation": "NOASSERTION",
                                     "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION",
                                     "copyrightText": "NOASSERTION", "filesAnalyzed": bool(owned.get(who))}
            version = known.get(who, {}).get("version")
            if version:
                entry["versionInfo"] = version
            if owned.get(who):
                entry["packageVerificationCode"] = {
                    "packageVerificationCodeValue": verification_code([d.sha1 for _, d in owned[who]])}
            refs = []
            for diff_id in sorted(layers_of.get(who, ())):
                refs.append({"referenceCategory": "OTHER", "referenceType": LAYER_DIGEST_REF,
                             "referenceLocator": layer_refs.get(diff_id, diff_id)})
                refs.append({"referenceCategory": "OTHER", "referenceType": LAYER_DIFF_ID_REF,
                             "referenceLocator": diff_id})
            if refs:
                entry["externalRefs"] = sorted(refs, key=lambda r: (r["referenceType"], r["referenceLocator"]))
            if who == label:
                entry["primaryPackagePurpose"] = "CONTAINER"
                entry["comment"] = ("The container image. Its own files are what its commands made; its packages "
                                    "are the targets whose files it holds.")
            return entry

        packages = [package(who) for who in sorted(ids)]
        relationships = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                          "relatedSpdxElement": IMAGE_SPDXID}]
        for who in sorted(ids):
            if who != label:
                relationships.append({"spdxElementId": IMAGE_SPDXID, "relationshipType": "CONTAINS",
                                      "relatedSpdxElement": ids[who]})
            for file_id, _ in owned.get(who, ()):
                relationships.append({"spdxElementId": ids[who], "relationshipType": "CONTAINS",
                                      "relatedSpdxElement": file_id})
            for dep in known.get(who, {}).get("deps", ()):
                if dep in ids:
                    relationships.append({"spdxElementId": ids[who], "relationshipType": "DEPENDS_ON",
                                          "relatedSpdxElement": ids[dep]})
        relationships.sort(key=lambda r: (r["spdxElementId"], r["relationshipType"], r["relatedSpdxElement"]))
        document: dict[str, Any] = {
            "spdxVersion": SPDX_VERSION, "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT", "name": label,
            "comment": f"The files of the image {label}: every regular file of its root file system but this "
                       f"document, /{p['path']}, which is in a layer of its own on top of the layers listed here.",
            "creationInfo": {"created": spdx_created(p["created"]), "creators": ["Tool: dtbuild"]},
            "packages": packages, "files": files, "relationships": relationships,
        }
        body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        name = _URI_UNSAFE.sub("-", label.strip("/")).strip("-") or "image"
        document["documentNamespace"] = f"{NAMESPACE_PREFIX}{name}-{hashlib.sha256(body).hexdigest()}"
        return document


SPDX_ACTION_KINDS = [SpdxDocument]
