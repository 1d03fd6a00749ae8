"""The output tree: copies of top-level results under ``dtbuild-out/``.

Each output is written next to its final name and renamed into place, so a reader never
sees half an output. An index in the workspace state directory remembers what was
written (digest and a file-system signature), so a no-op build rewrites nothing and an
output changed by hand is rewritten.
"""

from __future__ import annotations

import json
import os
import threading

from dtbuild.engine.store import OutputValue, Store, atomic_write, remove_tree
from dtbuild.engine.workspace import Workspace

INDEX_FILE = "outputs.json"


def _signature(path: str, is_tree: bool) -> list[object] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not is_tree:
        return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode]
    items: list[object] = [st.st_ino]
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            s = os.lstat(p)
            items.append([os.path.relpath(p, path), s.st_size, s.st_mtime_ns, s.st_mode])
    return items


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

    def materialize(self, rel_path: str, value: OutputValue) -> str:
        dest = os.path.join(self.root, rel_path)
        record = self._index.get(rel_path)
        if record is not None and record[0] == value.digest and record[1] == value.is_tree \
                and record[2] == _signature(dest, value.is_tree):
            return dest
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.isdir(dest) and not os.path.islink(dest) and not value.is_tree:
            remove_tree(dest)
        if value.is_tree:
            tmp = f"{dest}.dtbuild-tmp-{os.getpid()}-{threading.get_ident()}"
            remove_tree(tmp)
            self.store.materialize_tree(value.digest, tmp)
            trash = None
            if os.path.lexists(dest):
                trash = f"{dest}.dtbuild-old-{os.getpid()}"
                os.replace(dest, trash)
            os.replace(tmp, dest)
            if trash:
                remove_tree(trash)
        else:
            self.store.materialize_blob(value.digest, dest, value.executable)
        self._index[rel_path] = [value.digest, value.is_tree, _signature(dest, value.is_tree)]
        self._dirty = True
        self.written += 1
        return dest

    def save(self) -> None:
        if self._dirty:
            atomic_write(self._index_path, json.dumps(self._index, separators=(",", ":")).encode())
            self._dirty = False
