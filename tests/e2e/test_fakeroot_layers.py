"""fakeroot_commands and enable_fakechroot of layered_image, checked as a user would:
``tar -tvf`` on the customisation layer, umoci unpacking the image and runc running it.

Owners, modes and device nodes made under fakeroot reach the layer's tar headers
whoever runs the build: as root, and as an ordinary user (``nobody``, through
``setpriv``, on a copy of the workspace and a cache it owns), which gives the same
bytes. fakeroot's ``mknod`` never makes a real device: on disk it is an empty file.
Under enable_fakechroot the commands see a /dev, /proc and /sys, none of which lands in
the layer.

The nobody runs go through tests/nobody.py (an interpreter whose sandboxed helper
programs import dtbuild too).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from dtbuild.plugins.builtin.layertar import LayerEntry, write_layer
from nobody import dtbuild_as_nobody

pytestmark = pytest.mark.e2e

BUSYBOX_APPLETS = ["cat", "ls", "stat", "mkdir", "touch", "chown", "mknod", "mkfifo", "test"]

IMAGES = '''
files(
    name = "site",
    srcs = ["site/srv/index.html"],
    strip_prefix = "site",
)

# The issue's example: an owner, a mode and a character device, made under fakeroot.
layered_image(
    name = "devices",
    tag = "v1",
    contents = ["//base:sh", ":site"],
    fakeroot_commands = "chown 33:44 srv && chmod 750 srv && mkdir dev && mknod -m 600 dev/x c 1 3",
    config = {
        "User": "33:44",  # only srv's owner may enter it
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["stat -c '%u:%g %a %n' /srv /srv/index.html; cat /srv/index.html"],
    },
    compressor = "none",
)

# What fakeroot's mknod leaves on disk, seen without fakeroot (LD_PRELOAD unset).
layered_image(
    name = "on_disk",
    contents = ["//base:sh"],
    fakeroot_commands = "mknod -m 600 x c 1 3 && env -u LD_PRELOAD stat -c %F x > on-disk && rm x",
    compressor = "none",
)

layered_image(
    name = "chrooted",
    contents = ["//base:sh", ":site"],
    fakeroot_commands = "echo x > /dev/null && ls /proc/self > /dev/null && test -d /sys && ls /sys > /dev/null" +
                        " && cat /srv/index.html > /made",
    enable_fakechroot = True,
    compressor = "none",
)

[layered_image(
    name = name,
    contents = ["//base:sh"],
    fakeroot_commands = command,
    compressor = "none",
) for name, command in [("block", "mknod -m 600 disk b 8 0"), ("fifo", "mkfifo pipe")]]
'''


@pytest.fixture
def ws(workspace, require_tool) -> Path:
    """The layered fixture with busybox in //base:busybox (/bin/sh through //base:sh) and
    the targets above in //images."""
    for tool in ("busybox", "fakeroot"):
        require_tool(tool)
    root = workspace("layered")
    bindir = root / "base" / "rootfs" / "bin"
    bindir.mkdir(parents=True)
    shutil.copy("/bin/busybox", bindir / "busybox")
    for applet in BUSYBOX_APPLETS:
        (bindir / applet).symlink_to("busybox")
    site = root / "images" / "site" / "srv"
    site.mkdir(parents=True)
    (site / "index.html").write_text("the site\n")
    build = root / "images" / "BUILD"
    build.write_text(build.read_text() + IMAGES)
    return root


def _description(ws: Path, name: str) -> dict:
    return json.loads((ws / "dtbuild-out" / "images" / f"{name}.json").read_text())


def _customisation_layer(ws: Path, name: str) -> Path:
    digest = _description(ws, name)["layers"][-1]["digest"]
    return ws / "dtbuild-out" / "images" / f"{name}.oci" / "blobs" / "sha256" / digest[7:]


def _tar_tv(layer: Path) -> list[str]:
    """``tar --numeric-owner -tvf`` lines without the date and time: mode, owner, size or
    device numbers, name."""
    done = subprocess.run(["tar", "--numeric-owner", "-tvf", str(layer)], capture_output=True, text=True,
                          check=True)
    lines = []
    for line in done.stdout.splitlines():
        mode, owner, size, _date, _time, name = line.split(None, 5)
        lines.append(f"{mode} {owner} {size} {name}")
    return lines


# --------------------------------------------------------------------------- building as nobody


def _build_as_nobody(ws: Path, run_dtbuild, home: Path, *targets: str) -> Path:
    """Build ``targets`` as nobody on a copy of ``ws`` in ``home`` with a cache there;
    returns the copy."""
    done = dtbuild_as_nobody(ws, run_dtbuild, home, ["build", *targets], timeout=600)
    assert done.returncode == 0, done.stderr
    return home / "ws"


