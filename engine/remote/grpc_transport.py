"""The remote cache over REAPI v2 gRPC (``grpc://HOST:PORT``, ``grpcs://HOST:PORT``).

One channel per transport, opened lazily and shared by every thread (gRPC channels and
stubs are thread-safe); the stubs are made once with it. ``grpc://`` is plaintext,
``grpcs://`` is TLS checked against the system's roots, or against the PEM bundle named
by ``$DTBUILD_REMOTE_CA_FILE`` (for a cache behind a private certificate authority).

Every call carries the endpoint's headers (``[remote] headers`` and the credentials, as
lowercase gRPC metadata), a ``RequestMetadata`` naming dtbuild, the instance name, and a
deadline: ``endpoint.timeout`` for a unary call, plus one second per MiB for a
ByteStream transfer (a 2 GiB layer is not expected to arrive within a minute, but a
stalled one must not hang the build). Calls never wait for a server that is down
(``wait_for_ready=False``): a refused connection fails at once and the build goes on
locally.

The first call asks ``GetCapabilities`` once: the server must offer SHA256 (the only
digest dtbuild makes), and its ``max_batch_total_size_bytes`` bounds the batch calls
(``BatchReadBlobs``, ``BatchUpdateBlobs``), never above gRPC's default 4 MiB message
limit less some headroom for the messages' framing; a blob too large for any batch goes
through ByteStream, in 1 MiB chunks, never whole in memory. ``update_enabled`` tells
the caller whether the server takes action results from clients.

gRPC failures become :class:`RemoteError` naming the URL and the status code (one
warning, a local build), except UNAUTHENTICATED and PERMISSION_DENIED, which become
:class:`RemoteAuthError` naming where the credentials came from; NOT_FOUND is an answer
(None, :class:`MissingRemoteBlob`). Every message goes through ``endpoint.redact``, so
no secret reaches the terminal even when a server echoes a header back.

``GetTree`` (:meth:`GrpcTransport.get_tree`) reads a whole tree of ``Directory``
messages in one streamed call, following the server's pages; its answer is bounded (a
million directories, 256 MiB of them) and the caller checks every Directory against its
digest, since a server leaves out what its CAS lacks.

The remote execution client reuses :attr:`GrpcTransport.channel`,
:attr:`GrpcTransport.metadata` and :meth:`GrpcTransport.error` so that both talk to the
server, and fail, the same way.
"""

from __future__ import annotations

import io
import os
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any

import grpc
from dtbuild.engine.remote import (
    Digest,
    Endpoint,
    MissingRemoteBlob,
    RemoteAuthError,
    RemoteError,
    Transport,
)
from dtbuild.engine.remote._reapi.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
)
from dtbuild.engine.remote._reapi.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from dtbuild.engine.remote._reapi.google.bytestream import bytestream_pb2 as bs_pb2
from dtbuild.engine.remote._reapi.google.bytestream import bytestream_pb2_grpc as bs_grpc

#: gRPC's default limit on one message, which most servers keep.
GRPC_MESSAGE_LIMIT = 4 * 1024 * 1024
#: Room left in a batch for the request's own fields (instance name, framing).
BATCH_HEADROOM = 64 * 1024
#: What one blob costs in a batch besides its bytes (its digest and the field tags).
BATCH_PER_BLOB = 128
#: Digests per FindMissingBlobs call (about 400 KiB of request).
FIND_MISSING_BATCH = 5000
#: ByteStream write chunk.
CHUNK_SIZE = 1024 * 1024
#: A ByteStream transfer's deadline grows by one second per this many bytes.
STREAM_BYTES_PER_SECOND = 1024 * 1024
#: The most Directory messages, and serialized bytes of them, one GetTree answer may
#: hold (a tree is in memory whole; a server that sends more is refused, not followed).
MAX_TREE_DIRECTORIES = 1_000_000
MAX_TREE_BYTES = 256 * 1024 * 1024
#: Directories asked for per GetTree page (a server may send fewer, or ignore it).
TREE_PAGE_SIZE = 10_000
#: The PEM bundle a ``grpcs://`` remote's certificate is checked against, instead of the
#: system's roots.
CA_FILE_ENV = "DTBUILD_REMOTE_CA_FILE"

