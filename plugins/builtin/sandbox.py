"""The command sandbox: how commands of actions (genrule commands, ``extra_commands``,
``fakeroot_commands``) are confined, on top of bubblewrap (``bwrap``).

A confined command runs in private mount, PID, IPC and UTS namespaces (and network,
unless the action may use the network), in a session of its own, killed when dtbuild
stops. It sees only:

* the paths it was given, read-write (``writable``) or read-only (``readonly``), at
  the same paths as on the host;
* a read-only view of the host's tools: ``/usr``, ``/bin``, ``/sbin`` and ``/lib*`` (as
  the symbolic links they are on a merged-/usr system) and ``/etc`` without its secrets
  (shadow files, sudoers, SSH host keys, private TLS keys, and every entry that other
  users may not read);
* a fresh, read-only ``/proc`` of its own PID namespace, a minimal ``/dev`` (null, zero,
  full, random, urandom, tty, pts, shm) and a private, empty ``/tmp``.

Everything else, the user's home, the cache and the workspace included, is absent; the
root of that view is read-only, so a write anywhere but a writable path fails.

The user chooses with ``[sandbox] commands`` in dtbuild.toml, or ``DTBUILD_SANDBOX``
for one run (the engine applies the variable to the settings executors get): ``bwrap``
(the default) or ``none`` (commands run unconfined as before: as host processes, without
network where ``unshare`` allows it).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dtbuild.plugins.interfaces import SANDBOX_ENV, ActionFailed, Settings

#: The values of ``[sandbox] commands`` / ``DTBUILD_SANDBOX``.
SANDBOX_MODES = ("bwrap", "none")

#: Host directories of programs and libraries, shown read-only (those that exist).
HOST_TOOL_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")

#: Entries of /etc hidden whatever their mode (relative to /etc). Entries that other
#: users may not read are hidden too: the mode says what the owner considers secret.
ETC_SECRETS = ("shadow", "shadow-", "gshadow", "gshadow-", "sudoers", "sudoers.d", "ssh", "ssl/private",
               "security/opasswd", "krb5.keytab", "docker", "containers/auth.json", "libvirt",
               "NetworkManager/system-connections", "wireguard", "ipsec.secrets", "ppp/chap-secrets",
               "ppp/pap-secrets")

#: What a command run by root keeps of root's capabilities: what file work as root
#: relies on (fakeroot's real chowns, writing into read-only directories of an image's
#: tree, keeping setuid bits). Not mounting, devices, tracing other users' processes or
#: anything else that would let it out of its view.
ROOT_CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID")

_OPT_OUT = (f'to run commands unconfined instead, set [sandbox] commands = "none" in dtbuild.toml '
            f"(or {SANDBOX_ENV}=none for one run)")


def sandbox_mode(settings: Settings | Mapping[str, Mapping[str, Any]]) -> str:
    """The sandbox the user chose in the workspace's settings (``[sandbox] commands``,
    which ``DTBUILD_SANDBOX`` overrides): ``bwrap`` (default) or ``none``."""
    mode = (settings.get("sandbox") or {}).get("commands") or "bwrap"
    if mode not in SANDBOX_MODES:
        where = settings.origin("sandbox", "commands") if isinstance(settings, Settings) else "[sandbox] commands"
        raise ActionFailed(f"{where} must be one of {', '.join(SANDBOX_MODES)}, but was {mode!r}")
    return str(mode)


def confine_argv(argv: Sequence[str], *, writable: Sequence[str], readonly: Sequence[str] = (),
                 network: bool = False) -> list[str]:
    """The command line that runs ``argv`` in the sandbox, seeing ``writable`` paths
    read-write and ``readonly`` paths read-only (absolute paths that exist; a path in
    both is writable) besides the host's tools. Run it with a working directory among
    those paths: the command starts there. Raises :class:`ActionFailed` when bubblewrap
    cannot run here."""
    reason = bwrap_unavailable_reason()
    if reason is not None:
        raise ActionFailed(f"commands run in a bubblewrap sandbox, but {reason}; {_OPT_OUT}")
    return _bwrap_argv(_bwrap_path(), argv, writable=writable, readonly=readonly, network=network)


def interpreter_paths() -> tuple[str, ...]:
    """The directories the running Python needs (its installation and virtualenv) and
    dtbuild's own package directories, where the host tools' view lacks them: give them
    as ``readonly`` to run ``sys.executable -I -m dtbuild...`` confined. Only the
    packages' directories are shown, never what holds them (for an editable install,
    the source checkout)."""
    paths: list[str] = []
    for prefix in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix,
                   os.path.dirname(os.path.realpath(sys.executable)), *_package_dirs()):
        path = os.path.abspath(prefix)
        if not _under_host_tools(path) and path not in paths:
            paths.append(path)
    return tuple(p for p in paths if not any(p.startswith(q + "/") for q in paths))


#: dtbuild's top-level packages: what a ``python -I -m dtbuild...`` program may import.
_PACKAGES = ("dtbuild.engine", "dtbuild.rules", "dtbuild.plugins")


def _package_dirs() -> list[str]:
    # Found, not imported: an installed wheel has them in site-packages (inside the
    # prefixes already), an editable install wherever its source is.
    dirs: list[str] = []
    for name in _PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs += [d for d in spec.submodule_search_locations if os.path.isdir(d)]
    return dirs


@functools.cache
def bwrap_unavailable_reason() -> str | None:
    """None when bubblewrap confines commands on this machine, else why not (probed once
    per process by running ``true`` confined)."""
    bwrap = _bwrap_path()
    if bwrap is None:
        return "bwrap is not installed (apt-get install bubblewrap)"
    with tempfile.TemporaryDirectory(prefix="dtbuild-sandbox-probe-") as scratch:
        argv = _bwrap_argv(bwrap, ["true"], writable=[scratch], readonly=(), network=False)
        try:
            done = subprocess.run(argv, cwd=scratch, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"bwrap does not run here ({e})"
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = said[-1] if said else f"exit status {done.returncode}"
        hint = ""
        if "namespace" in detail.lower():
            hint = " (unprivileged user namespaces may be disabled: sysctl kernel.unprivileged_userns_clone=1)"
        return f"bwrap cannot create a sandbox here: {detail}{hint}"
    return None


# --------------------------------------------------------------------------- the command line


def _bwrap_path() -> str | None:
    # Looked up in dtbuild's own PATH: commands get a fixed PATH of their own.
    return shutil.which("bwrap")


def _bwrap_argv(bwrap: str | None, argv: Sequence[str], *, writable: Sequence[str], readonly: Sequence[str],
                network: bool) -> list[str]:
    out = [bwrap or "bwrap", "--die-with-parent", "--new-session",
           "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if not network:
        out.append("--unshare-net")
    if os.geteuid() == 0:
        # As root without a user namespace bwrap would keep every capability.
        out += ["--cap-drop", "ALL"]
        for cap in ROOT_CAPABILITIES:
            out += ["--cap-add", cap]
    out += _host_view()
    # A private /proc, read-only: as uid 0, /proc/sys would otherwise let a command
    # change the host kernel's settings (core_pattern runs a program as host root).
    out += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    out += _declared_mounts(writable, readonly)
    # Last: the view's own root (bwrap's tmpfs) becomes read-only, so that writes
    # outside the declared paths fail rather than vanish.
    out += ["--remount-ro", "/", "--", *argv]
    return out


@functools.cache
def _host_view() -> tuple[str, ...]:
    out: list[str] = []
    for d in HOST_TOOL_DIRS:
        if os.path.islink(d):
            out += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            out += ["--ro-bind", d, d]
    if os.path.isdir("/etc"):
        out += ["--ro-bind", "/etc", "/etc"]
        for path, is_dir in _etc_secrets():
            if is_dir:
                out += ["--tmpfs", path, "--remount-ro", path]
            else:
                # Bound without device access: opening it fails, as for a secret.
                out += ["--ro-bind", "/dev/null", path]
    return tuple(out)


def _etc_secrets() -> list[tuple[str, bool]]:
    """(path, is a directory) for each entry of /etc to hide, parents before children,
    none inside another."""
    found: dict[str, bool] = {}
    for rel in ETC_SECRETS:
        path = os.path.join("/etc", rel)
        kind = _kind(path)
        if kind is not None:
            found[path] = kind == "dir"
    for path, is_dir in _unreadable_entries("/etc"):
        found.setdefault(path, is_dir)
    hidden: list[tuple[str, bool]] = []
    for path in sorted(found):
        if not any(path.startswith(h + "/") for h, d in hidden if d):
            hidden.append((path, found[path]))
    return hidden


def _unreadable_entries(top: str) -> Iterator[tuple[str, bool]]:
    """Files and directories below ``top`` that other users may not read (directories
    also: not search), without following symbolic links."""
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if st.st_mode & 0o005 != 0o005:
                yield entry.path, True
            else:
                yield from _unreadable_entries(entry.path)
        elif stat.S_ISREG(st.st_mode) and not st.st_mode & 0o004:
            yield entry.path, False


def _kind(path: str) -> str | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return None  # a link points into the view or outside it: either way nothing to hide


def _declared_mounts(writable: Sequence[str], readonly: Sequence[str]) -> list[str]:
    modes: dict[str, str] = {}
    for path in readonly:
        modes[_absolute(path)] = "--ro-bind"
    for path in writable:
        modes[_absolute(path)] = "--bind"
    out: list[str] = []
    # Parents first, so that a read-only input inside a writable directory stays so.
    for path in sorted(modes, key=lambda p: (p.count("/"), p)):
        out += [modes[path], path, path]
    return out


def _absolute(path: str) -> str:
    if not os.path.isabs(path):
        raise ActionFailed(f"sandbox paths must be absolute, but {path!r} is not")
    return os.path.normpath(path)


def _under_host_tools(path: str) -> bool:
    real_dirs = [os.path.realpath(d) for d in HOST_TOOL_DIRS]
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in (*HOST_TOOL_DIRS, *real_dirs))
