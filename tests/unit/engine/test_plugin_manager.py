"""The built-in plugins: one per feature, from dtbuild's entry points (or, without
installed metadata, the same list in dtbuild.plugins.builtin), blockable one by one,
replaceable by name only when a plugin says so; compressors told apart through the
registry when archives are read."""

from __future__ import annotations

import io
import tomllib
import types
from pathlib import Path
from typing import ClassVar

import pytest
from dtbuild.engine import plugin_manager
from dtbuild.engine.errors import PluginError
from dtbuild.engine.plugin_manager import collect_registry, make_plugin_manager, plugin_origins
from dtbuild.plugins import hookimpl
from dtbuild.plugins.builtin import imageformat
from dtbuild.plugins.builtin.compressors import GzipCompressor
from dtbuild.plugins.builtin.executors import LocalExecutor

ROOT = Path(__file__).resolve().parents[3]
BUILTIN = ("core", "images", "layered", "root_layers", "registries", "compressors", "executors", "debian")


def _declared() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["dtbuild"]


def test_every_builtin_plugin_module_is_an_entry_point() -> None:
    modules = {f"dtbuild.plugins.builtin.{p.stem}" for p in (ROOT / "plugins" / "builtin").glob("*_plugin.py")}
    assert set(_declared().values()) == modules
    assert set(_declared()) == set(BUILTIN)


def test_builtins_come_from_the_installed_entry_points() -> None:
    own, _ = plugin_manager._entry_points()
    assert {name: ep.value for name, ep in own.items()} == _declared(), "reinstall: pip install -e ."
    assert plugin_origins(make_plugin_manager(autoload=False)).builtin == sorted(BUILTIN)


def test_metadata_without_the_entry_points_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(plugin_manager, "_entry_points", lambda: ({}, []))
    with pytest.raises(PluginError, match="no built-in plugins") as raised:
        make_plugin_manager(autoload=False)
    assert "pip install -e ." in (raised.value.hint or "")


def test_each_builtin_is_registered_under_its_name() -> None:
    pm = make_plugin_manager(autoload=False)
    registry = collect_registry(pm)
    assert registry.owners["rules"]["genrule"] == "core"
    assert registry.owners["rules"]["image"] == "images"
    assert registry.owners["rules"]["layered_image"] == "layered"
    assert registry.owners["rules"]["root_layer"] == "root_layers"
    assert registry.owners["rules"]["pull_image"] == "registries"
    assert registry.owners["compressors"]["zstd"] == "compressors"
    assert registry.owners["executors"]["local"] == "executors"
    assert registry.build_globals["SHADOW_SETUP"]
    assert not registry.unavailable_rules


def test_blocking_one_keeps_its_rules_as_stand_ins_that_say_why() -> None:
    from dtbuild.rules.api import RuleFailure

    pm = make_plugin_manager(autoload=False, blocked=["images"])
    registry = collect_registry(pm)
    assert "images" not in plugin_origins(pm).builtin
    # Those that need it are not loaded either.
    assert {"layered", "root_layers", "registries"} <= set(plugin_origins(pm).unavailable)
    assert "LayerWrite" not in registry.get("action_kinds") and "MergeImages" not in registry.get("action_kinds")
    assert registry.get("rules")["genrule"].impl is not None
    stand_in = registry.get("rules")["layered_image"]
    assert "layered_image" in registry.unavailable_rules
    with pytest.raises(RuleFailure, match="needs the plugin 'images'") as raised:
        stand_in.impl(None)
    assert raised.value.hint is not None and "-p no:images" in raised.value.hint
    # A compressor attribute is not checked against a registry that may be what is missing.
    assert registry.get("rules")["image"].attrs["compressor"].values_from is None


def _plugin(name: str, **hooks: object) -> tuple[str, object]:
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))  # type: ignore[arg-type]
    return name, module


class _MyLocal(LocalExecutor):
    NAME: ClassVar[str] = "local"
    REPLACES: ClassVar[bool] = True


class _TheirLocal(LocalExecutor):
    NAME: ClassVar[str] = "local"


