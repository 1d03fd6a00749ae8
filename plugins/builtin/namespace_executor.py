"""The ``namespace`` executor: root layers built in Linux namespaces, with no VM.

For a :class:`~dtbuild.plugins.builtin.root_layer.RootLayerRequest` it runs this module
as a program (``python -m dtbuild.plugins.builtin.namespace_executor JOB.json``) as
process 1 of new mount, PID, IPC, UTS and (unless the action may use the network)
network namespaces — what dockerTools does with ``unshare -imnpuf`` — and, when dtbuild
is not root, in a user namespace whose root is the invoking user and whose other ids are
the user's subordinate ids (``unshare --map-root-user --map-auto``), so that the script
can ``chown`` to any id. There it:

1. gives the base's unpacked tree its owners (the sidecar of RootfsUnpack),
2. mounts the overlay: kernel overlayfs (``userxattr`` in a user namespace, ``volatile``
   where the kernel has it) or fuse-overlayfs where the kernel's cannot be mounted,
3. mounts a small /dev (a tmpfs with null, zero, full, random, urandom and tty bound
   from the host), /proc and /sys, and runs ``run_as_root`` with the image's /bin/sh as
   root, chrooted in the overlay,
4. unmounts, runs ``extra_commands`` in the upper directory, packs the upper directory
   into the layer tar (owners read inside the namespace, as the image will hold them)
   and removes every directory it used.

The mounts live only in the private mount namespace: when its last process exits —
also when the build is interrupted and the process group is killed — the kernel
unmounts them. Directories the namespace left behind are removed from a new namespace.

Other commands run as the ``local`` executor runs them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dtbuild.plugins.builtin.executors import LocalExecutor, run_supervised
from dtbuild.plugins.builtin.root_layer import (
    SCRIPT_ENV,
    RootLayerJob,
    RootLayerRequest,
    UpperDirError,
    cache_root,
    pack_upper_directory,
    prepare,
    remove_tree_as_owner,
    workspace_config,
    write_status,
)
from dtbuild.plugins.interfaces import CancelToken, CommandRequest, CommandResult, Executor

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
    """The environment of dtbuild's own helper processes (python -m ...)."""
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


def _probe_parent() -> str | None:
    """Where to try the overlay: the cache's tmp directory, where real ones are mounted
    (file systems differ in what overlayfs accepts as its upper directory)."""
    root, config = workspace_config()
    tmp = os.path.join(cache_root(root, config), "tmp")
    return tmp if os.path.isdir(tmp) and os.access(tmp, os.W_OK) else None


def _try_overlay(prefix: list[str], mount: str) -> tuple[bool, str]:
    # Named like the store's temporaries (pid first), so a killed probe is cleaned up.
    with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-overlay-probe-", dir=_probe_parent(),
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
def probe() -> tuple[NamespaceSetup | None, str | None]:
    """(how root layers run here, None) or (None, what is missing and how to get it).
    Tried once per process: a mount of a tiny overlay that deletes a file and chowns."""
    if not sys.platform.startswith("linux"):
        return None, "it needs Linux (namespaces and overlayfs); use executor = \"vm\""
    if shutil.which("unshare") is None:
        return None, "'unshare' is not installed (install util-linux)"
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
            ok, detail = _try_overlay(prefix, _kernel_mount(options))
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
            ok, detail = _try_overlay(prefix, _FUSE_MOUNT)
            if ok:
                return NamespaceSetup(userns, "fuse"), None
            tried.append(f"fuse-overlayfs failed ({detail or 'no message'})")
    if forced not in ("", "kernel", "fuse"):
        tried.append(f"{OVERLAY_ENV}={forced!r} is not one of kernel, fuse")
    return None, "no overlay can be mounted here: " + "; ".join(tried) + "; or use executor = \"vm\""


# --------------------------------------------------------------------------- the executor


class NamespaceExecutor(Executor):
    NAME = "namespace"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return probe()[1]

    def run(self, request: CommandRequest, cancel: CancelToken) -> CommandResult:
        if not isinstance(request, RootLayerRequest):
            return LocalExecutor().run(request, cancel)
        setup, reason = probe()
        if setup is None:
            return CommandResult(1, f"the namespace executor cannot run here: {reason}")
        job = request.job
        work = os.path.join(job.job_dir, "overlay-work")
        merged = os.path.join(job.job_dir, "merged")
        os.mkdir(work)
        os.mkdir(merged)
        job_json = os.path.join(job.job_dir, "job.json")
        job.save(job_json, overlay=setup.overlay, kernel_options=setup.kernel_options, work=work, merged=merged)
        if setup.overlay == "fuse":
            request.log("kernel overlayfs cannot be mounted here: using fuse-overlayfs")
        namespaces = ["--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts"]
        if not request.network:
            namespaces.append("--net")
        argv = [*setup.unshare_prefix, *namespaces, "--", sys.executable, "-m",
                "dtbuild.plugins.builtin.namespace_executor", job_json]
        try:
            return run_supervised(argv, cwd=job.job_dir, env=helper_env(), cancel=cancel)
        finally:
            remove_as_owner([job.lower, job.seed, work, merged], setup.userns)


