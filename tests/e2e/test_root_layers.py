"""Root layers (run_as_root) end to end: the script adds a user, creates /data owned by
it, deletes a file of the base and replaces a directory of the base; umoci unpacks the
image and runc runs it, and what runc shows is what a user checks. The same layer comes
out of the namespace executor as root, as an ordinary user, with fuse-overlayfs and in a
VM. No mount, directory or process is left behind, whatever happened.

The ordinary-user tests (namespace and VM) run the build as ``nobody`` in a workspace
and cache it owns (tests/nobody.py: subordinate ids and an interpreter for nobody).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nobody import dtbuild_as_nobody

pytestmark = pytest.mark.e2e

APPLETS = ["sh", "cat", "echo", "id", "ls", "mkdir", "rm", "chown", "chmod", "stat", "test", "touch", "sleep",
           "tail", "cut", "tr"]

#: What the fixture image's Cmd prints when the root layer did its job.
EXPECTED_RUN = [
    "uid=1000(app) gid=1000(app)",
    "1000:1000 750 /data",
    "1000:1000 644 /data/hello.txt",
    "owned by app",
    "motd: deleted",
    "index.html",
    "the new site",
    "copied to the root before the script ran",
]


def _add_busybox(ws: Path) -> None:
    bindir = ws / "base" / "rootfs" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", bindir / "busybox")
    for applet in APPLETS:
        (bindir / applet).symlink_to("busybox")


def _our_mounts(tmp_path: Path) -> set[str]:
    """Mounts a root layer could leave: overlays, fuse-overlayfs, 9p, or anything below
    the test's directory."""
    mounts = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in ("overlay", "fuse.fuse-overlayfs", "9p") or str(tmp_path) in fields[4]:
                mounts.add(line.strip())
    return mounts


@pytest.fixture(autouse=True)
def no_mount_left_behind(tmp_path: Path) -> Iterator[None]:
    before = _our_mounts(tmp_path)
    yield
    assert _our_mounts(tmp_path) - before == set(), "a mount was left behind"


@pytest.fixture
def rl_ws(workspace, require_tool) -> Path:
    require_tool("busybox")
    require_tool("unshare")
    ws = workspace("root_layers")
    _add_busybox(ws)
    return ws


def _layer_members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def _layer_file(path: Path, name: str) -> str:
    with tarfile.open(path) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read().decode()