_REQUEST_METADATA_KEY = "build.bazel.remote.execution.v2.requestmetadata-bin"
_AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class GrpcTransport(Transport):
    """The REAPI v2 cache client (CAS, ActionCache, ByteStream, Capabilities)."""

    def __init__(self, endpoint: Endpoint, *, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(endpoint)
        parts = urllib.parse.urlsplit(endpoint.url)
        if parts.scheme not in ("grpc", "grpcs") or not parts.netloc:
            raise ValueError(f"{endpoint.origin}: {endpoint.url!r} is not a gRPC remote: write grpc://HOST:PORT "
                             "or grpcs://HOST:PORT")
        if parts.path not in ("", "/"):
            raise ValueError(f"{endpoint.origin}: {endpoint.url!r} has a path, which gRPC does not use: write "
                             "grpc://HOST:PORT and set the instance name with [remote] instance_name")
        self._target = parts.netloc
        self._tls = parts.scheme == "grpcs"
        env = os.environ if environ is None else environ
        self._ca_file = env.get(CA_FILE_ENV) or None
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stubs: dict[str, Any] = {}
        self._capabilities: re_pb2.ServerCapabilities | None = None
        self._batch_limit = GRPC_MESSAGE_LIMIT - BATCH_HEADROOM
        self._metadata = self._make_metadata()

    # ----------------------------------------------------------------------- connection

    @property
    def instance_name(self) -> str:
        return self.endpoint.instance_name

    @property
    def metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The metadata every call sends: the endpoint's headers and a RequestMetadata."""
        return self._metadata

    @property
    def channel(self) -> grpc.Channel:
        """The one channel to the server (opened on first use, not connected until a call)."""
        with self._lock:
            return self._open_channel()

    def _open_channel(self) -> grpc.Channel:
        # The caller holds self._lock.
        if self._channel is None:
            options = [
                # BatchReadBlobs answers may be as large as the server's own limit.
                ("grpc.max_receive_message_length", 2 * GRPC_MESSAGE_LIMIT),
                ("grpc.max_send_message_length", 2 * GRPC_MESSAGE_LIMIT),
                ("grpc.primary_user_agent", "dtbuild"),
                # A server that went away is retried soon, not after minutes of back-off.
                ("grpc.initial_reconnect_backoff_ms", 500),
                ("grpc.max_reconnect_backoff_ms", 5000),
            ]
            if self._tls:
                self._channel = grpc.secure_channel(self._target, self._tls_credentials(), options=options)
            else:
                self._channel = grpc.insecure_channel(self._target, options=options)
            self._stubs = {
                "capabilities": re_grpc.CapabilitiesStub(self._channel),
                "cas": re_grpc.ContentAddressableStorageStub(self._channel),
                "ac": re_grpc.ActionCacheStub(self._channel),
                "bytestream": bs_grpc.ByteStreamStub(self._channel),
            }
        return self._channel

    def _tls_credentials(self) -> grpc.ChannelCredentials:
        if self._ca_file is None:
            return grpc.ssl_channel_credentials()
        try:
            with open(self._ca_file, "rb") as f:
                roots = f.read()
        except OSError as exc:
            raise RemoteError(f"cannot read the certificate authorities for {self.endpoint.url} from "
                              f"${CA_FILE_ENV} ({self._ca_file}): {exc.strerror or exc}: fix the path, or "
                              "unset it to use the system's roots") from None
        return grpc.ssl_channel_credentials(root_certificates=roots)

    def _stub(self, name: str) -> Any:
        with self._lock:
            self._open_channel()
            return self._stubs[name]

    def _make_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        pairs: list[tuple[str, str | bytes]] = []
        for key, value in self.endpoint.all_headers().items():
            key = key.strip().lower()
            pairs.append((key, value.encode() if key.endswith("-bin") else value))
        try:
            from importlib.metadata import version

            tool_version = version("dtbuild")
        except Exception:  # not installed as a distribution: the name is enough
            tool_version = ""
        request = re_pb2.RequestMetadata(tool_details=re_pb2.ToolDetails(tool_name="dtbuild",
                                                                         tool_version=tool_version))
        pairs.append((_REQUEST_METADATA_KEY, request.SerializeToString()))
        return tuple(pairs)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
                self._stubs = {}

    # ----------------------------------------------------------------------- errors

    def error(self, exc: grpc.RpcError, what: str) -> RemoteError:
        """The :class:`RemoteError` for a failed call doing ``what`` ("reading blob X")."""
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        details = exc.details() if callable(getattr(exc, "details", None)) else None
        return self._status_error(code, details or "", what)

    @property
    def _who(self) -> str:
        """"remote cache grpc://host:port" (or "remote executor ..."), for messages."""
        return f"{self.endpoint.role} {self.endpoint.url}"

    def _status_error(self, code: grpc.StatusCode | None, details: str, what: str) -> RemoteError:
        name = code.name if code is not None else "UNKNOWN"
        said = f"{name}: {details}" if details else name
        url = self._who
        redact = self.endpoint.redact
        if code in _AUTH_CODES:
            origin = self.endpoint.credentials.origin or "the [remote] headers"
            return RemoteAuthError(redact(f"the {url} refused the credentials from {origin} ({said}): "
                                          "fix them, or unset them"))
        if code is grpc.StatusCode.NOT_FOUND:
            return MissingRemoteBlob(redact(f"the {url} has no {what.split(' ', 1)[-1]} ({said})"))
        if code is grpc.StatusCode.UNAVAILABLE:
            text = f"cannot reach the {url} while {what} ({said})"
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
            text = f"the {url} did not answer in time while {what} ({said})"
        else:
            text = f"the {url} failed while {what} ({said})"
            if self.instance_name and "instance" in details.lower():
                text += f"; the instance name is {self.instance_name!r} ([remote] instance_name)"
        return RemoteError(redact(text))

    def _call(self, method: Callable[..., Any], request: Any, what: str, *, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout or self.endpoint.timeout, metadata=self._metadata,
                          wait_for_ready=False)
        except grpc.RpcError as exc:
            raise self.error(exc, what) from None

    def _stream_timeout(self, size: int) -> float:
        return self.endpoint.timeout + size / STREAM_BYTES_PER_SECOND

    # ----------------------------------------------------------------------- capabilities

    def _ensure_capabilities(self) -> re_pb2.ServerCapabilities:
        caps = self._capabilities
        if caps is not None:
            return caps
        stub = self._stub("capabilities")
        request = re_pb2.GetCapabilitiesRequest(instance_name=self.instance_name)
        timeout = min(self.endpoint.timeout, max(self.endpoint.connect_timeout, 1.0))
        caps = self._call(stub.GetCapabilities, request, "asking for its capabilities", timeout=timeout)
        if not caps.HasField("cache_capabilities"):
            raise RemoteError(self.endpoint.redact(f"{self.endpoint.url} is not a remote cache: its capabilities "
                                                   "list no cache (is it an execution-only endpoint?)"))
        cache = caps.cache_capabilities
        functions = list(cache.digest_functions)
        if re_pb2.DigestFunction.SHA256 not in functions:
            offered = ", ".join(re_pb2.DigestFunction.Value.Name(f) for f in functions) or "none"
            raise RemoteError(self.endpoint.redact(
                f"the {self._who} does not support SHA256 digests (it offers {offered}), and "
                "dtbuild names everything by SHA256: configure the server for SHA256, or use another cache"))
        limit = GRPC_MESSAGE_LIMIT
        if cache.max_batch_total_size_bytes > 0:
            limit = min(limit, cache.max_batch_total_size_bytes)
        self._batch_limit = max(limit - BATCH_HEADROOM, limit // 2)
        self._capabilities = caps
        return caps

    @property
    def update_enabled(self) -> bool:
        """Whether the server accepts action results from this client (asks it once)."""
        caps = self._ensure_capabilities()
        return bool(caps.cache_capabilities.action_cache_update_capabilities.update_enabled)

    @property
    def batch_limit(self) -> int:
        """The most bytes one batch call carries (asks the server once)."""
        self._ensure_capabilities()
        return self._batch_limit

    def _fits_batch(self, size: int) -> bool:
        return size + BATCH_PER_BLOB <= self._batch_limit

    # ----------------------------------------------------------------------- action cache

    def get_action_result(self, action: Digest) -> bytes | None:
        self._ensure_capabilities()
        request = re_pb2.GetActionResultRequest(instance_name=self.instance_name, action_digest=_digest(action),
                                                inline_stdout=False, inline_stderr=False)
        try:
            result = self._call(self._stub("ac").GetActionResult, request, f"reading action result {action.hash}")
        except MissingRemoteBlob:
            return None
        return bytes(result.SerializeToString(deterministic=True))

    def put_action_result(self, action: Digest, result: bytes) -> None:
        if not self.update_enabled:
            raise RemoteError(self.endpoint.redact(f"the {self._who} does not accept action "
                                                   "results from clients (update_enabled is false)"))
        message = re_pb2.ActionResult()
        message.ParseFromString(result)
        request = re_pb2.UpdateActionResultRequest(instance_name=self.instance_name, action_digest=_digest(action),
                                                   action_result=message)
        try:
            self._call(self._stub("ac").UpdateActionResult, request, f"storing action result {action.hash}")
        except MissingRemoteBlob as exc:
            # NOT_FOUND here means a blob the result names is not in the CAS (upload it first).
            raise RemoteError(str(exc)) from None

    # ----------------------------------------------------------------------- CAS

    def find_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        self._ensure_capabilities()
        unique = list(dict.fromkeys(Digest(d.hash, d.size) for d in digests))
        missing: set[Digest] = set()
        stub = self._stub("cas")
        for start in range(0, len(unique), FIND_MISSING_BATCH):
            batch = unique[start:start + FIND_MISSING_BATCH]
            request = re_pb2.FindMissingBlobsRequest(instance_name=self.instance_name,
                                                     blob_digests=[_digest(d) for d in batch])
            answer = self._call(stub.FindMissingBlobs, request, f"checking which of {len(batch)} blobs it holds")
            missing.update(Digest(d.hash, d.size_bytes) for d in answer.missing_blob_digests)
        return missing

    def read_small_blobs(self, digests: list[Digest]) -> dict[Digest, bytes]:
        self._ensure_capabilities()
        found: dict[Digest, bytes] = {}
        batched: list[Digest] = []
        for digest in dict.fromkeys(Digest(d.hash, d.size) for d in digests):
            if digest.size == 0:
                found[digest] = b""
            elif self._fits_batch(digest.size):
                batched.append(digest)
            else:  # over the batch limit: ByteStream, as the base class reads every blob
                found.update(super().read_small_blobs([digest]))
        stub = self._stub("cas")
        for batch in self._batches(batched):
            request = re_pb2.BatchReadBlobsRequest(instance_name=self.instance_name,
                                                   digests=[_digest(d) for d in batch])
            answer = self._call(stub.BatchReadBlobs, request, f"reading {len(batch)} blobs",
                                timeout=self._stream_timeout(sum(d.size for d in batch)))
            for response in answer.responses:
                digest = Digest(response.digest.hash, response.digest.size_bytes)
                code = _status_code(response.status.code)
                if code is grpc.StatusCode.OK:
                    found[digest] = bytes(response.data)
                elif code is not grpc.StatusCode.NOT_FOUND:
                    raise self._status_error(code, response.status.message, f"reading blob {digest.hash}")
        return found

    def write_small_blobs(self, blobs: Mapping[Digest, bytes]) -> None:
        self._ensure_capabilities()
        batched: dict[Digest, bytes] = {}
        for raw_digest, data in blobs.items():
            digest = Digest(raw_digest.hash, raw_digest.size)
            if digest.size == 0:
                continue
            if self._fits_batch(digest.size):
                batched[digest] = data
            else:
                self.write_blob(digest, _opener(data))
        stub = self._stub("cas")
        for batch in self._batches(list(batched)):
            request = re_pb2.BatchUpdateBlobsRequest(
                instance_name=self.instance_name,
                requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=_digest(d), data=batched[d]) for d in batch])
            answer = self._call(stub.BatchUpdateBlobs, request, f"storing {len(batch)} blobs",
                                timeout=self._stream_timeout(sum(d.size for d in batch)))
            for response in answer.responses:
                code = _status_code(response.status.code)
                if code not in (grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS):
                    what = f"storing blob {response.digest.hash}"
                    error = self._status_error(code, response.status.message, what)
                    raise error if not isinstance(error, MissingRemoteBlob) else RemoteError(str(error))

    def get_tree(self, root: Digest, *, page_size: int = TREE_PAGE_SIZE) -> list[bytes]:
        """Every ``Directory`` (serialized) of the tree under directory ``root``, the root
        among them, each once, as the server sends them (``GetTree``, following its
        pages). The caller checks each against the digest that names it: a server omits
        the parts of a tree its CAS lacks.

        :raises MissingRemoteBlob: the server has no directory ``root``.
        :raises RemoteError: the call failed, or the tree holds more than
            :data:`MAX_TREE_DIRECTORIES` directories or :data:`MAX_TREE_BYTES` bytes.
        """
        self._ensure_capabilities()
        what = f"reading directory {root.hash}"
        stub = self._stub("cas")
        seen: dict[bytes, None] = {}
        count = total = 0
        token = ""
        tokens: set[str] = set()
        while True:
            request = re_pb2.GetTreeRequest(instance_name=self.instance_name, root_digest=_digest(root),
                                            page_size=page_size, page_token=token,
                                            digest_function=re_pb2.DigestFunction.SHA256)
            token = ""
            received = 0
            try:
                for response in stub.GetTree(request, timeout=self._stream_timeout(MAX_TREE_BYTES),
                                             metadata=self._metadata, wait_for_ready=False):
                    for directory in response.directories:
                        data = directory.SerializeToString(deterministic=True)
                        count += 1
                        total += len(data)
                        if count > MAX_TREE_DIRECTORIES or total > MAX_TREE_BYTES:
                            raise RemoteError(self.endpoint.redact(
                                f"the {self._who} sent a tree of directory {root.hash} with more than "
                                f"{MAX_TREE_DIRECTORIES} directories or {MAX_TREE_BYTES >> 20} MiB of them, "
                                "more than dtbuild accepts"))
                        seen.setdefault(data, None)
                        received += 1
                    token = response.next_page_token
            except grpc.RpcError as exc:
                raise self.error(exc, what) from None
            if not token:
                return list(seen)
            # The stream ended with more to come: ask again from there, but only for a
            # server that moves on (a repeated token or an empty page would loop forever).
            if received == 0 or token in tokens:
                raise RemoteError(self.endpoint.redact(
                    f"the {self._who} sent the tree of directory {root.hash} in pages that do not "
                    f"advance (GetTree page token {token!r} again, or an empty page)"))
            tokens.add(token)

    def _batches(self, digests: list[Digest]) -> Iterator[list[Digest]]:
        batch: list[Digest] = []
        total = 0
        for digest in digests:
            cost = digest.size + BATCH_PER_BLOB
            if batch and total + cost > self._batch_limit:
                yield batch
                batch, total = [], 0
            batch.append(digest)
            total += cost
        if batch:
            yield batch

    # ----------------------------------------------------------------------- ByteStream

    def _resource(self, *parts: str) -> str:
        return "/".join([self.instance_name, *parts] if self.instance_name else parts)

    def read_blob(self, digest: Digest, sink: Callable[[bytes], object]) -> None:
        if digest.size == 0:
            return
        self._ensure_capabilities()
        what = f"reading blob {digest.hash}"
        request = bs_pb2.ReadRequest(resource_name=self._resource("blobs", digest.hash, str(digest.size)))
        received = 0
        try:
            for response in self._stub("bytestream").Read(request, timeout=self._stream_timeout(digest.size),
                                                         metadata=self._metadata, wait_for_ready=False):
                received += len(response.data)
                if received > digest.size:
                    raise RemoteError(self.endpoint.redact(
                        f"the {self._who} sent more than the {digest.size} bytes of blob "
                        f"{digest.hash}"))
                if response.data:
                    sink(response.data)
        except grpc.RpcError as exc:
            raise self.error(exc, what) from None
        if received != digest.size:
            raise RemoteError(self.endpoint.redact(f"the {self._who} sent {received} of the "
                                                   f"{digest.size} bytes of blob {digest.hash}"))

    def write_blob(self, digest: Digest, open_blob: Callable[[], IO[bytes]]) -> None:
        if digest.size == 0:
            return  # every CAS holds the empty blob
        self._ensure_capabilities()
        what = f"storing blob {digest.hash}"
        resource = self._resource("uploads", str(uuid.uuid4()), "blobs", digest.hash, str(digest.size))
        problem: list[str] = []
        raised: list[Exception] = []

        def requests(f: IO[bytes]) -> Iterator[bs_pb2.WriteRequest]:
            offset = 0
            try:
                while True:
                    chunk = f.read(min(CHUNK_SIZE, digest.size - offset))
                    if not chunk:
                        problem.append(f"the file ended after {offset} of its {digest.size} bytes")
                        return
                    last = offset + len(chunk) >= digest.size
                    if last and f.read(1):
                        problem.append(f"the file holds more than its {digest.size} bytes")
                        return
                    yield bs_pb2.WriteRequest(resource_name=resource if offset == 0 else "", write_offset=offset,
                                              data=chunk, finish_write=last)
                    offset += len(chunk)
                    if last:
                        return
            except OSError as exc:
                problem.append(f"reading it failed: {exc.strerror or exc}")
            except Exception as exc:
                # The source's own error (a store that found the file changed, say) is
                # the caller's to see, not a failed upload: raised again below.
                raised.append(exc)

        try:
            with open_blob() as f:
                try:
                    answer = self._stub("bytestream").Write(requests(f), timeout=self._stream_timeout(digest.size),
                                                            metadata=self._metadata, wait_for_ready=False)
                except grpc.RpcError as exc:
                    if raised:
                        raise raised[0] from None
                    if problem:
                        raise self._local_problem(digest, problem[0]) from None
                    if exc.code() is grpc.StatusCode.ALREADY_EXISTS:
                        return
                    error = self.error(exc, what)
                    raise error if not isinstance(error, MissingRemoteBlob) else RemoteError(str(error)) from None
        except OSError as exc:
            raise self._local_problem(digest, f"opening it failed: {exc.strerror or exc}") from None
        if raised:
            raise raised[0]
        if problem:
            raise self._local_problem(digest, problem[0])
        # A server that already holds the blob may end the stream early, answering the
        # full size or -1 (REAPI v2.1+).
        if answer.committed_size not in (digest.size, -1):
            raise RemoteError(self.endpoint.redact(
                f"the {self._who} kept {answer.committed_size} of the {digest.size} bytes of "
                f"blob {digest.hash}"))

    def _local_problem(self, digest: Digest, problem: str) -> RemoteError:
        return RemoteError(f"could not upload blob {digest.hash} to {self.endpoint.url}: {problem}")


def _digest(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


def _opener(data: bytes) -> Callable[[], IO[bytes]]:
    return lambda: io.BytesIO(data)


def _status_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
