"""The gRPC (REAPI v2) remote cache transport against a real buildbox-casd on loopback,
started per test: what dtbuild stores, another REAPI client (casd itself) holds, and what
casd holds, dtbuild reads back, in batches or streamed; a server that is down, refuses
the credentials or names blobs otherwise is one clear error, never a hang."""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
import tracemalloc
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from dtbuild.engine.remote import (
    Credentials,
    Digest,
    Endpoint,
    MissingRemoteBlob,
    RemoteAuthError,
    RemoteError,
    open_transport,
)
from dtbuild.engine.remote._reapi.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from dtbuild.engine.remote.grpc_transport import GrpcTransport
from servers_casd import CasdServer, require_buildbox, start_casd

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


@pytest.fixture
def casd(tmp_path: Path) -> Iterator[CasdServer]:
    require_buildbox()
    with start_casd(tmp_path / "casd") as server:
        yield server


def _transport(url: str, instance: str = "", **kwargs: object) -> GrpcTransport:
    transport = open_transport(Endpoint(url, "--remote-cache", instance, **kwargs))  # type: ignore[arg-type]
    assert isinstance(transport, GrpcTransport)
    return transport


def _blob(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest(), len(data))


def _result(stdout: bytes) -> tuple[bytes, Digest]:
    out = _blob(stdout)
    result = re_pb2.ActionResult(exit_code=3, stdout_digest=re_pb2.Digest(hash=out.hash, size_bytes=out.size),
                                 output_files=[re_pb2.OutputFile(path="out/a.txt", is_executable=True,
                                                                 digest=re_pb2.Digest(hash=out.hash,
                                                                                      size_bytes=out.size))])
    return result.SerializeToString(), out


def test_action_results_round_trip(casd: CasdServer) -> None:
    t = _transport(casd.url)
    action = _blob(b"the action")
    assert t.get_action_result(action) is None
    assert t.update_enabled
    raw, out = _result(b"hello\n")
    t.write_small_blobs({out: b"hello\n"})
    t.put_action_result(action, raw)
    assert casd.ac_entries() == 1
    got = t.get_action_result(action)
    assert got is not None
    parsed = re_pb2.ActionResult.FromString(got)
    assert parsed.exit_code == 3
    assert [(f.path, f.is_executable, f.digest.hash) for f in parsed.output_files] == [("out/a.txt", True, out.hash)]
    assert t.get_action_result(_blob(b"another action")) is None
    t.close()


def test_small_blobs_batch_round_trip(casd: CasdServer) -> None:
    t = _transport(casd.url)
    blobs = {_blob(d): d for d in (b"", b"a", b"bb" * 1000, os.urandom(700_000), os.urandom(900_000),
                                   os.urandom(1_500_000), os.urandom(2_000_000))}
    # Together well over casd's 4 MiB message limit: several batches are needed.
    assert sum(map(len, blobs.values())) > 4 * MIB
    t.write_small_blobs(blobs)
    for digest in blobs:
        if digest.size:
            assert casd.blob_path(digest.hash).read_bytes() == blobs[digest]
    absent = _blob(b"never stored")
    got = t.read_small_blobs([*blobs, absent])
    assert got == blobs
    assert absent not in got


