"""``dtbuild run``: the example web server answers on the host's network and stops on
Ctrl-C without leaving a container or a bundle behind; ARGS after ``--`` replace the
image's Cmd and the container's exit status is dtbuild's; both runtimes (umoci + runc,
podman where it can run containers here), and auto's fallback from a podman that cannot."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "examples" / "workspace"
BUSYBOX_APPLETS = ("sh", "id", "pwd", "echo", "sleep", "true")

# Prints what the container got; exits with its first argument.
REPORT_SCRIPT = ('echo "args:$*"; echo "user:$(id -u):$(id -g)"; echo "cwd:$(pwd)"; echo "greeting:$GREETING"; '
                 'read line; echo "stdin:$line"; exit "$1"')

BUSYBOX_BUILD = f"""
files(name = "rootfs", srcs = glob(["rootfs/**"]), strip_prefix = "rootfs")

image(
    name = "report",
    tag = "1",
    copy_to_root = [":rootfs"],
    compressor = "none",
    config = {{
        "Entrypoint": ["/bin/sh", "-c", {REPORT_SCRIPT!r}, "sh"],
        "Cmd": ["3", "from", "cmd"],
        "Env": ["PATH=/bin", "GREETING=hello"],
        "WorkingDir": "/work",
        "User": "1000:1000",
    }},
)

# PID 1 ignores SIGINT and SIGTERM (no handler): only a kill stops it.
image(
    name = "stubborn",
    copy_to_root = [":rootfs"],
    compressor = "none",
    config = {{"Entrypoint": ["/bin/sh", "-c", "echo started; exec sleep 600"], "Env": ["PATH=/bin"]}},
)

image(
    name = "foreign",
    architecture = "{'arm64' if os.uname().machine == 'x86_64' else 'amd64'}",
    copy_to_root = [":rootfs"],
    compressor = "none",
    config = {{"Cmd": ["/bin/true"]}},
)

image(name = "nothing", copy_to_root = [":rootfs"], compressor = "none")
"""


def _add_busybox(root: Path) -> Path:
    bindir = root / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", bindir / "busybox")
    for applet in BUSYBOX_APPLETS:
        (bindir / applet).symlink_to("busybox")
    return root


@pytest.fixture
def busybox_ws(write_workspace, require_tool) -> Path:
    require_tool("busybox")
    ws = write_workspace({"BUILD": BUSYBOX_BUILD}, name="busybox")
    _add_busybox(ws / "rootfs")
    return ws


@pytest.fixture(params=["runc", "podman"])
def runtime(request, require_tool, tmp_path) -> str:
    """Each runtime that can run containers here. runc and umoci missing is a failure under
    CI=true; a podman that is installed but cannot start containers in this environment
    (a kernel or sandbox limit, not a broken image) is skipped with its reason, even in CI."""
    if request.param == "runc":
        require_tool("runc")
        require_tool("umoci")
        return "runc"
    podman = require_tool("podman")
    require_tool("busybox")
    if podman not in _PODMAN_PROBES:
        rootfs = _add_busybox(tmp_path / "podman-probe")
        probe = subprocess.run([podman, "run", "--rm", "--network", "host", "--rootfs", str(rootfs), "/bin/true"],
                               capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        reason = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        _PODMAN_PROBES[podman] = None if probe.returncode == 0 else reason
    reason = _PODMAN_PROBES[podman]
    if reason is not None:
        pytest.skip(f"podman cannot run containers in this environment: {reason}")
    return "podman"


#: podman's path -> why it cannot run containers here (None: it can), probed once per test session.
_PODMAN_PROBES: dict[str, str | None] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bytes(answer.read())
    except (urllib.error.URLError, OSError):
        return None


def _podman_containers() -> list[str]:
    done = subprocess.run(["podman", "ps", "-a", "-q", "--filter", "name=dtbuild-run-"], capture_output=True,
                          text=True, timeout=60)
    return done.stdout.split()


def _assert_nothing_left(runtime: str, run_tmp: Path) -> None:
    assert list(run_tmp.iterdir()) == [], "the runc bundle was left behind"
    if runtime == "podman":
        assert _podman_containers() == [], "the podman container was left behind"


@pytest.mark.slow
def test_run_serves_the_example_site_and_stops_on_ctrl_c(run_dtbuild, require_tool, runtime, tmp_path,
                                                           reaped) -> None:
    require_tool("cc")
    ws = tmp_path / "example"
    shutil.copytree(EXAMPLE, ws, symlinks=True, ignore=shutil.ignore_patterns("dtbuild-out"))
    run_tmp = tmp_path / "run-tmp"
    run_tmp.mkdir()
    port = _free_port()
    err_path = tmp_path / "run.err"
    with open(err_path, "wb") as err:
        proc = run_dtbuild.popen(ws, "run", "--runtime", runtime, "--stop-timeout", "2", "//images:web", "--",
                                 str(port), "/srv/www", env={"TMPDIR": str(run_tmp)}, stdout=err, stderr=err)
        reaped.append(proc)
        body = None
        deadline = time.monotonic() + 300
        while body is None and proc.poll() is None and time.monotonic() < deadline:
            body = _get(f"http://127.0.0.1:{port}/")
            if body is None:
                time.sleep(0.2)
        assert body is not None, f"the server never answered:\n{err_path.read_text()}"
        assert body == (EXAMPLE / "web" / "site" / "index.html").read_bytes()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    log = err_path.read_text()
    assert f"serving /srv/www on port {port}" in log
    assert "SIGINT received, stopping the container" in log
    assert _get(f"http://127.0.0.1:{port}/") is None, "the server still answers after dtbuild exited"
    _assert_nothing_left(runtime, run_tmp)


@pytest.mark.slow
def test_args_replace_cmd_and_the_exit_status_is_the_containers(busybox_ws, run_dtbuild, runtime, tmp_path) -> None:
    run_tmp = tmp_path / "run-tmp"
    run_tmp.mkdir()
    env = run_dtbuild.env({"TMPDIR": str(run_tmp)})

    def run(*args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(run_dtbuild.argv("run", "--runtime", runtime, *args), cwd=busybox_ws, env=env,
                              input=stdin, capture_output=True, timeout=300)

    default = run("//:report", stdin=b"piped\n")
    assert default.returncode == 3, default.stderr.decode()
    assert default.stdout.decode().splitlines() == [
        "args:3 from cmd", "user:1000:1000", "cwd:/work", "greeting:hello", "stdin:piped"]

    # After `--` everything is the container's, dtbuild's own flags too (-p, --help, --debug).
    given = run("//:report", "--", "5", "a", "b c", "--not-a-flag", "-p", "80", "--help", "--debug", stdin=b"")
    assert given.returncode == 5, given.stderr.decode()
    assert given.stdout.decode().splitlines()[0] == "args:5 a b c --not-a-flag -p 80 --help --debug"
    _assert_nothing_left(runtime, run_tmp)


@pytest.mark.slow
def test_a_second_ctrl_c_kills_a_container_that_ignores_the_first(busybox_ws, run_dtbuild, runtime, tmp_path,
                                                                  reaped) -> None:
    run_tmp = tmp_path / "run-tmp"
    run_tmp.mkdir()
    proc = run_dtbuild.popen(busybox_ws, "run", "--runtime", runtime, "--stop-timeout", "3600", "//:stubborn",
                             env={"TMPDIR": str(run_tmp)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reaped.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)  # the first one has been passed on (and ignored): PID 1 without a handler
    assert proc.poll() is None, "one SIGINT stopped a container that ignores it"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL, err.decode()
    _assert_nothing_left(runtime, run_tmp)


@pytest.mark.slow
def test_auto_falls_back_to_runc_when_podman_cannot_start_containers(busybox_ws, run_dtbuild, require_tool,
                                                                     tmp_path) -> None:
    require_tool("runc")
    require_tool("umoci")
    # A podman that loads images but cannot start containers, as in a sandbox that forbids it.
    fake = tmp_path / "fakebin"
    fake.mkdir()
    log = tmp_path / "podman.log"
    (fake / "podman").write_text(f"""#!/bin/sh
