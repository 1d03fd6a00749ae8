"""The remote cache and executor: Bazel's HTTP cache protocol and REAPI v2 over gRPC.

The remote cache sits under the local store (``cache.py``): a local miss asks the
remote, a remote hit fetches the result's blobs into the local store (each checked
against its digest as it arrives) and is then used like a local one; a result made
here is uploaded after the action (existence check first). The remote is never
trusted for bytes: a blob that does not hash to its name is discarded and the action
runs locally. Any failure to talk to it (refused, timeout, 5xx, a server that went
away) is one warning and a local build; only refused credentials are an error, since
they are the user's to fix and a build that silently never shares is worse.

This module holds what the protocols share: :class:`Digest`, :class:`Endpoint` (a URL
with its instance name, headers and credentials, each with where it came from, so that
an error can name the setting and no message ever shows a secret), the errors, and
:class:`Transport`, the byte-level interface both protocols implement
(``http_transport.py``, ``grpc_transport.py``). ``reapi.py`` converts between the
store's results and REAPI's own messages (``ActionResult``, ``Tree``), which is what
both protocols store, so other REAPI clients can read what dtbuild writes.

Nothing here imports grpc or protobuf at module level: a build without a remote pays
nothing for them.
"""

from __future__ import annotations

import abc
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, NamedTuple

# grpc's fork support (on by default) restarts its threads in every child of os.fork(),
# and aborts the child where it cannot (a child entering new namespaces, as a sandbox's
# does). dtbuild never shares a channel with a child, so it is off; this package is
# imported before any module of dtbuild's that imports grpc. A value the user set wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

#: URL schemes of remote caches and executors.
CACHE_SCHEMES = ("http", "https", "grpc", "grpcs")
EXECUTOR_SCHEMES = ("grpc", "grpcs")


class Digest(NamedTuple):
    """A REAPI digest: sha256 hex and size in bytes."""

    hash: str
    size: int


class RemoteError(Exception):
    """The remote could not be used (unreachable, timed out, a 5xx, a broken answer).
    The build goes on locally after one warning."""


class RemoteAuthError(RemoteError):
    """The remote refused the credentials (HTTP 401/403, gRPC UNAUTHENTICATED or
    PERMISSION_DENIED). A user error: the build stops with this message, which names
    where the credentials came from and never holds them."""


@dataclass(frozen=True)
class Credentials:
    """Basic auth or a bearer token, and where it came from (for messages only)."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    #: "the URL of --remote-cache", "[remote] token in dtbuild.toml",
    #: "$DTBUILD_REMOTE_PASSWORD", "the netrc file ~/.netrc (machine HOST)".
    origin: str = ""

    def header(self) -> tuple[str, str] | None:
        """The Authorization header these credentials make, or None."""
        if self.token:
            return "Authorization", f"Bearer {self.token}"
        if self.username is not None:
            import base64

            pair = f"{self.username}:{self.password or ''}".encode()
            return "Authorization", "Basic " + base64.b64encode(pair).decode()
        return None

    def secrets(self) -> list[str]:
        """What must never be shown: the password, the token, and the header they make."""
        found = [s for s in (self.password, self.token) if s]
        header = self.header()
        if header is not None:
            found.append(header[1].split(" ", 1)[1])
        return found


@dataclass(frozen=True)
class Endpoint:
    """One remote service: its URL without credentials, and how to talk to it."""

    #: scheme://host:port/path, credentials removed (safe to print).
    url: str
    #: "--remote-cache", "$DTBUILD_REMOTE_CACHE", "[remote] cache in dtbuild.toml".
    origin: str
    instance_name: str = ""
    #: Extra request headers ([remote] headers); values are never printed.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    credentials: Credentials = field(default_factory=Credentials)
    connect_timeout: float = 5.0
    timeout: float = 60.0
    #: What it is to the build, in messages: "remote cache" or "remote executor".
    role: str = "remote cache"

    @property
    def scheme(self) -> str:
        return self.url.split(":", 1)[0]

    def all_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        auth = self.credentials.header()
        if auth is not None:
            headers[auth[0]] = auth[1]
        return headers

    def redact(self, text: str) -> str:
        """``text`` with every secret of this endpoint replaced by ``***``."""
        for secret in [*self.credentials.secrets(), *self.headers.values()]:
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text


class Transport(abc.ABC):
    """The byte-level remote cache protocol: action results as serialized REAPI
    ``ActionResult`` messages, blobs by digest. Implementations raise
    :class:`RemoteError` (or :class:`RemoteAuthError`) for every failure and are safe
    to call from several threads at once."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    @abc.abstractmethod
    def get_action_result(self, action: Digest) -> bytes | None:
        """The serialized ``ActionResult`` stored for ``action``, or None."""

    @abc.abstractmethod
    def put_action_result(self, action: Digest, result: bytes) -> None: ...

    @abc.abstractmethod
    def find_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        """Those of ``digests`` the remote does not hold."""

    @abc.abstractmethod
    def read_blob(self, digest: Digest, sink: Callable[[bytes], object]) -> None:
        """Stream blob ``digest`` to ``sink`` chunk by chunk (never whole in memory for a
        large blob). Raises :class:`MissingRemoteBlob` when the remote has none. The
        caller checks the bytes against the digest."""

    @abc.abstractmethod
    def write_blob(self, digest: Digest, open_blob: Callable[[], IO[bytes]]) -> None:
        """Upload blob ``digest``, read from ``open_blob()`` (called again for a retry)."""

    def read_small_blobs(self, digests: list[Digest]) -> dict[Digest, bytes]:
        """Several small blobs at once (gRPC BatchReadBlobs); those the remote lacks are
        left out. The caller checks each against its digest."""
        found: dict[Digest, bytes] = {}
        for digest in digests:
            chunks: list[bytes] = []
            try:
                self.read_blob(digest, chunks.append)
            except MissingRemoteBlob:
                continue
            found[digest] = b"".join(chunks)
        return found

    def write_small_blobs(self, blobs: Mapping[Digest, bytes]) -> None:
        """Several small blobs at once (gRPC BatchUpdateBlobs)."""
        import functools
        import io

        for digest, data in blobs.items():
            self.write_blob(digest, functools.partial(io.BytesIO, data))

    def get_tree(self, root: Digest) -> list[bytes]:
        """Every Directory (serialized) of the tree under Directory ``root`` (gRPC
        GetTree), for a result that names an output directory by its root Directory.

        :raises RemoteError: where the protocol has no such call (HTTP).
        """
        raise RemoteError(f"the {self.endpoint.role} {self.endpoint.url} cannot list a tree by its root directory "
                          "(its protocol has no GetTree)")

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""


