"""The local content-addressed store: blobs by sha256, directory trees as Merkle trees,
and the action cache.

Layout under the cache directory::

    cas/ab/abcd...      blobs (files, and Directory nodes of trees), read-only
    ac/ab/<key>         action results (JSON with its own checksum)
    tmp/                temporary files, renamed into place when complete

Every write goes to a unique temporary name in ``tmp/`` (same file system) and is
renamed into place, so a crash never leaves a partial entry under its final name and two
processes writing the same entry both end with correct bytes. Durability is one step per
build rather than one fsync per blob (a tree of 20,000 files would pay 20,000 fsyncs) or
per action: an action's result is renamed into the action cache after its blobs, and the
build flushes the cache's file system once (:meth:`Store.make_durable`, ``syncfs``)
before its workspace's results index (which trusts what it names) is committed. A result
read from the action cache itself is always checked (sizes and sentinel mtimes of its
blobs), so one that a power loss separated from its blobs is a miss; a blob lost anyway
fails verification (its size or bytes) and is rebuilt.

The store's *generation* (:meth:`Store.generation`, a random token in the file
``generation``) changes whenever anything may remove or rewrite blobs: ``gc``, a corrupt
blob deleted (:meth:`Store.forget_blob`), ``expunge`` (which removes the file). A
workspace's results index remembers the generation its entries were checked under, and
while it is unchanged trusts their outputs present without a stat; a blob deleted by
hand is caught by the verified reads below and rebuilt.

Two levels of checking keep the no-op build cheap and the bytes right. Deciding whether
a blob is *present* (a cache hit) trusts a fixed sentinel mtime, its mode (0444) and the
size: a blob whose size, mtime or mode differs (someone made it writable, or wrote to
it) is re-hashed. Every read of a blob's *bytes* that leaves the store (a copy into an
action's inputs, a stream handed to an action kind, ``stream`` or ``push``) hashes the
bytes as they go by, with no extra pass: a copy hashes its chunks as it writes them, and
a stream
(:class:`VerifiedBlobReader`) checks the digest when its last byte is read, before the
reader gets that byte, or when it is closed early. A mismatch deletes the blob and
raises :class:`CorruptBlobError`, so bit rot behind a restored mtime is caught the first
time the bytes are used; the action runner then re-runs the action that produced the
blob (action rewinding, see ``execution.py``). Directory nodes are hashed whenever they
are read and their names checked (one path component each), since a shared or remote
cache may hand over anything.

Sources are never copied into the store. The action runner tells the store, when it
digests a source file, that the file holds that blob (:meth:`Store.register_source`);
every reader of blobs (streams, copies, presence) falls back to the file when ``cas/``
has no copy, opens it with O_NOFOLLOW and checks the digest while reading, so a source
edited (or replaced by a symlink) while the build runs fails the action that read it
with :class:`SourceChangedError` and never puts wrong bytes in a cache entry. Trees
(``files`` targets) therefore name blobs that only the workspace holds; such a tree is
whole in a build that digested its sources, and otherwise its producer runs again
(rewinding). Outputs under ``dtbuild-out/`` are hard links to blobs where they can be
(:meth:`Store.link_blob_to`): a blob this process did not hash is hashed before it is
linked, and a linked output edited by hand changes the blob's mtime or mode (or, behind
forged ones, its bytes), which the checks above catch.

A full disk (ENOSPC, EDQUOT) or an I/O error while writing a blob is a
:class:`DiskError` naming what was being written, where, and how much room it needed
when known; the temporary is removed. Action results carry the sha256
of their body and are dropped when it does not match. What the store writes on the host
(materialized trees and files) never has setuid, setgid or sticky bits and is never
written through a symlink; ``tmp/`` is private (0700).

Trees are stored as Directory nodes shaped like REAPI's ``Directory`` message (files,
directories and symlinks, each sorted by name), in canonical JSON, so that a remote
cache can hold them unchanged in meaning.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from dtbuild.engine.errors import StoreError
from dtbuild.plugins.canonical import canonical_json
from dtbuild.plugins.interfaces import ActionFailed, TreeEntry

#: mtime of every blob in the store: any later write to a blob changes it.
SENTINEL_MTIME_NS = 1_000_000_000 * 1_000_000_000
#: Mode of every blob in the store (and of its hard links under ``dtbuild-out/``): a
#: blob found with another mode was chmodded, maybe to be edited, and is re-hashed.
BLOB_MODE = 0o444
#: The file in the cache directory that holds the store's generation.
GENERATION_FILE = "generation"
_CHUNK = 1 << 20
#: Registered sources up to this size are read whole in one read and checked at once
#: (:meth:`Store.open_blob` returns the bytes in memory); larger ones are streamed.
SMALL_SOURCE_MAX = 1 << 20
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


_buffers = threading.local()


def read_chunks(path: str) -> Iterator[memoryview]:
    """A file's bytes in 1 MiB chunks, through one buffer per thread (a chunk is valid
    until the next one is read; callers consume each chunk before asking for another)."""
    with open(path, "rb", buffering=0) as f:
        yield from _fd_chunks(f.fileno())


def _fd_chunks(fd: int) -> Iterator[memoryview]:
    """The bytes of open file ``fd`` from its position, as :func:`read_chunks` gives them."""
    owner = not getattr(_buffers, "busy", False)
    if owner:
        view = getattr(_buffers, "view", None)
        if view is None:
            view = _buffers.view = memoryview(bytearray(_CHUNK))
        _buffers.busy = True
    else:
        view = memoryview(bytearray(_CHUNK))  # nested use: a private buffer
    try:
        while n := os.readv(fd, [view]):
            yield view[:n]
    finally:
        if owner:
            _buffers.busy = False


def hash_file(path: str) -> tuple[str, int]:
    """sha256 hex digest and size of a file."""
    h = hashlib.sha256()
    size = 0
    for chunk in read_chunks(path):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


class LostBlobError(StoreError):
    """A blob an action or an output needs is missing from the store or was corrupt (and
    deleted): the action that produced it can run again to put it back."""

    def __init__(self, message: str, digest: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.digest = digest


class MissingBlobError(LostBlobError):
    """A blob is not in the store."""


class CorruptBlobError(LostBlobError):
    """A blob's bytes did not match its digest when they were read; it was deleted."""


