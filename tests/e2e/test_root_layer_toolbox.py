"""run_as_root's toolbox end to end: an image built FROM scratch holding one static binary
(``/app``, compiled with ``cc -static``; no shell, no busybox) gets a user with
``SHADOW_SETUP`` + ``groupadd``/``useradd``, run by the toolbox's busybox sh with the
toolbox's wrappers. ``tar -tvf`` on the layer shows /etc/passwd, /etc/group and the home
directory and no trace of the toolbox or its mount point; umoci unpacks the image and runc
runs /app as the new user; ``id app`` runs in the bundle with a busybox copied into the
bundle only (the image itself needs no toolbox at run time). The same layer comes out as an
ordinary user, with fuse-overlayfs and in the VM; tools are on the script's PATH after the
image's own; a tool or busybox that changes re-runs the layer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nobody import dtbuild_as_nobody

pytestmark = pytest.mark.e2e

HELLO_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    printf("uid=%d gid=%d\n", (int)getuid(), (int)getgid());
    printf("%s\n", access("/bin/sh", F_OK) == 0 ? "/bin/sh exists" : "no /bin/sh");
    return 0;
}
"""

#: What dockerTools users write: shadowSetup, then shadow's commands.
USER_SCRIPT = "groupadd -g 1000 app && useradd -u 1000 -g app -m app"

APP_BUILD = f'''
# The static binary: the image's only file.
genrule(
    name = "hello",
    srcs = ["hello.c"],
    outs = ["app"],
    cmd = "cc -static -O2 -s -Wl,--build-id=none -ffile-prefix-map=$PWD=. -o $OUT $SRCS",
)

image(name = "static", tag = "1", copy_to_root = [":hello"], config = {{"Entrypoint": ["/app"]}},
      compressor = "none")

# buildImage(fromImage = static; runAsRoot = shadowSetup + useradd): the image has no shell.
image(
    name = "app",
    tag = "1",
    from_image = ":static",
    run_as_root = SHADOW_SETUP + "{USER_SCRIPT}\\n",
    config = {{"User": "app"}},
    compressor = "none",
)

root_layer(name = "layer", from_image = ":static", run_as_root = SHADOW_SETUP + "{USER_SCRIPT}\\n")

root_layer(name = "layer_vm", from_image = ":static", run_as_root = SHADOW_SETUP + "{USER_SCRIPT}\\n",
           executor = "vm")

# A tool: a script run by the toolbox's sh.
genrule(
    name = "greet",
    outs = ["greet"],
    cmd = "printf '#!/.dtbuild-toolbox/bin/sh\\\\necho hello from a tool\\\\n' > $OUT && chmod 755 $OUT",
)

root_layer(
    name = "with_tools",
    from_image = ":static",
    tools = [":greet"],
    run_as_root = """
echo "$0" > /shell
greet > /greeting
command -v groupadd > /groupadd-is
if touch /.dtbuild-toolbox/bin/planted 2>/dev/null || rm /.dtbuild-toolbox/bin/busybox 2>/dev/null; then
  echo writable > /toolbox-is
else
  echo read-only > /toolbox-is
fi
""",
)

# A base with its own shell and its own groupadd: those win over the toolbox's.
files(name = "shelled_root", srcs = glob(["shelled/**"]), strip_prefix = "shelled")
image(name = "shelled", tag = "1", copy_to_root = [":shelled_root"], compressor = "none")
root_layer(
    name = "image_tools_win",
    from_image = ":shelled",
    run_as_root = """
echo "$0" > /shell
command -v groupadd > /groupadd-is
echo "$PATH" > /path
""",
)
'''


def _workspace(write_workspace) -> Path:
    return write_workspace({
        "app/BUILD": APP_BUILD,
        "app/hello.c": HELLO_C,
        "app/shelled/usr/sbin/groupadd": "#!/bin/sh\necho the image's own groupadd\n",
    })


@pytest.fixture
def ws(write_workspace, require_tool) -> Path:
    for tool in ("busybox", "unshare", "cc", "tar"):
        require_tool(tool)
    root = _workspace(write_workspace)
    bindir = root / "app" / "shelled" / "bin"
    bindir.mkdir(parents=True)
    shutil.copy("/bin/busybox", bindir / "busybox")
    (bindir / "sh").symlink_to("busybox")
    os.chmod(root / "app" / "shelled" / "usr" / "sbin" / "groupadd", 0o755)
    return root


