"""The ``vm`` executor: root layers built in a QEMU virtual machine, as dockerTools'
``runInLinuxVM`` does. It is the executor for untrusted scripts, so the guest is treated as
hostile: nothing it does may reach the host's files or the host's privileges.

The guest is the host's Linux kernel (or ``[vm] kernel`` in dtbuild.toml) booted with a
small initramfs this module writes: static busybox, the kernel modules for virtio, 9p,
ext4 and overlayfs (copied, decompressed, from ``/lib/modules/<version>``, loaded in
dependency order) and an ``/init`` script (``vm_init.sh``). Five host directories
are shared with virtio-9p: the base's root file system, copy_to_root, the job's inputs
(the scripts) and run_as_root's toolbox, all four read-only (``readonly=on``: QEMU
refuses every write), and an output directory, the only writable share. The guest:

1. formats its disk (``disk_size`` MiB, a sparse file on the host) and puts the
   overlay's upper and work directories on it,
2. copies copy_to_root into the upper directory, mounts the overlay (lower: the 9p
   share) and runs ``run_as_root`` chrooted in it, with /dev, /proc, /sys and the toolbox
   (bind-mounted read-only at /.dtbuild-toolbox; its sh runs the script when the image
   has no /bin/sh; the mount point is removed again before packing),
3. unmounts, runs ``extra_commands`` in the upper directory (with busybox),
4. finds the opaque directories (a second, read-only overlay with the upper directory
   over a *probe* tree holding a marker in every directory: a marker hidden means the
   directory is opaque, since busybox cannot read xattrs) and writes the upper directory
   as a tar (owners, modes, whiteout devices and hard links as they are) and the list of
   opaque directories into the output share, then powers off.

The host then packs that tar with the same conversion as the namespace executor, so
both give the same bytes. Owners never cross 9p on the way out (they travel in the tar
headers); on the way in, the base's owners are set on the host (as root, or in a user
namespace whose mapping QEMU then runs in) and the read-only shares show them to the
guest as they are.

Confinement (the guest is root in the VM and can escape the script's chroot):

* The output share uses 9p's ``security_model=mapped-xattr`` (``mapped-file`` where the
  host file system has no user xattrs): whatever the guest creates there is, on the
  host, a plain file (mode 0600) or directory (0700) owned by QEMU's user; the owner,
  mode, setuid bits, device numbers or symlink target the guest asked for are kept in
  QEMU's metadata (xattrs or ``.virtfs_metadata``), never on the host inode.
* The host reads what the guest left (status, message, log, opaque list, layer tar) only
  after QEMU has exited, through :class:`GuestOutputs`: opened with ``O_NOFOLLOW`` below a
  directory descriptor, checked with ``fstat`` to be a regular file, checked against
  QEMU's metadata to be one the guest made as a regular file, and read with a size cap.
  Anything else is a :class:`GuestMisbehaved` error, never followed or read.
* The job's scratch directories are 0700, and QEMU runs with its seccomp filter
  (``-sandbox on``, denying privilege changes, spawning and resource control) where the
  QEMU build has one.

KVM is used when a short probe shows that it boots this kernel (a /dev/kvm can exist
and still hang a stock kernel, as nested virtualization does); the answer is kept in
``<cache>/vm/kvm-probe.json``. Otherwise the VM runs under TCG emulation, with a warning.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import IO, Any

from dtbuild.plugins.builtin.executors import run_supervised
from dtbuild.plugins.builtin.layertar import LayerDigests
from dtbuild.plugins.builtin.namespace_executor import helper_env, remove_as_owner
from dtbuild.plugins.builtin.root_layer import (
    SCRIPT_ENV,
    RootLayerJob,
    RootLayerRequest,
    UpperDirError,
    pack_upper_tar,
    prepare,
    write_status,
)
from dtbuild.plugins.builtin.toolbox import BUSYBOX_CANDIDATES, find_static_busybox, is_static_elf
from dtbuild.plugins.interfaces import CancelToken, CommandRequest, CommandResult, Executor, ExecutorContext

#: Modules the guest needs, in the order to try; their dependencies (modules.dep) are
#: loaded first. Debian's 6.1 kernel resolves them to virtio_ring, virtio,
#: virtio_pci_modern_dev, virtio_pci_legacy_dev, virtio_pci, 9pnet, 9pnet_virtio, netfs,
#: fscache, 9p, virtio_blk, crc32c_generic, jbd2, mbcache, crc16, ext4 and overlay.
GUEST_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "virtio_blk", "crc32c_generic", "ext4", "overlay")
NETWORK_MODULES = ("virtio_net",)
#: Seconds a KVM boot of the probe initramfs may take before KVM counts as unusable.
KVM_PROBE_TIMEOUT = 10.0
KVM_PROBE_MARKER = "DTBUILD-KVM-PROBE-OK"
_KERNEL_CMDLINE = "console=ttyS0 quiet loglevel=3 panic=-1"

#: The guest's /init, shipped as package data (busybox sh). ``@SCRIPT_ENV@`` in it is
#: replaced by the script's environment.
GUEST_INIT_RESOURCE = "vm_init.sh"


@functools.cache
def guest_init() -> str:
    """The text of the guest's /init (:data:`GUEST_INIT_RESOURCE`)."""
    return resources.files("dtbuild.plugins.builtin").joinpath(GUEST_INIT_RESOURCE).read_text(encoding="utf-8")

