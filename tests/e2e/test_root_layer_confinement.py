"""run_as_root cannot reach the host (namespace executor): a hostile script looks for the
host through /proc (``/proc/1/root``, ``/proc/self/root``, ``/proc/*/cwd``), writes a
host canary through every path it finds, reads /etc/shadow, tries mknod, mount and a
sysctl, and writes what it saw into the layer, which the test reads. A hostile base
image holds a setuid-root binary and block devices: none of them is ever reachable on
the host, and the layer still carries the setuid bits the script set. The script and
extra_commands run with umask 022 and a fixed environment, and a build killed with
SIGKILL leaves no script running.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

APPLETS = ["sh", "cat", "echo", "ls", "mkdir", "rm", "chmod", "chown", "cp", "touch", "sleep", "test", "mknod",
           "mount", "env", "sort", "tr", "grep", "stat", "id", "true", "find", "head", "readlink"]

CAP_SYS_ADMIN, CAP_MKNOD, CAP_SYS_PTRACE, CAP_SYS_MODULE, CAP_DAC_READ_SEARCH, CAP_SYS_RAWIO = 21, 27, 19, 16, 2, 17


def _busybox_root(ws: Path) -> None:
    bindir = ws / "base" / "rootfs" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", bindir / "busybox")
    for applet in APPLETS:
        (bindir / applet).symlink_to("busybox")


@pytest.fixture
def rl_ws(workspace, require_tool) -> Path:
    for tool in ("busybox", "unshare", "setpriv"):
        require_tool(tool)
    if os.geteuid() != 0:
        pytest.skip("the hostile-script tests compare with what root can reach on the host")
    ws = workspace("root_layers")
    _busybox_root(ws)
    return ws


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    """A root-only host file whose content, owner, mode and mtime must not change."""
    directory = tmp_path / "host-canary"
    directory.mkdir(mode=0o755)
    path = directory / "canary"
    path.write_text("untouched\n")
    os.chmod(path, 0o600)
    os.utime(path, (1_000_000, 1_000_000))
    before = path.stat()
    yield path
    after = path.stat()
    assert path.read_text() == "untouched\n"
    assert (after.st_uid, after.st_gid, after.st_mode, after.st_mtime_ns) == \
        (before.st_uid, before.st_gid, before.st_mode, before.st_mtime_ns)
    assert sorted(os.listdir(directory)) == ["canary"], "a file appeared next to the canary"


def _layer_text(layer: Path, name: str) -> str:
    with tarfile.open(layer) as tar:
        member = tar.extractfile(name)
        assert member is not None, f"{name} is not in the layer"
        return member.read().decode("utf-8", "replace")


def _sections(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("== "):
            current = line[3:].strip()
            out[current] = ""
        else:
            out[current] = out.get(current, "") + line + "\n"
    return out


def _hostile_script(canary: Path, marker: str) -> str:
    """Every attempt is allowed to fail; what it saw goes to /found (in the layer)."""
    return f"""
