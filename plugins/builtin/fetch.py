"""The ``FetchUrl`` action kind: download with retries, verify the sha256 on the bytes
as they arrive, and store nothing unless they match. With ``extract``, the download is
read as a tar archive by :mod:`dtbuild.plugins.builtin.tar_extract` and its entries go
into the store as a tree: nothing of the archive is written to the host as files.

Each URL's tries share one deadline and every download is read under the ``[network]``
limits of :mod:`dtbuild.plugins.builtin.network_limits` (first byte, silence, minimum
rate, at most ``max_download`` bytes). A download reports its bytes as it goes
(``download NAME``, through ``ctx.progress``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.parse
from collections.abc import Callable
from dataclasses import replace
from typing import IO, Any, TypeVar

from dtbuild.plugins.builtin import tar_extract
from dtbuild.plugins.builtin.network_limits import (
    Clock,
    LimitExceeded,
    NetworkSettingError,
    headers_within,
    limits_from,
    pool_manager,
    read_body,
    seconds_text,
    size_text,
)
from dtbuild.plugins.interfaces import ActionContext, ActionFailed, ActionKind, TreeEntry
from dtbuild.plugins.progress import ProgressMeter

ATTEMPTS = 3
_CHUNK = 1 << 20


def _transfer_name(url: str) -> str:
    """What a download is called in its progress reports: ``download NAME``, NAME the
    URL's last path part (or its host)."""
    parts = urllib.parse.urlsplit(url)
    name = urllib.parse.unquote(parts.path.rstrip("/").rpartition("/")[2]) or parts.netloc or url
    return f"download {name}"


def _content_length(response: object) -> int | None:
    """The size an answer announces, or None."""
    length = (getattr(response, "headers", None) or {}).get("Content-Length")
    return int(length) if isinstance(length, str) and length.strip().isdigit() else None


class HttpStatusError(OSError):
    """A server answered a download with a status other than 200 (``status``)."""

    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"HTTP {status} from {url}")
        self.status = status
        self.url = url


def download(url: str, sink: IO[bytes], clock: Clock, meter: ProgressMeter | None = None, *,
             limit: int | None = None, too_large: Callable[[], Exception] | None = None) -> str:
    """Copy ``url`` (http, https or file) into ``sink``; return the sha256 of what was
    written. An HTTP(S) download is bounded by ``clock`` and its limits. ``meter`` is
    told the size (when known) and the bytes as they arrive. ``limit`` (with the error
    ``too_large()`` raised for more) caps the bytes of this one download, of a file URL
    too; without it an HTTP(S) download is capped at ``max_download``. Other plugins that
    read the network (``dtbuild lock``'s indexes) download through this function.

    :raises LimitExceeded: when the server is silent, too slow, out of time or sends
        more than the cap.
    :raises HttpStatusError: for an answer other than 200."""
    h = hashlib.sha256()
    if url.startswith("file://"):
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
        with open(path, "rb") as f:
            if meter is not None:
                meter.total = os.fstat(f.fileno()).st_size
                meter.start()
            read = 0
            while chunk := f.read(_CHUNK if limit is None else min(_CHUNK, limit + 1 - read)):
                read += len(chunk)
                if limit is not None and read > limit:
                    raise too_large() if too_large is not None else LimitExceeded(
                        f"{url} is larger than {size_text(limit)}; refusing it", hint="")
                h.update(chunk)
                sink.write(chunk)
                if meter is not None:
                    meter.add(len(chunk))
        return h.hexdigest()
    import urllib3

    limits = clock.limits
    server = f"the server {urllib.parse.urlsplit(url).netloc}"
    timeout = clock.request_timeout()
    http = pool_manager(retries=False, timeout=timeout)
    with headers_within(timeout.read_timeout) as guard:
        try:
            response = http.request("GET", url, preload_content=False, redirect=True)
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError) as e:
            if isinstance(e, urllib3.exceptions.ProtocolError) and not guard.expired:
                raise  # a broken connection, not a limit
            if clock.expired():
                raise clock.deadline_error(server, "downloading") from None
            answer = "a complete answer" if guard.expired else "an answer"
            raise LimitExceeded(f"{server} did not send {answer} within {seconds_text(timeout.read_timeout)}",
                                hint="check the network, or raise [network] timeout in dtbuild.toml",
                                retryable=True) from None

    def write(chunk: bytes) -> None:
        h.update(chunk)
        sink.write(chunk)
        if meter is not None:
            meter.add(len(chunk))

    try:
        if response.status != 200:
            raise HttpStatusError(response.status, url)
        if meter is not None:
            meter.total = _content_length(response)
            meter.start()
        cap = limits.max_download if limit is None else limit
        overflow: Callable[[], Any] = too_large or (lambda: LimitExceeded(  # read_body only raises it
            f"{url} is larger than {size_text(cap)}; refusing it",
            hint="raise [network] max_download in dtbuild.toml if the file is right"))
        read_body(response, write, limit=cap, clock=clock, server=server, what="downloading", too_large=overflow)
    finally:
        response.close()
        response.release_conn()
    return h.hexdigest()