def _run_image(layout: Path, bundle: Path) -> list[str]:
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:1", str(bundle)], check=True, capture_output=True)
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["terminal"] = False
    config_path.write_text(json.dumps(config))
    done = subprocess.run(["runc", "run", "-b", str(bundle), f"dtbuild-rl-{os.getpid()}-{bundle.name}"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _assert_nothing_left(cache: Path) -> None:
    tmp = cache / "tmp"
    assert not tmp.exists() or os.listdir(tmp) == [], f"left in the cache's tmp: {os.listdir(tmp)}"


def _layer_tar(ws: Path, image: str) -> Path:
    """The last layer of an image output, from its name.json."""
    desc = json.loads((ws / "dtbuild-out" / "app" / f"{image}.json").read_text())
    return ws / "dtbuild-out" / "app" / f"{image}.oci" / "blobs" / "sha256" / desc["layers"][-1]["digest"][7:]


def test_run_as_root_image_runs_in_runc_with_the_user_the_ownership_the_deletion_and_the_new_directory(
        rl_ws, run_dtbuild, require_tool, cache_dir, tmp_path) -> None:
    for tool in ("umoci", "runc"):
        require_tool(tool)
    build = run_dtbuild.build(rl_ws, "//app:app", "//app:layer", check=True)
    assert build.summary["targets"]["//app:app"]["manifest_digest"].startswith("sha256:")
    assert _run_image(rl_ws / "dtbuild-out" / "app" / "app.oci", tmp_path / "bundle") == EXPECTED_RUN

    layer = _layer_tar(rl_ws, "app")
    members = _layer_members(layer)
    assert members["etc/.wh.motd"].isreg() and members["etc/.wh.motd"].size == 0
    assert members["srv/www/.wh..wh..opq"].isreg()
    assert "srv/www/old.html" not in members and "etc/motd" not in members
    assert (members["data"].uid, members["data"].gid, members["data"].mode) == (1000, 1000, 0o750)
    assert not [m.name for m in members.values() if m.ischr() or m.isblk() or m.islnk()]
    assert "busybox" not in " ".join(members), "the base's files must not be in the new layer"
    assert {m.mtime for m in members.values()} == {1}
    # The root_layer target and image(run_as_root) make the same layer.
    assert (rl_ws / "dtbuild-out" / "app" / "layer.tar").read_bytes() == layer.read_bytes()
    _assert_nothing_left(cache_dir)


def test_same_inputs_hit_the_cache_and_a_new_script_reuses_the_unpacked_base(rl_ws, run_dtbuild) -> None:
    first = run_dtbuild.build(rl_ws, "//app:layer", check=True)
    assert first.executed > 0
    again = run_dtbuild.build(rl_ws, "//app:layer", check=True)
    assert again.executed == 0, again.stdout
    build = rl_ws / "app" / "BUILD"
    build.write_text(build.read_text().replace("echo 'the new site'", "echo 'the newer site'"))
    changed = run_dtbuild.build(rl_ws, "//app:layer", check=True)
    assert changed.executed == 1, changed.stdout  # RootLayerWrite only: the base stays unpacked
    assert "RootfsUnpack" not in changed.stdout
    layer = rl_ws / "dtbuild-out" / "app" / "layer.tar"
    assert _layer_file(layer, "srv/www/index.html") == "the newer site\n"


def test_a_failing_script_fails_the_build_with_its_output(rl_ws, run_dtbuild, cache_dir) -> None:
    code, _, err = run_dtbuild(rl_ws, "build", "//app:failing")
    assert code == 1
    assert "run_as_root exited with status 3" in err
    assert "the script failed on purpose" in err  # its stderr
    assert "app/BUILD:" in err
    _assert_nothing_left(cache_dir)


def test_no_network_unless_asked(rl_ws, run_dtbuild) -> None:
    (rl_ws / "net").mkdir()
    script = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' > /interfaces"
    (rl_ws / "net" / "BUILD").write_text(
        f'root_layer(name = "sealed", from_image = "//base:busybox", run_as_root = "{script}")\n'
        f'root_layer(name = "online", from_image = "//base:busybox", run_as_root = "{script}", network = True)\n')
    code, out, err = run_dtbuild(rl_ws, "build", "//net:sealed", "//net:online")
    assert code == 0, err
    sealed = _layer_file(rl_ws / "dtbuild-out" / "net" / "sealed.tar", "interfaces").split()
    online = _layer_file(rl_ws / "dtbuild-out" / "net" / "online.tar", "interfaces").split()
    assert sealed == ["lo"]
    host = sorted(os.listdir("/sys/class/net"))
    assert sorted(online) == host
    assert "//net:online: run_as_root may use the network: this layer is not reproducible" in out + err
    assert "//net:sealed: run_as_root may use" not in out + err


def _wait_for_marker(cache: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list((cache / "tmp").glob("*/scratch/seed/started-marker")):
            return
        if proc.poll() is not None:
            pytest.fail(f"the build ended (exit {proc.returncode}) before the script started")
        time.sleep(0.05)
    pytest.fail("the script did not start")


def _sleepers() -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline == b"sleep\x00600\x00":
                pids.append(int(name))
    return pids


def test_ctrl_c_stops_the_script_unmounts_and_removes_everything(rl_ws, run_dtbuild, cache_dir, tmp_path,
                                                                   reaped) -> None:
    err_path = tmp_path / "interrupted.err"
    with open(err_path, "wb") as err:
        proc = run_dtbuild.popen(rl_ws, "build", "//app:sleeper", stdout=subprocess.DEVNULL, stderr=err)
        reaped.append(proc)
        _wait_for_marker(cache_dir, proc)
        # The script writes its marker, then starts its sleep: on a loaded machine a moment later.
        deadline = time.monotonic() + 10
        while not _sleepers() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _sleepers(), "the script's sleep is not running"
        os.kill(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("dtbuild did not stop within 30 s of Ctrl-C")
    assert code == 1, err_path.read_text()
    assert "interrupted" in err_path.read_text()
    assert _sleepers() == []
    _assert_nothing_left(cache_dir)


# --------------------------------------------------------------------------- an ordinary user


def _build_as_nobody(ws: Path, run_dtbuild, home: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    """``dtbuild build TARGETS --keep-going`` as nobody, on a copy of ``ws`` in ``home``
    with a cache there; returns the run (the workspace copy is ``home/ws``)."""
    return dtbuild_as_nobody(ws, run_dtbuild, home, ["build", *targets, "--keep-going"])


def test_namespace_executor_as_an_ordinary_user_makes_the_same_layer(rl_ws, run_dtbuild, require_tool,
                                                                      nobody_home) -> None:
    for tool in ("setpriv", "newuidmap", "newgidmap"):
        require_tool(tool)
    run_dtbuild.build(rl_ws, "//app:layer", check=True)
    done = _build_as_nobody(rl_ws, run_dtbuild, nobody_home, "//app:layer", "//app:failing")
    assert done.returncode == 1, done.stderr  # //app:failing fails, //app:layer builds
    assert "the script failed on purpose" in done.stderr
    assert "the namespace executor cannot run here" not in done.stderr
    layer = nobody_home / "ws" / "dtbuild-out" / "app" / "layer.tar"
    assert layer.stat().st_uid == 65534
    assert layer.read_bytes() == (rl_ws / "dtbuild-out" / "app" / "layer.tar").read_bytes()
    _assert_nothing_left(nobody_home / "cache")


@pytest.mark.slow
def test_vm_executor_as_an_ordinary_user_makes_the_same_layer(rl_ws, run_dtbuild, require_tool,
                                                               nobody_home) -> None:
    for tool in ("setpriv", "newuidmap", "newgidmap", "qemu-system-x86_64"):
        require_tool(tool)
    run_dtbuild.build(rl_ws, "//app:layer", check=True)
    done = _build_as_nobody(rl_ws, run_dtbuild, nobody_home, "//app:layer_vm")
    assert done.returncode == 0, done.stderr
    layer = nobody_home / "ws" / "dtbuild-out" / "app" / "layer_vm.tar"
    assert layer.read_bytes() == (rl_ws / "dtbuild-out" / "app" / "layer.tar").read_bytes()
    _assert_nothing_left(nobody_home / "cache")


# --------------------------------------------------------------------------- other overlays and a VM


def test_fuse_overlayfs_makes_the_same_layer(rl_ws, run_dtbuild, require_tool, tmp_path) -> None:
    require_tool("fuse-overlayfs")
    run_dtbuild.build(rl_ws, "//app:layer", check=True)
    kernel = (rl_ws / "dtbuild-out" / "app" / "layer.tar").read_bytes()
    code, out, err = run_dtbuild(rl_ws, "build", "//app:layer", env={
        "DTBUILD_NAMESPACE_OVERLAY": "fuse", "DTBUILD_CACHE_DIR": str(tmp_path / "fuse-cache")})
    assert code == 0, err
    assert "using fuse-overlayfs" in out + err
    assert (rl_ws / "dtbuild-out" / "app" / "layer.tar").read_bytes() == kernel


@pytest.mark.slow
def test_vm_executor_makes_the_same_layer_and_the_image_runs(rl_ws, run_dtbuild, require_tool, cache_dir,
                                                            tmp_path) -> None:
    for tool in ("qemu-system-x86_64", "umoci", "runc"):
        require_tool(tool)
    started = time.monotonic()
    build = run_dtbuild.build(rl_ws, "//app:app_vm", "//app:layer_vm", check=True, timeout=900)
    vm_seconds = time.monotonic() - started
    out = rl_ws / "dtbuild-out" / "app"
    run_dtbuild.build(rl_ws, "//app:layer", check=True)
    assert (out / "layer_vm.tar").read_bytes() == (out / "layer.tar").read_bytes()
    probes = list((cache_dir / "vm").glob("kvm-probe-*.json"))
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert probes, "KVM was not probed"
    if not probes or not json.loads(probes[0].read_text())["usable"]:
        assert "the VM runs under TCG emulation" in build.stdout + build.stderr
    assert _run_image(out / "app_vm.oci", tmp_path / "bundle") == EXPECTED_RUN
    again = run_dtbuild.build(rl_ws, "//app:app_vm", check=True)
    assert again.executed == 0
    _assert_nothing_left(cache_dir)
    print(f"vm build of //app:app_vm: {vm_seconds:.1f} s")


def test_bad_attributes_are_reported_at_their_build_line(rl_ws, run_dtbuild) -> None:
    (rl_ws / "bad").mkdir()
    (rl_ws / "bad" / "BUILD").write_text(
        'root_layer(name = "typo", from_image = "//base:busybox", run_as_root = "true", executor = "nmespace")\n'
        'root_layer(name = "tiny", from_image = "//base:busybox", run_as_root = "true", build_vm_memory_size = 8)\n')
    code, _, err = run_dtbuild(rl_ws, "build", "//bad:typo")
    assert code == 2
    assert "bad/BUILD:1" in err and "'executor' attribute must be one of auto, local, namespace, vm" in err
    assert "did you mean 'namespace'?" in err
    code, _, err = run_dtbuild(rl_ws, "build", "//bad:tiny")
    assert code == 2
    assert "bad/BUILD:2" in err and "'build_vm_memory_size' attribute must be at least 128 (MiB), but was 8" in err
