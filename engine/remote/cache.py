"""The remote cache under the local store: look results up on a local miss, upload the
results of actions run here.

:class:`RemoteCache` is what the action runner talks to. :meth:`RemoteCache.lookup`
asks the remote for an action's result and, on a hit, fetches every blob it names that
the local store lacks into the store (the bytes hashed as they arrive; a blob that does
not match its digest is discarded, with a warning, and the lookup is a miss, so the
action runs here). Trees arrive as REAPI ``Tree`` messages and become the store's own
Directory nodes (``reapi.import_tree``, which checks every name). The result is then the
action's like a local one, and is written to the local action cache.

:meth:`RemoteCache.upload` hands a result made here to a small pool of upload threads:
the action does not wait. One upload asks which of the result's blobs the remote lacks
(FindMissingBlobs or HEADs), sends those (small ones batched, large ones streamed from
the store, each read verified), then the action result, last, so that a reader never
sees a result whose blobs are not there yet. A blob sent (or found present) once in a
build is not asked about again. :meth:`RemoteCache.finish` waits for the uploads at the
end of the build.

Blobs of more than :data:`~dtbuild.plugins.progress.MIN_BYTES` report their bytes as they
move, to the ``progress`` the runner gives :meth:`~RemoteCache.lookup` and
:meth:`~RemoteCache.upload` (the ``dtbuild_transfer_progress`` hook, under the action's
target), throttled by :class:`~dtbuild.plugins.progress.ProgressMeter`.

Local first: the first :class:`~dtbuild.engine.remote.RemoteError` of a build (refused,
timed out, a 5xx, a server gone mid-build) is one warning, and the remote is not used
for the rest of the build; the build goes on locally and its results are right. Refused
credentials (:class:`~dtbuild.engine.remote.RemoteAuthError`) are not degraded: the
lookup raises them, and the build stops with a message that names where the credentials
came from.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TypeVar

from dtbuild.engine.remote import Digest, MissingRemoteBlob, RemoteAuthError, RemoteError, Transport
from dtbuild.engine.remote.reapi import (
    BadRemoteEntry,
    RemoteOutput,
    action_digest,
    encode_action_result,
    import_tree,
    parse_action_result,
    result_blobs,
)
from dtbuild.plugins.progress import MIN_BYTES, ProgressMeter, ProgressReport

if TYPE_CHECKING:
    from dtbuild.engine.store import ActionResult, OutputValue, Store

_T = TypeVar("_T")

#: Blobs up to this size are fetched and sent in batches (gRPC Batch*Blobs).
SMALL_BLOB = 256 * 1024
#: How many small blobs, and how many bytes of them, one batch holds at most (memory
#: stays bounded: a batch is in memory whole).
BATCH_COUNT = 500
BATCH_BYTES = 4 * 1024 * 1024
#: Upload threads (uploads run beside the build, which does not wait for them).
UPLOAD_THREADS = 4


def _give(data: bytes, sink: Callable[[bytes], object]) -> None:
    sink(data)


def _meter(progress: ProgressReport | None, direction: str, digest: Digest) -> ProgressMeter | None:
    """The meter of one blob transfer, or None when nobody listens or the blob is small."""
    if progress is None or digest.size < MIN_BYTES:
        return None
    return ProgressMeter(progress, f"remote cache {direction} sha256:{digest.hash[:12]}", digest.size)


def _batches(digests: list[Digest]) -> list[list[Digest]]:
    """``digests`` in batches of at most BATCH_COUNT blobs and about BATCH_BYTES bytes."""
    batches: list[list[Digest]] = []
    size = BATCH_BYTES
    for digest in digests:
        if size + digest.size > BATCH_BYTES or len(batches[-1]) >= BATCH_COUNT:
            batches.append([])
            size = 0
        batches[-1].append(digest)
        size += digest.size
    return batches


def _open_counted(store: Store, digest: str, meter: ProgressMeter) -> IO[bytes]:
    """Blob ``digest`` of the store, opened for sending, its reads counted by ``meter``
    (from 0 again for a retry, which opens it again)."""
    return meter.reading(store.open_blob(digest))


class CorruptRemoteBlob(RemoteError):
    """A blob from the remote whose bytes do not match its digest."""


@dataclass
class RemoteStats:
    hits: int = 0
    misses: int = 0
    downloaded_bytes: int = 0
    uploaded_bytes: int = 0
    uploaded_results: int = 0


class RemoteCache:
    def __init__(self, transport: Transport, store: Store, *, upload: bool,
                 warn: Callable[[str], None]) -> None:
        self.transport = transport
        self.store = store
        self.upload_enabled = upload
        self._warn = warn
        self.stats = RemoteStats()
        self._lock = threading.Lock()
        self._failed: str | None = None
        self._present: set[str] = set()  # blobs the remote holds (sent or found this build)
        #: Blobs an upload is sending now -> set when that upload is done with them.
        self._sending: dict[str, threading.Event] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self.warnings: list[str] = []

    @property
    def url(self) -> str:
        return self.transport.endpoint.url

    @property
    def usable(self) -> bool:
        return self._failed is None

    def warn(self, message: str) -> None:
        with self._lock:
            self.warnings.append(message)
        self._warn(message)

    def _give_up(self, e: RemoteError) -> None:
        with self._lock:
            if self._failed is not None:
                return
            self._failed = str(e)
        self.warn(f"the remote cache {self.url} cannot be used ({self.transport.endpoint.redact(str(e))}); "
                  "the build goes on without it")

    # ------------------------------------------------------------------ lookups

    def lookup(self, key: str, slots: set[str], meta_ok: Callable[[dict[str, Any]], bool] | None = None, *,
               progress: ProgressReport | None = None) -> ActionResult | None:
        """The result of the action with key ``key`` (output slots ``slots``) from the
        remote, its blobs fetched into the local store; None for a miss or when the
        remote cannot be used. ``meta_ok(meta)`` False (a result made with other plugin
        versions) is a miss. The downloads of large blobs report to ``progress``.

        :raises RemoteAuthError: when the remote refuses the credentials.
        """
        from dtbuild.engine.store import ActionResult

        found = self._guarded(lambda: self._read_result(key, slots))
        if found is None:
            return None
        outputs, meta, files = found
        if meta_ok is not None and not meta_ok(meta):
            self._count(miss=True)
            return None
        if self._guarded(functools.partial(self._fetch_into_store, files, progress)) is None:
            return None
        self._count(miss=False)
        with self._lock:
            self._present.update(d.hash for d in files)
        return ActionResult(outputs, meta)

    def peek(self, key: str, slots: set[str]) -> dict[str, OutputValue] | None:
        """The output values of the remote's result for key ``key`` without fetching its
        file blobs (``explain``: what the build would take from the remote), or None."""
        found = self._guarded(lambda: self._read_result(key, slots))
        return found[0] if found is not None else None

    def _read_result(self, key: str, slots: set[str]
                     ) -> tuple[dict[str, OutputValue], dict[str, Any], list[Digest]] | None:
        """(output values, meta, the file blobs they name) of the remote's result, trees
        imported into the store; None for a miss."""
        from dtbuild.engine.remote.reapi import tree_of_root
        from dtbuild.engine.store import OutputValue

        data = self.transport.get_action_result(action_digest(key))
        if data is None:
            self._count(miss=True)
            return None
        remote_outputs, meta = parse_action_result(data, slots)
        outputs: dict[str, OutputValue] = {}
        files: list[Digest] = []
        trees: dict[str, RemoteOutput] = {}
        for slot, out in remote_outputs.items():
            if out.is_tree:
                trees[slot] = out
            else:
                files.append(out.digest)
                outputs[slot] = OutputValue(out.digest.hash, out.digest.size, False, out.executable)
        if trees:
            tree_data = self._fetch_bytes([out.digest for out in trees.values() if not out.root_directory])
            for slot, out in trees.items():
                if out.root_directory:
                    # Named by its root Directory (REAPI 2.3): only GetTree reads the
                    # whole tree, and Bazel's HTTP cache protocol has none.
                    if type(self.transport).get_tree is Transport.get_tree:
                        raise BadRemoteEntry(f"output {slot!r} is named by its root directory, not a Tree, "
                                             "which only a gRPC remote cache can read")
                    directories = self.transport.get_tree(out.digest)
                    self._add_downloaded(sum(len(d) for d in directories))
                    tree_data[out.digest] = tree_of_root(out.digest, directories)
                root, total, tree_files = import_tree(self.store, tree_data[out.digest])
                files += tree_files
                outputs[slot] = OutputValue(root, total, True)
        return outputs, meta, files

    def _guarded(self, call: Callable[[], _T | None]) -> _T | None:
        """``call()``, with every remote problem but refused credentials turned into a
        miss (a warning for a corrupt blob or entry; the remote given up for the rest of
        the build when it cannot be reached)."""
        if self._failed is not None:
            return None
        try:
            return call()
        except RemoteAuthError:
            raise
        except CorruptRemoteBlob as e:
            self.warn(str(e))
        except MissingRemoteBlob:
            pass  # a result whose blobs the remote has evicted
        except BadRemoteEntry as e:
            self.warn(f"the remote cache {self.url} holds an unusable result for an action ({e}); it runs here")
        except RemoteError as e:
            self._give_up(e)
            return None
        self._count(miss=True)
        return None

    def _count(self, *, miss: bool) -> None:
        with self._lock:
            if miss:
                self.stats.misses += 1
            else:
                self.stats.hits += 1

    def _fetch_bytes(self, digests: list[Digest]) -> dict[Digest, bytes]:
        """Small blobs (Tree messages) read whole, each checked."""
        import hashlib

        found = self.transport.read_small_blobs(digests)
        for digest in digests:
            data = found.get(digest)
            if data is None:
                raise MissingRemoteBlob(f"blob {digest.hash} is missing")
            if len(data) != digest.size or hashlib.sha256(data).hexdigest() != digest.hash:
                raise CorruptRemoteBlob(f"the remote cache {self.url} sent blob {digest.hash} with bytes that do "
                                        "not match its digest; it was discarded and the action runs here")
            self._add_downloaded(len(data))
        return found

    def _fetch_into_store(self, digests: list[Digest], progress: ProgressReport | None = None) -> bool:
        """Fetch the blobs of ``digests`` the store lacks (True when done), the large ones
        reporting to ``progress``."""
        missing = list({d.hash: d for d in digests if not self.store.has_blob(d.hash, d.size)}.values())
        for batch in _batches([d for d in missing if d.size <= SMALL_BLOB]):
            for digest, data in self._fetch_bytes(batch).items():
                self._install(digest, functools.partial(_give, data))
        for digest in missing:
            if digest.size > SMALL_BLOB:
                self._install(digest, functools.partial(self.transport.read_blob, digest),
                              _meter(progress, "download", digest))
        return True

    def _install(self, digest: Digest, produce: Callable[[Callable[[bytes], object]], None],
                 meter: ProgressMeter | None = None) -> None:
        writer = self.store.writer(expected_size=digest.size)
        try:
            if meter is None:
                produce(writer.write)
            else:
                with meter:
                    produce(meter.counting(writer.write))
            if writer.size != digest.size or writer.hexdigest() != digest.hash:
                raise CorruptRemoteBlob(f"the remote cache {self.url} sent blob {digest.hash} with bytes that "
                                        "do not match its digest; it was discarded and the action runs here")
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        if digest.size > SMALL_BLOB:
            self._add_downloaded(digest.size)

    def _add_downloaded(self, n: int) -> None:
        with self._lock:
            self.stats.downloaded_bytes += n

    # ------------------------------------------------------------------ uploads

    def upload(self, key: str, result: ActionResult, *, progress: ProgressReport | None = None) -> None:
        """Send ``result`` (of the action with key ``key``) in the background, the
        uploads of large blobs reporting to ``progress``."""
        if not self.upload_enabled or self._failed is not None:
            return
        if not getattr(self.transport, "update_enabled", True):
            return  # a read-only remote (its capabilities say so): nothing to warn about
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="dtbuild-upload")
            self._pending.append(self._pool.submit(self._upload, key, result, progress))

    def _upload(self, key: str, result: ActionResult, progress: ProgressReport | None = None) -> None:
        from dtbuild.engine.store import StoreError

        if self._failed is not None:
            return
        try:
            outputs: dict[str, RemoteOutput] = {}
            blobs: dict[str, Digest] = {}
            trees: dict[Digest, bytes] = {}
            for slot, out, tree_blobs, files in result_blobs(self.store, result):
                outputs[slot] = out
                trees.update(tree_blobs)
                for d in files:
                    blobs.setdefault(d.hash, d)
            # A blob another upload of this build is sending is not sent again (two
            # results often share a layer): this one waits for it before its result.
            wanted: list[Digest] = []
            others: list[threading.Event] = []
            mine = threading.Event()
            with self._lock:
                for d in [*blobs.values(), *trees]:
                    if d.hash in self._present:
                        continue
                    sending = self._sending.get(d.hash)
                    if sending is None:
                        self._sending[d.hash] = mine
                        wanted.append(d)
                    elif sending not in others:
                        others.append(sending)
            try:
                self._send_blobs(wanted, trees, progress)
            finally:
                with self._lock:
                    for d in wanted:
                        self._sending.pop(d.hash, None)
                mine.set()
            for event in others:
                event.wait()
            with self._lock:
                if self._failed is not None or not all(d.hash in self._present for d in [*blobs.values(), *trees]):
                    return  # a blob another upload was sending did not get there: no result without it
            self.transport.put_action_result(action_digest(key), encode_action_result(outputs, result.meta))
            with self._lock:
                self.stats.uploaded_results += 1
        except RemoteError as e:  # refused credentials too: a lookup has said so, or will
            self._give_up(e)
        except StoreError:
            pass  # a blob lost or a source changed meanwhile: the next build uploads it
        except Exception as e:  # never a traceback from a background upload
            self._give_up(RemoteError(f"an upload failed: {type(e).__name__}: {e}"))

    def _send_blobs(self, wanted: list[Digest], trees: dict[Digest, bytes],
                    progress: ProgressReport | None = None) -> None:
        """Send those of ``wanted`` the remote lacks (``trees``: the small blobs at hand,
        the others are read from the store); all of ``wanted`` is then present. Large
        blobs report to ``progress`` as they are read for sending."""
        missing = self.transport.find_missing(wanted) if wanted else set()
        small = {d: trees[d] for d in missing if d in trees}
        for d in missing:
            if d in trees:
                continue
            if d.size <= SMALL_BLOB:
                with self.store.open_blob(d.hash) as f:
                    small[d] = f.read()
            else:
                meter = _meter(progress, "upload", d)
                if meter is None:
                    self.transport.write_blob(d, functools.partial(self.store.open_blob, d.hash))
                else:
                    with meter:
                        self.transport.write_blob(d, functools.partial(_open_counted, self.store, d.hash, meter))
                self._add_uploaded(d.size)
            if len(small) >= BATCH_COUNT or sum(d.size for d in small) >= BATCH_BYTES:
                self._send_small(small)
        self._send_small(small)
        with self._lock:
            self._present.update(d.hash for d in wanted)

    def _send_small(self, small: dict[Digest, bytes]) -> None:
        if small:
            self.transport.write_small_blobs(small)
            self._add_uploaded(sum(len(v) for v in small.values()))
            small.clear()

    def _add_uploaded(self, n: int) -> None:
        with self._lock:
            self.stats.uploaded_bytes += n

    def finish(self) -> None:
        """Wait for the uploads, then release the connections."""
        with self._lock:
            pending, self._pending = self._pending, []
            pool, self._pool = self._pool, None
        for future in pending:
            future.result()
        if pool is not None:
            pool.shutdown()
        self.transport.close()
