"""Network reads are bounded in size and time: registries and download servers on
127.0.0.1 that never answer, trickle one byte at a time, or send an endless body make
dtbuild fail within the configured limits, with an error that says which limit and how
to raise it; never a hang or a process that eats the machine's memory.

(The ``[network]`` settings: docs/registries.md, "Limits".)"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from dtbuild.engine.workspace import find_workspace
from dtbuild.plugins.builtin.network_limits import NetworkLimits, NetworkSettingError, limits_from, parse_limits
from dtbuild.plugins.builtin.registry_client import RegistryClient, RegistryError

#: Bytes the endless server sends at most (it stops there so that a client that does
#: read everything fails the test instead of the machine).
ENDLESS_TOTAL = 96 << 20
TRICKLE_LENGTH = 1 << 20
DIGEST = "sha256:" + "ab" * 32


class HostileServer:
    """HTTP on 127.0.0.1: ``/v2/`` answers at once (so a registry client gets past its
    ping); other paths behave as ``mode`` says:

    * ``silent``: read the request, never answer;
    * ``trickle``: announce ``TRICKLE_LENGTH`` bytes, send one every 0.2 s;
    * ``slow_headers``: send the status line, then a header one byte every 0.2 s;
    * ``endless``: a body without Content-Length, as fast as the client reads it;
    * ``oversized``: ``body`` (set by the test), with its true Content-Length or none.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sent = 0
        self.body = b""
        self.declare_length = True
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                try:
                    self._serve()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: what these tests want

            def _serve(self) -> None:
                if self.path == "/v2/":
                    self._head(200, 2)
                    self.wfile.write(b"{}")
                    return
                if server.mode == "silent":
                    server.stop.wait(60)
                    self.close_connection = True
                elif server.mode == "trickle":
                    self._head(200, TRICKLE_LENGTH)
                    for _ in range(TRICKLE_LENGTH):
                        if server.stop.wait(0.2):
                            break
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        server.sent += 1
                    self.close_connection = True
                elif server.mode == "slow_headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    while not server.stop.wait(0.2):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        server.sent += 1
                    self.close_connection = True
                elif server.mode == "endless":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    chunk = b"\0" * (64 << 10)
                    while server.sent < ENDLESS_TOTAL and not server.stop.is_set():
                        self.wfile.write(chunk)
                        server.sent += len(chunk)
                    self.close_connection = True
                else:
                    self._head(200, len(server.body) if server.declare_length else None)
                    self.wfile.write(server.body)
                    server.sent += len(server.body)
                    self.close_connection = not server.declare_length

            def _head(self, status: int, length: int | None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                if length is not None:
                    self.send_header("Content-Length", str(length))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.host = f"127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def hostile(request: pytest.FixtureRequest) -> Iterator[HostileServer]:
    server = HostileServer(request.param)
    yield server
    server.close()


def _client(host: str, **limits: Any) -> RegistryClient:
    return RegistryClient(host, tls_verify=False, lookup_credentials=False, backoff=0.01,
                          limits=NetworkLimits(**limits))


# --------------------------------------------------------------------------- time


@pytest.mark.timeout(60)
def test_a_registry_that_accepts_connections_but_never_answers_fails_at_the_deadline() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes connections; nothing ever reads or answers them
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        with _client(host, deadline=2) as client, pytest.raises(RegistryError) as failed:
            client.get_manifest("team/app", DIGEST)
    message = str(failed.value)
    assert f"cannot reach the registry {host}" in message
    assert "deadline of 2 s" in message or "within 2 s" in message, message
    assert "[network]" in str(failed.value.hint)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hostile", ["silent"], indirect=True)
def test_a_registry_that_stops_answering_after_the_ping_fails_at_the_deadline(hostile: HostileServer) -> None:
    with _client(hostile.host, deadline=2) as client, pytest.raises(RegistryError) as failed:
        client.get_manifest("team/app", DIGEST)
    assert "no answer within" in str(failed.value) and "deadline of 2 s" in str(failed.value), str(failed.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hostile", ["trickle"], indirect=True)
def test_a_trickling_registry_fails_the_minimum_rate(hostile: HostileServer) -> None:
    with _client(hostile.host, timeout=1, min_rate=1024) as client, pytest.raises(RegistryError) as failed:
        client.fetch_blob("team/app", DIGEST, io.BytesIO(), size=TRICKLE_LENGTH)
    message = str(failed.value)
    assert f"the registry {hostile.host} sent " in message and "(less than 1 KiB/s); giving up" in message, message
    assert "min_rate" in str(failed.value.hint) and "timeout" in str(failed.value.hint)
    assert hostile.sent < 100, "the client gave up long before the end"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hostile", ["slow_headers"], indirect=True)
def test_headers_sent_a_byte_at_a_time_fail_the_timeout(hostile: HostileServer) -> None:
    # Each byte restarts a socket timeout: only a timer on the whole answer ends this.
    with _client(hostile.host, timeout=1, deadline=0) as client, pytest.raises(RegistryError) as failed:
        client.fetch_blob("team/app", DIGEST, io.BytesIO(), size=10)
    assert "no complete answer within 1 s" in str(failed.value), str(failed.value)
    assert "tried 5 times" in str(failed.value), "a stall is tried again; each try ends"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hostile", ["trickle"], indirect=True)
def test_a_trickle_fast_enough_for_the_rate_still_ends_at_the_deadline(hostile: HostileServer) -> None:
    with _client(hostile.host, min_rate=0, deadline=2) as client, pytest.raises(RegistryError) as failed:
        client.fetch_document("team/app", DIGEST, size=TRICKLE_LENGTH)
    assert f"the registry {hostile.host} did not finish downloading blob {DIGEST}" in str(failed.value)
    assert "within 2 s" in str(failed.value) and "deadline" in str(failed.value.hint)


# --------------------------------------------------------------------------- size


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hostile", ["endless"], indirect=True)
def test_a_config_without_a_size_that_never_ends_stops_at_the_cap(hostile: HostileServer) -> None:
    cap = 1 << 20
    with _client(hostile.host, max_document=cap) as client, pytest.raises(RegistryError) as failed:
        client.fetch_document("team/app", DIGEST)  # a descriptor without "size"
    assert "has no size in its descriptor and is larger than 1 MiB; refusing it" in str(failed.value)
    assert "max_document" in str(failed.value.hint)
    # The client read cap + 1 bytes and hung up: what the server got out is that plus
    # what the loopback socket buffers hold, far from the ENDLESS_TOTAL it would send.
    time.sleep(0.2)
    assert hostile.sent < cap + (32 << 20), f"{hostile.sent} bytes were sent"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hostile", ["oversized"], indirect=True)
def test_a_manifest_larger_than_its_descriptor_says_is_refused(hostile: HostileServer) -> None:
    index_entry = json.dumps({"schemaVersion": 2, "layers": []}).encode()
    hostile.body = index_entry + b" " * (2 << 20)
    for declare_length in (True, False):
        hostile.declare_length = declare_length
        hostile.sent = 0
        with _client(hostile.host) as client, pytest.raises(RegistryError) as failed:
            client.get_manifest("team/app", "sha256:" + hashlib.sha256(index_entry).hexdigest(),
                                size=len(index_entry))
        assert f"is larger than its descriptor's size of {len(index_entry)} bytes; refusing it" in str(failed.value)
    with _client(hostile.host) as client, pytest.raises(RegistryError, match="larger than its descriptor's size"):
        client.fetch_document("team/app", DIGEST, size=100)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hostile", ["oversized"], indirect=True)
def test_a_document_is_capped_when_no_descriptor_gives_its_size(hostile: HostileServer) -> None:
    hostile.body = b"{" + b" " * (5 << 20) + b"}"
    hostile.declare_length = False
    with _client(hostile.host) as client, pytest.raises(RegistryError) as failed:
        client.get_manifest("team/app", "latest")
    assert "is larger than 4 MiB; refusing it" in str(failed.value), "the default cap of a manifest is 4 MiB"


# --------------------------------------------------------------------------- settings


def _settings(tmp_path: Path, toml: str, environ: dict[str, str]) -> Any:
    (tmp_path / "dtbuild.toml").write_text(toml)
    return find_workspace(str(tmp_path)).settings(environ)


def test_settings_come_from_dtbuild_toml_and_the_environment_wins(tmp_path: Path) -> None:
    settings = _settings(tmp_path, '[network]\ntimeout = 5\nmax_document = "8 MiB"\nmax_download = "1 GiB"\n',
                         {"DTBUILD_NETWORK_TIMEOUT": "0.5", "DTBUILD_NETWORK_DEADLINE": "20"})
    limits = limits_from(settings)
    assert (limits.timeout, limits.deadline, limits.max_document, limits.max_download) == (0.5, 20, 8 << 20, 1 << 30)
    assert limits_from(_settings(tmp_path, "", {})) == NetworkLimits()
    assert parse_limits(None) == NetworkLimits()


@pytest.mark.parametrize(("toml", "environ", "problem"), [
    ('[network]\ntimeout = "soon"\n', {}, "[network] timeout in dtbuild.toml must be a number of seconds"),
    ("[network]\ntimeout = 0\n", {}, "must be more than 0 seconds"),
    ("[network]\nmax_download = -1\n", {}, "must be a size in bytes"),
    ("", {"DTBUILD_NETWORK_MIN_RATE": "fast"}, "DTBUILD_NETWORK_MIN_RATE must be a size in bytes"),
])
def test_bad_settings_are_named(tmp_path: Path, toml: str, environ: dict[str, str], problem: str) -> None:
    with pytest.raises(NetworkSettingError) as failed:
        limits_from(_settings(tmp_path, toml, environ))
    assert problem in failed.value.message


@pytest.mark.parametrize(("section", "problem"), [
    ({"timout": 5}, "has no setting 'timout'"),
    ("30", "[network] in dtbuild.toml must be a table"),
])
def test_bad_sections_are_named_by_the_parser_too(section: Any, problem: str) -> None:
    with pytest.raises(NetworkSettingError) as failed:
        parse_limits(section)
    assert problem in failed.value.message
    if "timout" in problem:
        assert failed.value.hint == "did you mean 'timeout'?"


# --------------------------------------------------------------------------- fetch_url, through the CLI


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hostile", ["trickle", "silent", "slow_headers"], indirect=True)
def test_fetch_url_from_a_trickling_or_silent_server_fails_within_the_limits(hostile: HostileServer, write_workspace,
                                                                             run_dtbuild) -> None:
    url = f"http://{hostile.host}/file.bin"
    ws = write_workspace({"pkg/BUILD": f'fetch_url(name = "f", urls = ["{url}"], sha256 = "{"0" * 64}")\n'},
                         config="[network]\ntimeout = 1\ndeadline = 30\n")
    env = {"DTBUILD_NETWORK_TIMEOUT": "1"} if hostile.mode == "silent" else {}
    code, _, err = run_dtbuild(ws, "build", "//pkg:f", env=env, timeout=60)
    assert code == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    if hostile.mode == "trickle":
        assert f"the server {hostile.host} sent " in err and "(less than 1 KiB/s); giving up" in err, err
    elif hostile.mode == "silent":
        assert f"the server {hostile.host} did not send an answer within 1 s" in err, err
    else:
        assert f"the server {hostile.host} did not send a complete answer within 1 s" in err, err
    assert "[network]" in err
    assert not (ws / "dtbuild-out" / "pkg" / "f").exists()


@pytest.mark.timeout(120)
def test_a_bad_network_setting_fails_the_download_clearly(write_workspace, run_dtbuild, tmp_path) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"x")
    ws = write_workspace({"pkg/BUILD": f'fetch_url(name = "f", urls = ["file://{payload}"], '
                                       f'sha256 = "{hashlib.sha256(b"x").hexdigest()}")\n'},
                         config="[network]\nmin_rate = \"quick\"\n")
    code, _, err = run_dtbuild(ws, "build", "//pkg:f")
    assert code == 1, err
    assert "[network] min_rate in dtbuild.toml must be a size in bytes" in err and "Traceback" not in err, err
