"""The toolbox of ``run_as_root``: programs the script can use that never land in the layer.

dockerTools runs its root scripts with a shell and tools from outside the image; so does
dtbuild. Every root layer's script sees, mounted read-only at :data:`TOOLBOX_DIR`, a small
tree whose ``bin/`` is on the script's PATH *after* the image's own directories (so the
image's tools win):

* a static busybox from the host (Debian's ``busybox-static``, found at
  :data:`BUSYBOX_CANDIDATES`) with a link for each of its applets — the script's shell
  when the image has no ``/bin/sh``;
* ``groupadd`` and ``useradd`` (``toolbox_shadow.sh``, POSIX sh over that busybox, which
  has neither them nor addgroup/adduser), so ``SHADOW_SETUP`` + ``groupadd``/``useradd``
  work on an image built from scratch;
* the ``tools`` of the target: each file at ``bin/<its name>``, each tree (a ``files``
  target, an extracted download) merged at the toolbox's root, so its ``bin/`` holds its
  programs. Tools replace busybox's applets and the wrappers of the same name.

The toolbox is built by RootLayerWrite in its scratch directory (:func:`build_toolbox`)
and mounted by the executor over a mount point it makes and removes again, so neither the
toolbox nor its mount point reaches the upper directory. Its contents are part of the
action's key: the tools are inputs, and the host's busybox and the wrapper script are in
the key through :func:`toolbox_fingerprint` (a new busybox re-runs the layers).
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import struct
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources

from dtbuild.plugins.builtin.image_actions import materialize_nodes, place_artifact
from dtbuild.plugins.builtin.layer_contents import ContentConflict, MergedTree, Node
from dtbuild.plugins.interfaces import ActionContext, ActionFailed, InputArtifact

#: Where the toolbox is mounted in the script's root (no leading slash: relative to the
#: overlay's merged directory).
TOOLBOX_DIR = ".dtbuild-toolbox"
#: Its programs, last on the script's PATH.
TOOLBOX_BIN = f"/{TOOLBOX_DIR}/bin"
#: The script's shell when the image has no /bin/sh.
TOOLBOX_SHELL = f"{TOOLBOX_BIN}/sh"
#: Where a static busybox is looked for on the host, in order.
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox", "/usr/lib/busybox-static/busybox")
#: The wrapper script (package data) and the commands linked to it.
SHADOW_RESOURCE = "toolbox_shadow.sh"
SHADOW_SCRIPT_NAME = "dtbuild-shadow"
SHADOW_COMMANDS = ("groupadd", "useradd")


def is_static_elf(path: str) -> bool:
    """Whether an ELF executable has no program interpreter (is statically linked)."""
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if ident[:4] != b"\x7fELF" or ident[4] != 2:
                return False
            order = "<" if ident[5] == 1 else ">"
            phoff, = struct.unpack_from(order + "Q", ident, 0x20)
            phentsize, phnum = struct.unpack_from(order + "HH", ident, 0x36)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                (p_type,) = struct.unpack(order + "I", f.read(4))
                if p_type == 3:  # PT_INTERP
                    return False
            return True
    except (OSError, struct.error):
        return False


def find_static_busybox(candidates: Iterable[str] = BUSYBOX_CANDIDATES) -> str | None:
    """The first candidate that is a statically linked executable, or None."""
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK) and is_static_elf(path):
            return path
    return None


@dataclass(frozen=True, slots=True)
class StaticBusybox:
    """The host's busybox as it was when it was digested."""

    path: str
    digest: str  # sha256 hex
    size: int
    #: Its applets (``busybox --list``), sorted, without ``busybox`` itself.
    applets: tuple[str, ...]


_memo: dict[tuple[str, int, int, int, int, int], StaticBusybox] = {}
_memo_lock = threading.Lock()


