"""``dtbuild lock``, a command of the built-in ``debian`` plugin: (re)write the lockfile
of ``deb_packages`` targets.

For each target it reads the rule's :class:`~dtbuild.rules.builtin.deb.DebSourcesInfo`,
gets the keyring (a source file, or built when it is another target's output), reads
each source's ``InRelease`` and verifies it with gpgv against the keyring, reads the
``Packages`` indexes it lists (checked against its SHA256), resolves the requested
packages' closure for each architecture (:mod:`.deb_repo`) and writes the lock
atomically. ``dtbuild build`` never does any of this: it only fetches what a lock names.

The lock (JSON, 2-space indent, sorted keys, a trailing newline) records the digest of
the rule's inputs (a build compares it to detect a stale lock), the keyring's sha256,
each source's InRelease sha256 and Date, and per architecture one entry per package
(name, version, architecture, URL, sha256, size, the names it depends on), sorted by name.

It reaches the engine only through :class:`~dtbuild.plugins.interfaces.CommandAPI`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from dtbuild.plugins.interfaces import Command, CommandAPI, CommandFailed

LOCK_VERSION = 1
#: The largest keyring read (Debian's whole archive keyring is about 100 KiB).
MAX_KEYRING = 16 << 20


def lock_document(info: Any, keyring: bytes, sources: Sequence[tuple[Any, Any]],
                  packages: dict[str, list[Any]]) -> dict[str, Any]:
    """The lock of ``info`` (a DebSourcesInfo): ``sources`` are (Source, Release) pairs in
    the rule's order, ``packages`` the LockedDeb lists by architecture."""
    return {
        "version": LOCK_VERSION,
        "inputs_digest": info.inputs_digest,
        "keyring_sha256": hashlib.sha256(keyring).hexdigest(),
        "sources": [{"url": source.url, "suite": source.suite, "components": list(source.components),
                     "inrelease_sha256": release.inrelease_sha256, "date": release.date}
                    for source, release in sources],
        "architectures": {arch: [p.to_json() for p in locked] for arch, locked in packages.items()},
    }