class DiskError(StoreError):
    """The disk was full (or failed) while dtbuild wrote to it."""


class SourceChangedError(ActionFailed):
    """A source file read in place (see :meth:`Store.register_source`) no longer holds
    the bytes the build digested: it was edited, replaced or removed while the build
    ran. The action that read it fails; nothing it wrote is kept."""

    def __init__(self, name: str, digest: str, why: str = "") -> None:
        super().__init__(f"source {name} changed while the build read it{why}; run the build again")
        self.name = name
        self.digest = digest


@dataclass(frozen=True, slots=True)
class SourceBlob:
    """Where a blob that is a source file of the workspace can be read."""

    path: str  # absolute
    name: str  # as the build names it (workspace-relative)
    size: int


#: errno values that mean "the file system cannot take these bytes", not "dtbuild is wrong".
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


def disk_error(e: OSError, what: str, where: str, *, needed: int | None = None,
               in_cache: bool = False) -> DiskError | None:
    """The :class:`DiskError` for ``e`` when it is a full disk, an exhausted quota or an
    I/O error while writing ``what`` to ``where``; None for any other error."""
    if e.errno not in DISK_ERRNOS:
        return None
    reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exhausted",
              errno.EIO: "an I/O error (EIO) occurred"}[e.errno]
    room = []
    if needed is not None:
        room.append(f"it needs {_bytes_text(needed)}")
    if os.path.isabs(where):
        with contextlib.suppress(OSError):
            room.append(f"{_bytes_text(shutil.disk_usage(_existing_parent(where)).free)} are free there")
    message = f"{reason} while writing {what} to {where}" + (f" ({', '.join(room)})" if room else "")
    if in_cache:
        hint = ("free space on the file system that holds the cache, or move the cache to a larger one with "
                "DTBUILD_CACHE_DIR (or [cache] dir in dtbuild.toml)")
    else:
        hint = ("free space on the file system that holds the workspace, or, if the cache shares it, move the "
                "cache elsewhere with DTBUILD_CACHE_DIR (or [cache] dir in dtbuild.toml)")
    if e.errno == errno.EIO:
        hint = "the disk may be failing or full; check it (dmesg), then " + hint
    return DiskError(message, hint=hint)


def _bytes_text(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _existing_parent(path: str) -> str:
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path or "."


@dataclass(frozen=True, slots=True)
class OutputValue:
    """What an action produced in one output slot."""

    digest: str  # sha256 hex of the file, or of the tree's root Directory node
    size: int
    is_tree: bool
    executable: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "is_tree": self.is_tree, "executable": self.executable}

    @staticmethod
    def from_json(d: dict[str, Any]) -> OutputValue:
        return OutputValue(str(d["digest"]), int(d["size"]), bool(d["is_tree"]), bool(d.get("executable", False)))


@dataclass(frozen=True, slots=True)
class ActionResult:
    outputs: dict[str, OutputValue]
    #: Free-form facts about the run (kind version, seconds, host-independent only).
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"outputs": {k: v.to_json() for k, v in sorted(self.outputs.items())}, "meta": self.meta}

    @staticmethod
    def from_json(d: dict[str, Any]) -> ActionResult:
        return ActionResult({k: OutputValue.from_json(v) for k, v in d["outputs"].items()}, dict(d.get("meta", {})))


class BlobWriter:
    """Write a blob in a stream; ``commit()`` hashes nothing twice and returns the digest."""

    def __init__(self, store: Store, expected_size: int | None = None) -> None:
        self._store = store
        self._path = store.temp_path("blob")
        self._expected_size = expected_size
        try:
            self._file = open(self._path, "wb")  # noqa: SIM115 - closed in commit/abort
        except OSError as e:
            raise self._disk_error(e) or e from None
        self._hash = hashlib.sha256()
        self.size = 0

    def _disk_error(self, e: OSError) -> DiskError | None:
        """A full disk as a :class:`DiskError` (after removing the temporary)."""
        if e.errno not in DISK_ERRNOS:
            return None
        self.abort()  # first, so that the error can say how much room there is without it
        return disk_error(e, "a blob", self._store.root, in_cache=True, needed=self._expected_size)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)
        try:
            self._file.write(data)
        except OSError as e:
            raise self._disk_error(e) or e from None
        self.size += len(data)
        return len(data)

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        """The sha256 (hex) of the bytes written so far: the digest :meth:`commit` will
        install the blob under. A caller that needs the digest of what it wrote reads it
        here instead of hashing the same bytes again."""
        return self._hash.hexdigest()

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as e:
            raise self._disk_error(e) or e from None

    def commit(self) -> str:
        digest = self._hash.hexdigest()
        try:
            self._file.close()
            self._store._install_blob(self._path, digest)
        except OSError as e:
            raise self._disk_error(e) or e from None
        return digest

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


