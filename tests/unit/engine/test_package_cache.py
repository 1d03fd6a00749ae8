"""The package cache and the analysis memo: a no-op evaluates no BUILD file and redoes
no analysis; each kind of change evaluates again exactly the packages it may change, and
gives the result a fresh process would; hostile state files are misses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dtbuild.engine.analysis import Analyzer
from dtbuild.engine.build import Session
from dtbuild.engine.errors import BuildFileError
from dtbuild.engine.package_cache import ANALYSIS_FILE, KEY_FILE, PACKAGES_FILE
from dtbuild.engine.workspace import find_workspace


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("DTBUILD_CACHE_DIR", str(path))
    return path


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def ws(tmp_path: Path, cache_dir: Path) -> Path:
    root = tmp_path / "ws"
    _write(root, {
        "dtbuild.toml": "",
        "defs.bzl": 'def pair(name, srcs):\n    files(name = name, srcs = srcs)\n',
        "a/BUILD": 'load("//:defs.bzl", "pair")\npair(name = "a", srcs = ["x.txt"])\n',
        "a/x.txt": "x\n",
        "b/BUILD": 'files(name = "b", srcs = glob(["data/**"]))\n',
        "b/data/one.txt": "1\n",
        "c/BUILD": 'genrule(name = "c", srcs = ["//a:a"], outs = ["c.txt"], cmd = "cat $SRCS > $OUT")\n',
    })
    return root


def _session(root: Path) -> Session:
    return Session(find_workspace(str(root)))


def _analyze(root: Path, pattern: str = "//...") -> tuple[Session, dict[str, list[str]]]:
    """A fresh session (as a new process has) that expands and analyses ``pattern``;
    each target's default outputs."""
    session = _session(root)
    labels = session.expand([pattern])
    result = session.analyze(labels)
    return session, {str(lb): [a.path for a in result.targets[lb].default_outputs] for lb in labels}


def _no_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Analyzer, *args: object) -> None:
        raise AssertionError("a rule implementation ran: the analysis was not restored")

    monkeypatch.setattr(Analyzer, "_run_impl", refuse)


def test_a_no_op_evaluates_no_build_file_and_restores_the_analysis(ws: Path, monkeypatch) -> None:
    first, outputs = _analyze(ws)
    assert first.loader.stats == {"evaluated": 4, "cached": 0}  # three BUILD files and defs.bzl
    with monkeypatch.context() as m:
        _no_analysis(m)
        again, outputs_again = _analyze(ws)
    assert again.loader.stats == {"evaluated": 0, "cached": 3}
    assert outputs_again == outputs
    assert sorted(outputs) == ["//a:a", "//b:b", "//c:c"]


def test_an_edited_build_file_is_evaluated_again_alone(ws: Path) -> None:
    _analyze(ws)
    (ws / "c/BUILD").write_text('genrule(name = "c2", srcs = ["//a:a"], outs = ["c2.txt"], '
                                'cmd = "cat $SRCS > $OUT")\n')
    session, outputs = _analyze(ws)
    assert session.loader.stats == {"evaluated": 1, "cached": 2}
    assert "//c:c2" in outputs and "//c:c" not in outputs


def test_an_edited_bzl_file_evaluates_its_loaders_again(ws: Path) -> None:
    _analyze(ws)
    (ws / "defs.bzl").write_text('def pair(name, srcs):\n    files(name = name + "_x", srcs = srcs)\n')
    (ws / "c/BUILD").write_text('genrule(name = "c", srcs = ["//a:a_x"], outs = ["c.txt"], cmd = "cat $SRCS > $OUT")\n')
    session, outputs = _analyze(ws)
    # a/BUILD and defs.bzl (a loads it), c/BUILD (edited); b is untouched.
    assert session.loader.stats == {"evaluated": 3, "cached": 1}
    assert "//a:a_x" in outputs


