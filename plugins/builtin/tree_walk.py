"""The walk of a customisation root: a program that lists every entry of a tree, run
as its own process (``python -I -m dtbuild.plugins.builtin.tree_walk ROOT OUT``) so
that, under ``fakeroot -i STATE``, it sees owners as fakeroot recorded them.

It writes to OUT, as JSON, one list ``[path, kind, mode, uid, gid, size, target, dev,
ino, nlink]`` per entry below ROOT (paths relative, ``/``-separated, parents before
children, names in sorted order; kind ``dir``, ``file``, ``symlink``, ``char``
(character device), ``block`` (block device) or ``other`` (fifo, socket); mode without
the file type; target a symlink's target or a device's numbers as ``MAJOR,MINOR``,
else empty). Under fakeroot, a device that ``mknod`` made is an empty file on disk that
fakeroot reports as the device. CustomisationLayer reads it.

It imports nothing but the standard library: it runs confined in the command sandbox,
which shows it only the Python installation and dtbuild's own files.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Sequence
from typing import Any

USAGE = "usage: python -I -m dtbuild.plugins.builtin.tree_walk ROOT OUT"


def walk(root: str) -> list[list[Any]]:
    """Every entry below ``root`` as ``[path, kind, mode, uid, gid, size, target, dev,
    ino, nlink]``, parents before children, names sorted; symlinks are not followed."""
    found: list[list[Any]] = []

    def visit(directory: str, prefix: str) -> None:
        for name in sorted(os.listdir(directory)):
            full = os.path.join(directory, name)
            st = os.lstat(full)
            mode = st.st_mode
            kind = ("dir" if stat.S_ISDIR(mode) else "symlink" if stat.S_ISLNK(mode)
                    else "file" if stat.S_ISREG(mode) else "char" if stat.S_ISCHR(mode)
                    else "block" if stat.S_ISBLK(mode) else "other")
            target = (os.readlink(full) if kind == "symlink"
                      else f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}" if kind in ("char", "block") else "")
            found.append([prefix + name, kind, stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_size, target,
                          st.st_dev, st.st_ino, st.st_nlink])
            if kind == "dir":
                visit(full, prefix + name + "/")

    visit(root, "")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Walk ``argv[0]`` and write the entries to ``argv[1]``; 2 on a wrong command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(USAGE, file=sys.stderr)
        return 2
    root, out = args
    entries = walk(root)
    with open(out, "w") as f:
        json.dump(entries, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
