"""How long dtbuild waits on the network and how much it reads from it: the
``[network]`` settings of ``dtbuild.toml`` (each overridden by a ``DTBUILD_NETWORK_*``
environment variable; the engine applies those to the settings it hands actions, so
this module reads no file and no variable), the clock of one network operation, and the bounded reading of
HTTP response bodies that registry pulls and pushes (:mod:`registry_client`) and
``fetch_url`` downloads share.

Every request has a connect timeout, must start answering within ``timeout`` seconds,
may not fall silent for longer, and must bring at least ``min_rate`` bytes per second
over every ``timeout``-second window (so a trickle fails instead of taking days). An
operation — a manifest, a blob, a download, with every retry of it — ends at its
``deadline``. Every body has a size cap: documents (manifests, indexes, configs, token
answers) ``max_document`` bytes, or exactly their descriptor's size; blobs exactly their
descriptor's size; downloads ``max_download`` bytes. A cap is found by reading one byte
past it, never more.

None of this changes what a build produces, so none of it is in an action's key.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import Settings

#: The section of dtbuild.toml these settings live in.
SECTION = "network"
ENV_PREFIX = "DTBUILD_NETWORK_"
#: What each setting means (docs/registries.md shows the same).
SETTINGS_DOC = {
    "connect_timeout": "seconds to open a connection (TCP and TLS)",
    "timeout": "seconds a server may take to start answering, or stay silent in the middle of an answer; "
               "also the window over which min_rate is measured",
    "min_rate": "bytes per second a transfer must average over every `timeout`-second window (0: no minimum)",
    "deadline": "seconds one operation (a manifest, a blob, a download, with all its retries) may take "
                "(0: no deadline)",
    "max_document": "bytes a manifest, index, config or token answer may have when no descriptor gives its size",
    "max_download": "bytes a fetch_url download (or a blob without a descriptor size) may have",
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_IO_CHUNK = 1 << 20
_HEADER_MARGIN = 0.25


@dataclass(frozen=True, slots=True)
class NetworkLimits:
    """The limits of network reads (see the module docstring and :data:`SETTINGS_DOC`)."""

    connect_timeout: float = 15.0
    timeout: float = 30.0
    min_rate: int = 1024
    deadline: float = 3600.0
    max_document: int = 4 << 20
    max_download: int = 16 << 30

    def clock(self) -> Clock:
        """A clock for one operation, started now."""
        return Clock(self)


class NetworkSettingError(ValueError):
    """A ``[network]`` setting (or its environment variable) has a bad value."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def _number(name: str, value: Any, where: str, *, size: bool) -> float:
    original = value
    if isinstance(value, bool):
        value = None
    elif isinstance(value, str) and size:
        m = _SIZE_RE.match(value)
        value = float(m.group(1)) * _UNITS[(m.group(2) or "")[:1].lower()] if m else None
    elif isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        kind = "a size in bytes (such as 4194304 or \"4 MiB\")" if size else "a number of seconds"
        raise NetworkSettingError(f"{where} must be {kind}, at least 0, but was {original!r}",
                                  hint=f"{name}: {SETTINGS_DOC[name]}")
    return float(value)


def limits_from(settings: Settings) -> NetworkLimits:
    """The limits of the workspace's settings (``ctx.settings``: ``[network]`` with the
    ``DTBUILD_NETWORK_*`` overrides already applied by the engine).

    :raises NetworkSettingError: as :func:`parse_limits`, naming where the bad value came
        from (the dtbuild.toml key or the environment variable).
    """
    return parse_limits(settings.get(SECTION), where=lambda name: settings.origin(SECTION, name))


def parse_limits(section: Any = None, *, where: Callable[[str], str] | None = None) -> NetworkLimits:
    """The limits a ``[network]`` table gives (``section``, None when absent).
    ``where(name)`` says where a value came from, for messages (default: the
    dtbuild.toml key).

    :raises NetworkSettingError: for an unknown setting or a bad value, naming it.
    """
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise NetworkSettingError(f"[{SECTION}] in dtbuild.toml must be a table, such as [{SECTION}] timeout = 30")
    names = [f.name for f in fields(NetworkLimits)]
    for key in section:
        if key not in names:
            import difflib

            close = difflib.get_close_matches(str(key), names, n=1)
            raise NetworkSettingError(f"[{SECTION}] in dtbuild.toml has no setting {key!r} (settings: "
                                      f"{', '.join(names)})",
                                      hint=f"did you mean {close[0]!r}?" if close else None)
    values: dict[str, Any] = {}
    for f in fields(NetworkLimits):
        size = f.name.startswith("max_") or f.name == "min_rate"
        if f.name not in section:
            continue
        origin = where(f.name) if where is not None else f"[{SECTION}] {f.name} in dtbuild.toml"
        value = section[f.name]
        number = _number(f.name, value, origin, size=size)
        if f.name in ("connect_timeout", "timeout") and number == 0:
            raise NetworkSettingError(f"{origin} must be more than 0 seconds, but was {value!r}",
                                      hint=f"{f.name}: {SETTINGS_DOC[f.name]}")
        values[f.name] = int(number) if size else number
    return NetworkLimits(**values)


