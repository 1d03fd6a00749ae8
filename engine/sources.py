"""Digests of source files, memoized by (size, mtime_ns, inode, ctime_ns) so that a
no-op build re-hashes nothing and a touched-but-unchanged file costs one hash.

The memo lives in the workspace's state database (:mod:`dtbuild.engine.state`), read in
one query on first use; at the end of a build only the entries that changed are
written. It is an optimisation only: losing it costs re-hashing.

This module also owns what a source file may be: a regular file or a symlink whose
directory, with every symlink on the way resolved, is inside the workspace. A symlink
that is itself the source is kept as a symlink (its target is data, never followed);
a directory symlink on the way is followed only while it stays in the workspace, so a
BUILD file cannot name ``link_dir/secret`` to pull a host file into an image.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from dataclasses import dataclass

from dtbuild.engine.errors import ActionError
from dtbuild.engine.state import StateDB
from dtbuild.engine.store import hash_file


@dataclass(frozen=True, slots=True)
class SourceDigest:
    digest: str
    size: int
    executable: bool
    symlink: str | None = None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def source_problem(root: str, rel_path: str, *, resolved_root: str | None = None,
                   checked_dirs: set[str] | None = None) -> str | None:
    """Why ``rel_path`` (workspace-relative) may not be a source, or None when it may:
    its directory must resolve inside the workspace, and it must be a regular file or a
    symlink (kept as one). ``checked_dirs`` remembers directories already resolved."""
    full = os.path.join(root, rel_path)
    rel_dir = os.path.dirname(rel_path)
    if checked_dirs is None or rel_dir not in checked_dirs:
        root_real = resolved_root or os.path.realpath(root)
        directory = os.path.realpath(os.path.dirname(full))
        if not _inside(directory, root_real):
            return (f"its directory resolves to {directory}, outside the workspace {root_real} "
                    "(a symlink on the way leads out of it)")
        if checked_dirs is not None:
            checked_dirs.add(rel_dir)
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return "it does not exist"
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return "it is neither a regular file nor a symlink"
    return None


class SourceDigests:
    def __init__(self, root: str, state_dir: str, state: StateDB | None = None) -> None:
        self.root = root
        self._root_real = os.path.realpath(root)
        #: Directories (workspace-relative) already checked to resolve inside the workspace.
        self._checked_dirs: set[str] = set()
        self._state = state or StateDB(state_dir)
        self._memo: dict[str, list] | None = None
        self._changed: set[str] = set()  # memo entries to write back
        #: What :meth:`known` just found, taken by the :meth:`get` that follows it (one stat).
        self._just_known: dict[str, SourceDigest] = {}
        self._lock = threading.Lock()
        self.hashed = 0  # files hashed in this process, for benchmarks and tests

    def _load(self) -> dict[str, list]:
        if self._memo is None:
            self._memo = self._state.sources()
        return self._memo

    def _check(self, rel_path: str, st: os.stat_result) -> None:
        """Refuse, at the time it is read, a source that analysis would have refused (the
        tree may have changed since): a host file reached through a symlinked directory."""
        if os.path.dirname(rel_path) in self._checked_dirs and (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            return
        problem = source_problem(self.root, rel_path, resolved_root=self._root_real,
                                 checked_dirs=self._checked_dirs)
        if problem is not None:
            raise ActionError(f"the source file {rel_path} cannot be used: {problem}",
                              hint="sources are files inside the workspace; copy the file into it "
                                   "or keep the link itself as a source")

    def known(self, rel_path: str) -> SourceDigest | None:
        """The source's digest when the memo holds it for the file as it is now (a stat,
        no read); None when getting it needs a hash (:meth:`get`)."""
        try:
            st = os.lstat(os.path.join(self.root, rel_path))
        except OSError:
            return None
        found = self._memoized(rel_path, st)
        if found is not None:
            self._just_known[rel_path] = found
        return found

    def _memoized(self, rel_path: str, st: os.stat_result) -> SourceDigest | None:
        with self._lock:
            entry = self._load().get(rel_path)
        if entry is None or entry[:5] != [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_mode]:
            return None
        self._check(rel_path, st)
        return SourceDigest(entry[5], st.st_size, bool(st.st_mode & stat.S_IXUSR), entry[6])

    def get(self, rel_path: str) -> SourceDigest:
        just = self._just_known.pop(rel_path, None)
        if just is not None:
            return just
        full = os.path.join(self.root, rel_path)
        st = os.lstat(full)
        known = self._memoized(rel_path, st)
        if known is not None:
            return known
        self._check(rel_path, st)
        signature = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_mode]
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(full)
            digest = hashlib.sha256(b"symlink\0" + os.fsencode(target)).hexdigest()
            link: str | None = target
        else:
            digest, _ = hash_file(full)
            link = None
            self.hashed += 1
        with self._lock:
            self._load()[rel_path] = [*signature, digest, link]
            self._changed.add(rel_path)
        return SourceDigest(digest, st.st_size, bool(st.st_mode & stat.S_IXUSR), link)

    def save(self) -> None:
        """Write the entries that changed since the last save."""
        with self._lock:
            if not self._changed or self._memo is None:
                return
            rows = [(path, self._memo[path]) for path in sorted(self._changed)]
            self._changed.clear()
        self._state.put_sources(rows)