class MissingRemoteBlob(RemoteError):
    """The remote has no blob of this digest."""


# --------------------------------------------------------------------------- configuration


def parse_endpoint(raw: str, origin: str, *, schemes: tuple[str, ...], instance_name: str = "",
                   headers: Mapping[str, str] | None = None, credentials: Credentials | None = None,
                   environ: Mapping[str, str] | None = None) -> Endpoint:
    """The endpoint of URL ``raw`` (given by ``origin``). Credentials: from the URL's
    user info, else ``credentials`` (settings or environment), else a netrc file
    (``$NETRC`` or ``~/.netrc``) entry for the host.

    :raises ValueError: for a URL that is not one of ``schemes``, with what to write.
    """
    env = os.environ if environ is None else environ
    try:
        parts = urllib.parse.urlsplit(raw.strip())
        port = parts.port  # raises for a port that is not a number from 0 to 65535
        host = parts.hostname
    except ValueError:
        parts, port, host = None, None, None
    if parts is None or parts.scheme not in schemes or not host:
        shown = re.sub(r"//[^@/]*@", "//", raw.strip())  # never a password in a message
        raise ValueError(f"{origin}: {shown!r} is not a remote URL: write "
                         + " or ".join(f"{s}://HOST:PORT" for s in schemes))
    netloc = host if ":" not in host else f"[{host}]"
    if port is not None:
        netloc += f":{port}"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    creds = credentials or Credentials()
    if parts.username is not None:
        creds = Credentials(urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""),
                            origin=f"the user name and password in the URL of {origin}")
    elif creds.username is None and creds.token is None:
        creds = _netrc_credentials(host, env) or creds
    return Endpoint(url, origin, instance_name, dict(headers or {}), creds)


def _netrc_credentials(host: str, env: Mapping[str, str]) -> Credentials | None:
    import netrc

    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    if auth is None:
        return None
    login, _, password = auth
    shown = path.replace(os.path.expanduser("~"), "~", 1) if path.startswith(os.path.expanduser("~")) else path
    return Credentials(login, password, origin=f"the netrc file {shown} (machine {host})")


def open_transport(endpoint: Endpoint) -> Transport:
    """The transport for ``endpoint``'s scheme (imports grpc only for gRPC)."""
    if endpoint.scheme in ("http", "https"):
        from dtbuild.engine.remote.http_transport import HttpTransport

        return HttpTransport(endpoint)
    from dtbuild.engine.remote.grpc_transport import GrpcTransport

    return GrpcTransport(endpoint)
