"""The pieces of the root-layer executors that need no VM and no namespace: which
executor "auto" picks, the guest's module order, the kernel's version, the initramfs."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from dtbuild.engine.workspace import find_workspace
from dtbuild.plugins.builtin import dtbuild_select_executor
from dtbuild.plugins.builtin.vm_executor import (
    GUEST_MODULES,
    CpioWriter,
    VmExecutor,
    is_static_elf,
    kernel_version,
    module_order,
)
from dtbuild.plugins.interfaces import ExecutorContext


@pytest.mark.parametrize(("mnemonic", "requested", "available", "chosen"), [
    ("RootLayerWrite", "auto", ["local", "namespace", "vm"], "namespace"),
    ("RootLayerWrite", "auto", ["local", "vm"], "vm"),
    ("RootLayerWrite", "auto", ["local"], "namespace"),  # so that the error says what namespace lacks
    ("RootLayerWrite", "vm", ["local", "namespace", "vm"], None),  # honoured by the engine
    ("Genrule", "auto", ["local", "namespace", "vm"], "local"),
])
def test_auto_picks_namespace_for_root_layers_and_local_for_the_rest(mnemonic, requested, available,
                                                                     chosen) -> None:
    assert dtbuild_select_executor(mnemonic=mnemonic, requested=requested, available=available) == chosen


DEBIAN_MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/overlayfs/overlay.ko.xz:
kernel/net/ipv4/tcp_bbr.ko:
"""


def test_guest_modules_load_dependencies_first_in_the_order_the_debian_kernel_needs(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(DEBIAN_MODULES_DEP.replace("\\\n", ""))
    names = [name for name, _ in module_order(str(tmp_path), GUEST_MODULES)]
    assert names == ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
                     "9pnet", "9pnet_virtio", "netfs", "fscache", "9p", "virtio_blk", "crc16", "mbcache", "jbd2",
                     "ext4", "overlay"]
    assert dict(module_order(str(tmp_path), ["overlay"]))["overlay"].endswith("overlay.ko.xz")
    assert module_order(None, GUEST_MODULES) == []  # a kernel with everything built in


def test_the_kernel_version_comes_from_the_bzimage_header(tmp_path: Path) -> None:
    image = bytearray(0x600)
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x20E, 0x300)
    image[0x500:0x540] = b"6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1\0".ljust(0x40, b"\0")
    (tmp_path / "vmlinuz").write_bytes(bytes(image))
    assert kernel_version(str(tmp_path / "vmlinuz")) == "6.1.0-56-amd64"
    (tmp_path / "other").write_bytes(b"not a kernel")
    assert kernel_version(str(tmp_path / "other")) is None


def test_the_initramfs_is_a_newc_cpio_that_cpio_lists(tmp_path: Path, require_tool) -> None:
    busybox = require_tool("busybox")  # its cpio applet: the guest's own tools read it too
    path = tmp_path / "initramfs.cpio"
    with open(path, "wb") as f:
        cpio = CpioWriter(f)
        cpio.directory("bin")
        cpio.char_device("dev/console", 5, 1)
        cpio.file("init", b"#!/bin/sh\n", 0o755)
        cpio.close()
    listing = subprocess.run([busybox, "cpio", "-itv"], input=path.read_bytes(), capture_output=True,
                             check=True).stdout
    lines = listing.decode().splitlines()
    assert [line.split()[5] for line in lines] == ["bin", "dev/console", "init"]
    assert lines[1].startswith("crw-------") and lines[2].startswith("-rwxr-xr-x")
    with open(tmp_path / "again.cpio", "wb") as f:
        cpio = CpioWriter(f)
        cpio.directory("bin")
        cpio.char_device("dev/console", 5, 1)
        cpio.file("init", b"#!/bin/sh\n", 0o755)
        cpio.close()
    assert (tmp_path / "again.cpio").read_bytes() == path.read_bytes()


def test_static_busybox_is_recognised(require_tool) -> None:
    busybox = require_tool("busybox")
    if not is_static_elf(busybox):
        pytest.skip(f"{busybox} is not busybox-static")
    assert not is_static_elf("/bin/sh") or Path("/bin/sh").resolve().name == "busybox"


def test_vm_settings_come_from_the_executor_context_not_the_working_directory(tmp_path: Path,
                                                                              monkeypatch) -> None:
    (tmp_path / "dtbuild.toml").write_text('[vm]\nqemu = "/bin/true"\nkernel = "kernels/vmlinuz"\naccel = "tcg"\n')
    (tmp_path / "pkg").mkdir()
    workspace = find_workspace(str(tmp_path / "pkg"))
    assert workspace.root == str(tmp_path)
    settings = workspace.settings({"DTBUILD_VM_ACCEL": "kvm"})
    assert dict(settings["vm"]) == {"qemu": "/bin/true", "kernel": "kernels/vmlinuz", "accel": "kvm"}
    assert settings.origin("vm", "accel") == "DTBUILD_VM_ACCEL"
    # Wherever dtbuild runs, a relative path is relative to the workspace root.
    monkeypatch.chdir("/")
    executor = VmExecutor(ExecutorContext(workspace.root, str(tmp_path / "cache"), settings))
    reason = executor.unavailable_reason()
    assert reason is not None and f"the guest kernel {tmp_path}/kernels/vmlinuz is missing" in reason
