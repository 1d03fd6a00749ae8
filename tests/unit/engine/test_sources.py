"""Source files as execution reads them: the same rules as analysis, checked again
because the tree may change between the two."""

from __future__ import annotations

from pathlib import Path

import pytest
from dtbuild.engine.errors import ActionError
from dtbuild.engine.sources import SourceDigests, source_problem

CANARY = b"CANARY-root-only-5b1f0c7e\n"


def _canary(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(CANARY)
    secret.chmod(0o600)
    return secret


def test_source_digests_refuse_a_directory_swapped_for_a_link_after_analysis(tmp_path) -> None:
    """Execution re-checks what analysis checked: the tree may change in between."""
    secret = _canary(tmp_path)
    root = tmp_path / "ws"
    (root / "link_dir").mkdir(parents=True)
    (root / "link_dir" / "secret").write_text("harmless\n")
    digests = SourceDigests(str(root), str(root / "dtbuild-out" / ".dtbuild"))
    assert digests.get("link_dir/secret").size == len("harmless\n")
    fresh = SourceDigests(str(root), str(root / "dtbuild-out" / ".dtbuild"))
    (root / "link_dir" / "secret").unlink()
    (root / "link_dir").rmdir()
    (root / "link_dir").symlink_to(secret.parent)
    with pytest.raises(ActionError, match="outside the workspace"):
        fresh.get("link_dir/secret")


def test_source_problem_names_what_is_wrong(tmp_path) -> None:
    secret = _canary(tmp_path)
    root = tmp_path / "ws"
    (root / "real").mkdir(parents=True)
    (root / "real" / "f").write_text("x")
    (root / "inside").symlink_to("real")
    (root / "out").symlink_to(secret.parent)
    (root / "link").symlink_to(secret)
    import os

    os.mkfifo(root / "fifo")
    assert source_problem(str(root), "inside/f") is None
    assert source_problem(str(root), "link") is None  # kept as a symlink
    assert "outside the workspace" in (source_problem(str(root), "out/secret") or "")
    assert "outside the workspace" in (source_problem(str(root), "../outside/secret") or "")
    assert "outside the workspace" in (source_problem(str(root), str(secret)) or "")
    assert "neither a regular file nor a symlink" in (source_problem(str(root), "fifo") or "")
    assert source_problem(str(root), "missing") == "it does not exist"
