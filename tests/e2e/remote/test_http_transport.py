"""The HTTP remote cache transport against a real nginx WebDAV cache on loopback: what a
user with an nginx (or bazel-remote) cache relies on. Results and blobs round-trip and land
where Bazel puts them, big blobs stream, credentials work or fail with a message that says
where they came from, and a cache that is gone fails fast."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dtbuild.engine.remote import (
    CACHE_SCHEMES,
    Credentials,
    Digest,
    Endpoint,
    MissingRemoteBlob,
    RemoteAuthError,
    RemoteError,
    parse_endpoint,
)
from dtbuild.engine.remote.http_transport import HttpTransport
from servers_nginx import NginxCache, start_nginx_cache

pytestmark = pytest.mark.e2e

PASSWORD = "correct-horse-battery"


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest(), len(data))


def endpoint(url: str, credentials: Credentials | None = None, **kwargs: float) -> Endpoint:
    return Endpoint(url, "--remote-cache", credentials=credentials or Credentials(), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def nginx_workdir(require_tool: Callable[[str], str], tmp_path: Path) -> Path:
    require_tool("nginx")
    return tmp_path / "nginx"


@pytest.fixture
def cache(nginx_workdir: Path) -> Iterator[NginxCache]:
    with start_nginx_cache(nginx_workdir) as server:
        yield server


@pytest.fixture
def auth_cache(nginx_workdir: Path) -> Iterator[NginxCache]:
    with start_nginx_cache(nginx_workdir, users={"alice": PASSWORD}) as server:
        yield server


@pytest.fixture
def transport(cache: NginxCache) -> Iterator[HttpTransport]:
    t = HttpTransport(endpoint(cache.url))
    yield t
    t.close()


def test_action_results_round_trip_and_a_miss_is_none(cache: NginxCache, transport: HttpTransport) -> None:
    action = digest_of(b"an action")
    assert transport.get_action_result(action) is None
    result = b"\x0a\x05hello serialized ActionResult"
    transport.put_action_result(action, result)
    assert transport.get_action_result(action) == result
    # Bazel's layout, so other clients of the same cache find it.
    assert (cache.root / "ac" / action.hash).read_bytes() == result
    # Replacing one (nginx answers 204 for an existing file) is a success too.
    transport.put_action_result(action, b"newer")
    assert transport.get_action_result(action) == b"newer"


def test_blobs_round_trip_and_find_missing_sees_uploads(cache: NginxCache, transport: HttpTransport) -> None:
    blobs = {digest_of(data): data for data in (b"one", b"two" * 1000, os.urandom(3 << 20))}
    empty = digest_of(b"")
    assert transport.find_missing([*blobs, empty]) == set(blobs)  # the empty blob is always there
    for digest, data in blobs.items():
        transport.write_blob(digest, lambda data=data: io.BytesIO(data))
    assert transport.find_missing([*blobs, empty]) == set()
    for digest, data in blobs.items():
        chunks: list[bytes] = []
        transport.read_blob(digest, chunks.append)
        assert b"".join(chunks) == data
        assert (cache.root / "cas" / digest.hash).read_bytes() == data
    assert transport.read_small_blobs([*blobs, digest_of(b"absent")]) == blobs
    with pytest.raises(MissingRemoteBlob):
        transport.read_blob(digest_of(b"absent"), lambda chunk: None)
    # Uploading what is there already (HTTP 204) succeeds.
    digest, data = next(iter(blobs.items()))
    transport.write_blob(digest, lambda: io.BytesIO(data))


def test_find_missing_many_digests_at_once(cache: NginxCache, transport: HttpTransport) -> None:
    present = [digest_of(f"present {i}".encode()) for i in range(60)]
    absent = [digest_of(f"absent {i}".encode()) for i in range(60)]
    transport.write_small_blobs({d: f"present {i}".encode() for i, d in enumerate(present)})
    assert transport.find_missing([*present, *absent, *absent]) == set(absent)


def test_many_threads_share_one_transport(cache: NginxCache, transport: HttpTransport) -> None:
    datas = [os.urandom(1000 + i) for i in range(64)]
    errors: list[BaseException] = []

    def work(data: bytes) -> None:
        try:
            digest = digest_of(data)
            transport.write_blob(digest, lambda: io.BytesIO(data))
            chunks: list[bytes] = []
            transport.read_blob(digest, chunks.append)
            assert b"".join(chunks) == data
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(d,)) for d in datas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert transport.find_missing(map(digest_of, datas)) == set()


def test_a_64_mib_blob_streams_both_ways_in_bounded_memory(cache: NginxCache, transport: HttpTransport,
                                                           tmp_path: Path) -> None:
    size = 64 << 20
    source = tmp_path / "big.bin"
    hasher = hashlib.sha256()
    with source.open("wb") as f:
        for _ in range(size >> 20):
            chunk = os.urandom(1 << 20)
            hasher.update(chunk)
            f.write(chunk)
    digest = Digest(hasher.hexdigest(), size)

    tracemalloc.start()
    try:
        transport.write_blob(digest, lambda: source.open("rb"))
        _, upload_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        received = hashlib.sha256()
        sizes: list[int] = []

        def sink(chunk: bytes) -> None:
            received.update(chunk)
            sizes.append(len(chunk))

        transport.read_blob(digest, sink)
        _, download_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received.hexdigest() == digest.hash and sum(sizes) == size
    assert max(sizes) <= 1 << 20
    assert upload_peak < 8 << 20, f"upload peaked at {upload_peak >> 20} MiB"
    assert download_peak < 8 << 20, f"download peaked at {download_peak >> 20} MiB"
    assert (cache.root / "cas" / digest.hash).stat().st_size == size


def test_a_blob_of_the_wrong_length_is_an_error_and_counts_as_missing(cache: NginxCache,
                                                                      transport: HttpTransport) -> None:
    data = b"the whole blob"
    digest = digest_of(data)
    (cache.root / "cas" / digest.hash).write_bytes(data[:5])  # truncated on the server's disk
    with pytest.raises(RemoteError, match=r"announced 5 bytes, but blob .* is 14 bytes") as err:
        transport.read_blob(digest, lambda chunk: None)
    assert not isinstance(err.value, MissingRemoteBlob)
    assert transport.find_missing([digest]) == {digest}
    transport.write_blob(digest, lambda: io.BytesIO(data))
    assert transport.find_missing([digest]) == set()


def test_a_local_blob_shorter_than_its_digest_is_not_uploaded(cache: NginxCache, transport: HttpTransport) -> None:
    digest = Digest(hashlib.sha256(b"twelve bytes").hexdigest(), 12)
    with pytest.raises(RemoteError, match="ended after 5 of its 12 bytes"):
        transport.write_blob(digest, lambda: io.BytesIO(b"short"))
    assert not (cache.root / "cas" / digest.hash).exists()
    # The connection it broke is not reused: the next request works.
    transport.put_action_result(digest, b"x")


def test_the_right_credentials_work(auth_cache: NginxCache) -> None:
    creds = Credentials("alice", PASSWORD, origin="$DTBUILD_REMOTE_PASSWORD")
    t = HttpTransport(endpoint(auth_cache.url, creds))
    digest = digest_of(b"secret blob")
    assert t.find_missing([digest]) == {digest}
    t.write_blob(digest, lambda: io.BytesIO(b"secret blob"))
    t.put_action_result(digest, b"result")
    assert t.get_action_result(digest) == b"result"
    assert t.find_missing([digest]) == set()
    assert (auth_cache.root / "cas" / digest.hash).read_bytes() == b"secret blob"


def test_a_wrong_password_names_its_origin_and_never_shows_it(auth_cache: NginxCache) -> None:
    wrong = "wrong-password-1234"
    creds = Credentials("alice", wrong, origin="$DTBUILD_REMOTE_PASSWORD")
    t = HttpTransport(endpoint(auth_cache.url, creds))
    digest = digest_of(b"blob")
    calls: list[Callable[[], object]] = [
        lambda: t.get_action_result(digest),
        lambda: t.put_action_result(digest, b"r"),
        lambda: t.find_missing([digest, digest_of(b"other")]),
        lambda: t.read_blob(digest, lambda chunk: None),
        lambda: t.write_blob(digest, lambda: io.BytesIO(b"blob")),
    ]
    for call in calls:
        with pytest.raises(RemoteAuthError) as err:
            call()
        message = str(err.value)
        assert message == (f"the remote cache {auth_cache.url} refused the credentials from "
                           "$DTBUILD_REMOTE_PASSWORD (HTTP 401): fix them, or unset them")
        assert wrong not in message
        assert err.value.__cause__ is None and err.value.__context__ is None  # no chained traceback


def test_no_credentials_says_how_to_give_them(auth_cache: NginxCache) -> None:
    t = HttpTransport(endpoint(auth_cache.url))
    with pytest.raises(RemoteAuthError, match=r"asks for credentials \(HTTP 401\): give them with \[remote\] "
                                              r"username and \$DTBUILD_REMOTE_PASSWORD"):
        t.get_action_result(digest_of(b"x"))


def test_credentials_in_the_url_and_from_a_netrc_file(auth_cache: NginxCache, tmp_path: Path) -> None:
    port = auth_cache.port
    url_endpoint = parse_endpoint(f"http://alice:{PASSWORD}@127.0.0.1:{port}", "--remote-cache",
                                  schemes=CACHE_SCHEMES, environ={"NETRC": str(tmp_path / "none")})
    assert PASSWORD not in url_endpoint.url
    HttpTransport(url_endpoint).put_action_result(digest_of(b"a"), b"from the URL")

    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1\n  login alice\n  password {PASSWORD}\n")
    netrc.chmod(0o600)
    from_netrc = parse_endpoint(auth_cache.url, "--remote-cache", schemes=CACHE_SCHEMES,
                                environ={"NETRC": str(netrc)})
    assert "netrc" in from_netrc.credentials.origin
    t = HttpTransport(from_netrc)
    assert t.get_action_result(digest_of(b"a")) == b"from the URL"

    netrc.write_text("machine 127.0.0.1 login alice password stale-netrc-password\n")
    stale = parse_endpoint(auth_cache.url, "--remote-cache", schemes=CACHE_SCHEMES, environ={"NETRC": str(netrc)})
    with pytest.raises(RemoteAuthError) as err:
        HttpTransport(stale).get_action_result(digest_of(b"a"))
    assert f"the netrc file {netrc} (machine 127.0.0.1)" in str(err.value)
    assert "stale-netrc-password" not in str(err.value)


def test_a_stopped_server_fails_fast_with_the_url(nginx_workdir: Path) -> None:
    server = start_nginx_cache(nginx_workdir)
    t = HttpTransport(endpoint(server.url))
    digest = digest_of(b"blob")
    t.put_action_result(digest, b"r")  # a kept connection, now to a server that goes away
    server.stop()
    calls: list[Callable[[], object]] = [
        lambda: t.get_action_result(digest),
        lambda: t.put_action_result(digest, b"r"),
        lambda: t.find_missing([digest_of(str(i).encode()) for i in range(100)]),
        lambda: t.read_blob(digest, lambda chunk: None),
        lambda: t.write_blob(digest, lambda: io.BytesIO(b"blob")),
    ]
    for call in calls:
        start = time.monotonic()
        with pytest.raises(RemoteError) as err:
            call()
        assert time.monotonic() - start < 2
        assert not isinstance(err.value, RemoteAuthError | MissingRemoteBlob)
        message = str(err.value)
        assert message.startswith(f"the remote cache {server.url}: ")
        assert "connection refused" in message, message
        assert "object at 0x" not in message and "Traceback" not in message


def test_a_killed_server_mid_session_is_a_remote_error(nginx_workdir: Path) -> None:
    server = start_nginx_cache(nginx_workdir)
    try:
        t = HttpTransport(endpoint(server.url))
        digest = digest_of(b"blob")
        t.write_blob(digest, lambda: io.BytesIO(b"blob"))
        server.kill()
        with pytest.raises(RemoteError, match=f"the remote cache {server.url}: GET {server.url}/cas/"):
            t.read_blob(digest, lambda chunk: None)
    finally:
        server.stop()
    assert not server.root.exists() or os.geteuid() != 0  # the private storage is removed


def test_a_server_that_never_answers_times_out_once_not_per_digest() -> None:
    # Accepts connections (the kernel's backlog) and never says a word.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        t = HttpTransport(endpoint(url, connect_timeout=1.0, timeout=0.5))
        start = time.monotonic()
        with pytest.raises(RemoteError, match=r"no answer within 0.5 s"):
            t.get_action_result(digest_of(b"x"))
        with pytest.raises(RemoteError, match=r"no answer within 0.5 s"):
            t.find_missing([digest_of(str(i).encode()) for i in range(200)])
        assert time.monotonic() - start < 5
    finally:
        listener.close()
