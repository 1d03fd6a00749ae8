"""The output tree: top-level results under ``dtbuild-out/``.

Outputs are read-only, as Bazel makes them: a file is 0444 (0555 when executable), and
where the file system allows it a hard link to the blob in the cache, so writing an
output costs no copy of its bytes (a reflink, or else a copy, where it does not: the
cache on another device, an executable, a blob that is a source file of the workspace,
which is never linked out). A user who makes a linked output writable and edits it
edits the cache's blob: the store finds that blob changed (its mtime, mode or bytes)
the next time it is used, deletes it and has it rebuilt, so it never serves the edited
bytes (see ``store.py``). The files of a tree output are put there the same way.

Each output is written next to its final name and renamed into place, so a reader never
sees half an output. An index in the workspace state directory remembers what was
written (digest and a file-system signature: a file's stat, or the stats of a tree's
directories, trusted for the files in them), so a no-op build rewrites nothing and an
output replaced, removed or changed by hand is rewritten (a file edited in place inside
a tree output, which changes no directory: once the tree is removed). A file output
that is a hard link is also checked to still be its blob. The bytes of a blob this
process did not write are checked against its digest before they are linked or as
they are copied; a full disk while writing an output is a
:class:`~dtbuild.engine.store.DiskError`, and the half-written temporary is removed.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable

from dtbuild.engine.store import OutputValue, Store, atomic_write, disk_error, remove_tree
from dtbuild.engine.workspace import Workspace

INDEX_FILE = "outputs.json"
#: The temporaries written next to outputs and state files (``NAME.dtbuild-tmp-PID-THREAD``,
#: and ``NAME.dtbuild-old-PID`` for a tree output being replaced), with their writer's pid.
_TEMP_NAME = re.compile(r"\.dtbuild-(?:tmp-(\d+)-\d+|old-(\d+))$")


def _signature(path: str, is_tree: bool, dirs: Iterable[str] | None = None, *,
               linked: bool = False) -> list[object] | None:
    """What the index compares to find an output unchanged: the lstat of the file, or
    of each directory of a tree (``dirs``, relative to it, as the index recorded them;
    None: found by listing the tree just written). A file added to, removed from or
    renamed in a tree changes its directory's mtime; the files themselves are not
    stat'ed, so checking a tree costs one lstat per directory, not one per file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not is_tree:
        # A hard link to a blob (``linked``) is marked so: it is unchanged only while
        # the blob is still that file.
        return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode, *(["link"] if linked else [])]
    if dirs is None:
        dirs = sorted(os.path.relpath(d, path) for d, _, _ in os.walk(path))
    items: list[object] = ["tree"]
    for rel in dirs:
        try:
            s = st if rel == "." else os.lstat(os.path.join(path, rel))
        except OSError:
            return None
        items.append([rel, s.st_ino, s.st_mtime_ns, s.st_mode])
    return items


def _recorded_dirs(signature: object) -> list[str] | None:
    """The directories a tree's recorded signature names (None: not a tree's)."""
    if not isinstance(signature, list) or not signature or signature[0] != "tree":
        return None
    dirs = [item[0] for item in signature[1:] if isinstance(item, list) and item and isinstance(item[0], str)]
    return dirs if len(dirs) == len(signature) - 1 else None


#: Mode of the directories dtbuild creates to hold outputs: like the outputs' own modes
#: (0644/0755), it never depends on the umask of whoever ran the build.
OUTPUT_DIR_MODE = 0o755


def make_dirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, each directory it creates with mode 0755 whatever
    the umask; existing directories keep their mode."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, OUTPUT_DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # made by a concurrent writer: its mode is its own
        os.chmod(directory, OUTPUT_DIR_MODE)  # mkdir's mode was masked by the umask


