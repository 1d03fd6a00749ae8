"""Small registered sources are read whole in one go: right bytes, no look into cas/
first, and a file that changes while it is read still fails the read."""

from __future__ import annotations

import builtins
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from dtbuild.engine import store as store_module
from dtbuild.engine.store import SMALL_SOURCE_MAX, SourceChangedError, Store


def _source(tmp_path: Path, data: bytes) -> tuple[Store, Path, str]:
    store = Store(str(tmp_path / "cache"))
    src = tmp_path / "ws" / "a.txt"
    src.parent.mkdir()
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    store.register_source(digest, str(src), len(data), "a.txt")
    return store, src, digest


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