def _connection_errors() -> tuple[type[Exception], ...]:
    """urllib3's own errors (refused, unknown host, reset, TLS), which are no OSError."""
    try:
        import urllib3
    except ImportError:
        return ()
    return (urllib3.exceptions.HTTPError,)


def _unknown_host(error: Exception) -> bool:
    """The host name does not resolve: trying it again at once cannot help."""
    try:
        import urllib3
    except ImportError:
        return False
    return isinstance(error, urllib3.exceptions.NameResolutionError)


def _failure_text(error: Exception) -> str:
    """One line for a failed download, without urllib3's object reprs."""
    if isinstance(error, LimitExceeded) or not isinstance(error, _connection_errors()):
        return str(error)
    reason = getattr(error, "reason", None) or error
    text = str(reason)
    if ">: " in text:  # "<urllib3.connection.HTTPSConnection object at 0x..>: Failed to resolve ..."
        text = text.split(">: ", 1)[1]
    return text or type(reason).__name__


#: What a sha256 mismatch suggests, unless the rule that declared the download says
#: otherwise (``mismatch_hint``: a locked file's fix is a new lock, not a new digest).
_MISMATCH_HINT = "If the new file is the one you want, put its sha256 in the BUILD file"


class DownloadFailed(Exception):
    """Every try of one URL failed: each different failure once (``failures``), after
    ``tries`` tries; ``missing`` when the last said the URL names nothing (a missing
    file, HTTP 404 or 410), which no retry mends."""

    def __init__(self, url: str, failures: list[str], tries: int, last: Exception) -> None:
        super().__init__(f"{url}: {'; then '.join(failures)}{f' ({tries} attempts)' if tries > 1 else ''}")
        self.url = url
        self.failures = failures
        self.tries = tries
        #: The HTTP status of the last try's answer, when it was one.
        self.status: int | None = last.status if isinstance(last, HttpStatusError) else None
        self.missing = isinstance(last, FileNotFoundError) or self.status in (404, 410)


T = TypeVar("T")


def download_retrying(url: str, clock: Clock, attempt: Callable[[int], T]) -> T:
    """``attempt(n)`` (one try at downloading ``url``, the n-th) until one succeeds: a
    failure that may pass (refused, reset, a slow server) is tried again after a pause,
    up to :data:`ATTEMPTS` tries within ``clock``'s deadline; a missing file, an unknown
    host or a limit no retry changes ends the tries. Errors of other kinds (a digest
    mismatch, a size cap of the caller's) pass through at once.

    :raises DownloadFailed: when no try succeeded."""
    failures: list[str] = []
    for n in range(ATTEMPTS):
        try:
            return attempt(n)
        except (OSError, ValueError, *_connection_errors()) as e:
            text = _failure_text(e)
            if text not in failures:
                failures.append(text)
            failed = DownloadFailed(url, failures, n + 1, e)
            if (failed.missing or _unknown_host(e) or (isinstance(e, LimitExceeded) and not e.retryable)
                    or n + 1 == ATTEMPTS or not clock.sleep(min(4.0, 0.5 * 2**n))):
                raise failed from None
    raise AssertionError("unreachable")


