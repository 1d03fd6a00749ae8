"""The ``namespace`` executor: root layers built in Linux namespaces, with no VM.

For a :class:`~dtbuild.plugins.builtin.root_layer.RootLayerRequest` it runs this module
as a program (``python -m dtbuild.plugins.builtin.namespace_executor JOB.json``) as
process 1 of new mount, PID, IPC, UTS and (unless the action may use the network)
network namespaces — what dockerTools does with ``unshare -imnpuf`` — and, when dtbuild
is not root, in a user namespace whose root is the invoking user and whose other ids are
the user's subordinate ids (``unshare --map-root-user --map-auto``), so that the script
can ``chown`` to any id. ``setpriv --pdeathsig KILL`` ties that ``unshare`` to dtbuild:
if dtbuild dies, even by SIGKILL, the kernel kills it and with it every process below.
This *helper* is trusted and sees the host; it:

1. gives the base's unpacked tree its owners (the sidecar of RootfsUnpack; device nodes
   are never created on the host),
2. mounts the overlay: kernel overlayfs (``userxattr`` in a user namespace, ``volatile``
   where the kernel has it) or fuse-overlayfs where the kernel's cannot be mounted,
3. runs ``run_as_root`` in a sandbox (:func:`run_sandboxed`): a new user namespace (ids
   mapped to themselves) where the kernel allows one, new mount, PID, IPC, UTS and network
   namespaces; process 1 of the PID namespace mounts a small /dev (a tmpfs with null,
   zero, full, random, urandom and tty bound from the host, its own devpts), a fresh
   /proc (the parts that reach the host kernel by file permissions alone read-only or
   hidden), a read-only /sys and, read-only at /.dtbuild-toolbox, the toolbox
   (:mod:`~dtbuild.plugins.builtin.toolbox`: a mount point made for the run and removed
   before packing), pivots (``pivot_root``) into the overlay and detaches the old root,
   sets no_new_privs, keeps only :data:`KEPT_CAPABILITIES` and executes the image's
   /bin/sh (the toolbox's sh when the image has none) with umask 022 and a fixed
   environment. No host path, process or file descriptor of the helper is reachable from
   there,
4. unmounts, runs ``extra_commands`` in the upper directory (umask 022, a fixed
   environment, confined by :mod:`~dtbuild.plugins.builtin.sandbox` to the upper
   directory unless the user opted out), packs the upper directory into the layer tar (owners read inside the
   namespace, as the image will hold them) and removes every directory it used.

The mounts live only in private mount namespaces: when their last process exits — also
when the build is interrupted and the process group is killed — the kernel unmounts them.
Directories the namespace left behind are removed from a new namespace.

Other commands run as the ``local`` executor runs them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dtbuild.plugins.builtin import sandbox
from dtbuild.plugins.builtin.executors import LocalExecutor, run_supervised
from dtbuild.plugins.builtin.root_layer import (
    PRIVATE_MODE,
    SCRIPT_ENV,
    RootLayerJob,
    RootLayerRequest,
    UpperDirError,
    pack_upper_directory,
    prepare,
    remove_tree_as_owner,
    write_status,
)
from dtbuild.plugins.builtin.toolbox import TOOLBOX_DIR, TOOLBOX_SHELL
from dtbuild.plugins.interfaces import (
    ActionFailed,
    CancelToken,
    CommandRequest,
    CommandResult,
    Executor,
)

#: Kernel overlayfs options: no redirects, no metadata-only copy-ups, no index, so that
#: the upper directory is a plain tree a tar writer can read.
KERNEL_OVERLAY_OPTIONS = "redirect_dir=nofollow,metacopy=off,index=off,xino=off"
#: No syncs of the upper directory (Linux >= 5.10): it is scratch, packed right after,
#: and an unmount that syncs a busy disk can take seconds.
VOLATILE = ",volatile"
#: ``DTBUILD_NAMESPACE_OVERLAY=kernel|fuse`` forces one overlay implementation.
OVERLAY_ENV = "DTBUILD_NAMESPACE_OVERLAY"
_STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


@dataclass(frozen=True, slots=True)
class NamespaceSetup:
    """How root layers run on this machine."""

    #: In a user namespace (dtbuild is not root).
    userns: bool
    #: "kernel" or "fuse".
    overlay: str
    #: Options of a kernel overlay mount (besides the directories).
    kernel_options: str = KERNEL_OVERLAY_OPTIONS

    @property
    def unshare_prefix(self) -> list[str]:
        return ["unshare", "--map-root-user", "--map-auto"] if self.userns else ["unshare"]


# --------------------------------------------------------------------------- running a process


def helper_env() -> dict[str, str]:
    """The environment of dtbuild's own helper processes (python -m ...). Settings do
    not travel here: what a helper needs is in its job file or on its command line."""
    env = {"PATH": os.environ.get("PATH") or _STANDARD_PATH, "LANG": "C.UTF-8"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def remove_as_owner(paths: Sequence[str], userns: bool) -> None:
    """Remove directories a (user) namespace wrote: files the script gave other owners
    belong to subordinate ids outside it, so an ordinary user removes them from a new
    user namespace with the same mapping."""
    paths = [p for p in paths if os.path.lexists(p)]
    if not paths:
        return
    if not userns:
        for p in paths:
            remove_tree_as_owner(p)
        return
    subprocess.run(["unshare", "--map-root-user", "--map-auto", sys.executable, "-m",
                    "dtbuild.plugins.builtin.root_layer", "remove", *paths],
                   env=helper_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)


# --------------------------------------------------------------------------- probing


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _has_subordinate_ids(name: str) -> bool:
    uid = str(os.geteuid())
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                owners = {line.split(":", 1)[0] for line in f if ":" in line}
        except OSError:
            return False
        if name not in owners and uid not in owners:
            return False
    return True


_PROBE_SCRIPT = (
    "set -e\n"
    "{mount}\n"
    "rm merged/file\n"
    "mkdir merged/dir\n"
    "chown 1:1 merged/dir\n"
    "umount merged\n"
    "rm -rf upper work\n")


def _probe_parent(cache_dir: str | None) -> str | None:
    """Where to try the overlay: the cache's tmp directory, where real ones are mounted
    (file systems differ in what overlayfs accepts as its upper directory)."""
    if not cache_dir:
        return None
    tmp = os.path.join(cache_dir, "tmp")
    return tmp if os.path.isdir(tmp) and os.access(tmp, os.W_OK) else None


def _try_overlay(prefix: list[str], mount: str, cache_dir: str | None) -> tuple[bool, str]:
    # Named like the store's temporaries (pid first), so a killed probe is cleaned up.
    with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-overlay-probe-", dir=_probe_parent(cache_dir),
                                     ignore_cleanup_errors=True) as d:
        for sub in ("lower", "upper", "work", "merged"):
            os.mkdir(os.path.join(d, sub))
        with open(os.path.join(d, "lower", "file"), "w"):
            pass
        try:
            done = subprocess.run([*prefix, "--mount", "sh", "-c", _PROBE_SCRIPT.format(mount=mount)], cwd=d,
                                  capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, str(e)
        return done.returncode == 0, (done.stderr or done.stdout).strip()


def kernel_options(userns: bool, volatile: bool) -> str:
    return KERNEL_OVERLAY_OPTIONS + (",userxattr" if userns else "") + (VOLATILE if volatile else "")


def _kernel_mount(options: str) -> str:
    return f"mount -t overlay overlay -o lowerdir=lower,upperdir=upper,workdir=work,{options} merged"


_FUSE_MOUNT = "fuse-overlayfs -o lowerdir=lower,upperdir=upper,workdir=work merged"


@functools.cache
def probe(cache_dir: str | None = None) -> tuple[NamespaceSetup | None, str | None]:
    """(how root layers run here, None) or (None, what is missing and how to get it).
    Tried once per process (and cache directory, whose ``tmp/`` holds the real overlays):
    a mount of a tiny overlay that deletes a file and chowns."""
    if not sys.platform.startswith("linux"):
        return None, "it needs Linux (namespaces and overlayfs); use executor = \"vm\""
    for program in ("unshare", "setpriv"):
        if shutil.which(program) is None:
            return None, f"'{program}' is not installed (install util-linux)"
    userns = os.geteuid() != 0
    forced = os.environ.get(OVERLAY_ENV, "")
    if userns:
        if shutil.which("newuidmap") is None or shutil.which("newgidmap") is None:
            return None, ("as an ordinary user it needs newuidmap and newgidmap (install the uidmap package), "
                          "or run dtbuild as root, or use executor = \"vm\"")
        name = _user_name()
        if not _has_subordinate_ids(name):
            return None, (f"as an ordinary user it needs subordinate ids for {name!r} in /etc/subuid and "
                          f"/etc/subgid (as root: usermod --add-subuids 100000-165535 --add-subgids "
                          f"100000-165535 {name}), or run dtbuild as root, or use executor = \"vm\"")
        try:
            plain = subprocess.run(["unshare", "--map-root-user", "--map-auto", "true"], capture_output=True,
                                   text=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"unshare --map-root-user --map-auto failed: {e}"
        if plain.returncode != 0:
            return None, ("user namespaces do not work for this user: "
                          f"'unshare --map-root-user --map-auto true' says {plain.stderr.strip()!r} "
                          "(check sysctl kernel.unprivileged_userns_clone=1, and on Ubuntu "
                          "kernel.apparmor_restrict_unprivileged_userns=0), or run dtbuild as root")
    prefix = NamespaceSetup(userns, "kernel").unshare_prefix
    tried = []
    if forced in ("", "kernel"):
        for volatile in (True, False):
            options = kernel_options(userns, volatile)
            ok, detail = _try_overlay(prefix, _kernel_mount(options), cache_dir)
            if ok:
                return NamespaceSetup(userns, "kernel", options), None
        where = "in a user namespace (Linux >= 5.11)" if userns else "as root"
        tried.append(f"kernel overlayfs {where} failed ({detail or 'no message'}; kernel {os.uname().release})")
    if forced in ("", "fuse"):
        if shutil.which("fuse-overlayfs") is None:
            tried.append("fuse-overlayfs is not installed (apt-get install fuse-overlayfs)")
        elif not os.access("/dev/fuse", os.R_OK | os.W_OK):
            tried.append("fuse-overlayfs cannot open /dev/fuse (it must be readable and writable by this user)")
        else:
            ok, detail = _try_overlay(prefix, _FUSE_MOUNT, cache_dir)
            if ok:
                return NamespaceSetup(userns, "fuse"), None
            tried.append(f"fuse-overlayfs failed ({detail or 'no message'})")
    if forced not in ("", "kernel", "fuse"):
        tried.append(f"{OVERLAY_ENV}={forced!r} is not one of kernel, fuse")
    return None, "no overlay can be mounted here: " + "; ".join(tried) + "; or use executor = \"vm\""


# --------------------------------------------------------------------------- the executor


class NamespaceExecutor(Executor):
    NAME = "namespace"

    def _cache_dir(self) -> str | None:
        return self.context.cache_dir if self.context is not None else None

    def unavailable_reason(self) -> str | None:
        return probe(self._cache_dir())[1]

    def run(self, request: CommandRequest, cancel: CancelToken) -> CommandResult:
        if not isinstance(request, RootLayerRequest):
            return LocalExecutor(self.context).run(request, cancel)
        setup, reason = probe(self._cache_dir())
        if setup is None:
            return CommandResult(1, f"the namespace executor cannot run here: {reason}")
        job = request.job
        work = os.path.join(job.job_dir, "overlay-work")
        merged = os.path.join(job.job_dir, "merged")
        os.mkdir(work, PRIVATE_MODE)
        os.mkdir(merged, PRIVATE_MODE)
        job_json = os.path.join(job.job_dir, "job.json")
        # The helper reads no settings: the sandbox of extra_commands travels in the job.
        job.save(job_json, overlay=setup.overlay, kernel_options=setup.kernel_options, work=work, merged=merged,
                 sandbox=sandbox.sandbox_mode(self.settings))
        if setup.overlay == "fuse":
            request.log("kernel overlayfs cannot be mounted here: using fuse-overlayfs")
        namespaces = ["--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts"]
        if not request.network:
            namespaces.append("--net")
        # setpriv: if dtbuild dies (even by SIGKILL), the kernel kills unshare, whose
        # --kill-child takes the helper and with it every process of its PID namespace.
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *setup.unshare_prefix, *namespaces, "--",
                sys.executable, "-m", "dtbuild.plugins.builtin.namespace_executor", job_json]
        try:
            return run_supervised(argv, cwd=job.job_dir, env=helper_env(), cancel=cancel)
        finally:
            remove_as_owner([job.lower, job.seed, work, merged], setup.userns)


# --------------------------------------------------------------------------- the sandbox (Linux calls)

# From <sched.h>, <sys/mount.h>, <sys/prctl.h> and <linux/capability.h>.
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: (pivot_root, capset) system call numbers: glibc wraps neither on every version.
_SYSCALLS = {"x86_64": (155, 126), "aarch64": (41, 91), "riscv64": (41, 91), "ppc64le": (203, 184),
             "s390x": (217, 185)}

#: The capabilities the script keeps: Docker's default set without MKNOD (a device node
#: made in the overlay would be a device on the host's upper directory) and NET_RAW
#: (package installation opens no raw sockets). Everything else (SYS_ADMIN, SYS_PTRACE,
#: SYS_MODULE, DAC_READ_SEARCH, SYS_RAWIO, NET_ADMIN, ...) is dropped from the bounding,
#: effective, permitted, inheritable and ambient sets.
KEPT_CAPABILITIES = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6,
    "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10, "CAP_SYS_CHROOT": 18, "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}

#: Parts of the script's /proc that reach the host kernel with file permissions only (a
#: process that is uid 0 may write them whatever its capabilities): read-only, as in a
#: Docker container, or hidden.
_PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
_PROC_HIDDEN_FILES = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats")
_PROC_HIDDEN_DIRS = ("acpi", "scsi")

#: The umask of run_as_root and extra_commands, whatever the user's.
COMMAND_UMASK = 0o022


class SandboxError(OSError):
    """Setting up the script's sandbox failed (the message says which step)."""


