"""``RuleContext.read_source_file``: the one file read a rule may make at analysis (a lock
file). What it read is recorded with the analysis, so the analysis memo is dropped when
the file changes, appears or goes, and kept while its bytes are the same (a touch costs
a hash, not an analysis); paths that leave the workspace, symlinks out of it, outputs and
directories are refused with the target's BUILD line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dtbuild.engine.analysis import Analyzer
from dtbuild.engine.build import Session
from dtbuild.engine.errors import RuleError
from dtbuild.engine.workspace import find_workspace

# A rule whose declared output is named after what a source file holds: the analysis
# depends on the file, and nothing else of it reaches an action.
PLUGIN = '''
from dtbuild.plugins import hookimpl
from dtbuild.rules import attrs
from dtbuild.rules.api import rule
from dtbuild.rules.providers import DefaultInfo


def _impl(ctx):
    data = ctx.read_source_file(ctx.attr.path, max_bytes=ctx.attr.max_bytes)
    name = "missing" if data is None else data.decode().strip()
    out = ctx.declare_file(name + ".txt")
    ctx.actions.declare("FilesTree", inputs={}, outputs={"out": out}, params={"entries": []})
    return [DefaultInfo(files=(out,))]


reader = rule("reader", _impl, doc="d", attrs={
    "path": attrs.string(doc="p"), "max_bytes": attrs.integer(doc="m", default=1024)})


@hookimpl
def dtbuild_register_rules():
    return [reader]
'''


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DTBUILD_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "ws"
    _write(root, {
        "dtbuild.toml": '[plugins]\nmodules = ["tools/plug.py"]\n',
        "tools/plug.py": PLUGIN,
        "p/BUILD": 'reader(name = "r", path = "name.lock")\n',
        "p/name.lock": "first\n",
    })
    return root


class Counting:
    """Counts the rule implementations analysis runs (0: the memo was restored)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.runs = 0
        original = Analyzer._run_impl

        def counted(analyzer: Analyzer, *args: object) -> object:
            self.runs += 1
            return original(analyzer, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(Analyzer, "_run_impl", counted)


def _outputs(root: Path, label: str = "//p:r") -> list[str]:
    """A fresh session (a new process) analysing ``label``: its default outputs."""
    session = Session(find_workspace(str(root)))
    labels = session.expand([label])
    result = session.analyze(labels)
    return [a.path for a in result.targets[labels[0]].default_outputs]


def _age(path: Path) -> None:
    """Make the file's signature old enough to be trusted (it is not within 2 s)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))


def test_the_memo_is_kept_while_the_file_read_is_unchanged(ws: Path, monkeypatch) -> None:
    count = Counting(monkeypatch)
    assert _outputs(ws) == ["dtbuild-out/p/first.txt"]
    assert count.runs == 1
    assert _outputs(ws) == ["dtbuild-out/p/first.txt"]
    assert count.runs == 1  # restored: no rule ran


def test_the_memo_is_dropped_when_the_file_read_changes(ws: Path, monkeypatch) -> None:
    count = Counting(monkeypatch)
    _age(ws / "p/name.lock")
    assert _outputs(ws) == ["dtbuild-out/p/first.txt"]
    # Same size, and the mtime put back: only the bytes tell (the ctime and the re-hash).
    lock = ws / "p/name.lock"
    st = lock.stat()
    lock.write_text("other\n")
    os.utime(lock, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _outputs(ws) == ["dtbuild-out/p/other.txt"]
    assert count.runs == 2


def test_a_touched_file_with_the_same_bytes_keeps_the_memo(ws: Path, monkeypatch) -> None:
    count = Counting(monkeypatch)
    lock = ws / "p/name.lock"
    _age(lock)
    _outputs(ws)
    lock.write_text(lock.read_text())
    _age(lock)
    assert _outputs(ws) == ["dtbuild-out/p/first.txt"]
    assert count.runs == 1


def test_a_file_that_appears_or_goes_drops_the_memo(ws: Path, monkeypatch) -> None:
    count = Counting(monkeypatch)
    lock = ws / "p/name.lock"
    lock.unlink()
    assert _outputs(ws) == ["dtbuild-out/p/missing.txt"]
    assert _outputs(ws) == ["dtbuild-out/p/missing.txt"]
    assert count.runs == 1  # a missing file that is still missing keeps the memo
    lock.write_text("back\n")
    assert _outputs(ws) == ["dtbuild-out/p/back.txt"]
    lock.unlink()
    assert _outputs(ws) == ["dtbuild-out/p/missing.txt"]
    assert count.runs == 3


def test_a_file_turned_into_a_symlink_out_of_the_workspace_is_refused(ws: Path, tmp_path: Path) -> None:
    _outputs(ws)
    outside = tmp_path / "outside.lock"
    outside.write_text("first\n")  # the same bytes: only the check of where it leads tells
    lock = ws / "p/name.lock"
    lock.unlink()
    lock.symlink_to(outside)
    with pytest.raises(RuleError, match="outside the workspace") as raised:
        _outputs(ws)
    assert "p/BUILD:1" in str(raised.value.location)


@pytest.mark.parametrize(("path", "why"), [
    ("../../outside.lock", "leads out of the workspace"),
    ("/etc/hostname", "absolute path"),
    ("../dtbuild-out/p/x", "holds outputs"),
    ("sub", "is a directory"),
    ("big.lock", "more than the 1024"),
])
def test_reads_the_engine_refuses_are_errors_at_the_build_line(ws: Path, path: str, why: str) -> None:
    _write(ws, {"p/BUILD": f'reader(name = "r", path = "{path}")\n', "p/sub/keep": "",
                "p/big.lock": "x" * 2000, "dtbuild-out/p/x": "made\n"})
    with pytest.raises(RuleError, match=why) as raised:
        _outputs(ws)
    error = raised.value
    assert str(error.location).startswith(str(ws / "p/BUILD") + ":1") or "p/BUILD:1" in str(error.location)
    assert error.target == "//p:r"


def test_a_symlink_inside_the_workspace_is_read(ws: Path) -> None:
    _write(ws, {"shared/real.lock": "linked\n"})
    lock = ws / "p/name.lock"
    lock.unlink()
    lock.symlink_to("../shared/real.lock")
    assert _outputs(ws) == ["dtbuild-out/p/linked.txt"]


def test_the_read_is_recorded_on_the_target_and_is_no_action_input(ws: Path) -> None:
    session = Session(find_workspace(str(ws)))
    labels = session.expand(["//p:r"])
    result = session.analyze(labels)
    import hashlib

    target = result.targets[labels[0]]
    assert target.files_read == (("p/name.lock", hashlib.sha256(b"first\n").hexdigest()),)
    assert all(art.path != "p/name.lock" for action in target.actions for arts in action.inputs.values()
               for art in arts)
