"""An OCI distribution client: the registry HTTP API v2 that ``pull_image`` pulls from
and ``dtbuild push`` pushes to.

This module owns:

* image references (``host[:port]/path/name[:tag][@sha256:...]``, Docker Hub's
  ``docker.io`` defaults) — :func:`parse_reference`;
* credentials — :func:`find_credentials`: ``DTBUILD_REGISTRY_USER`` /
  ``DTBUILD_REGISTRY_PASSWORD`` (limited to one registry by ``DTBUILD_REGISTRY_HOST``),
  then ``$REGISTRY_AUTH_FILE``, then ``$DOCKER_CONFIG/config.json`` (default
  ``~/.docker/config.json``): ``credHelpers``, ``credsStore`` (``docker-credential-NAME
  get``) and ``auths`` (base64 ``auth``, ``username``/``password``, ``identitytoken``);
* authentication — ``WWW-Authenticate`` challenges (:func:`parse_challenges`), Basic auth
  and the Bearer token flow (GET on the realm with Basic credentials, or the OAuth2
  refresh-token POST for identity tokens), tokens cached per scope set;
* transfers — :class:`RegistryClient`: manifests (verified against the digest asked
  for), blobs streamed with their sha256 checked on every byte received, uploads
  (POST, then one PUT for small blobs or PATCH chunks and a final PUT for large ones;
  cross-repository mounts), retries with exponential backoff on 429, 5xx and
  connection errors, TLS verified unless ``tls_verify=False`` (which also falls back to
  plain HTTP);
* bounds — every answer's body is read under :mod:`network_limits`' size caps and clock:
  a document (manifest, index, config, token answer) exactly its descriptor's size or at
  most ``max_document``, a blob exactly its descriptor's size; each public operation
  (with its retries and token requests) ends at the ``deadline``, every request must
  start answering within ``timeout``, and a transfer slower than ``min_rate`` fails;
* progress — blob downloads and uploads tell an optional ``progress(done_bytes)`` the bytes
  moved so far, per chunk (0 again when a try starts over); callers throttle it
  (:class:`dtbuild.plugins.progress.ProgressMeter`).

Secrets (passwords, identity tokens, bearer tokens, the base64 ``auth`` strings) never
appear in a message this module produces: every :class:`RegistryError` is scrubbed of
them, and :class:`Credentials` does not show its secret in its ``repr``. What a server
says (error bodies, header values) is quoted with control characters escaped.

Credentials and tokens go only to the registry's own origin (the scheme, host and port
it was reached on): a redirect elsewhere, or a downgrade from https to http on the same
host, is followed without them. A token service (the Bearer ``realm``) gets the
credentials over https, or over http only on the registry's own origin or when the
registry was given as insecure (``--insecure``, ``tls_verify = False``).

Pure library on urllib3 (measured ~6x faster than httpx for large PUTs on loopback):
no engine, no store. Safe to share between threads.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import urllib3
from dtbuild.plugins.builtin.imageformat import (
    DOCKER_MANIFEST_LIST_MEDIA_TYPE,
    DOCKER_MANIFEST_MEDIA_TYPE,
    OCI_INDEX_MEDIA_TYPE,
    OCI_MANIFEST_MEDIA_TYPE,
)
from dtbuild.plugins.builtin.network_limits import (
    Clock,
    LimitExceeded,
    NetworkLimits,
    headers_within,
    pool_manager,
    read_body,
    read_some,
    seconds_text,
    size_text,
)
from dtbuild.plugins.text import printable

# The image format's media types (imageformat owns them), by the names this client uses.
OCI_MANIFEST = OCI_MANIFEST_MEDIA_TYPE
OCI_INDEX = OCI_INDEX_MEDIA_TYPE
DOCKER_MANIFEST = DOCKER_MANIFEST_MEDIA_TYPE
DOCKER_MANIFEST_LIST = DOCKER_MANIFEST_LIST_MEDIA_TYPE
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
#: The key Docker uses for Docker Hub in config.json and with credential helpers.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"

ENV_USER = "DTBUILD_REGISTRY_USER"
ENV_PASSWORD = "DTBUILD_REGISTRY_PASSWORD"
ENV_HOST = "DTBUILD_REGISTRY_HOST"

#: Blobs up to this size are uploaded with one PUT; larger ones in PATCH chunks.
MONOLITHIC_MAX = 32 << 20
#: The size of each PATCH of a chunked upload.
CHUNK_SIZE = 32 << 20
#: Statuses worth trying again (after a backoff): rate limiting and server trouble.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: How much of an error answer is read (for its message); the rest is not.
ERROR_BODY_MAX = 64 << 10

_IO_CHUNK = 1 << 20
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_DOMAIN_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                        r"(?::[0-9]+)?$|^\[[0-9A-Fa-f:.]+\](?::[0-9]+)?$")
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_TOKEN_CHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CHALLENGE_TOKEN_RE = re.compile(r"\s*(" + _TOKEN_CHARS + r")")
_TOKEN68_RE = re.compile(r"\s*[A-Za-z0-9\-._~+/]+=*\s*(?:,|$)")
# Unquoted values are tokens in RFC 7235; some servers leave URLs unquoted, so take up to a comma.
_PARAM_RE = re.compile(r"\s*(" + _TOKEN_CHARS + r")\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|([^\s,\"]+))")


class RegistryError(Exception):
    """A registry operation failed. The message says what failed, for which registry,
    repository or blob, and is free of secrets; ``hint`` says how to fix it."""

    def __init__(self, message: str, *, hint: str | None = None, status: int | None = None,
                 retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.status = status
        #: A single failed attempt that may succeed when the whole operation is repeated.
        self.retryable = retryable

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------- references


@dataclass(frozen=True, slots=True)
class Reference:
    """An image reference: ``registry/repository[:tag][@digest]``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """The host[:port] the HTTP API is served on (Docker Hub's differs from its name)."""
        return api_host(self.registry)

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text


def api_host(registry: str) -> str:
    return DOCKER_HUB_API if registry in (DOCKER_HUB, "index.docker.io") else registry


