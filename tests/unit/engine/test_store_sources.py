"""The store reads registered source files in place, checks their bytes on every read
(small ones whole, in one open of the source only), and links blobs out read-only."""

from __future__ import annotations

import builtins
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from dtbuild.engine import store as store_module
from dtbuild.engine.store import SMALL_SOURCE_MAX, MissingBlobError, SourceChangedError, Store


def _source(tmp_path: Path, data: bytes = b"source bytes\n") -> tuple[Store, Path, str]:
    store = Store(str(tmp_path / "cache"))
    src = tmp_path / "ws" / "a.txt"
    src.parent.mkdir()
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    store.register_source(digest, str(src), len(data), "a.txt")
    return store, src, digest


def test_a_registered_source_is_read_in_place_and_never_copied(tmp_path: Path) -> None:
    store, _, digest = _source(tmp_path)
    assert store.has_blob(digest)
    assert store.read_blob(digest) == b"source bytes\n"
    store.copy_blob_to(digest, str(tmp_path / "copy"), 0o644)
    assert (tmp_path / "copy").read_bytes() == b"source bytes\n"
    assert not os.path.exists(store.blob_path(digest))
    assert list((tmp_path / "cache" / "cas").iterdir()) == []
    # A blob written with the same bytes goes into the store: results never rely on a source.
    assert store.put_bytes(b"source bytes\n") == digest
    assert os.path.exists(store.blob_path(digest))


def test_an_unregistered_digest_is_missing(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "cache"))
    digest = hashlib.sha256(b"x").hexdigest()
    assert not store.has_blob(digest)
    with pytest.raises(MissingBlobError):
        store.read_blob(digest)


@pytest.mark.parametrize("change", ["same-size", "longer", "removed", "symlink"])
def test_a_source_changed_after_it_was_digested_fails_its_reader(tmp_path: Path, change: str) -> None:
    store, src, digest = _source(tmp_path)
    if change == "same-size":
        src.write_bytes(b"SOURCE bytes\n")
    elif change == "longer":
        src.write_bytes(b"source bytes, and more\n")
    elif change == "removed":
        src.unlink()
    else:
        (tmp_path / "other").write_bytes(b"source bytes\n")  # even the same bytes
        src.unlink()
        src.symlink_to(tmp_path / "other")
    with pytest.raises(SourceChangedError, match=r"source a\.txt changed while the build read it"):
        store.read_blob(digest)
    with pytest.raises(SourceChangedError):
        store.copy_blob_to(digest, str(tmp_path / "copy"), 0o644)
    assert not (tmp_path / "copy").exists()
    if change != "removed":
        assert src.exists()  # a workspace file is never deleted


def test_outputs_link_plain_blobs_and_copy_executables_and_sources(tmp_path: Path) -> None:
    store, _, source_digest = _source(tmp_path)
    digest = store.put_bytes(b"generated\n")
    out = tmp_path / "out"
    out.mkdir()
    assert store.materialize_blob(digest, str(out / "plain"), link=True) == "link"
    assert store.materialize_blob(digest, str(out / "tool"), True, link=True) in ("clone", "copy")
    assert store.materialize_blob(source_digest, str(out / "src"), link=True) == "copy"
    blob = os.stat(store.blob_path(digest))
    assert os.stat(out / "plain").st_ino == blob.st_ino
    assert os.stat(out / "tool").st_ino != blob.st_ino
    assert stat.S_IMODE(os.stat(out / "plain").st_mode) == 0o444
    assert stat.S_IMODE(os.stat(out / "tool").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(out / "src").st_mode) == 0o444
    assert (out / "src").read_bytes() == b"source bytes\n"
    # Linking again over the same link leaves no temporary behind.
    store.materialize_blob(digest, str(out / "plain"), link=True)
    assert sorted(p.name for p in out.iterdir()) == ["plain", "src", "tool"]


def test_a_linked_output_made_writable_makes_its_blob_suspect(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "cache"))
    digest = store.put_bytes(b"generated\n")
    store.materialize_blob(digest, str(tmp_path / "out"), link=True)
    os.chmod(tmp_path / "out", 0o644)
    (tmp_path / "out").write_bytes(b"GENERATED\n")
    fresh = Store(str(tmp_path / "cache"))  # a later build
    assert not fresh.has_blob(digest)
    assert not os.path.exists(fresh.blob_path(digest))


# --------------------------------------------------------------------------- small sources


def _record_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fsdecode(path))
        return real_os_open(path, *args, **kwargs)

    def py_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(store_module.os, "open", os_open)
    monkeypatch.setattr(builtins, "open", py_open)
    return opened


@pytest.mark.parametrize("data", [b"", b"small source\n", bytes(range(256)) * 4096],
                         ids=["empty", "small", "1MiB"])
def test_a_small_source_is_read_in_one_open_of_the_source_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              data: bytes) -> None:
    assert len(data) <= SMALL_SOURCE_MAX
    store, src, digest = _source(tmp_path, data)
    opened = _record_opens(monkeypatch)
    for _ in range(2):  # and again: a source may change later, it is read checked each time
        with store.open_blob(digest) as f:
            assert f.read() == data
    assert opened == [str(src), str(src)]
    assert not any(p.startswith(store.cas_dir) for p in opened)


@pytest.mark.parametrize("size", [64, SMALL_SOURCE_MAX, SMALL_SOURCE_MAX + 1])
@pytest.mark.parametrize("change", ["same-size", "longer"])
def test_a_source_changed_between_its_open_and_its_read_fails_the_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, change: str) -> None:
    data = b"x" * size
    store, src, digest = _source(tmp_path, data)
    real_fstat = os.fstat
    edited: list[bool] = []

    def fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        if not edited and os.path.samestat(st, os.stat(src)):
            edited.append(True)  # right after the size check: edit the file in place
            with builtins.open(src, "r+b") as f:
                if change == "same-size":
                    f.write(b"y")
                else:
                    f.seek(0, os.SEEK_END)
                    f.write(b"more")
        return st

    monkeypatch.setattr(store_module.os, "fstat", fstat)
    with pytest.raises(SourceChangedError, match=r"source a\.txt changed while the build read it"):
        store.read_blob(digest)
    assert edited
    assert list((tmp_path / "cache" / "cas").iterdir()) == []


def test_a_changed_source_whose_bytes_are_stored_reads_the_stored_copy(tmp_path: Path) -> None:
    store, src, digest = _source(tmp_path, b"source bytes\n")
    assert store.put_bytes(b"source bytes\n") == digest
    fresh = Store(store.root)  # a later process: nothing trusted yet
    fresh.register_source(digest, str(src), len(b"source bytes\n"), "a.txt")
    src.write_bytes(b"SOURCE bytes\n")
    assert fresh.read_blob(digest) == b"source bytes\n"
    assert src.read_bytes() == b"SOURCE bytes\n"
