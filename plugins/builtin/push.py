"""``dtbuild push``, a command of the built-in ``registries`` plugin: an image tree sent
to registries, reusing what they already hold.

For each repository named on the command line (several REFs may share one; tags are
grouped), the blobs (config and layers) are checked with concurrent HEADs; the missing
ones are mounted from another repository of the same registry when dtbuild pushed them
there before (the *mount record*, ``dtbuild-out/.dtbuild/registry-blobs.json``), else
uploaded, in parallel; then the manifest is PUT once per tag. With ``--format oci`` (the
default) the manifest is the image tree's own, so the pushed digest is NAME.json's
``manifest_digest``; ``--format docker`` writes Docker schema 2 media types (a
different digest; impossible with zstd layers).

The mount record is a hint, not a truth: a mount the registry declines costs nothing
(it opens the upload session the blob then goes through).

Every request runs under the ``[network]`` limits of dtbuild.toml (timeouts, a deadline
per blob and per manifest, size caps on what the registry answers). Each upload reports
its bytes (``push sha256:…``, through ``CommandAPI.progress``).

It reaches the engine only through :class:`~dtbuild.plugins.interfaces.CommandAPI`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from dtbuild.plugins.builtin import imageformat
from dtbuild.plugins.builtin.image_actions import ImageTree
from dtbuild.plugins.interfaces import CancelToken, Command, CommandAPI, CommandFailed, StoreTreeReader
from dtbuild.plugins.progress import ProgressMeter, ProgressReport

MOUNT_RECORD_FILE = "registry-blobs.json"
#: Bounds of the mount record: repositories kept per registry, blob digests per repository.
MAX_REPOSITORIES = 64
MAX_BLOBS = 2000
#: Uploads of blobs this large get a progress line of their own.
REPORT_SIZE = 8 << 20


class PushFailed(CommandFailed):
    """A push could not complete (the registry refused, failed or went away)."""


def _usage(message: str, hint: str | None = None) -> CommandFailed:
    return CommandFailed(message, hint=hint, usage=True)


def _no_progress(*, description: str, done_bytes: int, total_bytes: int | None) -> None:
    pass


@dataclass(frozen=True, slots=True)
class PushTarget:
    """One repository to push to and the tags to give the image there."""

    registry: str
    repository: str
    tags: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"


@dataclass
class PushOutcome:
    """What one repository got."""

    target: PushTarget
    digest: str = ""
    uploaded: int = 0
    mounted: int = 0
    skipped: int = 0
    uploaded_bytes: int = 0
    mounted_from: list[str] = field(default_factory=list)

    @property
    def references(self) -> list[str]:
        return [f"{self.target.name}:{tag}" for tag in self.target.tags]


@dataclass(frozen=True, slots=True)
class _Blob:
    digest: str
    size: int
    store_digest: str


def parse_targets(refs: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """(registry, repository, tag or None) of each REF; tags filled in later from the
    image when a REF has none.

    :raises CommandFailed: (usage) for a malformed REF or one with a digest.
    """
    from dtbuild.plugins.builtin.registry_client import parse_reference

    out = []
    for text in refs:
        try:
            ref = parse_reference(text)
        except ValueError as e:
            raise _usage(str(e),
                         hint="write REGISTRY/REPOSITORY[:TAG], such as registry.example.com/team/app:1") from None
        if ref.digest:
            raise _usage(f"'{text}' names a digest; a push gives the image tags",
                         hint="leave out the @sha256:... part")
        out.append((ref.registry, ref.repository, ref.tag))
    return out


def group_targets(parsed: Sequence[tuple[str, str, str | None]], image_tag: str) -> list[PushTarget]:
    """One PushTarget per repository, in command-line order, tags in order without repeats."""
    groups: dict[tuple[str, str], list[str]] = {}
    for registry, repository, tag in parsed:
        tags = groups.setdefault((registry, repository), [])
        if (tag or image_tag) not in tags:
            tags.append(tag or image_tag)
    return [PushTarget(registry, repository, tuple(tags)) for (registry, repository), tags in groups.items()]


# --------------------------------------------------------------------------- the mount record


class MountRecord:
    """Which blobs dtbuild knows each repository of a registry holds (it pushed them or
    saw them there), most recently pushed repository first: where to mount from."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
            self._registries: dict[str, dict[str, Any]] = dict(data.get("registries") or {})
        except (FileNotFoundError, ValueError, AttributeError):
            self._registries = {}

    def source_for(self, registry: str, digest: str, *, exclude: str) -> str | None:
        """The repository most recently pushed to on ``registry`` that holds ``digest``."""
        with self._lock:
            repos = self._registries.get(registry) or {}
            best = None
            for repository, entry in repos.items():
                if repository == exclude or digest not in (entry.get("blobs") or ()):
                    continue
                if best is None or entry.get("seq", 0) > repos[best].get("seq", 0):
                    best = repository
            return best

    def add(self, registry: str, repository: str, digests: Sequence[str]) -> None:
        if not digests:
            return
        with self._lock:
            repos = self._registries.setdefault(registry, {})
            seq = 1 + max((int(e.get("seq", 0)) for e in repos.values()), default=0)
            entry = repos.setdefault(repository, {"seq": seq, "blobs": []})
            entry["seq"] = seq
            blobs = [d for d in entry.get("blobs", []) if d not in digests] + list(digests)
            entry["blobs"] = blobs[-MAX_BLOBS:]
            if len(repos) > MAX_REPOSITORIES:
                for old in sorted(repos, key=lambda r: repos[r].get("seq", 0))[:len(repos) - MAX_REPOSITORIES]:
                    del repos[old]

    def save(self) -> None:
        with self._lock:
            text = json.dumps({"version": 1, "registries": self._registries}, sort_keys=True)
        temp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(temp, "wb") as f:
                f.write(text.encode())
            os.replace(temp, self.path)  # readers see the old record or the new one, never half
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            # only a hint for later pushes


