"""Both installs work: the editable one the suite runs on, and a normal wheel install
(the package-dir mapping of engine/, rules/ and plugins/ to dtbuild.* must hold in
both)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_editable_install_imports_from_the_work_tree() -> None:
    import dtbuild.engine.cli
    import dtbuild.plugins.builtin
    import dtbuild.rules.api

    assert Path(dtbuild.engine.cli.__file__).resolve() == ROOT / "engine" / "cli.py"
    assert Path(dtbuild.rules.api.__file__).resolve() == ROOT / "rules" / "api.py"
    assert Path(dtbuild.plugins.builtin.__file__).resolve() == ROOT / "plugins" / "builtin" / "__init__.py"


@pytest.mark.slow
def test_a_wheel_installs_and_builds(tmp_path: Path, write_workspace) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(wheels.glob("dtbuild-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("dtbuild/engine/cli.py", "dtbuild/rules/api.py", "dtbuild/rules/builtin/image.py",
                     "dtbuild/plugins/hookspecs.py", "dtbuild/plugins/builtin/layertar.py",
                     "dtbuild/engine/py.typed", "dtbuild/rules/py.typed", "dtbuild/plugins/py.typed"):
        assert expected in names, f"{expected} is missing from the wheel"
    assert not any(n.startswith(("tests/", "engine/", "dtbuild/__init__.py")) for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # The installed copy, not the work tree: dependencies come from this interpreter's site-packages.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]),
           "PYTHONNOUSERSITE": "1", "DTBUILD_CACHE_DIR": str(tmp_path / "cache")}
    ws = write_workspace({"pkg/BUILD": 'genrule(name = "g", outs = ["g.txt"], cmd = "echo wheel > $OUT")\n'})
    probe = "import dtbuild.engine.cli as c, sys; print(c.__file__); sys.exit(c.main(['build', '//pkg:g']))"
    done = subprocess.run([sys.executable, "-S", "-c", probe], cwd=ws, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(target))
    assert (ws / "dtbuild-out" / "pkg" / "g.txt").read_text() == "wheel\n"
