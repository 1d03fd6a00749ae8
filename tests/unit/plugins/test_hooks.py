"""Every hook of the plugin API, implemented by one recording plugin and exercised by a
real (in-process) build."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

from dtbuild.engine.build import BuildOptions, Session
from dtbuild.engine.workspace import find_workspace
from dtbuild.plugins import hookimpl
from dtbuild.plugins.builtin.executors import LocalExecutor
from dtbuild.plugins.interfaces import ActionContext, ActionKind, Compressor, LayerKind, LayerMember
from dtbuild.rules import attrs
from dtbuild.rules.api import rule
from dtbuild.rules.providers import DefaultInfo


class Shout(ActionKind):
    NAME = "Shout"

    def run(self, ctx: ActionContext) -> None:
        ctx.log("shouting")
        with open(ctx.output_path("out"), "w") as f:
            f.write(ctx.params["text"].upper())


def _shout_impl(ctx):
    out = ctx.declare_file(ctx.name + ".txt")
    ctx.actions.declare("Shout", outputs={"out": out}, params={"text": ctx.attr.text})
    return [DefaultInfo(files=(out,))]


shout = rule("shout", _shout_impl, attrs={"text": attrs.string(doc="What to shout.")}, doc="Upper-cases a text.")


class RecordingExecutor(LocalExecutor):
    NAME = "recording"
    runs: list[list[str]] = []

    def run(self, request, cancel):
        RecordingExecutor.runs.append(list(request.argv))
        return super().run(request, cancel)


class Identity(Compressor):
    NAME = "identity"
    EXTENSION = ""
    OCI_LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
    DOCKER_LAYER_MEDIA_TYPE = "application/vnd.docker.image.rootfs.diff.tar"
    MAGIC = b""

    def compress_to(self, sink):
        class Through(io.RawIOBase):
            def writable(self):
                return True

            def write(self, data):
                return sink.write(data)

        return Through()

    def decompress_from(self, source):
        return source


class DebLayer(LayerKind):
    """A layer kind: the engine makes the rule ``deb`` from it."""

    NAME = "deb"
    DOC = "A layer holding one text file."
    ATTRS = {"text": attrs.string(doc="What /etc/deb.txt holds.")}

    def entries(self, ctx, attrs):
        yield LayerMember("/etc/deb.txt", data=attrs["text"].encode())


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    @hookimpl
    def dtbuild_register_rules(self):
        return [shout]

    @hookimpl
    def dtbuild_register_build_globals(self):
        return {"GREETING": "hello from a plugin"}

    @hookimpl
    def dtbuild_register_action_kinds(self):
        return [Shout]

    @hookimpl
    def dtbuild_register_compressors(self):
        return [Identity]

    @hookimpl
    def dtbuild_register_layer_kinds(self):
        return [DebLayer]

    @hookimpl
    def dtbuild_register_executors(self):
        return [RecordingExecutor]

    @hookimpl
    def dtbuild_select_executor(self, mnemonic, requested, available):
        self.events.append(("select", (mnemonic, requested, tuple(available))))
        return "recording" if mnemonic == "Genrule" else None

    @hookimpl
    def dtbuild_build_started(self, targets, total_actions):
        self.events.append(("started", (tuple(targets), total_actions)))

    @hookimpl
    def dtbuild_action_started(self, label, mnemonic, description):
        self.events.append(("action_started", (label, mnemonic)))

    @hookimpl
    def dtbuild_action_finished(self, label, mnemonic, description, status, seconds):
        self.events.append(("action_finished", (label, mnemonic, status)))

    @hookimpl
    def dtbuild_action_log(self, label, mnemonic, message):
        self.events.append(("log", (label, message)))

    @hookimpl
    def dtbuild_build_finished(self, summary, success):
        self.events.append(("finished", (success, summary["actions"]["executed"])))


def _workspace(tmp_path: Path) -> Path:
    (tmp_path / "dtbuild.toml").write_text("")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "BUILD").write_text(
        'shout(name = "loud", text = GREETING)\n'
        'genrule(name = "gen", outs = ["g.txt"], cmd = "echo generated > $OUT")\n'
        'deb(name = "layer", text = GREETING)\n')
    return tmp_path


def test_every_hook_takes_part_in_a_build(tmp_path: Path, monkeypatch) -> None:
    root = _workspace(tmp_path)
    monkeypatch.setenv("DTBUILD_CACHE_DIR", str(tmp_path / "cache"))
    recorder = Recorder()
    session = Session(find_workspace(str(root)), extra_plugins=[("recorder", recorder)])
    names = session.registry.names()
    assert "identity" in names["compressors"] and "deb" in names["layer_kinds"]
    assert "recording" in names["executors"] and "output_formats" not in names
    assert session.registry.owners["rules"]["shout"] == "recorder"
    assert session.registry.owners["rules"]["deb"] == "recorder"  # the layer kind's rule

    labels = session.expand(["//pkg:all"])
    result = session.build(labels, BuildOptions(jobs=1), threading.Event())
    assert result.error is None
    assert (root / "dtbuild-out" / "pkg" / "loud.txt").read_text() == "HELLO FROM A PLUGIN"
    assert (root / "dtbuild-out" / "pkg" / "g.txt").read_text() == "generated\n"
    import tarfile

    with tarfile.open(root / "dtbuild-out" / "pkg" / "layer.tar") as tar:
        assert tar.getnames() == ["etc", "etc/deb.txt"]
        assert tar.extractfile("etc/deb.txt").read() == b"hello from a plugin"

    events = recorder.events
    assert events[0] == ("started", (("//pkg:gen", "//pkg:layer", "//pkg:loud"), 3))
    assert ("action_finished", ("//pkg:layer", "LayerKindWrite", "executed")) in events
    assert ("log", ("//pkg:loud", "shouting")) in events
    assert ("action_finished", ("//pkg:loud", "Shout", "executed")) in events
    assert ("action_started", ("//pkg:gen", "Genrule")) in events
    assert any(e[0] == "select" and e[1][0] == "Genrule" and "recording" in e[1][2] for e in events)
    assert RecordingExecutor.runs and RecordingExecutor.runs[-1][-1].endswith("echo generated > $OUT")
    assert events[-1] == ("finished", (True, 3))

    # A second build: everything comes from the cache, and observers hear so.
    recorder.events.clear()
    session = Session(find_workspace(str(root)), extra_plugins=[("recorder", recorder)])
    result = session.build(session.expand(["//pkg:all"]), BuildOptions(jobs=1), threading.Event())
    assert result.error is None
    assert sorted(e[1][2] for e in recorder.events if e[0] == "action_finished") == ["cached"] * 3
    assert recorder.events[-1] == ("finished", (True, 0))


def test_a_blocked_plugin_registers_nothing(tmp_path: Path, monkeypatch) -> None:
    root = _workspace(tmp_path)
    session = Session(find_workspace(str(root)), blocked=["recorder"], extra_plugins=[("recorder", Recorder())])
    assert "shout" not in session.registry.names()["rules"]
