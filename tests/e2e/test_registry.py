"""Registries for real: Debian's docker-registry (distribution 2.8) on 127.0.0.1 with a
temporary storage directory, with and without htpasswd auth. dtbuild pushes to it,
skopeo reads what was pushed, pull_image pulls it back by digest, runc runs an image
built on the pulled one, and podman loads an image with `dtbuild load`."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

USER = "alice"
PASSWORD = "Corr3ct-h0rse-battery"
WRONG_PASSWORD = "wr0ng-Pa55word-xyz"
BUSYBOX_APPLETS = ["sh", "cat", "echo", "id", "ls", "pwd", "env"]
START_TIMEOUT = 20.0


# --------------------------------------------------------------------------- the registry


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bcrypt_htpasswd(user: str, password: str) -> str:
    """``user:$2y$...`` for docker-registry's htpasswd auth (bcrypt only): with apache2-utils'
    htpasswd, else python's bcrypt, else libxcrypt through the crypt module (Debian's
    libcrypt does bcrypt)."""
    if shutil.which("htpasswd"):
        done = subprocess.run(["htpasswd", "-nbB", user, password], capture_output=True, text=True, check=True)
        return done.stdout.strip()
    try:
        import bcrypt  # type: ignore[import-not-found]

        return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()}"
    except ImportError:
        pass
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt  # removed in Python 3.13

            hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
        except (ImportError, AttributeError, OSError):
            hashed = None
    if not hashed or not hashed.startswith("$2"):
        message = "no bcrypt: install apache2-utils (htpasswd) or the bcrypt package"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return f"{user}:{hashed}"


class Registry:
    """A docker-registry process on 127.0.0.1:<port>, storing under ``root/storage``.
    ``stop``/``kill`` and ``start`` keep the port and the storage (a restart)."""

    def __init__(self, root: Path, *, auth: bool) -> None:
        self.root = root
        self.storage = root / "storage"
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.auth = auth
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "registry.log"
        root.mkdir(parents=True)
        self.storage.mkdir()
        lines = [
            "version: 0.1",
            "log:", "  level: warn", "  accesslog:", "    disabled: true",
            "storage:", "  filesystem:", f"    rootdirectory: {self.storage}", "  delete:", "    enabled: true",
            "http:", f"  addr: {self.host}", "  secret: dtbuild-test-secret",
        ]
        if auth:
            (root / "htpasswd").write_text(_bcrypt_htpasswd(USER, PASSWORD) + "\n")
            lines += ["auth:", "  htpasswd:", "    realm: dtbuild-test", f"    path: {root / 'htpasswd'}"]
        self.config = root / "config.yml"
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"docker-registry exited with {self.proc.returncode}:\n{self.log.read_text()}",
                            pytrace=False)
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2):
                    return
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"docker-registry did not answer on {self.host} within {START_TIMEOUT:.0f} s:\n"
                    f"{self.log.read_text()}", pytrace=False)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def uploads_in_progress(self) -> bool:
        """Whether some blob upload session is open (docker-registry keeps each under
        repositories/<name>/_uploads/<uuid>/ until it completes)."""
        repositories = self.storage / "docker" / "registry" / "v2" / "repositories"
        return any(True for _ in repositories.glob("**/_uploads/*")) if repositories.exists() else False

    def skopeo_inspect(self, ref: str, *, raw: bool = False, creds: bool = False) -> dict:
        argv = ["skopeo", "inspect", "--tls-verify=false"]
        if raw:
            argv.append("--raw")
        if creds:
            argv.append(f"--creds={USER}:{PASSWORD}")
        done = subprocess.run([*argv, f"docker://{self.host}/{ref}"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture
def registry(tmp_path: Path, require_tool: Callable[[str], str]) -> Iterator[Callable[..., Registry]]:
    """``registry(auth=False)``: a running docker-registry on 127.0.0.1, stopped at teardown."""
    require_tool("docker-registry")
    require_tool("skopeo")
    started: list[Registry] = []

    def start(auth: bool = False) -> Registry:
        reg = Registry(tmp_path / f"registry-{len(started)}", auth=auth)
        started.append(reg)
        reg.start()
        return reg

    yield start
    for reg in started:
        reg.kill()


# --------------------------------------------------------------------------- workspaces


@pytest.fixture
def images_ws(workspace: Callable[..., Path], require_tool: Callable[[str], str]) -> Path:
    """tests/fixtures/images with busybox in its base image (//app:app_gz, app_none, app_zstd)."""
    require_tool("busybox")
    ws = workspace("images")
    bindir = ws / "base" / "rootfs" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", bindir / "busybox")
    for applet in BUSYBOX_APPLETS:
        (bindir / applet).symlink_to("busybox")
    return ws


def _description(ws: Path, package: str, name: str) -> dict:
    return json.loads((ws / "dtbuild-out" / package / f"{name}.json").read_text())


def _pushed(stdout: str) -> dict[str, str]:
    """``REF@DIGEST`` lines of a push -> {REF: DIGEST}."""
    return dict(line.rsplit("@", 1) for line in stdout.splitlines() if "@sha256:" in line)


def _counts(stderr: str) -> tuple[int, int, int]:
    """(uploaded, mounted, skipped) from the summary line of a one-repository push."""
    m = re.search(r"(\d+) uploaded .*?, (\d+) mounted.*?, (\d+) skipped", stderr)
    assert m, stderr
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _action_results(run_dtbuild, ws: Path) -> int:
    code, out, err = run_dtbuild(ws, "cache", "stats")
    assert code == 0, err
    return int(next(line for line in out.splitlines() if line.startswith("action results:")).split(":")[1])


# --------------------------------------------------------------------------- push


def test_push_then_skopeo_reports_the_digest(images_ws, run_dtbuild, registry) -> None:
    reg = registry()
    code, out, err = run_dtbuild(images_ws, "push", "//app:app_gz", f"{reg.host}/team/app",
                                 f"{reg.host}/team/app:stable", "--insecure")
    assert code == 0, err
    run_dtbuild(images_ws, "build", "//app:app_gz", check=True)
    digest = _description(images_ws, "app", "app_gz")["manifest_digest"]
    # No tag on the REF: the image's own (v1).
    assert _pushed(out) == {f"{reg.host}/team/app:v1": digest, f"{reg.host}/team/app:stable": digest}
    assert _counts(err) == (3, 0, 0)
    inspected = reg.skopeo_inspect("team/app:v1")
    assert inspected["Digest"] == digest
    assert sorted(inspected["RepoTags"]) == ["stable", "v1"]
    assert inspected["Env"] == ["PATH=/bin", "GREETING=hello from the app", "MODE=test"]
    assert reg.skopeo_inspect("team/app:stable")["Digest"] == digest

    # Docker media types on request; zstd layers cannot have them.
    code, out, err = run_dtbuild(images_ws, "push", "//app:app_gz", f"{reg.host}/docker/app:v1", "--insecure",
                                 "--format", "docker")
    assert code == 0, err
    raw = reg.skopeo_inspect("docker/app:v1", raw=True)
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert {layer["mediaType"] for layer in raw["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar", "application/vnd.docker.image.rootfs.diff.tar.gzip"}
    code, _, err = run_dtbuild(images_ws, "push", "//app:app_zstd", f"{reg.host}/docker/app:z", "--insecure",
                               "--format", "docker")
    assert code == 2 and "--format oci" in err, err


def test_pushes_send_only_new_blobs_and_mount_from_other_repositories(images_ws, run_dtbuild, registry) -> None:
    reg = registry()
    code, _, err = run_dtbuild(images_ws, "push", "//app:app_gz", f"{reg.host}/app", "--insecure")
    assert code == 0, err
    assert _counts(err) == (3, 0, 0)  # base layer, app layer, config

    code, _, err = run_dtbuild(images_ws, "push", "//app:app_gz", f"{reg.host}/app", "--insecure")
    assert code == 0, err
    assert _counts(err) == (0, 0, 3)

    # app_none shares the busybox base layer with app_gz; its app layer and config are new.
    code, _, err = run_dtbuild(images_ws, "push", "//app:app_none", f"{reg.host}/app:none", "--insecure")
    assert code == 0, err
    assert _counts(err) == (2, 0, 1)

    # In another repository, the shared layer is mounted from the first, not sent again.
    code, out, err = run_dtbuild(images_ws, "push", "//app:app_none", f"{reg.host}/elsewhere/app", "--insecure")
    assert code == 0, err
    assert _counts(err) == (0, 3, 0), err
    assert "mounted from app" in err
    digest = next(iter(_pushed(out).values()))
    assert reg.skopeo_inspect("elsewhere/app:v1")["Digest"] == digest


# --------------------------------------------------------------------------- pull


PULL_BUILD = """\
pull_image(
    name = "pulled",
    image_name = "{image}",
    image_digest = "{digest}",
    final_image_name = "base",
    final_image_tag = "pulled",
    tls_verify = False,{extra}
)

files(name = "extra", srcs = ["extra.txt"], prefix = "/app")

image(
    name = "derived",
    tag = "1",
    from_image = ":pulled",
    copy_to_root = [":extra"],
    config = {{"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["cat /app/hello.txt /app/extra.txt; id -u"], "User": "0:0"}},
)
"""


def _pull_workspace(write_workspace, image: str, digest: str, extra: str = "") -> Path:
    return write_workspace({"derived/BUILD": PULL_BUILD.format(image=image, digest=digest, extra=extra),
                            "derived/extra.txt": "added on the pulled image\n"}, name="pullws")


def _push_app(images_ws: Path, run_dtbuild, reg: Registry, repo: str = "app", env=None) -> str:
    code, out, err = run_dtbuild(images_ws, "push", "//app:app_gz", f"{reg.host}/{repo}", "--insecure", env=env)
    assert code == 0, err
    return next(iter(_pushed(out).values()))


def test_pull_by_digest_builds_an_image_that_runs_in_runc(images_ws, write_workspace, run_dtbuild, registry,
                                                          require_tool, tmp_path) -> None:
    for tool in ("umoci", "runc"):
        require_tool(tool)
    reg = registry()
    digest = _push_app(images_ws, run_dtbuild, reg)
    ws = _pull_workspace(write_workspace, f"{reg.host}/app", digest)
    result = run_dtbuild.build(ws, "//derived:pulled", "//derived:derived", check=True)
    pulled = _description(ws, "derived", "pulled")
    assert pulled["manifest_digest"] == digest  # an OCI manifest is kept byte for byte
    assert pulled["repo_tags"] == ["base:pulled"]
    assert [layer["media_type"] for layer in pulled["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip"]
    assert result.executed > 0
    # NAME.tar is a docker-archive skopeo reads.
    done = subprocess.run(["skopeo", "inspect", f"docker-archive:{ws / 'dtbuild-out/derived/pulled.tar'}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["Layers"] == [layer["diff_id"] for layer in pulled["layers"]]

    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{ws / 'dtbuild-out/derived/derived.oci'}:1", str(bundle)],
                   check=True, capture_output=True, text=True)
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["terminal"] = False
    (bundle / "config.json").write_text(json.dumps(config))
    name = f"dtbuild-pull-{os.getpid()}"
    done = subprocess.run(["runc", "run", "-b", str(bundle), name], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    subprocess.run(["runc", "delete", "--force", name], capture_output=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["hello from a file", "added on the pulled image", "0"]

    # Once pulled, no network: with the registry gone, a change on top still builds.
    reg.stop()
    (ws / "derived" / "extra.txt").write_text("changed offline\n")
    result = run_dtbuild.build(ws, "//derived:derived", check=True)
    assert result.executed >= 1
    _, out, _ = run_dtbuild(ws, "explain", "//derived:pulled", check=True)
    assert any(line.startswith("ImagePull //derived:pulled") and line.endswith(": cached")
               for line in out.splitlines()), out


def test_wrong_digest_or_sha256_fails_and_caches_nothing(images_ws, write_workspace, run_dtbuild, registry) -> None:
    reg = registry()
    digest = _push_app(images_ws, run_dtbuild, reg)
    wrong = "sha256:" + hashlib.sha256(b"not this image").hexdigest()
    ws = _pull_workspace(write_workspace, f"{reg.host}/app", wrong)
    before = _action_results(run_dtbuild, ws)
    code, _, err = run_dtbuild(ws, "build", "//derived:pulled")
    assert code == 1, err
    assert wrong in err and "does not exist" in err and "derived/BUILD:1" in err
    assert _action_results(run_dtbuild, ws) == before
    assert not (ws / "dtbuild-out" / "derived" / "pulled.json").exists()

    # sha256 checks NAME.tar, the uncompressed docker-archive: a wrong one names the right one.
    build = ws / "derived" / "BUILD"
    build.write_text(PULL_BUILD.format(image=f"{reg.host}/app", digest=digest, extra=f'\n    sha256 = "{"0" * 64}",'))
    code, _, err = run_dtbuild(ws, "build", "//derived:pulled")
    assert code == 1, err
    assert _action_results(run_dtbuild, ws) == before
    actual = re.search(r"set sha256 = \"([0-9a-f]{64})\"", err)
    assert actual, err
    build.write_text(PULL_BUILD.format(image=f"{reg.host}/app", digest=digest,
                                       extra=f'\n    sha256 = "{actual.group(1)}",'))
    run_dtbuild(ws, "build", "//derived:pulled", check=True)
    tar = ws / "dtbuild-out" / "derived" / "pulled.tar"
    assert hashlib.sha256(tar.read_bytes()).hexdigest() == actual.group(1)


def test_pull_resolves_an_index_and_converts_docker_manifests(images_ws, write_workspace, run_dtbuild,
                                                             registry) -> None:
    from dtbuild.plugins.builtin.registry_client import OCI_INDEX, RegistryClient

    reg = registry()
    oci_digest = _push_app(images_ws, run_dtbuild, reg)
    code, out, err = run_dtbuild(images_ws, "push", "//app:app_gz", f"{reg.host}/app:docker", "--insecure",
                                 "--format", "docker")
    assert code == 0, err
    docker_digest = next(iter(_pushed(out).values()))
    # A multi-platform index: the OCI manifest for linux/amd64, the Docker one for linux/arm64.
    with RegistryClient(reg.host, tls_verify=False, lookup_credentials=False) as client:
        entries = []
        for digest, arch in ((oci_digest, "amd64"), (docker_digest, "arm64")):
            manifest = client.get_manifest("app", digest)
            entries.append({"mediaType": manifest.media_type, "digest": digest, "size": len(manifest.data),
                            "platform": {"os": "linux", "architecture": arch}})
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
        index_digest = client.put_manifest("app", "multi", index, OCI_INDEX)

    ws = _pull_workspace(write_workspace, f"{reg.host}/app", index_digest)
    run_dtbuild(ws, "build", "//derived:pulled", check=True)
    assert _description(ws, "derived", "pulled")["manifest_digest"] == oci_digest

    build = ws / "derived" / "BUILD"
    build.write_text(PULL_BUILD.format(image=f"{reg.host}/app", digest=index_digest, extra='\n    arch = "arm64",'))
    run_dtbuild(ws, "build", "//derived:pulled", "//derived:derived", check=True)
    pulled = _description(ws, "derived", "pulled")
    # The Docker manifest became an OCI one (new digest); its blobs are the same.
    assert pulled["manifest_digest"] != docker_digest
    assert [layer["media_type"] for layer in pulled["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip"]
    raw = json.loads((ws / "dtbuild-out/derived/pulled.oci/blobs/sha256" / pulled["manifest_digest"][7:]).read_text())
    assert raw["mediaType"] == "application/vnd.oci.image.manifest.v1+json"

    build.write_text(PULL_BUILD.format(image=f"{reg.host}/app", digest=index_digest, extra='\n    arch = "s390x",'))
    code, _, err = run_dtbuild(ws, "build", "//derived:pulled")
    assert code == 1
    assert "without a linux/s390x image (it has: linux/amd64, linux/arm64)" in err


# --------------------------------------------------------------------------- authentication


def test_htpasswd_registry_credentials_and_a_wrong_password(images_ws, write_workspace, run_dtbuild, registry,
                                                            tmp_path) -> None:
    reg = registry(auth=True)
    target = f"{reg.host}/private/app"
    home = tmp_path / "home"
    home.mkdir()
    no_creds = {"HOME": str(home), "DOCKER_CONFIG": None, "REGISTRY_AUTH_FILE": None}

    code, out, err = run_dtbuild(images_ws, "push", "//app:app_gz", target, "--insecure", env=no_creds)
    assert code == 1
    assert f"the registry {reg.host} requires a user name and password" in err
    assert "DTBUILD_REGISTRY_USER" in err  # the hint says how to give them

    wrong = {**no_creds, "DTBUILD_REGISTRY_USER": USER, "DTBUILD_REGISTRY_PASSWORD": WRONG_PASSWORD}
    code, out, err = run_dtbuild(images_ws, "push", "//app:app_gz", target, "--insecure", env=wrong)
    assert code == 1
    assert f"rejected the credentials of user '{USER}'" in err
    assert WRONG_PASSWORD not in out + err
    assert base64.b64encode(f"{USER}:{WRONG_PASSWORD}".encode()).decode() not in out + err

    # ~/.docker/config.json with a base64 "auth", as `docker login` writes it.
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (home / ".docker").mkdir()
    (home / ".docker" / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
    code, out, err = run_dtbuild(images_ws, "push", "//app:app_gz", target, "--insecure", env=no_creds)
    assert code == 0, err
    digest = next(iter(_pushed(out).values()))
    assert PASSWORD not in out + err and auth not in out + err
    assert reg.skopeo_inspect("private/app:v1", creds=True)["Digest"] == digest

    # pull_image through a credential helper (docker-credential-NAME get), named in DOCKER_CONFIG.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-dtbtest"
    helper.write_text("#!/bin/sh\nread server\n"
                      f"[ \"$server\" = \"{reg.host}\" ] || {{ echo 'credentials not found in native keychain'; "
                      "exit 1; }\n"
                      f"printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' "
                      "\"$server\"\n")
    helper.chmod(0o755)
    docker_config = tmp_path / "docker-config"
    docker_config.mkdir()
    (docker_config / "config.json").write_text(json.dumps({"credHelpers": {reg.host: "dtbtest"}}))
    ws = _pull_workspace(write_workspace, f"{reg.host}/private/app", digest)
    env = {**no_creds, "DOCKER_CONFIG": str(docker_config), "PATH": f"{bindir}:{os.environ['PATH']}"}
    code, out, err = run_dtbuild(ws, "build", "//derived:pulled", "//derived:derived", env=env)
    assert code == 0, err
    assert PASSWORD not in out + err
    assert _description(ws, "derived", "pulled")["manifest_digest"] == digest

    # A wrong password fails the pull the same clear way (with an empty cache, it must pull).
    code, out, err = run_dtbuild(ws, "build", "//derived:pulled",
                                 env={**wrong, "DTBUILD_CACHE_DIR": str(tmp_path / "other-cache")})
    assert code == 1, err
    assert f"rejected the credentials of user '{USER}'" in err and "ImagePull failed" in err
    assert WRONG_PASSWORD not in out + err


# --------------------------------------------------------------------------- interrupted push


@pytest.mark.slow
def test_registry_stopped_mid_push_fails_clearly_then_the_same_push_completes(write_workspace, run_dtbuild,
                                                                               registry) -> None:
    # 96 MiB of incompressible data, uncompressed: the upload lasts long enough to stop
    # the registry while it runs (it is killed as soon as an upload session opens).
    ws = write_workspace({
        "big/BUILD": 'files(name = "data", srcs = ["blob.bin"], prefix = "/data")\n'
                     'image(name = "big", tag = "1", copy_to_root = [":data"], compressor = "none")\n',
        "big/blob.bin": os.urandom(96 << 20),
    }, name="bigws")
    run_dtbuild(ws, "build", "//big:big", check=True)
    reg = registry()
    proc = run_dtbuild.popen(ws, "push", "//big:big", f"{reg.host}/big", "--insecure", stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not reg.uploads_in_progress():
            assert proc.poll() is None, "the push ended before any upload started"
            assert time.monotonic() < deadline, "no upload started within 60 s"
            time.sleep(0.005)
        reg.kill()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.decode()
    assert proc.returncode == 1, text
    assert f"cannot reach the registry {reg.host}" in text, text
    assert "run the same command again" in text

    reg.start()
    code, out, err = run_dtbuild(ws, "push", "//big:big", f"{reg.host}/big", "--insecure")
    assert code == 0, err
    digest = next(iter(_pushed(out).values()))
    run_dtbuild(ws, "build", "//big:big", check=True)
    assert digest == _description(ws, "big", "big")["manifest_digest"]
    assert reg.skopeo_inspect("big:1")["Digest"] == digest


# --------------------------------------------------------------------------- load


def test_load_into_podman(images_ws, run_dtbuild, require_tool, tmp_path, request) -> None:
    podman = require_tool("podman")
    root = tmp_path / "podman-root"
    runroot = Path(tempfile.mkdtemp(prefix="dtb-podman-", dir="/tmp"))  # podman: at most 50 characters
    request.addfinalizer(lambda: shutil.rmtree(runroot, ignore_errors=True))
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{root}"\nrunroot = "{runroot}"\n')
    env = {"CONTAINERS_STORAGE_CONF": str(conf)}
    run_dtbuild(images_ws, "build", "//app:app_gz", check=True)
    image_id = _description(images_ws, "app", "app_gz")["config_digest"].removeprefix("sha256:")
    # A docker whose daemon does not answer: load picks podman.
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    (fakebin / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    (fakebin / "docker").chmod(0o755)
    env["PATH"] = f"{fakebin}:{os.environ['PATH']}"
    # app_gz's archive is gzip-compressed; podman 4.3 reads only plain docker-archives, and
    # load streams one.
    code, out, err = run_dtbuild(images_ws, "load", "//app:app_gz", env=env)
    assert code == 0, err
    assert "loaded //app:app_gz into podman: app:v1" in out
    done = subprocess.run([podman, "--storage-driver", "vfs", "--root", str(root), "--runroot", str(runroot),
                           "images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    assert f"localhost/app:v1 {image_id[:12]}" in done.stdout.splitlines(), done.stdout


def test_load_without_docker_or_podman_says_so(images_ws, run_dtbuild, tmp_path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    code, _, err = run_dtbuild(images_ws, "load", "//app:app_gz", env={"PATH": str(empty)})
    assert code == 1
    assert "needs docker or podman, and neither is installed" in err
    assert "dtbuild stream" in err
