"""What loading and analysis computed in an earlier process of the same workspace, kept
in its state directory so that a no-op build evaluates no BUILD file and redoes no
analysis.

* **Packages** (``packages.pickle``): each package's targets, with what its evaluation
  depended on: the digest of every file it read (the BUILD file, every ``.bzl`` file
  it loaded, transitively), the signatures of the directories ``glob()`` listed and a
  digest of the listing, and the versions of the rules it called. The whole file is
  keyed by what every evaluation depends on (:func:`environment_key`: dtbuild's version
  and code, the Python version, the workspace root and settings, the rule names,
  registry names and BUILD globals). A file whose stat signature (size, mtime, inode,
  ctime) is the one recorded is not read again; one whose signature changed is hashed,
  and the package is evaluated again only when a digest changed.
* **The package list** of ``//...``: the directories the walk visited and their
  signatures; while none changed, the tree is not walked again.
* **The analysis memo** (``analysis.pickle``): the last analysis result, with the
  digest of every package it used, the source files it checked and the output
  directories it checked for symlinks, and the files rules read at analysis
  (``RuleContext.read_source_file``: a lock file) with their signatures and digests.
  While those packages are unchanged (and the plugins' versions are the same), the
  result is restored for the same or fewer requested targets; sources and output
  directories are checked again (cheap lstats), and each file read is unchanged only
  when it still has its recorded signature or, its signature changed, its bytes hash to
  the recorded digest (a file recorded missing must still be missing).

Signatures whose mtime is within :data:`RACY_NS` of when they were taken are not
trusted (a second write within the file system's timestamp granularity would go
unseen): such files are hashed again next time, such directories listed again.

State files are hostile input (a workspace copied from someone else can carry
``dtbuild-out/.dtbuild``): each is a pickle signed with HMAC-SHA256 under a per-user
key (:func:`state_key`, a 0600 file in the cache directory, never in the workspace), and
a file that is unreadable, unsigned, signed with another key or of another shape is a
miss. Nothing is unpickled before its signature checks out.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import hmac
import io
import os
import pickle
import platform
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

#: Bump when the shape of what is stored changes.
FORMAT = 1
PACKAGES_FILE = "packages.pickle"
ANALYSIS_FILE = "analysis.pickle"
#: In the cache directory: the per-user key state files are signed with.
KEY_FILE = "state-key"
_MAGIC = b"dtbuild-state-v1\n"
_MAC_BYTES = 32
#: Signatures changed this recently (2 s: coarse file-system clocks) are not trusted.
RACY_NS = 2_000_000_000

#: (size, mtime_ns, inode, ctime_ns) of a file or directory; None where not trusted.
Signature = tuple[int, int, int, int]


def signature_of(st: os.stat_result) -> Signature:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def trusted_signature(st: os.stat_result, now_ns: int | None = None) -> Signature | None:
    """The signature of ``st``, or None when it changed too recently to be trusted."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    if max(st.st_mtime_ns, st.st_ctime_ns) >= now_ns - RACY_NS:
        return None
    return signature_of(st)


# ---------------------------------------------------------------------- signed files

