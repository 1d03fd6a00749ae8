"""Bazel's HTTP remote cache protocol, as bazel-remote and an nginx WebDAV location serve it.

Two key spaces under the endpoint's URL (its path is a prefix; the instance name is not
part of this protocol and is ignored): ``GET/PUT <base>/ac/<hash>`` holds serialized REAPI
``ActionResult`` messages (opaque bytes here) and ``GET/PUT/HEAD <base>/cas/<hash>`` the
blobs. A 404 is a miss; a ``PUT`` succeeds with any of 200, 201 (new) or 204 (replaced,
what nginx answers for a file that existed).

Connections: one ``urllib3.PoolManager`` per transport, shared by every thread (up to 16
kept connections per host; more threads open more rather than wait). Every request carries
``endpoint.all_headers()`` (``[remote] headers`` and the ``Authorization`` the credentials
make). ``https://`` checks the server against the system CA store, or against the PEM
bundle named by ``$DTBUILD_REMOTE_CA_FILE`` for a cache behind a private CA.

Failing fast: connect within ``endpoint.connect_timeout``, every read within
``endpoint.timeout``, no redirects and no retry loops: a dead cache costs one refused or
timed-out request, then the build goes on locally. The one retry is for a kept connection
the server closed between requests (a reset before any answer): ``GET`` and ``HEAD`` are
sent once more, and so is a ``PUT`` (``write_blob`` reopens its body for it), on a fresh
connection. Nothing is retried once bytes of an answer reached the caller.

Streaming: ``read_blob`` hands the body to its sink in 1 MiB chunks and ``write_blob``
sends a file object with ``Content-Length`` = the digest's size, so a blob of any size
costs a few MiB of memory. A body whose length is not the digest's size is an error (the
caller still checks the hash); a small answer (an action result, an error page) is read
up to a bound, so a broken server cannot fill the memory.

Errors: 401 and 403 are :class:`RemoteAuthError`, saying where the credentials came from
(or how to give some); anything else that goes wrong is :class:`RemoteError` naming the URL
(never with credentials) and what happened. Every message goes through
``endpoint.redact()``.
"""

from __future__ import annotations

import functools
import http.client
import io
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, TypeVar

import urllib3
from dtbuild.engine.remote import (
    Digest,
    Endpoint,
    MissingRemoteBlob,
    RemoteAuthError,
    RemoteError,
    Transport,
)
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    IncompleteRead,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

#: Names a PEM file of CA certificates to trust for https:// caches instead of the system's.
CA_FILE_ENV = "DTBUILD_REMOTE_CA_FILE"
#: Bytes per chunk handed to a sink and read from a file being uploaded.
CHUNK_SIZE = 1 << 20
#: Concurrent HEAD requests of one find_missing call.
FIND_MISSING_THREADS = 8
#: Kept connections per host (the pool never blocks: past this, connections are not kept).
POOL_SIZE = 16
#: The largest action result accepted (REAPI results are kilobytes; this bounds a broken server).
MAX_ACTION_RESULT = 64 << 20
#: How much of an error answer is read to quote in the message.
MAX_ERROR_BODY = 64 << 10
#: The SHA-256 of no bytes: REAPI servers hold the empty blob implicitly.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

_HASH = re.compile(r"[0-9a-f]{40,128}")
_OK = (200, 201, 204)


_T = TypeVar("_T")

