"""The ``vm`` executor: root layers built in a QEMU virtual machine, as dockerTools'
``runInLinuxVM`` does.

The guest is the host's Linux kernel (or ``[vm] kernel`` in dtbuild.toml) booted with a
small initramfs this module writes: static busybox, the kernel modules for virtio, 9p,
ext4 and overlayfs (copied, decompressed, from ``/lib/modules/<version>``, loaded in
dependency order) and an ``/init`` script (:data:`GUEST_INIT`). Three host directories
are shared with virtio-9p: the base's root file system (read-only), copy_to_root
(read-only) and a job directory (scripts in, results out). The guest:

1. formats its disk (``disk_size`` MiB, a sparse file on the host) and puts the
   overlay's upper and work directories on it,
2. copies copy_to_root into the upper directory, mounts the overlay (lower: the 9p
   share) and runs ``run_as_root`` chrooted in it, with /dev, /proc and /sys,
3. unmounts, runs ``extra_commands`` in the upper directory (with busybox),
4. finds the opaque directories (a second, read-only overlay with the upper directory
   over a *probe* tree holding a marker in every directory: a marker hidden means the
   directory is opaque, since busybox cannot read xattrs) and writes the upper directory
   as a tar (owners, modes, whiteout devices and hard links as they are) and the list of
   opaque directories into the job share, then powers off.

The host then packs that tar with the same conversion as the namespace executor, so
both give the same bytes. Owners never cross 9p on the way out (they travel in the tar
headers); on the way in, the base's owners are set on the host (as root, or in a user
namespace whose mapping QEMU then runs in) and 9p's ``security_model=passthrough``
shows them to the guest as they are.

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
import struct
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

from dtbuild.plugins.builtin.executors import run_supervised
from dtbuild.plugins.builtin.namespace_executor import helper_env, remove_as_owner
from dtbuild.plugins.builtin.root_layer import (
    SCRIPT_ENV,
    RootLayerJob,
    RootLayerRequest,
    UpperDirError,
    cache_root,
    pack_vm_result,
    prepare,
    workspace_config,
    write_status,
)
from dtbuild.plugins.interfaces import CancelToken, CommandRequest, CommandResult, Executor

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

#: The guest's /init. ``@SCRIPT_ENV@`` is replaced by the script's environment.
GUEST_INIT = r"""#!/bin/busybox sh
# dtbuild's VM init (plugins/builtin/vm_executor.py): build one root layer, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
off() { sync; umount /job 2>/dev/null; poweroff -f; sleep 60; }
say() { echo "dtbuild-vm: $*"; }
while read -r module; do
  insmod "/modules/$module.ko" || say "cannot load the module $module"
done < /modules/order
P9="trans=virtio,version=9p2000.L,msize=262144"
mount -t 9p -o "$P9" job /job || { say "cannot mount the job directory (9p)"; off; }
status() { echo "$1 $2" > /job/status; }
fail() { say "$2"; echo "$2" > /job/message; status "$1" 1; off; }
mount -t 9p -o "$P9,ro" lower /lower || fail mount "cannot mount the base's root file system (9p)"
mount -t 9p -o "$P9,ro" seed /seed || fail mount "cannot mount copy_to_root (9p)"
mke2fs -q -F /dev/vda >/dev/null 2>&1 || fail mount "cannot format the VM's disk /dev/vda"
mount -t ext4 /dev/vda /disk || fail mount "cannot mount the VM's disk"
mkdir /disk/upper /disk/work /disk/merged /disk/probe /disk/check
cp -a /seed/. /disk/upper/ || fail prepare "cannot copy copy_to_root into the layer (is disk_size large enough?)"
OVERLAY="lowerdir=/lower,upperdir=/disk/upper,workdir=/disk/work,redirect_dir=nofollow,metacopy=off,index=off"
mount -t overlay overlay -o "$OVERLAY,xino=off,volatile" /disk/merged 2>/dev/null \
  || mount -t overlay overlay -o "$OVERLAY,xino=off" /disk/merged || fail mount "cannot mount the overlay"
M=/disk/merged
created=""
for d in dev proc sys; do
  if [ ! -e "$M/$d" ] && [ ! -L "$M/$d" ]; then mkdir "$M/$d"; created="$created $d"; fi
done
[ -d "$M/dev" ] && [ ! -L "$M/dev" ] && mount --bind /dev "$M/dev"
[ -d "$M/proc" ] && [ ! -L "$M/proc" ] && mount -t proc proc "$M/proc"
[ -d "$M/sys" ] && [ ! -L "$M/sys" ] && mount -t sysfs -o ro sysfs "$M/sys"
if [ -f /job/network ]; then
  ip link set lo up
  ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
    || say "cannot configure the network"
