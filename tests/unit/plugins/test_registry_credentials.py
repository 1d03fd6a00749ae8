"""Registry credentials go only to the scheme, host and port they were given for.

Two attacks, each against loopback servers that record every request:

* an https registry (Basic auth) redirects a blob to ``http://`` on the same host and
  port: the plain-http request must carry no Authorization header;
* a Bearer challenge names a token service on another host over plain ``http://``: the
  password must not be sent there (unless the registry was given as insecure).

The https servers use a self-signed certificate made with ``openssl``; verified
clients trust it through ``SSL_CERT_FILE``. One port speaks both TLS and plain HTTP
(it peeks at the first byte), which is what makes "same netloc, other scheme" testable.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from dtbuild.plugins.builtin.registry_client import Credentials, RegistryClient, RegistryError

USER = "alice"
PASSWORD = "Cl3ar-text-never-9"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
TOKEN = "tok-feedc0ffee0123456789"
BLOB = b"blob bytes " * 500
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert, key)."""
    from shutil import which

    if which("openssl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is not installed, and CI=true: the CI image must provide it", pytrace=False)
        pytest.skip("openssl is not installed")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


class Server:
    """A loopback HTTP server whose port speaks TLS to clients that start a handshake and
    plain HTTP to the others. ``handle(server, handler)`` answers each request; every
    request is recorded as (tls, method, path, headers)."""

    def __init__(self, certificate: tuple[Path, Path], handle: Callable[[Server, Any], None],
                 host: str = "127.0.0.1") -> None:
        self.requests: list[tuple[bool, str, str, dict[str, str]]] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(certificate[0]), str(certificate[1]))
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                tls = isinstance(self.connection, ssl.SSLSocket)
                server.requests.append((tls, self.command, self.path, dict(self.headers)))
                length = int(self.headers.get("Content-Length") or 0)
                if length and self.command != "HEAD":
                    self.rfile.read(length)
                handle(server, self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_GET

        class DualServer(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = self.socket.accept()
                sock.settimeout(10)
                if sock.recv(1, socket.MSG_PEEK) == b"\x16":  # a TLS ClientHello
                    sock = context.wrap_socket(sock, server_side=True)
                return sock, addr

        self.httpd = DualServer((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def saw_password(self, *, tls: bool | None = None) -> bool:
        """Whether any request (over TLS or not, or either) carried the Basic credentials
        or the bearer token."""
        for was_tls, _, _, headers in self.requests:
            if tls is not None and was_tls != tls:
                continue
            auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
            if auth in (BASIC, f"Bearer {TOKEN}"):
                return True
        return False

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers(certificate: tuple[Path, Path]) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(handle: Callable[[Server, Any], None], host: str = "127.0.0.1") -> Server:
        server = Server(certificate, handle, host)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def trust(certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Verified TLS clients trust the test certificate."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))


def _creds() -> Credentials:
    return Credentials(USER, PASSWORD, "the test")


# --------------------------------------------------------------------------- redirects


def _basic_registry_redirecting_to_http(server: Server, h: Any) -> None:
    path = h.path.split("?")[0]
    if path.startswith("/storage/"):
        h.answer(200, BLOB)
        return
    if h.headers.get("Authorization") != BASIC:
        h.answer(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": 'Basic realm="fake"'})
        return
    if path == "/v2/":
        h.answer(200, b"{}")
    elif path == f"/v2/team/app/blobs/{BLOB_DIGEST}":
        # The same host and port as the registry (the same netloc), but plain http.
        h.answer(307, b"", {"Location": f"http://127.0.0.1:{server.port}/storage/{BLOB_DIGEST}"})
    else:
        h.answer(404)


def test_a_redirect_that_downgrades_to_http_on_the_same_host_drops_the_credentials(servers) -> None:
    registry = servers(_basic_registry_redirecting_to_http)
    client = RegistryClient(f"127.0.0.1:{registry.port}", tls_verify=False, credentials=_creds(), backoff=0.01)
    out = io.BytesIO()
    with client:
        assert client.fetch_blob("team/app", BLOB_DIGEST, out, size=len(BLOB)) == len(BLOB)
    assert out.getvalue() == BLOB
    plain = [r for r in registry.requests if not r[0]]
    assert plain and all(r[2].startswith("/storage/") for r in plain), registry.requests
    assert not registry.saw_password(tls=False), "the credentials went over plain http"
    assert all("authorization" not in {k.lower() for k in r[3]} for r in plain)
    # ... and the registry itself, over https, did get them.
    assert registry.saw_password(tls=True)


def test_an_upload_location_on_another_origin_gets_no_credentials(servers) -> None:
    """A registry may name any URL as the upload location: only its own origin gets the
    credentials."""
    elsewhere = servers(lambda server, h: h.answer(201, b"", {"Docker-Content-Digest": BLOB_DIGEST}),
                        host="127.0.0.1")

    def handle(server: Server, h: Any) -> None:
        if h.headers.get("Authorization") != BASIC:
            h.answer(401, b"", {"WWW-Authenticate": 'Basic realm="fake"'})
        elif h.path == "/v2/":
            h.answer(200, b"{}")
        elif h.command == "POST":
            h.answer(202, b"", {"Location": f"http://localhost:{elsewhere.port}/upload/1"})
        else:
            h.answer(404)

    registry = servers(handle)
    with RegistryClient(f"127.0.0.1:{registry.port}", tls_verify=False, credentials=_creds(),
                        backoff=0.01) as client:
        assert client.upload_blob("team/app", BLOB_DIGEST, len(BLOB), lambda: io.BytesIO(BLOB)) == "uploaded"
    assert elsewhere.requests and not elsewhere.saw_password()
    assert registry.saw_password(tls=True)


# --------------------------------------------------------------------------- token realms


def _token_service(server: Server, h: Any) -> None:
    if h.headers.get("Authorization") != BASIC:
        h.answer(401, b'{"details":"incorrect username or password"}')
    else:
        h.answer(200, json.dumps({"token": TOKEN, "expires_in": 300}).encode())


def _bearer_registry(realm: Callable[[], str]) -> Callable[[Server, Any], None]:
    def handle(server: Server, h: Any) -> None:
        path = h.path.split("?")[0]
        if h.headers.get("Authorization") != f"Bearer {TOKEN}":
            h.answer(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                     {"WWW-Authenticate": f'Bearer realm="{realm()}",service="fake"'})
        elif path == "/v2/":
            h.answer(200, b"{}")
        elif path == f"/v2/team/app/blobs/{BLOB_DIGEST}":
            h.answer(200, BLOB)
        else:
            h.answer(404)

    return handle


def test_a_token_realm_on_another_host_over_http_gets_no_credentials(servers, trust) -> None:
    tokens = servers(_token_service, host="127.0.0.1")
    registry = servers(_bearer_registry(lambda: f"http://localhost:{tokens.port}/token"))
    client = RegistryClient(f"127.0.0.1:{registry.port}", credentials=_creds(), backoff=0.01, attempts=1)
    with client, pytest.raises(RegistryError) as failed:
        client.fetch_blob("team/app", BLOB_DIGEST, io.BytesIO(), size=len(BLOB))
    assert not tokens.saw_password(), "the password went to a plain-http token service on another host"
    text = f"{failed.value} {failed.value.hint}"
    assert "plain http" in text and f"localhost:{tokens.port}" in text and "--insecure" in text
    assert PASSWORD not in text
    assert all(r[0] for r in registry.requests), "the registry was reached over https only"


def test_a_token_realm_over_https_gets_the_credentials(servers, trust) -> None:
    tokens = servers(_token_service, host="127.0.0.1")
    registry = servers(_bearer_registry(lambda: f"https://localhost:{tokens.port}/token"))
    out = io.BytesIO()
    with RegistryClient(f"127.0.0.1:{registry.port}", credentials=_creds(), backoff=0.01) as client:
        client.fetch_blob("team/app", BLOB_DIGEST, out, size=len(BLOB))
    assert out.getvalue() == BLOB
    assert tokens.saw_password(tls=True) and not tokens.saw_password(tls=False)


def test_an_insecure_registry_may_use_a_plain_http_realm(servers) -> None:
    """--insecure (tls_verify = False) is the explicit permission for plain http."""
    tokens = servers(_token_service, host="127.0.0.1")
    registry = servers(_bearer_registry(lambda: f"http://localhost:{tokens.port}/token"))
    out = io.BytesIO()
    with RegistryClient(f"127.0.0.1:{registry.port}", tls_verify=False, credentials=_creds(),
                        backoff=0.01) as client:
        client.fetch_blob("team/app", BLOB_DIGEST, out, size=len(BLOB))
    assert out.getvalue() == BLOB and tokens.saw_password(tls=False)


def test_registry_answers_are_escaped_in_messages(servers) -> None:
    """A registry's error text reaches the terminal with its control characters escaped."""
    def handle(server: Server, h: Any) -> None:
        if h.path == "/v2/":
            h.answer(200, b"{}")
        else:
            h.answer(500, json.dumps({"errors": [{"code": "X", "message": "boom\x1b]0;pwned\x07\u202e"}]}).encode())

    registry = servers(handle)
    with RegistryClient(f"127.0.0.1:{registry.port}", tls_verify=False, lookup_credentials=False, attempts=1,
                        backoff=0.01) as client, pytest.raises(RegistryError) as failed:
        client.get_manifest("team/app", "latest")
    text = str(failed.value)
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "boom\\x1b]0;pwned\\x07\\u202e" in text