def state_key(cache_dir: str) -> bytes | None:
    """This user's key for signing state files (made on first use, mode 0600), or None
    when there is none that only this user can read (state files are then not used)."""
    path = os.path.join(cache_dir, KEY_FILE)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            try:
                os.makedirs(cache_dir, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                continue  # another process made it meanwhile: read that one
            except OSError:
                return None
            try:
                key = os.urandom(32)
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            return key
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                return None  # someone else could read (or wrote) it
            key = os.read(fd, 64)
        except OSError:
            return None
        finally:
            os.close(fd)
        return key if len(key) == 32 else None
    return None


def read_signed(path: str, key: bytes | None) -> Any:
    """The object pickled in ``path``, or None when the file is missing, unreadable or
    not signed with ``key``."""
    if key is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    head = len(_MAGIC) + _MAC_BYTES
    if len(data) < head or not data.startswith(_MAGIC):
        return None
    body = memoryview(data)[head:]
    if not hmac.compare_digest(data[len(_MAGIC):head], hmac.new(key, body, hashlib.sha256).digest()):
        return None
    try:
        return pickle.loads(body)
    except Exception:  # signed by us, yet unreadable (another dtbuild's classes): a miss
        return None


def write_signed(path: str, key: bytes, value: Any) -> None:
    from dtbuild.engine.store import atomic_write

    body = dumps(value)
    atomic_write(path, _MAGIC + hmac.new(key, body, hashlib.sha256).digest() + body, mode=0o600)


def dumps(value: Any) -> bytes:
    """``pickle.dumps``, with slotted dataclasses stored as calls of their constructor:
    unpickling them through ``__setstate__`` (the dataclass default) costs several
    times more, and a stored analysis holds tens of thousands of them."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        fields = _constructor_fields(cls)
        if fields is None:
            return NotImplemented
        return cls, tuple(getattr(obj, name) for name in fields)


_FIELDS: dict[type, tuple[str, ...] | None] = {}


def _constructor_fields(cls: type) -> tuple[str, ...] | None:
    """The fields of a slotted dataclass that its constructor takes, in order, when the
    constructor rebuilds it exactly (every field an init field, no ``__post_init__``)."""
    try:
        return _FIELDS[cls]
    except KeyError:
        pass
    found: tuple[str, ...] | None = None
    fields = getattr(cls, "__dataclass_fields__", None)
    params = getattr(cls, "__dataclass_params__", None)
    if isinstance(fields, dict) and "__slots__" in cls.__dict__ and not hasattr(cls, "__post_init__") \
            and getattr(params, "init", False):
        import dataclasses

        own = [f for f in fields.values() if f._field_type is dataclasses._FIELD]  # type: ignore[attr-defined]
        if all(f.init and not f.kw_only for f in own):
            found = tuple(f.name for f in own)
    _FIELDS[cls] = found
    return found


# ---------------------------------------------------------------------- keys

def code_signature() -> str:
    """A digest of the signatures of dtbuild's own Python files: an edited checkout
    (an editable install keeps its version) is another dtbuild."""
    import dtbuild.engine
    import dtbuild.plugins
    import dtbuild.rules

    parts: list[str] = []

    def scan(directory: str) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.endswith(".py"):
                with contextlib.suppress(OSError):
                    st = entry.stat()
                    parts.append(f"{entry.path}:{st.st_size}:{st.st_mtime_ns}")
            elif entry.is_dir(follow_symlinks=False) and not entry.name.startswith(("_", ".")):
                scan(entry.path)

    for package in (dtbuild.engine, dtbuild.rules, dtbuild.plugins):
        scan(os.path.dirname(package.__file__ or ""))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def environment_key(*, root: str, config: Mapping[str, Any], dtbuild_version: str, rule_names: Iterable[str],
                    registry_names: Mapping[str, Sequence[str]], build_globals: Mapping[str, Any]) -> str:
    """What every package's evaluation depends on, as one digest."""
    # The machine too: rules resolve host defaults (an image's architecture) in analysis.
    text = repr((FORMAT, sys.version, platform.machine(), dtbuild_version, code_signature(), root, _plain(config),
                 sorted(rule_names), sorted((k, list(v)) for k, v in registry_names.items()),
                 sorted((k, repr(v)) for k, v in build_globals.items())))
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return sorted((str(k), _plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------- packages

#: A file an evaluation read: workspace-relative path, signature, sha256 of its bytes.
FileRead = tuple[str, Signature | None, str]
#: What glob() listed: each directory visited with its signature, and a digest of the listing.
Listing = tuple[tuple[tuple[str, Signature | None], ...], str]


@dataclass(frozen=True, slots=True)
class PackageEntry:
    """One package as an earlier evaluation left it, and what that evaluation read."""

    build_file: str
    files: tuple[FileRead, ...]
    listing: Listing | None
    #: The rules the evaluation called, with their versions.
    rules: tuple[tuple[str, str], ...]
    #: Target names, in declaration order (pattern expansion needs no more).
    names: tuple[str, ...]
    #: The pickled targets (``dict[str, TargetDecl]``), unpickled only when needed.
    targets: bytes

    @property
    def digest(self) -> str:
        """Identifies the package's targets: what the analysis memo is keyed by."""
        return hashlib.sha256(self.targets).hexdigest()


def listing_digest(files: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(files).encode()).hexdigest()


class PackageCache:
    """The stored packages, package list and analysis memo of one workspace, read on
    first use and written back (when something changed) by :meth:`save`."""

    def __init__(self, root: str, state_dir: str, cache_dir: str, environment: str) -> None:
        self.root = root
        self.state_dir = state_dir
        self.cache_dir = cache_dir
        self.environment = environment
        self._key: bytes | None = None
        self._loaded = False
        self._entries: dict[str, PackageEntry] = {}
        #: Every trusted signature recorded for a file, with the file's digest.
        self._known: dict[str, tuple[Signature, str]] = {}
        self._walk: tuple[tuple[tuple[str, Signature | None], ...], tuple[str, ...]] | None = None
        self._dirty = False
        #: Per process: a file's signature and digest as found now (None: missing).
        self._files_now: dict[str, tuple[Signature | None, str] | None] = {}
        self._dirs_now: dict[str, Signature | None] = {}

    @property
    def key(self) -> bytes | None:
        if self._key is None:
            self._key = state_key(self.cache_dir)
        return self._key

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        stored = read_signed(os.path.join(self.state_dir, PACKAGES_FILE), self.key)
        try:
            if not isinstance(stored, dict) or stored.get("environment") != self.environment:
                return
            entries, walk = stored["packages"], stored["walk"]
            if not isinstance(entries, dict) or not all(isinstance(e, PackageEntry) for e in entries.values()):
                return
            self._entries = entries
            self._known = {path: (sig, digest) for entry in entries.values()
                           for path, sig, digest in entry.files if sig is not None}
            self._walk = walk if isinstance(walk, tuple) and len(walk) == 2 else None
        except (KeyError, TypeError):
            return

    # ------------------------------------------------------------------ checks

    def file_now(self, path: str) -> tuple[Signature | None, str] | None:
        """The signature and sha256 of the workspace file ``path`` now (None: missing),
        hashing it only when its signature is not the recorded one."""
        if path in self._files_now:
            return self._files_now[path]
        found: tuple[Signature | None, str] | None = None
        full = os.path.join(self.root, path)
        try:
            st = os.stat(full)
            if stat.S_ISREG(st.st_mode):
                sig = signature_of(st)
                recorded = self._known.get(path)
                if recorded is not None and recorded[0] == sig:
                    found = recorded
                else:
                    with open(full, "rb") as f:
                        found = (trusted_signature(st), hashlib.sha256(f.read()).hexdigest())
        except OSError:
            found = None
        self._files_now[path] = found
        return found

    def dir_now(self, path: str) -> Signature | None:
        if path not in self._dirs_now:
            try:
                st = os.stat(os.path.join(self.root, path) if path else self.root)
                self._dirs_now[path] = trusted_signature(st) if stat.S_ISDIR(st.st_mode) else None
            except OSError:
                self._dirs_now[path] = None
        return self._dirs_now[path]

    def entry(self, name: str, build_file: str, rule_versions: Mapping[str, str],
              list_files: Callable[[], tuple[list[str], Listing]]) -> PackageEntry | None:
        """The stored package ``name`` if nothing its evaluation read changed, else None.
        ``list_files`` lists the package again (for glob) when a directory changed."""
        self._load()
        entry = self._entries.get(name)
        if entry is None or entry.build_file != build_file:
            return None
        if any(rule_versions.get(rule) != version for rule, version in entry.rules):
            return None
        refreshed = False
        files = []
        for path, sig, digest in entry.files:
            now = self.file_now(path)
            if now is None or now[1] != digest:
                return None
            refreshed |= now[0] != sig
            files.append((path, now[0], digest))
        listing = entry.listing
        if listing is not None:
            dirs, digest = listing
            if any(sig is None or self.dir_now(path) != sig for path, sig in dirs):
                _, listing = list_files()
                if listing[1] != digest:
                    return None
                refreshed = True
        if refreshed:
            entry = replace(entry, files=tuple(files), listing=listing)
            self._entries[name] = entry
            self._dirty = True
        return entry

    def put(self, name: str, entry: PackageEntry) -> None:
        self._load()
        self._entries[name] = entry
        self._dirty = True

    # ------------------------------------------------------------------ the package list

    def packages(self) -> list[str] | None:
        """The packages of the workspace as the last walk found them, if no directory it
        visited changed since."""
        self._load()
        if self._walk is None:
            return None
        dirs, packages = self._walk
        if any(sig is None or self.dir_now(path) != sig for path, sig in dirs):
            return None
        return list(packages)

    def put_packages(self, dirs: Sequence[tuple[str, Signature | None]], packages: Sequence[str]) -> None:
        self._load()
        self._walk = (tuple(dirs), tuple(packages))
        self._dirty = True

    # ------------------------------------------------------------------ saving

    def save(self) -> None:
        """Write the packages back if anything changed (a miss next time if it fails)."""
        if not self._dirty or self.key is None:
            return
        self._dirty = False
        with contextlib.suppress(OSError):
            write_signed(os.path.join(self.state_dir, PACKAGES_FILE), self.key,
                         {"environment": self.environment, "packages": self._entries, "walk": self._walk})

    # ------------------------------------------------------------------ the analysis memo

    def restore_analysis(self, key: str, labels: Iterable[str], package_digest: Callable[[str], str | None],
                         sources_ok: Callable[[Sequence[str]], bool],
                         output_dirs_ok: Callable[[Sequence[str]], bool]) -> Any:
        """The stored analysis result if it was made under ``key`` for (at least) ``labels``
        and every package it used is unchanged; else None."""
        stored = read_signed(os.path.join(self.state_dir, ANALYSIS_FILE), self.key)
        try:
            if not isinstance(stored, dict) or stored["key"] != key or stored["environment"] != self.environment:
                return None
            if not set(labels) <= stored["labels"]:
                return None
            if any(package_digest(name) != digest for name, digest in stored["packages"].items()):
                return None
            if not sources_ok(stored["sources"]) or not output_dirs_ok(stored["output_dirs"]):
                return None
            if not all(self.read_file_unchanged(path, sig, digest)
                       for path, (sig, digest) in stored["files_read"].items()):
                return None
            return pickle.loads(stored["result"])
        except Exception:  # of another shape: a miss
            return None

    def read_file_unchanged(self, path: str, signature: Signature | None, digest: str | None) -> bool:
        """Whether the workspace file ``path``, read at analysis with ``signature`` and
        sha256 ``digest`` (None: it did not exist), is the same now: still missing, or a
        regular file inside the workspace with that signature or, failing that, those bytes."""
        full = os.path.join(self.root, path)
        if digest is None:
            return not os.path.lexists(full)
        root_real = os.path.realpath(self.root)
        real = os.path.realpath(full)
        if not real.startswith(root_real.rstrip(os.sep) + os.sep):
            return False  # a symlink now leads out of the workspace: analysis refuses it
        try:
            st = os.stat(real)
            if not stat.S_ISREG(st.st_mode):
                return False
            if signature is not None and signature_of(st) == signature:
                return True
            with open(real, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest() == digest
        except OSError:
            return False

    def remember_analysis(self, key: str, labels: Iterable[str], packages: Mapping[str, str],
                          sources: Iterable[str], output_dirs: Iterable[str], result: Any) -> None:
        """Store ``result`` under ``key``, with what restoring it checks: the packages it
        used, its source files and output directories, and the files its rules read
        (``result.files_read``: path -> (signature, digest))."""
        if self.key is None:
            return
        try:
            body = dumps(result)
        except Exception:  # a provider that cannot be pickled: no memo
            return
        with contextlib.suppress(OSError):
            write_signed(os.path.join(self.state_dir, ANALYSIS_FILE), self.key,
                         {"key": key, "environment": self.environment, "labels": frozenset(labels),
                          "packages": dict(packages), "sources": tuple(sorted(sources)),
                          "output_dirs": tuple(sorted(output_dirs)),
                          "files_read": dict(getattr(result, "files_read", None) or {}), "result": body})


@contextlib.contextmanager
def collection_paused(*, analysis: bool = False) -> Iterator[None]:
    """No garbage collection while the block runs, and what it made frozen afterwards:
    loading and analysis make millions of objects that live until the process ends, and
    each collection would walk all of them again. The end of an ``analysis`` block
    resumes collection paused by :func:`pause_collection_until_analysed`."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled or (analysis and _resume_after.pop("analysis", False)):
            gc.enable()


_resume_after: dict[str, bool] = {}


def pause_collection_until_analysed() -> None:
    """Disable garbage collection now (process start-up) until the end of the next
    :func:`collection_paused` block."""
    if gc.isenabled():
        gc.disable()
        _resume_after["analysis"] = True