def test_large_blob_streams_both_ways_in_bounded_memory(casd: CasdServer, tmp_path: Path) -> None:
    t = _transport(casd.url)
    t.find_missing([])  # capabilities and connection outside the measurement
    path = tmp_path / "big"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(16):  # four times gRPC's message limit
            chunk = os.urandom(MIB)
            h.update(chunk)
            f.write(chunk)
    digest = Digest(h.hexdigest(), 16 * MIB)
    assert t.find_missing([digest]) == {digest}

    tracemalloc.start()
    try:
        t.write_blob(digest, lambda: open(path, "rb"))  # noqa: SIM115 - write_blob closes it
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        got = hashlib.sha256()
        sizes: list[int] = []

        def sink(chunk: bytes) -> None:
            got.update(chunk)
            sizes.append(len(chunk))

        t.read_blob(digest, sink)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert casd.blob_path(digest.hash).stat().st_size == digest.size
    assert got.hexdigest() == digest.hash and sum(sizes) == digest.size
    assert len(sizes) > 1, "the blob arrived as one message"
    # A few chunks in memory (1 MiB ones up, casd sends 2 MiB ones down), never the blob.
    assert write_peak < 4 * MIB, write_peak
    assert read_peak < min(4 * max(sizes), digest.size // 2), (read_peak, max(sizes))
    assert t.find_missing([digest]) == set()

    # Too large for a batch: the batch calls go through ByteStream for it.
    assert t.read_small_blobs([digest])[digest] == path.read_bytes()
    # Uploading what the server holds already is no error (casd ends the stream early).
    t.write_blob(digest, lambda: open(path, "rb"))  # noqa: SIM115 - write_blob closes it
    t.write_small_blobs({digest: path.read_bytes()})


def test_find_missing_before_and_after_upload(casd: CasdServer) -> None:
    t = _transport(casd.url)
    data = [f"blob {i}".encode() for i in range(12_000)]  # more than one FindMissingBlobs call
    digests = [_blob(d) for d in data]
    assert t.find_missing(digests) == set(digests)
    t.write_small_blobs({d: b for d, b in zip(digests[:7000], data[:7000], strict=True)})
    assert t.find_missing(digests) == set(digests[7000:])
    assert t.find_missing([*digests[:3], digests[0]]) == set()


def test_missing_blob_is_missing_remote_blob(casd: CasdServer) -> None:
    t = _transport(casd.url)
    with pytest.raises(MissingRemoteBlob, match=re.escape(casd.url)):
        t.read_blob(_blob(b"nothing"), lambda _chunk: None)
    t.read_blob(_blob(b""), lambda _chunk: pytest.fail("the empty blob needs no bytes"))


def test_casd_rejects_a_blob_that_does_not_match_its_digest(casd: CasdServer) -> None:
    t = _transport(casd.url)
    wrong = Digest(_blob(b"hello").hash, 5)
    with pytest.raises(RemoteError, match="INVALID_ARGUMENT") as info:
        t.write_small_blobs({wrong: b"hellp"})
    assert "Traceback" not in str(info.value)
    big = os.urandom(5 * MIB)
    wrong_big = Digest(_blob(big[::-1]).hash, len(big))
    with pytest.raises(RemoteError, match=re.escape(casd.url)):
        t.write_blob(wrong_big, lambda: io.BytesIO(big))
    assert not casd.has_blob(wrong.hash) and not casd.has_blob(wrong_big.hash)


def test_a_local_file_of_the_wrong_size_is_not_uploaded(casd: CasdServer) -> None:
    t = _transport(casd.url)
    data = os.urandom(2 * MIB)
    digest = _blob(data)
    with pytest.raises(RemoteError, match="ended after"):
        t.write_blob(digest, lambda: io.BytesIO(data[: MIB + 5]))
    with pytest.raises(RemoteError, match="more than"):
        t.write_blob(digest, lambda: io.BytesIO(data + b"x"))
    assert t.find_missing([digest]) == {digest}


class _SourceChanged(Exception):
    pass


def test_an_error_of_the_blob_source_reaches_the_caller(casd: CasdServer) -> None:
    t = _transport(casd.url)
    data = os.urandom(3 * MIB)

    class Failing(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            if self.tell() >= MIB:
                raise _SourceChanged("the file changed")
            return super().read(n)

    with pytest.raises(_SourceChanged):
        t.write_blob(_blob(data), lambda: Failing(data))
    assert t.find_missing([_blob(data)]) == {_blob(data)}


def test_one_transport_serves_many_threads(casd: CasdServer) -> None:
    t = _transport(casd.url)
    payloads = [os.urandom(n) for n in (10, 5000, 300_000, 2 * MIB, 5 * MIB)] * 4

    def round_trip(data: bytes) -> bytes:
        digest = _blob(data)
        if len(data) > MIB:
            t.write_blob(digest, lambda: io.BytesIO(data))
        else:
            t.write_small_blobs({digest: data})
        chunks: list[bytes] = []
        t.read_blob(digest, chunks.append)
        return b"".join(chunks)

    with futures.ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(round_trip, payloads)) == payloads
    t.close()


def test_instance_names(tmp_path: Path) -> None:
    require_buildbox()
    with start_casd(tmp_path / "casd", extra_args=["--local-server-instance=main"]) as server:
        named = _transport(server.url, "main")
        data = os.urandom(5 * MIB)
        small = b"small blob"
        named.write_small_blobs({_blob(small): small})
        named.write_blob(_blob(data), lambda: io.BytesIO(data))
        assert named.find_missing([_blob(small), _blob(data)]) == set()
        chunks: list[bytes] = []
        named.read_blob(_blob(data), chunks.append)
        assert b"".join(chunks) == data
        raw, _ = _result(b"")
        named.put_action_result(_blob(b"act"), raw)
        assert named.get_action_result(_blob(b"act")) is not None

        unknown = _transport(server.url, "nope")
        with pytest.raises(RemoteError, match="nope") as info:
            unknown.find_missing([_blob(small)])
        assert server.url in str(info.value)


def test_a_killed_server_is_a_quick_remote_error(casd: CasdServer) -> None:
    t = _transport(casd.url)
    t.write_small_blobs({_blob(b"x"): b"x"})
    casd.kill()
    for call in (lambda: t.find_missing([_blob(b"x")]), lambda: t.get_action_result(_blob(b"a")),
                 lambda: t.read_blob(_blob(b"x"), lambda _c: None),
                 lambda: t.write_blob(_blob(b"y" * MIB), lambda: io.BytesIO(b"y" * MIB))):
        started = time.monotonic()
        with pytest.raises(RemoteError) as info:
            call()
        assert time.monotonic() - started < 5
        assert not isinstance(info.value, RemoteAuthError)
        assert casd.url in str(info.value) and "UNAVAILABLE" in str(info.value)


def test_nothing_listening_is_a_quick_remote_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = _transport(f"grpc://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(RemoteError, match=f"cannot reach the remote cache grpc://127.0.0.1:{port}"):
        t.get_action_result(_blob(b"a"))
    assert time.monotonic() - started < 5


def test_a_server_without_sha256_is_refused(tmp_path: Path) -> None:
    require_buildbox()
    with start_casd(tmp_path / "casd", extra_args=["--digest-function=SHA512"]) as server:
        t = _transport(server.url)
        with pytest.raises(RemoteError, match=r"does not support SHA256 digests \(it offers SHA512\)"):
            t.find_missing([_blob(b"a")])


def test_wrong_scheme_and_path_are_refused() -> None:
    with pytest.raises(ValueError, match="grpc://HOST:PORT"):
        GrpcTransport(Endpoint("http://127.0.0.1:1", "--remote-cache"))
    with pytest.raises(ValueError, match="instance_name"):
        GrpcTransport(Endpoint("grpc://127.0.0.1:1/main", "--remote-cache"))


# --------------------------------------------------------------------------- credentials


class _Refuse(grpc.GenericRpcHandler):
    """Every call answered UNAUTHENTICATED; records the metadata it got."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str | bytes]] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        self.seen.append(dict(handler_call_details.invocation_metadata))  # type: ignore[arg-type]

        def refuse(_request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token s3cr3t-token-value")

        return grpc.unary_unary_rpc_method_handler(refuse)


def test_refused_credentials_name_their_origin_and_hide_the_secret() -> None:
    handler = _Refuse()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        creds = Credentials(token="s3cr3t-token-value", origin="[remote] token in dtbuild.toml")
        t = _transport(f"grpc://127.0.0.1:{port}", "inst", headers={"X-Team": "builders"}, credentials=creds)
        with pytest.raises(RemoteAuthError) as info:
            t.get_action_result(_blob(b"a"))
        message = str(info.value)
        assert message.startswith(f"the remote cache grpc://127.0.0.1:{port} refused the credentials from "
                                  "[remote] token in dtbuild.toml (UNAUTHENTICATED: ")
        assert message.endswith("fix them, or unset them")
        assert "s3cr3t" not in message
        seen = handler.seen[0]
        assert seen["authorization"] == "Bearer s3cr3t-token-value"
        assert seen["x-team"] == "builders"

        headers_only = _transport(f"grpc://127.0.0.1:{port}", headers={"x-api-key": "k3y-value"})
        with pytest.raises(RemoteAuthError, match=r"from the \[remote\] headers"):
            headers_only.find_missing([_blob(b"a")])
    finally:
        server.stop(None)


def test_grpcs_checks_the_certificate_against_the_ca_file(tmp_path: Path, require_tool) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    openssl = require_tool("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    handler = _Refuse()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        url = f"grpcs://127.0.0.1:{port}"
        untrusted = GrpcTransport(Endpoint(url, "--remote-cache"), environ={})
        with pytest.raises(RemoteError, match="UNAVAILABLE") as info:
            untrusted.find_missing([_blob(b"a")])
        assert not isinstance(info.value, RemoteAuthError)
        assert handler.seen == []

        trusted = GrpcTransport(Endpoint(url, "--remote-cache"), environ={"DTBUILD_REMOTE_CA_FILE": str(cert)})
        with pytest.raises(RemoteAuthError, match="UNAUTHENTICATED"):
            trusted.find_missing([_blob(b"a")])
        assert len(handler.seen) == 1

        missing = GrpcTransport(Endpoint(url, "--remote-cache"),
                                environ={"DTBUILD_REMOTE_CA_FILE": str(tmp_path / "nope.pem")})
        with pytest.raises(RemoteError, match=r"DTBUILD_REMOTE_CA_FILE.*nope\.pem"):
            missing.find_missing([_blob(b"a")])
    finally:
        server.stop(None)