_PROBE_INIT = f"#!/bin/busybox sh\n/bin/busybox echo {KVM_PROBE_MARKER}\n/bin/busybox poweroff -f\n"


# --------------------------------------------------------------------------- configuration


def kernel_version(path: str) -> str | None:
    """The release of a bzImage kernel (``6.1.0-56-amd64``), read from its setup header."""
    try:
        with open(path, "rb") as f:
            header = f.read(0x210)
            if len(header) < 0x210 or header[0x202:0x206] != b"HdrS":
                return None
            (offset,) = struct.unpack_from("<H", header, 0x20E)
            f.seek(offset + 0x200)
            text = f.read(256)
    except OSError:
        return None
    version = text.split(b"\0", 1)[0].split(b" ", 1)[0].decode("ascii", "replace")
    return version or None


def _version_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass(frozen=True, slots=True)
class VmSetup:
    qemu: str
    kernel: str
    kernel_version: str
    modules_dir: str | None
    busybox: str
    accel: str  # auto | kvm | tcg
    kvm_probe_timeout: float
    #: Where the KVM probe's answer is kept ("" for nowhere).
    cache_dir: str


def vm_setup(context: ExecutorContext | None) -> tuple[VmSetup | None, str | None]:
    """(the VM's pieces, None) or (None, what is missing and how to get it), from the
    ``[vm]`` settings of the executor's context (paths relative to the workspace root)."""
    if context is None:
        return _vm_setup("", "", ())
    vm = context.settings.section("vm")
    return _vm_setup(context.workspace_root, context.cache_dir,
                     tuple(sorted((str(k), str(v)) for k, v in vm.items())))