def test_an_executor_is_replaced_only_with_replaces() -> None:
    pm = make_plugin_manager(autoload=False, extra_plugins=[
        _plugin("mine", dtbuild_register_executors=lambda: [_MyLocal])])
    registry = collect_registry(pm, ["executors"])
    assert registry.get("executors")["local"] is _MyLocal
    assert registry.replaced["executors"] == {"local": "executors"}

    pm = make_plugin_manager(autoload=False, extra_plugins=[
        _plugin("theirs", dtbuild_register_executors=lambda: [_TheirLocal])])
    with pytest.raises(PluginError, match="two plugins register executor 'local'") as raised:
        collect_registry(pm, ["executors"])
    assert "REPLACES = True" in (raised.value.hint or "")


def test_replaces_does_not_replace_another_plugins_item() -> None:
    class Mine(GzipCompressor):
        NAME = "mygz"

    class Again(GzipCompressor):
        NAME = "mygz"
        REPLACES = True

    pm = make_plugin_manager(autoload=False, extra_plugins=[
        _plugin("a", dtbuild_register_compressors=lambda: [Mine]),
        _plugin("b", dtbuild_register_compressors=lambda: [Again])])
    with pytest.raises(PluginError, match="two plugins register compressor 'mygz'"):
        collect_registry(pm, ["compressors"])


def test_a_plugin_that_needs_a_missing_plugin_is_an_error() -> None:
    name, module = _plugin("needy")
    module.DTBUILD_REQUIRES = ("nowhere",)  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match="plugin 'needy' needs the plugin 'nowhere'"):
        make_plugin_manager(autoload=False, extra_plugins=[(name, module)])


class _Fake(GzipCompressor):
    NAME: ClassVar[str] = "fake"
    OCI_LAYER_MEDIA_TYPE: ClassVar[str] = "application/vnd.oci.image.layer.v1.tar+fake"
    DOCKER_LAYER_MEDIA_TYPE: ClassVar[str | None] = None
    MAGIC: ClassVar[bytes] = b"\x1f\x8bFAKE"  # longer than gzip's: the longest magic wins


def test_compressors_are_told_through_the_registry() -> None:
    builtin = imageformat.Compressors.builtin()
    assert builtin.detect(b"\x1f\x8bFAKE....") == "gz"
    assert builtin.detect(b"\x28\xb5\x2f\xfd") == "zstd" and builtin.detect(b"ustar") == "none"
    classes = {**builtin.classes, "fake": _Fake}
    table = imageformat.Compressors(classes, lambda name: classes[name]())
    assert table.detect(b"\x1f\x8bFAKE....") == "fake" and table.detect(b"\x1f\x8b\x08") == "gz"
    assert imageformat.layer_compressor_name(_Fake.OCI_LAYER_MEDIA_TYPE, table) == "fake"
    with pytest.raises(ValueError):
        imageformat.layer_compressor_name(_Fake.OCI_LAYER_MEDIA_TYPE)
    assert max(len(c.MAGIC) for c in classes.values()) <= imageformat.HEAD_SIZE


def test_an_archive_is_read_with_a_registered_compressor(tmp_path: Path) -> None:
    import lzma

    from dtbuild.plugins.interfaces import Compressor

    class Xz(Compressor):
        NAME = "xz"
        EXTENSION = ".xz"
        OCI_LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+xz"
        DOCKER_LAYER_MEDIA_TYPE = None
        MAGIC = b"\xfd7zXZ\x00"

        def compress_to(self, sink):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def decompress_from(self, source):  # type: ignore[no-untyped-def]
            return lzma.LZMAFile(source, "rb")

    plain = io.BytesIO()
    config = imageformat.make_config("amd64", "linux", {}, [], [], "1970-01-01T00:00:00Z")
    imageformat.write_docker_archive(plain, [imageformat.ArchiveImage(config=config, repo_tags=["x:1"], layers=[])],
                                     imageformat.Compressors.builtin().named("none"))
    archive = tmp_path / "image.tar.xz"
    archive.write_bytes(lzma.compress(plain.getvalue()))
    with pytest.raises(ValueError, match="not a readable none tar"):
        imageformat.read_image_archive(str(archive))
    classes = {**imageformat.Compressors.builtin().classes, "xz": Xz}
    images = imageformat.read_image_archive(str(archive), imageformat.Compressors(classes, lambda n: classes[n]()))
    assert [image.repo_tags for image in images] == [("x:1",)]