fi
: > /job/log
if [ -e "$M/bin/sh" ] || [ -L "$M/bin/sh" ]; then
  env -i @SCRIPT_ENV@ chroot "$M" /bin/sh -c "set -e
$(cat /job/run_as_root.sh)" < /dev/null >> /job/log 2>&1
  rc=$?
else
  echo "dtbuild: the base image has no /bin/sh: run_as_root runs with the image's /bin/sh" >> /job/log
  rc=127
fi
for p in /proc/[0-9]*; do
  pid=${p#/proc/}
  [ "$pid" = 1 ] && continue
  [ -n "$(cat "$p/cmdline" 2>/dev/null)" ] && kill -9 "$pid" 2>/dev/null
done
sleep 0.2
for d in dev proc sys; do umount "$M/$d" 2>/dev/null; done
for d in $created; do rmdir "$M/$d"; done
umount "$M" || fail run_as_root "cannot unmount the overlay"
[ "$rc" = 0 ] || { status run_as_root "$rc"; off; }
if [ -s /job/extra_commands.sh ]; then
  mkdir -p /tmp/home
  (cd /disk/upper && env -i PATH=/bin HOME=/tmp/home TMPDIR=/tmp out=/disk/upper SOURCE_DATE_EPOCH=1 TZ=UTC \
    LANG=C.UTF-8 /bin/sh -c "set -e
$(cat /job/extra_commands.sh)") < /dev/null >> /job/log 2>&1
  rc=$?
  [ "$rc" = 0 ] || { status extra_commands "$rc"; off; }
fi
cd /disk/upper
find . -mindepth 1 -type d -exec sh -c \
  'for d; do mkdir -p "/disk/probe/$d" && : > "/disk/probe/$d/.dtbuild-opaque-probe" || exit 1; done' sh {} + \
  || fail pack "cannot make the opaque-directory probe"
mount -t overlay overlay -o ro,lowerdir=/disk/upper:/disk/probe /disk/check || fail pack "cannot mount the probe"
find . -mindepth 1 -type d -exec sh -c \
  'for d; do [ -e "/disk/check/$d/.dtbuild-opaque-probe" ] || printf "%s\0" "$d"; done' sh {} + > /job/opaque \
  || fail pack "cannot list the opaque directories"
umount /disk/check
cd /
tar -cf /job/upper.tar -C /disk/upper . || fail pack "cannot write the layer's directory as a tar"
status done 0
off
"""

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
    cache_dir: str


@functools.cache
def vm_setup(cwd: str) -> tuple[VmSetup | None, str | None]:
    """(the VM's pieces, None) or (None, what is missing and how to get it)."""
    root, config = workspace_config(cwd)
    vm = config.get("vm") or {}

    def configured(key: str) -> str | None:
        value = vm.get(key)
        if value is None:
            return None
        value = os.path.expanduser(str(value))
        return os.path.normpath(os.path.join(root or cwd, value))

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
        busybox = next((p for p in ("/bin/busybox", "/usr/bin/busybox", "/usr/lib/busybox-static/busybox")
                        if is_static_elf(p)), None)
        if busybox is None:
            return None, "no static busybox for the VM's initramfs (apt-get install busybox-static)"
    elif not is_static_elf(busybox):
        return None, f"[vm] busybox = {busybox!r} is not a statically linked executable"
    accel = os.environ.get("DTBUILD_VM_ACCEL") or str(vm.get("accel", "auto"))
    if accel not in ("auto", "kvm", "tcg"):
        return None, f"[vm] accel must be one of auto, kvm, tcg, but was {accel!r}"
    timeout = float(vm.get("kvm_probe_timeout", KVM_PROBE_TIMEOUT))
    return VmSetup(qemu, kernel, version, modules_dir, busybox, accel, timeout,
                   os.path.join(cache_root(root, config), "vm")), None


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
        for d in ("bin", "dev", "proc", "sys", "tmp", "job", "lower", "seed", "disk", "modules"):
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


def _virtfs(path: str, tag: str, readonly: bool) -> list[str]:
    escaped = path.replace(",", ",,")
    return ["-virtfs", f"local,path={escaped},mount_tag={tag},security_model=passthrough"
            + (",readonly=on" if readonly else "")]


def qemu_argv(setup: VmSetup, *, accel: str, memory: int, initramfs: str, extra: list[str]) -> list[str]:
    return [setup.qemu, "-accel", accel, "-m", f"{memory}M", "-nodefaults", "-no-user-config", "-no-reboot",
            "-display", "none", "-kernel", setup.kernel, "-initrd", initramfs, "-append", _KERNEL_CMDLINE, *extra]


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
        memo_path = os.path.join(setup.cache_dir, f"kvm-probe-{key}.json")
        try:
            with open(memo_path) as f:
                memo = json.load(f)
            result = bool(memo["usable"]), str(memo["detail"])
        except (OSError, ValueError, KeyError):
            result = _probe_kvm(setup, scratch, cancel)
            if cancel.is_set():
                return result
            try:
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
    os.makedirs(probe_dir, exist_ok=True)
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


# --------------------------------------------------------------------------- the executor


class VmExecutor(Executor):
    NAME = "vm"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return vm_setup(os.getcwd())[1]

    def run(self, request: CommandRequest, cancel: CancelToken) -> CommandResult:
        if not isinstance(request, RootLayerRequest):
            return CommandResult(1, "the vm executor runs root layers (root_layer, image run_as_root) only")
        setup, reason = vm_setup(os.getcwd())
        if setup is None:
            return CommandResult(1, f"the vm executor cannot run here: {reason}")
        job = request.job
        userns = os.geteuid() != 0
        share = os.path.join(job.job_dir, "vm")
        os.mkdir(share)
        try:
            return self._run(setup, job, share, userns, request, cancel)
        finally:
            remove_as_owner([job.lower, job.seed], userns)

    def _run(self, setup: VmSetup, job: RootLayerJob, share: str, userns: bool, request: RootLayerRequest,
             cancel: CancelToken) -> CommandResult:
        prefix: list[str] = []
        if userns:
            prefix = ["unshare", "--map-root-user", "--map-auto"]
            job_json = os.path.join(job.job_dir, "job.json")
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
        with open(os.path.join(share, "run_as_root.sh"), "w") as f:
            f.write(job.script)
        with open(os.path.join(share, "extra_commands.sh"), "w") as f:
            f.write(job.extra_commands if job.extra_commands.strip() else "")
        if job.network:
            with open(os.path.join(share, "network"), "w"):
                pass
        init = GUEST_INIT.replace("@SCRIPT_ENV@", " ".join(shlex.quote(f"{k}={v}") for k, v in SCRIPT_ENV.items()))
        initramfs = os.path.join(job.job_dir, "initramfs.cpio")
        write_initramfs(initramfs, setup, init, GUEST_MODULES + (NETWORK_MODULES if job.network else ()))
        disk = os.path.join(job.job_dir, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(job.disk_size << 20)
        console = os.path.join(job.job_dir, "console.log")
        devices = [*_virtfs(share, "job", False), *_virtfs(job.lower, "lower", True),
                   *_virtfs(job.seed, "seed", True),
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
        log_tail = _tail(os.path.join(share, "log"))
        status = _guest_status(share)
        if status is None:
            console_tail = _tail(console)
            message = (f"the VM stopped before the layer was built (qemu exit status {result.exit_code})"
                       if not cancel.is_set() else "interrupted")
            write_status(job.job_dir, "mount", 1, message)
            return CommandResult(result.exit_code or 1,
                                 "\n".join(t for t in (result.output, console_tail, log_tail) if t))
        stage, code, message = status
        if stage != "done":
            write_status(job.job_dir, stage, code, message)
            return CommandResult(code or 1, log_tail if stage in ("run_as_root", "extra_commands")
                                 else "\n".join(t for t in (log_tail, _tail(console)) if t))
        if userns:  # the lower directory's owners are subordinate ids outside the namespace
            done = run_supervised([*prefix, sys.executable, "-m", "dtbuild.plugins.builtin.root_layer",
                                   "pack-vm-result", os.path.join(job.job_dir, "job.json")],
                                  cwd=job.job_dir, env=helper_env(), cancel=cancel)
            if done.exit_code != 0:
                return CommandResult(done.exit_code, "\n".join(t for t in (log_tail, done.output) if t))
        else:
            try:
                pack_vm_result(job)
            except (UpperDirError, OSError, ValueError) as e:
                write_status(job.job_dir, "pack", 1, f"packing the layer failed: {e}")
                return CommandResult(1, "\n".join(t for t in (log_tail, str(e)) if t))
        write_status(job.job_dir, "done", 0)
        return CommandResult(0, log_tail)


def _guest_status(share: str) -> tuple[str, int, str] | None:
    try:
        with open(os.path.join(share, "status")) as f:
            stage, code = f.read().split()
    except (OSError, ValueError):
        return None
    message = ""
    try:
        with open(os.path.join(share, "message")) as f:
            message = f.read().strip()
    except OSError:
        pass
    return stage, int(code), message


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc", "", data.decode("utf-8", "replace"))
    return "\n".join(text.splitlines()[-lines:])