def _build(ws: Path, run_dtbuild, require_tool, nobody_home: Path, builder: str, *targets: str) -> Path:
    """Build ``targets`` as this user or as nobody; returns the workspace built."""
    if builder == "self":
        run_dtbuild(ws, "build", *targets, check=True)
        return ws
    if os.geteuid() != 0:
        pytest.skip("builds as nobody, which needs root to set up (as an ordinary user, the 'self' case already "
                    "is one)")
    require_tool("setpriv")
    return _build_as_nobody(ws, run_dtbuild, nobody_home, *targets)


BUILDERS = pytest.mark.parametrize("builder", ["self", "nobody"])


# --------------------------------------------------------------------------- fakeroot_commands


@BUILDERS
def test_owners_modes_and_a_device_node_reach_the_layer_headers_and_the_image_runs(
        ws, run_dtbuild, require_tool, nobody_home, tmp_path, builder) -> None:
    for tool in ("tar", "umoci", "runc"):
        require_tool(tool)
    built = _build(ws, run_dtbuild, require_tool, nobody_home, builder, "//images:devices")
    layer = _customisation_layer(built, "devices")
    assert _tar_tv(layer) == [
        "drwxr-xr-x 0/0 0 dev/",
        "crw------- 0/0 1,3 dev/x",
        "drwxr-x--- 33/44 0 srv/",
    ]
    if builder == "nobody":  # the same layer whoever builds it
        run_dtbuild(ws, "build", "//images:devices", check=True)
        assert layer.read_bytes() == _customisation_layer(ws, "devices").read_bytes()
        assert _description(built, "devices") == _description(ws, "devices")
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{built / 'dtbuild-out' / 'images' / 'devices.oci'}:v1",
                    str(bundle)], check=True, capture_output=True)
    device = os.lstat(bundle / "rootfs" / "dev" / "x")
    assert stat.S_ISCHR(device.st_mode) and (os.major(device.st_rdev), os.minor(device.st_rdev)) == (1, 3)
    assert stat.S_IMODE(device.st_mode) == 0o600
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["terminal"] = False
    config_path.write_text(json.dumps(config))
    done = subprocess.run(["runc", "run", "-b", str(bundle), f"dtbuild-fakeroot-{os.getpid()}-{builder}"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["33:44 750 /srv", "0:0 644 /srv/index.html", "the site"]


def test_fakeroot_mknod_leaves_an_empty_file_on_disk(ws, run_dtbuild) -> None:
    run_dtbuild(ws, "build", "//images:on_disk", check=True)
    done = subprocess.run(["tar", "-xOf", str(_customisation_layer(ws, "on_disk")), "on-disk"],
                          capture_output=True, text=True, check=True)
    assert done.stdout == "regular empty file\n"


def test_a_device_entry_has_the_bytes_fakeroot_and_gnu_tar_give_it(require_tool, tmp_path) -> None:
    """nixpkgs writes the layer with ``tar`` under fakeroot: a device entry is those bytes."""
    for tool in ("fakeroot", "tar"):
        require_tool(tool)
    root = tmp_path / "root"
    root.mkdir()
    gnu = tmp_path / "gnu.tar"
    subprocess.run(["fakeroot", "sh", "-c", "mkdir dev && mknod -m 600 dev/x c 1 3 && tar --format=ustar "
                    f"--sort=name --mtime=@1 --owner=0 --group=0 --numeric-owner -cf {gnu} dev"],
                   cwd=root, check=True)
    ours = tmp_path / "ours.tar"
    with open(ours, "wb") as out:
        write_layer([LayerEntry("dev", "dir", 0o755), LayerEntry("dev/x", "char", 0o600, devmajor=1, devminor=3)],
                    tar_out=out)
    written = ours.read_bytes()
    assert gnu.read_bytes()[:len(written)] == written
    assert gnu.read_bytes()[len(written):].count(0) == len(gnu.read_bytes()) - len(written)  # record padding


@pytest.mark.parametrize(("name", "what"), [("block", "a block device"), ("fifo", "a fifo or socket")])
def test_what_a_layer_cannot_hold_is_a_clear_error(ws, run_dtbuild, name, what) -> None:
    code, _, err = run_dtbuild(ws, "build", f"//images:{name}")
    assert code == 1
    assert "images/BUILD:" in err and f"the commands made {what}; a layer holds only files" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- enable_fakechroot


@BUILDERS
def test_fakechroot_commands_have_dev_proc_and_sys_which_stay_out_of_the_layer(
        ws, run_dtbuild, require_tool, nobody_home, builder) -> None:
    require_tool("proot")
    built = _build(ws, run_dtbuild, require_tool, nobody_home, builder, "//images:chrooted")
    layer = _customisation_layer(built, "chrooted")
    assert _tar_tv(layer) == ["-rw-r--r-- 0/0 9 made"]
    done = subprocess.run(["tar", "-xOf", str(layer), "made"], capture_output=True, text=True, check=True)
    assert done.stdout == "the site\n"