def size_text(n: float) -> str:
    """``n`` bytes for people: 512 B, 12 KiB, 4.0 MiB."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value >= 10 or value == int(value) else f"{value:.1f} {unit}"
    return f"{int(n)} B"


def seconds_text(s: float) -> str:
    """``s`` seconds for people: 2 s, 0.5 s, 30 s."""
    return f"{s:.0f} s" if s >= 10 or abs(s - round(s)) < 0.05 else f"{s:.1f} s"


class LimitExceeded(OSError):
    """A transfer broke a limit. The message says which, of which server, and how to change
    it; ``retryable`` when the same request may do better (a stall), not when it cannot
    (too large, too slow, out of time)."""

    def __init__(self, message: str, *, hint: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.retryable = retryable

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class Clock:
    """The time budget of one operation, shared by all its requests and retries."""

    def __init__(self, limits: NetworkLimits) -> None:
        self.limits = limits
        self.started = time.monotonic()
        self.ends = self.started + limits.deadline if limits.deadline > 0 else math.inf

    def remaining(self) -> float:
        return self.ends - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def wait_timeout(self) -> float:
        """How long the next socket operation may block: ``timeout``, less when the
        deadline is nearer (never 0, which would mean non-blocking)."""
        return max(0.001, min(self.limits.timeout, self.remaining()))

    def request_timeout(self) -> Any:
        """The ``urllib3.Timeout`` of the next request."""
        import urllib3

        rest = max(0.001, self.remaining())
        return urllib3.Timeout(connect=min(self.limits.connect_timeout, rest), read=self.wait_timeout())

    def sleep(self, delay: float) -> bool:
        """Sleep ``delay`` seconds before a retry, unless that would end past the deadline
        (then return False at once: there is no time for another try)."""
        if delay >= self.remaining():
            return False
        time.sleep(delay)
        return True

    def deadline_error(self, server: str, what: str, received: int | None = None) -> LimitExceeded:
        got = f" (received {size_text(received)})" if received else ""
        return LimitExceeded(
            f"{server} did not finish {what} within {seconds_text(self.limits.deadline)}{got}; giving up",
            hint="check the network, or raise [network] deadline in dtbuild.toml "
                 f"(or {ENV_PREFIX}DEADLINE) for a slow server")


class HeaderGuard:
    """Whether the answer to one request failed to bring all its headers in time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False


_GUARD: contextvars.ContextVar[HeaderGuard | None] = contextvars.ContextVar("dtbuild_header_guard", default=None)


@contextlib.contextmanager
def headers_within(seconds: float) -> Iterator[HeaderGuard]:
    """Requests sent in this block through a :func:`pool_manager` have their connection
    shut when the answer's status line and headers have not all arrived within
    ``seconds``: a server sending them a byte at a time restarts the socket timeout with
    each byte, and would otherwise hold the request for as long as it likes. The
    guard's ``expired`` says whether that happened (the request then fails as a
    closed connection)."""
    guard = HeaderGuard(seconds)
    token = _GUARD.set(guard)
    try:
        yield guard
    finally:
        _GUARD.reset(token)


def _guarded_connection(base: type) -> type:
    class GuardedConnection(base):  # type: ignore[misc,valid-type]
        def getresponse(self) -> Any:
            guard = _GUARD.get()
            sock = self.sock
            if guard is None or sock is None:
                return super().getresponse()

            def expire() -> None:
                guard.expired = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

            # A little after the socket timeout, which then reports a plain silence as such.
            timer = threading.Timer(guard.seconds + _HEADER_MARGIN, expire)
            timer.daemon = True
            timer.start()
            try:
                response = super().getresponse()
            finally:
                timer.cancel()
            if guard.expired:
                # http.client takes the end of the stream for the end of the headers.
                response.close()
                raise TimeoutError("the answer's headers did not all arrive in time")
            return response

    GuardedConnection.__name__ = "Guarded" + base.__name__
    return GuardedConnection