echo "$1" >> {log}
case "$1" in
  image) exit 1 ;;
  load) cat > /dev/null; exit 0 ;;
  run) echo "Error: cannot start containers here" >&2; exit 126 ;;
  container) echo created ;;
esac
exit 0
""")
    (fake / "podman").chmod(0o755)
    env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    code, out, err = run_dtbuild(busybox_ws, "run", "//:report", "--", "0", env=env)
    assert code == 0, err
    assert out.splitlines()[0] == "args:0"
    assert "Error: cannot start containers here" in err
    assert "podman could not start the container" in err and "running it with runc instead" in err
    assert log.read_text().split() == ["image", "load", "run", "container", "rm"]
    # Remembered: the next run goes to runc at once.
    code, out, err = run_dtbuild(busybox_ws, "run", "//:report", "--", "0", env=env)
    assert code == 0, err
    assert "with runc" in err and "with podman" not in err
    assert log.read_text().split() == ["image", "load", "run", "container", "rm"]
    # Asked for by name, podman is tried again, and its failure is the command's.
    code, _, err = run_dtbuild(busybox_ws, "run", "--runtime", "podman", "//:report", env=env)
    assert code == 1
    assert "ERROR: podman could not start the container" in err and "--runtime runc" in err


def test_run_refuses_an_image_of_another_architecture(busybox_ws, run_dtbuild) -> None:
    code, _, err = run_dtbuild(busybox_ws, "run", "--runtime", "runc", "//:foreign")
    arch = "arm64" if os.uname().machine == "x86_64" else "amd64"
    assert code == 1
    assert f"ERROR: //:foreign is a linux/{arch} image, and this machine runs linux/" in err
    assert "hint: build it with architecture = " in err


def test_run_of_an_image_without_a_command_says_what_to_give(busybox_ws, run_dtbuild) -> None:
    code, _, err = run_dtbuild(busybox_ws, "run", "--runtime", "runc", "//:nothing")
    assert code == 2
    assert "//:nothing has no Entrypoint or Cmd" in err
    assert "dtbuild run //:nothing -- " in err


def test_run_of_a_target_that_is_not_an_image(busybox_ws, run_dtbuild) -> None:
    code, _, err = run_dtbuild(busybox_ws, "run", "//:rootfs")
    assert code == 2
    assert "//:rootfs (files) is not an image target" in err


def test_run_runtime_setting_is_read_and_checked(busybox_ws, run_dtbuild, require_tool) -> None:
    require_tool("runc")
    require_tool("umoci")
    config = busybox_ws / "dtbuild.toml"
    config.write_text('[run]\nruntime = "runc"\n')
    code, _, err = run_dtbuild(busybox_ws, "run", "//:report", "--", "0")
    assert code == 0, err
    assert "running //:report with runc" in err
    config.write_text('[run]\nruntime = "crun"\n')
    code, _, err = run_dtbuild(busybox_ws, "run", "//:report")
    assert code == 2
    assert "runtime" in err and "auto, podman, runc" in err and "crun" in err
