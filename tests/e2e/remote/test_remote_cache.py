"""The remote cache as a user checks it, against real servers on loopback: an nginx
WebDAV cache (Bazel's HTTP cache protocol) and buildbox-casd (REAPI v2 over gRPC).

Every scenario is written once and runs against both servers through :class:`Remote`, a
small common face over each server's storage on disk (its URL, kill it, list and corrupt
the blobs it stores, count its action results):

* a second checkout at another path with an empty local cache builds nothing and gets
  byte-identical outputs, and ``explain`` says so before it builds;
* a server that dies in the middle of a build, or is down from the start, costs one
  warning and a local build with the same outputs;
* a corrupt blob on the server is detected, named and not used;
* ``--remote-upload=false`` and ``[remote] upload = false`` leave the server empty;
* credentials (nginx only: casd has no auth) work, or fail with a message naming the
  setting and never showing the password;
* the command line wins over the environment, which wins over dtbuild.toml, and a bad
  URL names where it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import servers_casd
import servers_nginx

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = REPO_ROOT / "examples" / "workspace"
#: The example's actions: a genrule, two FilesTrees, the layer, the image, two formats.
EXAMPLE_ACTIONS = 7
PASSWORD = "right-horse-battery"
WRONG = "wr0ng-staple-secret"
EMPTY_BLOB = hashlib.sha256(b"").hexdigest()
# --------------------------------------------------------------------------- servers


class Remote:
    """A running remote cache, whatever its protocol."""

    def __init__(self, kind: str, server: servers_nginx.NginxCache | servers_casd.CasdServer) -> None:
        self.kind = kind
        self.server = server

    @property
    def url(self) -> str:
        return self.server.url

    def kill(self) -> None:
        self.server.kill()

    def stop(self) -> None:
        self.server.stop()

    def blob_path(self, digest: str) -> Path:
        if isinstance(self.server, servers_nginx.NginxCache):
            return self.server.root / "cas" / digest
        return self.server.blob_path(digest)

    def blobs(self) -> set[str]:
        """The hashes of every blob a client stored (casd stores the empty blob itself
        when it starts: that one is left out)."""
        if isinstance(self.server, servers_nginx.NginxCache):
            cas = self.server.root / "cas"
            return {p.name for p in cas.iterdir() if p.is_file()} if cas.is_dir() else set()
        return self.server.blob_hashes() - {EMPTY_BLOB}

    def ac_entries(self) -> int:
        """How many action results the server stores."""
        if isinstance(self.server, servers_nginx.NginxCache):
            ac = self.server.root / "ac"
            return sum(1 for p in ac.iterdir() if p.is_file()) if ac.is_dir() else 0
        return self.server.ac_entries()

    def corrupt(self, digest: str) -> None:
        """Flip the first byte of blob ``digest`` where the server keeps it (same size)."""
        if isinstance(self.server, servers_casd.CasdServer):
            self.server.corrupt_blob(digest)
            return
        path = self.blob_path(digest)
        old = path.read_bytes()
        path.write_bytes(bytes([old[0] ^ 0xFF]) + old[1:])


def _require_server(kind: str, require_tool: Callable[[str], str]) -> None:
    """Skip (fail under CI=true) when the server's program is missing. nginx is often
    in /usr/sbin, off a user's PATH; casd is in build/tools/buildbox (scripts/setup.sh)."""
    if kind == "http" and not os.access(servers_nginx.NGINX, os.X_OK):
        require_tool("nginx")
    if kind == "grpc":
        servers_casd.require_buildbox()


def _start(kind: str, workdir: Path, require_tool: Callable[[str], str]) -> Remote:
    _require_server(kind, require_tool)
    if kind == "http":
        return Remote(kind, servers_nginx.start_nginx_cache(workdir))
    return Remote(kind, servers_casd.start_casd(workdir))


@pytest.fixture(params=["http", "grpc"])
def remote(request: pytest.FixtureRequest, tmp_path: Path, require_tool: Callable[[str], str]) -> Iterator[Remote]:
    """A fresh remote cache: nginx (http://) or buildbox-casd (grpc://)."""
    server = _start(request.param, tmp_path / f"server-{request.param}", require_tool)
    try:
        yield server
    finally:
        server.stop()


