"""BUILD.example stays valid: it loads and analyzes in a scratch workspace, and it
shows every built-in rule."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from dtbuild.engine.build import Session
from dtbuild.engine.workspace import find_workspace

ROOT = Path(__file__).resolve().parents[2]


def test_build_example_loads_and_analyzes(tmp_path: Path) -> None:
    (tmp_path / "dtbuild.toml").write_text("")
    shutil.copy(ROOT / "BUILD.example", tmp_path / "BUILD")
    (tmp_path / "rootfs" / "etc").mkdir(parents=True)
    (tmp_path / "rootfs" / "etc" / "motd").write_text("welcome\n")
    (tmp_path / "app.conf").write_text("mode = 1\n")
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "base.tar").write_bytes(b"")
    (tmp_path / "debian-archive-keyring.gpg").write_bytes(b"")
    session = Session(find_workspace(str(tmp_path)))
    labels = session.expand(["//:all"])
    analysis = session.analyze(labels)
    kinds = {t.decl.kind for t in analysis.targets.values()}
    builtin = set(session.registry.names()["rules"])
    assert kinds == builtin, f"BUILD.example does not show {sorted(builtin - kinds)}"
    assert analysis.actions, "analysis declared no actions"


def test_build_example_comments_every_rule() -> None:
    text = (ROOT / "BUILD.example").read_text()
    calls = set(re.findall(r"^([a-z_]+)\(", text, re.M))
    for rule in calls:
        assert re.search(rf"^# --- {rule}:", text, re.M), f"BUILD.example has no section for {rule}"