def parse_reference(text: str) -> Reference:
    """Parse an image reference the way docker does: the first path component is a
    registry when it has a '.' or ':' or is ``localhost``; otherwise the registry is
    Docker Hub (``docker.io``), where one-component names are under ``library/``.

    :raises ValueError: with a message saying what is wrong.
    """
    original = text
    if not text or text != text.strip():
        raise ValueError(f"{original!r} is not an image reference")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise ValueError(f"{original!r}: the digest must be sha256:<64 lowercase hex digits>")
    tag = None
    last = text.rsplit("/", 1)[-1]
    if ":" in last:
        text, tag = text.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise ValueError(f"{original!r}: {tag!r} is not a valid tag (letters, digits, '_', '.', '-'; at most 128)")
    parts = text.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry, path = parts[0], parts[1:]
        if not _DOMAIN_RE.match(registry):
            raise ValueError(f"{original!r}: {registry!r} is not a valid registry host[:port]")
    else:
        registry, path = DOCKER_HUB, parts
        if len(path) == 1:
            path = ["library", *path]
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    for component in path:
        if not _PATH_COMPONENT_RE.match(component):
            hint = " (repository names are lowercase)" if component.lower() != component else ""
            raise ValueError(f"{original!r}: {component!r} is not a valid repository path component{hint}")
    return Reference(registry, "/".join(path), tag, digest)


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and a secret for one registry, and where they were found (for
    messages). ``secret`` is a password, or an OAuth2 refresh token when
    ``identity_token``; it never shows in ``repr``."""

    username: str
    secret: str = field(repr=False)
    source: str = ""
    identity_token: bool = False

    def secrets(self) -> tuple[str, ...]:
        """Every string that would reveal the secret (for scrubbing messages)."""
        basic = base64.b64encode(f"{self.username}:{self.secret}".encode()).decode()
        return tuple(s for s in (self.secret, basic, urllib.parse.quote(self.secret, safe="")) if len(s) >= 3)


def credential_keys(registry: str) -> list[str]:
    """The config.json keys that may hold credentials for ``registry`` (host[:port])."""
    if registry in (DOCKER_HUB, "index.docker.io", DOCKER_HUB_API):
        return [DOCKER_HUB_AUTH_KEY, "index.docker.io", "docker.io", DOCKER_HUB_API, "https://index.docker.io/v1"]
    return [registry, f"https://{registry}", f"http://{registry}"]


def _normalize_key(key: str) -> str:
    """``https://host:5000/v1/`` -> ``host:5000``; Docker Hub's many spellings -> docker.io."""
    bare = key.removeprefix("https://").removeprefix("http://").split("/", 1)[0]
    return DOCKER_HUB if bare in ("index.docker.io", DOCKER_HUB, DOCKER_HUB_API) else bare


def docker_config_paths(environ: Mapping[str, str]) -> list[str]:
    """Auth files consulted, in order: ``$REGISTRY_AUTH_FILE`` (podman/skopeo's), then
    ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``."""
    paths = []
    if environ.get("REGISTRY_AUTH_FILE"):
        paths.append(environ["REGISTRY_AUTH_FILE"])
    docker_config = environ.get("DOCKER_CONFIG")
    if docker_config:
        paths.append(os.path.join(docker_config, "config.json"))
    else:
        home = environ.get("HOME") or os.path.expanduser("~")
        paths.append(os.path.join(home, ".docker", "config.json"))
    return paths


