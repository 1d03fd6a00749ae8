"""``shell_image`` (buildNixShellImage): an image of a genrule's build environment. Its
command, run in the image by runc, makes the same bytes as the build did; the default
Cmd is a shell in /build with the command's environment; the layers give /build to the
build user and keep the tools root's; a failing genrule's shell image is built and
reproduces the failure; the image is byte-for-byte reproducible."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

# The genrule reads a source, another genrule's output and a tool, writes into its HOME
# and TMPDIR, and creates an output below a subdirectory of $OUT_DIR.
BUILD = '''
genrule(
    name = "words",
    srcs = ["words.txt"],
    outs = ["sorted.txt"],
    cmd = "sort $SRCS > $OUT",
)

genrule(
    name = "gen",
    srcs = ["in.txt", ":words"],
    tools = ["upper.sh"],
    outs = ["out/report.txt"],
    cmd = """
echo noted > "$HOME/.note"
for f in $SRCS; do sh $TOOLS < "$f" > "$TMPDIR/$(basename "$f")"; done
{
  echo "srcs: $SRCS"
  echo "outs: $OUTS"
  echo "epoch: $SOURCE_DATE_EPOCH tz: $TZ"
  cat "$TMPDIR/in.txt" "$TMPDIR/sorted.txt"
  cat "$HOME/.note"
  printf 'sum: '; cat $SRCS | sha256sum | cut -c1-16
} > "$OUT"
""",
)

shell_image(name = "gen_shell", target = ":gen", tag = "debug")

genrule(
    name = "broken",
    srcs = ["in.txt"],
    outs = ["partial.txt"],
    cmd = "echo started > $OUT; grep needle $SRCS > /dev/null; echo finished >> $OUT",
)

shell_image(name = "broken_shell", target = ":broken", tag = "debug", compressor = "none")

files(name = "helper", srcs = ["helper.sh"], prefix = "/opt/bin")

shell_image(name = "tooled", target = ":gen", tools = [":helper"], user = "dev", uid = 2000, gid = 3000,
            config = {"Env": ["TZ=Europe/Paris", "EXTRA=1"]})
'''

FILES = {
    "pkg/BUILD": BUILD,
    "pkg/in.txt": "hello shell image\n",
    "pkg/words.txt": "pear\napple\nfig\n",
    "pkg/upper.sh": "tr a-z A-Z\n",
    "pkg/helper.sh": "echo helped\n",
}


@pytest.fixture
def ws(write_workspace, require_tool) -> Path:
    require_tool("busybox")
    return write_workspace(FILES)


def _run(run_dtbuild, ws: Path, run_tmp: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = run_dtbuild.env({"TMPDIR": str(run_tmp)})
    return subprocess.run(run_dtbuild.argv("run", "--runtime", "runc", *args), cwd=ws, env=env, input=stdin,
                          capture_output=True, timeout=300)


@pytest.fixture
def run_tmp(tmp_path, require_tool) -> Path:
    require_tool("runc")
    require_tool("umoci")
    path = tmp_path / "run-tmp"
    path.mkdir()
    return path


def test_the_command_run_by_runc_in_the_image_makes_the_builds_bytes(ws, run_dtbuild, require_tool,
                                                                      tmp_path) -> None:
    umoci, runc = require_tool("umoci"), require_tool("runc")
    run_dtbuild.build(ws, "//pkg:gen", "//pkg:gen_shell", check=True)
    built = (ws / "dtbuild-out/pkg/out/report.txt").read_bytes()
    assert b"HELLO SHELL IMAGE\nAPPLE\nFIG\nPEAR\nnoted\n" in built  # the command did run

    bundle = tmp_path / "bundle"
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    subprocess.run([umoci, "unpack", *rootless, "--image", f"{ws / 'dtbuild-out/pkg/gen_shell.oci'}:debug",
                    str(bundle)], check=True, capture_output=True, timeout=120)
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    process = config["process"]
    # umoci made the process from the image config: the build user, /build, the command's env.
    assert (process["user"]["uid"], process["user"]["gid"], process["cwd"]) == (1000, 1000, "/build")
    assert "OUTS=dtbuild-out/pkg/out/report.txt" in process["env"]
    process["args"] = ["sh", "/build/.dtbuild-cmd.sh"]
    process["terminal"] = False
    config_path.write_text(json.dumps(config))
    done = subprocess.run([runc, "run", "-b", str(bundle), f"dtbuild-shell-{os.getpid()}"], capture_output=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr.decode()
    rootfs = bundle / "rootfs"
    assert (rootfs / "build/dtbuild-out/pkg/out/report.txt").read_bytes() == built
    # It wrote as the build user, into the home it owns.
    note = rootfs / "build/.note"
    assert note.read_text() == "noted\n"
    if not rootless:
        assert (note.stat().st_uid, note.stat().st_gid) == (1000, 1000)


def test_run_drops_into_a_shell_in_the_build_directory(ws, run_dtbuild, run_tmp) -> None:
    run_dtbuild.build(ws, "//pkg:gen", check=True)
    built = (ws / "dtbuild-out/pkg/out/report.txt").read_bytes()
    # The default Cmd: an interactive shell that reads what a user types.
    typed = b'id -un; pwd; echo "home=$HOME out=$OUT"; sh .dtbuild-cmd.sh && cat "$OUT"\n'
    shell = _run(run_dtbuild, ws, run_tmp, "//pkg:gen_shell", stdin=typed)
    assert shell.returncode == 0, shell.stderr.decode()
    # Its prompt (from the rc file) before the line and after it, at the end of input.
    _banner, answer, rest = shell.stdout.split(b"[//pkg:gen] ~ $ ")
    assert answer == b"build\n/build\nhome=/build out=dtbuild-out/pkg/out/report.txt\n" + built
    assert rest == b""
    assert b"its command is /build/.dtbuild-cmd.sh" in shell.stderr
    # Or the command alone, after --.
    direct = _run(run_dtbuild, ws, run_tmp, "//pkg:gen_shell", "--", "sh", "-c",
                  'sh /build/.dtbuild-cmd.sh && cat "$OUT"')
    assert direct.returncode == 0, direct.stderr.decode()
    assert direct.stdout == built
    assert list(run_tmp.iterdir()) == []


def test_the_shell_image_of_a_failing_genrule_reproduces_the_failure(ws, run_dtbuild, run_tmp) -> None:
    failed = run_dtbuild.build(ws, "//pkg:broken")
    assert failed.exit_code == 1
    assert "command exited with status 1" in failed.stderr
    # The image needs the genrule's inputs, not its outputs: it builds all the same.
    run_dtbuild.build(ws, "//pkg:broken_shell", check=True)
    done = _run(run_dtbuild, ws, run_tmp, "//pkg:broken_shell", "--", "sh", "-c",
                'sh /build/.dtbuild-cmd.sh; echo "status $?"; cat "$OUT"')
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"status 1\nstarted\n"


def _tar_listing(layer: Path) -> dict[str, tuple[str, str]]:
    """path -> (mode string, uid/gid) as ``tar -tvf --numeric-owner`` shows them."""
    out = subprocess.run(["tar", "--numeric-owner", "-tvf", str(layer)], capture_output=True, text=True,
                         check=True).stdout
    listing = {}
    for line in out.splitlines():
        mode, owner, *_rest = line.split(None, 5)
        path = line.split(" 1970-01-01 00:00 ", 1)[1].split(" -> ")[0].rstrip("/")
        listing[path] = (mode, owner)
    return listing


def test_layers_give_build_to_the_build_user_and_the_tools_to_root(ws, run_dtbuild, require_tool,
                                                                   tmp_path) -> None:
    skopeo = require_tool("skopeo")
    run_dtbuild.build(ws, "//pkg:broken_shell", check=True)
    archive = ws / "dtbuild-out/pkg/broken_shell.tar"
    unpacked = tmp_path / "archive"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(unpacked)], check=True)
    manifest = json.loads((unpacked / "manifest.json").read_text())
    tools, build = (_tar_listing(unpacked / layer) for layer in manifest[0]["Layers"])
    assert tools["bin/busybox"] == ("-rwxr-xr-x", "0/0")
    assert tools["bin/sh"][0].startswith("l")
    assert tools["etc/passwd"] == ("-rw-r--r--", "0/0")
    assert tools["tmp"] == ("drwxrwxrwt", "0/0")
    assert build == {
        "build": ("drwxr-xr-x", "1000/1000"),
        "build/.dtbuild-cmd.sh": ("-rwxr-xr-x", "1000/1000"),
        "build/.dtbuild-env.sh": ("-rw-r--r--", "1000/1000"),
        "build/.dtbuild-rc.sh": ("-rw-r--r--", "1000/1000"),
        "build/dtbuild-out": ("drwxr-xr-x", "1000/1000"),
        "build/dtbuild-out/pkg": ("drwxr-xr-x", "1000/1000"),
        "build/pkg": ("drwxr-xr-x", "1000/1000"),
        "build/pkg/in.txt": ("-rw-r--r--", "1000/1000"),
    }
    done = subprocess.run([skopeo, "inspect", "--config", f"docker-archive:{archive}"], capture_output=True,
                          text=True, check=True)
    config = json.loads(done.stdout)["config"]
    assert (config["User"], config["WorkingDir"], config["Cmd"]) == ("1000:1000", "/build", ["/bin/sh", "-i"])
    assert {"SRCS=pkg/in.txt", "OUT=dtbuild-out/pkg/partial.txt", "HOME=/build", "TMPDIR=/tmp",
            "SOURCE_DATE_EPOCH=1", "ENV=/build/.dtbuild-rc.sh"} <= set(config["Env"])
    passwd = subprocess.run(["tar", "-xOf", str(unpacked / manifest[0]["Layers"][0]), "etc/passwd"],
                            capture_output=True, text=True, check=True).stdout
    assert "build:x:1000:1000:Build user:/build:/bin/sh\n" in passwd


def test_shell_images_are_reproducible(ws, run_dtbuild, tmp_path) -> None:
    first = run_dtbuild.build(ws, "//pkg:gen_shell", check=True)
    other = tmp_path / "elsewhere" / "ws"
    shutil.copytree(ws, other, ignore=shutil.ignore_patterns("dtbuild-out"))
    second = run_dtbuild.build(other, "//pkg:gen_shell", env={"DTBUILD_CACHE_DIR": str(tmp_path / "cache2")},
                               umask=0o077, check=True)
    digest = first.summary["targets"]["//pkg:gen_shell"]["manifest_digest"]
    assert digest.startswith("sha256:")
    assert second.summary["targets"]["//pkg:gen_shell"]["manifest_digest"] == digest
    for name in ("gen_shell.tar.gz", "gen_shell.json"):
        assert (ws / "dtbuild-out/pkg" / name).read_bytes() == (other / "dtbuild-out/pkg" / name).read_bytes()
    # The host busybox is keyed by its digest: unchanged, nothing runs again.
    assert run_dtbuild.build(ws, "//pkg:gen_shell", check=True).executed == 0


def test_tools_user_and_config_env(ws, run_dtbuild, run_tmp) -> None:
    done = _run(run_dtbuild, ws, run_tmp, "//pkg:tooled", "--", "sh", "-c",
                'stat -c "%A %u %g" /opt/bin/helper.sh; sh /opt/bin/helper.sh; id; stat -c "%u:%g" .; '
                'echo "$TZ $EXTRA"; grep "^dev:" /etc/passwd')
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    assert lines[0].split() == ["-rw-r--r--", "0", "0"], lines  # tools are root's
    assert lines[1:] == ["helped", "uid=2000(dev) gid=3000(dev)", "2000:3000", "Europe/Paris 1",
                         "dev:x:2000:3000:Build user:/build:/bin/sh"]


@pytest.mark.parametrize(("attrs", "message"), [
    ('target = ":data"', "needs targets that provide CommandInfo, but //pkg:data (files) does not"),
    ('target = ":gen", user = "root"', "names the image's own user 'root'"),
    ('target = ":gen", uid = 0', "must be between 1 and 65533"),
    ('target = ":gen", shell = "bash"', "must be the absolute path of a shell in the image"),
])
def test_bad_attributes_are_errors_at_their_line(write_workspace, run_dtbuild, attrs, message) -> None:
    ws = write_workspace({**FILES, "pkg/BUILD": BUILD + f'\nfiles(name = "data", srcs = ["in.txt"])\n'
                                                         f'shell_image(name = "bad", {attrs})\n'})
    code, _, err = run_dtbuild(ws, "build", "//pkg:bad")
    assert code != 0
    assert message in err, err
    line = len((BUILD + "\nfiles(...)\n").splitlines()) + 1
    assert f"pkg/BUILD:{line}" in err, err
    assert "Traceback" not in err