# --------------------------------------------------------------------------- inside the namespaces


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {(done.stderr or done.stdout).strip()}")


def _umount(path: str) -> None:
    subprocess.run(["umount", "--recursive", path], capture_output=True, stdin=subprocess.DEVNULL, check=False)


def _mount_dev(dev: str) -> None:
    _mount("-t", "tmpfs", "-o", "mode=755,size=4m,nosuid", "dtbuild-dev", dev)
    for name in _DEVICES:
        target = os.path.join(dev, name)
        if os.path.exists("/dev/" + name):
            with open(target, "w"):
                pass
            try:
                _mount("--bind", "/dev/" + name, target)
            except OSError:
                os.unlink(target)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "pts"))
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    os.chmod(os.path.join(dev, "shm"), 0o1777)


def _mount_system_dirs(merged: str, warn: Callable[[str], None]) -> list[str]:
    """Mount /dev, /proc and /sys in the overlay; return the mount points it had to
    create (removed again before packing, so they do not enter the layer)."""
    created = []
    for name in ("dev", "proc", "sys"):
        path = os.path.join(merged, name)
        if not os.path.lexists(path):
            os.mkdir(path, 0o755)
            created.append(name)
        elif os.path.islink(path) or not os.path.isdir(path):
            warn(f"/{name} in the image is not a directory: nothing is mounted there")
            continue
        try:
            if name == "dev":
                _mount_dev(path)
            elif name == "proc":
                _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", path)
            else:
                try:
                    _mount("-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", path)
                except OSError:
                    _mount("--rbind", "/sys", path)
                    _mount("-o", "remount,bind,ro", path)
        except OSError as e:
            warn(f"/{name} is not available to run_as_root: {e}")
    return created


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
        code = _run_script(job, merged, warn)
        if code != 0:
            return fail("run_as_root", code, "")
        if job.extra_commands.strip():
            code = _run_extra_commands(job, upper)
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


def _run_script(job: RootLayerJob, merged: str, warn: Callable[[str], None]) -> int:
    created = _mount_system_dirs(merged, warn)
    if not os.path.lexists(os.path.join(merged, "bin", "sh")):
        warn("the base image has no /bin/sh: run_as_root runs with the image's /bin/sh")
        code = 127
    else:
        def enter() -> None:
            os.chroot(merged)
            os.chdir("/")

        done = subprocess.run(["/bin/sh", "-c", "set -e\n" + job.script], env=SCRIPT_ENV, preexec_fn=enter,
                              stdin=subprocess.DEVNULL, check=False)
        code = done.returncode if done.returncode >= 0 else 128 - done.returncode
    _stop_leftovers()
    for name in ("dev", "proc", "sys"):
        _umount(os.path.join(merged, name))
    for name in created:
        try:
            os.rmdir(os.path.join(merged, name))
        except OSError as e:
            warn(f"cannot remove the mount point /{name}: {e}")
    _umount(merged)
    return code


def _stop_leftovers() -> None:
    """As process 1 of the PID namespace (whose /proc unshare mounted): kill whatever
    the script left running (daemons), so that nothing writes to the upper directory
    while it is packed. fuse-overlayfs itself stays until the overlay is unmounted."""
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


def _run_extra_commands(job: RootLayerJob, upper: str) -> int:
    home = os.path.join(job.job_dir, "home")
    tmp = os.path.join(job.job_dir, "tmp")
    os.makedirs(home, exist_ok=True)
    os.makedirs(tmp, exist_ok=True)
    env = {"PATH": _STANDARD_PATH, "HOME": home, "TMPDIR": tmp, "out": upper, "SOURCE_DATE_EPOCH": "1",
           "TZ": "UTC", "LANG": "C.UTF-8"}
    done = subprocess.run(["/bin/sh", "-c", "set -e\n" + job.extra_commands], cwd=upper, env=env,
                          stdin=subprocess.DEVNULL, check=False)
    return done.returncode if done.returncode >= 0 else 128 - done.returncode


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m dtbuild.plugins.builtin.namespace_executor JOB.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(_in_namespace(sys.argv[1]))