def find_credentials(registry: str, environ: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials for ``registry`` (host[:port], ``docker.io`` for Docker Hub), or None.

    Order: the ``DTBUILD_REGISTRY_USER``/``DTBUILD_REGISTRY_PASSWORD`` environment
    variables (for every registry, or only for ``DTBUILD_REGISTRY_HOST`` when it is set);
    then each auth file of :func:`docker_config_paths`: its ``credHelpers`` entry for the
    registry, its ``credsStore``, its ``auths`` entry.

    :raises RegistryError: when an auth file is malformed or a credential helper fails
        (not when it merely has no entry for the registry).
    """
    env = os.environ if environ is None else environ
    registry = _normalize_key(registry)
    user, password = env.get(ENV_USER), env.get(ENV_PASSWORD)
    if user and password is not None:
        scope = env.get(ENV_HOST)
        if not scope or _normalize_key(scope) == registry:
            return Credentials(user, password, f"{ENV_USER}/{ENV_PASSWORD}")
    for path in docker_config_paths(env):
        try:
            with open(path, "rb") as f:
                config = json.loads(f.read() or b"{}")
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise RegistryError(f"cannot read the auth file {path}: {e}",
                                hint="fix or remove it (docker login rewrites it)") from None
        if not isinstance(config, dict):
            raise RegistryError(f"the auth file {path} is not a JSON object")
        found = _from_config(config, path, registry, env)
        if found is not None:
            return found
    return None


def _from_config(config: dict[str, Any], path: str, registry: str, env: Mapping[str, str]) -> Credentials | None:
    helpers = config.get("credHelpers") or {}
    for key, helper in helpers.items():
        if _normalize_key(key) == registry and helper:
            return run_credential_helper(str(helper), registry, env, origin=f"credHelpers in {path}")
    if config.get("credsStore"):
        found = run_credential_helper(str(config["credsStore"]), registry, env, origin=f"credsStore in {path}")
        if found is not None:
            return found
    auths = config.get("auths") or {}
    for key, entry in auths.items():
        if _normalize_key(key) != registry or not isinstance(entry, dict):
            continue
        where = f"{path} (auths)"
        if entry.get("identitytoken"):
            return Credentials(str(entry.get("username") or "<token>"), str(entry["identitytoken"]), where,
                               identity_token=True)
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=False).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                raise RegistryError(f"the 'auth' of {key} in {path} is not base64 of user:password",
                                    hint=f"run `docker login {registry}` again") from None
            user, sep, password = decoded.partition(":")
            if not sep or not user:
                raise RegistryError(f"the 'auth' of {key} in {path} is not base64 of user:password",
                                    hint=f"run `docker login {registry}` again")
            return Credentials(user, password, where)
        if entry.get("username") and entry.get("password") is not None:
            return Credentials(str(entry["username"]), str(entry["password"]), where)
    return None


def run_credential_helper(helper: str, registry: str, environ: Mapping[str, str] | None = None, *,
                          origin: str = "") -> Credentials | None:
    """Ask ``docker-credential-<helper> get`` for ``registry``'s credentials. None when the
    helper has none; RegistryError when it is missing or fails. The helper's output is
    never quoted in messages (it may hold the secret)."""
    program = f"docker-credential-{helper}"
    env = dict(os.environ if environ is None else environ)
    path = shutil.which(program, path=env.get("PATH"))
    where = f" (named by {origin})" if origin else ""
    if path is None:
        raise RegistryError(f"the credential helper {program}{where} is not installed or not on PATH",
                            hint=f"install {program}, or remove it from the docker config")
    server = DOCKER_HUB_AUTH_KEY if registry == DOCKER_HUB else registry
    try:
        done = subprocess.run([path, "get"], input=server.encode(), capture_output=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RegistryError(f"the credential helper {program}{where} could not run: {type(e).__name__}") from None
    if done.returncode != 0:
        text = (done.stdout + done.stderr).decode("utf-8", "replace").lower()
        if "not found" in text:
            return None
        raise RegistryError(f"the credential helper {program}{where} failed for {registry} "
                            f"(exit status {done.returncode})",
                            hint=f"run `echo {server} | {program} get` to see its error")
    try:
        answer = json.loads(done.stdout)
        user, secret = str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"the credential helper {program}{where} answered something other than "
                            "{\"Username\": ..., \"Secret\": ...}") from None
    if not secret:
        return None
    source = f"{program}{where}"
    if user == "<token>":
        return Credentials(user, secret, source, identity_token=True)
    return Credentials(user, secret, source)


# --------------------------------------------------------------------------- WWW-Authenticate


@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a scheme (lowercase) and its parameters."""

    scheme: str
    params: Mapping[str, str]


def parse_challenges(header: str) -> list[Challenge]:
    """The challenges of a ``WWW-Authenticate`` header (RFC 7235): ``Bearer
    realm="https://auth/token",service="reg",scope="repository:a:pull,push"``, ``Basic
    realm="x"``, several separated by commas. Quoted values may hold commas and escapes;
    parameter names are lowercased."""
    challenges: list[Challenge] = []
    pos = 0
    n = len(header)
    while pos < n:
        while pos < n and header[pos] in " \t,":
            pos += 1
        if pos >= n:
            break
        m = _CHALLENGE_TOKEN_RE.match(header, pos)
        if m is None:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        token68 = _TOKEN68_RE.match(header, pos)
        if token68 is not None and pos < n and header[pos] in " \t":  # "Negotiate abc==": no parameters
            challenges.append(Challenge(scheme, {}))
            pos = token68.end()
            continue
        while True:
            p = _PARAM_RE.match(header, pos)
            if p is None:
                break
            # "Basic realm=x, Bearer realm=y": a token followed by another token (not '=')
            # starts the next challenge, which _PARAM_RE does not match.
            value = p.group(2) if p.group(2) is not None else p.group(3)
            params[p.group(1).lower()] = re.sub(r"\\(.)", r"\1", value) if p.group(2) is not None else value
            pos = p.end()
            while pos < n and header[pos] in " \t":
                pos += 1
            if pos < n and header[pos] == ",":
                pos += 1
                continue
            break
        challenges.append(Challenge(scheme, params))
    return challenges


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***`` (longest first)."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------- the client


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest or index as the registry served it."""

    data: bytes
    media_type: str
    digest: str

    def json(self) -> dict[str, Any]:
        value = json.loads(self.data)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value


class _Unreachable(Exception):
    """A request did not get an HTTP answer (refused, reset, timed out, TLS failure)."""

    def __init__(self, reason: str, *, tls: bool = False, timed_out: bool = False, deadline: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tls = tls
        #: No answer in time (the connect or read timeout, or the deadline).
        self.timed_out = timed_out or deadline
        #: Not sent at all: the operation's deadline had passed.
        self.deadline = deadline


def _describe(error: BaseException) -> tuple[str, bool]:
    """(a short reason, whether it is a TLS problem) for a urllib3 exception."""
    text = str(error)
    if isinstance(error, urllib3.exceptions.SSLError):
        inner = re.search(r"\[SSL: ([A-Z_]+)\]|(CERTIFICATE_VERIFY_FAILED|WRONG_VERSION_NUMBER)", text)
        return f"TLS handshake failed ({(inner.group(1) or inner.group(2)) if inner else 'SSL error'})", True
    if isinstance(error, urllib3.exceptions.NameResolutionError):
        return "the host name does not resolve", False
    if isinstance(error, urllib3.exceptions.NewConnectionError):  # (a subclass of ConnectTimeoutError)
        if "refused" in text.lower():
            return "connection refused", False
        if "timed out" not in text.lower():
            return "cannot connect (" + text.rsplit(":", 1)[-1].strip() + ")", False
    if isinstance(error, urllib3.exceptions.ConnectTimeoutError):
        return "the connection timed out", False
    if isinstance(error, urllib3.exceptions.ReadTimeoutError):
        return "no answer within the read timeout", False
    if isinstance(error, urllib3.exceptions.ProtocolError):
        if "reset" in text.lower():
            return "the connection was reset", False
        return "the connection was closed in the middle of a request", False
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {error.strerror or error}", False
    return type(error).__name__, False


def _unreachable(error: BaseException, timeout: urllib3.Timeout) -> _Unreachable:
    """What a request that got no answer (``error``, sent with ``timeout``) tells the user."""
    inner = next((a for a in (error, *error.args) if isinstance(a, LimitExceeded)), None)
    if inner is not None:  # the deadline passed while a request body was sent
        return _Unreachable(inner.message, timed_out=True)
    reason, tls = _describe(error)
    if isinstance(error, urllib3.exceptions.ReadTimeoutError):
        reason = f"no answer within {seconds_text(timeout.read_timeout or 0)}"
    elif isinstance(error, urllib3.exceptions.ConnectTimeoutError) and "timed out" in str(error).lower():
        reason = f"no connection within {seconds_text(timeout.connect_timeout or 0)}"
    return _Unreachable(reason, tls=tls, timed_out=isinstance(error, urllib3.exceptions.TimeoutError))


class RegistryClient:
    """One registry's HTTP API. Thread-safe: share one client between the threads of a
    transfer (connections are pooled, tokens cached per scope set).

    :param registry: host[:port] (``docker.io`` for Docker Hub).
    :param tls_verify: False accepts any certificate and falls back to plain HTTP when
        the registry does not speak TLS (``--insecure``, ``tls_verify = False``).
    :param credentials: explicit credentials; without them they are looked up with
        :func:`find_credentials` when the registry first asks (unless
        ``lookup_credentials`` is False: anonymous).
    :param max_connections: connections kept open per host (one per transfer thread).
    :param monolithic_max: blobs up to this size are uploaded in one PUT, larger ones in
        PATCH chunks of ``chunk_size``.
    :param attempts: tries per request (and per blob upload) before giving up.
    :param backoff: seconds before the first retry; doubled for each next one.
    :param limits: timeouts, deadline and size caps (``[network]`` in dtbuild.toml:
        :func:`~dtbuild.plugins.builtin.network_limits.limits_from`); the defaults
        of :class:`NetworkLimits` when None.
    """

    def __init__(self, registry: str, *, tls_verify: bool = True, credentials: Credentials | None = None,
                 lookup_credentials: bool = True, max_connections: int = 8, attempts: int = 5,
                 backoff: float = 0.25, limits: NetworkLimits | None = None,
                 monolithic_max: int = MONOLITHIC_MAX, chunk_size: int = CHUNK_SIZE,
                 user_agent: str = "dtbuild") -> None:
        self.registry = _normalize_key(registry) if "/" in registry else registry
        self.host = api_host(self.registry)
        self.tls_verify = tls_verify
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.monolithic_max = monolithic_max
        self.chunk_size = max(1, chunk_size)
        self.user_agent = user_agent
        self.limits = limits or NetworkLimits()
        self._local = threading.local()  # the clock of the operation each thread is in
        self._credentials = credentials
        self._credentials_known = credentials is not None or not lookup_credentials
        self._secrets: set[str] = set(credentials.secrets()) if credentials else set()
        self._lock = threading.Lock()
        self._scheme: str | None = None
        self._challenge: Challenge | None = None
        self._basic: str | None = None
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        kwargs: dict[str, Any] = {
            "num_pools": 8, "maxsize": max(1, max_connections), "block": False, "retries": False,
            "timeout": urllib3.Timeout(connect=self.limits.connect_timeout, read=self.limits.timeout),
            "blocksize": _IO_CHUNK,
        }
        if not tls_verify:
            import warnings

            kwargs["cert_reqs"] = "CERT_NONE"
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        self._http = pool_manager(**kwargs)

    def close(self) -> None:
        self._http.clear()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the clock

    @contextlib.contextmanager
    def _operation(self) -> Iterator[Clock]:
        """The clock of one public operation: started by the outermost one, shared by
        every request, token fetch and retry inside it, so the deadline bounds them all."""
        outer: Clock | None = getattr(self._local, "clock", None)
        if outer is not None:
            yield outer
            return
        clock = self._local.clock = self.limits.clock()
        try:
            yield clock
        finally:
            self._local.clock = None

    def _clock(self) -> Clock:
        clock: Clock | None = getattr(self._local, "clock", None)
        return clock if clock is not None else self.limits.clock()

    def _tries(self, attempt: int, *, out_of_time: bool = False) -> str:
        """How many tries a failure took, and whether the deadline stopped them (for messages)."""
        tries = f"tried {attempt + 1} times" if attempt else ""
        if out_of_time:
            tries += ("; " if tries else "") + (f"no time left within the [network] deadline of "
                                                f"{seconds_text(self.limits.deadline)}")
        return f" ({tries})" if tries else ""

    def _limit_error(self, e: LimitExceeded) -> RegistryError:
        return self._error(e.message, hint=e.hint, retryable=e.retryable)

    def _discard(self, response: urllib3.BaseHTTPResponse) -> None:
        """Done with ``response``: read what is left of a short body so the connection
        can be reused, else close the connection (never read an endless body)."""
        try:
            _, complete = read_some(response, ERROR_BODY_MAX, self._clock())
            if not complete:
                response.close()
        finally:
            response.release_conn()

    # ------------------------------------------------------------------ messages

    def _error(self, message: str, *, hint: str | None = None, status: int | None = None,
               retryable: bool = False) -> RegistryError:
        with self._lock:
            secrets = set(self._secrets)
        # Messages quote server answers: escape what a terminal would execute.
        return RegistryError(printable(scrub(message, secrets)),
                             hint=printable(scrub(hint, secrets)) if hint else None, status=status,
                             retryable=retryable)

    def _remember_secret(self, *values: str) -> None:
        with self._lock:
            self._secrets.update(v for v in values if v and len(v) >= 3)

    def _body_text(self, response: urllib3.BaseHTTPResponse) -> str:
        """The registry's error(s) from a JSON error body, else the start of the body
        (reading at most :data:`ERROR_BODY_MAX` bytes of it)."""
        data, complete = read_some(response, ERROR_BODY_MAX, self._clock())
        if not complete:
            response.close()
        try:
            errors = json.loads(data).get("errors") or []
            parts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict)]
            if parts:
                return "; ".join(parts)
        except (ValueError, AttributeError):
            pass
        text = data[:300].decode("utf-8", "replace").strip()
        return re.sub(r"\s+", " ", text)

    # ------------------------------------------------------------------ connection set-up

    def _base(self) -> str:
        if self._scheme is None:
            self.ping()
        return f"{self._scheme}://{self.host}"

    def _is_registry_origin(self, url: str) -> bool:
        """Whether ``url`` is on the scheme, host and port the registry was reached on:
        the only place its credentials and tokens may go."""
        return _origin(url) == _origin(self._base())

    def ping(self) -> None:
        """``GET /v2/``: find the scheme (https, or http when not verifying TLS) and the
        authentication the registry asks for."""
        with self._lock:
            if self._scheme is not None:
                return
        with self._operation():
            self._ping()

    def _ping(self) -> None:
        schemes = ["https"] if self.tls_verify else ["https", "http"]
        last: _Unreachable | None = None
        tries = ""
        for scheme in schemes:
            url = f"{scheme}://{self.host}/v2/"
            for attempt in range(self.attempts):
                try:
                    response = self._raw("GET", url, {})
                except _Unreachable as e:
                    if e.deadline and last is not None:  # what went wrong before is the news
                        tries = self._tries(attempt, out_of_time=True)
                        break
                    last = e
                    if e.tls or (scheme == "https" and len(schemes) > 1):
                        break  # no point retrying a TLS mismatch; try plain HTTP when allowed
                    if attempt + 1 < self.attempts:
                        if self._sleep(attempt, None):
                            continue
                        tries = self._tries(attempt, out_of_time=True)
                    break
                self._discard(response)
                if response.status in RETRY_STATUSES and attempt + 1 < self.attempts and self._sleep(attempt, response):
                    continue
                with self._lock:
                    self._scheme = scheme
                    if response.status == 401:
                        challenges = parse_challenges(response.headers.get("WWW-Authenticate", ""))
                        self._challenge = _preferred(challenges)
                return
        assert last is not None
        hint = "check that the registry is running and reachable"
        if last.tls:
            hint = (f"if {self.registry} serves plain HTTP or uses a self-signed certificate, pass --insecure "
                    "(dtbuild push) or tls_verify = False (pull_image)")
        elif last.timed_out:
            hint += "; for a slow registry, raise [network] timeout or deadline in dtbuild.toml"
        raise self._error(f"cannot reach the registry {self.registry}: {last.reason}{tries}", hint=hint)

    # ------------------------------------------------------------------ requests

    def _raw(self, method: str, url: str, headers: Mapping[str, str], body: Any = None) -> urllib3.BaseHTTPResponse:
        """One request, its body not read yet: the caller reads it with a bound
        (:func:`read_body`, :meth:`_discard`), so no answer is ever read whole unasked."""
        clock = self._clock()
        if clock.expired():
            raise _Unreachable(f"no time left within the [network] deadline of {seconds_text(self.limits.deadline)}",
                               deadline=True)
        timeout = clock.request_timeout()
        with headers_within(timeout.read_timeout) as guard:
            try:
                return self._http.request(method, url, body=body, headers={"User-Agent": self.user_agent, **headers},
                                          preload_content=False, decode_content=False, redirect=False,
                                          timeout=timeout)
            except (urllib3.exceptions.HTTPError, OSError) as e:
                if guard.expired:
                    raise _Unreachable(f"no complete answer within {seconds_text(guard.seconds)}",
                                       timed_out=True) from None
                raise _unreachable(e, timeout) from None

    def _sleep(self, attempt: int, response: urllib3.BaseHTTPResponse | None) -> bool:
        """Wait before another try; False (at once) when the operation's deadline would
        pass first: then there is no other try."""
        delay = self.backoff * (2 ** attempt) * (1 + random.random() / 4)
        if response is not None:
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.strip().isdigit():
                delay = max(delay, min(float(retry_after), 30.0))
        return self._clock().sleep(delay)

    def _auth_header(self, scopes: tuple[str, ...]) -> str | None:
        """The Authorization header to send up front, when the registry's challenge is
        known (saves the 401 round trip on every request)."""
        with self._lock:
            challenge = self._challenge
            basic = self._basic
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            if basic is None:  # the registry said Basic at /v2/: send credentials up front when there are some
                creds = self._get_credentials()
                if creds is not None:
                    basic = "Basic " + base64.b64encode(f"{creds.username}:{creds.secret}".encode()).decode()
                    with self._lock:
                        self._basic = basic
            return basic
        if challenge.scheme == "bearer" and scopes and "realm" in challenge.params:
            return "Bearer " + self._fetch_token(challenge, scopes, self._get_credentials())
        return None

    def _get_credentials(self) -> Credentials | None:
        with self._lock:
            if self._credentials_known:
                return self._credentials
        found = find_credentials(self.registry)
        with self._lock:
            self._credentials = found
            self._credentials_known = True
            if found is not None:
                self._secrets.update(found.secrets())
        return found

    def _answer_challenge(self, challenge: Challenge, scopes: tuple[str, ...], sent: str | None) -> str:
        """The Authorization header answering ``challenge`` (after a 401 to a request
        that carried ``sent``)."""
        creds = self._get_credentials()
        if challenge.scheme == "basic":
            if creds is None:
                raise self._error(f"the registry {self.registry} requires a user name and password, and none were "
                                  "found for it", status=401, hint=_LOGIN_HINT.format(registry=self.registry))
            header = "Basic " + base64.b64encode(f"{creds.username}:{creds.secret}".encode()).decode()
            if sent == header:
                raise self._rejected(creds)
            with self._lock:
                self._basic = header
                self._challenge = challenge
            return header
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise self._error(f"the registry {self.registry} asks for {challenge.scheme} authentication, which "
                              "dtbuild does not support (it supports Basic and Bearer tokens)", status=401)
        with self._lock:
            self._challenge = challenge
        # A token we sent was refused: it expired, or lacks a scope the challenge names.
        return "Bearer " + self._fetch_token(challenge, scopes, creds, fresh=sent is not None)

    def _rejected(self, creds: Credentials) -> RegistryError:
        return self._error(f"the registry {self.registry} rejected the credentials of user '{creds.username}' "
                           f"(from {creds.source})", status=401,
                           hint=f"check the user name and password; `docker login {self.registry}` stores new ones")

    def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...], creds: Credentials | None, *,
                     fresh: bool = False) -> str:
        """A bearer token for ``scopes`` (and the scope the challenge names), cached."""
        with self._lock:
            cached = self._tokens.get(scopes)
            if cached is not None and cached[1] > time.monotonic() and not fresh:
                return cached[0]
        wanted = set(scopes)
        if challenge.params.get("scope"):
            wanted.update(challenge.params["scope"].split(" "))
        realm = challenge.params["realm"]
        service = challenge.params.get("service")
        realm_host = urllib.parse.urlsplit(realm).netloc or realm
        realm_scheme = _origin(realm)[0]
        if realm_scheme not in ("http", "https"):
            raise self._error(f"the registry {self.registry} names the token service {realm!r}, which is not an "
                              "http(s) URL", status=401)
        if creds is not None and realm_scheme != "https" and self.tls_verify \
                and not self._is_registry_origin(realm):
            # Plain http to another host would hand the password to anyone on the way.
            raise self._error(
                f"the registry {self.registry} sends clients to the token service {realm_host} over plain http; "
                f"dtbuild does not send the credentials of user '{creds.username}' (from {creds.source}) "
                "there", status=401,
                hint=f"if you trust {realm_host} and the network to it, pass --insecure (dtbuild push) or "
                     "tls_verify = False (pull_image); otherwise ask the registry's operator for an https realm")
        headers: dict[str, str] = {}
        if creds is not None and creds.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": creds.secret, "client_id": "dtbuild",
                    "scope": " ".join(sorted(wanted))}
            if service:
                form["service"] = service
            method, url = "POST", realm
            body: Any = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            query = [("service", service)] if service else []
            query += [("scope", s) for s in sorted(wanted)]
            method, body = "GET", None
            url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query) if query else realm
            if creds is not None:
                headers["Authorization"] = "Basic " + base64.b64encode(
                    f"{creds.username}:{creds.secret}".encode()).decode()
        for attempt in range(self.attempts):
            try:
                response = self._raw(method, url, headers, body)
            except _Unreachable as e:
                if attempt + 1 < self.attempts and not e.tls and self._sleep(attempt, None):
                    continue
                raise self._error(f"cannot reach the token service {realm_host} of {self.registry}: {e.reason}"
                                  f"{self._tries(attempt, out_of_time=self._clock().expired() and not e.deadline)}",
                                  hint="check that the registry's auth server is running") from None
            if response.status in RETRY_STATUSES and attempt + 1 < self.attempts:
                self._discard(response)
                if self._sleep(attempt, response):
                    continue
                raise self._error(f"the token service {realm_host} of {self.registry} answered HTTP "
                                  f"{response.status}{self._tries(attempt, out_of_time=True)}",
                                  status=response.status)
            break
        if response.status in (401, 403):
            self._discard(response)
            if creds is None:
                raise self._error(f"the token service {realm_host} of {self.registry} refused anonymous access to "
                                  f"{', '.join(sorted(wanted))}", status=401,
                                  hint=_LOGIN_HINT.format(registry=self.registry))
            raise self._rejected(creds)
        if response.status != 200:
            raise self._error(f"the token service {realm_host} of {self.registry} answered HTTP {response.status}: "
                              f"{self._body_text(response)}", status=response.status)
        data = bytearray()
        try:
            read_body(response, data.extend, limit=self.limits.max_document, clock=self._clock(),
                      server=f"the token service {realm_host}", what=f"answering for {self.registry}",
                      too_large=lambda: LimitExceeded(
                          f"the token service {realm_host} of {self.registry} answered with more than "
                          f"{size_text(self.limits.max_document)}; refusing it",
                          hint="raise [network] max_document in dtbuild.toml if this answer is right"))
        except LimitExceeded as e:
            response.close()
            raise self._limit_error(e) from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            response.close()
            raise self._error(f"the connection to the token service {realm_host} of {self.registry} broke: "
                              f"{_describe(e)[0]}") from None
        finally:
            response.release_conn()
        try:
            answer = json.loads(bytes(data))
            token = str(answer.get("token") or answer.get("access_token") or "")
            expires_in = float(answer.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            answer, token, expires_in = {}, "", 0.0
        if not token:
            raise self._error(f"the token service {realm_host} of {self.registry} answered without a token")
        self._remember_secret(token, str(answer.get("refresh_token") or ""))
        with self._lock:
            # Renew 10 s early; registries give at least 60 s (docker's token spec).
            self._tokens[scopes] = (token, time.monotonic() + max(5.0, expires_in - 10))
        return token

    def _authorized(self, method: str, url: str, scopes: tuple[str, ...], headers: Mapping[str, str],
                    body: Callable[[], Any] | bytes | None) -> urllib3.BaseHTTPResponse:
        """One request with authentication: credentials sent up front when the scheme is
        known, else on the registry's 401 (then the request is sent again, once)."""
        if not self._is_registry_origin(url):
            # Another origin (an upload location, a storage back end) gets no credentials.
            return self._raw(method, url, _without_auth(headers), body() if callable(body) else body)
        sent_headers = dict(headers)
        auth = self._auth_header(scopes)
        if auth:
            sent_headers["Authorization"] = auth
        response = self._raw(method, url, sent_headers, body() if callable(body) else body)
        if response.status != 401:
            return response
        challenge = _preferred(parse_challenges(response.headers.get("WWW-Authenticate", "")))
        self._discard(response)
        if challenge is None:
            raise self._error(f"the registry {self.registry} answered 401 Unauthorized without saying how to "
                              "authenticate (no WWW-Authenticate header)", status=401)
        sent_headers["Authorization"] = self._answer_challenge(challenge, scopes, auth)
        response = self._raw(method, url, sent_headers, body() if callable(body) else body)
        if response.status != 401:
            return response
        self._discard(response)
        creds = self._get_credentials()
        if creds is None:
            raise self._error(f"the registry {self.registry} requires authentication, and no credentials were "
                              "found for it", status=401, hint=_LOGIN_HINT.format(registry=self.registry))
        if challenge.scheme == "bearer":
            raise self._error(f"the registry {self.registry} denied user '{creds.username}' (credentials from "
                              f"{creds.source}) access to {', '.join(scopes)}", status=403,
                              hint="check that this user may pull from (or push to) the repository")
        raise self._rejected(creds)

    def _send(self, method: str, path: str, *, what: str, scopes: tuple[str, ...] = (),
              headers: Mapping[str, str] | None = None, body: Callable[[], Any] | bytes | None = None,
              ok: Sequence[int] = (200,), retry: bool = True,
              follow_redirects: bool = False) -> urllib3.BaseHTTPResponse:
        """A request with retries (429, 5xx and connection errors) that answers one of
        ``ok``; anything else raises a RegistryError naming ``what`` was being done. The
        answer's body is not read: the caller reads it, bounded, or :meth:`_discard` s it.
        Retries stop at the deadline of the operation the request belongs to."""
        url = path if path.startswith(("http://", "https://")) else self._base() + path
        attempts = self.attempts if retry else 1
        for attempt in range(attempts):
            try:
                response = self._authorized(method, url, scopes, headers or {}, body)
                hops = 0
                while follow_redirects and response.status in _REDIRECTS and hops < 5:
                    location = response.headers.get("Location", "")
                    self._discard(response)
                    target = urllib.parse.urljoin(url, location)
                    # Storage back ends (S3, GCS) reject a registry's Authorization header, and a
                    # redirect to another origin or to plain http must not carry it:
                    # _authorized sends credentials to the registry's own origin only.
                    response = self._authorized(method, target, scopes, headers or {}, None)
                    hops += 1
            except _Unreachable as e:
                if not e.tls and attempt + 1 < attempts and self._sleep(attempt, None):
                    continue
                hint = "check that the registry is running and reachable, then run the same command again"
                if e.timed_out:
                    hint += "; for a slow registry, raise [network] timeout or deadline in dtbuild.toml"
                stopped_early = attempt + 1 < attempts and not e.tls and not e.deadline
                raise self._error(f"cannot reach the registry {self.registry}: {e.reason}, while {what}"
                                  f"{self._tries(attempt, out_of_time=stopped_early)}",
                                  hint=hint, retryable=not retry) from None
            if response.status in RETRY_STATUSES and attempt + 1 < attempts and self._sleep(attempt, response):
                self._discard(response)
                continue
            if response.status not in ok:
                raise self._status_error(response, what, retryable=not retry and response.status in RETRY_STATUSES)
            return response
        raise AssertionError("unreachable")

    def _status_error(self, response: urllib3.BaseHTTPResponse, what: str, *, retryable: bool) -> RegistryError:
        status = response.status
        detail = self._body_text(response)
        response.release_conn()
        detail = f": {detail}" if detail else ""
        if status == 403:
            return self._error(f"the registry {self.registry} denied access while {what} (HTTP 403{detail})",
                               status=status, hint="check that your user may pull from (or push to) this repository")
        if status == 404:
            return self._error(f"not found while {what} (HTTP 404{detail})", status=status)
        if status == 429:
            return self._error(f"the registry {self.registry} kept rate-limiting requests while {what} "
                               f"(HTTP 429{detail})", status=status, hint="wait a while and try again",
                               retryable=retryable)
        return self._error(f"the registry {self.registry} answered HTTP {status} while {what}{detail}",
                           status=status, retryable=retryable)

    # ------------------------------------------------------------------ reading

    def _descriptor_size(self, size: Any, what: str) -> int | None:
        if size is None:
            return None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise self._error(f"the descriptor of {what} gives the size {size!r}, which is not a number of bytes; "
                              "refusing it")
        return size

    def _read_into(self, response: urllib3.BaseHTTPResponse, write: Callable[[bytes], Any], *, limit: int,
                   what: str, too_large: str, hint: str) -> int:
        """The body of ``response`` into ``write``, at most ``limit`` bytes (more is
        ``too_large``), under the operation's clock; the connection is released (closed
        unless the body was read to its end)."""
        complete = False
        try:
            received = read_body(response, write, limit=limit, clock=self._clock(),
                                 server=f"the registry {self.registry}", what=what,
                                 too_large=lambda: LimitExceeded(too_large, hint=hint))
            complete = True
            return received
        finally:
            if not complete:
                response.close()
            response.release_conn()

    def get_manifest(self, repository: str, reference: str, *, size: int | None = None) -> Manifest:
        """The manifest or index ``reference`` (a tag or a digest) of ``repository``. When
        ``reference`` is a digest, the bytes received are checked against it; with
        ``size`` (from the descriptor naming it) there must be exactly that many, else at
        most ``max_document``."""
        name = f"the manifest {reference} of {self.registry}/{repository}"
        what = f"fetching {name}"
        size = self._descriptor_size(size, name)
        limit = self.limits.max_document if size is None else size
        if size is not None and size > self.limits.max_document:
            raise self._error(f"{name} is {size_text(size)} by its descriptor; dtbuild reads manifests of at most "
                              f"{size_text(self.limits.max_document)}",
                              hint="raise [network] max_document in dtbuild.toml if the manifest is right")
        too_large = (f"{name} is larger than its descriptor's size of {size} bytes; refusing it" if size is not None
                     else f"{name} is larger than {size_text(limit)}; refusing it")
        data = bytearray()
        with self._operation():
            response = self._send("GET", f"/v2/{repository}/manifests/{reference}", what=what,
                                  scopes=(f"repository:{repository}:pull",),
                                  headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)})
            try:
                self._read_into(response, data.extend, limit=limit, what=what, too_large=too_large,
                                hint="raise [network] max_document in dtbuild.toml if the manifest is right"
                                if size is None else "the registry serves another manifest than its index names")
            except LimitExceeded as e:
                raise self._limit_error(e) from None
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise self._error(f"the connection to {self.registry} broke while {what}: {_describe(e)[0]}",
                                  retryable=True) from None
        if size is not None and len(data) != size:
            raise self._error(f"{name} has {len(data)} bytes, but its descriptor says {size}; refusing it")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if _DIGEST_RE.match(reference) and digest != reference:
            raise self._error(f"the registry {self.registry} answered {reference} of {repository} with a manifest "
                              f"whose digest is {digest}; refusing it")
        media_type = (response.headers.get("Content-Type") or "").split(";")[0].strip()
        if media_type not in MANIFEST_MEDIA_TYPES:
            try:
                declared = json.loads(data).get("mediaType")
            except (ValueError, AttributeError):
                declared = None
            media_type = declared or media_type
        return Manifest(bytes(data), media_type, digest)

    def blob_size(self, repository: str, digest: str) -> int | None:
        """The size of blob ``digest`` in ``repository`` (HEAD), or None when it is not there."""
        with self._operation():
            response = self._send("HEAD", f"/v2/{repository}/blobs/{digest}", scopes=(f"repository:{repository}:pull",),
                                  what=f"checking for blob {digest} in {self.registry}/{repository}", ok=(200, 404),
                                  follow_redirects=True)
            self._discard(response)
        if response.status == 404:
            return None
        length = response.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else 0

    def fetch_blob(self, repository: str, digest: str, sink: IO[bytes], *, size: int | None = None,
                   limit: int | None = None, progress: Callable[[int], object] | None = None) -> int:
        """Stream blob ``digest`` into ``sink`` (a seekable file, emptied before each
        try), hashing every byte; return its size. A blob whose bytes do not have its
        digest raises RegistryError; so does one of more than ``size`` bytes (its
        descriptor's), or without ``size``, of more than ``limit`` (default
        ``max_download``): never is a byte more than that read. Every try, and the waits
        between them, end at the operation's deadline. ``progress(done_bytes)`` is told
        the bytes received so far, per chunk, from 0 for each try."""
        return self._fetch_blob(repository, digest, sink, size=size, limit=limit, setting="max_download",
                                progress=progress)

    def _fetch_blob(self, repository: str, digest: str, sink: IO[bytes], *, size: int | None, limit: int | None,
                    setting: str, progress: Callable[[int], object] | None = None) -> int:
        what = f"downloading blob {digest} from {self.registry}/{repository}"
        size = self._descriptor_size(size, f"blob {digest} of {self.registry}/{repository}")
        cap = size if size is not None else (limit if limit is not None else self.limits.max_download)
        if size is not None:
            too_large = (f"blob {digest} from {self.registry}/{repository} is larger than its descriptor's size of "
                         f"{size} bytes; refusing it")
            hint = "the manifest and the blob the registry serves disagree: a corrupt registry or proxy"
        else:
            too_large = (f"blob {digest} from {self.registry}/{repository} has no size in its descriptor and is "
                         f"larger than {size_text(cap)}; refusing it")
            hint = f"raise [network] {setting} in dtbuild.toml if the blob is right"
        with self._operation():
            for attempt in range(self.attempts):
                sink.seek(0)
                sink.truncate()
                response = self._send("GET", f"/v2/{repository}/blobs/{digest}", what=what,
                                      scopes=(f"repository:{repository}:pull",), follow_redirects=True)
                h = hashlib.sha256()
                moved = [0]
                if progress is not None:
                    progress(0)

                def write(chunk: bytes, h: Any = h, moved: list[int] = moved) -> None:
                    h.update(chunk)
                    sink.write(chunk)
                    if progress is not None:
                        moved[0] += len(chunk)
                        progress(moved[0])

                try:
                    received = self._read_into(response, write, limit=cap, what=what, too_large=too_large, hint=hint)
                except LimitExceeded as e:
                    if e.retryable and attempt + 1 < self.attempts and self._sleep(attempt, None):
                        continue
                    raise self._limit_error(e) from None
                except (urllib3.exceptions.HTTPError, OSError) as e:
                    if attempt + 1 < self.attempts and self._sleep(attempt, None):
                        continue
                    raise self._error(f"the connection to {self.registry} broke while {what}: {_describe(e)[0]}"
                                      f"{self._tries(attempt, out_of_time=attempt + 1 < self.attempts)}",
                                      hint="run the build again; nothing partial was kept") from None
                actual = "sha256:" + h.hexdigest()
                if size is not None and received != size:
                    raise self._error(f"blob {digest} from {self.registry}/{repository} has {received} bytes, "
                                      f"but its descriptor says {size}; refusing it")
                if actual != digest:
                    raise self._error(f"the bytes of blob {digest} received from {self.registry}/{repository} have "
                                      f"digest {actual}; refusing them (a corrupt registry or proxy)")
                return received
        raise AssertionError("unreachable")

    def fetch_document(self, repository: str, digest: str, *, size: int | None = None) -> bytes:
        """A small blob (an image config) in memory, checked against its digest: exactly
        ``size`` bytes when its descriptor gives one, else at most ``max_document``."""
        import io

        size = self._descriptor_size(size, f"blob {digest} of {self.registry}/{repository}")
        if size is not None and size > self.limits.max_document:
            raise self._error(f"blob {digest} of {self.registry}/{repository} is {size} bytes; dtbuild reads configs "
                              f"of at most {size_text(self.limits.max_document)}",
                              hint="raise [network] max_document in dtbuild.toml if the config is right")
        buffer = io.BytesIO()
        self._fetch_blob(repository, digest, buffer, size=size, limit=self.limits.max_document,
                         setting="max_document")
        return buffer.getvalue()

    # ------------------------------------------------------------------ writing

    def upload_blob(self, repository: str, digest: str, size: int, open_blob: Callable[[], IO[bytes]], *,
                    mount_from: str | None = None, progress: Callable[[int], object] | None = None) -> str:
        """Put blob ``digest`` (``size`` bytes, read by ``open_blob``) into ``repository``.

        With ``mount_from`` (another repository of this registry) a cross-repository
        mount is asked first; when the registry declines it, the upload session it
        opens instead is used. Small blobs go in one PUT, larger ones in PATCH chunks of
        ``chunk_size``. A failed attempt starts over (a new session) after a backoff.
        ``progress(done_bytes)`` is told the bytes sent so far, per chunk (a mount sends none).

        :return: ``"mounted"`` or ``"uploaded"``.
        """
        scopes = [f"repository:{repository}:pull,push"]
        if mount_from:
            scopes.append(f"repository:{mount_from}:pull")
        with self._operation():
            for attempt in range(self.attempts):
                try:
                    return self._upload_once(repository, digest, size, open_blob, mount_from, tuple(sorted(scopes)),
                                             progress)
                except RegistryError as e:
                    if not e.retryable or attempt + 1 == self.attempts or not self._sleep(attempt, None):
                        if e.retryable:
                            e.message += self._tries(attempt, out_of_time=attempt + 1 < self.attempts)
                            e.args = (e.message,)
                        raise
        raise AssertionError("unreachable")

    def _upload_once(self, repository: str, digest: str, size: int, open_blob: Callable[[], IO[bytes]],
                     mount_from: str | None, scopes: tuple[str, ...],
                     progress: Callable[[int], object] | None = None) -> str:
        where = f"{self.registry}/{repository}"
        query = ""
        if mount_from:
            query = "?" + urllib.parse.urlencode({"mount": digest, "from": mount_from})
        response = self._send("POST", f"/v2/{repository}/blobs/uploads/{query}", scopes=scopes, ok=(201, 202),
                              what=f"starting the upload of blob {digest} to {where}", headers={"Content-Length": "0"})
        self._discard(response)
        if response.status == 201:
            return "mounted"
        location = self._location(response, f"starting the upload of blob {digest} to {where}")
        try:
            return self._send_blob(location, digest, size, open_blob, scopes, where, progress)
        except RegistryError as e:
            if e.status in (404, 416):  # the session expired or was lost (a registry restart): start over
                e.retryable = True
            raise

    def _send_blob(self, location: str, digest: str, size: int, open_blob: Callable[[], IO[bytes]],
                   scopes: tuple[str, ...], where: str, progress: Callable[[int], object] | None = None) -> str:
        content = {"Content-Type": "application/octet-stream"}
        if size <= self.monolithic_max:
            response = self._send("PUT", _with_digest(location, digest), scopes=scopes, ok=(201, 204),
                                  what=f"uploading blob {digest} ({_size(size)}) to {where}", retry=False,
                                  headers={**content, "Content-Length": str(size)},
                                  body=lambda: _file_part(open_blob, 0, size, self._clock(), self.registry,
                                                          progress))
        else:
            offset = 0
            while offset < size:
                length = min(self.chunk_size, size - offset)
                start = offset
                response = self._send(
                    "PATCH", location, scopes=scopes, ok=(202, 204), retry=False,
                    what=f"uploading bytes {start}-{start + length - 1} of blob {digest} ({_size(size)}) to {where}",
                    headers={**content, "Content-Length": str(length),
                             "Content-Range": f"{start}-{start + length - 1}"},
                    body=lambda start=start, length=length: _file_part(  # type: ignore[misc]
                        open_blob, start, length, self._clock(), self.registry, progress))
                self._discard(response)
                location = self._location(response, f"uploading blob {digest} to {where}")
                offset += length
            response = self._send("PUT", _with_digest(location, digest), scopes=scopes, ok=(201, 204), retry=False,
                                  what=f"completing the upload of blob {digest} to {where}",
                                  headers={"Content-Length": "0"})
        self._discard(response)
        answered = response.headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise self._error(f"{self.registry} stored blob {digest} under the digest {answered}")
        return "uploaded"

    def _location(self, response: urllib3.BaseHTTPResponse, what: str) -> str:
        location = response.headers.get("Location")
        if not location:
            raise self._error(f"the registry {self.registry} gave no upload location while {what}")
        return urllib.parse.urljoin(self._base() + "/", location)

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        """PUT a manifest under ``reference`` (a tag or its digest); return its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with self._operation():
            response = self._send("PUT", f"/v2/{repository}/manifests/{reference}", ok=(200, 201, 202, 204),
                                  scopes=(f"repository:{repository}:pull,push",),
                                  what=f"putting the manifest {reference} of {self.registry}/{repository}",
                                  headers={"Content-Type": media_type, "Content-Length": str(len(data))}, body=data)
            self._discard(response)
        answered = response.headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise self._error(f"{self.registry} stored the manifest of {repository}:{reference} under the digest "
                              f"{answered}, not {digest}")
        return digest


_LOGIN_HINT = ("run `docker login {registry}` (or put credentials in ~/.docker/config.json), or set "
               f"{ENV_USER} and {ENV_PASSWORD}")


def _preferred(challenges: Sequence[Challenge]) -> Challenge | None:
    for scheme in ("bearer", "basic"):
        for challenge in challenges:
            if challenge.scheme == scheme:
                return challenge
    return challenges[0] if challenges else None


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the port filled in for http and https."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: an origin nothing else has
        return scheme, parts.netloc.lower(), -1
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _without_auth(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() != "authorization"}


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})


def _file_part(open_blob: Callable[[], IO[bytes]], offset: int, length: int, clock: Clock,
               registry: str, progress: Callable[[int], object] | None = None) -> Iterator[bytes]:
    """``length`` bytes of a blob from ``offset``, in chunks (a request body), until the
    operation's deadline (each chunk's sending is bounded by the socket timeout).
    ``progress`` is told the blob's bytes handed to the connection so far."""
    with open_blob() as f:
        if offset:
            f.seek(offset)
        remaining = length
        if progress is not None:
            progress(offset)
        while remaining:
            if clock.expired():
                raise clock.deadline_error(f"the registry {registry}", "an upload", length - remaining)
            data = f.read(min(_IO_CHUNK, remaining))
            if not data:
                raise OSError(f"the blob ended {remaining} bytes early")
            remaining -= len(data)
            yield data
            if progress is not None:
                progress(offset + length - remaining)


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


