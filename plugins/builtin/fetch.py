"""The ``FetchUrl`` action kind: download with retries, verify the sha256 on the bytes
as they arrive, and store nothing unless they match. With ``extract``, the download is
read as a tar archive by :mod:`dtbuild.plugins.builtin.tar_extract` and its entries go
into the store as a tree: nothing of the archive is written to the host as files."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import urllib.parse
from dataclasses import replace
from typing import IO

from dtbuild.plugins.builtin import tar_extract
from dtbuild.plugins.interfaces import ActionContext, ActionFailed, ActionKind, TreeEntry

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
                self._place(ctx, temp, extract, url)
                return
        raise ActionFailed("could not download any of the URLs:\n  " + "\n  ".join(errors))

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
    for number, (entry, content) in enumerate(tar_extract.archive_entries(raw)):
        path = entry.path
        if entry.kind == "dir":
            tree[path] = TreeEntry(path, "dir", 0o755)
        elif entry.kind == "symlink":
            tree[path] = TreeEntry(path, "symlink", 0o777, target=entry.target)
        elif entry.kind == "hardlink":
            tree[path] = replace(tree[entry.target], path=path)
        elif entry.kind == "file":
            assert content is not None
            spill = os.path.join(ctx.scratch_dir, f"member-{number}")
            fd = os.open(spill, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    shutil.copyfileobj(content, f, _CHUNK)
                digest, size = ctx.put_file(spill)
            finally:
                os.unlink(spill)
            tree[path] = TreeEntry(path, "file", 0o755 if entry.mode & 0o100 else 0o644, digest, size)
        else:
            raise tar_extract.UnsafeArchive(
                f"is a {tar_extract.kind_text(entry.kind)}; an extracted download holds "
                "only files, directories and symlinks", member=entry.member,
                hint="repack the archive without it (GNU tar: --exclude PATTERN)")
    return list(tree.values())