exec > /found 2>&1
echo "== shadow"; cat /proc/1/root/etc/shadow || true
echo "== proc1root"; ls -A /proc/1/root/ || true
echo "== selfroot"; ls -A /proc/self/root/ || true
echo "== canary"; cat {canary} || true
for p in /proc/1/root /proc/self/root /proc/*/root /proc/*/cwd /proc/*/cwd/.. ; do
  echo escaped > "$p{canary}" 2>/dev/null && echo "WRO""TE $p{canary}"
  echo escaped > "$p{canary.parent}/{marker}" 2>/dev/null && echo "WRO""TE $p{canary.parent}/{marker}"
  echo escaped > "$p/tmp/{marker}" 2>/dev/null && echo "WRO""TE $p/tmp/{marker}"
done
echo "== mknod"; mknod /dev-node b 8 0 && echo MKNOD-OK; rm -f /dev-node
echo "== mount"; mkdir -p /mnt-test; mount -t tmpfs none /mnt-test && echo MOUNT-OK; rmdir /mnt-test || true
echo "== sysctl"
v=$(cat /proc/sys/kernel/printk_ratelimit) && echo "$v" > /proc/sys/kernel/printk_ratelimit && echo SYSCTL-OK
echo "== sysrq"; echo h > /proc/sysrq-trigger 2>/dev/null && echo SYSRQ-OK
echo "== cmdlines"; cat /proc/[0-9]*/cmdline | tr '\\\\0' ' '; echo
echo "== status"; cat /proc/self/status
echo "== dev"; ls -A /dev
echo "== userns"; readlink /proc/self/ns/user
echo "== end"
true
"""


def test_a_hostile_script_sees_and_changes_nothing_of_the_host(rl_ws, run_dtbuild, canary, cache_dir) -> None:
    marker = f"escaped-{uuid.uuid4().hex}"
    (rl_ws / "hostile").mkdir()
    (rl_ws / "hostile" / "BUILD").write_text(
        f'root_layer(name = "hostile", from_image = "//base:busybox", run_as_root = """'
        f'{_hostile_script(canary, marker)}""")\n')
    run_dtbuild(rl_ws, "build", "//hostile:hostile", check=True)
    found = _sections(_layer_text(rl_ws / "dtbuild-out" / "hostile" / "hostile.tar", "found"))
    assert "root:" not in found["shadow"], "the script read the host's /etc/shadow"
    image_root = {"bin", "etc", "srv", "dev", "proc", "sys", "found", ".dtbuild-toolbox"}
    assert set(found["proc1root"].split()) <= image_root, found["proc1root"]
    assert set(found["selfroot"].split()) <= image_root, found["selfroot"]
    assert "untouched" not in found["canary"]
    for p in [f"/tmp/{marker}", str(canary.parent / marker), f"/{marker}"]:
        assert not os.path.lexists(p), f"the script wrote {p} on the host"
    assert "MKNOD-OK" not in found["mknod"]
    assert "MOUNT-OK" not in found["mount"]
    assert "SYSCTL-OK" not in found["sysctl"]
    assert "SYSRQ-OK" not in found["sysrq"]
    assert "python" not in found["cmdlines"] and "dtbuild" not in found["cmdlines"], found["cmdlines"]
    status = dict(line.split(":", 1) for line in found["status"].splitlines() if ":" in line)
    assert status["NoNewPrivs"].strip() == "1"
    for field in ("CapBnd", "CapEff", "CapPrm"):
        caps = int(status[field].strip(), 16)
        for cap in (CAP_SYS_ADMIN, CAP_MKNOD, CAP_SYS_PTRACE, CAP_SYS_MODULE, CAP_DAC_READ_SEARCH, CAP_SYS_RAWIO):
            assert not caps & (1 << cap), f"{field} holds capability {cap}"
    assert int(status["CapInh"].strip(), 16) == 0
    assert set(found["dev"].split()) <= {"null", "zero", "full", "random", "urandom", "tty", "fd", "stdin",
                                         "stdout", "stderr", "ptmx", "pts", "shm"}
    assert "WROTE" not in "".join(found.values()), "the script wrote a host path"
    if subprocess.run(["unshare", "--user", "true"], capture_output=True).returncode == 0:
        assert found["userns"].strip() != os.readlink("/proc/self/ns/user"), "not in a user namespace of its own"


# --------------------------------------------------------------------------- a hostile base image


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
            linkname: str = "", dev: tuple[int, int] = (0, 0)) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = kind, mode, linkname, 7
    info.devmajor, info.devminor = dev
    info.size = len(data)
    return info, data