class FetchUrl(ActionKind):
    NAME = "FetchUrl"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        extract = ctx.params["extract"]
        try:
            limits = limits_from(ctx.settings)
        except NetworkSettingError as e:
            raise ActionFailed(e.message + (f" (hint: {e.hint})" if e.hint else "")) from None
        errors: list[str] = []
        for url in ctx.params["urls"]:
            # One deadline for all the tries of this URL; whatever went wrong with it
            # (refused, unknown host, HTTP error, a limit), the next URL is tried, and the
            # error gives each URL one line.
            clock = limits.clock()
            try:
                temp = download_retrying(url, clock, lambda n, url=url, clock=clock: self._try(ctx, url, clock, n))
            except DownloadFailed as e:
                errors.append(str(e))
                continue
            self._place(ctx, temp, extract, url)
            return
        raise ActionFailed("could not download any of the URLs:\n  " + "\n  ".join(errors))

    @staticmethod
    def _try(ctx: ActionContext, url: str, clock: Clock, attempt: int) -> str:
        """Download ``url`` once into the scratch directory; the file's path."""
        expected = ctx.params["sha256"]
        temp = os.path.join(ctx.scratch_dir, f"download-{attempt}")
        # ctx.progress is looked up only when there is something to report: a context made
        # before it existed (a test's) still downloads small files.
        meter = ProgressMeter(lambda **moved: ctx.progress(**moved), _transfer_name(url), None)
        with open(temp, "wb") as f, meter:
            actual = download(url, f, clock, meter)
        if actual != expected:
            raise ActionFailed(
                f"the download of {url} has the wrong sha256: expected {expected}, got {actual}; "
                "nothing was cached. " + ctx.params.get("mismatch_hint", _MISMATCH_HINT))
        return temp

    @staticmethod
    def _place(ctx: ActionContext, temp: str, extract: bool, url: str) -> None:
        out = ctx.output_path("out")
        if not extract:
            os.chmod(temp, 0o755 if ctx.params["executable"] else 0o644)
            shutil.move(temp, out)
            return
        name = f"the download of {url}"
        try:
            with open(temp, "rb") as raw:
                entries = _extracted_tree(ctx, raw)
        except tar_extract.UnsafeArchive as e:
            raise ActionFailed(f"cannot extract the download: {e.message(name)}") from None
        ctx.output_tree("out", entries)


def _extracted_tree(ctx: ActionContext, raw: IO[bytes]) -> list[TreeEntry]:
    """The tree of a downloaded archive, as ``tar -x`` into an empty directory then
    ingesting it gives: later members replace earlier ones, hard links are copies of
    the content they share, and modes are normalised as every package's are (0755 for
    directories and owner-executable files, 0644 for other files), so setuid bits and
    owners of the archive never reach the tree."""
    tree: dict[str, TreeEntry] = {}
    for entry, content in tar_extract.archive_entries(raw):
        path = entry.path
        if entry.kind == "dir":
            tree[path] = TreeEntry(path, "dir", 0o755)
        elif entry.kind == "symlink":
            tree[path] = TreeEntry(path, "symlink", 0o777, target=entry.target)
        elif entry.kind == "hardlink":
            tree[path] = replace(tree[entry.target], path=path)
        elif entry.kind == "file":
            assert content is not None
            digest, size = ctx.put_stream(content, entry.size)
            tree[path] = TreeEntry(path, "file", 0o755 if entry.mode & 0o100 else 0o644, digest, size)
        else:
            raise tar_extract.UnsafeArchive(
                f"is a {tar_extract.kind_text(entry.kind)}; an extracted download holds "
                "only files, directories and symlinks", member=entry.member,
                hint="repack the archive without it (GNU tar: --exclude PATTERN)")
    return list(tree.values())