@functools.cache
def _libc() -> Any:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        errno = ctypes.get_errno()
        raise SandboxError(errno, f"{what}: {os.strerror(errno)}")


def _sys_mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if v is None else os.fsencode(v) for v in (source, target, fstype, data)]
    _check(_libc().mount(enc[0], enc[1], enc[2], flags, enc[3]),
           f"mount {fstype or source or ''} on {target}")


def _syscall_numbers() -> tuple[int, int]:
    machine = os.uname().machine
    if machine not in _SYSCALLS:
        raise SandboxError(0, f"pivot_root and capset are not known for the {machine} architecture")
    return _SYSCALLS[machine]


def _pivot_into(root: str) -> None:
    """Make ``root`` (a mount point of this mount namespace) the root directory; the old
    root is unmounted (detached with all its mounts), so no host path stays reachable."""
    import ctypes

    os.chdir(root)
    number = _syscall_numbers()[0]
    _check(_libc().syscall(ctypes.c_long(number), b".", b"."), "pivot_root")
    # pivot_root(".", ".") stacks the old root on the new one: no directory for it is
    # made in the overlay, and unmounting "." removes it.
    _check(_libc().umount2(b".", MNT_DETACH), "unmounting the old root")
    os.chdir("/")


def _drop_privileges() -> None:
    """no_new_privs, and only :data:`KEPT_CAPABILITIES` in every capability set."""
    import ctypes

    libc = _libc()
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 40
    kept = set(KEPT_CAPABILITIES.values())
    for cap in range(last + 1):
        if cap not in kept:
            _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl(PR_CAPBSET_DROP, {cap})")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL before Linux 4.3: nothing to clear

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    mask = sum(1 << c for c in kept)
    data = (Data * 2)(Data(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0), Data(mask >> 32, mask >> 32, 0))
    header = Header(_LINUX_CAPABILITY_VERSION_3, 0)
    number = _syscall_numbers()[1]
    _check(libc.syscall(ctypes.c_long(number), ctypes.byref(header), data), "capset")


