"""The ``FetchUrl`` action kind: download with retries, verify the sha256 on the bytes
as they arrive, and store nothing unless they match."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time
import urllib.parse
from typing import IO

from dtbuild.plugins.interfaces import ActionContext, ActionFailed, ActionKind

ATTEMPTS = 3
_CHUNK = 1 << 20


class _Mismatch(Exception):
    def __init__(self, actual: str) -> None:
        super().__init__(actual)
        self.actual = actual


def _download(url: str, sink: IO[bytes]) -> str:
    """Copy ``url`` into ``sink``; return the sha256 of what was written."""
    h = hashlib.sha256()
    if url.startswith("file://"):
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                sink.write(chunk)
        return h.hexdigest()
    import urllib3

    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=15, read=60))
    response = http.request("GET", url, preload_content=False, redirect=True)
    try:
        if response.status != 200:
            raise OSError(f"HTTP {response.status} from {url}")
        for chunk in response.stream(_CHUNK):
            h.update(chunk)
            sink.write(chunk)
    finally:
        response.release_conn()
    return h.hexdigest()


class FetchUrl(ActionKind):
    NAME = "FetchUrl"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        expected = ctx.params["sha256"]
        extract = ctx.params["extract"]
        errors: list[str] = []
        for url in ctx.params["urls"]:
            for attempt in range(ATTEMPTS):
                temp = os.path.join(ctx.scratch_dir, f"download-{attempt}")
                try:
                    with open(temp, "wb") as f:
                        actual = _download(url, f)
                    if actual != expected:
                        raise _Mismatch(actual)
                except _Mismatch as e:
                    raise ActionFailed(
                        f"the download of {url} has the wrong sha256: expected {expected}, got {e.actual}; "
                        "nothing was cached. If the new file is the one you want, put its sha256 in the BUILD file"
                    ) from None
                except (OSError, ValueError) as e:
                    errors.append(f"{url}: {e}")
                    if isinstance(e, FileNotFoundError) or " 404 " in f" {e} ":
                        break  # no point retrying a missing file
                    time.sleep(min(4.0, 0.5 * 2**attempt))
                    continue
                self._place(ctx, temp, extract)
                return
        raise ActionFailed("could not download any of the URLs:\n  " + "\n  ".join(errors))

    @staticmethod
    def _place(ctx: ActionContext, temp: str, extract: bool) -> None:
        out = ctx.output_path("out")
        if not extract:
            os.chmod(temp, 0o755 if ctx.params["executable"] else 0o644)
            shutil.move(temp, out)
            return
        os.mkdir(out)
        try:
            with tarfile.open(temp, "r:*") as archive:
                archive.extractall(out, filter="tar")
        except (tarfile.TarError, OSError) as e:
            raise ActionFailed(f"cannot extract the download: {e}",) from None
