"""The registry client's parts with known answers: references, WWW-Authenticate
challenges, credentials from the environment and docker config (auths, credential
helpers), secret scrubbing; and its protocol against a small fake registry on
127.0.0.1: the Bearer token flow, retries, digest checks, redirects."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from dtbuild.plugins.builtin.registry_client import (
    Challenge,
    Credentials,
    Reference,
    RegistryClient,
    RegistryError,
    find_credentials,
    parse_challenges,
    parse_reference,
    scrub,
    select_platform,
)

USER = "bob"
PASSWORD = "Sup3r-secret-pw"
TOKEN = "tok-0123456789abcdef"


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize(("text", "expected"), [
    ("ubuntu", Reference("docker.io", "library/ubuntu")),
    ("nixos/nix:2.3", Reference("docker.io", "nixos/nix", "2.3")),
    ("ghcr.io/org/app@sha256:" + "a" * 64, Reference("ghcr.io", "org/app", None, "sha256:" + "a" * 64)),
    ("127.0.0.1:5000/team/app:v1", Reference("127.0.0.1:5000", "team/app", "v1")),
    ("localhost/app", Reference("localhost", "app")),
    ("index.docker.io/library/busybox:1", Reference("docker.io", "library/busybox", "1")),
    ("registry.example.com:443/a/b-c__d.e", Reference("registry.example.com:443", "a/b-c__d.e")),
])
def test_parse_reference(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(("text", "problem"), [
    ("Ubuntu", "lowercase"),
    ("ghcr.io/org/app@sha256:abc", "sha256:<64"),
    ("127.0.0.1:5000/app:bad tag", "not a valid tag"),
    ("", "not an image reference"),
    ("host.io//app", "not a valid repository path component"),
])
def test_parse_reference_rejects(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_reference(text)


def test_docker_hub_is_served_elsewhere() -> None:
    assert parse_reference("busybox").api_host == "registry-1.docker.io"
    assert parse_reference("127.0.0.1:5000/x").api_host == "127.0.0.1:5000"


# --------------------------------------------------------------------------- challenges


def test_parse_bearer_challenge_with_quoted_commas() -> None:
    header = ('Bearer realm="https://auth.example.com/token",service="registry.example.com",'
              'scope="repository:team/app:pull,push",error="insufficient_scope"')
    assert parse_challenges(header) == [Challenge("bearer", {
        "realm": "https://auth.example.com/token", "service": "registry.example.com",
        "scope": "repository:team/app:pull,push", "error": "insufficient_scope"})]


def test_parse_several_challenges_and_escapes() -> None:
    header = 'Basic realm="say \\"hi\\", please", Bearer realm=https://a/t, service=s'
    assert parse_challenges(header) == [
        Challenge("basic", {"realm": 'say "hi", please'}),
        Challenge("bearer", {"realm": "https://a/t", "service": "s"}),
    ]


def test_parse_odd_challenges() -> None:
    assert parse_challenges("") == []
    assert parse_challenges('BASIC Realm="x"') == [Challenge("basic", {"realm": "x"})]
    assert parse_challenges("Negotiate abc==, Basic realm=r") == [
        Challenge("negotiate", {}), Challenge("basic", {"realm": "r"})]


def test_select_platform() -> None:
    index = {"manifests": [
        {"digest": "sha256:1", "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
        {"digest": "sha256:2", "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"digest": "sha256:3", "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "platform": {"os": "linux", "architecture": "amd64"}},
    ]}
    assert select_platform(index, "linux", "amd64")["digest"] == "sha256:3"
    assert select_platform(index, "linux", "arm/v7")["digest"] == "sha256:2"
    assert select_platform(index, "linux", "arm")["digest"] == "sha256:1"
    assert select_platform(index, "windows", "amd64") is None


# --------------------------------------------------------------------------- credentials


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "PATH": str(tmp_path / "bin"), **extra}


def _docker_config(tmp_path: Path, config: dict[str, Any]) -> None:
    path = tmp_path / "home" / ".docker" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))


def test_no_credentials_anywhere(tmp_path: Path) -> None:
    assert find_credentials("registry.example.com", _env(tmp_path)) is None


def test_environment_credentials_and_their_scope(tmp_path: Path) -> None:
    env = _env(tmp_path, DTBUILD_REGISTRY_USER=USER, DTBUILD_REGISTRY_PASSWORD=PASSWORD)
    creds = find_credentials("registry.example.com", env)
    assert creds is not None and (creds.username, creds.secret) == (USER, PASSWORD)
    assert "DTBUILD_REGISTRY_USER" in creds.source
    env["DTBUILD_REGISTRY_HOST"] = "other.example.com"
    assert find_credentials("registry.example.com", env) is None
    assert find_credentials("other.example.com", env) is not None


def test_docker_config_auths(tmp_path: Path) -> None:
    auth = base64.b64encode(f"{USER}:{PASSWORD}:with-colon".encode()).decode()
    _docker_config(tmp_path, {"auths": {
        "https://registry.example.com:5000/v1/": {"auth": auth},
        "https://index.docker.io/v1/": {"username": "hubuser", "password": "hubpass"},
        "tokens.example.com": {"identitytoken": "refresh-me"},
    }})
    env = _env(tmp_path)
    creds = find_credentials("registry.example.com:5000", env)
    assert creds is not None and (creds.username, creds.secret) == (USER, PASSWORD + ":with-colon")
    assert "config.json" in creds.source
    hub = find_credentials("docker.io", env)
    assert hub is not None and (hub.username, hub.secret) == ("hubuser", "hubpass")
    token = find_credentials("tokens.example.com", env)
    assert token is not None and token.identity_token and token.secret == "refresh-me"
    assert find_credentials("registry.example.com", env) is None  # the port is part of the key


def test_docker_config_env_var_and_a_broken_auth(tmp_path: Path) -> None:
    elsewhere = tmp_path / "cfg"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text(json.dumps({"auths": {"r.example.com": {"auth": "bm8tY29sb24="}}}))
    with pytest.raises(RegistryError, match="not base64 of user:password"):
        find_credentials("r.example.com", _env(tmp_path, DOCKER_CONFIG=str(elsewhere)))


def _helper(tmp_path: Path, name: str, script: str) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    path = bindir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_credential_helpers(tmp_path: Path) -> None:
    _helper(tmp_path, "fake", 'read server\n'
            'if [ "$server" = "registry.example.com" ]; then\n'
            f'  echo \'{{"ServerURL":"registry.example.com","Username":"{USER}","Secret":"{PASSWORD}"}}\'\n'
            'else echo "credentials not found in native keychain"; exit 1; fi\n')
    _helper(tmp_path, "hub", 'read server\n[ "$server" = "https://index.docker.io/v1/" ] || exit 3\n'
            'echo \'{"Username":"<token>","Secret":"hub-refresh-token"}\'\n')
    _docker_config(tmp_path, {"credHelpers": {"registry.example.com": "fake", "other.example.com": "fake",
                                              "docker.io": "hub"}})
    env = _env(tmp_path)
    creds = find_credentials("registry.example.com", env)
    assert creds is not None and (creds.username, creds.secret) == (USER, PASSWORD)
    assert "docker-credential-fake" in creds.source
    assert find_credentials("other.example.com", env) is None  # "not found" is no error
    hub = find_credentials("docker.io", env)
    assert hub is not None and hub.identity_token and hub.secret == "hub-refresh-token"


def test_a_failing_or_missing_helper_is_a_clear_error_without_secrets(tmp_path: Path) -> None:
    _helper(tmp_path, "broken", f'echo "oops {PASSWORD}" >&2\nexit 2\n')
    _docker_config(tmp_path, {"credsStore": "broken", "credHelpers": {"gone.example.com": "missing"}})
    env = _env(tmp_path)
    with pytest.raises(RegistryError) as failing:
        find_credentials("registry.example.com", env)
    assert "docker-credential-broken" in str(failing.value) and "exit status 2" in str(failing.value)
    assert PASSWORD not in str(failing.value) + str(failing.value.hint)
    with pytest.raises(RegistryError, match=r"docker-credential-missing .* is not installed"):
        find_credentials("gone.example.com", env)


def test_credentials_never_show_their_secret() -> None:
    creds = Credentials(USER, PASSWORD, "test")
    assert PASSWORD not in repr(creds) and USER in repr(creds)
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    text = f"Authorization: Basic {basic} and {PASSWORD} again"
    assert scrub(text, creds.secrets()) == "Authorization: Basic *** and *** again"


# --------------------------------------------------------------------------- a fake registry


BLOB = b"layer bytes " * 1000
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"digest": BLOB_DIGEST, "size": len(BLOB)}, "layers": []}).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


class FakeRegistry:
    """A registry on 127.0.0.1 with a Bearer token service: it serves one manifest and one
    blob (in ``team/app``), records requests, and can fail, corrupt or redirect on demand."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.failures: dict[str, list[int]] = {}  # path -> statuses to answer first
        self.corrupt = False
        self.redirect_blobs = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                fake.requests.append((self.command, self.path, dict(self.headers)))
                pending = fake.failures.get(path)
                if pending:
                    status = pending.pop(0)
                    self._answer(status, b'{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}',
                                 {"Retry-After": "0"})
                    return
                if path == "/token":
                    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                    if self.headers.get("Authorization") != expected:
                        self._answer(401, b'{"details":"incorrect username or password"}')
                        return
                    self._answer(200, json.dumps({"token": TOKEN, "expires_in": 300}).encode())
                    return
                if path.startswith("/storage/"):
                    self._answer(200, BLOB, {"X-Saw-Authorization": str("Authorization" in self.headers)})
                    return
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    scope = "repository:team/app:pull" if path.startswith("/v2/team/app/") else ""
                    challenge = f'Bearer realm="{fake.url}/token",service="fake"'
                    if scope:
                        challenge += f',scope="{scope}"'
                    self._answer(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                                 {"WWW-Authenticate": challenge})
                    return
                if path == "/v2/":
                    self._answer(200, b"{}")
                elif path == f"/v2/team/app/manifests/{MANIFEST_DIGEST}":
                    self._answer(200, MANIFEST, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
                elif path == f"/v2/team/app/blobs/{BLOB_DIGEST}":
                    if fake.redirect_blobs:
                        self._answer(307, b"", {"Location": f"http://localhost:{fake.port}/storage/{BLOB_DIGEST}"})
                    else:
                        self._answer(200, BLOB[:-1] + b"!" if fake.corrupt else BLOB)
                else:
                    self._answer(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}')

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def count(self, path_prefix: str) -> int:
        return sum(1 for _, path, _ in self.requests if path.startswith(path_prefix))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    server = FakeRegistry()
    yield server
    server.close()


def _client(fake: FakeRegistry, password: str = PASSWORD, **kwargs: Any) -> RegistryClient:
    return RegistryClient(fake.host, tls_verify=False, credentials=Credentials(USER, password, "the test"),
                          backoff=0.01, **kwargs)


def test_bearer_token_flow(fake: FakeRegistry) -> None:
    with _client(fake) as client:
        manifest = client.get_manifest("team/app", MANIFEST_DIGEST)
        assert manifest.data == MANIFEST and manifest.digest == MANIFEST_DIGEST
        out = io.BytesIO()
        assert client.fetch_blob("team/app", BLOB_DIGEST, out, size=len(BLOB)) == len(BLOB)
        assert out.getvalue() == BLOB
        assert client.blob_size("team/app", "sha256:" + "0" * 64) is None
    tokens = [path for method, path, _ in fake.requests if path.startswith("/token")]
    assert len(tokens) == 1, "one token for the one scope, reused"
    assert "scope=repository%3Ateam%2Fapp%3Apull" in tokens[0] and "service=fake" in tokens[0]


def test_a_wrong_password_is_a_clear_error_without_the_password(fake: FakeRegistry) -> None:
    wrong = "Wr0ng-pa55-word"
    with _client(fake, password=wrong) as client, pytest.raises(RegistryError) as failed:
        client.get_manifest("team/app", MANIFEST_DIGEST)
    text = f"{failed.value} {failed.value.hint}"
    assert f"rejected the credentials of user '{USER}' (from the test)" in text
    assert wrong not in text and base64.b64encode(f"{USER}:{wrong}".encode()).decode() not in text


def test_anonymous_access_refused(fake: FakeRegistry) -> None:
    client = RegistryClient(fake.host, tls_verify=False, lookup_credentials=False, backoff=0.01)
    with client, pytest.raises(RegistryError, match="refused anonymous access") as failed:
        client.get_manifest("team/app", MANIFEST_DIGEST)
    assert "docker login" in str(failed.value.hint)


def test_retries_on_503_and_429(fake: FakeRegistry) -> None:
    path = f"/v2/team/app/manifests/{MANIFEST_DIGEST}"
    fake.failures[path] = [503, 429, 502]
    with _client(fake) as client:
        assert client.get_manifest("team/app", MANIFEST_DIGEST).digest == MANIFEST_DIGEST
    assert fake.count(path) == 4
    fake.failures[path] = [503] * 10
    with _client(fake, attempts=3) as client, pytest.raises(RegistryError, match="HTTP 503") as failed:
        client.get_manifest("team/app", MANIFEST_DIGEST)
    assert "UNAVAILABLE: try later" in str(failed.value)


def test_every_byte_is_checked(fake: FakeRegistry) -> None:
    fake.corrupt = True
    with _client(fake) as client, pytest.raises(RegistryError, match=r"have digest sha256:.*refusing"):
        client.fetch_blob("team/app", BLOB_DIGEST, io.BytesIO(), size=len(BLOB))
    with _client(fake) as client, pytest.raises(RegistryError, match=r"not found .*BLOB_UNKNOWN"):
        client.get_manifest("team/app", "sha256:" + "1" * 64)


def test_redirects_to_storage_drop_the_registry_credentials(fake: FakeRegistry) -> None:
    fake.redirect_blobs = True
    out = io.BytesIO()
    with _client(fake) as client:
        client.fetch_blob("team/app", BLOB_DIGEST, out, size=len(BLOB))
    assert out.getvalue() == BLOB
    storage = [headers for _, path, headers in fake.requests if path.startswith("/storage/")]
    assert storage and all("Authorization" not in headers for headers in storage)


def test_an_unreachable_registry() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    client = RegistryClient(f"127.0.0.1:{port}", tls_verify=False, lookup_credentials=False, attempts=2,
                            backoff=0.01)
    with client, pytest.raises(RegistryError, match=f"cannot reach the registry 127.0.0.1:{port}: connection refused"):
        client.blob_size("team/app", BLOB_DIGEST)
    strict = RegistryClient(f"127.0.0.1:{port}", lookup_credentials=False, attempts=1)
    with strict, pytest.raises(RegistryError, match="connection refused"):
        strict.ping()


def test_tls_mismatch_suggests_insecure(fake: FakeRegistry) -> None:
    client = RegistryClient(fake.host, lookup_credentials=False, attempts=1)
    with client, pytest.raises(RegistryError, match="TLS") as failed:
        client.ping()
    assert "--insecure" in str(failed.value.hint) and "tls_verify = False" in str(failed.value.hint)