@functools.cache
def _vm_setup(root: str, cache_dir: str, settings: tuple[tuple[str, str], ...]) -> tuple[VmSetup | None, str | None]:
    # Cached by the settings (as text, hashable): probed once per process and workspace.
    vm = dict(settings)

    def configured(key: str) -> str | None:
        value = vm.get(key)
        if value is None:
            return None
        value = os.path.expanduser(value)
        return os.path.normpath(os.path.join(root or os.getcwd(), value))

    qemu = configured("qemu") or shutil.which("qemu-system-x86_64")
    if not qemu or not os.access(qemu, os.X_OK):
        return None, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    kernel = configured("kernel")
    if kernel is None:
        candidates = sorted((n for n in _listdir("/boot") if n.startswith("vmlinuz-")), key=_version_key,
                            reverse=True)
        if not candidates:
            return None, ("no guest kernel: set [vm] kernel = \"/path/to/vmlinuz\" in dtbuild.toml, or install "
                          "one (apt-get install linux-image-amd64)")
        kernel = os.path.join("/boot", candidates[0])
    if not os.access(kernel, os.R_OK):
        return None, (f"the guest kernel {kernel} is missing or not readable by this user; set [vm] kernel in "
                      "dtbuild.toml to a readable copy")
    version = kernel_version(kernel) or os.path.basename(kernel).removeprefix("vmlinuz-")
    modules_dir = configured("modules") or os.path.join("/lib/modules", version)
    if not os.path.isdir(modules_dir):
        modules_dir = None  # a kernel with everything built in needs none
    busybox = configured("busybox")
    if busybox is None:
        busybox = find_static_busybox(BUSYBOX_CANDIDATES)
        if busybox is None:
            return None, "no static busybox for the VM's initramfs (apt-get install busybox-static)"
    elif not is_static_elf(busybox):
        return None, f"[vm] busybox = {busybox!r} is not a statically linked executable"
    # DTBUILD_VM_ACCEL is applied to the settings by the engine.
    accel = vm.get("accel", "auto")
    if accel not in ("auto", "kvm", "tcg"):
        return None, f"[vm] accel (or DTBUILD_VM_ACCEL) must be one of auto, kvm, tcg, but was {accel!r}"
    try:
        timeout = float(vm.get("kvm_probe_timeout", KVM_PROBE_TIMEOUT))
    except ValueError:
        return None, f"[vm] kvm_probe_timeout must be a number of seconds, but was {vm['kvm_probe_timeout']!r}"
    return VmSetup(qemu, kernel, version, modules_dir, busybox, accel, timeout,
                   os.path.join(cache_dir, "vm") if cache_dir else ""), None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


# --------------------------------------------------------------------------- initramfs


