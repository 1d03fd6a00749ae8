"""Digests of source files, memoized by (size, mtime_ns, inode, ctime_ns) so that a
no-op build re-hashes nothing and a touched-but-unchanged file costs one hash.

The memo lives in the workspace's state directory; it is an optimisation only (losing
it costs re-hashing), written atomically at the end of a build.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from dataclasses import dataclass

from dtbuild.engine.store import atomic_write, hash_file

MEMO_FILE = "source-digests.json"


@dataclass(frozen=True, slots=True)
class SourceDigest:
    digest: str
    size: int
    executable: bool
    symlink: str | None = None


class SourceDigests:
    def __init__(self, root: str, state_dir: str) -> None:
        self.root = root
        self._memo_path = os.path.join(state_dir, MEMO_FILE)
        self._memo: dict[str, list] | None = None
        self._dirty = False
        self._lock = threading.Lock()
        self.hashed = 0  # files hashed in this process, for benchmarks and tests

    def _load(self) -> dict[str, list]:
        if self._memo is None:
            try:
                with open(self._memo_path, "rb") as f:
                    self._memo = json.loads(f.read())
            except (FileNotFoundError, ValueError):
                self._memo = {}
        return self._memo

    def get(self, rel_path: str) -> SourceDigest:
        full = os.path.join(self.root, rel_path)
        st = os.lstat(full)
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
