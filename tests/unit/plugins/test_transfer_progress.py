"""Byte progress of transfers: :class:`ProgressMeter` reports a transfer's start, a few
throttled updates and its end, never one call per chunk; a ``fetch_url`` download and a
``pull_image`` layer of several MiB served on 127.0.0.1 report increasing byte counts
that end at the blob's size, through ``ctx.progress``.

The meters' clock is replaced by one that advances a fixed step each time it is read,
so how many calls throttling lets through is known without waiting."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import pytest
from dtbuild.engine.execution import build_tree
from dtbuild.engine.store import Store
from dtbuild.plugins import progress
from dtbuild.plugins.builtin.compressors import NoneCompressor
from dtbuild.plugins.builtin.fetch import FetchUrl
from dtbuild.plugins.builtin.pull import ImagePull
from dtbuild.plugins.interfaces import Compressor, Settings, TreeEntry
from dtbuild.plugins.progress import INTERVAL, MIN_BYTES, ProgressMeter

MiB = 1 << 20
#: How far the fake clock moves at each read.
STEP = 0.03


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        self.now += STEP
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress, "_now", fake)
    return fake


class Recorder:
    """What the hook would receive (one transfer's calls, in order)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int | None]] = []
        self._lock = threading.Lock()

    def __call__(self, *, description: str, done_bytes: int, total_bytes: int | None) -> None:
        with self._lock:
            self.calls.append((description, done_bytes, total_bytes))

    def of(self, description: str) -> list[tuple[int, int | None]]:
        return [(done, total) for d, done, total in self.calls if d == description]


def assert_one_complete_transfer(calls: Sequence[tuple[int, int | None]], size: int, clock: FakeClock) -> None:
    assert calls, "no progress was reported"
    done = [d for d, _ in calls]
    assert done == sorted(done), f"done_bytes went back: {done}"
    assert calls[-1] == (size, size), f"the last call does not end the transfer: {calls[-1]}"
    assert [c for c in calls if c[0] == c[1]] == [calls[-1]], "only the last call marks it finished"
    # Throttled: at most one call per INTERVAL of the (fake) time that passed, plus the
    # first and the last.
    assert len(calls) <= 2 + (clock.reads * STEP) / INTERVAL + 1, (len(calls), clock.reads)


# --------------------------------------------------------------------------- the meter


def test_a_transfer_reports_its_start_a_few_updates_and_its_end(clock: FakeClock) -> None:
    report = Recorder()
    size = 8 * MiB
    chunk = 8 << 10
    with ProgressMeter(report, "x", size) as meter:
        for _ in range(size // chunk):
            meter.add(chunk)
    calls = report.of("x")
    assert calls[0] == (0, size)
    assert_one_complete_transfer(calls, size, clock)
    # 1024 chunks: the clock was read once per chunk, and moved STEP each time.
    assert len(calls) <= 2 + 1024 * STEP / INTERVAL + 1
    assert len(calls) < 1024 / 2
    assert len(calls) > 10, "updates between the start and the end"


def test_small_transfers_are_not_reported(clock: FakeClock) -> None:
    report = Recorder()
    with ProgressMeter(report, "small", MIN_BYTES - 1) as meter:
        meter.add(MIN_BYTES - 1)
    with ProgressMeter(report, "unknown and small", None) as meter:
        meter.add(1000)
    assert report.calls == []


def test_a_transfer_of_unknown_size_starts_once_it_is_big_and_ends_with_its_size(clock: FakeClock) -> None:
    report = Recorder()
    with ProgressMeter(report, "u", None) as meter:
        for _ in range(3 * 16):
            meter.add(64 << 10)
    calls = report.of("u")
    assert calls[0] == (MIN_BYTES, None)
    assert all(total is None for _, total in calls[:-1])
    assert calls[-1] == (3 * MiB, 3 * MiB)


def test_a_failed_transfer_ends_too_and_a_retry_is_reported_from_zero(clock: FakeClock) -> None:
    report = Recorder()
    meter = ProgressMeter(report, "r", 4 * MiB)
    with pytest.raises(OSError), meter:
        meter.update(MiB)
        raise OSError("connection reset")
    assert report.of("r")[-1] == (MiB, MiB), "the transfer ended where it stopped"
    with meter:
        meter.update(0)
        meter.update(4 * MiB)
    assert report.of("r")[-2:] == [(0, 4 * MiB), (4 * MiB, 4 * MiB)]


def test_a_wrong_announced_size_becomes_unknown(clock: FakeClock) -> None:
    report = Recorder()
    with ProgressMeter(report, "w", 2 * MiB) as meter:  # a decoded body, longer than its Content-Length
        for _ in range(3):
            meter.add(3 * MiB // 2)
    calls = report.of("w")
    assert calls[0] == (0, 2 * MiB) and calls[-1] == (9 * MiB // 2, 9 * MiB // 2)
    assert sum(1 for done, total in calls if done == total) == 1


# --------------------------------------------------------------------------- a server


class SlowServer:
    """127.0.0.1 serving ``files`` (path -> (bytes, content type)), bodies written in
    64 KiB pieces with short pauses, so a client reads them in many chunks."""

    def __init__(self, files: dict[str, tuple[bytes, str]], *, length: bool = True) -> None:
        self.files = files

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/v2/":
                    body, kind = b"{}", "application/json"
                elif path in files:
                    body, kind = files[path]
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if self.command == "HEAD":
                    return
                for start in range(0, len(body), 64 << 10):
                    self.wfile.write(body[start:start + (64 << 10)])
                    self.wfile.flush()
                    time.sleep(0.001)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[SlowServer] = []

    def start(files: dict[str, tuple[bytes, str]], **kwargs: Any) -> SlowServer:
        servers.append(SlowServer(files, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


class Context:
    """The part of ActionContext that FetchUrl and ImagePull use, over a real store, with
    ``progress`` recorded."""

    def __init__(self, tmp_path: Path, params: dict[str, Any]) -> None:
        self.store = Store(str(tmp_path / "cache"))
        self.params = params
        self.settings = Settings()
        self.scratch_dir = str(tmp_path / "scratch")
        os.makedirs(self.scratch_dir)
        self.out_dir = tmp_path / "out"
        self.out_dir.mkdir()
        self.trees: dict[str, str] = {}
        self.logs: list[str] = []
        self.progress = Recorder()

    def log(self, message: str) -> None:
        self.logs.append(message)

    def output_path(self, name: str) -> str:
        return str(self.out_dir / name)

    def output_tree(self, name: str, entries: Sequence[TreeEntry]) -> None:
        self.trees[name] = build_tree(self.store, entries)[0]

    def put_file(self, path: str) -> tuple[str, int]:
        return self.store.put_file(path)

    def put_blob(self, data: bytes) -> str:
        return self.store.put_bytes(data)

    def put_stream(self, source: IO[bytes], size: int | None = None) -> tuple[str, int]:
        data = source.read()
        return self.store.put_bytes(data), len(data)

    def open_blob(self, digest: str) -> IO[bytes]:
        return self.store.open_blob(digest)

    def compressor(self, name: str) -> Compressor:
        assert name == "none"
        return NoneCompressor()


# --------------------------------------------------------------------------- fetch_url


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "no-length"])
def test_fetch_url_reports_a_download_of_several_mib(tmp_path: Path, serve: Any, clock: FakeClock,
                                                     length: bool) -> None:
    data = os.urandom(4 * MiB)
    server = serve({"/files/big.bin": (data, "application/octet-stream")}, length=length)
    ctx = Context(tmp_path, {"urls": [f"http://{server.host}/files/big.bin"],
                             "sha256": hashlib.sha256(data).hexdigest(), "extract": False, "executable": False})
    FetchUrl().run(ctx)  # type: ignore[arg-type]
    assert Path(ctx.output_path("out")).read_bytes() == data
    calls = ctx.progress.of("download big.bin")
    assert_one_complete_transfer(calls, len(data), clock)
    assert len(calls) >= 3, f"updates while the bytes arrived, not only the end: {calls}"
    if length:
        assert calls[0] == (0, len(data)) and all(total == len(data) for _, total in calls)
    else:
        assert all(total is None for _, total in calls[:-1])


def test_fetch_url_of_a_file_reports_it_too(tmp_path: Path, clock: FakeClock) -> None:
    data = os.urandom(3 * MiB)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    ctx = Context(tmp_path, {"urls": [source.as_uri()], "sha256": hashlib.sha256(data).hexdigest(),
                             "extract": False, "executable": False})
    FetchUrl().run(ctx)  # type: ignore[arg-type]
    calls = ctx.progress.of("download big.bin")
    assert calls[0] == (0, len(data))
    assert_one_complete_transfer(calls, len(data), clock)


# --------------------------------------------------------------------------- pull_image


def _layer_tar(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("data.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_pull_reports_each_layer_download(tmp_path: Path, serve: Any, clock: FakeClock) -> None:
    big, small = _layer_tar(os.urandom(5 * MiB)), _layer_tar(b"small layer\n")
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [_digest(big), _digest(small)]}}).encode()
    tar_type = "application/vnd.oci.image.layer.v1.tar"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": tar_type, "digest": _digest(big), "size": len(big)},
                   {"mediaType": tar_type, "digest": _digest(small), "size": len(small)}],
    }).encode()
    server = serve({
        f"/v2/team/app/manifests/{_digest(manifest)}": (manifest, "application/vnd.oci.image.manifest.v1+json"),
        f"/v2/team/app/blobs/{_digest(config)}": (config, "application/octet-stream"),
        f"/v2/team/app/blobs/{_digest(big)}": (big, "application/octet-stream"),
        f"/v2/team/app/blobs/{_digest(small)}": (small, "application/octet-stream"),
    })
    ctx = Context(tmp_path, {"image_name": f"{server.host}/team/app", "image_digest": _digest(manifest),
                             "os": "linux", "arch": "amd64", "tls_verify": False, "label": "//base:app",
                             "repo_tags": ["app:latest"], "archive": None, "oci_layout": None, "sha256": None})
    ImagePull().run(ctx)  # type: ignore[arg-type]
    assert "image" in ctx.trees
    calls = ctx.progress.of(f"pull {_digest(big)[:19]}")
    assert calls[0] == (0, len(big))
    assert_one_complete_transfer(calls, len(big), clock)
    assert len(calls) >= 3, f"updates while the layer arrived, not only the end: {calls}"
    # The small layer and the config are under MIN_BYTES: not reported.
    assert {d for d, _, _ in ctx.progress.calls} == {f"pull {_digest(big)[:19]}"}