class OutputTree:
    def __init__(self, workspace: Workspace, store: Store) -> None:
        self.root = workspace.root
        self.store = store
        self._index_path = os.path.join(workspace.state_dir, INDEX_FILE)
        try:
            with open(self._index_path, "rb") as f:
                loaded = json.loads(f.read())
        except (OSError, ValueError):
            loaded = {}
        # Records of another shape are dropped: the index is an optimisation only.
        self._index: dict[str, list[object]] = {
            k: v for k, v in loaded.items() if isinstance(v, list) and len(v) == 3} if isinstance(loaded, dict) else {}
        self._dirty = False
        self.written = 0

    def remove_stale_temps(self, rel_paths: Iterable[str]) -> int:
        """Remove the temporaries that killed builds left next to outputs (those about to
        be written and those of the index) and in the state directory; returns how many.
        A temporary of a live process other than this one is kept (``explain`` writes
        state files without the workspace lock); the caller holds the workspace lock, so
        any of this process's own is a leftover of an earlier process with the same pid."""
        state_dir = os.path.dirname(self._index_path)
        rel_dirs = {os.path.dirname(p) for p in {*self._index, *rel_paths}}
        dirs = {state_dir} | {os.path.join(self.root, d) if d else self.root for d in rel_dirs}
        removed = 0
        for directory in sorted(dirs):
            try:
                names = os.listdir(directory)
            except OSError:  # not made yet, or not a directory any more
                continue
            for name in names:
                match = _TEMP_NAME.search(name)
                if match is None:
                    continue
                pid = int(match.group(1) or match.group(2))
                if pid != os.getpid() and _pid_alive(pid):
                    continue
                remove_tree(os.path.join(directory, name))
                removed += 1
        return removed

    def materialize(self, rel_path: str, value: OutputValue) -> str:
        dest = os.path.join(self.root, rel_path)
        record = self._index.get(rel_path)
        if record is not None and record[0] == value.digest and record[1] == value.is_tree:
            if value.is_tree:
                dirs = _recorded_dirs(record[2])
                if dirs is not None and record[2] == _signature(dest, True, dirs):
                    return dest
            elif record[2] == _signature(dest, False, linked=self._linked(record[2], value.digest)):
                return dest
        linked = False
        try:
            make_dirs(os.path.dirname(dest))
            if os.path.isdir(dest) and not os.path.islink(dest) and not value.is_tree:
                remove_tree(dest)
            if value.is_tree:
                self._write_tree(value, dest)
            else:
                linked = self.store.materialize_blob(value.digest, dest, value.executable, link=True) == "link"
        except OSError as e:
            raise disk_error(e, f"output {rel_path}", os.path.dirname(dest), needed=value.size) or e from None
        self._index[rel_path] = [value.digest, value.is_tree, _signature(dest, value.is_tree, linked=linked)]
        self._dirty = True
        self.written += 1
        return dest

    def _linked(self, signature: object, digest: str) -> bool:
        """Whether a file output was recorded as a hard link to blob ``digest`` and still
        is one (the store deletes a blob it finds edited, and writes a new file when it
        is rebuilt: the output then holds the edited bytes and must be written again)."""
        if not (isinstance(signature, list) and len(signature) == 5 and signature[4] == "link"):
            return False
        try:
            return os.stat(self.store.blob_path(digest)).st_ino == signature[2]
        except OSError:
            return False

    def _write_tree(self, value: OutputValue, dest: str) -> None:
        tmp = f"{dest}.dtbuild-tmp-{os.getpid()}-{threading.get_ident()}"
        remove_tree(tmp)
        try:
            self.store.materialize_tree(value.digest, tmp, link=True)
        except BaseException:
            remove_tree(tmp)  # a full disk must not stay full of half an output
            raise
        trash = None
        if os.path.lexists(dest):
            trash = f"{dest}.dtbuild-old-{os.getpid()}"
            os.replace(dest, trash)
        os.replace(tmp, dest)
        if trash:
            remove_tree(trash)

    def save(self) -> None:
        if self._dirty:
            atomic_write(self._index_path, json.dumps(self._index, separators=(",", ":")).encode())
            self._dirty = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
