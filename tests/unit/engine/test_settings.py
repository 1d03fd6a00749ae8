"""The settings table (engine/workspace.py SETTINGS) and the plugins that read settings
stay in step, and the Settings plugins get are read-only with the overrides applied."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from dtbuild.engine.workspace import SETTINGS, find_workspace
from dtbuild.plugins.builtin import vm_executor
from dtbuild.plugins.builtin.network_limits import SETTINGS_DOC, NetworkLimits


def test_network_keys_are_the_limits_fields() -> None:
    names = {f.name for f in dataclasses.fields(NetworkLimits)}
    assert set(SETTINGS["network"]) == names == set(SETTINGS_DOC)
    assert all(SETTINGS["network"][n].env == "DTBUILD_NETWORK_" + n.upper() for n in names)


def test_vm_keys_are_the_ones_the_vm_executor_reads() -> None:
    source = Path(vm_executor.__file__).read_text()
    read = set(re.findall(r'(?:configured|vm\.get)\("([a-z_]+)"', source))
    assert read == set(SETTINGS["vm"])


def test_settings_are_read_only_and_overrides_say_where_they_came_from(tmp_path: Path) -> None:
    (tmp_path / "dtbuild.toml").write_text('[plugins]\nmodules = ["a.py"]\n[network]\ntimeout = 5\n')
    settings = find_workspace(str(tmp_path)).settings({"DTBUILD_NETWORK_DEADLINE": "9", "DTBUILD_SANDBOX": ""})
    assert dict(settings["network"]) == {"timeout": 5, "deadline": "9"}
    assert settings.origin("network", "deadline") == "DTBUILD_NETWORK_DEADLINE"
    assert settings.origin("network", "timeout") == "[network] timeout in dtbuild.toml"
    assert settings.setting("sandbox", "commands", "bwrap") == "bwrap"  # an empty variable overrides nothing
    assert settings.section("vm") == {}
    assert settings["plugins"]["modules"] == ("a.py",)
    with pytest.raises(TypeError):
        settings["network"]["timeout"] = 1  # type: ignore[index]
