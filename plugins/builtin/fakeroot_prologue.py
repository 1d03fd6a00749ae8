"""The start of ``fakeroot_commands``: a program run under fakeroot, in the
customisation root, before the user's commands (``fakeroot -s STATE -- python -I -m
dtbuild.plugins.builtin.fakeroot_prologue OWNERS -- COMMAND...``).

It gives every entry of the working directory the owner it has in the packages'
layers (OWNERS, JSON: ``{"default": [uid, gid], "owners": {dir path: [uid, gid]}}``:
directories the base image has keep its owners, everything else gets the default),
puts back the setuid/setgid bits that chown clears, then replaces itself with COMMAND,
so that the commands run in the same fakeroot session and see those owners.

It imports nothing but the standard library: it runs confined in the command sandbox,
which shows it only the Python installation and dtbuild's own files.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Sequence

USAGE = "usage: python -I -m dtbuild.plugins.builtin.fakeroot_prologue OWNERS -- COMMAND..."


def set_owners(spec_path: str, top: str = ".") -> None:
    """Give each entry below ``top`` its owner from the spec at ``spec_path`` (paths in
    it relative to ``top``), keeping setuid/setgid bits; symlinks are not followed."""
    with open(spec_path) as f:
        spec = json.load(f)
    default, owners = spec["default"], spec["owners"]
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, top)
            st = os.lstat(full)
            uid, gid = owners.get(rel, default) if stat.S_ISDIR(st.st_mode) else default
            os.lchown(full, uid, gid)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o6000:
                os.chmod(full, stat.S_IMODE(st.st_mode))


def main(argv: Sequence[str] | None = None) -> int:
    """Set the owners below the working directory, then exec the command after ``--``
    (returns only on a wrong command line: 2)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--":
        print(USAGE, file=sys.stderr)
        return 2
    set_owners(args[0])
    command = args[2:]
    os.execvp(command[0], command)
    return 0  # not reached: execvp replaces the process or raises


if __name__ == "__main__":
    sys.exit(main())
