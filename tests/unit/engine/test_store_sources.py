"""The store reads registered source files in place, checks their bytes on every read,
and links blobs out read-only."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from dtbuild.engine.store import MissingBlobError, SourceChangedError, Store


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