def platform_of(descriptor: Mapping[str, Any]) -> str:
    """``os/architecture[/variant]`` of an index entry."""
    platform = descriptor.get("platform") or {}
    text = f"{platform.get('os', '?')}/{platform.get('architecture', '?')}"
    if platform.get("variant"):
        text += "/" + str(platform["variant"])
    return text


def select_platform(index: Mapping[str, Any], os_name: str, arch: str) -> Mapping[str, Any] | None:
    """The first entry of an image index for ``os_name``/``arch`` (any variant), or None.
    ``arch`` may name a variant too: ``arm64/v8``, ``arm/v7``."""
    arch_name, _, variant = arch.partition("/")
    for descriptor in index.get("manifests") or []:
        platform = descriptor.get("platform") or {}
        if platform.get("os") != os_name or platform.get("architecture") != arch_name:
            continue
        if variant and platform.get("variant") not in (variant, None):
            continue
        if descriptor.get("mediaType") in (OCI_MANIFEST, DOCKER_MANIFEST, None):
            return descriptor
    return None


__all__ = ["CHUNK_SIZE", "MONOLITHIC_MAX", "Challenge", "Credentials", "Manifest", "Reference", "RegistryClient",
           "RegistryError", "find_credentials", "parse_challenges", "parse_reference", "platform_of",
           "run_credential_helper", "scrub", "select_platform"]
