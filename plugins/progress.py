"""Byte progress of transfers, throttled: :class:`ProgressMeter` turns the bytes a
download or an upload moves, chunk by chunk, into a few calls of
:func:`~dtbuild.plugins.hookspecs.dtbuild_transfer_progress` (through
:meth:`ActionContext.progress <dtbuild.plugins.interfaces.ActionContext.progress>`,
:meth:`CommandAPI.progress <dtbuild.plugins.interfaces.CommandAPI.progress>` or the
engine's own reporter).

One meter per transfer. Per chunk it costs a clock read and a comparison; it reports the
start, then at most once every :data:`INTERVAL` seconds, then once when the transfer
ends: a last call whose ``done_bytes`` equals its ``total_bytes`` (which, for a transfer
that stops early or whose size was unknown, is then the bytes moved). Transfers smaller
than ``min_bytes`` (:data:`MIN_BYTES` by default) are not reported at all: a thousand
small blobs must not flood the display.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO, Any, Protocol

#: Seconds between two reports of one transfer (the final report is not held back).
INTERVAL = 0.1
#: Transfers smaller than this are not reported.
MIN_BYTES = 1 << 20

#: The clock the meters read (a test replaces it to count calls without waiting).
_now: Callable[[], float] = time.monotonic


class ProgressReport(Protocol):
    """Where a meter reports: ``ActionContext.progress``, ``CommandAPI.progress``, or any
    callable taking the hook's arguments but ``label``, by name."""

    def __call__(self, *, description: str, done_bytes: int, total_bytes: int | None) -> None: ...


class ProgressMeter:
    """The progress of one transfer, reported through ``report``.

    ``with ProgressMeter(ctx.progress, "download x", size) as meter:`` then
    :meth:`update` (bytes moved so far) or :meth:`add` (bytes just moved) per chunk; the
    end of the ``with`` block (or :meth:`finish`) sends the final report. A transfer that
    starts over (a retry) calls ``update(0)``; the display then sees it go back.
    """

    __slots__ = ("_active", "_done", "_finished", "_last", "_report", "description", "interval",
                 "min_bytes", "total")

    def __init__(self, report: ProgressReport, description: str, total_bytes: int | None, *,
                 min_bytes: int = MIN_BYTES, interval: float = INTERVAL) -> None:
        self._report = report
        self.description = description
        self.total = total_bytes
        self.min_bytes = min_bytes
        self.interval = interval
        self._done = 0
        self._last = 0.0
        #: Whether this transfer has been reported (it is big enough).
        self._active = False
        self._finished = False

    @property
    def done(self) -> int:
        return self._done

    def __enter__(self) -> ProgressMeter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def start(self) -> None:
        """Report the transfer's start (0 bytes of its total) when its total is known and
        large enough; one of unknown size is reported once it has moved ``min_bytes``."""
        if not self._active and self.total is not None and self.total >= self.min_bytes:
            self._emit(self._done, self.total)

    def add(self, n: int) -> None:
        """``n`` more bytes were moved."""
        self.update(self._done + n)

    def update(self, done_bytes: int) -> None:
        """``done_bytes`` have been moved so far (cheap: call it per chunk)."""
        previous, self._done = self._done, done_bytes
        total = self.total
        if total is not None and done_bytes > total:
            self.total = total = None  # the size announced was wrong: it is not known after all
        if not self._active:
            if done_bytes < self.min_bytes or (total is not None and total < self.min_bytes):
                return
            self._emit(done_bytes, total)
        elif self._finished:
            if done_bytes < previous:
                self._emit(done_bytes, total)  # started over after its end: a new transfer
        elif done_bytes == total or _now() - self._last >= self.interval:
            self._emit(done_bytes, total)  # the final report is never held back

    def finish(self) -> None:
        """The transfer is over (done, failed or given up): the final report, unless it
        was sent already or the transfer was never reported."""
        if self._active and not self._finished:
            self._emit(self._done, self._done)

    def counting(self, write: Callable[[bytes], Any]) -> Callable[[bytes], None]:
        """``write`` (a sink taking chunks) that also counts what it is given."""

        def counted(chunk: bytes) -> None:
            write(chunk)
            self.add(len(chunk))

        return counted

    def reading(self, source: IO[bytes]) -> IO[bytes]:
        """``source`` (a binary file) that counts what is read from it, from 0."""
        self.update(0)
        return _CountingReader(source, self)  # type: ignore[return-value]  # duck-typed: read, close, with

    def _emit(self, done: int, total: int | None) -> None:
        self._active = True
        self._finished = total is not None and done >= total
        self._last = _now()
        self._report(description=self.description, done_bytes=done, total_bytes=total)


class _CountingReader:
    """A binary file whose reads a :class:`ProgressMeter` counts (everything else is the
    file's own)."""

    def __init__(self, source: IO[bytes], meter: ProgressMeter) -> None:
        self._source = source
        self._meter = meter

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        if data:
            self._meter.add(len(data))
        return data

    def __enter__(self) -> _CountingReader:
        self._source.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._source.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


__all__ = ["INTERVAL", "MIN_BYTES", "ProgressMeter", "ProgressReport"]