def lock_text(document: dict[str, Any]) -> str:
    """The bytes of a lock as written: 2-space indent, sorted keys, a trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` at ``path`` through a temporary file in the same directory,
    flushed to disk, then renamed over it: a reader sees the old lock or the new one."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _inside(root: str, path: str) -> bool:
    root = os.path.realpath(root)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def read_keyring(api: CommandAPI, label: str, artifact: Any, *, jobs: int = 0) -> bytes:
    """The bytes of the keyring ``artifact``: a source file read from the workspace (not
    through a link leaving it), or another target's single file, built.

    :raises CommandFailed: when it is a directory, too large, or missing.
    """
    name = artifact.path
    if getattr(artifact, "is_tree", False):
        raise CommandFailed(f"{label}: the keyring {name} is a directory",
                            hint="give one keyring file (gpg --export KEY > keyring.gpg)")
    if getattr(artifact, "is_source", False):
        path = os.path.join(api.workspace_root, name)
        if not _inside(api.workspace_root, path):
            raise CommandFailed(f"{label}: the keyring {name} is a link leading out of the workspace",
                                hint="copy the keyring into the workspace")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_KEYRING + 1)
        except FileNotFoundError:
            raise CommandFailed(f"{label}: the keyring {name} does not exist",
                                hint="for Debian: cp /usr/share/keyrings/debian-archive-keyring.gpg into the "
                                     "package") from None
        except OSError as e:
            raise CommandFailed(f"{label}: cannot read the keyring {name}: {e.strerror or e}") from None
    else:
        (built,) = api.build_artifacts(label, [artifact], jobs=jobs)
        if built.is_tree:
            raise CommandFailed(f"{label}: the keyring {name} is a directory",
                                hint="give one keyring file (gpg --export KEY > keyring.gpg)")
        with api.reader().open_blob(built.digest) as f:
            data = f.read(MAX_KEYRING + 1)
    if len(data) > MAX_KEYRING:
        raise CommandFailed(f"{label}: the keyring {name} is larger than {MAX_KEYRING >> 20} MiB: not a keyring")
    if not data:
        raise CommandFailed(f"{label}: the keyring {name} is empty",
                            hint="export the repository's key into it (gpg --export KEY > keyring.gpg)")
    return data


def _expired(valid_until: str) -> str | None:
    """``valid_until`` (a release's Valid-Until) when it is in the past, else None."""
    import datetime
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(valid_until)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return valid_until if when < datetime.datetime.now(datetime.UTC) else None


def lock_target(api: CommandAPI, label: str, info: Any, *, jobs: int = 0) -> tuple[str, dict[str, Any]]:
    """Resolve ``info`` (the DebSourcesInfo of ``label``) and return the lock's path (in
    the workspace) and document. Nothing is written.

    :raises CommandFailed: for anything that stops the lock, naming the target.
    """
    from dtbuild.plugins.builtin import deb_repo
    from dtbuild.plugins.builtin.network_limits import NetworkSettingError, limits_from

    try:
        limits = limits_from(api.settings())
    except NetworkSettingError as e:
        raise CommandFailed(e.message, hint=e.hint, usage=True) from None
    try:
        sources = [deb_repo.parse_source(text) for text in info.sources]
    except ValueError as e:
        raise CommandFailed(f"{label}: {e}") from None
    if not sources:
        raise CommandFailed(f"{label}: 'sources' is empty", hint="name at least one 'URL SUITE COMPONENT'")
    keyring = read_keyring(api, label, info.keyring, jobs=jobs)
    keyring_name = info.keyring.path
    reader = deb_repo.RepositoryReader(limits, progress=api.progress, cancel=api.cancel)
    try:
        releases = []
        for source in sources:
            api.report(f"lock {label}: reading {source.inrelease_url}")
            release, _digest = reader.release(source, keyring, keyring_name)
            expired = _expired(release.fields.get("Valid-Until", ""))
            if expired:
                # apt refuses such a release; a lock of a snapshot (snapshot.debian.org) needs it.
                api.report(f"lock {label}: warning: {source.inrelease_url} expired on {expired} (Valid-Until): "
                           "a snapshot is fine, a live mirror serving it is stale or replaying an old release")
            releases.append((source, release))
        locked: dict[str, list[Any]] = {}
        for arch in info.architectures:
            indexes = []
            for source, release in releases:
                for component in source.components:
                    api.report(f"lock {label}: reading the {component} index of {source.url} {source.suite} for {arch}")
                    indexes.append(reader.index(source, release, component, arch))
            try:
                locked[arch] = deb_repo.resolve(indexes, info.packages, arch)
            except deb_repo.RepositoryError as e:
                raise deb_repo.RepositoryError(f"cannot lock {label} for {arch}: {e.message}", hint=e.hint) from None
            too_large = [p for p in locked[arch] if p.size > limits.max_download]
            if too_large:
                raise deb_repo.RepositoryError(
                    f"{label}: {too_large[0].name} {too_large[0].version} has {too_large[0].size} bytes, more than "
                    "[network] max_download: a build could not fetch it",
                    hint="raise [network] max_download in dtbuild.toml")
    except deb_repo.RepositoryError as e:
        message = e.message if e.message.startswith(("cannot lock", label)) else f"{label}: {e.message}"
        raise CommandFailed(message, hint=e.hint) from None
    return info.lockfile, lock_document(info, keyring, releases, locked)


class LockCommand(Command):
    NAME = "lock"
    HELP = "(re)write the lockfiles of package-source targets (deb_packages)"
    DESCRIPTION = (
        "Resolve each deb_packages target: read each source's InRelease and verify its signature with gpgv\n"
        "against the target's keyring, check the Packages indexes against the release's SHA256, resolve\n"
        "the requested packages' dependency closure (Depends, Pre-Depends) for each architecture, and\n"
        "write the target's lockfile. `dtbuild build` never resolves: it fetches what the lock names.")
    EXAMPLES = (
        "  dtbuild lock //base:base\n"
        "  dtbuild lock //base:base //tools:debs     several targets, one after the other")

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("targets", nargs="+", metavar="TARGET",
                            help="the deb_packages targets whose lockfile to write, such as //base:base")

    def run(self, args: Any, api: CommandAPI) -> int:
        from dtbuild.rules.builtin.deb import DebSourcesInfo

        labels = []
        for pattern in args.targets:
            label = api.resolve_target(pattern, what="deb_packages target")
            info = api.providers(label).get(DebSourcesInfo)
            if not isinstance(info, DebSourcesInfo):
                raise CommandFailed(f"{label} ({api.kind(label)}) is not a package-source target",
                                    hint="dtbuild lock takes deb_packages targets", usage=True)
            labels.append((label, info))
        for label, info in labels:
            path, document = lock_target(api, label, info, jobs=getattr(args, "jobs", 0))
            text = lock_text(document)
            full = os.path.join(api.workspace_root, path)
            try:
                with open(full, encoding="utf-8") as f:
                    unchanged = f.read() == text
            except (OSError, UnicodeDecodeError):
                unchanged = False
            if not unchanged:
                try:
                    write_atomically(full, text)
                except OSError as e:
                    raise CommandFailed(f"{label}: cannot write {path}: {e.strerror or e}") from None
            counts = ", ".join(f"{len(entries)} package{'' if len(entries) == 1 else 's'} for {arch}"
                               for arch, entries in document["architectures"].items())
            print(f"{label}: {path} {'unchanged' if unchanged else 'written'} ({counts})", file=sys.stderr)
            print(path)
        return 0


__all__ = ["LOCK_VERSION", "LockCommand", "lock_document", "lock_target", "lock_text", "read_keyring",
           "write_atomically"]
