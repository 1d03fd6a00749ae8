"""Transfers report their bytes to plugins (``dtbuild_transfer_progress``) in real builds
and commands: a workspace plugin records every call, and a ``fetch_url`` download, the
remote cache's upload and download of its output (nginx's WebDAV cache and
buildbox-casd's REAPI), a ``push`` to
a docker-registry and a ``pull_image`` of what was pushed are each seen to start, grow
and end at the blob's size, under the target (or command) that moved them."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import servers_casd
import servers_nginx

pytestmark = pytest.mark.e2e

MiB = 1 << 20

RECORDER = '''
import json
import os

from dtbuild.plugins import hookimpl


@hookimpl
def dtbuild_transfer_progress(label, description, done_bytes, total_bytes):
    with open(os.environ["PROGRESS_LOG"], "a") as log:
        log.write(json.dumps([label, description, done_bytes, total_bytes]) + "\\n")
'''
CONFIG = '[plugins]\nmodules = ["tools/recorder.py"]\n'


def recorded(log: Path) -> dict[tuple[str, str], list[tuple[int, int | None]]]:
    """The recorded calls, by transfer (label, description), in order."""
    transfers: dict[tuple[str, str], list[tuple[int, int | None]]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            label, description, done, total = json.loads(line)
            transfers.setdefault((label, description), []).append((done, total))
    return transfers


def assert_complete(calls: list[tuple[int, int | None]], size: int) -> None:
    """One transfer of ``size`` bytes: from 0 of its size, growing, ending at its size."""
    assert calls[0] == (0, size), calls
    done = [d for d, _ in calls]
    assert done == sorted(done), f"done_bytes went back: {calls}"
    assert calls[-1] == (size, size), calls
    assert sum(1 for d, t in calls if d == t) == 1, f"only the last call ends it: {calls}"


class FileServer:
    """127.0.0.1 serving one file's bytes at /files/NAME, in 64 KiB writes."""

    def __init__(self, name: str, data: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != f"/files/{name}":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for start in range(0, len(data), 64 << 10):
                    self.wfile.write(data[start:start + (64 << 10)])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/files/{name}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["http", "grpc"])
def remote_cache(request: pytest.FixtureRequest, tmp_path: Path, require_tool: Callable[[str], str]) -> Iterator[str]:
    """The URL of a fresh remote cache: nginx (http://) or buildbox-casd (grpc://)."""
    if request.param == "http":
        if not os.access(servers_nginx.NGINX, os.X_OK):
            require_tool("nginx")
        with servers_nginx.start_nginx_cache(tmp_path / "nginx") as nginx:
            yield nginx.url
    else:
        servers_casd.require_buildbox()
        with servers_casd.start_casd(tmp_path / "casd") as casd:
            yield casd.url


def test_a_download_and_its_remote_cache_transfers_report_progress(write_workspace, run_dtbuild, remote_cache: str,
                                                                   tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 12345)
    sha = hashlib.sha256(data).hexdigest()
    server = FileServer("big.bin", data)
    try:
        files = {"BUILD": f'fetch_url(name = "big", urls = ["{server.url}"], sha256 = "{sha}")\n',
                 "tools/recorder.py": RECORDER}
        a_ws = write_workspace(files, name="A", config=CONFIG)
        a_log = tmp_path / "a.jsonl"
        run_dtbuild.build(a_ws, "//:big", "--remote-cache", remote_cache, check=True,
                          env={"PROGRESS_LOG": str(a_log), "DTBUILD_CACHE_DIR": str(tmp_path / "cache-A")})
    finally:
        server.close()
    a = recorded(a_log)
    assert_complete(a[("//:big", "download big.bin")], len(data))
    # The remote cache sends the output in the background, under the same target.
    assert_complete(a[("//:big", f"remote cache upload sha256:{sha[:12]}")], len(data))
    assert set(a) == {("//:big", "download big.bin"), ("//:big", f"remote cache upload sha256:{sha[:12]}")}

    # Another checkout with an empty local cache takes the output from the remote (the
    # URL's server is gone: nothing is downloaded from it).
    b_ws = write_workspace(files, name="B", config=CONFIG)
    b_log = tmp_path / "b.jsonl"
    b = run_dtbuild.build(b_ws, "//:big", "--remote-cache", remote_cache, check=True,
                          env={"PROGRESS_LOG": str(b_log), "DTBUILD_CACHE_DIR": str(tmp_path / "cache-B")})
    assert b.summary is not None and b.summary["actions"]["remote_cached"] == 1, b.stderr
    assert (b_ws / "dtbuild-out" / "big").read_bytes() == data
    transfers = recorded(b_log)
    assert list(transfers) == [("//:big", f"remote cache download sha256:{sha[:12]}")]
    assert_complete(transfers[("//:big", f"remote cache download sha256:{sha[:12]}")], len(data))


