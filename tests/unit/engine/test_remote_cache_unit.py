"""The logic of :class:`RemoteCache` (engine/remote/cache.py) over an in-memory
transport: a hit fills the local store with checked blobs, a corrupt blob or entry is a
miss with one warning, an unreachable remote is given up after one warning, refused
credentials stop the build, and uploads send each missing blob once and the action
result last. The HTTP and gRPC transports against real servers are tested in
tests/e2e/remote/."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import pytest
from dtbuild.engine.execution import build_tree
from dtbuild.engine.remote import (
    Digest,
    Endpoint,
    MissingRemoteBlob,
    RemoteAuthError,
    RemoteError,
    Transport,
)
from dtbuild.engine.remote.cache import RemoteCache
from dtbuild.engine.remote.reapi import (
    RemoteOutput,
    action_digest,
    digest_of,
    encode_action_result,
    export_tree,
    parse_action_result,
)
from dtbuild.engine.store import ActionResult, OutputValue, Store
from dtbuild.plugins.interfaces import TreeEntry

SECRET = "s3cret-token-value"


class MemoryTransport(Transport):
    """A remote cache in a dict, recording every call; ``fail`` makes every call raise."""

    def __init__(self) -> None:
        super().__init__(Endpoint("grpc://cache.test:1", "--remote-cache", headers={"x-key": SECRET}))
        self.ac: dict[Digest, bytes] = {}
        self.cas: dict[Digest, bytes] = {}
        self.calls: list[tuple[str, Any]] = []
        self.fail: RemoteError | None = None
        self._lock = threading.Lock()

    def _call(self, name: str, arg: Any) -> None:
        with self._lock:
            self.calls.append((name, arg))
        if self.fail is not None:
            raise self.fail

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def get_action_result(self, action: Digest) -> bytes | None:
        self._call("get_action_result", action)
        return self.ac.get(action)

    def put_action_result(self, action: Digest, result: bytes) -> None:
        self._call("put_action_result", action)
        self.ac[action] = result

    def find_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        digests = list(digests)
        self._call("find_missing", digests)
        return {d for d in digests if d not in self.cas}

    def read_blob(self, digest: Digest, sink: Callable[[bytes], object]) -> None:
        self._call("read_blob", digest)
        if digest not in self.cas:
            raise MissingRemoteBlob(f"no blob {digest.hash}")
        data = self.cas[digest]
        for start in range(0, max(len(data), 1), 1 << 16):
            sink(data[start:start + (1 << 16)])

    def write_blob(self, digest: Digest, open_blob: Callable[[], IO[bytes]]) -> None:
        self._call("write_blob", digest)
        with open_blob() as f:
            self.cas[digest] = f.read()

    def read_small_blobs(self, digests: list[Digest]) -> dict[Digest, bytes]:
        self._call("read_small_blobs", list(digests))
        return {d: self.cas[d] for d in digests if d in self.cas}

    def write_small_blobs(self, blobs: Any) -> None:
        self._call("write_small_blobs", list(blobs))
        self.cas.update(blobs)

    def put(self, data: bytes) -> Digest:
        digest = digest_of(data)
        self.cas[digest] = data
        return digest


@pytest.fixture
def transport() -> MemoryTransport:
    return MemoryTransport()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "local"))


@pytest.fixture
def warnings() -> list[str]:
    return []


@pytest.fixture
def cache(transport: MemoryTransport, store: Store, warnings: list[str]) -> RemoteCache:
    return RemoteCache(transport, store, upload=True, warn=warnings.append)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


META = {"mnemonic": "LayerWrite", "uses": {"compressors": {"gz": "1"}}}
BIG = bytes(range(256)) * 2048  # over SMALL_BLOB: streamed, not batched


def _remote_result(transport: MemoryTransport, tmp_path: Path, key: str = "k1") -> dict[str, Any]:
    """A result made elsewhere (a file, an executable file, a tree) held by the remote."""
    other = Store(str(tmp_path / "elsewhere"))
    small = other.put_bytes(b"small file\n")
    big = other.put_bytes(BIG)
    root, total = build_tree(other, [TreeEntry("bin/tool", "file", 0o755, big, len(BIG)),
                                     TreeEntry("etc/conf", "file", 0o600, small, 11),
                                     TreeEntry("lnk", "symlink", target="bin/tool")])
    tree_data, _, _, files = export_tree(other, root)
    for d in files:
        transport.put(other.read_blob(d.hash))
    tree_digest = transport.put(tree_data)
    file_digest = transport.put(b"a file output\n")
    exe_digest = transport.put(BIG[:1000])
    outputs = {"out.txt": RemoteOutput(file_digest, False), "run": RemoteOutput(exe_digest, False, True),
               "rootfs": RemoteOutput(tree_digest, True)}
    transport.ac[action_digest(key)] = encode_action_result(outputs, META)
    return {"root": root, "total": total, "file": file_digest, "exe": exe_digest, "big": big, "small": small,
            "tree": tree_digest, "slots": set(outputs)}


# --------------------------------------------------------------------------- lookups


def test_a_hit_fetches_every_blob_into_the_store(cache: RemoteCache, transport: MemoryTransport, store: Store,
                                                  tmp_path: Path, warnings: list[str]) -> None:
    made = _remote_result(transport, tmp_path)
    result = cache.lookup("k1", made["slots"])
    assert result is not None
    assert result.outputs == {
        "out.txt": OutputValue(made["file"].hash, made["file"].size, False, False),
        "run": OutputValue(made["exe"].hash, made["exe"].size, False, True),
        "rootfs": OutputValue(made["root"], made["total"], True),
    }
    assert result.meta == META
    assert store.read_blob(made["file"].hash) == b"a file output\n"
    assert store.read_blob(made["big"]) == BIG
    assert store.tree_blobs_present(made["root"])
    assert {(e.path, e.mode) for e in store.walk_tree(made["root"])} >= {("bin/tool", 0o755), ("etc/conf", 0o600)}
    assert warnings == [] and cache.stats.hits == 1 and cache.stats.misses == 0
    assert cache.stats.downloaded_bytes > len(BIG)


def test_a_second_hit_fetches_nothing_the_store_has(cache: RemoteCache, transport: MemoryTransport,
                                                    tmp_path: Path) -> None:
    made = _remote_result(transport, tmp_path)
    assert cache.lookup("k1", made["slots"]) is not None
    transport.calls.clear()
    assert cache.lookup("k1", made["slots"]) is not None
    assert "read_blob" not in transport.names()
    fetched = [d for name, arg in transport.calls if name == "read_small_blobs" for d in arg]
    assert fetched == [made["tree"]]  # the Tree message only, to learn the root


def test_an_absent_entry_is_a_miss(cache: RemoteCache, warnings: list[str]) -> None:
    assert cache.lookup("nothing", {"out"}) is None
    assert cache.peek("nothing", {"out"}) is None
    assert warnings == [] and cache.stats.misses == 2 and cache.usable


@pytest.mark.parametrize("which", ["file", "exe", "big", "small", "tree"])
def test_a_corrupt_blob_is_discarded_and_the_lookup_is_a_miss(cache: RemoteCache, transport: MemoryTransport,
                                                              store: Store, tmp_path: Path, warnings: list[str],
                                                              which: str) -> None:
    made = _remote_result(transport, tmp_path)
    digest = made[which] if isinstance(made[which], Digest) else \
        next(d for d in transport.cas if d.hash == made[which])
    good = transport.cas[digest]
    transport.cas[digest] = bytes([good[0] ^ 1]) + good[1:]
    assert cache.lookup("k1", made["slots"]) is None
    assert not store.has_blob(digest.hash)
    assert len(warnings) == 1 and digest.hash in warnings[0] and "do not match" in warnings[0]
    assert cache.usable  # a bad blob is no reason to give the remote up
    assert not any(Path(store.tmp_dir).iterdir())  # nothing half-written left behind


def test_a_blob_of_the_wrong_length_is_discarded(cache: RemoteCache, transport: MemoryTransport, store: Store,
                                                 tmp_path: Path, warnings: list[str]) -> None:
    made = _remote_result(transport, tmp_path)
    transport.cas[made["file"]] += b"trailing"
    assert cache.lookup("k1", made["slots"]) is None
    assert not store.has_blob(made["file"].hash) and len(warnings) == 1


def test_an_evicted_blob_is_a_quiet_miss(cache: RemoteCache, transport: MemoryTransport, tmp_path: Path,
                                         warnings: list[str]) -> None:
    made = _remote_result(transport, tmp_path)
    del transport.cas[made["exe"]]
    assert cache.lookup("k1", made["slots"]) is None
    assert warnings == [] and cache.usable


def test_an_unusable_entry_is_a_miss_with_one_warning(cache: RemoteCache, transport: MemoryTransport,
                                                      warnings: list[str]) -> None:
    transport.ac[action_digest("k1")] = b"\xff\xfe garbage"
    assert cache.lookup("k1", {"out"}) is None
    assert len(warnings) == 1 and "unusable result" in warnings[0]
    assert cache.usable and cache.stats.misses == 1


def test_an_entry_with_other_slots_is_a_miss(cache: RemoteCache, transport: MemoryTransport, tmp_path: Path,
                                             warnings: list[str]) -> None:
    made = _remote_result(transport, tmp_path)
    assert cache.lookup("k1", made["slots"] | {"more"}) is None
    assert len(warnings) == 1


def test_metadata_json_cannot_hold_is_a_miss_not_a_crash(cache: RemoteCache, transport: MemoryTransport,
                                                         tmp_path: Path, warnings: list[str]) -> None:
    made = _remote_result(transport, tmp_path)
    outputs, _ = parse_action_result(transport.ac[action_digest("k1")], made["slots"])
    transport.ac[action_digest("k1")] = encode_action_result(outputs, {"seconds": float("nan")})
    assert cache.lookup("k1", made["slots"]) is None
    assert len(warnings) == 1


def test_meta_ok_false_is_a_miss_that_fetches_no_file_blobs(cache: RemoteCache, transport: MemoryTransport,
                                                            store: Store, tmp_path: Path,
                                                            warnings: list[str]) -> None:
    made = _remote_result(transport, tmp_path)
    seen: list[dict[str, Any]] = []

    def refuse(meta: dict[str, Any]) -> bool:
        seen.append(meta)
        return False

    assert cache.lookup("k1", made["slots"], meta_ok=refuse) is None
    assert seen == [META]
    assert not store.has_blob(made["file"].hash) and not store.has_blob(made["big"])
    assert warnings == [] and cache.stats.misses == 1 and cache.stats.hits == 0
    assert cache.lookup("k1", made["slots"], meta_ok=lambda meta: meta == META) is not None


def test_peek_gives_the_values_without_fetching_file_blobs(cache: RemoteCache, transport: MemoryTransport,
                                                           store: Store, tmp_path: Path) -> None:
    made = _remote_result(transport, tmp_path)
    values = cache.peek("k1", made["slots"])
    assert values is not None and values["rootfs"] == OutputValue(made["root"], made["total"], True)
    assert not store.has_blob(made["file"].hash) and not store.has_blob(made["big"])
    assert "read_blob" not in transport.names()


def test_an_unreachable_remote_is_given_up_after_one_warning(cache: RemoteCache, transport: MemoryTransport,
                                                             warnings: list[str], store: Store,
                                                             tmp_path: Path) -> None:
    made = _remote_result(transport, tmp_path)
    transport.fail = RemoteError(f"connection refused (sent header {SECRET})")
    assert cache.lookup("k1", made["slots"]) is None
    calls = len(transport.calls)
    transport.fail = None  # even once it is back, this build does not use it
    for key in ("k1", "k2", "k3"):
        assert cache.lookup(key, made["slots"]) is None
        assert cache.peek(key, made["slots"]) is None
    cache.upload("k9", ActionResult({"out": OutputValue(store.put_bytes(b"x"), 1, False)}, {}))
    cache.finish()
    assert len(transport.calls) == calls
    assert len(warnings) == 1 and "cannot be used" in warnings[0] and "grpc://cache.test:1" in warnings[0]
    assert SECRET not in warnings[0] and "***" in warnings[0]
    assert not cache.usable


def test_a_remote_that_fails_while_fetching_is_given_up(cache: RemoteCache, transport: MemoryTransport,
                                                        tmp_path: Path, warnings: list[str]) -> None:
    made = _remote_result(transport, tmp_path)
    real = transport.read_blob

    def broken(digest: Digest, sink: Callable[[bytes], object]) -> None:
        sink(b"partial")
        raise RemoteError("the server went away")

    transport.read_blob = broken  # type: ignore[method-assign]
    assert cache.lookup("k1", made["slots"]) is None
    transport.read_blob = real  # type: ignore[method-assign]
    assert cache.lookup("k1", made["slots"]) is None
    assert len(warnings) == 1 and not cache.usable


def test_refused_credentials_are_raised_from_lookup(cache: RemoteCache, transport: MemoryTransport,
                                                    warnings: list[str]) -> None:
    transport.fail = RemoteAuthError("the remote cache refused the token from $DTBUILD_REMOTE_TOKEN")
    with pytest.raises(RemoteAuthError, match="DTBUILD_REMOTE_TOKEN"):
        cache.lookup("k1", {"out"})
    with pytest.raises(RemoteAuthError):
        cache.lookup("k2", {"out"})
    assert warnings == []


def test_many_threads_warn_once(cache: RemoteCache, transport: MemoryTransport, warnings: list[str]) -> None:
    transport.fail = RemoteError("timed out")
    threads = [threading.Thread(target=cache.lookup, args=(f"k{i}", {"out"})) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(warnings) == 1


# --------------------------------------------------------------------------- uploads


def _local_result(store: Store, shared: bytes = b"shared blob\n", own: bytes = b"own\n") -> ActionResult:
    a = store.put_bytes(shared)
    b = store.put_bytes(own)
    big = store.put_bytes(BIG)
    root, total = build_tree(store, [TreeEntry("data/shared", "file", 0o644, a, len(shared)),
                                     TreeEntry("data/big", "file", 0o755, big, len(BIG))])
    return ActionResult({"file": OutputValue(b, len(own), False, True), "tree": OutputValue(root, total, True)},
                        dict(META))


def _sent(transport: MemoryTransport) -> list[Digest]:
    sent: list[Digest] = []
    for name, arg in transport.calls:
        if name == "write_small_blobs":
            sent += arg
        elif name == "write_blob":
            sent.append(arg)
    return sent


def test_upload_sends_the_missing_blobs_then_the_result(cache: RemoteCache, transport: MemoryTransport,
                                                        store: Store, warnings: list[str]) -> None:
    result = _local_result(store)
    present = transport.put(b"own\n")  # the remote has this one already
    cache.upload("k1", result)
    cache.finish()
    names = transport.names()
    assert names[0] == "find_missing" and names[-1] == "put_action_result" and names.count("put_action_result") == 1
    asked = transport.calls[0][1]
    sent = _sent(transport)
    assert present in asked and present not in sent
    assert sorted(sent) == sorted(set(asked) - {present}) and len(sent) == len(set(sent))
    assert Digest(_sha256(BIG), len(BIG)) in [arg for name, arg in transport.calls if name == "write_blob"]
    assert warnings == [] and cache.stats.uploaded_results == 1
    # what was uploaded is a hit for a fresh store
    fresh = RemoteCache(transport, Store(str(Path(store.root).parent / "fresh")), upload=False, warn=warnings.append)
    hit = fresh.lookup("k1", {"file", "tree"})
    assert hit is not None and hit.outputs == result.outputs and hit.meta == result.meta


def test_blobs_are_sent_once_across_uploads_that_share_them(cache: RemoteCache, transport: MemoryTransport,
                                                            store: Store) -> None:
    cache.upload("k1", _local_result(store, own=b"one\n"))
    cache.finish()
    first = len(transport.calls)
    cache.upload("k2", _local_result(store, own=b"two\n"))
    cache.finish()
    second = transport.calls[first:]
    sent = _sent(transport)
    assert len(sent) == len(set(sent))
    asked_again = [d for name, arg in second if name == "find_missing" for d in arg]
    assert Digest(_sha256(BIG), len(BIG)) not in asked_again  # known present: not even asked
    assert Digest(_sha256(b"two\n"), 4) in asked_again
    assert [name for name, _ in second][-1] == "put_action_result"
    assert set(transport.ac) == {action_digest("k1"), action_digest("k2")}


class SlowTransport(MemoryTransport):
    """Uploads of large blobs take a while, so that uploads running at once overlap."""

    def write_blob(self, digest: Digest, open_blob: Callable[[], IO[bytes]]) -> None:
        time.sleep(0.2)
        super().write_blob(digest, open_blob)
        self._call("wrote", digest)


def test_uploads_at_once_send_a_shared_blob_once_and_each_result_after_it(store: Store,
                                                                          warnings: list[str]) -> None:
    transport = SlowTransport()
    cache = RemoteCache(transport, store, upload=True, warn=warnings.append)
    for n in range(4):
        cache.upload(f"k{n}", _local_result(store, own=f"own {n}\n".encode()))
    cache.finish()
    sent = _sent(transport)
    assert len(sent) == len(set(sent)), sent
    big = Digest(_sha256(BIG), len(BIG))
    names = transport.names()
    wrote_big = transport.calls.index(("wrote", big))
    assert all(i > wrote_big for i, name in enumerate(names) if name == "put_action_result")
    assert names.count("put_action_result") == 4 and warnings == []


def test_upload_false_sends_nothing(transport: MemoryTransport, store: Store, warnings: list[str]) -> None:
    cache = RemoteCache(transport, store, upload=False, warn=warnings.append)
    cache.upload("k1", _local_result(store))
    cache.finish()
    assert transport.calls == [] and warnings == []


def test_a_read_only_remote_is_sent_nothing(cache: RemoteCache, transport: MemoryTransport, store: Store) -> None:
    transport.update_enabled = False  # type: ignore[attr-defined]
    cache.upload("k1", _local_result(store))
    cache.finish()
    assert transport.calls == []


def test_an_upload_that_fails_gives_the_remote_up_after_one_warning(cache: RemoteCache, transport: MemoryTransport,
                                                                    store: Store, warnings: list[str]) -> None:
    transport.fail = RemoteError("503 Service Unavailable")
    for i in range(5):
        cache.upload(f"k{i}", _local_result(store))
    cache.finish()
    assert len(warnings) == 1 and "503" in warnings[0]
    assert not cache.usable and transport.ac == {}


def test_a_blob_lost_locally_uploads_no_result(cache: RemoteCache, transport: MemoryTransport, store: Store,
                                               warnings: list[str]) -> None:
    result = ActionResult({"out": OutputValue("c" * 64, 3, False)}, {})
    cache.upload("k1", result)
    cache.finish()
    assert transport.ac == {} and warnings == [] and cache.usable


def test_memory_transport_reads_what_it_was_given(transport: MemoryTransport) -> None:
    digest = transport.put(b"abc")
    transport.write_blob(Digest("d" * 64, 2), lambda: io.BytesIO(b"de"))
    assert transport.read_small_blobs([digest, Digest("e" * 64, 1)]) == {digest: b"abc"}
    with pytest.raises(MissingRemoteBlob):
        transport.read_blob(Digest("e" * 64, 1), lambda _: None)