def _tar_listing(tar: Path) -> dict[str, tuple[str, str]]:
    """path -> (mode string, uid/gid) as ``tar --numeric-owner -tvf`` shows them."""
    out = subprocess.run(["tar", "--numeric-owner", "-tvf", str(tar)], capture_output=True, text=True,
                         check=True).stdout
    listing = {}
    for line in out.splitlines():
        mode, owner, *_ = line.split(None, 2)
        path = line.split(" 1970-01-01 00:00 ", 1)[1].split(" -> ")[0].rstrip("/")
        listing[path] = (mode, owner)
    return listing


def _member(tar: Path, name: str) -> str:
    return subprocess.run(["tar", "-xOf", str(tar), name], capture_output=True, text=True, check=True).stdout


def _image_layers(ws: Path, image: str) -> list[Path]:
    out = ws / "dtbuild-out" / "app"
    desc = json.loads((out / f"{image}.json").read_text())
    return [out / f"{image}.oci" / "blobs" / "sha256" / layer["digest"][7:] for layer in desc["layers"]]


def _runc(bundle: Path, args: list[str] | None = None) -> list[str]:
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["terminal"] = False
    if args is not None:
        config["process"]["args"] = args
    config_path.write_text(json.dumps(config))
    done = subprocess.run(["runc", "run", "-b", str(bundle), f"dtbuild-toolbox-{os.getpid()}-{bundle.name}"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _no_toolbox_in(listing: dict[str, tuple[str, str]]) -> None:
    leaked = [p for p in listing if "dtbuild-toolbox" in p or "busybox" in p or p.startswith(("bin", "usr"))]
    assert leaked == [], f"the toolbox (or its mount point) reached the layer: {leaked}"


def test_shadow_setup_and_useradd_on_a_scratch_image_then_id_app_in_runc(ws, run_dtbuild, require_tool,
                                                                          tmp_path) -> None:
    for tool in ("umoci", "runc"):
        require_tool(tool)
    run_dtbuild.build(ws, "//app:app", "//app:layer", check=True)
    base_layer, layer = _image_layers(ws, "app")
    # The image: the static binary, then the root layer; no shell anywhere.
    assert set(_tar_listing(base_layer)) == {"app"}
    listing = _tar_listing(layer)
    _no_toolbox_in(listing)
    assert listing["etc/passwd"] == ("-rw-r--r--", "0/0")
    assert listing["etc/group"] == ("-rw-r--r--", "0/0")
    assert listing["home/app"] == ("drwxr-xr-x", "1000/1000")
    assert {"etc/shadow", "etc/gshadow", "etc/pam.d/other", "etc/login.defs"} <= set(listing)
    passwd = _member(layer, "etc/passwd").splitlines()
    assert passwd == ["root:x:0:0::/root:/bin/sh", "app:x:1000:1000::/home/app:/bin/sh"]
    assert _member(layer, "etc/group").splitlines() == ["root:x:0:", "app:x:1000:"]
    assert _member(layer, "etc/shadow").splitlines()[1] == "app:!:::::::"
    # The root_layer target and image(run_as_root) make the same layer.
    assert (ws / "dtbuild-out" / "app" / "layer.tar").read_bytes() == layer.read_bytes()

    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{ws / 'dtbuild-out' / 'app' / 'app.oci'}:1", str(bundle)],
                   check=True, capture_output=True)
    # umoci resolved User "app" with the image's /etc/passwd; /app is all the image runs.
    assert _runc(bundle) == ["uid=1000 gid=1000", "no /bin/sh"]
    # `id app` needs a program the image lacks: a busybox in the bundle only.
    shutil.copy("/bin/busybox", bundle / "rootfs" / "busybox")
    assert _runc(bundle, ["/busybox", "id", "app"]) == ["uid=1000(app) gid=1000(app) groups=1000(app)"]


def test_the_script_gets_the_toolbox_shell_and_tools_after_the_images_own(ws, run_dtbuild) -> None:
    run_dtbuild.build(ws, "//app:with_tools", "//app:image_tools_win", check=True)
    out = ws / "dtbuild-out" / "app"
    layer = out / "with_tools.tar"
    listing = _tar_listing(layer)
    _no_toolbox_in(listing)
    assert set(listing) == {"shell", "greeting", "groupadd-is", "toolbox-is"}
    assert _member(layer, "toolbox-is") == "read-only\n"
    assert _member(layer, "shell") == "/.dtbuild-toolbox/bin/sh\n"
    assert _member(layer, "greeting") == "hello from a tool\n"
    assert _member(layer, "groupadd-is") == "/.dtbuild-toolbox/bin/groupadd\n"
    # An image with a shell and a groupadd of its own: the script runs with them.
    own = out / "image_tools_win.tar"
    assert set(_tar_listing(own)) == {"shell", "groupadd-is", "path"}
    assert _member(own, "shell") == "/bin/sh\n"
    assert _member(own, "groupadd-is") == "/usr/sbin/groupadd\n"
    assert _member(own, "path").strip().split(":") == [
        "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin", "/.dtbuild-toolbox/bin"]

    again = run_dtbuild.build(ws, "//app:with_tools", check=True)
    assert again.executed == 0
    build = ws / "app" / "BUILD"
    build.write_text(build.read_text().replace("hello from a tool", "hello from a new tool"))
    changed = run_dtbuild.build(ws, "//app:with_tools", check=True)
    assert changed.executed == 2, changed.stdout  # the tool's genrule and RootLayerWrite
    assert _member(layer, "greeting") == "hello from a new tool\n"


def test_a_new_busybox_runs_the_layer_again(ws, run_dtbuild, tmp_path) -> None:
    if os.geteuid() != 0:
        pytest.skip("puts another busybox at /bin/busybox in a private mount namespace, which needs root")
    run_dtbuild.build(ws, "//app:layer", check=True)
    assert run_dtbuild.build(ws, "//app:layer", check=True).executed == 0
    other = tmp_path / "busybox"
    other.write_bytes(Path("/bin/busybox").read_bytes() + b"\0another build")  # still runs
    os.chmod(other, 0o755)
    summary = tmp_path / "summary.json"
    done = subprocess.run(["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /bin/busybox && exec "$@"',
                           str(other), sys.executable, "-m", "dtbuild.engine.cli", "build", "//app:layer",
                           "--summary-json", str(summary)],
                          cwd=ws, env=run_dtbuild.env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # RootLayerWrite only: the base's unpacked tree does not depend on the toolbox.
    assert json.loads(summary.read_text())["actions"]["executed"] == 1, done.stdout
    # And back: the first busybox's layer is still in the cache.
    assert run_dtbuild.build(ws, "//app:layer", check=True).executed == 0


def test_tools_without_run_as_root_are_an_error_at_their_line(ws, run_dtbuild) -> None:
    (ws / "bad").mkdir()
    (ws / "bad" / "BUILD").write_text('\nimage(name = "tools_only", tools = ["//app:greet"])\n')
    code, _, err = run_dtbuild(ws, "build", "//bad:tools_only")
    assert code == 2
    assert "bad/BUILD:2" in err and "the 'tools' attribute is only used by run_as_root" in err
    assert "hint: set run_as_root, or remove tools" in err


def _shadow_commands(tmp_path: Path) -> tuple[Path, Path]:
    """The toolbox's groupadd and useradd next to a busybox, and a root with the files
    SHADOW_SETUP writes (the commands' -R works on it as on /)."""
    from dtbuild.plugins.builtin.toolbox import shadow_script

    bindir = tmp_path / "toolbox" / "bin"
    bindir.mkdir(parents=True)
    shutil.copy("/bin/busybox", bindir / "busybox")
    (bindir / "dtbuild-shadow").write_bytes(shadow_script())
    for name in ("groupadd", "useradd"):
        (bindir / name).symlink_to("dtbuild-shadow")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc" / "shadow").write_text("root:!x:::::::\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "gshadow").write_text("root:x::\n")
    return bindir, root


def test_groupadd_and_useradd_edit_the_account_files_as_shadows_do(tmp_path, require_tool) -> None:
    require_tool("busybox")
    bindir, root = _shadow_commands(tmp_path)

    def run(command: str, *args: str) -> tuple[int, str]:
        done = subprocess.run(["/bin/busybox", "sh", str(bindir / command), "-R", str(root), *args],
                              capture_output=True, text=True, env={}, timeout=30)
        return done.returncode, done.stderr

    assert run("groupadd", "-g", "1000", "app") == (0, "")
    assert run("groupadd", "--system", "wheel") == (0, "")
    assert run("useradd", "-u", "1000", "-g", "app", "-m", "app") == (0, "")
    assert run("useradd", "-rMN", "--groups=wheel,app", "--shell=/sbin/nologin", "svc") == (0, "")
    assert run("useradd", "bob") == (0, "")
    etc = root / "etc"
    assert etc.joinpath("passwd").read_text().splitlines() == [
        "root:x:0:0::/root:/bin/sh", "app:x:1000:1000::/home/app:/bin/sh", "svc:x:999:100::/home/svc:/sbin/nologin",
        "bob:x:1001:1001::/home/bob:/bin/sh"]
    assert etc.joinpath("group").read_text().splitlines() == [
        "root:x:0:", "app:x:1000:svc", "wheel:x:999:svc", "bob:x:1001:"]
    assert etc.joinpath("gshadow").read_text().splitlines()[1:] == ["app:!::svc", "wheel:!::svc", "bob:!::"]
    assert etc.joinpath("shadow").read_text().splitlines()[1:] == ["app:!:::::::", "svc:!:::::::", "bob:!:::::::"]
    home = (root / "home" / "app").stat()
    assert (home.st_uid, home.st_gid, home.st_mode & 0o7777) == (1000, 1000, 0o755)
    assert not (root / "home" / "svc").exists() and not (root / "home" / "bob").exists()

    code, err = run("groupadd", "app")
    assert (code, err) == (9, "groupadd: group 'app' already exists\n")
    assert run("groupadd", "-f", "app") == (0, "")
    assert run("useradd", "-u", "1000", "dup")[0] == 4
    assert run("useradd", "-g", "nogroup", "dup") == (6, "useradd: group 'nogroup' does not exist\n")
    code, err = run("useradd", "-e", "2030-01-01", "dup")
    assert code == 2 and "unsupported option '-e'" in err
    assert run("useradd", "bad:name")[0] == 3
    (etc / "passwd").unlink()
    code, err = run("useradd", "late")
    assert code == 10 and "run SHADOW_SETUP first" in err


# --------------------------------------------------------------------------- other executors and users


def test_fuse_overlayfs_makes_the_same_layer(ws, run_dtbuild, require_tool, tmp_path) -> None:
    require_tool("fuse-overlayfs")
    run_dtbuild.build(ws, "//app:layer", check=True)
    kernel = (ws / "dtbuild-out" / "app" / "layer.tar").read_bytes()
    code, out, err = run_dtbuild(ws, "build", "//app:layer", env={
        "DTBUILD_NAMESPACE_OVERLAY": "fuse", "DTBUILD_CACHE_DIR": str(tmp_path / "fuse-cache")})
    assert code == 0, err
    assert "using fuse-overlayfs" in out + err
    assert (ws / "dtbuild-out" / "app" / "layer.tar").read_bytes() == kernel


@pytest.mark.slow
def test_vm_executor_makes_the_same_layer(ws, run_dtbuild, require_tool) -> None:
    require_tool("qemu-system-x86_64")
    run_dtbuild.build(ws, "//app:layer", "//app:layer_vm", check=True, timeout=900)
    out = ws / "dtbuild-out" / "app"
    _no_toolbox_in(_tar_listing(out / "layer_vm.tar"))
    assert (out / "layer_vm.tar").read_bytes() == (out / "layer.tar").read_bytes()


def test_as_an_ordinary_user_the_namespace_executor_makes_the_same_layer(ws, run_dtbuild, require_tool,
                                                                         nobody_home) -> None:
    for tool in ("setpriv", "newuidmap", "newgidmap"):
        require_tool(tool)
    run_dtbuild.build(ws, "//app:layer", check=True)
    done = dtbuild_as_nobody(ws, run_dtbuild, nobody_home, ["build", "//app:layer"])
    assert done.returncode == 0, done.stderr
    layer = nobody_home / "ws" / "dtbuild-out" / "app" / "layer.tar"
    assert layer.stat().st_uid == 65534
    assert layer.read_bytes() == (ws / "dtbuild-out" / "app" / "layer.tar").read_bytes()