def test_small_transfers_report_nothing(write_workspace, run_dtbuild, tmp_path: Path) -> None:
    data = b"a small file\n" * 100
    server = FileServer("small.txt", data)
    try:
        ws = write_workspace({"BUILD": f'fetch_url(name = "small", urls = ["{server.url}"], '
                                       f'sha256 = "{hashlib.sha256(data).hexdigest()}")\n',
                              "tools/recorder.py": RECORDER}, config=CONFIG)
        log = tmp_path / "small.jsonl"
        run_dtbuild.build(ws, "//:small", check=True, env={"PROGRESS_LOG": str(log)})
    finally:
        server.close()
    assert recorded(log) == {}


# --------------------------------------------------------------------------- push and pull


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def registry(tmp_path: Path, require_tool: Callable[[str], str]) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 (no auth): its host:port."""
    require_tool("docker-registry")
    host = f"127.0.0.1:{_free_port()}"
    root = tmp_path / "registry"
    (root / "storage").mkdir(parents=True)
    config = root / "config.yml"
    config.write_text("\n".join([
        "version: 0.1", "log:", "  level: warn", "  accesslog:", "    disabled: true",
        "storage:", "  filesystem:", f"    rootdirectory: {root / 'storage'}",
        "http:", f"  addr: {host}", "  secret: dtbuild-test-secret"]) + "\n")
    with open(root / "registry.log", "wb") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (root / "registry.log").read_text()
            try:
                with urllib.request.urlopen(f"http://{host}/v2/", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, "docker-registry did not answer within 20 s"
                time.sleep(0.05)
        yield host
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_push_and_pull_report_each_big_blob(write_workspace, run_dtbuild, registry: str, tmp_path: Path) -> None:
    payload = os.urandom(2 * MiB)
    ws = write_workspace({
        "BUILD": 'files(name = "big", srcs = ["big.bin"])\n'
                 'image(name = "img", tag = "v1", copy_to_root = [":big"], compressor = "none")\n',
        "big.bin": payload, "tools/recorder.py": RECORDER}, name="src", config=CONFIG)
    push_log = tmp_path / "push.jsonl"
    _, out, _ = run_dtbuild(ws, "push", "//:img", f"{registry}/team/app:v1", "--insecure", check=True,
                              env={"PROGRESS_LOG": str(push_log)})
    digest = out.strip().rsplit("@", 1)[1]
    pushes = recorded(push_log)
    # One layer is over 1 MiB (the config and nothing else are small).
    (layer_push,) = pushes
    label, description = layer_push
    assert label == "push" and description.startswith("push sha256:") and \
        description.endswith(f" to {registry}/team/app"), pushes
    size = pushes[layer_push][-1][1]
    assert size is not None and size > len(payload), pushes
    assert_complete(pushes[layer_push], size)

    pull_ws = write_workspace({
        "BUILD": f'pull_image(name = "base", image_name = "{registry}/team/app", image_digest = "{digest}", '
                 'tls_verify = False)\n',
        "tools/recorder.py": RECORDER}, name="pull", config=CONFIG)
    pull_log = tmp_path / "pull.jsonl"
    run_dtbuild.build(pull_ws, "//:base", check=True, env={"PROGRESS_LOG": str(pull_log)})
    pulls = recorded(pull_log)
    blob = description.split()[1]  # the layer's "sha256:" and 12 hex digits
    assert list(pulls) == [("//:base", f"pull {blob}")], pulls
    assert_complete(pulls[("//:base", f"pull {blob}")], size)