def test_a_touched_file_with_the_same_bytes_is_a_hit(ws: Path) -> None:
    _analyze(ws)
    build = ws / "a/BUILD"
    st = build.stat()
    build.write_text(build.read_text())
    os.utime(build, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    session, _ = _analyze(ws)
    assert session.loader.stats == {"evaluated": 0, "cached": 3}


def test_a_file_a_glob_matches_evaluates_its_package_again(ws: Path) -> None:
    _analyze(ws)
    (ws / "b/data/deeper").mkdir()
    (ws / "b/data/deeper/two.txt").write_text("2\n")
    session, _ = _analyze(ws)
    assert session.loader.stats == {"evaluated": 1, "cached": 2}
    srcs = next(d.attrs["srcs"] for d in session.loader.declared_targets() if str(d.label) == "//b:b")
    assert srcs == ["data/deeper/two.txt", "data/one.txt"]
    # A file no glob lists (a's sources are named) evaluates nothing.
    (ws / "a/unrelated.txt").write_text("u\n")
    assert _analyze(ws)[0].loader.stats["evaluated"] == 0


def test_a_new_package_is_found_and_evaluated_alone(ws: Path) -> None:
    _analyze(ws)
    _write(ws, {"d/e/BUILD": 'files(name = "e", srcs = [])\n'})
    session, outputs = _analyze(ws)
    assert "//d/e:e" in outputs
    assert session.loader.stats == {"evaluated": 1, "cached": 3}
    (ws / "d/e/BUILD").unlink()
    session, outputs = _analyze(ws)
    assert "//d/e:e" not in outputs
    assert session.loader.stats == {"evaluated": 0, "cached": 3}


def test_a_changed_setting_evaluates_everything_again(ws: Path) -> None:
    _analyze(ws)
    (ws / "dtbuild.toml").write_text('[sandbox]\ncommands = "none"\n')
    session, outputs = _analyze(ws)
    assert session.loader.stats == {"evaluated": 4, "cached": 0}
    assert sorted(outputs) == ["//a:a", "//b:b", "//c:c"]


PLUGIN = '''
from dtbuild.plugins import hookimpl
from dtbuild.rules import attrs
from dtbuild.rules.api import rule
from dtbuild.rules.providers import DefaultInfo


def _impl(ctx):
    out = ctx.declare_file(ctx.name + SUFFIX)
    ctx.actions.declare("FilesTree", inputs={}, outputs={"out": out}, params={"entries": []})
    return [DefaultInfo(files=(out,))]


SUFFIX = ".one"
shout = rule("shout", _impl, doc="d", attrs={"text": attrs.string(doc="t")})


@hookimpl
def dtbuild_register_rules():
    return [shout]
'''


def test_a_changed_plugin_evaluates_the_packages_calling_its_rules(ws: Path) -> None:
    _write(ws, {"dtbuild.toml": '[plugins]\nmodules = ["tools/plug.py"]\n', "tools/plug.py": PLUGIN,
                "s/BUILD": 'shout(name = "s", text = "hi")\n'})
    _, outputs = _analyze(ws)
    assert outputs["//s:s"] == ["dtbuild-out/s/s.one"]
    (ws / "tools/plug.py").write_text(PLUGIN.replace('SUFFIX = ".one"', 'SUFFIX = ".two"'))
    session, outputs = _analyze(ws)
    assert outputs["//s:s"] == ["dtbuild-out/s/s.two"]  # analysed again with the new rule
    # Only s calls the rule; //... found the other packages unchanged.
    assert session.loader.stats == {"evaluated": 1, "cached": 3}


def test_a_build_file_error_is_reported_every_time(ws: Path) -> None:
    _analyze(ws)
    (ws / "a/BUILD").write_text('files(name = "a", srcs = ["x.txt"]\n')
    for _ in range(2):
        session = _session(ws)
        with pytest.raises(BuildFileError):
            session.analyze(session.expand(["//..."]))
    (ws / "a/BUILD").write_text('files(name = "a", srcs = ["x.txt"])\n')
    session, outputs = _analyze(ws)
    assert sorted(outputs) == ["//a:a", "//b:b", "//c:c"]
    assert session.loader.stats["evaluated"] == 1


def test_a_deleted_source_is_an_analysis_error_again(ws: Path) -> None:
    from dtbuild.engine.errors import UnknownTargetError

    _analyze(ws)
    (ws / "a/x.txt").unlink()
    session = _session(ws)
    with pytest.raises(UnknownTargetError, match=r"x\.txt"):
        session.analyze(session.expand(["//..."]))


def test_fewer_targets_than_analysed_are_restored(ws: Path, monkeypatch) -> None:
    _analyze(ws)
    _no_analysis(monkeypatch)
    _, outputs = _analyze(ws, "//c:c")
    assert outputs == {"//c:c": ["dtbuild-out/c/c.txt"]}


def _state(ws: Path) -> Path:
    return ws / "dtbuild-out" / ".dtbuild"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "unsigned pickle", "empty"])
def test_damaged_state_files_are_misses(ws: Path, damage: str) -> None:
    import pickle

    _, outputs = _analyze(ws)
    for name in (PACKAGES_FILE, ANALYSIS_FILE):
        path = _state(ws) / name
        data = path.read_bytes()
        path.write_bytes({"garbage": b"\x00not a state file" * 10, "truncated": data[:len(data) // 2],
                          "flipped": data[:-1] + bytes([data[-1] ^ 1]),
                          "unsigned pickle": pickle.dumps({"environment": "x", "packages": {}}),
                          "empty": b""}[damage])
    session, again = _analyze(ws)
    assert again == outputs
    assert session.loader.stats == {"evaluated": 4, "cached": 0}
    # and written anew: the next one is a hit
    assert _analyze(ws)[0].loader.stats == {"evaluated": 0, "cached": 3}


def test_state_signed_with_another_key_is_a_miss(ws: Path, cache_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A workspace copied from someone else carries state signed with their key."""
    _analyze(ws)
    other = tmp_path / "other-cache"
    monkeypatch.setenv("DTBUILD_CACHE_DIR", str(other))
    session, _ = _analyze(ws)
    assert session.loader.stats == {"evaluated": 4, "cached": 0}
    assert (other / KEY_FILE).stat().st_mode & 0o777 == 0o600


def test_a_key_others_can_read_is_not_used(ws: Path, cache_dir: Path) -> None:
    _analyze(ws)
    os.chmod(cache_dir / KEY_FILE, 0o644)
    assert _analyze(ws)[0].loader.stats == {"evaluated": 4, "cached": 0}