class CpioWriter:
    """A ``newc`` cpio archive (what the kernel unpacks as an initramfs), deterministic:
    inode numbers in order, mtime 0, owners 0."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.ino = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.out.write(header + encoded + bytes(-(len(header) + len(encoded)) % 4))
        self.out.write(data + bytes(-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def module_order(modules_dir: str | None, wanted: Iterable[str]) -> list[tuple[str, str]]:
    """(name, path) of the modules to load, dependencies first, from modules.dep;
    modules built into the kernel (or absent) are left out."""
    if modules_dir is None:
        return []
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    try:
        with open(os.path.join(modules_dir, "modules.dep")) as f:
            for line in f:
                if ":" not in line:
                    continue
                module, rest = line.split(":", 1)
                name = _module_name(module)
                paths[name] = os.path.join(modules_dir, module)
                deps[name] = [_module_name(d) for d in rest.split()]
    except OSError:
        return []
    order: list[tuple[str, str]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in paths:
            return
        seen.add(name)
        for dep in reversed(deps[name]):
            visit(dep)
        order.append((name, paths[name]))

    for name in wanted:
        visit(name.replace("-", "_"))
    return order


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    return base.split(".ko", 1)[0].replace("-", "_")


def _module_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def write_initramfs(path: str, setup: VmSetup, init: str, modules: Iterable[str]) -> None:
    with open(path, "wb") as out, open(setup.busybox, "rb") as bb:
        cpio = CpioWriter(out)
        for d in ("bin", "dev", "proc", "sys", "tmp", "job", "out", "lower", "seed", "toolbox", "disk", "modules"):
            cpio.directory(d)
        cpio.char_device("dev/console", 5, 1)
        cpio.file("bin/busybox", bb.read(), 0o755)
        cpio.file("init", init.encode(), 0o755)
        order = module_order(setup.modules_dir, modules)
        for name, module_path in order:
            cpio.file(f"modules/{name}.ko", _module_bytes(module_path))
        cpio.file("modules/order", "".join(name + "\n" for name, _ in order).encode())
        cpio.close()


# --------------------------------------------------------------------------- QEMU


#: QEMU's seccomp filter: besides the default (no obsolete or dangerous system calls),
#: QEMU may not change its uid or gid, start programs or change scheduling and limits.
SANDBOX_OPTION = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def _virtfs(path: str, tag: str, *, readonly: bool, security_model: str = "none") -> list[str]:
    """A ``-virtfs`` share. Read-only shares use ``security_model=none``: the guest sees the
    host's owners and modes as they are and QEMU refuses every write (``readonly=on``).
    The writable share needs a mapped model (:func:`output_security_model`): with ``none``
    or ``passthrough``, QEMU as root creates whatever the guest asks for (setuid files,
    devices, other owners) as real host files."""
    escaped = path.replace(",", ",,")
    options = f"local,path={escaped},mount_tag={tag},security_model={security_model}"
    if readonly:
        options += ",readonly=on"
    elif security_model in ("mapped-xattr", "mapped-file"):
        options += ",fmode=0600,dmode=0700"
    return ["-virtfs", options]


def output_security_model(directory: str) -> str:
    """``mapped-xattr`` when the file system of ``directory`` stores ``user.*`` xattrs for
    this process (ext4, xfs, btrfs; not tmpfs before Linux 6.6), else ``mapped-file``,
    which keeps QEMU's metadata in ``.virtfs_metadata`` files next to the shared files."""
    probe = os.path.join(directory, ".dtbuild-xattr-probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return "mapped-file"
    try:
        os.setxattr(fd, "user.dtbuild.probe", b"1")
        return "mapped-xattr"
    except OSError:
        return "mapped-file"
    finally:
        os.close(fd)
        os.unlink(probe)


@functools.cache
def sandbox_argv(qemu: str) -> tuple[str, ...]:
    """``-sandbox ...`` when this QEMU has seccomp support (it then parses the option and
    prints its version), else () (a build without it rejects ``-sandbox`` at once)."""
    try:
        done = subprocess.run([qemu, "-sandbox", SANDBOX_OPTION, "-version"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return ("-sandbox", SANDBOX_OPTION) if done.returncode == 0 else ()


def qemu_argv(setup: VmSetup, *, accel: str, memory: int, initramfs: str, extra: list[str]) -> list[str]:
    return [setup.qemu, *sandbox_argv(setup.qemu), "-accel", accel, "-m", f"{memory}M", "-nodefaults",
            "-no-user-config", "-no-reboot", "-display", "none", "-kernel", setup.kernel, "-initrd", initramfs,
            "-append", _KERNEL_CMDLINE, *extra]


_kvm_lock = threading.Lock()
_kvm_memo: dict[str, tuple[bool, str]] = {}


def kvm_usable(setup: VmSetup, scratch: str, cancel: CancelToken) -> tuple[bool, str]:
    """Whether KVM boots the guest kernel here, and why not. Tried once per machine
    (kept in the cache directory): a boot of a 2 MiB initramfs under KVM that must print
    a marker within ``kvm_probe_timeout`` seconds."""
    if setup.accel == "tcg":
        return False, "[vm] accel = \"tcg\""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        reason = "/dev/kvm is missing or not accessible to this user"
        return (False, reason)
    st = os.stat(setup.kernel)
    qst = os.stat(setup.qemu)
    key = hashlib.sha256(json.dumps([setup.kernel, st.st_size, st.st_mtime_ns, setup.qemu, qst.st_size,
                                     qst.st_mtime_ns, os.uname().release, os.stat("/dev/kvm").st_rdev]).encode()
                         ).hexdigest()[:32]
    with _kvm_lock:
        if key in _kvm_memo:
            return _kvm_memo[key]
        # Without a cache directory (an executor made outside a build) nothing is kept.
        memo_path = os.path.join(setup.cache_dir or os.devnull, f"kvm-probe-{key}.json")
        try:
            with open(memo_path) as f:
                memo = json.load(f)
            result = bool(memo["usable"]), str(memo["detail"])
        except (OSError, ValueError, KeyError):
            result = _probe_kvm(setup, scratch, cancel)
            if cancel.is_set():
                return result
            try:
                if not setup.cache_dir:
                    raise OSError("no cache directory")
                os.makedirs(setup.cache_dir, exist_ok=True)
                with open(memo_path + f".{os.getpid()}", "w") as f:
                    json.dump({"usable": result[0], "detail": result[1]}, f)
                os.replace(memo_path + f".{os.getpid()}", memo_path)
            except OSError:
                pass
        _kvm_memo[key] = result
        return result


def _probe_kvm(setup: VmSetup, scratch: str, cancel: CancelToken) -> tuple[bool, str]:
    probe_dir = os.path.join(scratch, "kvm-probe")
    os.makedirs(probe_dir, mode=0o700, exist_ok=True)
    initramfs = os.path.join(probe_dir, "initramfs.cpio")
    write_initramfs(initramfs, setup, _PROBE_INIT, ())
    console = os.path.join(probe_dir, "console.log")
    argv = qemu_argv(setup, accel="kvm", memory=256, initramfs=initramfs,
                     extra=["-serial", f"file:{console}"])
    result = run_supervised(argv, cwd=probe_dir, env=helper_env(), cancel=cancel, timeout=setup.kvm_probe_timeout)
    try:
        with open(console, errors="replace") as f:
            booted = KVM_PROBE_MARKER in f.read()
    except OSError:
        booted = False
    if booted:
        return True, "KVM boots the guest kernel"
    if result.exit_code == -9:
        return False, f"a KVM boot did not finish within {setup.kvm_probe_timeout:g} s"
    detail = result.output.strip().splitlines()[-1:] or [f"exit status {result.exit_code}"]
    return False, f"a KVM boot failed ({detail[0]})"


# --------------------------------------------------------------------------- what the guest left

#: The most of a status or message file the host reads (the guest's init writes one line).
SMALL_OUTPUT_LIMIT = 64 * 1024
#: The most of the opaque-directory list the host reads into memory.
OPAQUE_LIST_LIMIT = 64 << 20
#: How much of the end of a log the host reads for the error output's last lines.
LOG_TAIL_BYTES = 64 * 1024
#: The stages the guest's init writes into its status file.
GUEST_STAGES = frozenset({"mount", "prepare", "run_as_root", "extra_commands", "pack", "done"})

_WHAT = {"log": "log", "status": "status file", "message": "message file",
         "opaque": "list of opaque directories", "upper.tar": "layer tar"}


class GuestMisbehaved(ValueError):
    """The guest left something the host does not read where its init writes a file: a
    symbolic link, fifo, device, socket or directory, or a file larger than its cap."""


def _kind(mode: int) -> str:
    return {stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket",
            stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
            stat.S_IFDIR: "a directory"}.get(stat.S_IFMT(mode), f"a file of type {stat.S_IFMT(mode):#o}")


class GuestOutputs:
    """The files a guest left in its output share, read once QEMU has exited (so nothing
    changes them any more). A file is opened with ``O_NOFOLLOW | O_NONBLOCK`` below a
    descriptor of the share, must be a regular file both on the host (``fstat``) and in
    QEMU's metadata (what the guest created it as: with a mapped security model, a
    guest's symlink or fifo is a plain host file whose metadata says so), and is read
    through its descriptor with a size cap."""

    def __init__(self, share: str, security_model: str) -> None:
        self.share = share
        self.security_model = security_model
        self._dir = os.open(share, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def __enter__(self) -> GuestOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._dir)

    def _misbehaved(self, name: str, problem: str) -> GuestMisbehaved:
        return GuestMisbehaved(
            f"the VM's {_WHAT.get(name, name)} ({os.path.join(self.share, name)}) is {problem}, where the VM's "
            "init writes a regular file: the guest misbehaved (run_as_root or extra_commands tampered with the "
            "VM's output share), so dtbuild did not read it")

    def open(self, name: str, limit: int | None = None) -> int | None:
        """A read-only descriptor of the regular file ``name``; None when it is missing."""
        try:
            before = os.stat(name, dir_fd=self._dir, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(before.st_mode):
            raise self._misbehaved(name, _kind(before.st_mode))
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                         dir_fd=self._dir)
        except OSError as e:
            raise self._misbehaved(name, f"not openable as a regular file ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
                raise self._misbehaved(name, _kind(st.st_mode) if not stat.S_ISREG(st.st_mode)
                                         else "replaced while dtbuild opened it")
            guest_mode = self._guest_mode(fd, name)
            if guest_mode is not None and not stat.S_ISREG(guest_mode):
                raise self._misbehaved(name, f"{_kind(guest_mode)} (as the guest made it)")
            if limit is not None and st.st_size > limit:
                raise self._misbehaved(name, f"{st.st_size} bytes, more than the {limit} dtbuild reads")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _guest_mode(self, fd: int, name: str) -> int | None:
        """The file type and mode the guest gave ``name``, from QEMU's mapped metadata;
        None when there is none (a file the host wrote)."""
        if self.security_model == "mapped-xattr":
            try:
                value = os.getxattr(fd, "user.virtfs.mode")
            except OSError:
                return None
            return struct.unpack_from("<I", value)[0] if len(value) >= 4 else None
        if self.security_model != "mapped-file":
            return None
        try:
            meta_dir = os.open(".virtfs_metadata", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=self._dir)
        except OSError:
            return None
        try:
            meta = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=meta_dir)
        except OSError:
            return None
        finally:
            os.close(meta_dir)
        try:
            if not stat.S_ISREG(os.fstat(meta).st_mode):
                raise self._misbehaved(name, "described by metadata that is not a regular file")
            text = os.read(meta, 4096).decode("ascii", "replace")
        finally:
            os.close(meta)
        match = re.search(r"^virtfs\.mode=(\d+)$", text, re.MULTILINE)
        return int(match.group(1)) if match else None

    def read(self, name: str, limit: int = SMALL_OUTPUT_LIMIT) -> bytes | None:
        """The content of ``name`` (at most ``limit`` bytes, else an error); None when missing."""
        fd = self.open(name, limit)
        if fd is None:
            return None
        try:
            return _read_fd(fd, limit)
        finally:
            os.close(fd)

    def tail(self, name: str, size: int = LOG_TAIL_BYTES) -> str:
        """The last lines of the log ``name`` (from its last ``size`` bytes); "" when missing."""
        fd = self.open(name)
        if fd is None:
            return ""
        try:
            end = os.fstat(fd).st_size
            data = os.pread(fd, size, max(0, end - size))
        finally:
            os.close(fd)
        return _log_text(data)

    def status(self) -> tuple[str, int, str] | None:
        """(stage, exit code, message) from the status and message files; None when the
        guest wrote no status (it stopped early)."""
        data = self.read("status")
        if data is None:
            return None
        fields = data.decode("ascii", "replace").split()
        if len(fields) != 2 or fields[0] not in GUEST_STAGES or not fields[1].isdigit():
            raise self._misbehaved("status", f"not '<stage> <exit status>' ({data[:80]!r})")
        message = (self.read("message") or b"").decode("utf-8", "replace").strip()
        return fields[0], int(fields[1]), message


def _read_fd(fd: int, limit: int) -> bytes:
    chunks = []
    total = 0
    while total <= limit:
        chunk = os.read(fd, min(1 << 20, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > limit:
        raise GuestMisbehaved(f"a file the VM left grew past {limit} bytes while dtbuild read it")
    return b"".join(chunks)


def _log_text(data: bytes, lines: int = 40) -> str:
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc", "", data.decode("utf-8", "replace"))
    return "\n".join(text.splitlines()[-lines:])


def _host_tail(path: str, size: int = LOG_TAIL_BYTES) -> str:
    """The last lines of a file QEMU wrote on the host (the console log), opened without
    following a link; "" when it is missing or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return ""
        return _log_text(os.pread(fd, size, max(0, st.st_size - size)))
    finally:
        os.close(fd)


def pack_guest_result(job: RootLayerJob, share: str, security_model: str) -> LayerDigests:
    """The layer from the upper directory's tar and opaque list the guest left in its
    output share, both opened as :class:`GuestOutputs` and packed through their
    descriptors (``/proc/self/fd``), so no path the guest could have replaced is used."""
    with GuestOutputs(share, security_model) as outputs:
        upper_fd = outputs.open("upper.tar")
        opaque_fd = outputs.open("opaque", OPAQUE_LIST_LIMIT) if upper_fd is not None else None
        try:
            if upper_fd is None or opaque_fd is None:
                raise GuestMisbehaved("the VM reported success but left no layer tar or no list of opaque "
                                      f"directories in {share}: the guest misbehaved")
            return pack_upper_tar(f"/proc/self/fd/{upper_fd}", f"/proc/self/fd/{opaque_fd}", job.lower,
                                  job.layer_tar, job.layer_meta)
        finally:
            for fd in (upper_fd, opaque_fd):
                if fd is not None:
                    os.close(fd)


# --------------------------------------------------------------------------- the executor


class VmExecutor(Executor):
    NAME = "vm"

    def unavailable_reason(self) -> str | None:
        return vm_setup(self.context)[1]

    def run(self, request: CommandRequest, cancel: CancelToken) -> CommandResult:
        if not isinstance(request, RootLayerRequest):
            return CommandResult(1, "the vm executor runs root layers (root_layer, image run_as_root) only")
        setup, reason = vm_setup(self.context)
        if setup is None:
            return CommandResult(1, f"the vm executor cannot run here: {reason}")
        job = request.job
        userns = os.geteuid() != 0
        os.chmod(job.job_dir, 0o700)
        try:
            return self._run(setup, job, userns, request, cancel)
        finally:
            remove_as_owner([job.lower, job.seed], userns)

    def _run(self, setup: VmSetup, job: RootLayerJob, userns: bool, request: RootLayerRequest,
             cancel: CancelToken) -> CommandResult:
        prefix: list[str] = []
        job_json = os.path.join(job.job_dir, "job.json")
        if userns:
            prefix = ["unshare", "--map-root-user", "--map-auto"]
            job.save(job_json)
            done = run_supervised([*prefix, sys.executable, "-m", "dtbuild.plugins.builtin.root_layer", "prepare",
                                   job_json], cwd=job.job_dir, env=helper_env(), cancel=cancel)
            if done.exit_code != 0:
                return done
        else:
            try:
                prepare(job, log=request.log)
            except (OSError, ValueError) as e:
                write_status(job.job_dir, "prepare", 1, f"preparing the base's owners failed: {e}")
                return CommandResult(1, str(e))
        usable, why = kvm_usable(setup, job.job_dir, cancel)
        if cancel.is_set():
            return CommandResult(-9, "interrupted")
        if usable:
            accel = "kvm"
        elif setup.accel == "kvm":
            write_status(job.job_dir, "mount", 1, f"[vm] accel = \"kvm\", but KVM is not usable: {why}")
            return CommandResult(1, why)
        else:
            accel = "tcg"
            if setup.accel != "tcg":
                request.log(f"KVM is not usable ({why}): the VM runs under TCG emulation, which is much slower")
        inputs = os.path.join(job.job_dir, "vm-in")  # read-only for the guest
        outputs = os.path.join(job.job_dir, "vm")  # the guest's only writable share
        os.mkdir(inputs, 0o700)
        os.mkdir(outputs, 0o700)
        with open(os.path.join(inputs, "run_as_root.sh"), "w") as f:
            f.write(job.script)
        with open(os.path.join(inputs, "extra_commands.sh"), "w") as f:
            f.write(job.extra_commands if job.extra_commands.strip() else "")
        if job.network:
            with open(os.path.join(inputs, "network"), "w"):
                pass
        model = output_security_model(outputs)
        init = guest_init().replace("@SCRIPT_ENV@", " ".join(shlex.quote(f"{k}={v}") for k, v in SCRIPT_ENV.items()))
        initramfs = os.path.join(job.job_dir, "initramfs.cpio")
        write_initramfs(initramfs, setup, init, GUEST_MODULES + (NETWORK_MODULES if job.network else ()))
        disk = os.path.join(job.job_dir, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(job.disk_size << 20)
        console = os.path.join(job.job_dir, "console.log")
        devices = [*_virtfs(outputs, "out", readonly=False, security_model=model),
                   *_virtfs(inputs, "job", readonly=True), *_virtfs(job.lower, "lower", readonly=True),
                   *_virtfs(job.seed, "seed", readonly=True),
                   *(_virtfs(job.toolbox, "toolbox", readonly=True) if job.toolbox else []),
                   "-drive", f"file={disk.replace(',', ',,')},format=raw,if=virtio,cache=unsafe",
                   "-serial", f"file:{console}"]
        if job.network:
            devices += ["-nic", "user,model=virtio-net-pci"]
        argv = [*prefix, *qemu_argv(setup, accel=accel, memory=job.memory_size, initramfs=initramfs,
                                    extra=devices)]
        result = run_supervised(argv, cwd=job.job_dir, env=helper_env(), cancel=cancel)
        try:
            os.unlink(disk)
        except OSError:
            pass
        # QEMU has exited: from here on nothing changes the output share while it is read.
        try:
            with GuestOutputs(outputs, model) as left:
                status = left.status()
                log_tail = left.tail("log")
        except (GuestMisbehaved, OSError) as e:
            write_status(job.job_dir, "pack", 1, str(e))
            return CommandResult(1, _host_tail(console))
        if status is None:
            message = (f"the VM stopped before the layer was built (qemu exit status {result.exit_code})"
                       if not cancel.is_set() else "interrupted")
            write_status(job.job_dir, "mount", 1, message)
            return CommandResult(result.exit_code or 1,
                                 "\n".join(t for t in (result.output, _host_tail(console), log_tail) if t))
        stage, code, message = status
        if stage != "done":
            write_status(job.job_dir, stage, code, message)
            return CommandResult(code or 1, log_tail if stage in ("run_as_root", "extra_commands")
                                 else "\n".join(t for t in (log_tail, _host_tail(console)) if t))
        if userns:  # the lower directory's owners are subordinate ids outside the namespace
            done = run_supervised([*prefix, sys.executable, "-m", "dtbuild.plugins.builtin.vm_executor",
                                   "pack", job_json, outputs, model],
                                  cwd=job.job_dir, env=helper_env(), cancel=cancel)
            if done.exit_code != 0:
                return CommandResult(done.exit_code, "\n".join(t for t in (log_tail, done.output) if t))
        else:
            try:
                pack_guest_result(job, outputs, model)
            except (UpperDirError, OSError, ValueError) as e:
                write_status(job.job_dir, "pack", 1, f"packing the layer failed: {e}")
                return CommandResult(1, "\n".join(t for t in (log_tail, str(e)) if t))
        write_status(job.job_dir, "done", 0)
        return CommandResult(0, log_tail)


# --------------------------------------------------------------------------- as a program


def main(argv: list[str]) -> int:
    """``pack JOB.json SHARE SECURITY_MODEL``: :func:`pack_guest_result`, run inside the
    user namespace the VM ran in (for an ordinary user)."""
    if len(argv) != 4 or argv[0] != "pack":
        print("usage: python -m dtbuild.plugins.builtin.vm_executor pack JOB.json SHARE SECURITY_MODEL",
              file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        job = RootLayerJob.from_json(json.load(f))
    try:
        pack_guest_result(job, argv[2], argv[3])
    except (UpperDirError, OSError, ValueError) as e:
        write_status(job.job_dir, "pack", 1, f"packing the layer failed: {e}")
        print(f"dtbuild: packing the layer failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
