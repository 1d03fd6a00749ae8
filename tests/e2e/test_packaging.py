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


def _project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_license_file_is_the_declared_license() -> None:
    project = _project()
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:6] == ["Apache", "License", "Version", "2.0,", "January", "2004"]
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    # The license's own text, whole: the canonical file is 11358 bytes and 202 lines.
    assert len(text.encode()) == 11358 and text.count("\n") == 202


def test_exact_pins_are_the_compressors_and_their_versions_name_them() -> None:
    """A library is pinned exactly only when its output is part of image bytes; the
    compressor using it names that version in its VERSION (part of action keys), so the
    pin and the cache keys change together."""
    import re

    from dtbuild.plugins.builtin.compressors import BUILTIN_COMPRESSORS

    pins = {}
    for requirement in _project()["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][^,;\s]*)", requirement)
        if match:
            pins[match.group(1)] = match.group(2)
        else:
            assert "==" not in requirement, requirement
    versions = " ".join(cls.VERSION for cls in BUILTIN_COMPRESSORS)
    assert pins == {"zstandard": "0.25.0", "isal": "1.9.1"}
    for name, version in pins.items():
        assert f"{name}={version}" in versions, f"no compressor VERSION names {name}={version}: {versions}"
        from importlib.metadata import version as installed

        assert installed(name) == version, f"{name} {installed(name)} is installed, but pyproject pins {version}"


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
    # The license travels with the wheel, declared as an SPDX expression.
    with zipfile.ZipFile(wheel) as whl:
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        license_file = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        assert whl.read(license_file) == (ROOT / "LICENSE").read_bytes()
    assert "License-Expression: Apache-2.0\n" in metadata and "License-File: LICENSE\n" in metadata, metadata
    assert "Classifier: Typing :: Typed\n" in metadata and "Requires-Python: >=3.11\n" in metadata
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


# --------------------------------------------------------------------------- scripts/setup.sh


def _source_setup(command: str, **kwargs) -> subprocess.Popen[str]:
    """Run ``command`` in bash after sourcing scripts/setup.sh (which then only defines its functions)."""
    return subprocess.Popen(["bash", "-c", f'source "$1"; {command}', "bash", str(ROOT / "scripts" / "setup.sh")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, **kwargs)


def test_setup_waits_for_a_locked_apt_lock_then_goes_on(tmp_path: Path) -> None:
    import fcntl

    free, locked = tmp_path / "lock-frontend", tmp_path / "lock"
    free.touch()
    with open(locked, "w") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)  # as dpkg does: a POSIX lock, which flock(1) would not see
        waiter = _source_setup(f"wait_for_locks 120 {free} {locked} && echo 'setup: go on'")
        try:
            assert waiter.stdout is not None
            line = waiter.stdout.readline()
            assert line.startswith(f"setup: waiting for {locked}, locked by process {os.getpid()} ("), line
            assert waiter.poll() is None  # still waiting: the lock is held
        finally:
            fcntl.lockf(held, fcntl.LOCK_UN)
        out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert out == "setup: go on\n"


def test_setup_gives_up_on_a_lock_held_too_long_naming_the_holder(tmp_path: Path) -> None:
    import fcntl

    locked = tmp_path / "lock"
    with open(locked, "w") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)
        waiter = _source_setup(f"wait_for_locks 1 {locked}")
        _, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 1
    assert f"setup: {locked} is still locked by process {os.getpid()}" in err, err
    assert "let it finish, then run setup again" in err


def test_setup_goes_on_at_once_without_locks_and_apt_get_waits_too(tmp_path: Path) -> None:
    (tmp_path / "lock").touch()
    waiter = _source_setup(f"wait_for_locks 0 {tmp_path / 'lock'} {tmp_path / 'absent'} && echo free")
    out, err = waiter.communicate(timeout=60)
    assert (waiter.returncode, out) == (0, "free\n"), err
    script = (ROOT / "scripts" / "setup.sh").read_text()
    # apt-get itself waits as well, for the moment between the check and its own locking.
    assert 'apt-get -o "DPkg::Lock::Timeout=$APT_LOCK_TIMEOUT"' in script
    assert script.count('"${apt[@]}"') == 2  # update and install both use it