def _applets(path: str) -> tuple[str, ...]:
    try:
        done = subprocess.run([path, "--list"], capture_output=True, text=True, timeout=30, env={},
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    names = {line.strip() for line in done.stdout.splitlines()} if done.returncode == 0 else set()
    return tuple(sorted(n for n in names if n and "/" not in n and n not in (".", "..", "busybox")))


def host_busybox() -> StaticBusybox | None:
    """The host's static busybox, digested (once per process and file version: the memo
    is keyed by its path, device, inode, size, mtime and ctime), or None without one."""
    path = find_static_busybox()
    if path is None:
        return None
    st = os.stat(path)
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _memo_lock:
        found = _memo.get(key)
    if found is not None:
        return found
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    found = StaticBusybox(path, digest.hexdigest(), size, _applets(path))
    with _memo_lock:
        _memo[key] = found
    return found


@functools.cache
def shadow_script() -> bytes:
    """The bytes of groupadd/useradd (:data:`SHADOW_RESOURCE`)."""
    return resources.files("dtbuild.plugins.builtin").joinpath(SHADOW_RESOURCE).read_bytes()


def busybox_fingerprint() -> str:
    """The host's busybox as a key part: ``sha256:<digest>`` (its applet list follows
    from its bytes), or ``none`` without one."""
    busybox = host_busybox()
    return f"sha256:{busybox.digest}" if busybox else "none"


def toolbox_fingerprint() -> str:
    """What of the toolbox is not an input of the action: the host's busybox (digest and
    applets) and the wrapper script. Part of RootLayerWrite's key."""
    busybox = host_busybox()
    doc = hashlib.sha256()
    doc.update(b"busybox\0" + (f"{busybox.digest}\0{','.join(busybox.applets)}".encode() if busybox else b"none"))
    doc.update(b"\0shadow\0" + hashlib.sha256(shadow_script()).hexdigest().encode())
    return "toolbox:" + doc.hexdigest()[:16]


class HostVersion:
    """A ``VERSION`` for action kinds whose bytes depend on something of the host that is
    not an input (the host's busybox): the plain version on the class (the plugin's
    fingerprint, stable across processes and machines) and, on the instance whose VERSION
    goes into each action's key, ``version+fingerprint()`` — found when actions are keyed,
    so another busybox re-keys exactly these actions and the same one elsewhere keys them
    the same."""

    def __init__(self, version: str, fingerprint: Callable[[], str]) -> None:
        self.version = version
        self.fingerprint = fingerprint

    def __get__(self, instance: object, owner: type | None = None) -> str:
        if instance is None:
            return self.version
        return f"{self.version}+{self.fingerprint()}"


def build_toolbox(ctx: ActionContext, dest: str, tools: Sequence[InputArtifact]) -> None:
    """Write the toolbox as a new directory ``dest``: the ``tools`` (files at
    ``bin/NAME``, trees merged at the root; later ones replace earlier ones), then the
    host's busybox at ``bin/busybox``, a link for each of its applets and the wrappers,
    each only where no tool took the name. Nothing is setuid; directories are 0755.

    :raises ActionFailed: for tools that clash (a file where another tool has a
        directory), or a busybox that changed since the action's key was computed.
    """
    tree = MergedTree()
    tree.add("bin", Node("dir", 0o755, origin="the toolbox"))
    try:
        for art in tools:
            if art.is_tree:
                place_artifact(ctx, tree, art, "", art.path)
            else:
                name = posixpath.basename(art.path)
                if art.symlink is not None:
                    tree.add(f"bin/{name}", Node("symlink", 0o777, target=art.symlink, origin=art.path))
                else:
                    ctx.store_file(art)
                    tree.add(f"bin/{name}", Node("file", 0o755, art.digest, art.size, origin=art.path))
    except ContentConflict as e:
        raise ActionFailed(f"the tools of run_as_root clash: {e}") from None
    special = materialize_nodes(ctx, tree.nodes, dest)
    if special:
        ctx.log("run_as_root's tools: setuid, setgid and sticky bits are not kept in the toolbox")
    bindir = os.path.join(dest, "bin")
    busybox = host_busybox()
    if busybox is None:
        ctx.log("no static busybox on this machine (apt-get install busybox-static): run_as_root's toolbox holds "
                "only the target's tools")
        return
    taken = set(os.listdir(bindir))
    if "busybox" not in taken:
        _copy_checked(busybox, os.path.join(bindir, "busybox"))
    for applet in busybox.applets:
        if applet not in taken:
            os.symlink("busybox", os.path.join(bindir, applet))
    script = os.path.join(bindir, SHADOW_SCRIPT_NAME)
    if SHADOW_SCRIPT_NAME not in taken:
        with open(script, "xb") as f:
            f.write(shadow_script())
        os.chmod(script, 0o755)
    for command in SHADOW_COMMANDS:
        if command not in taken:
            os.symlink(SHADOW_SCRIPT_NAME, os.path.join(bindir, command))


def _copy_checked(busybox: StaticBusybox, dest: str) -> None:
    """Copy the host's busybox, checking that its bytes are the ones the key holds."""
    digest = hashlib.sha256()
    with open(busybox.path, "rb") as src, open(dest, "xb") as out:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != busybox.digest:
        raise ActionFailed(f"{busybox.path} changed while the build read it; run the build again")
    os.chmod(dest, 0o755)