class Store:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.cas_dir = os.path.join(self.root, "cas")
        self.ac_dir = os.path.join(self.root, "ac")
        self.tmp_dir = os.path.join(self.root, "tmp")
        self._counter = 0
        self._lock = threading.Lock()
        self._trusted: set[str] = set()  # blobs checked during this process
        #: Blobs whose bytes this process hashed (wrote, or read to the end): streams of
        #: them need no second check (ImageExport opens one slice of a layer per file).
        self._verified: set[str] = set()
        self._dir_cache: dict[str, dict[str, Any]] = {}
        #: Blobs that are source files of the workspace, read in place (never copied in).
        self._sources: dict[str, SourceBlob] = {}
        try:
            for d in (self.cas_dir, self.ac_dir):
                os.makedirs(d, exist_ok=True)
            make_private_dir(self.tmp_dir)
        except OSError as e:
            raise StoreError(f"cannot create the cache at {self.root}: {e.strerror}",
                             hint="point DTBUILD_CACHE_DIR or [cache] dir in dtbuild.toml at a writable directory",
                             ) from None

    # ------------------------------------------------------------------ temp names

    def temp_path(self, purpose: str) -> str:
        with self._lock:
            self._counter += 1
            n = self._counter
        return os.path.join(self.tmp_dir, f"{os.getpid()}-{threading.get_ident() % 100000}-{n}-{purpose}")

    def clean_stale_temps(self) -> None:
        """Remove temporaries left by processes that died (their pid is gone)."""
        try:
            names = os.listdir(self.tmp_dir)
        except FileNotFoundError:
            return
        for name in names:
            pid_text = name.split("-", 1)[0]
            if not pid_text.isdigit() or int(pid_text) == os.getpid():
                continue
            if _pid_alive(int(pid_text)):
                continue
            path = os.path.join(self.tmp_dir, name)
            remove_tree(path)

    # ------------------------------------------------------------------ blobs

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.cas_dir, digest[:2], digest)

    def _install_blob(self, temp: str, digest: str) -> None:
        final = self.blob_path(digest)
        os.chmod(temp, BLOB_MODE)
        os.utime(temp, ns=(SENTINEL_MTIME_NS, SENTINEL_MTIME_NS))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(temp, final)
        self._trusted.add(digest)
        self._verified.add(digest)

    def make_durable(self) -> None:
        """Flush everything written to the cache's file system to disk (syncfs; sync
        where syncfs is not to be had)."""
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(self.root, os.O_RDONLY)
            try:
                if libc.syncfs(fd) == 0:
                    return
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            pass
        os.sync()

    def register_source(self, digest: str, path: str, size: int, name: str | None = None) -> None:
        """Make blob ``digest`` readable from source file ``path`` (absolute; ``name`` is
        how errors call it) for the rest of this process, without copying it into the
        store. Every read of it goes through O_NOFOLLOW and checks the digest as the
        bytes go by: a source edited meanwhile fails the reader with
        :class:`SourceChangedError`, and its bytes never enter a cache entry."""
        known = self._sources.get(digest)
        if known is None or known.path != path:
            self._sources[digest] = SourceBlob(path, name or path, size)

    def source_of(self, digest: str) -> SourceBlob | None:
        """The source file blob ``digest`` is read from when the store has no copy."""
        return self._sources.get(digest)

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        """Whether the blob can be read: a source file of this build holds it
        (:meth:`register_source`), or an intact copy is stored. A stored blob that was
        written to or chmodded after it was stored is re-hashed; a corrupt one is
        deleted."""
        if digest in self._trusted or digest in self._sources:
            return True
        return self._stored(digest, size)

    def _stored(self, digest: str, size: int | None = None) -> bool:
        """Whether an intact copy of the blob is under ``cas/`` (sources do not count)."""
        if digest in self._trusted:
            return True
        path = self.blob_path(digest)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        if st.st_mtime_ns == SENTINEL_MTIME_NS and st.st_mode & 0o7777 == BLOB_MODE \
                and (size is None or st.st_size == size):
            self._trusted.add(digest)
            return True
        return self.verify_blob(digest)

    def verify_blob(self, digest: str) -> bool:
        """Re-hash a blob; delete it when its bytes no longer match its name."""
        path = self.blob_path(digest)
        try:
            actual, _ = hash_file(path)
        except FileNotFoundError:
            return False
        if actual != digest:
            self.forget_blob(digest)
            return False
        with contextlib.suppress(OSError):
            os.chmod(path, BLOB_MODE)  # also the mode of its links under dtbuild-out/
            os.utime(path, ns=(SENTINEL_MTIME_NS, SENTINEL_MTIME_NS))
        self._trusted.add(digest)
        self._verified.add(digest)
        return True

    def generation(self) -> str:
        """The store's generation: a token that changes whenever anything may have
        removed or rewritten blobs (made when there is none yet)."""
        try:
            with open(os.path.join(self.root, GENERATION_FILE), encoding="ascii") as f:
                token = f.read(100).strip()
            if token:
                return token
        except (OSError, ValueError):
            pass
        return self.note_removed()

    def note_removed(self) -> str:
        """Start a new generation (call before removing or rewriting blobs): whatever a
        workspace trusted under the old one is checked again. Returns the new token."""
        token = secrets.token_hex(16)
        with contextlib.suppress(OSError):
            atomic_write(os.path.join(self.root, GENERATION_FILE), token.encode() + b"\n",
                         tmp=self.temp_path("generation"))
        return token

    def forget_blob(self, digest: str) -> None:
        """Delete a blob (corrupt, or lost in part) and everything this process believed
        about it; the store's generation changes first."""
        self.note_removed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.blob_path(digest))
        self._trusted.discard(digest)
        self._verified.discard(digest)
        self._dir_cache.pop(digest, None)

    def corrupt(self, digest: str) -> CorruptBlobError:
        """Delete a blob whose bytes were read and did not match its digest, and return
        the error that says so."""
        self.forget_blob(digest)
        return CorruptBlobError(f"blob {digest} in the cache at {self.root} was corrupt (its bytes do not match "
                                "its digest); it was deleted", digest,
                                hint="run the build again: missing entries are rebuilt")

    def missing(self, digest: str) -> MissingBlobError:
        self._trusted.discard(digest)
        self._verified.discard(digest)
        return MissingBlobError(f"blob {digest} is missing from the cache at {self.root}", digest,
                                hint="run the build again: missing entries are rebuilt")

    def put_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if self._stored(digest, len(data)):
            return digest
        writer = BlobWriter(self)
        try:
            writer.write(data)
            return writer.commit()
        except BaseException:
            writer.abort()
            raise

    def put_file(self, path: str, digest: str | None = None, *, size: int | None = None) -> tuple[str, int]:
        """Copy a file into the store (hashing while copying) unless a blob with the
        given digest is already there. Returns (digest, size). ``size``, when the caller
        knows it, only makes a full disk's error say how much room was needed."""
        if digest is not None:
            size = os.stat(path).st_size
            if self._stored(digest, size):
                return digest, size
        writer = BlobWriter(self, expected_size=size)
        try:
            for chunk in read_chunks(path):
                writer.write(chunk)
            actual = writer.commit()
        except BaseException:
            writer.abort()
            raise
        if digest is not None and actual != digest:
            raise StoreError(f"{path} changed while it was being read (expected sha256 {digest}, read {actual})",
                             hint="do not edit sources while a build runs; run the build again")
        return actual, writer.size

    def writer(self, expected_size: int | None = None) -> BlobWriter:
        """A writer of one new blob (``expected_size``, when known, is what a full disk's
        error says it needed)."""
        return BlobWriter(self, expected_size)

    def open_blob(self, digest: str) -> IO[bytes]:
        """A reader of a blob's bytes that checks them against ``digest`` as they are read
        (:class:`VerifiedBlobReader`); a plain file for a blob this process already hashed.

        A blob the store has no copy of is read from the source file that holds it
        (:meth:`register_source`), always checked: a small one (up to
        ``SMALL_SOURCE_MAX`` bytes) is read whole and checked before this returns (an
        in-memory reader, nothing left to check), without looking in ``cas/`` first.

        :raises MissingBlobError: when the blob is not in the store.
        :raises SourceChangedError: when its source file is no longer what was digested.
        """
        path = self.blob_path(digest)
        source = self._sources.get(digest)
        if source is not None and source.size <= SMALL_SOURCE_MAX and digest not in self._trusted \
                and digest not in self._verified:
            # Sources are never copied into cas/: read this one first (one open, not a
            # failed open of cas/ then one of the source). A copy in cas/ (the same bytes
            # stored by an action, or an older dtbuild's) is used when the file changed.
            try:
                return io.BytesIO(self._read_small_source(digest, source))
            except SourceChangedError:
                try:
                    return VerifiedBlobReader(_VerifyingRaw(self, digest, path))
                except FileNotFoundError:
                    pass
                raise
        try:
            if digest in self._verified:
                return open(path, "rb")
            raw = _VerifyingRaw(self, digest, path)
        except FileNotFoundError:
            if source is None:
                raise self.missing(digest) from None
            raw = _VerifyingRaw(self, digest, source.path, source=source)
        return VerifiedBlobReader(raw)

    def _read_small_source(self, digest: str, source: SourceBlob) -> bytes:
        """The bytes of a small source file, read whole and checked against ``digest``
        before they are returned (no reader to check later)."""
        fd = self._open_source(digest, source, blocking=False)
        try:
            want = source.size + 1  # one byte more: a file that grew since its fstat
            try:
                data = os.read(fd, want)
            except BlockingIOError:  # a file system that honours O_NONBLOCK on files
                os.set_blocking(fd, True)
                data = os.read(fd, want)
            if 0 < len(data) < source.size:  # a short read: read on to the end
                parts = [data]
                got = len(data)
                while got < want and (chunk := os.read(fd, want - got)):
                    parts.append(chunk)
                    got += len(chunk)
                data = b"".join(parts)
        finally:
            os.close(fd)
        if len(data) != source.size or hashlib.sha256(data).hexdigest() != digest:
            raise SourceChangedError(source.name, digest)
        return data

    def _open_source(self, digest: str, source: SourceBlob, *, blocking: bool = True) -> int:
        """An fd reading the source file that holds blob ``digest``: never through a
        symlink, never anything but a regular file of the digested size (opened
        O_NONBLOCK so that a FIFO put in its place does not hang the open; ``blocking``:
        set back to blocking reads)."""
        try:
            fd = os.open(source.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            why = " (it was removed)" if e.errno == errno.ENOENT else \
                " (it is a symlink now)" if e.errno == errno.ELOOP else f" ({e.strerror})"
            raise SourceChangedError(source.name, digest, why) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceChangedError(source.name, digest, " (it is not a regular file now)")
            if st.st_size != source.size:
                raise SourceChangedError(source.name, digest,
                                         f" (it has {st.st_size} bytes, not the {source.size} it had)")
            if blocking:
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_blob(self, digest: str) -> bytes:
        with self.open_blob(digest) as f:
            return f.read()

    def _read_unverified(self, digest: str) -> bytes:
        # Directory nodes only, always stored (put_bytes never relies on a source).
        try:
            with open(self.blob_path(digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise self.missing(digest) from None

    # ------------------------------------------------------------------ trees

    def put_directory_node(self, files: list[dict[str, Any]], dirs: list[dict[str, Any]],
                           symlinks: list[dict[str, Any]], mode: int = 0o755) -> str:
        node = {
            "files": sorted(files, key=lambda e: e["name"]),
            "directories": sorted(dirs, key=lambda e: e["name"]),
            "symlinks": sorted(symlinks, key=lambda e: e["name"]),
            "mode": mode,
        }
        return self.put_bytes(canonical_json(node))

    def read_directory(self, digest: str) -> dict[str, Any]:
        """A tree's Directory node, hashed as it is read and checked (see
        :func:`check_directory_node`): a node whose bytes do not match its digest, or
        that is not a valid node, is deleted and reported missing (StoreError), so the
        action that produced the tree runs again. Whoever can write to a cache (a
        shared or remote one) must not be able to make dtbuild write outside an
        output directory by naming an entry ``../x``."""
        node = self._dir_cache.get(digest)
        if node is None:
            try:
                data = self._read_unverified(digest)  # hashed below
            except MissingBlobError:
                raise MissingBlobError(f"tree node {digest} is missing from the cache at {self.root}", digest,
                                       hint="run the build again: missing entries are rebuilt") from None
            problem = None
            if hashlib.sha256(data).hexdigest() != digest:
                problem = "its bytes do not match its digest"
            else:
                try:
                    node = json.loads(data)
                    check_directory_node(node)
                except ValueError as e:
                    problem = str(e)
            if problem is not None:
                self.forget_blob(digest)
                raise CorruptBlobError(f"tree node {digest} in the cache at {self.root} is invalid ({problem}); "
                                       "it was deleted", digest,
                                       hint="run the build again: missing entries are rebuilt")
            self._trusted.add(digest)
            self._verified.add(digest)
            assert node is not None
            self._dir_cache[digest] = node
        return node

    def put_tree_from_dir(self, path: str, *, normalize_modes: bool = True) -> tuple[str, int]:
        """Ingest a directory on disk. Modes become 0755/0644 by the owner's execute bit
        when ``normalize_modes`` (so a umask never changes a digest). Returns
        (root digest, total file bytes)."""
        total = 0

        def ingest(directory: str) -> str:
            nonlocal total
            files, dirs, links = [], [], []
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    links.append({"name": entry.name, "target": os.readlink(entry.path)})
                elif stat.S_ISDIR(st.st_mode):
                    dirs.append({"name": entry.name, "digest": ingest(entry.path)})
                elif stat.S_ISREG(st.st_mode):
                    digest, size = self.put_file(entry.path, size=st.st_size)
                    total += size
                    files.append({"name": entry.name, "digest": digest, "size": size,
                                  "mode": _file_mode(st.st_mode, normalize_modes)})
                else:
                    raise StoreError(f"{entry.path}: only files, directories and symlinks can be outputs")
            return self.put_directory_node(files, dirs, links)

        return ingest(path), total

    def walk_tree(self, digest: str, prefix: str = "") -> Iterator[TreeEntry]:
        """Entries of a tree in sorted order (GNU tar --sort=name order: a directory,
        then its contents), parents before children."""
        node = self.read_directory(digest)
        entries: list[tuple[str, str, dict[str, Any]]] = (
            [(f["name"], "file", f) for f in node["files"]]
            + [(d["name"], "dir", d) for d in node["directories"]]
            + [(s["name"], "symlink", s) for s in node["symlinks"]])
        entries.sort(key=lambda e: e[0])
        for name, kind, e in entries:
            path = prefix + name
            if kind == "file":
                yield TreeEntry(path, "file", e["mode"], e["digest"], e["size"])
            elif kind == "symlink":
                yield TreeEntry(path, "symlink", 0o777, target=e["target"])
            else:
                child = self.read_directory(e["digest"])
                yield TreeEntry(path, "dir", child.get("mode", 0o755))
                yield from self.walk_tree(e["digest"], path + "/")

    def tree_blobs_present(self, digest: str) -> bool:
        """Whether every node and file blob of a tree is present and intact."""
        try:
            node = self.read_directory(digest)
        except (StoreError, ValueError):
            return False
        for f in node["files"]:
            if not self.has_blob(f["digest"], f["size"]):
                return False
        return all(self.tree_blobs_present(d["digest"]) for d in node["directories"])

    def materialize_blob(self, digest: str, dest: str, executable: bool = False, *, link: bool = False) -> str:
        """Write a copy of a blob at ``dest`` (atomically), mode 0755 or 0644; the bytes
        are checked as they are copied (:meth:`copy_blob_to`). With ``link`` (the
        output tree), ``dest`` is read-only instead, 0555 or 0444, and where it can be
        a hard link to the stored blob (:meth:`link_blob_to`). Returns how it was
        written: "link", "clone" or "copy"."""
        tmp = dest + f".dtbuild-tmp-{os.getpid()}-{threading.get_ident()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by a killed build; never written through
        try:
            if link:
                how = self.link_blob_to(digest, tmp, 0o555 if executable else 0o444)
            else:
                how = self.copy_blob_to(digest, tmp, 0o755 if executable else 0o644)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # rename() does nothing when both names are links to one file (``dest`` already
        # was a link to the blob): the temporary name is left to remove.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        return how

    def link_blob_to(self, digest: str, dest: str, mode: int, *, dir_fd: int | None = None) -> str:
        """Put a blob at new file ``dest`` for the output tree, read-only (``mode`` without
        its write bits): a hard link to the stored blob when that mode is the blob's own
        (0444) and the file system allows it, else a reflink (FICLONE) or a copy with
        that mode. A blob only a source file holds is always copied: a workspace file is
        never linked into the output tree. A stored blob this process has not hashed is
        hashed first (its bytes are checked as a copy would check them). Returns how it
        was put there: "link", "clone" or "copy".

        A hard link shares the blob's inode: a user who makes the output writable and
        edits it edits the blob, which then fails the store's check (its mtime, mode or
        bytes) and is deleted and rebuilt, never used as it is.

        :raises MissingBlobError: when the blob is not in the store.
        :raises CorruptBlobError: when the stored blob's bytes do not match its digest.
        """
        mode &= 0o555
        path = self.blob_path(digest)
        if digest not in self._verified:
            if not os.path.exists(path):
                if digest in self._sources:
                    self.copy_blob_to(digest, dest, mode, dir_fd=dir_fd)
                    return "copy"
                raise self.missing(digest)
            if not self.verify_blob(digest):
                raise self.corrupt(digest)
        if mode == BLOB_MODE:
            try:
                os.link(path, dest, dst_dir_fd=dir_fd)
                return "link"
            except FileNotFoundError:
                if not os.path.exists(path):  # deleted since it was checked
                    raise self.missing(digest) from None
                raise
            except OSError as e:
                if e.errno not in _LINK_FALLBACK_ERRNOS:
                    raise
        return self.copy_blob_to(digest, dest, mode, dir_fd=dir_fd, clone=True)

    def copy_blob_to(self, digest: str, dest: str, mode: int, *, dir_fd: int | None = None,
                     clone: bool = False) -> str:
        """Write a copy of a blob as a new file ``dest`` (relative to ``dir_fd`` when
        given), with permission bits ``mode & 0o777``. ``dest`` must not exist: an
        existing file or symlink there is never written through. The bytes are hashed as
        they are copied: when they do not match ``digest``, the copy and the blob are
        deleted and :class:`CorruptBlobError` is raised. A failed copy leaves no ``dest``.
        A blob the store has no copy of is copied from the source file that holds it
        (:meth:`register_source`). ``clone``: the caller checked the stored blob's
        bytes, so a reflink (FICLONE) that shares them without reading them will do
        where the file system makes one. Returns "clone" or "copy".

        :raises MissingBlobError: when the blob is not in the store.
        :raises SourceChangedError: when its source file is no longer what was digested.
        """
        source = None
        try:
            src = os.open(self.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            source = self._sources.get(digest)
            if source is None:
                raise self.missing(digest) from None
            src = self._open_source(digest, source)
        how = "copy"
        try:
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=dir_fd)
            try:
                try:
                    if clone and source is None and _clone(src, out):
                        actual, how = digest, "clone"
                    else:
                        actual = _copy_hashing(src, out)
                    os.fchmod(out, mode & HOST_MODE_MASK)
                finally:
                    os.close(out)
                if actual != digest:
                    raise self.corrupt(digest) if source is None else SourceChangedError(source.name, digest)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(dest, dir_fd=dir_fd)
                raise
        finally:
            os.close(src)
        if source is None:
            self._verified.add(digest)
        return how

    def materialize_tree(self, digest: str, dest: str, *, link: bool = False) -> None:
        """Write a tree as a new directory ``dest`` (which must not exist).

        Entries are created relative to directory fds, each with O_EXCL/O_NOFOLLOW
        semantics (names were validated when the nodes were read), so nothing is
        written through a symlink. Host files get permission bits only: setuid, setgid
        and sticky bits stay in the tree's metadata (layer headers carry them). With
        ``link`` (the output tree), files are read-only and put there by
        :meth:`link_blob_to` (hard links where they can be)."""
        node = self.read_directory(digest)
        os.mkdir(dest, 0o700)
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self._materialize_node(node, fd, link)
        finally:
            os.close(fd)

    def _materialize_node(self, node: dict[str, Any], fd: int, link: bool = False) -> None:
        for f in node["files"]:
            if link:
                self.link_blob_to(f["digest"], f["name"], f["mode"], dir_fd=fd)
            else:
                self.copy_blob_to(f["digest"], f["name"], f["mode"], dir_fd=fd)
        for s in node["symlinks"]:
            os.symlink(s["target"], s["name"], dir_fd=fd)
        for d in node["directories"]:
            child = self.read_directory(d["digest"])
            os.mkdir(d["name"], 0o700, dir_fd=fd)
            child_fd = os.open(d["name"], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            try:
                self._materialize_node(child, child_fd, link)
            finally:
                os.close(child_fd)
        os.fchmod(fd, node.get("mode", 0o755) & HOST_MODE_MASK)

    # ------------------------------------------------------------------ action cache

    def _ac_path(self, key: str) -> str:
        return os.path.join(self.ac_dir, key[:2], key)

    def get_action(self, key: str) -> ActionResult | None:
        path = self._ac_path(key)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            body = canonical_json(doc["result"])
            if hashlib.sha256(body).hexdigest() != doc["sha256"]:
                raise ValueError("checksum mismatch")
            return ActionResult.from_json(doc["result"])
        except (ValueError, KeyError, TypeError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # corrupt: a miss, rebuilt and rewritten
            return None

    def put_action(self, key: str, result: ActionResult) -> None:
        body = result.to_json()
        data = canonical_json({"result": body, "sha256": hashlib.sha256(canonical_json(body)).hexdigest()})
        path = self._ac_path(key)
        tmp = self.temp_path("ac")
        # Renamed into place after the result's blobs, without a flush of its own: the
        # build flushes once (make_durable) before its results index trusts the entry,
        # and an entry read from here is checked against its blobs on every hit.
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise disk_error(e, "an action result", self.root, needed=len(data), in_cache=True) or e from None
            raise

    # ------------------------------------------------------------------ maintenance

    @contextlib.contextmanager
    def lock(self, exclusive: bool = False) -> Iterator[None]:
        """Builds hold the cache lock shared; ``gc`` holds it exclusively."""
        import fcntl

        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            if not os.path.isdir(self.tmp_dir):  # an expunge ran meanwhile
                os.makedirs(self.cas_dir, exist_ok=True)
                os.makedirs(self.ac_dir, exist_ok=True)
                make_private_dir(self.tmp_dir)
            yield
        finally:
            os.close(fd)

    def expunge(self) -> None:
        """Remove every entry of the cache, once no build uses it (the lock file stays, so
        that builds waiting for it find the emptied cache rather than a lost one)."""
        with self.lock(exclusive=True):
            self._trusted.clear()
            self._dir_cache.clear()
            for name in os.listdir(self.root):
                if name != "lock":
                    remove_tree(os.path.join(self.root, name))

    def touch_action(self, key: str) -> None:
        """Mark an action result as used now (gc keeps recently used results). Results
        used within the last day are left alone: a no-op build writes nothing."""
        import time

        path = self._ac_path(key)
        with contextlib.suppress(OSError):
            if os.stat(path).st_mtime < time.time() - 86400:
                os.utime(path)

    def gc(self, max_age_seconds: float) -> dict[str, int]:
        """Drop action results unused for ``max_age_seconds``, then every blob that no
        remaining result refers to (directly or through a tree)."""
        import time

        removed = {"actions": 0, "blobs": 0, "bytes": 0}
        with self.lock(exclusive=True):
            self.note_removed()  # before anything goes: workspaces check their results again
            cutoff = time.time() - max_age_seconds
            live: set[str] = set()
            for dirpath, _, filenames in os.walk(self.ac_dir):
                for name in filenames:
                    path = os.path.join(dirpath, name)
                    result = self.get_action(name)
                    if result is None or os.stat(path).st_mtime < cutoff:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)
                        removed["actions"] += 1
                        continue
                    for value in result.outputs.values():
                        if value.is_tree:
                            self._tree_digests(value.digest, live)
                        else:
                            live.add(value.digest)
            for dirpath, _, filenames in os.walk(self.cas_dir):
                for name in filenames:
                    if name not in live:
                        path = os.path.join(dirpath, name)
                        with contextlib.suppress(FileNotFoundError):
                            removed["bytes"] += os.lstat(path).st_size
                            os.unlink(path)
                            removed["blobs"] += 1
            remove_tree(self.tmp_dir)
            make_private_dir(self.tmp_dir)
        return removed

    def _tree_digests(self, digest: str, into: set[str]) -> None:
        into.add(digest)
        try:
            node = self.read_directory(digest)
        except (StoreError, ValueError):
            return
        into.update(f["digest"] for f in node["files"])
        for d in node["directories"]:
            self._tree_digests(d["digest"], into)

    def stats(self) -> dict[str, int]:
        blobs = size = actions = 0
        for dirpath, _, filenames in os.walk(self.cas_dir):
            for name in filenames:
                blobs += 1
                with contextlib.suppress(FileNotFoundError):
                    size += os.lstat(os.path.join(dirpath, name)).st_size
        for _, _, filenames in os.walk(self.ac_dir):
            actions += len(filenames)
        return {"blobs": blobs, "bytes": size, "actions": actions}


#: The mode bits dtbuild puts on files it writes on the host: never setuid, setgid or sticky.
HOST_MODE_MASK = 0o777
_DIGEST_CHARS = frozenset("0123456789abcdef")
_NODE_KEYS = {"files", "directories", "symlinks", "mode"}
_ENTRY_KEYS = {"files": {"name", "digest", "size", "mode"}, "directories": {"name", "digest"},
               "symlinks": {"name", "target"}}


def check_directory_node(node: Any) -> None:
    """Check that ``node`` is a Directory node as :meth:`Store.put_directory_node`
    writes it: the three entry lists (and an optional mode), every name one path
    component (not '.' or '..', no '/' or NUL) and unique in the node, digests 64
    lowercase hex digits, sizes and modes integers in range.

    :raises ValueError: naming what is wrong.
    """
    if not isinstance(node, dict) or not {"files", "directories", "symlinks"} <= set(node) \
            or not set(node) <= _NODE_KEYS:
        raise ValueError("not a Directory node (files, directories, symlinks, mode)")
    if "mode" in node:
        _check_int(node["mode"], 0o7777, "the directory's mode")
    names: set[str] = set()
    for key, fields in _ENTRY_KEYS.items():
        entries = node[key]
        if not isinstance(entries, list):
            raise ValueError(f"its {key} are not a list")
        for e in entries:
            if not isinstance(e, dict) or set(e) != fields:
                raise ValueError(f"an entry of its {key} does not have exactly the fields {', '.join(sorted(fields))}")
            name = e["name"]
            if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\x00" in name:
                raise ValueError(f"the name {name!r} is not a single path component")
            if name in names:
                raise ValueError(f"the name {name!r} appears twice")
            names.add(name)
            if "digest" in e:
                digest = e["digest"]
                if not isinstance(digest, str) or len(digest) != 64 or not _DIGEST_CHARS.issuperset(digest):
                    raise ValueError(f"{name!r} has digest {digest!r}, not 64 lowercase hex digits")
            if key == "files":
                _check_int(e["size"], 1 << 62, f"the size of {name!r}")
                _check_int(e["mode"], 0o7777, f"the mode of {name!r}")
            if key == "symlinks":
                target = e["target"]
                if not isinstance(target, str) or not target or "\x00" in target:
                    raise ValueError(f"the symlink {name!r} has target {target!r}")


def _check_int(value: Any, limit: int, what: str) -> None:
    if type(value) is not int or not 0 <= value <= limit:
        raise ValueError(f"{what} is {value!r}, not an integer from 0 to {limit}")


#: errno values of a hard link the file system refuses (another device, too many links,
#: protected hard links, no links at all): the output is cloned or copied instead.
_LINK_FALLBACK_ERRNOS = frozenset({errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES, errno.EOPNOTSUPP,
                                   errno.ENOSYS})
#: The Linux ioctl that makes ``dst`` share ``src``'s extents (a reflink), _IOW(0x94, 9, int).
_FICLONE = 0x40049409


def _clone(src: int, dst: int) -> bool:
    """Make empty file ``dst`` a reflink of ``src``; False where the file system cannot."""
    try:
        import fcntl

        fcntl.ioctl(dst, _FICLONE, src)
    except (OSError, ImportError):
        return False
    return True


def _copy_hashing(src: int, dst: int) -> str:
    """Copy all of ``src`` (from its position) to ``dst`` and return the sha256 of what
    was copied: one pass, the hash taken from the buffer that is written."""
    h = hashlib.sha256()
    for chunk in _fd_chunks(src):
        h.update(chunk)
        while chunk:
            chunk = chunk[os.write(dst, chunk):]
    return h.hexdigest()


class _VerifyingRaw(io.RawIOBase):
    """The raw reader under :class:`VerifiedBlobReader`: reads a blob file and hashes the
    bytes read in order from its start (a read after a seek that skips ahead hashes
    nothing; what was skipped is hashed when the reader is closed). A ``source`` file
    (see :meth:`Store.register_source`) that does not match is not deleted: the reader
    raises :class:`SourceChangedError` instead."""

    mode = "rb"

    def __init__(self, store: Store, digest: str, path: str, *, source: SourceBlob | None = None) -> None:
        super().__init__()
        self._store = store
        self.digest = digest
        self.name = path
        self._source = source
        if source is None:
            self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        else:
            self._file = open(store._open_source(digest, source), "rb", buffering=0)  # noqa: SIM115
        self._size = os.fstat(self._file.fileno()).st_size
        self._hash = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) are in _hash
        self._pos = 0
        self.state = "reading"  # then "verified" or "corrupt"
        self._error: CorruptBlobError | SourceChangedError | None = None
        if self._size == 0:
            try:
                self._check()
            except (CorruptBlobError, SourceChangedError):
                self._file.close()
                raise

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._error is not None:
            raise self._error
        n = self._file.readinto(buffer)
        if n and self.state == "reading" and self._pos <= self._hashed < self._pos + n:
            with memoryview(buffer) as view:
                self._hash.update(view[self._hashed - self._pos:n])
            self._hashed = self._pos + n
            if self._hashed >= self._size:
                self._check()  # before the reader gets the last bytes
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = self._file.seek(offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def finish(self) -> None:
        """Hash what the reader did not read in order, and check the digest."""
        if self.state != "reading":
            if self._error is not None:
                raise self._error
            return
        fd = self._file.fileno()
        while self._hashed < self._size:
            chunk = os.pread(fd, min(_CHUNK, self._size - self._hashed), self._hashed)
            if not chunk:
                break  # shorter than it was: the digest will not match
            self._hash.update(chunk)
            self._hashed += len(chunk)
        self._check()

    def _check(self) -> None:
        if self._hash.hexdigest() == self.digest:
            self.state = "verified"
            if self._source is None:  # a source may change after this read: read it checked
                self._store._verified.add(self.digest)
            return
        self.state = "corrupt"
        if self._source is None:
            self._error = self._store.corrupt(self.digest)
        else:
            self._error = SourceChangedError(self._source.name, self.digest)
        raise self._error

    def close(self, *, verify: bool = True) -> None:
        if self.closed:
            return
        try:
            if verify:
                self.finish()
        finally:
            self._file.close()
            super().close()

    def __del__(self) -> None:
        # A reader dropped unclosed is not checked here (an exception in a finalizer is
        # only printed); the action runner checks the readers it handed out instead.
        with contextlib.suppress(Exception):
            self.close(verify=False)


class VerifiedBlobReader(io.BufferedReader):
    """A buffered reader of a blob that raises :class:`CorruptBlobError` when the bytes
    read do not match the blob's digest: when the last byte is read (before the caller
    gets it), or on ``close()`` for a reader that stopped early or skipped ahead (what
    it did not read is hashed then). The blob is deleted first, so whoever catches the
    error can have it rebuilt. Leaving a ``with`` block on BaseExceptions other than
    Exception (Ctrl-C) closes without reading the rest."""

    def __init__(self, raw: _VerifyingRaw) -> None:
        super().__init__(raw, buffer_size=1 << 16)
        self.verifier = raw

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            self.verifier.close(verify=False)
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.verifier.close(verify=False)
            self.close()


def make_private_dir(path: str) -> None:
    """Create directory ``path`` (and its parents) if needed and make it 0700: scratch
    space of builds (which may hold an image's files) is no other user's business."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if stat.S_IMODE(os.lstat(path).st_mode) != 0o700:
        os.chmod(path, 0o700)


def _file_mode(st_mode: int, normalize: bool) -> int:
    if normalize:
        return 0o755 if st_mode & stat.S_IXUSR else 0o644
    return stat.S_IMODE(st_mode)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: str, data: bytes, *, tmp: str | None = None, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync, rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = tmp or f"{path}.dtbuild-tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a full disk must not stay full of our half-written file
        raise


def remove_tree(path: str) -> None:
    """Remove a file or directory tree, including read-only parts of it."""
    def onerror(func: Any, p: str, exc: Any) -> None:
        # Make the directories in the way writable, but never chmod through a symlink
        # (the tree may hold links to anything).
        try:
            for d in (os.path.dirname(p), p):
                if stat.S_ISDIR(os.lstat(d).st_mode):
                    os.chmod(d, 0o700)
            func(p)
        except OSError:
            pass

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=onerror)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