def _hostile_base_archive() -> bytes:
    """A docker-archive whose one layer holds busybox, a setuid-root binary, block
    devices (one in /dev, one elsewhere) and a FIFO."""
    d, busybox = tarfile.DIRTYPE, Path("/bin/busybox").read_bytes()
    members = [_member("bin/", d, mode=0o755), _member("bin/busybox", data=busybox, mode=0o755)]
    members += [_member(f"bin/{a}", tarfile.SYMTYPE, linkname="busybox", mode=0o777) for a in APPLETS]
    members += [
        _member("etc/", d, mode=0o755), _member("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        _member("usr/", d, mode=0o755), _member("usr/bin/", d, mode=0o755),
        _member("usr/bin/suid-tool", data=busybox, mode=0o4755),
        _member("usr/bin/sgid-tool", data=b"#!/bin/sh\n", mode=0o2755),
        _member("dev/", d, mode=0o755), _member("dev/sda", tarfile.BLKTYPE, mode=0o660, dev=(8, 0)),
        _member("srv/", d, mode=0o755), _member("srv/disk", tarfile.BLKTYPE, mode=0o666, dev=(7, 0)),
        _member("srv/kmem", tarfile.CHRTYPE, mode=0o666, dev=(1, 2)),
        _member("srv/pipe", tarfile.FIFOTYPE, mode=0o644),
    ]
    layer = _tar_bytes(members)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
                         "history": [{"created_by": "hostile"}]}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["hostile:1"], "Layers": ["l/layer.tar"]}]).encode()
    return _tar_bytes([_member("manifest.json", data=manifest), _member(config_name, data=config),
                       _member("l/layer.tar", data=layer)])


def _privileged_files(root: Path) -> list[str]:
    """Setuid/setgid files and device nodes under ``root``, each as "path mode" (and
    "major,minor" for devices)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            device = (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode))
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID) and stat.S_ISREG(st.st_mode):
                found.append(f"{path} {stat.filemode(st.st_mode)}")
            elif device:
                found.append(f"{path} {stat.filemode(st.st_mode)} {os.major(st.st_rdev)},{os.minor(st.st_rdev)}")
    return found


def _reachable_by_others(path: str, top: Path) -> bool:
    """Whether every directory from ``top`` down to ``path`` is searchable by others."""
    parent = Path(path).parent
    while True:
        try:
            if not parent.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
        if parent == top or top not in parent.parents:
            return True
        parent = parent.parent


def test_a_setuid_binary_and_devices_of_the_base_never_reach_the_host(rl_ws, run_dtbuild, cache_dir, reaped,
                                                                      tmp_path) -> None:
    (rl_ws / "evil").mkdir()
    (rl_ws / "evil" / "base.tar").write_bytes(_hostile_base_archive())
    (rl_ws / "evil" / "BUILD").write_text('''
image_archive(name = "base", src = "base.tar")

root_layer(
    name = "layer",
    from_image = ":base",
    run_as_root = """