def dead_url(scheme: str) -> str:
    """A URL on a loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"{scheme}://127.0.0.1:{port}"


# --------------------------------------------------------------------------- helpers


def example(tmp_path: Path, name: str) -> Path:
    """A fresh copy of examples/workspace at ``tmp_path/name``."""
    dest = tmp_path / name
    shutil.copytree(EXAMPLE, dest, symlinks=True, ignore=shutil.ignore_patterns("dtbuild-out", ".dtbuild"))
    return dest


def cache_env(tmp_path: Path, name: str, **extra: str) -> dict[str, str]:
    """An environment with a new, empty local cache of its own."""
    return {"DTBUILD_CACHE_DIR": str(tmp_path / f"cache-{name}"), **extra}


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning:" in line]


def remote_section(summary: dict[str, Any] | None) -> dict[str, Any]:
    assert summary is not None and "remote" in summary, f"the summary has no remote section: {summary}"
    return summary["remote"]


def add_sleepy_genrules(ws: Path, count: int, seconds: float) -> None:
    """``//work:all``: ``count`` independent genrules of ``seconds`` each and one that
    joins their outputs."""
    rules = [f'genrule(name = "step{i}", outs = ["step{i}.txt"], '
             f'cmd = "sleep {seconds}; echo step {i} > $OUT")' for i in range(count)]
    srcs = ", ".join(f'":step{i}"' for i in range(count))
    rules.append(f'genrule(name = "all", srcs = [{srcs}], outs = ["all.txt"], cmd = "cat $SRCS > $OUT")')
    (ws / "work").mkdir()
    (ws / "work" / "BUILD").write_text("\n".join(rules) + "\n")


def build_a(run_dtbuild: Any, tmp_path: Path, remote: Remote) -> Path:
    """Workspace A built with an empty local cache and the remote cache: it uploads."""
    ws = example(tmp_path, "A")
    a = run_dtbuild.build(ws, "//...", "--remote-cache", remote.url, env=cache_env(tmp_path, "A"), check=True)
    assert a.executed == EXAMPLE_ACTIONS
    moved = remote_section(a.summary)
    assert moved["warnings"] == [], moved
    assert moved["uploaded_results"] == EXAMPLE_ACTIONS and moved["uploaded_bytes"] > 0, moved
    assert remote.ac_entries() >= EXAMPLE_ACTIONS
    return ws


# --------------------------------------------------------------------------- 1 + 7: sharing


def test_second_checkout_takes_everything_from_the_remote(remote, run_dtbuild, tree_snapshot, tmp_path) -> None:
    a = build_a(run_dtbuild, tmp_path, remote)
    b_ws = example(tmp_path / "elsewhere" / "deeper", "B")
    b = run_dtbuild.build(b_ws, "//...", "--remote-cache", remote.url, env=cache_env(tmp_path, "B"), check=True)
    assert b.executed == 0, b.stderr
    assert b.summary is not None and b.summary["actions"]["remote_cached"] == EXAMPLE_ACTIONS
    moved = remote_section(b.summary)
    assert moved["cache"] == remote.url
    assert moved["downloaded_bytes"] > 0 and moved["uploaded_results"] == 0, moved
    assert moved["warnings"] == [] and warnings(b.stderr) == []
    assert f"remote cache {remote.url}: " in b.stderr and " downloaded" in b.stderr, b.stderr
    assert tree_snapshot(b_ws / "dtbuild-out") == tree_snapshot(a / "dtbuild-out")


#: Programs the every_kind fixture's commands run, as links to busybox in base/rootfs/bin.
APPLETS = ["sh", "cat", "echo", "id", "ls", "mkdir", "rm", "chown", "chmod", "stat", "test", "touch", "sleep",
           "env", "wc"]


def every_kind(workspace: Callable[..., Path], dest: Path) -> Path:
    """tests/fixtures/every_kind (every built-in action kind) with busybox in its base."""
    ws = workspace("every_kind", dest)
    bindir = ws / "base" / "rootfs" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", bindir / "busybox")
    for applet in APPLETS:
        (bindir / applet).symlink_to("busybox")
    return ws


@pytest.mark.slow
def test_every_action_kind_comes_from_the_remote(remote, workspace, run_dtbuild, tree_snapshot, require_tool,
                                                 tmp_path) -> None:
    for tool in ("busybox", "unshare", "fakeroot", "bash", "tar"):
        require_tool(tool)
    a_ws = every_kind(workspace, tmp_path / "A")
    a = run_dtbuild.build(a_ws, "//...", "--remote-cache", remote.url, env=cache_env(tmp_path, "A"), check=True)
    assert remote_section(a.summary)["warnings"] == []
    b_ws = every_kind(workspace, tmp_path / "elsewhere" / "B")
    b = run_dtbuild.build(b_ws, "//...", "--remote-cache", remote.url, env=cache_env(tmp_path, "B"), check=True)
    assert b.executed == 0, b.stderr
    assert b.summary is not None and b.summary["actions"]["remote_cached"] == a.executed
    assert warnings(b.stderr) == []
    assert tree_snapshot(b_ws / "dtbuild-out") == tree_snapshot(a_ws / "dtbuild-out")


def test_image_from_the_remote_is_read_by_skopeo(remote, run_dtbuild, require_tool, tmp_path) -> None:
    require_tool("skopeo")
    a = build_a(run_dtbuild, tmp_path, remote)
    b_ws = example(tmp_path, "B")
    run_dtbuild.build(b_ws, "//images:web", "--remote-cache", remote.url, env=cache_env(tmp_path, "B"), check=True)
    inspected = {}
    for ws in (a, b_ws):
        done = subprocess.run(["skopeo", "inspect", f"oci:{ws / 'dtbuild-out/images/web.oci'}:latest"],
                              capture_output=True, text=True, check=True, timeout=60)
        inspected[ws.name] = json.loads(done.stdout)
    assert inspected["B"]["Digest"] == inspected["A"]["Digest"]
    assert inspected["B"]["Layers"] and inspected["B"]["Layers"] == inspected["A"]["Layers"]


def test_explain_before_building_says_the_remote_has_it(remote, run_dtbuild, tmp_path) -> None:
    build_a(run_dtbuild, tmp_path, remote)
    b_ws = example(tmp_path, "B")
    env = cache_env(tmp_path, "B")
    _, out, err = run_dtbuild(b_ws, "explain", "//...", "--remote-cache", remote.url, env=env, check=True)
    lines = [line for line in out.splitlines() if line.strip()]
    action_lines = [line for line in lines if ": " in line and not line.startswith(("0 of", "dtbuild"))]
    assert len(action_lines) == EXAMPLE_ACTIONS, out
    assert all(line.endswith(f"from the remote cache {remote.url}") for line in action_lines), out
    assert f"0 of {EXAMPLE_ACTIONS} action(s) would run." in out
    assert warnings(err) == []
    # explain only looked: B's build still takes everything from the remote, nothing cached here.
    b = run_dtbuild.build(b_ws, "//...", "--remote-cache", remote.url, env=env, check=True)
    assert b.executed == 0 and b.summary is not None and b.summary["actions"]["remote_cached"] == EXAMPLE_ACTIONS


# --------------------------------------------------------------------------- 2: a server that dies


@pytest.mark.slow
def test_server_killed_mid_build_costs_one_warning(remote, run_dtbuild, tree_snapshot, tmp_path, reaped) -> None:
    reference = example(tmp_path, "reference")
    add_sleepy_genrules(reference, 10, 0.25)
    run_dtbuild.build(reference, "//...", "-j", "2", env=cache_env(tmp_path, "reference"), check=True)

    ws = example(tmp_path, "killed")
    add_sleepy_genrules(ws, 10, 0.25)
    summary = tmp_path / "killed-summary.json"
    err_path = tmp_path / "killed.err"
    with open(err_path, "wb") as err:
        proc = run_dtbuild.popen(ws, "build", "//...", "-j", "2", "--remote-cache", remote.url,
                                 "--summary-json", str(summary), env=cache_env(tmp_path, "killed"),
                                 stdout=subprocess.DEVNULL, stderr=err)
    reaped.append(proc)
    deadline = time.monotonic() + 30
    while remote.ac_entries() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the build ended before the server could be killed: give it more work"
    assert remote.ac_entries() >= 2
    remote.kill()
    assert proc.wait(timeout=120) == 0, err_path.read_text()
    stderr = err_path.read_text()
    found = warnings(stderr)
    assert len(found) == 1, stderr
    assert "remote cache" in found[0] and remote.url in found[0]
    assert "Traceback" not in stderr
    moved = remote_section(json.loads(summary.read_text()))
    assert len(moved["warnings"]) == 1, moved
    assert tree_snapshot(ws / "dtbuild-out") == tree_snapshot(reference / "dtbuild-out")


def test_server_down_from_the_start_costs_one_warning(remote, run_dtbuild, tree_snapshot, tmp_path) -> None:
    reference = example(tmp_path, "reference")
    run_dtbuild.build(reference, "//...", env=cache_env(tmp_path, "reference"), check=True)
    url = remote.url
    remote.kill()
    ws = example(tmp_path, "down")
    started = time.monotonic()
    b = run_dtbuild.build(ws, "//...", "--remote-cache", url, env=cache_env(tmp_path, "down"), check=True)
    assert time.monotonic() - started < 30, "a dead server must fail fast"
    assert b.executed == EXAMPLE_ACTIONS
    found = warnings(b.stderr)
    assert len(found) == 1 and url in found[0], b.stderr
    assert tree_snapshot(ws / "dtbuild-out") == tree_snapshot(reference / "dtbuild-out")


# --------------------------------------------------------------------------- 3: corrupt blobs


def test_corrupt_blob_is_detected_and_not_used(remote, run_dtbuild, tree_snapshot, tmp_path) -> None:
    a = build_a(run_dtbuild, tmp_path, remote)
    # The genrule's output: the compiled server, a file output big enough to be streamed.
    httpd = (a / "dtbuild-out" / "web" / "bin" / "httpd").read_bytes()
    digest = hashlib.sha256(httpd).hexdigest()
    assert digest in remote.blobs(), "the genrule's output was not uploaded as a blob"
    remote.corrupt(digest)

    b_ws = example(tmp_path, "B")
    b = run_dtbuild.build(b_ws, "//...", "--remote-cache", remote.url, env=cache_env(tmp_path, "B"), check=True)
    assert b.executed >= 1, b.stderr
    assert b.summary is not None and b.summary["actions"]["remote_cached"] >= 1
    found = warnings(b.stderr)
    assert len(found) == 1 and digest in found[0], b.stderr
    assert (b_ws / "dtbuild-out" / "web" / "bin" / "httpd").read_bytes() == httpd
    assert tree_snapshot(b_ws / "dtbuild-out") == tree_snapshot(a / "dtbuild-out")


def test_corrupt_small_blob_is_detected_and_not_used(remote, run_dtbuild, tree_snapshot, tmp_path) -> None:
    a = build_a(run_dtbuild, tmp_path, remote)
    # The image's JSON description: a small file output, fetched in a batch. (Not a site
    # page: B hashes that source into its own store and never needs the remote's copy.)
    small = (a / "dtbuild-out" / "images" / "web.json").read_bytes()
    assert len(small) < 256 * 1024
    digest = hashlib.sha256(small).hexdigest()
    assert digest in remote.blobs()
    remote.corrupt(digest)

    b_ws = example(tmp_path, "B")
    b = run_dtbuild.build(b_ws, "//...", "--remote-cache", remote.url, env=cache_env(tmp_path, "B"), check=True)
    assert b.executed >= 1, b.stderr
    found = warnings(b.stderr)
    assert len(found) == 1 and digest in found[0], b.stderr
    assert tree_snapshot(b_ws / "dtbuild-out") == tree_snapshot(a / "dtbuild-out")


# --------------------------------------------------------------------------- 4: no uploads


@pytest.mark.parametrize("how", ["flag", "file", "environment"])
def test_upload_false_uploads_nothing(remote, run_dtbuild, tmp_path, how) -> None:
    ws = example(tmp_path, "A")
    args: list[str] = []
    env = cache_env(tmp_path, "A")
    if how == "flag":
        args = ["--remote-cache", remote.url, "--remote-upload=false"]
    elif how == "file":
        with open(ws / "dtbuild.toml", "a") as f:
            f.write(f'\n[remote]\ncache = "{remote.url}"\nupload = false\n')
    else:
        env.update(DTBUILD_REMOTE_CACHE=remote.url, DTBUILD_REMOTE_UPLOAD="false")
    a = run_dtbuild.build(ws, "//...", *args, env=env, check=True)
    assert a.executed == EXAMPLE_ACTIONS
    moved = remote_section(a.summary)
    assert moved["cache"] == remote.url
    assert moved["uploaded_results"] == 0 and moved["uploaded_bytes"] == 0 and moved["warnings"] == []
    assert remote.ac_entries() == 0
    assert remote.blobs() == set()


# --------------------------------------------------------------------------- 5: credentials


@pytest.fixture
def auth_server(tmp_path: Path, require_tool: Callable[[str], str]) -> Iterator[servers_nginx.NginxCache]:
    _require_server("http", require_tool)
    with servers_nginx.start_nginx_cache(tmp_path / "nginx-auth", users={"ci": PASSWORD}) as server:
        yield server


def _nowhere(secret: str, run: Any, *roots: Path) -> None:
    """``secret`` is in none of the run's output, its summary, or any file under ``roots``."""
    assert secret not in run.stdout and secret not in run.stderr
    assert secret not in json.dumps(run.summary)
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert secret.encode() not in path.read_bytes(), f"{path} holds the password"