@functools.cache
def _guarded_pools() -> dict[str, type]:
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class GuardedHTTPConnectionPool(HTTPConnectionPool):
        ConnectionCls = _guarded_connection(HTTPConnection)

    class GuardedHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = _guarded_connection(HTTPSConnection)

    return {"http": GuardedHTTPConnectionPool, "https": GuardedHTTPSConnectionPool}


def pool_manager(**kwargs: Any) -> Any:
    """A ``urllib3.PoolManager`` (with ``kwargs``) whose connections obey
    :func:`headers_within`."""
    import urllib3

    manager = urllib3.PoolManager(**kwargs)
    # PoolManager keeps its pool classes per instance for exactly this kind of override.
    manager.pool_classes_by_scheme = _guarded_pools()
    return manager


def _set_read_timeout(response: Any, seconds: float) -> None:
    """Make the next read of ``response`` block at most ``seconds``: the deadline comes
    nearer while a body is read, so the timeout set when the request was sent would
    overshoot it."""
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.settimeout(seconds)
        except OSError:
            pass


def read_body(response: Any, write: Callable[[bytes], Any], *, limit: int, clock: Clock, server: str,
              what: str, too_large: Callable[[], LimitExceeded]) -> int:
    """Read the body of ``response`` (a urllib3 response opened with
    ``preload_content=False``) into ``write``, bounded by ``limit`` bytes and by
    ``clock``: at most ``limit + 1`` bytes are read, and ``too_large()`` is raised when
    there is that one more byte (or when the Content-Length header says so before any
    is read). Return the number of bytes written.

    :raises LimitExceeded: when the body is too large, the server falls silent for
        ``timeout`` seconds, sends less than ``min_rate`` bytes/s over a window, or the
        deadline passes; other read errors (urllib3's, OSError) pass through.
    """
    import urllib3

    # What the Content-Length header announces (urllib3 knows a HEAD's is no body).
    declared = getattr(response, "length_remaining", None)
    if isinstance(declared, int) and declared > limit:
        raise too_large()
    limits = clock.limits
    received = 0
    window_start, window_received = time.monotonic(), 0
    while True:
        if clock.expired():
            raise clock.deadline_error(server, what, received)
        _set_read_timeout(response, clock.wait_timeout())
        try:
            # read1 returns what one receive brings: read(n) would block until n bytes
            # arrived, hiding a trickle from the rate check below.
            chunk = response.read1(min(_IO_CHUNK, limit + 1 - received))
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
            if clock.expired():
                raise clock.deadline_error(server, what, received) from None
            raise LimitExceeded(
                f"{server} sent nothing for {seconds_text(limits.timeout)} while {what} "
                f"(after {size_text(received)}); giving up",
                hint=f"check the network, or raise [network] timeout in dtbuild.toml (or {ENV_PREFIX}TIMEOUT)",
                retryable=True) from None
        if not chunk:
            return received
        received += len(chunk)
        if received > limit:
            raise too_large()
        write(chunk)
        now = time.monotonic()
        if now >= clock.ends:
            raise clock.deadline_error(server, what, received)
        elapsed = now - window_start
        if elapsed >= limits.timeout:
            moved = received - window_received
            if moved < limits.min_rate * elapsed:
                raise LimitExceeded(
                    f"{server} sent {size_text(moved)} in {seconds_text(elapsed)} while {what} (less than "
                    f"{size_text(limits.min_rate)}/s); giving up",
                    hint="check the network, or lower [network] min_rate or raise [network] timeout in "
                         f"dtbuild.toml (or {ENV_PREFIX}MIN_RATE, {ENV_PREFIX}TIMEOUT)")
            window_start, window_received = now, received


def read_some(response: Any, limit: int, clock: Clock) -> tuple[bytes, bool]:
    """(up to ``limit`` bytes of the body, whether that was all of it), for bodies only
    worth a glance (error messages) or to discard; errors and limits end it quietly."""
    out = bytearray()

    def too_large() -> LimitExceeded:
        return LimitExceeded("", hint="")

    try:
        read_body(response, out.extend, limit=limit, clock=clock, server="", what="", too_large=too_large)
    except Exception:
        return bytes(out[:limit]), False
    return bytes(out), True


__all__ = [
    "SETTINGS_DOC",
    "Clock",
    "HeaderGuard",
    "LimitExceeded",
    "NetworkLimits",
    "NetworkSettingError",
    "headers_within",
    "limits_from",
    "parse_limits",
    "pool_manager",
    "read_body",
    "read_some",
    "seconds_text",
    "size_text",
]