class _Retry(Exception):
    """A kept connection was closed under a request before any answer: send it again."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HttpTransport(Transport):
    """The HTTP remote cache (see the module docstring)."""

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self._base = endpoint.url.rstrip("/")
        ca_file = os.environ.get(CA_FILE_ENV) or None
        if ca_file is not None and not os.path.isfile(ca_file):
            raise RemoteError(endpoint.redact(
                f"${CA_FILE_ENV} is {ca_file!r}, which is not a file: name a PEM file of CA certificates, "
                "or unset it to use the system's"))
        self._pool = urllib3.PoolManager(
            num_pools=4, maxsize=POOL_SIZE, block=False, retries=False,
            timeout=urllib3.Timeout(connect=endpoint.connect_timeout, read=endpoint.timeout),
            cert_reqs="CERT_REQUIRED", ca_certs=ca_file, blocksize=CHUNK_SIZE)
        self._headers = endpoint.all_headers()
        self._threads: ThreadPoolExecutor | None = None
        self._threads_lock = threading.Lock()

    # ----------------------------------------------------------------------- the protocol

    def get_action_result(self, action: Digest) -> bytes | None:
        url = self._url("ac", action)
        response = self._request("GET", url)
        if response.status == 404:
            self._discard(response)
            return None
        self._check_status("GET", url, response)
        return self._read_bounded("GET", url, response, MAX_ACTION_RESULT)

    def put_action_result(self, action: Digest, result: bytes) -> None:
        url = self._url("ac", action)
        response = self._request("PUT", url, body=lambda: result,
                                 headers={"Content-Length": str(len(result)),
                                          "Content-Type": "application/octet-stream"})
        self._check_status("PUT", url, response)
        self._discard(response)

    def find_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        wanted = [d for d in dict.fromkeys(digests) if not _is_empty(d)]
        return {d for d, present in zip(wanted, self._each(self._has_blob, wanted), strict=True) if not present}

    def read_small_blobs(self, digests: list[Digest]) -> dict[Digest, bytes]:
        def read(digest: Digest) -> bytes | None:
            chunks: list[bytes] = []
            try:
                self.read_blob(digest, chunks.append)
            except MissingRemoteBlob:
                return None
            return b"".join(chunks)

        wanted = list(dict.fromkeys(digests))
        return {d: data for d, data in zip(wanted, self._each(read, wanted), strict=True) if data is not None}

    def write_small_blobs(self, blobs: Mapping[Digest, bytes]) -> None:
        self._each(lambda item: self.write_blob(item[0], functools.partial(io.BytesIO, item[1])),
                   list(blobs.items()))

    def _each(self, call: Callable[[Any], _T], items: list[Any]) -> list[_T]:
        """``[call(item) for item in items]``, several requests at once (HTTP/1.1 has one
        request in flight per connection), on the transport's one pool of threads."""
        if len(items) <= 1:
            return [call(item) for item in items]
        with self._threads_lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(max_workers=FIND_MISSING_THREADS,
                                                   thread_name_prefix="dtbuild-remote-http")
            futures = [self._threads.submit(call, item) for item in items]
        try:
            return [future.result() for future in futures]
        finally:
            # After a failure the queued requests are dropped: a dead cache costs the
            # requests already under way, not one timeout per digest.
            for future in futures:
                future.cancel()

    def read_blob(self, digest: Digest, sink: Callable[[bytes], object]) -> None:
        url = self._url("cas", digest)
        if _is_empty(digest):
            return
        response = self._request("GET", url)
        if response.status == 404:
            self._discard(response)
            raise MissingRemoteBlob(f"the remote cache {self._base} has no blob {digest.hash} (HTTP 404)")
        self._check_status("GET", url, response)
        length = response.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) != digest.size:
            response.close()
            response.release_conn()
            raise RemoteError(self._redact(
                f"the remote cache {self._base}: GET {url} announced {int(length)} bytes, but blob "
                f"{digest.hash} is {digest.size} bytes"))
        received = 0
        try:
            for chunk in response.stream(CHUNK_SIZE, decode_content=False):
                received += len(chunk)
                if received > digest.size:
                    response.close()
                    response.release_conn()
                    raise RemoteError(self._redact(
                        f"the remote cache {self._base}: GET {url} sent more than the {digest.size} bytes "
                        f"of blob {digest.hash}"))
                sink(chunk)
        except HTTPError as exc:
            if isinstance(exc, ProtocolError) and any(isinstance(a, IncompleteRead | http.client.IncompleteRead)
                                                      for a in (exc, *exc.args)):
                raise RemoteError(self._redact(
                    f"the remote cache {self._base}: GET {url} ended after {received} of the "
                    f"{digest.size} bytes of blob {digest.hash} (the server closed the connection)")) from None
            raise RemoteError(self._redact(
                f"the remote cache {self._base}: GET {url} failed after {received} of {digest.size} bytes: "
                f"{_describe(exc, self.endpoint)}")) from None
        if received != digest.size:
            raise RemoteError(self._redact(
                f"the remote cache {self._base}: GET {url} sent {received} bytes, but blob {digest.hash} is "
                f"{digest.size} bytes"))

    def write_blob(self, digest: Digest, open_blob: Callable[[], IO[bytes]]) -> None:
        url = self._url("cas", digest)
        if _is_empty(digest):
            return
        opened: list[IO[bytes]] = []

        def body() -> _SizedReader:
            for f in opened:
                f.close()
            opened.append(open_blob())
            return _SizedReader(opened[-1], digest)

        try:
            response = self._request("PUT", url, body=body,
                                     headers={"Content-Length": str(digest.size),
                                              "Content-Type": "application/octet-stream"})
        finally:
            for f in opened:
                f.close()
        self._check_status("PUT", url, response)
        self._discard(response)

    def close(self) -> None:
        with self._threads_lock:
            threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown(wait=True, cancel_futures=True)
        self._pool.clear()

    # ----------------------------------------------------------------------- requests

    def _url(self, kind: str, digest: Digest) -> str:
        if not _HASH.fullmatch(digest.hash):
            raise RemoteError(f"{digest.hash!r} is not a hex digest: not sent to the remote cache")
        return f"{self._base}/{kind}/{digest.hash}"

    def _has_blob(self, digest: Digest) -> bool:
        url = self._url("cas", digest)
        response = self._request("HEAD", url)
        self._discard(response)
        if response.status == 404:
            return False
        self._check_status("HEAD", url, response)
        # A blob of another size under this name is as good as missing: upload it again.
        length = response.headers.get("Content-Length")
        return not (length is not None and length.strip().isdigit() and int(length) != digest.size)

    def _request(self, method: str, url: str, *, body: Callable[[], Any] | None = None,
                 headers: dict[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        """Send a request (once more after a reset kept connection); the answer's body is
        not read yet. Failures to get an answer are :class:`RemoteError`."""
        all_headers = {**self._headers, **(headers or {})}
        for attempt in (1, 2):
            try:
                return self._pool.request(method, url, body=None if body is None else body(),
                                          headers=all_headers, preload_content=False, redirect=False,
                                          retries=False, decode_content=False)
            except HTTPError as exc:
                if attempt == 1 and _is_reset(exc):
                    continue
                raise RemoteError(self._redact(
                    f"the remote cache {self._base}: {method} {url} failed: {_describe(exc, self.endpoint)}")) from None
        raise AssertionError("unreachable")

    def _check_status(self, method: str, url: str, response: urllib3.BaseHTTPResponse) -> None:
        status = response.status
        if status in _OK:
            return
        detail = self._error_body(response)
        if status in (401, 403):
            raise RemoteAuthError(self._redact(self._auth_message(status)))
        reason = f" {response.reason}" if response.reason else ""
        raise RemoteError(self._redact(
            f"the remote cache {self._base}: {method} {url} answered HTTP {status}{reason}" + detail))

    def _auth_message(self, status: int) -> str:
        origin = self.endpoint.credentials.origin
        if self.endpoint.credentials.header() is None:
            if any(k.lower() == "authorization" for k in self.endpoint.headers):
                origin = "the Authorization header of [remote] headers"
            else:
                return (f"the remote cache {self._base} asks for credentials (HTTP {status}): give them with "
                        "[remote] username and $DTBUILD_REMOTE_PASSWORD, $DTBUILD_REMOTE_TOKEN, the URL "
                        "(http://user:pass@host) or a netrc file")
        origin = origin or "the settings"
        what = "refused the credentials" if status == 401 else "denied access with the credentials"
        return f"the remote cache {self._base} {what} from {origin} (HTTP {status}): fix them, or unset them"

    def _error_body(self, response: urllib3.BaseHTTPResponse) -> str:
        """A short quote of an error answer's text (``: ...``), or ""."""
        try:
            data = self._read_bounded("", "", response, MAX_ERROR_BODY, quiet=True)
        except RemoteError:
            return ""
        content_type = response.headers.get("Content-Type", "")
        if not data or "html" in content_type:
            return ""  # nginx's error pages say nothing the status does not
        text = " ".join(data.decode("utf-8", "replace").split())
        text = "".join(c for c in text if c.isprintable())
        return f": {text[:200]}" if text else ""

    def _read_bounded(self, method: str, url: str, response: urllib3.BaseHTTPResponse, limit: int, *,
                      quiet: bool = False) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.stream(CHUNK_SIZE, decode_content=False):
                size += len(chunk)
                if size > limit:
                    response.close()
                    response.release_conn()
                    raise RemoteError(self._redact(
                        f"the remote cache {self._base}: {method} {url} answered more than {limit} bytes"))
                chunks.append(chunk)
        except HTTPError as exc:
            if quiet:
                raise RemoteError("") from None
            raise RemoteError(self._redact(
                f"the remote cache {self._base}: {method} {url} failed while reading the answer: "
                f"{_describe(exc, self.endpoint)}")) from None
        return b"".join(chunks)

    def _discard(self, response: urllib3.BaseHTTPResponse) -> None:
        """Read what is left of a small answer so its connection can be kept."""
        try:
            self._read_bounded("", "", response, MAX_ERROR_BODY, quiet=True)
        except RemoteError:
            pass

    def _redact(self, text: str) -> str:
        return self.endpoint.redact(text)


class _SizedReader:
    """A blob file as an upload body: exactly ``digest.size`` bytes, or an error (a body
    of another length than its Content-Length would break the connection)."""

    def __init__(self, file: IO[bytes], digest: Digest) -> None:
        self._file = file
        self._digest = digest
        self._left = digest.size

    def read(self, size: int = -1) -> bytes:
        if self._left == 0:
            if self._file.read(1):
                raise RemoteError(f"the local blob {self._digest.hash} is longer than its {self._digest.size} "
                                  "bytes: not uploaded")
            return b""
        want = self._left if size is None or size < 0 else min(size, self._left)
        data = self._file.read(want)
        if not data:
            raise RemoteError(f"the local blob {self._digest.hash} ended after {self._digest.size - self._left} "
                              f"of its {self._digest.size} bytes: not uploaded")
        self._left -= len(data)
        return data


def _is_empty(digest: Digest) -> bool:
    return digest.size == 0 and digest.hash == EMPTY_SHA256


def _is_reset(exc: HTTPError) -> bool:
    """A connection the server closed before answering (a stale kept connection)."""
    if not isinstance(exc, ProtocolError):
        return False
    causes = [a for a in exc.args if isinstance(a, BaseException)]
    return any(isinstance(c, ConnectionResetError | ConnectionAbortedError | BrokenPipeError
                          | http.client.RemoteDisconnected) for c in causes)


def _describe(exc: HTTPError, endpoint: Endpoint) -> str:
    """What went wrong, in words (no object reprs, no traceback)."""
    if isinstance(exc, NameResolutionError):
        return f"cannot resolve the host name ({_cause(exc)})"
    if isinstance(exc, NewConnectionError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (is the cache server running?)"
        if isinstance(cause, TimeoutError):
            return f"could not connect within {endpoint.connect_timeout:g} s"
        return f"could not connect ({_cause(exc)})"
    if isinstance(exc, ConnectTimeoutError):
        return f"could not connect within {endpoint.connect_timeout:g} s"
    if isinstance(exc, ReadTimeoutError):
        return f"no answer within {endpoint.timeout:g} s"
    if isinstance(exc, SSLError):
        return (f"TLS failed ({_cause(exc)}); for a cache whose certificate a private CA signed, "
                f"set ${CA_FILE_ENV} to that CA's PEM file")
    if isinstance(exc, ProtocolError):
        causes = [a for a in exc.args if isinstance(a, BaseException)]
        if any(isinstance(c, TimeoutError) for c in causes):
            return f"no progress within {endpoint.timeout:g} s"
        if any(isinstance(c, ConnectionResetError | BrokenPipeError | http.client.RemoteDisconnected)
               for c in causes):
            return "the server closed the connection"
        return f"broken answer ({_cause(exc)})"
    return _cause(exc)


def _cause(exc: BaseException) -> str:
    """The innermost readable reason of ``exc``."""
    inner: BaseException = exc
    for _ in range(5):
        nxt = inner.__cause__ or next((a for a in getattr(inner, "args", ()) if isinstance(a, BaseException)), None)
        if nxt is None:
            break
        inner = nxt
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    text = str(inner)
    # urllib3 prefixes some messages with an object repr: "<...HTTPConnection object at 0x..>: ..."
    text = re.sub(r"<[^>]*object at 0x[0-9a-f]+>:?\s*", "", text)
    return text or type(inner).__name__
