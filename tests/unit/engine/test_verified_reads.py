"""Reads of blob bytes are checked against the digest: copies as they are written,
streams when their last byte is read (before the reader gets it) or when they are
closed early. A mismatch deletes the blob."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from dtbuild.engine.store import SENTINEL_MTIME_NS, CorruptBlobError, MissingBlobError, Store, disk_error

DATA = bytes(range(256)) * 1200  # 300 kB: several chunks of the reader's buffer


def corrupt(store: Store, digest: str, at: int) -> None:
    path = store.blob_path(digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))
    os.chmod(path, 0o444)
    os.utime(path, ns=(SENTINEL_MTIME_NS, SENTINEL_MTIME_NS))


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "cache"
    return root, Store(str(root)).put_bytes(DATA)


def test_a_whole_read_of_an_intact_blob_passes_and_is_remembered(stored) -> None:
    root, digest = stored
    store = Store(str(root))
    with store.open_blob(digest) as f:
        assert f.read() == DATA
    with store.open_blob(digest) as f:  # hashed once per process: a plain file now
        assert type(f).__name__ == "BufferedReader"


def test_a_corrupt_blob_raises_before_the_reader_gets_its_last_bytes(stored) -> None:
    root, digest = stored
    corrupt(Store(str(root)), digest, 1000)
    store = Store(str(root))
    assert store.has_blob(digest)  # size and mtime say nothing
    got = bytearray()
    with pytest.raises(CorruptBlobError) as caught, store.open_blob(digest) as f:
        while chunk := f.read(70_000):
            got += chunk
    assert caught.value.digest == digest
    assert len(got) < len(DATA)
    assert not os.path.exists(store.blob_path(digest))
    assert not store.has_blob(digest)


def test_a_reader_that_stops_early_or_seeks_is_checked_when_closed(stored) -> None:
    root, digest = stored
    store = Store(str(root))
    with store.open_blob(digest) as f:  # gzip's trailer check: head, tail, then the rest
        f.read(2)
        f.seek(-4, os.SEEK_END)
        f.read(4)
        f.seek(2)
        f.read()
    corrupt(Store(str(root)), digest, len(DATA) - 10)
    store = Store(str(root))
    with pytest.raises(CorruptBlobError), store.open_blob(digest) as f:
        f.read(10)


def test_a_reader_failing_on_bad_bytes_reports_the_corruption(stored) -> None:
    root, digest = stored
    corrupt(Store(str(root)), digest, 5)
    store = Store(str(root))
    with pytest.raises(CorruptBlobError) as caught, store.open_blob(digest) as f:
        f.read(10)
        raise ValueError("not a tar")
    assert isinstance(caught.value.__context__, ValueError)


def test_a_copy_is_checked_as_it_is_written_and_a_bad_one_leaves_nothing(stored, tmp_path: Path) -> None:
    root, digest = stored
    corrupt(Store(str(root)), digest, 150_000)
    store = Store(str(root))
    dest = tmp_path / "out.bin"
    with pytest.raises(CorruptBlobError):
        store.materialize_blob(digest, str(dest))
    assert list(tmp_path.iterdir()) == [root]
    with pytest.raises(MissingBlobError):
        store.materialize_blob(digest, str(dest))
    digest = store.put_bytes(DATA)
    store.materialize_blob(digest, str(dest))
    assert dest.read_bytes() == DATA


def test_disk_errors_say_what_where_and_how_much(tmp_path: Path) -> None:
    full = disk_error(OSError(errno.ENOSPC, "No space left on device"), "output dtbuild-out/a.bin",
                      str(tmp_path), needed=3_000_000)
    assert full is not None and full.exit_code == 1
    text = full.render()
    assert text.startswith(f"no space left on the device while writing output dtbuild-out/a.bin to {tmp_path} "
                           "(it needs 3.0 MB, ")
    assert "DTBUILD_CACHE_DIR" in text
    assert disk_error(OSError(errno.EACCES, "Permission denied"), "x", str(tmp_path)) is None
