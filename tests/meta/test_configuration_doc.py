"""docs/configuration.md and the settings table (engine/workspace.py SETTINGS) say the
same: every key is documented with its type, default and variable, and no documented key
is unknown; and each default in the table is the one the code that reads it applies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dtbuild.engine.remote.config import DEFAULT_TIMEOUT, RemoteConfig
from dtbuild.engine.workspace import SETTINGS, Workspace
from dtbuild.plugins.builtin import vm_executor
from dtbuild.plugins.builtin.network_limits import NetworkLimits, parse_limits

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
COLUMNS = ["key", "type", "default", "environment", "meaning"]


def documented() -> dict[str, dict[str, dict[str, str]]]:
    """section -> key -> column -> cell, from each "## `[section]`" heading's table."""
    sections: dict[str, dict[str, dict[str, str]]] = {}
    current: dict[str, dict[str, str]] | None = None
    for line in DOC.read_text().splitlines():
        heading = re.fullmatch(r"## `\[([a-z_]+)\]`", line)
        if heading:
            assert heading[1] not in sections, f"[{heading[1]}] is documented twice"
            current = sections[heading[1]] = {}
        elif line.startswith("## "):
            current = None
        elif current is not None and line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            if cells == COLUMNS or set(line) <= set("|-"):
                continue
            assert len(cells) == len(COLUMNS), f"docs/configuration.md: a row without {len(COLUMNS)} cells: {line}"
            key = re.fullmatch(r"`([a-z_]+)`", cells[0])
            assert key, f"docs/configuration.md: the key cell of {line!r} is not `name`"
            assert key[1] not in current, f"{key[1]} is documented twice"
            current[key[1]] = dict(zip(COLUMNS[1:], cells[1:], strict=True))
    return sections


def test_every_section_and_key_is_documented_and_nothing_else() -> None:
    doc = documented()
    assert set(doc) == set(SETTINGS), (f"sections missing from docs/configuration.md: {set(SETTINGS) - set(doc)}; "
                                       f"documented but unknown: {set(doc) - set(SETTINGS)}")
    for section, keys in SETTINGS.items():
        assert set(doc[section]) == set(keys), (
            f"[{section}]: missing from docs/configuration.md: {sorted(set(keys) - set(doc[section]))}; "
            f"documented but unknown: {sorted(set(doc[section]) - set(keys))}")


@pytest.mark.parametrize(("section", "key"), [(s, k) for s, keys in SETTINGS.items() for k in keys])
def test_each_key_is_documented_with_its_type_default_and_variable(section: str, key: str) -> None:
    row = documented()[section][key]
    spec = SETTINGS[section][key]
    assert row["type"] == spec.type, f"[{section}] {key}"
    assert row["default"] == spec.default_text(), f"[{section}] {key}"
    assert row["environment"] == (f"`{spec.env}`" if spec.env else "—"), f"[{section}] {key}"
    assert row["meaning"], f"[{section}] {key} has no meaning in docs/configuration.md"
    for choice in spec.choices:
        assert f'`"{choice}"`' in row["meaning"], f"[{section}] {key}: the choice {choice!r} is not documented"


# --------------------------------------------------------------------------- the defaults are the code's


def test_network_defaults_are_the_limits_applied_when_nothing_is_set() -> None:
    given = {key: spec.default for key, spec in SETTINGS["network"].items()}
    assert parse_limits(given) == parse_limits({}) == NetworkLimits()


def test_remote_defaults_are_the_ones_the_remote_config_applies() -> None:
    remote = SETTINGS["remote"]
    assert remote["timeout"].default == DEFAULT_TIMEOUT
    assert remote["upload"].default is RemoteConfig().upload
    assert dict(remote["platform"].default) == dict(RemoteConfig().platform) == {}


def test_vm_defaults_are_the_ones_the_vm_executor_applies() -> None:
    assert SETTINGS["vm"]["kvm_probe_timeout"].default == vm_executor.KVM_PROBE_TIMEOUT
    source = Path(vm_executor.__file__).read_text()
    assert f'vm.get("accel", {SETTINGS["vm"]["accel"].default!r})'.replace("'", '"') in source


def test_engine_defaults_are_what_an_empty_dtbuild_toml_gives(tmp_path: Path, monkeypatch) -> None:
    for name in ("DTBUILD_SANDBOX", "DTBUILD_RUN_RUNTIME", "DTBUILD_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ws = Workspace(str(tmp_path))
    assert ws.sandbox_commands() == SETTINGS["sandbox"]["commands"].default
    assert ws.run_runtime() == SETTINGS["run"]["runtime"].default
    assert list(SETTINGS["plugins"]["modules"].default) == ws.plugin_modules() == []
    assert ws.cache_dir() == str(tmp_path / "xdg" / "dtbuild")
    assert SETTINGS["cache"]["dir"].default_text().startswith("`$XDG_CACHE_HOME/dtbuild`")
