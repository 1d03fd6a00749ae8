"""Digests of source files, memoized by (size, mtime_ns, inode, ctime_ns) so that a
no-op build re-hashes nothing and a touched-but-unchanged file costs one hash.

The memo lives in the workspace's state directory; it is an optimisation only (losing
it costs re-hashing), written atomically at the end of a build.

This module also owns what a source file may be: a regular file or a symlink whose
directory, with every symlink on the way resolved, is inside the workspace. A symlink
that is itself the source is kept as a symlink (its target is data, never followed);
a directory symlink on the way is followed only while it stays in the workspace, so a
BUILD file cannot name ``link_dir/secret`` to pull a host file into an image.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from dataclasses import dataclass

from dtbuild.engine.errors import ActionError
from dtbuild.engine.store import atomic_write, hash_file

MEMO_FILE = "source-digests.json"


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
    def __init__(self, root: str, state_dir: str) -> None:
        self.root = root
        self._root_real = os.path.realpath(root)
        #: Directories (workspace-relative) already checked to resolve inside the workspace.
        self._checked_dirs: set[str] = set()
        self._memo_path = os.path.join(state_dir, MEMO_FILE)
        self._memo: dict[str, list] | None = None
        self._dirty = False
        self._lock = threading.Lock()
        self.hashed = 0  # files hashed in this process, for benchmarks and tests

    def _load(self) -> dict[str, list]:
        if self._memo is None:
            try:
                with open(self._memo_path, "rb") as f:
                    loaded = json.loads(f.read())
            except (OSError, ValueError):
                loaded = {}
            # Entries of another shape are dropped: the memo is an optimisation only.
            self._memo = {k: v for k, v in loaded.items()
                          if isinstance(v, list) and len(v) == 7 and isinstance(v[5], str)
                          and (v[6] is None or isinstance(v[6], str))} if isinstance(loaded, dict) else {}
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

    def get(self, rel_path: str) -> SourceDigest:
        full = os.path.join(self.root, rel_path)
        st = os.lstat(full)
        self._check(rel_path, st)
        signature = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_mode]
        with self._lock:
            memo = self._load()
            entry = memo.get(rel_path)
        if entry is not None and entry[:5] == signature:
            return SourceDigest(entry[5], st.st_size, bool(st.st_mode & stat.S_IXUSR), entry[6])
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
            self._dirty = True
        return SourceDigest(digest, st.st_size, bool(st.st_mode & stat.S_IXUSR), link)

    def save(self) -> None:
        with self._lock:
            if not self._dirty or self._memo is None:
                return
            data = json.dumps(self._memo, separators=(",", ":")).encode()
            self._dirty = False
        atomic_write(self._memo_path, data)