def test_right_credentials_from_the_environment_work(auth_server, run_dtbuild, tree_snapshot, tmp_path) -> None:
    creds = {"DTBUILD_REMOTE_USERNAME": "ci", "DTBUILD_REMOTE_PASSWORD": PASSWORD}
    a_ws = example(tmp_path, "A")
    a = run_dtbuild.build(a_ws, "//...", "--remote-cache", auth_server.url, env=cache_env(tmp_path, "A", **creds),
                          check=True)
    assert remote_section(a.summary)["uploaded_results"] == EXAMPLE_ACTIONS
    assert warnings(a.stderr) == []
    b_ws = example(tmp_path, "B")
    b = run_dtbuild.build(b_ws, "//...", "--remote-cache", auth_server.url, env=cache_env(tmp_path, "B", **creds),
                          check=True)
    assert b.executed == 0 and b.summary is not None and b.summary["actions"]["remote_cached"] == EXAMPLE_ACTIONS
    assert tree_snapshot(b_ws / "dtbuild-out") == tree_snapshot(a_ws / "dtbuild-out")
    _nowhere(PASSWORD, a, a_ws / "dtbuild-out")
    _nowhere(PASSWORD, b, b_ws / "dtbuild-out")


def test_wrong_password_from_the_environment_is_an_error(auth_server, run_dtbuild, tmp_path) -> None:
    ws = example(tmp_path, "A")
    b = run_dtbuild.build(ws, "//...", "--remote-cache", auth_server.url,
                          env=cache_env(tmp_path, "A", DTBUILD_REMOTE_USERNAME="ci", DTBUILD_REMOTE_PASSWORD=WRONG))
    assert b.exit_code != 0, b.stderr
    assert "$DTBUILD_REMOTE_PASSWORD" in b.stderr, b.stderr
    assert "Traceback" not in b.stderr
    _nowhere(WRONG, b, ws / "dtbuild-out", ws / ".dtbuild", tmp_path / "cache-A")