def _mount_dev(dev: str) -> None:
    """A small /dev: a tmpfs with the harmless devices bound from the host's /dev."""
    _sys_mount("dtbuild-dev", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=4m")
    for name in _DEVICES:
        target = os.path.join(dev, name)
        if os.path.exists("/dev/" + name):
            with open(target, "w"):
                pass
            try:
                _sys_mount("/dev/" + name, target, None, MS_BIND)
            except OSError:
                os.unlink(target)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "pts"))
    try:  # a private devpts instance: the host's terminals are not in it
        _sys_mount("devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC,
                   "newinstance,ptmxmode=0666,mode=0620")
    except OSError:
        pass
    os.mkdir(os.path.join(dev, "shm"))
    os.chmod(os.path.join(dev, "shm"), 0o1777)
    _sys_mount(None, dev, None, MS_REMOUNT | MS_NOSUID | MS_NOEXEC, "mode=755,size=4m")


def _mount_proc(proc: str) -> None:
    _sys_mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for name in _PROC_READ_ONLY:
        path = os.path.join(proc, name)
        if os.path.exists(path):
            _sys_mount(path, path, None, MS_BIND | MS_REC)
            _sys_mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for name in _PROC_HIDDEN_FILES:
        path = os.path.join(proc, name)
        if os.path.exists(path):
            _sys_mount("/dev/null", path, None, MS_BIND)
    for name in _PROC_HIDDEN_DIRS:
        path = os.path.join(proc, name)
        if os.path.isdir(path):
            _sys_mount("dtbuild-empty", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=0")


#: statvfs flags of a mount that a bind mount of it keeps (in a user namespace the kernel
#: refuses a remount that would drop them), with the mount flag each is.
_LOCKED_FLAGS = ((os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048),
                 (os.ST_RELATIME, 1 << 21))


def _bind_read_only(source: str, target: str) -> None:
    """Bind ``source`` (a host directory, before the pivot) at ``target``, read-only,
    nosuid and nodev."""
    _sys_mount(source, target, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    held = os.statvfs(source).f_flag
    for st_flag, ms_flag in _LOCKED_FLAGS:
        if held & st_flag:
            flags |= ms_flag
    _sys_mount(None, target, None, flags)


def _enter_sandbox(merged: str, mount_points: Sequence[str], own_network: bool, toolbox: str | None = None) -> None:
    """In process 1 of the script's PID namespace, in its own mount namespace: mount
    /dev, /proc and /sys in the overlay (and the ``toolbox`` read-only at
    /.dtbuild-toolbox, whose mount point the caller made), pivot into it, drop
    privileges."""
    _sys_mount(None, "/", None, MS_REC | MS_PRIVATE)
    # A mount made here, not one copied from the helper's namespace (pivot_root refuses
    # those when this namespace belongs to a new user namespace).
    _sys_mount(merged, merged, None, MS_BIND | MS_REC)
    for name in mount_points:
        path = os.path.join(merged, name)
        if name == "dev":
            _mount_dev(path)
        elif name == "proc":
            _mount_proc(path)
        elif own_network:  # sysfs shows the network namespace it is mounted in: only our own
            try:
                _sys_mount("sysfs", path, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except OSError:
                pass  # /sys stays an empty directory
    if toolbox is not None:
        _bind_read_only(toolbox, os.path.join(merged, TOOLBOX_DIR))
    _pivot_into(merged)
    os.umask(COMMAND_UMASK)


def _identity_map(kind: str) -> str:
    """The ids of this (helper's) user namespace, each mapped to itself."""
    lines = []
    with open(f"/proc/self/{kind}_map") as f:
        for line in f:
            inside, _outside, count = line.split()
            lines.append(f"{inside} {inside} {count}\n")
    return "".join(lines)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def run_sandboxed(merged: str, mount_points: Sequence[str], argv: Sequence[str], env: Mapping[str, str], *,
                  network: bool, toolbox: str | None = None, fallbacks: Sequence[str] = ()) -> tuple[int, str, bool]:
    """Run ``argv`` (a program of the overlay) pivoted into ``merged``: (exit code, why
    the sandbox could not be set up or "", whether it ran in a user namespace). With
    ``toolbox``, that host directory is mounted read-only at /.dtbuild-toolbox (which must
    exist in ``merged``); where ``argv[0]`` does not exist, the first of ``fallbacks``
    (programs of the sandbox, such as the toolbox's sh) that does runs in its place.

    A first child enters a new user namespace (this process maps its ids to themselves),
    then new mount, PID, IPC, UTS and (without ``network``) network namespaces; its
    child is process 1 of the PID namespace, mounts a fresh /proc, a small /dev and a
    read-only /sys, pivots into the overlay, drops privileges and executes ``argv``.
    When that process 1 exits, the kernel kills every process left in its namespace.
    """
    errors_r, errors_w = os.pipe()  # the sandbox's setup error; closed by a successful exec
    sync_r, sync_w = os.pipe()  # child -> helper: "u" (map my ids) or "n" (no user namespace)
    mapped_r, mapped_w = os.pipe()  # helper -> child: the ids are mapped
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            os.close(errors_r)
            os.close(sync_r)
            os.close(mapped_w)
            code = _sandbox_parent(merged, mount_points, argv, env, network, errors_w, sync_w, mapped_r,
                                   toolbox, fallbacks)
        except BaseException as e:  # anything here must reach the helper as a message
            with contextlib.suppress(OSError):
                os.write(errors_w, f"{e}".encode())
        finally:
            os._exit(code)
    os.close(errors_w)
    os.close(sync_w)
    os.close(mapped_r)
    userns = False
    try:
        answer = os.read(sync_r, 1)
        if answer == b"u":
            userns = True
            for kind in ("uid", "gid"):
                with open(f"/proc/{pid}/{kind}_map", "w") as f:
                    f.write(_identity_map(kind))
        if answer:
            os.write(mapped_w, b"m")
    except OSError as e:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(errors_r)
        return 1, f"mapping the script's user namespace failed: {e}", userns
    finally:
        os.close(sync_r)
        os.close(mapped_w)
    chunks = []
    while chunk := os.read(errors_r, 4096):
        chunks.append(chunk)
    os.close(errors_r)
    _, status = os.waitpid(pid, 0)
    return _exit_code(status), b"".join(chunks).decode("utf-8", "replace"), userns


def _sandbox_parent(merged: str, mount_points: Sequence[str], argv: Sequence[str], env: Mapping[str, str],
                    network: bool, errors_w: int, sync_w: int, mapped_r: int, toolbox: str | None = None,
                    fallbacks: Sequence[str] = ()) -> int:  # pragma: no cover
    libc = _libc()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    in_userns = libc.unshare(CLONE_NEWUSER) == 0
    os.write(sync_w, b"u" if in_userns else b"n")
    os.close(sync_w)
    if os.read(mapped_r, 1) != b"m":
        raise SandboxError(0, "the helper did not map the script's user namespace")
    os.close(mapped_r)
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | (0 if network else CLONE_NEWNET)
    _check(libc.unshare(flags), "unshare (mount, PID, IPC, UTS, network namespaces)")
    pid = os.fork()
    if pid == 0:
        code = 126
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            _enter_sandbox(merged, mount_points, own_network=not network, toolbox=toolbox)
            _drop_privileges()
            os.closerange(3, errors_w)
            os.closerange(errors_w + 1, 1 << 16)
            os.set_inheritable(errors_w, False)
            for program in (argv[0], *fallbacks):
                try:
                    os.execve(program, [program, *argv[1:]], dict(env))
                except FileNotFoundError:
                    continue
            code = 127
            if fallbacks:
                raise SandboxError(0, f"the base image has no {argv[0]} and run_as_root's toolbox has no "
                                   f"{os.path.basename(argv[0])}: install a static busybox on this machine "
                                   "(apt-get install busybox-static) or name a shell in the target's `tools`")
            raise SandboxError(0, f"the base image has no {argv[0]}: run_as_root runs with the image's "
                               f"{argv[0]}")
        except BaseException as e:  # reported to the helper
            with contextlib.suppress(OSError):
                os.write(errors_w, str(e).encode())
        finally:
            os._exit(code)
    os.close(errors_w)
    _, status = os.waitpid(pid, 0)
    return _exit_code(status)


# --------------------------------------------------------------------------- inside the namespaces


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {(done.stderr or done.stdout).strip()}")


def _umount(path: str) -> None:
    subprocess.run(["umount", "--recursive", path], capture_output=True, stdin=subprocess.DEVNULL, check=False)


def _make_mount_point(merged: str, name: str, created: list[str]) -> bool:
    """Whether ``name`` (below ``merged``) can be mounted on: a directory of the image, or
    one made now (then added to ``created``); not a symlink or another file."""
    path = os.path.join(merged, name)
    if not os.path.lexists(path):
        os.mkdir(path, 0o755)
        created.append(name)
        return True
    return not os.path.islink(path) and os.path.isdir(path)


def _make_mount_points(merged: str, warn: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """(where /dev, /proc and /sys can be mounted in the overlay, the mount points this
    made, removed again before packing so that they do not enter the layer)."""
    usable: list[str] = []
    created: list[str] = []
    for name in ("dev", "proc", "sys"):
        if not _make_mount_point(merged, name, created):
            warn(f"/{name} in the image is not a directory: nothing is mounted there")
            continue
        usable.append(name)
    return usable, created


def _in_namespace(job_json: str) -> int:
    """Process 1 of the namespaces: everything from owners to the packed layer."""
    with open(job_json) as f:
        data = json.load(f)
    job = RootLayerJob.from_json(data)
    upper, work, merged = job.seed, data["work"], data["merged"]

    def warn(message: str) -> None:
        print(f"dtbuild: {message}", file=sys.stderr, flush=True)

    def fail(stage: str, code: int, message: str) -> int:
        write_status(job.job_dir, stage, code, message)
        if message:
            warn(message)
        return code or 1

    try:
        try:
            prepare(job, log=warn)
        except (OSError, ValueError) as e:
            return fail("prepare", 1, f"preparing the base's owners failed: {e}")
        base = os.path.commonpath([job.lower, upper, work, merged])
        rel = {name: os.path.relpath(p, base) for name, p in
               (("lower", job.lower), ("upper", upper), ("work", work), ("merged", merged))}
        if any(c in p for p in rel.values() for c in ",:"):
            return fail("mount", 1, f"overlay directories under {base} must not hold ',' or ':'")
        os.chdir(base)
        try:
            if data["overlay"] == "fuse":
                done = subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={rel['lower']},upperdir={rel['upper']},"
                                       f"workdir={rel['work']}", rel["merged"]], capture_output=True, text=True)
                if done.returncode != 0:
                    raise OSError(f"fuse-overlayfs: {(done.stderr or done.stdout).strip()}")
            else:
                options = (f"lowerdir={rel['lower']},upperdir={rel['upper']},workdir={rel['work']},"
                           + data["kernel_options"])
                _mount("-t", "overlay", "-o", options, "dtbuild-overlay", rel["merged"])
        except OSError as e:
            return fail("mount", 1, f"mounting the overlay failed: {e}")
        os.chdir("/")
        code, problem = _run_script(job, merged, warn)
        if problem:
            return fail("sandbox" if code != 127 else "run_as_root", code, problem)
        if code != 0:
            return fail("run_as_root", code, "")
        if job.extra_commands.strip():
            try:
                code = _run_extra_commands(job, upper, data.get("sandbox", "bwrap"))
            except ActionFailed as e:
                return fail("extra_commands", 1, str(e))
            if code != 0:
                return fail("extra_commands", code, "")
        try:
            pack_upper_directory(upper, job.lower, job.layer_tar, job.layer_meta)
        except (UpperDirError, OSError, ValueError) as e:
            return fail("pack", 1, f"packing the layer failed: {e}")
        write_status(job.job_dir, "done", 0)
        return 0
    finally:
        os.chdir("/")
        _umount(merged)
        for path in (job.lower, upper, work, merged):
            try:
                remove_tree_as_owner(path)
            except OSError as e:
                warn(f"cannot remove {path}: {e}")


def _run_script(job: RootLayerJob, merged: str, warn: Callable[[str], None]) -> tuple[int, str]:
    """Run the script in its sandbox: (exit code, why the sandbox failed or "")."""
    usable, created = _make_mount_points(merged, warn)
    toolbox = job.toolbox or None
    if toolbox is not None and not _make_mount_point(merged, TOOLBOX_DIR, created):
        warn(f"/{TOOLBOX_DIR} in the image is not a directory: run_as_root gets no toolbox")
        toolbox = None
    code, problem, _userns = run_sandboxed(merged, usable, ["/bin/sh", "-c", "set -e\n" + job.script],
                                           SCRIPT_ENV, network=job.network, toolbox=toolbox,
                                           fallbacks=(TOOLBOX_SHELL,) if toolbox else ())
    _stop_leftovers()
    for name in created:
        try:
            os.rmdir(os.path.join(merged, name))
        except OSError as e:
            warn(f"cannot remove the mount point /{name}: {e}")
    _umount(merged)
    return code, problem


def _stop_leftovers() -> None:
    """As process 1 of the helper's PID namespace (whose /proc unshare mounted): kill
    whatever is still running besides fuse-overlayfs. The script's own PID namespace is
    gone when its process 1 has exited (the kernel kills the rest), so this is only a
    safeguard: nothing may write to the upper directory while it is packed."""
    import time

    me = os.getpid()
    killed = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/comm") as f:
                if f.read().strip() == "fuse-overlayfs":
                    continue
            os.kill(int(name), signal.SIGKILL)
            killed.add(int(name))
        except OSError:
            continue
    deadline = time.monotonic() + 5
    while killed and time.monotonic() < deadline:
        for pid in list(killed):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    killed.discard(pid)
            except ChildProcessError:  # not ours (yet): gone once /proc no longer lists it
                if not os.path.exists(f"/proc/{pid}"):
                    killed.discard(pid)
        if killed:
            time.sleep(0.01)


def extra_commands_env(job: RootLayerJob, upper: str) -> dict[str, str]:
    """The whole environment of ``extra_commands``: nothing of the user's leaks in."""
    return {"PATH": _STANDARD_PATH, "HOME": os.path.join(job.job_dir, "home"),
            "TMPDIR": os.path.join(job.job_dir, "tmp"), "out": upper, "SOURCE_DATE_EPOCH": "1", "TZ": "UTC",
            "LANG": "C.UTF-8"}


def _run_extra_commands(job: RootLayerJob, upper: str, sandbox_commands: str) -> int:
    """Run extra_commands in ``upper``, confined unless ``sandbox_commands`` (the job's
    ``[sandbox] commands``) is ``none``."""
    env = extra_commands_env(job, upper)
    os.makedirs(env["HOME"], mode=0o700, exist_ok=True)
    os.makedirs(env["TMPDIR"], mode=0o700, exist_ok=True)
    argv = ["/bin/sh", "-c", "set -e\n" + job.extra_commands]
    if sandbox_commands != "none":
        # Only the layer's directory (and the job's own HOME and TMPDIR) is writable.
        argv = sandbox.confine_argv(argv, writable=[upper, env["HOME"], env["TMPDIR"]], network=False)

    def umask() -> None:
        os.umask(COMMAND_UMASK)

    done = subprocess.run(argv, cwd=upper, env=env, stdin=subprocess.DEVNULL, check=False, preexec_fn=umask)
    return done.returncode if done.returncode >= 0 else 128 - done.returncode


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m dtbuild.plugins.builtin.namespace_executor JOB.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(_in_namespace(sys.argv[1]))