# --------------------------------------------------------------------------- pushing


def push_image(reader: StoreTreeReader, artifact: Any, refs: Sequence[tuple[str, str, str | None]], *,
               state_dir: str, limits: Any, insecure: bool = False, manifest_format: str = "oci",
               transfers: int = 8, cancel: CancelToken | None = None,
               report: Callable[[str], None] = lambda _message: None,
               progress: ProgressReport = _no_progress) -> list[PushOutcome]:
    """Push the image tree ``artifact`` (read through ``reader``) to ``refs`` (from
    :func:`parse_targets`) under ``limits`` (a ``NetworkLimits``, from the workspace's
    ``[network]`` settings). Returns one outcome per repository. Uploads report their
    bytes to ``progress`` (``CommandAPI.progress``).

    :raises CommandFailed: (usage) when the image cannot have the asked manifest format.
    :raises PushFailed: when a registry fails, with what failed and how to go on.
    """
    from dtbuild.plugins.builtin.registry_client import RegistryClient, RegistryError

    cancel = cancel or threading.Event()
    tree = ImageTree(reader, artifact)  # type: ignore[arg-type]  # the reading part of an ActionContext
    description = tree.description
    repo_tag = (description.repo_tags or ("image:latest",))[0]
    targets = group_targets(refs, imageformat.split_repo_tag(repo_tag)[1])
    manifest, media_type = _manifest(tree, manifest_format)
    config = tree.entry("config.json")
    blobs = {description.config_digest: _Blob(description.config_digest, config.size, config.digest)}
    for layer in description.layers:
        entry = tree.entry("blobs/" + layer.digest.removeprefix("sha256:"))
        blobs.setdefault(layer.digest, _Blob(layer.digest, entry.size, entry.digest))
    # Largest first: long uploads start early, and run side by side with the small ones.
    ordered = sorted(blobs.values(), key=lambda b: (-b.size, b.digest))
    record = MountRecord(os.path.join(state_dir, MOUNT_RECORD_FILE))
    outcomes = []
    clients: dict[str, Any] = {}
    try:
        for target in targets:
            client = clients.get(target.registry)
            if client is None:
                client = clients[target.registry] = RegistryClient(target.registry, tls_verify=not insecure,
                                                                   max_connections=transfers, limits=limits)
            report(f"pushing {description.label} to {target.name} ({', '.join(target.tags)}): "
                   f"{len(ordered)} blob(s)")
            try:
                outcome = _push_to(client, target, ordered, reader, record, transfers, cancel, report, progress)
                for tag in target.tags:
                    outcome.digest = client.put_manifest(target.repository, tag, manifest, media_type)
            except RegistryError as e:
                raise PushFailed(f"push to {target.name} failed: {e.message}",
                                 hint=e.hint or "fix the problem and run the same command again: blobs the registry "
                                                "already has are not sent again") from None
            finally:
                record.save()
            outcomes.append(outcome)
    finally:
        for client in clients.values():
            client.close()
    return outcomes


def _manifest(tree: ImageTree, manifest_format: str) -> tuple[bytes, str]:
    if manifest_format == "oci":
        return tree.manifest_bytes, imageformat.OCI_MANIFEST_MEDIA_TYPE
    if manifest_format != "docker":
        raise _usage(f"--format must be oci or docker, but was '{manifest_format}'")
    description = tree.description
    try:
        manifest = imageformat.make_manifest(
            description.config_digest, len(tree.config_bytes),
            [(d.digest, d.size, d.media_type) for d in description.layers], oci=False)
    except ValueError as e:
        raise _usage(f"{description.label} cannot be pushed with Docker media types: {e}",
                     hint="push it with --format oci, or build it with compressor = \"gz\"") from None
    return manifest, imageformat.DOCKER_MANIFEST_MEDIA_TYPE