def test_wrong_password_in_the_url_is_an_error(auth_server, run_dtbuild, tmp_path) -> None:
    ws = example(tmp_path, "A")
    url = auth_server.url.replace("http://", f"http://ci:{WRONG}@")
    b = run_dtbuild.build(ws, "//...", "--remote-cache", url, env=cache_env(tmp_path, "A"))
    assert b.exit_code != 0, b.stderr
    assert "URL of --remote-cache" in b.stderr, b.stderr
    assert "Traceback" not in b.stderr
    _nowhere(WRONG, b, ws / "dtbuild-out", ws / ".dtbuild", tmp_path / "cache-A")


# --------------------------------------------------------------------------- 6: precedence


def test_command_line_over_environment_over_file(remote, run_dtbuild, tmp_path) -> None:
    scheme = remote.url.split(":", 1)[0]
    ws = example(tmp_path, "A")
    with open(ws / "dtbuild.toml", "a") as f:
        f.write(f'\n[remote]\ncache = "{dead_url(scheme)}"\n')
    env = cache_env(tmp_path, "A", DTBUILD_REMOTE_CACHE=dead_url(scheme))

    # The flag wins over both.
    a = run_dtbuild.build(ws, "//...", "--remote-cache", remote.url, env=env, check=True)
    assert remote_section(a.summary)["cache"] == remote.url and warnings(a.stderr) == [], a.stderr
    assert remote_section(a.summary)["uploaded_results"] == EXAMPLE_ACTIONS

    # Without the flag, the environment wins over the file.
    ws2 = example(tmp_path, "B")
    with open(ws2 / "dtbuild.toml", "a") as f:
        f.write(f'\n[remote]\ncache = "{dead_url(scheme)}"\n')
    b = run_dtbuild.build(ws2, "//...", env=cache_env(tmp_path, "B", DTBUILD_REMOTE_CACHE=remote.url), check=True)
    assert remote_section(b.summary)["cache"] == remote.url and warnings(b.stderr) == [], b.stderr
    assert b.summary is not None and b.summary["actions"]["remote_cached"] > 0

    # The file alone is used.
    ws3 = example(tmp_path, "C")
    with open(ws3 / "dtbuild.toml", "a") as f:
        f.write(f'\n[remote]\ncache = "{remote.url}"\n')
    c = run_dtbuild.build(ws3, "//...", env=cache_env(tmp_path, "C"), check=True)
    assert remote_section(c.summary)["cache"] == remote.url and warnings(c.stderr) == []
    assert c.summary is not None and c.summary["actions"]["remote_cached"] > 0