touch /started-marker
stat -c '%a' /usr/bin/suid-tool /usr/bin/sgid-tool > /modes-seen
cp /bin/busybox /usr/bin/new-suid && chmod 4755 /usr/bin/new-suid
chmod 4750 /usr/bin/suid-tool
ls -A /srv > /srv-seen
sleep 2
""",
)
''')
    proc = run_dtbuild.popen(rl_ws, "build", "//evil:layer", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reaped.append(proc)
    # While the script runs: the base's setuid binaries are in the overlay's lower
    # directory, but no other user can reach them, and there are no devices at all.
    deadline = time.monotonic() + 120
    while not list((cache_dir / "tmp").glob("*/scratch/seed/started-marker")):
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, "the script did not start"
        time.sleep(0.05)
    during = _privileged_files(cache_dir)
    assert [f for f in during if "/lower/usr/bin/suid-tool " in f], "the check did not see the base's tree"
    reachable = [f for f in during if _reachable_by_others(f.split()[0], cache_dir)]
    assert reachable == [], reachable
    devices = [f for f in during if f.split()[1][0] in "bc" and not f.endswith(" 0,0")]
    assert devices == [], devices
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()
    # After: nothing setuid, setgid or a device in the cache, the workspace (dtbuild-out)
    # or anywhere else under the test's directory.
    assert _privileged_files(tmp_path) == []
    layer = rl_ws / "dtbuild-out" / "evil" / "layer.tar"
    listing = subprocess.run(["tar", "-tvf", str(layer)], capture_output=True, text=True, check=True).stdout
    modes = {line.split()[-1]: line.split()[0] for line in listing.splitlines()}
    assert modes["usr/bin/new-suid"] == "-rwsr-xr-x"
    assert modes["usr/bin/suid-tool"] == "-rwsr-x---"
    assert "srv/disk" not in modes and "dev/sda" not in modes
    assert _layer_text(layer, "modes-seen").split() == ["4755", "2755"]  # the script sees the base's bits
    assert _layer_text(layer, "srv-seen").split() == ["pipe"]  # devices are not in the overlay


# --------------------------------------------------------------------------- umask, environment, kill -9


def test_script_and_extra_commands_get_umask_022_and_a_fixed_environment(rl_ws, run_dtbuild, canary) -> None:
    (rl_ws / "env").mkdir()
    (rl_ws / "env" / "BUILD").write_text(f'''
root_layer(
    name = "layer",
    from_image = "//base:busybox",
    run_as_root = "umask > /script-umask; env | sort > /script-env; touch /script-file; mkdir /script-dir",
    extra_commands = "umask > extra-umask; env | sort > extra-env; touch extra-file; mkdir extra-dir; " +
        "(echo escaped > {canary}) 2>/dev/null || true; (cat /etc/shadow > shadow) 2>/dev/null || true",
)
''')
    run_dtbuild(rl_ws, "build", "//env:layer", check=True, umask=0o077,
                env={"LEAKED_SECRET": "hunter2", "LD_PRELOAD": "", "TMPDIR": "/somewhere"})
    layer = rl_ws / "dtbuild-out" / "env" / "layer.tar"
    with tarfile.open(layer) as tar:
        members = {m.name: m for m in tar.getmembers()}
    for who in ("script", "extra"):
        assert _layer_text(layer, f"{who}-umask").strip() == "0022"
        assert members[f"{who}-file"].mode == 0o644 and members[f"{who}-dir"].mode == 0o755
        env = _layer_text(layer, f"{who}-env")
        assert "LEAKED_SECRET" not in env and "LD_PRELOAD" not in env and "/somewhere" not in env, env
    # extra_commands are confined to the layer's directory (the canary fixture checks the host).
    assert "shadow" not in members or "root:" not in _layer_text(layer, "shadow")
    assert sorted(line.split("=", 1)[0] for line in _layer_text(layer, "script-env").splitlines()) == \
        ["HOME", "PATH", "PWD", "SHLVL", "SOURCE_DATE_EPOCH", "TZ"]


def _sleepers() -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if Path(f"/proc/{name}/cmdline").read_bytes() == b"sleep\x00600\x00":
                    pids.append(int(name))
            except OSError:
                continue
    return pids


def test_kill_9_of_dtbuild_stops_the_script(rl_ws, run_dtbuild, cache_dir, reaped) -> None:
    proc = run_dtbuild.popen(rl_ws, "build", "//app:sleeper", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reaped.append(proc)
    deadline = time.monotonic() + 120
    while not (list((cache_dir / "tmp").glob("*/scratch/seed/started-marker")) and _sleepers()):
        assert proc.poll() is None, "the build ended before the script started"
        assert time.monotonic() < deadline, "the script did not start"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup code of dtbuild runs
    proc.wait()
    deadline = time.monotonic() + 30
    while _sleepers():
        assert time.monotonic() < deadline, "the script still runs after dtbuild was killed"
        time.sleep(0.05)
    with open("/proc/self/mountinfo") as f:
        assert str(cache_dir) not in f.read(), "a mount of the build is still there"
