"""A hostile ``run_as_root`` script in the ``vm`` executor, the one documented for untrusted
scripts, does not reach the host through the VM's 9p shares.

The script is root in the guest and escapes its chroot through ``/proc/1/root`` (the
guest's init), so it sees every 9p share the guest mounted (``/proc/1/mounts``) and mounts
any share that is free itself. It then

* plants a setuid-root file, a setgid directory, a file owned by another uid, block and
  character devices and a fifo in each share, and waits for the test to look at the host
  while the VM still runs (the job's scratch directory is removed afterwards);
* replaces the files the host reads after the VM stops (its log, status, message,
  opaque-directory list and layer tar) with symbolic links to a root-only host file, or
  its log with a fifo, and fails.

The host must show none of it: no setuid, setgid, device or fifo file under the test's
directory (workspace, ``dtbuild-out/``, cache) or new in ``/tmp``, no file the guest made
owned by another user, a canary file unchanged, its secret never printed, and an error
saying that the guest misbehaved. Each build boots a VM (about 16 s under TCG).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

APPLETS = ["sh", "cat", "echo", "id", "ls", "mkdir", "rm", "chown", "chmod", "stat", "test", "touch", "sleep",
           "tail", "cut", "tr"]
SECRET = "dtbuild-canary-secret-4f1c9a"
VM_TIMEOUT = 600.0

#: Escape the chroot (PID 1 is the guest's init, outside it) and list every 9p share the
#: guest can see: the ones init mounted, and any free one this script mounts itself.
FIND_SHARES = r"""
set +e
bb=/bin/busybox
shares=""
for p in $($bb awk '$3 == "9p" {print $2}' /proc/1/mounts); do
  shares="$shares /proc/1/root$p"
done
mine=""
for f in /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag; do
  tag=$($bb tr -d '\000' < "$f")
  $bb mkdir -p "/mnt-9p/$tag"
  if $bb mount -t 9p -o trans=virtio,version=9p2000.L "$tag" "/mnt-9p/$tag" 2>/dev/null; then
    shares="$shares /mnt-9p/$tag"
    mine="$mine /mnt-9p/$tag"
  fi
done
echo "9p shares seen by the script: $shares"
"""

PLANT = FIND_SHARES + r"""
planted=""
for d in $shares; do
  $bb cp /bin/busybox "$d/guest-suid-root" 2>/dev/null && $bb chmod 4755 "$d/guest-suid-root" \
    && echo "setuid-root file made in $d"
  $bb cp /bin/busybox "$d/guest-suid-other" 2>/dev/null && $bb chown 4321:4321 "$d/guest-suid-other" \
    && $bb chmod 6755 "$d/guest-suid-other"
  $bb mkdir "$d/guest-sgid-dir" 2>/dev/null && $bb chmod 2777 "$d/guest-sgid-dir"
  $bb mknod "$d/guest-block" b 8 0 2>/dev/null && echo "block device made in $d"
  $bb mknod "$d/guest-char" c 1 1 2>/dev/null && echo "character device made in $d"
  $bb mkfifo "$d/guest-fifo" 2>/dev/null
  if $bb touch "$d/guest-planted" 2>/dev/null; then planted="$planted $d"; fi
done
# Keep the VM running until the test has looked at the host (or two minutes passed).
if [ -n "$planted" ]; then
  i=0
  while [ $i -lt 600 ]; do
    for d in $planted; do [ -e "$d/guest-continue" ] && i=600; done
    i=$((i + 1))
    $bb sleep 0.2
  done
fi
for d in $mine; do $bb umount "$d"; done
$bb rm -rf /mnt-9p
echo 'planted everything it could'
"""

#: @CANARY@ is replaced by the canary's host path.
REPLACE_WITH_SYMLINKS = FIND_SHARES + r"""
for d in $shares; do
  for f in log status message opaque upper.tar; do
    $bb rm -f "$d/$f" 2>/dev/null && $bb ln -s @CANARY@ "$d/$f" 2>/dev/null \
      && echo "replaced $d/$f with a symlink"
  done
done
for d in $mine; do $bb umount "$d"; done
exit 4
"""

REPLACE_LOG_WITH_FIFO = FIND_SHARES + r"""
for d in $shares; do
  if [ -e "$d/log" ]; then $bb rm -f "$d/log" && $bb mkfifo "$d/log" && echo "the log in $d is a fifo"; fi
done
for d in $mine; do $bb umount "$d"; done
exit 5
"""


def _add_busybox(ws: Path) -> None:
    bindir = ws / "base" / "rootfs" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", bindir / "busybox")
    for applet in APPLETS:
        (bindir / applet).symlink_to("busybox")


def _starlark_string(text: str) -> str:
    return '"""' + text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"') + '"""'


