"""Helpers for testing plugins: a throw-away workspace and a CLI run.

::

    from dtbuild.plugins.testing import FixtureWorkspace

    def test_my_rule(tmp_path):
        ws = FixtureWorkspace(tmp_path, plugins=["my_plugin.py"], files={
            "my_plugin.py": open("src/my_plugin.py").read(),
            "pkg/BUILD": 'my_rule(name = "x")',
        })
        result = ws.build("//pkg:x")
        assert result.exit_code == 0, result.stderr
        assert result.summary["actions"]["executed"] == 1
        assert ws.output("pkg/x").read_text() == "..."

The build runs the real CLI in a subprocess with a private cache, exactly as a user's
would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunResult:
    exit_code: int
    stdout: str
    stderr: str
    summary: dict[str, Any] = field(default_factory=dict)


class FixtureWorkspace:
    """A workspace under ``root`` with ``files`` (path -> text) and a dtbuild.toml that
    loads ``plugins`` (workspace-relative module paths)."""

    def __init__(self, root: str | os.PathLike[str], *, files: Mapping[str, str] = (),  # type: ignore[assignment]
                 plugins: Sequence[str] = (), cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / ".dtbuild-test-cache"
        self.root.mkdir(parents=True, exist_ok=True)
        modules = ", ".join(json.dumps(p) for p in plugins)
        (self.root / "dtbuild.toml").write_text(f"[plugins]\nmodules = [{modules}]\n")
        for rel, text in dict(files).items():
            self.write(rel, text)

    def write(self, rel: str, text: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def run(self, *args: str, env: Mapping[str, str] | None = None) -> RunResult:
        """Run ``dtbuild ARGS...`` in the workspace."""
        full_env = {**os.environ, "DTBUILD_CACHE_DIR": str(self.cache_dir), **(env or {})}
        done = subprocess.run([sys.executable, "-m", "dtbuild.engine.cli", *args], cwd=self.root, env=full_env,
                              capture_output=True, text=True)
        return RunResult(done.returncode, done.stdout, done.stderr)

    def build(self, *targets: str, jobs: int | None = None) -> RunResult:
        summary_path = self.root / ".dtbuild-test-summary.json"
        summary_path.unlink(missing_ok=True)
        args = ["build", *targets, "--summary-json", str(summary_path)]
        if jobs:
            args += ["--jobs", str(jobs)]
        result = self.run(*args)
        if summary_path.exists():
            result.summary = json.loads(summary_path.read_text())
        return result

    def output(self, rel: str) -> Path:
        """A path under dtbuild-out/ (``"pkg/name"``)."""
        return self.root / "dtbuild-out" / rel