def test_remote_flag_with_a_separate_value_before_the_command(remote, run_dtbuild, tmp_path) -> None:
    ws = example(tmp_path, "A")
    code, _, err = run_dtbuild(ws, "--remote-cache", remote.url, "build", "//web:site", env=cache_env(tmp_path, "A"))
    assert code == 0, err
    assert f"remote cache {remote.url}: " in err


def test_remote_flag_before_the_command_wins_over_the_environment(remote, run_dtbuild, tmp_path) -> None:
    scheme = remote.url.split(":", 1)[0]
    ws = example(tmp_path, "A")
    b = run_dtbuild(ws, f"--remote-cache={remote.url}", "build", "//web:site",
                    env=cache_env(tmp_path, "A", DTBUILD_REMOTE_CACHE=dead_url(scheme)))
    assert b.exit_code == 0, b.stderr
    assert f"remote cache {remote.url}: " in b.stderr and warnings(b.stderr) == [], b.stderr


@pytest.mark.parametrize("where", ["--remote-cache", "$DTBUILD_REMOTE_CACHE", "[remote] cache in dtbuild.toml"])
def test_bad_url_is_exit_2_naming_its_origin(run_dtbuild, tmp_path, where) -> None:
    ws = example(tmp_path, "A")
    args: list[str] = []
    env = cache_env(tmp_path, "A")
    if where == "--remote-cache":
        args = ["--remote-cache", "ftp://x"]
    elif where == "$DTBUILD_REMOTE_CACHE":
        env["DTBUILD_REMOTE_CACHE"] = "ftp://x"
    else:
        with open(ws / "dtbuild.toml", "a") as f:
            f.write('\n[remote]\ncache = "ftp://x"\n')
    code, _, err = run_dtbuild(ws, "build", "//...", *args, env=env)
    assert code == 2, err
    assert where in err and "ftp://x" in err, err
    assert "http://HOST:PORT" in err, "the message should say what to write"
    assert "Traceback" not in err
