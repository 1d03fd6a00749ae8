"""HostBusybox's version names the host busybox by content: it is in every action key,
so another busybox re-keys exactly these actions, and the same busybox elsewhere keys
them the same. The plugin's fingerprint (the class's version) stays the plain one."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from dtbuild.plugins.builtin import toolbox
from dtbuild.plugins.builtin.shell_image_actions import HostBusybox
from dtbuild.plugins.builtin.toolbox import is_static_elf


def test_the_version_follows_the_host_busyboxs_bytes(tmp_path: Path, monkeypatch, require_tool) -> None:
    busybox = require_tool("busybox")
    if not is_static_elf(busybox):
        pytest.fail(f"{busybox} is not a static busybox (apt-get install busybox-static)")
    copy = tmp_path / "busybox"
    shutil.copy(busybox, copy)
    monkeypatch.setattr(toolbox, "BUSYBOX_CANDIDATES", (str(tmp_path / "missing"), str(copy)))
    monkeypatch.setattr(toolbox.find_static_busybox, "__defaults__", (toolbox.BUSYBOX_CANDIDATES,))
    kind = HostBusybox()
    first = kind.VERSION
    assert first == "1+sha256:" + hashlib.sha256(copy.read_bytes()).hexdigest()
    assert first == kind.VERSION  # asked again: the same
    with open(copy, "ab") as f:  # still a static ELF, other bytes
        f.write(b"\0")
    second = kind.VERSION
    assert second.startswith("1+sha256:") and second != first
    copy.unlink()
    assert kind.VERSION == "1+none"


def test_the_registry_fingerprint_is_the_plain_version() -> None:
    from dtbuild.engine.plugin_manager import collect_registry, make_plugin_manager

    registry = collect_registry(make_plugin_manager())
    assert registry.fingerprints()["action_kinds"]["HostBusybox"] == HostBusybox.VERSION == "1"