@pytest.fixture
def vm_ws(workspace, require_tool) -> Path:
    require_tool("busybox")
    require_tool("qemu-system-x86_64")
    ws = workspace("root_layers")
    _add_busybox(ws)
    return ws


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    """A root-only host file (mode 0600) holding :data:`SECRET`; checked unchanged after."""
    path = tmp_path / "canary"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    before = path.lstat()
    yield path
    after = path.lstat()
    assert path.read_text() == SECRET + "\n"
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns, after.st_ino) == (
        before.st_mode, before.st_uid, before.st_gid, before.st_mtime_ns, before.st_ino), "the canary changed"


def _write_target(ws: Path, name: str, script: str) -> str:
    (ws / "attack").mkdir(exist_ok=True)
    with open(ws / "attack" / "BUILD", "a") as f:
        f.write(f'root_layer(\n    name = "{name}",\n    from_image = "//base:busybox",\n'
                f'    executor = "vm",\n    run_as_root = {_starlark_string(script)},\n)\n')
    return f"//attack:{name}"


def _walk(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            try:
                yield path, path.lstat()
            except OSError:
                continue


def _dangerous(tmp_path: Path, since: float) -> list[str]:
    """Setuid, setgid or device files (and fifos, and files a guest made owned by another
    user) under the test's directory, and setuid/setgid/device files new in /tmp."""
    found = []
    for path, st in _walk(tmp_path):
        mode = st.st_mode
        if mode & (stat.S_ISUID | stat.S_ISGID) or stat.S_ISBLK(mode) or stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
            found.append(f"{path} {stat.filemode(mode)} {st.st_uid}:{st.st_gid}")
        elif path.name.startswith("guest-") and st.st_uid != os.geteuid():
            found.append(f"{path} owned by {st.st_uid}:{st.st_gid}")
    for top in Path("/tmp").iterdir():
        try:
            if top.name.startswith("pytest-of-") or top.lstat().st_ctime < since:
                continue
        except OSError:
            continue
        for path, st in [(top, top.lstat()), *(_walk(top) if top.is_dir() and not top.is_symlink() else [])]:
            if st.st_ctime >= since and (st.st_mode & (stat.S_ISUID | stat.S_ISGID) or stat.S_ISBLK(st.st_mode)
                                         or stat.S_ISCHR(st.st_mode)):
                found.append(f"{path} {stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid}")
    return found


def test_a_guest_plants_no_setuid_file_device_or_foreign_owner_on_the_host(vm_ws, run_dtbuild, tmp_path, canary,
                                                                            reaped) -> None:
    target = _write_target(vm_ws, "plant", PLANT)
    since = time.time() - 1
    proc = run_dtbuild.popen(vm_ws, "build", target, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reaped.append(proc)
    deadline = time.monotonic() + VM_TIMEOUT
    while_running: list[str] = []
    looked = False
    while proc.poll() is None and time.monotonic() < deadline:
        markers = [p for p, _ in _walk(run_dtbuild.cache_dir) if p.name == "guest-planted"]
        if markers:
            while_running = _dangerous(tmp_path, since)
            looked = True
            for marker in markers:
                (marker.parent / "guest-continue").touch()
            break
        time.sleep(0.1)
    output = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].decode("utf-8", "replace")
    assert proc.returncode == 0, output
    assert looked, f"the script wrote its marker into no share the host has:\n{output}"
    assert while_running == [], "while the VM ran:\n" + "\n".join(while_running)
    after = _dangerous(tmp_path, since)
    assert after == [], "after the build:\n" + "\n".join(after)


def test_a_guest_that_replaces_its_log_and_status_with_symlinks_leaks_nothing(vm_ws, run_dtbuild, canary) -> None:
    target = _write_target(vm_ws, "symlinks", REPLACE_WITH_SYMLINKS.replace("@CANARY@", str(canary)))
    code, out, err = run_dtbuild(vm_ws, "build", target, timeout=VM_TIMEOUT)
    assert code == 1, out + err
    assert SECRET not in out + err
    assert "misbehaved" in err and "symbolic link" in err, err


def test_a_guest_that_replaces_its_log_with_a_fifo_does_not_hang_the_build(vm_ws, run_dtbuild) -> None:
    target = _write_target(vm_ws, "fifo", REPLACE_LOG_WITH_FIFO)
    code, out, err = run_dtbuild(vm_ws, "build", target, timeout=VM_TIMEOUT / 2)
    assert code == 1, out + err
    assert "misbehaved" in err and "fifo" in err, err