def _push_to(client: Any, target: PushTarget, blobs: Sequence[_Blob], reader: StoreTreeReader, record: MountRecord,
             transfers: int, cancel: CancelToken, report: Callable[[str], None],
             progress: ProgressReport = _no_progress) -> PushOutcome:
    """The blobs of one repository: concurrent HEADs, then mounts and uploads in parallel."""
    outcome = PushOutcome(target)
    present: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, transfers), thread_name_prefix="push") as pool:
        sizes = list(pool.map(lambda b: client.blob_size(target.repository, b.digest), blobs))
        missing = []
        for blob, size in zip(blobs, sizes, strict=True):
            if size is None:
                missing.append(blob)
            else:
                outcome.skipped += 1
                present.append(blob.digest)

        def send(blob: _Blob) -> tuple[_Blob, str, str | None]:
            if cancel.is_set():
                raise CommandFailed("interrupted: the push was stopped",
                                    hint="run the same command again: blobs already sent are skipped")
            source = record.source_for(target.registry, blob.digest, exclude=target.repository)
            started = time.monotonic()
            with ProgressMeter(progress, f"push {blob.digest[:19]} to {target.name}", blob.size) as meter:
                how = client.upload_blob(target.repository, blob.digest, blob.size,
                                         lambda: reader.open_blob(blob.store_digest), mount_from=source,
                                         progress=meter.update)
            if blob.size >= REPORT_SIZE:
                report(f"  {how} {blob.digest[:19]}… ({blob.size / 1e6:.1f} MB) in {time.monotonic() - started:.1f} s")
            return blob, how, source

        futures: list[Future[tuple[_Blob, str, str | None]]] = [pool.submit(send, blob) for blob in missing]
        try:
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for future in futures:
                if future.cancelled() or not future.done() or future.exception() is not None:
                    continue
                blob, how, source = future.result()
                present.append(blob.digest)
                if how == "mounted":
                    outcome.mounted += 1
                    if source and source not in outcome.mounted_from:
                        outcome.mounted_from.append(source)
                else:
                    outcome.uploaded += 1
                    outcome.uploaded_bytes += blob.size
            for future in futures:
                if future.done() and not future.cancelled() and future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
        finally:
            record.add(target.registry, target.repository, present)
    return outcome


# --------------------------------------------------------------------------- the command


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


class PushCommand(Command):
    NAME = "push"
    HELP = "push an image to registries (skips blobs they have)"
    DESCRIPTION = (
        "Build an image target's layers and config and push them to each REF: blobs the registry\n"
        "has are skipped, others mounted from another repository of the same registry or uploaded,\n"
        "several at once (--transfers). Credentials: DTBUILD_REGISTRY_USER/PASSWORD, then\n"
        "$REGISTRY_AUTH_FILE, then ~/.docker/config.json (docs/registries.md).")
    EXAMPLES = (
        "  dtbuild push //images:web registry.example.com/team/web:1.0\n"
        "  dtbuild push //images:web localhost:5000/web --insecure     a plain-HTTP registry\n"
        "  dtbuild push //images:web ghcr.io/me/web:1.0 ghcr.io/me/web:latest")

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("target", metavar="TARGET", help="the image target to push, such as //images:web")
        parser.add_argument("refs", nargs="+", metavar="REF",
                            help="REGISTRY/REPOSITORY[:TAG] (default tag: the image's own); several REFs push "
                                 "several tags")
        parser.add_argument("--insecure", action="store_true",
                            help="do not verify TLS certificates, and fall back to plain HTTP")
        parser.add_argument("--format", choices=("oci", "docker"), default="oci",
                            help="manifest media types (default oci: the digest in NAME.json; docker: not for zstd "
                                 "layers)")
        parser.add_argument("--transfers", type=int, default=8, help="blobs checked and sent at once (default 8)")

    def run(self, args: Any, api: CommandAPI) -> int:
        from dtbuild.plugins.builtin.image_commands import image_tree_of
        from dtbuild.plugins.builtin.network_limits import NetworkSettingError, limits_from

        if args.transfers < 1:
            raise _usage(f"--transfers must be at least 1, but was {args.transfers}")
        refs = parse_targets(args.refs)
        try:  # before building: a bad [network] setting fails fast
            limits = limits_from(api.settings())
        except NetworkSettingError as e:
            raise _usage(e.message, hint=e.hint) from None
        reader, artifact = image_tree_of(api, args.target, jobs=args.jobs)
        outcomes = push_image(reader, artifact, refs, state_dir=api.state_dir, limits=limits, insecure=args.insecure,
                              manifest_format=args.format, transfers=args.transfers, cancel=api.cancel,
                              report=lambda message: print(message, file=sys.stderr), progress=api.progress)
        for outcome in outcomes:
            total = outcome.uploaded + outcome.mounted + outcome.skipped
            mounted = f" from {', '.join(outcome.mounted_from)}" if outcome.mounted_from else ""
            print(f"pushed {outcome.target.name} ({', '.join(outcome.target.tags)}): {outcome.digest}; {total} "
                  f"blob(s): {outcome.uploaded} uploaded ({_megabytes(outcome.uploaded_bytes)}), {outcome.mounted} "
                  f"mounted{mounted}, {outcome.skipped} skipped (already there)", file=sys.stderr)
            for reference in outcome.references:
                print(f"{reference}@{outcome.digest}")
        return 0


__all__ = ["MOUNT_RECORD_FILE", "MountRecord", "PushCommand", "PushFailed", "PushOutcome", "PushTarget",
           "group_targets", "parse_targets", "push_image"]
